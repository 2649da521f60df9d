-- The seam for several nodes (issue 15), not used yet: a running job's lease,
-- Unix milliseconds until which the node that claimed it holds it. NULL while
-- a job is not running and, this round, while it runs too: one node per
-- database, and that node re-queues every running job when it starts.
-- Still missing: the claim setting it (and the claiming node's id), the node
-- renewing it while the job runs, finishing and re-queueing only while it
-- holds, and a sweep re-queueing (counting the attempt) jobs whose lease ran
-- out, in place of the re-queue at start.
ALTER TABLE jobs ADD COLUMN lease_until BIGINT;
