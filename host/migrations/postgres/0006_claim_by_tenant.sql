-- The claim (`claim_next`) visits each tenant with queued jobs and takes the
-- oldest eligible job of each from this index, so its cost grows with the
-- number of tenants waiting, not with the number of queued jobs.
CREATE INDEX jobs_queued_by_tenant ON jobs (tenant, created_at, id) WHERE state = 'queued';
