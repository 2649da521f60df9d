-- The claim's plan (BENCHMARKS.md, "Several nodes"): 20 tenants with 1,000
-- queued jobs each, 20,000 finished jobs and 10 running, then the claim's
-- SELECT as `PostgresStore::claim_next` sends it (host/src/store/postgres.rs;
-- caps 4 per tenant, 100 per module, the `hello` module served).
-- Run by scripts/bench-nodes on a copy of a migrated database.
ALTER TABLE jobs DISABLE TRIGGER jobs_events;
INSERT INTO jobs (id, tenant, subject, token_id, module, module_sha256, params, inputs, has_stdin,
                  state, created_at, finished_at, attempts)
SELECT gen_random_uuid()::text, 't' || (i % 20), 's', 'tok', 'hello', 'x', '{}', '[]', false,
       CASE WHEN i <= 20000 THEN 'succeeded' WHEN i <= 20010 THEN 'running' ELSE 'queued' END,
       1000000 + i, CASE WHEN i <= 20000 THEN 1000000 + i END, CASE WHEN i <= 20010 THEN 1 ELSE 0 END
FROM generate_series(1, 40010) AS i;
VACUUM ANALYZE jobs;
BEGIN;
EXPLAIN (ANALYZE, COSTS OFF, TIMING OFF, SUMMARY ON)
WITH RECURSIVE tenants (tenant) AS (
        (SELECT tenant FROM jobs WHERE state = 'queued' ORDER BY tenant LIMIT 1)
        UNION ALL
        SELECT (SELECT q.tenant FROM jobs q
                WHERE q.state = 'queued' AND q.tenant > t.tenant
                ORDER BY q.tenant LIMIT 1)
        FROM tenants t WHERE t.tenant IS NOT NULL),
     running AS (SELECT tenant, module FROM jobs WHERE state = 'running'),
     per_tenant AS (SELECT tenant, COUNT(*) AS n FROM running GROUP BY tenant),
     per_module AS (SELECT module, COUNT(*) AS n FROM running GROUP BY module),
     candidates AS (
        SELECT c.id, COALESCE(pt.n, 0) AS n, c.created_at
        FROM tenants t
        LEFT JOIN per_tenant pt ON pt.tenant = t.tenant
        CROSS JOIN LATERAL (
            SELECT q.id, q.created_at FROM jobs q
            WHERE q.state = 'queued' AND q.tenant = t.tenant AND q.module = ANY('{hello}')
                  AND COALESCE((SELECT m.n FROM per_module m WHERE m.module = q.module), 0) < 100
            ORDER BY q.created_at, q.id
            LIMIT 1) c
        WHERE t.tenant IS NOT NULL AND COALESCE(pt.n, 0) < 4)
SELECT jobs.id, jobs.tenant FROM candidates c JOIN jobs ON jobs.id = c.id
WHERE jobs.state = 'queued'
ORDER BY c.n, c.created_at, c.id
LIMIT 1
FOR NO KEY UPDATE OF jobs SKIP LOCKED;
ROLLBACK;
