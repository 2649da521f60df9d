-- A finished job's report in a few words (outcome, exit code, limit,
-- failure kind, how many outputs), written beside the report when the job
-- finishes: a listing of many jobs reads these, not their reports, whose
-- captured text and outputs lists can be megabytes each.
ALTER TABLE jobs ADD COLUMN summary TEXT;
-- Jobs finished before: from their reports. A NUL escaped in captured
-- text is one PostgreSQL's JSON functions refuse; it becomes U+FFFD here,
-- where only the report's other fields are read.
UPDATE jobs SET summary = json_build_object(
        'outcome', r->>'outcome',
        'exit_code', (r->>'exit_code')::int,
        'limit', r->>'limit',
        'failure', r->'failure'->>'kind',
        'outputs', COALESCE(json_array_length(r->'outputs'), 0))::text
    FROM (SELECT id AS rid, replace(report, '\u0000', '\ufffd')::json AS r FROM jobs WHERE report IS NOT NULL) AS old
    WHERE jobs.id = old.rid;
