-- Jobs' inputs and outputs, shared by every node on the database (see
-- host/src/blob/postgres.rs). One `blobs` row per object; its bytes in
-- `blob_chunks` of at most 1 MiB each, written and read one chunk at a time.
-- No foreign key to `jobs`: a submission stores its inputs before its row,
-- and an inline job its outputs; blobs no row points to are swept by age.

CREATE TABLE blobs (
    id          BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    job_id      TEXT COLLATE "C" NOT NULL,
    kind        TEXT NOT NULL CHECK (kind IN ('input', 'stdin', 'output')),
    -- The input's or output's name ('' for stdin).
    name        TEXT NOT NULL,
    -- The attempt that wrote an output (0 for inputs): a stale attempt
    -- never replaces a later one's outputs.
    attempt     INTEGER NOT NULL DEFAULT 0,
    length      BIGINT NOT NULL,
    sha256      TEXT NOT NULL,
    created_at  BIGINT NOT NULL,
    UNIQUE (job_id, kind, name)
);
CREATE INDEX blobs_by_age ON blobs (created_at);

CREATE TABLE blob_chunks (
    blob_id  BIGINT NOT NULL REFERENCES blobs (id) ON DELETE CASCADE,
    seq      INTEGER NOT NULL,
    data     BYTEA NOT NULL,
    PRIMARY KEY (blob_id, seq)
);
-- Outputs are often compressed already: stored out of line without
-- PostgreSQL trying to compress them again.
ALTER TABLE blob_chunks ALTER COLUMN data SET STORAGE EXTERNAL;
