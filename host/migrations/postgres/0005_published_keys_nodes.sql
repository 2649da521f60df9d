-- Several nodes on one database: the call-token public keys every
-- node publishes, so each node's JWKS serves every live key, and the node
-- registry (host/src/store/keys.rs).
CREATE TABLE published_keys (
    kid TEXT PRIMARY KEY,
    node TEXT NOT NULL,
    x TEXT NOT NULL,
    active BOOLEAN NOT NULL,
    -- Unix seconds at which the key leaves the JWKS.
    until BIGINT NOT NULL
);

CREATE TABLE nodes (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    -- Unix milliseconds.
    started_at BIGINT NOT NULL,
    heartbeat_at BIGINT NOT NULL,
    addresses JSONB NOT NULL
);
