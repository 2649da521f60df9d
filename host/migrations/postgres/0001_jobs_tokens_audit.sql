-- The job store's schema on PostgreSQL: the same tables and meanings as the
-- SQLite store (host/src/store/sqlite.rs), with PostgreSQL's own types.
-- Identifiers sort bytewise (COLLATE "C"), as SQLite sorts them, so lists
-- ordered by (created_at, id) come out in the same order on both stores.

CREATE TABLE tokens (
    id          TEXT COLLATE "C" PRIMARY KEY,
    hash        TEXT NOT NULL UNIQUE,
    tenant      TEXT NOT NULL,
    subject     TEXT NOT NULL,
    scopes      JSONB NOT NULL,
    created_at  BIGINT NOT NULL,
    expires_at  BIGINT,
    revoked     BOOLEAN NOT NULL DEFAULT FALSE
);

CREATE TABLE jobs (
    id            TEXT COLLATE "C" PRIMARY KEY,
    tenant        TEXT NOT NULL,
    subject       TEXT NOT NULL,
    token_id      TEXT NOT NULL,
    module        TEXT NOT NULL,
    module_sha256 TEXT NOT NULL,
    policy_sha256 TEXT,
    params        JSONB NOT NULL,
    inputs        JSONB NOT NULL,
    has_stdin     BOOLEAN NOT NULL,
    state         TEXT NOT NULL
                  CHECK (state IN ('queued', 'running', 'succeeded', 'failed', 'cancelled')),
    created_at    BIGINT NOT NULL,
    started_at    BIGINT,
    finished_at   BIGINT,
    attempts      INTEGER NOT NULL DEFAULT 0,
    -- The sandbox report (JSON text as serde writes it, kept verbatim).
    report        TEXT
);
-- Only unfinished jobs are looked up by state (recovery, claims), so the
-- index holds just those.
CREATE INDEX jobs_pending ON jobs (created_at, id) WHERE state IN ('queued', 'running');
CREATE INDEX jobs_by_tenant ON jobs (tenant, created_at);
-- The retention sweep deletes finished jobs by when they finished.
CREATE INDEX jobs_finished ON jobs (finished_at) WHERE state IN ('succeeded', 'failed', 'cancelled');

-- Idempotency keys live beside the jobs, not on their rows: taking over an
-- expired key then never writes (and row-locks) another job, so a claim's
-- `FOR NO KEY UPDATE SKIP LOCKED` skips a job only while another claim or a
-- cancel holds it. One live key per tenant; deleting the job frees its key.
-- The foreign key is checked at commit, so the key is taken before the job
-- row is written, in the same transaction.
CREATE TABLE idempotency (
    tenant         TEXT NOT NULL,
    key            TEXT NOT NULL,
    job_id         TEXT COLLATE "C" NOT NULL
                   REFERENCES jobs (id) ON DELETE CASCADE DEFERRABLE INITIALLY DEFERRED,
    request_sha256 TEXT NOT NULL,
    created_at     BIGINT NOT NULL,
    PRIMARY KEY (tenant, key)
);
CREATE INDEX idempotency_by_job ON idempotency (job_id);

CREATE TABLE audit (
    seq           BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    at            BIGINT NOT NULL,
    action        TEXT NOT NULL,
    tenant        TEXT,
    subject       TEXT,
    job_id        TEXT,
    module        TEXT,
    module_sha256 TEXT,
    policy_sha256 TEXT,
    outcome       TEXT,
    limit_fired   TEXT,
    detail        TEXT NOT NULL,
    client        TEXT
);
CREATE INDEX audit_by_time ON audit (at);

-- One row, rewritten to learn whether the store can write again after a
-- storage failure (readiness).
CREATE TABLE probe (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    at BIGINT NOT NULL
);
