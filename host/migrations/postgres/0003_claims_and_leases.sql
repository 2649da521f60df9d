-- Leases across nodes: a running job names the node that claimed
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

-- Wake-ups across nodes: a job queued (a submission, a re-queue) or ended
-- (finished, failed, cancelled) is announced on channel `bulkhead_jobs` as
-- JSON {state, tenant, id} when its transaction commits. Nodes listen to
-- wake their claim loops (a job to take, a cap freed), the waiters of a job
-- another node ran, and the run of a job another node cancelled.
CREATE FUNCTION bulkhead_job_event() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.state IN ('queued', 'succeeded', 'failed', 'cancelled')
       AND (TG_OP = 'INSERT' OR OLD.state IS DISTINCT FROM NEW.state) THEN
        PERFORM pg_notify('bulkhead_jobs',
            json_build_object('state', NEW.state, 'tenant', NEW.tenant, 'id', NEW.id)::text);
    END IF;
    RETURN NULL;
END
$$;
CREATE TRIGGER jobs_events AFTER INSERT OR UPDATE OF state ON jobs
    FOR EACH ROW EXECUTE FUNCTION bulkhead_job_event();
