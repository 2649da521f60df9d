-- Leases across nodes (issue 15): a running job names the node that claimed
-- it (`claimed_by`, that node's id for this start) and holds it until
-- `lease_until` (from 0002: Unix milliseconds on the database's clock). The
-- node renews the leases of the jobs it runs; any node gives back to the
-- queue a running job whose lease ran out (or finishes it failed once it was
-- started the maximum number of times). Finishing, re-queueing and renewing
-- compare the claiming node and the attempt, so a node that lost a lease
-- never overwrites the job's next run.
ALTER TABLE jobs ADD COLUMN claimed_by TEXT;
-- The lease sweep looks up running jobs by when their lease runs out.
CREATE INDEX jobs_leases ON jobs (lease_until) WHERE state = 'running';
