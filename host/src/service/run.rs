//! Running: the workers, the one path that runs a claimed or admitted job
//! in the sandbox and records it finished, what a failure of the host on
//! that path does to the job, cancellation, and the keeper that watches the
//! storage and recovers unfinished jobs.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{Notify, oneshot};

use super::*;
use crate::auth::Identity;
use crate::runner::{Module, Queued};
use crate::sandbox::{JobReport, JobSpec};
use crate::store::{
    AuditEntry, CancelOutcome, Claim, Claimed, Idempotency, Inserted, JobRecord, JobState,
    StoreError, now_ms,
};

/// How a worker's job ended.
#[derive(Debug)]
pub(super) enum Ran {
    /// Finished (its record), or cancelled, or left for the next start
    /// (`None`).
    Ended(Option<Box<JobRecord>>),
    /// Given back to the queue after a failure of the host; after a storage
    /// failure (`storage`), the keeper re-queues it once the storage writes.
    Requeued { storage: bool },
    /// Stopped because its claim was lost (its lease ran out and another
    /// run took it, or it was cancelled through another node).
    Lost,
}

/// Longest wait of a shared store's worker between two looks at the
/// store's queue when nothing woke it (a lost notification, a reconnect).
pub(super) const PULL_EVERY: Duration = Duration::from_secs(3);

/// Keeper ticks (seconds) between two unprompted recoveries.
pub(super) const RECOVER_EVERY: u32 = 30;

/// Longest pause between two tries to record a finished job.
pub(super) const FINISH_RETRY_MAX: Duration = Duration::from_secs(5);

/// The audit writes a job's refused calls started (see
/// [`Service::refusal_sink`]).
#[derive(Clone, Debug, Default)]
pub(super) struct AuditWrites(Arc<Mutex<Vec<tokio::task::JoinHandle<()>>>>);

impl AuditWrites {
    /// Waits for every write started so far, so a job's refusals are in the
    /// audit log before it is reported finished (or cancelled).
    async fn settle(&self) {
        let pending = std::mem::take(&mut *self.0.lock().unwrap_or_else(|e| e.into_inner()));
        for write in pending {
            let _ = write.await;
        }
    }
}

/// An `egress.denied` audit entry for `record`'s job.
pub(super) fn egress_denied(record: &JobRecord, detail: String) -> AuditEntry {
    AuditEntry {
        at: now_ms(),
        action: "egress.denied".into(),
        tenant: Some(record.tenant.clone()),
        subject: Some(record.subject.clone()),
        job_id: Some(record.id.clone()),
        module: Some(record.module.clone()),
        module_sha256: Some(record.module_sha256.clone()),
        policy_sha256: record.policy_sha256.clone(),
        detail,
        ..AuditEntry::default()
    }
}

impl Service {
    /// Cancels the caller's queued or running job.
    ///
    /// # Errors
    /// 404 if unknown, 409 if already finished.
    pub async fn cancel(&self, who: &Identity, id: &str) -> Result<JobState, ServiceError> {
        match self.store.cancel_job(&who.tenant, id, now_ms()).await? {
            CancelOutcome::NotFound => Err(ServiceError::NoJob(id.to_owned())),
            CancelOutcome::AlreadyFinished(state) => Err(ServiceError::Conflict(format!(
                "job `{id}` already {}",
                state.as_str()
            ))),
            CancelOutcome::Cancelled(before) => {
                if before == JobState::Queued {
                    self.scheduler.remove(id);
                    self.remove_job_files(id).await;
                    self.wake(id, None);
                } else if let Some(cancel) = self
                    .cancels
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .get(id)
                {
                    cancel.notify_one();
                }
                self.audit(AuditEntry {
                    at: now_ms(),
                    action: "job.cancelled".into(),
                    tenant: Some(who.tenant.clone()),
                    subject: Some(who.subject.clone()),
                    job_id: Some(id.to_owned()),
                    detail: format!("cancelled while {}", before.as_str()),
                    ..AuditEntry::default()
                })
                .await;
                self.update_gauges();
                Ok(JobState::Cancelled)
            }
        }
    }

    /// Wakes the waiters of job `id`, which has ended as `finished`. A
    /// heavy report nobody else holds goes with it, and what the allocator
    /// kept of it goes back (a waiter's answer does the same when done).
    fn ended(&self, id: &str, finished: Option<Box<JobRecord>>) {
        self.wake(id, finished.as_deref());
        let heavy = finished
            .as_ref()
            .and_then(|record| record.report.as_ref())
            .is_some_and(|report| report.json_bound() >= crate::job::HEAVY_REPORT as u64);
        drop(finished);
        if heavy {
            crate::serve::memory::trim_soon();
        }
    }

    /// Hands each durable job the scheduler starts a task of its own, which
    /// runs it: as many run at once as hold slots, and those whose slots
    /// are set aside while they wait for room.
    pub(super) async fn worker(self: Arc<Self>) {
        while let Some(slot) = self.scheduler.next().await {
            self.hold(&slot.job().id, true);
            tokio::spawn(Arc::clone(&self).run_slot(slot));
        }
    }

    /// Runs the durable job of `slot`, held by this process.
    async fn run_slot(self: Arc<Self>, slot: Slot) {
        let job = slot.job().clone();
        let ran = self.run_one(&job, &slot).await;
        self.hold(&job.id, false);
        drop(slot);
        match ran {
            Ran::Ended(finished) => self.ended(&job.id, finished),
            // Another run has it, or it was cancelled elsewhere: its
            // waiters here hear of it once it is final.
            Ran::Lost => {
                if let Ok(Some(now)) = self.store.get_job(&job.tenant, &job.id).await
                    && now.state.is_final()
                {
                    self.wake(&job.id, Some(&now));
                }
            }
            // Its next attempt may start at once; after a storage
            // failure the keeper re-queues it once the storage writes.
            Ran::Requeued { storage: false } => self.enqueue(job),
            Ran::Requeued { storage: true } => {
                self.recover_wanted.store(true, Ordering::SeqCst);
            }
        }
        self.update_gauges();
    }

    /// A worker of a node on a shared store ([`JobStore::shared`]): takes
    /// the next job from the store's queue ([`JobStore::claim_next`],
    /// under the running caps of all nodes together) once a slot of this
    /// node's scheduler is free, and runs it in a task of its own holding
    /// that slot (so draining and the gauges see it). Between claims it
    /// waits to be woken (a submission or a finish here, a lease sweep) or
    /// at most [`PULL_EVERY`].
    pub(super) async fn puller(self: Arc<Self>) {
        let q = &self.config.queue;
        let caps = crate::store::Caps {
            per_tenant: u32::try_from(q.max_running_per_tenant).unwrap_or(u32::MAX),
            per_module: u32::try_from(q.max_running_per_module).unwrap_or(u32::MAX),
            modules: self.modules.keys().cloned().collect(),
        };
        let max_attempts = q.max_attempts;
        loop {
            // A slot of this node's first: a claim holds the job.
            let Some(vacancy) = self.scheduler.vacancy().await else {
                return;
            };
            let woken = self.work.notified();
            tokio::pin!(woken);
            woken.as_mut().enable();
            if self.is_draining() {
                return;
            }
            let claimed = if self.storage_ok() {
                self.store
                    .claim_next(now_ms(), max_attempts, &self.lease(), &caps)
                    .await
            } else {
                Ok(None)
            };
            let claimed = match claimed {
                Ok(Some(claimed)) => claimed,
                Ok(None) => {
                    // Not held while nothing is to be had: an inline job
                    // may take it.
                    drop(vacancy);
                    tokio::select! {
                        () = woken => {}
                        () = tokio::time::sleep(PULL_EVERY) => {}
                    }
                    continue;
                }
                Err(e) => {
                    drop(vacancy);
                    tracing::error!(error = %e, "cannot claim the next job");
                    self.noted(e.into());
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
            };
            let job = match &claimed {
                Claim::Run(record, _) | Claim::GaveUp(record) => QueuedJob {
                    id: record.id.clone(),
                    tenant: record.tenant.clone(),
                    module: record.module.clone(),
                },
                Claim::Gone => continue,
            };
            let slot = vacancy.occupy(job.clone());
            self.hold(&job.id, true);
            tokio::spawn(Arc::clone(&self).run_claimed_slot(claimed, slot));
        }
    }

    /// Runs the job a shared store's worker claimed, holding `slot`.
    async fn run_claimed_slot(self: Arc<Self>, claimed: Claim, slot: Slot) {
        let job = slot.job().clone();
        let cancel = self.cancel_handle(&job.id);
        let ran = self.run_claim(&job.id, Ok(claimed), &cancel, &slot).await;
        drop(cancel);
        self.hold(&job.id, false);
        drop(slot);
        match ran {
            Ran::Ended(finished) => self.ended(&job.id, finished),
            Ran::Lost => {
                if let Ok(Some(now)) = self.store.get_job(&job.tenant, &job.id).await
                    && now.state.is_final()
                {
                    self.wake(&job.id, Some(&now));
                }
            }
            Ran::Requeued { storage: false } => {}
            Ran::Requeued { storage: true } => {
                self.recover_wanted.store(true, Ordering::SeqCst);
            }
        }
        // The slot (and any cap) this job held goes to the next claim of
        // this node's workers: one looks now.
        self.work.notify_one();
        self.update_gauges();
    }

    /// Acts on the jobs other nodes queue or end ([`JobStore::events`]): a
    /// job queued wakes a worker; a job ended frees a cap (a worker looks
    /// again), wakes its waiters here when another node ran it, and,
    /// cancelled through another node while it runs here, stops its run.
    pub(super) async fn listener(
        self: Arc<Self>,
        mut events: tokio::sync::mpsc::Receiver<crate::store::JobEvent>,
    ) {
        while let Some(event) = events.recv().await {
            if self.is_draining() {
                return;
            }
            match event.state {
                JobState::Queued => self.work.notify_one(),
                JobState::Running => {}
                JobState::Succeeded | JobState::Failed | JobState::Cancelled => {
                    // A cap freed on another node: one worker here looks.
                    self.work.notify_one();
                    if event.state == JobState::Cancelled
                        && self.claims_lock().contains_key(&event.id)
                        && let Some(cancel) = self
                            .cancels
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .get(&event.id)
                    {
                        cancel.notify_one();
                    }
                    let waited = self
                        .waiters
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .contains_key(&event.id);
                    if waited && !self.is_held(&event.id) {
                        match self.store.get_job(&event.tenant, &event.id).await {
                            Ok(Some(job)) if job.state.is_final() => {
                                self.wake(&job.id, Some(&job));
                            }
                            Ok(_) => {}
                            Err(e) => {
                                tracing::error!(job = %event.id, error = %e, "cannot read a job another node ended");
                            }
                        }
                    }
                }
            }
        }
    }

    /// Queues `job` for this node's workers: in the scheduler, or, on a
    /// shared store, where it already is (the store), waking a worker.
    pub(super) fn enqueue(&self, job: QueuedJob) {
        if self.shared {
            self.work.notify_one();
        } else {
            let _ = self.scheduler.push(job, false);
        }
    }

    /// Marks a job as held by a worker of this process, or no longer.
    pub(super) fn hold(&self, id: &str, held: bool) {
        let mut set = self.held.lock().unwrap_or_else(|e| e.into_inner());
        if held {
            set.insert(id.to_owned());
        } else {
            set.remove(id);
        }
    }

    pub(super) fn is_held(&self, id: &str) -> bool {
        self.held
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains(id)
    }

    /// Claims, runs and finishes one job; returns its finished record, or
    /// `None` if it did not finish here: cancelled, or given back to the
    /// queue after a failure of the host (see [`Service::host_failed`]).
    /// A store failure never drops the job: it stays `queued` (the claim
    /// failed) or is given back, and the keeper re-queues it.
    pub(super) async fn run_one(&self, queued: &QueuedJob, slot: &Slot) -> Ran {
        let max_attempts = self.config.queue.max_attempts;
        // Listening for a cancel before the claim: one that lands between
        // the claim and the run (while stored inputs are read) leaves a
        // permit, and the run ends before the guest starts.
        let cancel = self.cancel_handle(&queued.id);
        let claimed = self
            .store
            .claim(
                &queued.tenant,
                &queued.id,
                now_ms(),
                max_attempts,
                &self.lease(),
            )
            .await;
        self.run_claim(&queued.id, claimed, &cancel, slot).await
    }

    /// Runs and finishes the job of `claimed` (the claim of job `id`,
    /// whose cancel handle is `cancel`), as [`Service::run_one`] does.
    async fn run_claim(
        &self,
        id: &str,
        claimed: Result<Claim, StoreError>,
        cancel: &CancelHandle<'_>,
        slot: &Slot,
    ) -> Ran {
        let (record, claim) = match claimed {
            Ok(Claim::Run(record, claim)) => (*record, claim),
            Ok(Claim::Gone) => return Ran::Ended(None), // cancelled while queued
            Ok(Claim::GaveUp(record)) => {
                tracing::error!(job = %record.id, attempts = record.attempts, "job failed: started too many times without finishing");
                self.remove_inputs(&record).await;
                let (finished_at, report) = (record.finished_at, record.report.clone());
                let Some(report) = report else {
                    return Ran::Ended(None);
                };
                return Ran::Ended(Some(Box::new(
                    self.finished(*record, report, finished_at.unwrap_or_else(now_ms))
                        .await,
                )));
            }
            Err(e) => {
                // Still `queued` in the store: the claim rolled back.
                tracing::error!(job = %id, error = %e, "cannot claim job; it stays queued");
                self.noted(e.into());
                return Ran::Requeued { storage: true };
            }
        };
        self.claims_lock()
            .insert(record.id.clone(), (claim.clone(), ClaimState::Running));
        let ran = self.run_claimed(record, &claim, cancel, slot).await;
        self.claims_lock().remove(claim.id());
        match ran {
            // Not finished here: cancelled, or its claim lost (its lease ran
            // out and another node has it). The store says which; waiters
            // hear of it once it is final, never "cancelled" by guess.
            Ran::Ended(None) => Ran::Lost,
            ran => ran,
        }
    }

    pub(super) fn claims_lock(
        &self,
    ) -> std::sync::MutexGuard<'_, HashMap<String, (Claimed, ClaimState)>> {
        self.claims.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Runs and finishes a job this node claimed (see [`Service::run_one`]).
    async fn run_claimed(
        &self,
        record: JobRecord,
        claim: &Claimed,
        cancel: &CancelHandle<'_>,
        slot: &Slot,
    ) -> Ran {
        let result = match self.modules.get(&record.module) {
            Some(module) => self.run_stored(module, &record, cancel, slot).await,
            None => Ok(Some(JobReport::not_run(
                &record.id,
                &record.module,
                "module is no longer served",
            ))),
        };
        match result {
            Ok(Some(report)) => Ran::Ended(self.finish(record, claim, report).await.map(Box::new)),
            Ok(None) => {
                // Cancelled while running (or waiting aside): its inputs
                // go now, not with the retention sweep.
                self.remove_inputs_if_cancelled(&record).await;
                Ran::Ended(None)
            }
            // Its guest was stopped by shutdown, which is no failure of the
            // job's: back to the queue with its attempt given back, for the
            // next start (or another node). Should the store not take it,
            // it stays `running` under this node's claim, and the next start
            // takes it back, its attempt counted.
            Err(ServiceError::Draining) => match self.store.requeue(claim, false).await {
                Ok(true) => Ran::Requeued { storage: false },
                Ok(false) => {
                    self.remove_inputs_if_cancelled(&record).await;
                    Ran::Ended(None)
                }
                Err(e) => {
                    tracing::warn!(job = %record.id, error = %e, "cannot give back a job stopped by shutdown; the next start re-runs it");
                    Ran::Ended(None)
                }
            },
            Err(e) => self.host_failed(record, claim, e).await,
        }
    }

    /// The host failed on `record`'s path (its result could not be kept,
    /// its directory not made, its stored inputs not read…). A storage
    /// failure gives the job back to the queue without spending its attempt:
    /// it runs again once the storage writes. Any other failure spends it:
    /// the job is re-queued, or, at its last attempt, finished `failed` with
    /// the reason. Whatever is left of its outputs is removed.
    pub(super) async fn host_failed(
        &self,
        record: JobRecord,
        claim: &Claimed,
        e: ServiceError,
    ) -> Ran {
        self.remove_outputs(&record).await;
        let max_attempts = self.config.queue.max_attempts;
        // Some failures lose their error number on the way up (a message
        // only): a data directory out of space says what it was.
        let storage = e.is_storage() || self.free_space().is_ok_and(|free| free < MIN_FREE);
        if storage || record.attempts < max_attempts {
            if storage {
                tracing::error!(job = %record.id, error = %e, "storage failed on the job's path; it goes back to the queue");
                self.noted(e);
            } else {
                tracing::error!(job = %record.id, attempt = record.attempts, error = %e, "the host failed on the job's path; it goes back to the queue");
            }
            return match self.store.requeue(claim, !storage).await {
                Ok(true) => Ran::Requeued { storage },
                // The claim no longer holds: cancelled meanwhile (its
                // inputs go now; found by an attacker: a job cancelled while
                // its outputs were copied, whose copy then failed, kept
                // them), or another attempt runs it.
                Ok(false) => {
                    self.remove_inputs_if_cancelled(&record).await;
                    Ran::Ended(None)
                }
                Err(e) => {
                    // Left `running` and not held: the keeper re-queues it.
                    tracing::error!(job = %record.id, error = %e, "cannot re-queue the job");
                    self.noted(e.into());
                    Ran::Requeued { storage: true }
                }
            };
        }
        tracing::error!(job = %record.id, attempts = record.attempts, error = %e, "job failed: the host could not finish it");
        let report = JobReport::not_run(
            &record.id,
            &record.module,
            format!(
                "the host could not finish the job in {} attempts (last: {e})",
                record.attempts
            ),
        );
        Ran::Ended(self.finish(record, claim, report).await.map(Box::new))
    }

    /// Records `record`'s job finished with `report`. A store failure is
    /// retried, with backoff, until the store writes again or the service
    /// drains (the job is then left `running`, and re-run at the next
    /// start); the result is never dropped while the process lives.
    pub(super) async fn finish(
        &self,
        record: JobRecord,
        claim: &Claimed,
        report: JobReport,
    ) -> Option<JobRecord> {
        // From here a renewal that finds the claim gone is seeing this
        // finish, not a lost claim: the run has ended either way.
        if let Some((_, state)) = self.claims_lock().get_mut(claim.id()) {
            *state = ClaimState::Finishing;
        }
        let mut pause = Duration::from_millis(100);
        loop {
            let finished_at = now_ms();
            match self.store.finish_job(claim, &report, finished_at).await {
                Ok(true) => {
                    self.remove_inputs(&record).await;
                    return Some(self.finished(record, report, finished_at).await);
                }
                // Cancelled while running, or its claim lost: its result is
                // dropped, with whatever this attempt kept of its outputs.
                Ok(false) => {
                    self.remove_outputs(&record).await;
                    self.remove_inputs_if_cancelled(&record).await;
                    return None;
                }
                Err(e) => {
                    tracing::error!(job = %record.id, error = %e, retry_in = ?pause, "cannot record the finished job");
                    self.noted(e.into());
                    if self.is_draining() {
                        return None;
                    }
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(FINISH_RETRY_MAX);
                }
            }
        }
    }

    /// Removes `record`'s stored inputs if the store has it cancelled: a
    /// job cancelled while it ran never runs again (found by an attacker:
    /// jobs cancelled while running or waiting aside kept their inputs
    /// for the retention period, gigabytes of uploads a tenant could pile
    /// up by submitting and cancelling). A job whose claim was lost keeps
    /// them, for the attempt that runs it now.
    async fn remove_inputs_if_cancelled(&self, record: &JobRecord) {
        match self.store.get_job(&record.tenant, &record.id).await {
            Ok(Some(now)) if now.state == JobState::Cancelled => self.remove_inputs(record).await,
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(job = %record.id, error = %e, "cannot tell whether a job was cancelled; its inputs go with the retention sweep");
            }
        }
    }

    /// Metrics and call audit of a job the store has just recorded as
    /// finished; returns its final record.
    pub(super) async fn finished(
        &self,
        mut record: JobRecord,
        report: JobReport,
        finished_at: i64,
    ) -> JobRecord {
        let outcome = if report.succeeded() {
            "succeeded"
        } else {
            "failed"
        };
        metrics::counter!("bulkhead_jobs_total", "module" => record.module.clone(), "outcome" => outcome).increment(1);
        if let Some(limit) = report.limit {
            metrics::counter!("bulkhead_limits_fired_total", "module" => record.module.clone(), "limit" => limit.as_str())
                .increment(1);
        }
        metrics::histogram!("bulkhead_job_wall_seconds", "module" => record.module.clone())
            .record(report.measurements.wall_time_ms / 1000.0);
        if let Some(calls) = &report.calls {
            self.audit_calls(&record, calls).await;
        }
        record.state = if report.succeeded() {
            JobState::Succeeded
        } else {
            JobState::Failed
        };
        record.finished_at = Some(finished_at);
        record.report = Some(report);
        record
    }

    /// The inline path: runs a waited-for job in the caller's task and
    /// stores it once, finished. Only for a job the caller waits for and
    /// whose wall-time limit ends before the wait does, once the scheduler
    /// has given it a slot in its fair turn ([`Scheduler::wait_turn`]):
    /// such a job is never acknowledged before it has finished and been
    /// stored, so it needs no durable queued state, and it skips the
    /// queue's store writes and thread hand-offs. `None`: it had no room
    /// or place in its zone by `place_by` (when only its wall time is left
    /// of the wait); nothing of it ran or is kept, and the caller stores and
    /// queues it instead (found by an attacker: an inline job waiting for
    /// room held its request 73 s past a 35 s wait, unlisted and
    /// uncancellable meanwhile).
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn run_now(
        &self,
        who: &Identity,
        module: &Module,
        spec: &JobSpec,
        has_stdin: bool,
        slot: Slot,
        key: Option<&Idempotency>,
        place_by: tokio::time::Instant,
    ) -> Result<Option<Accepted>, ServiceError> {
        let now = now_ms();
        let record = JobRecord {
            state: JobState::Running,
            started_at: Some(now),
            attempts: 1,
            ..super::admit::new_record(who, module, spec, has_stdin, now)
        };
        // The caller authenticated on this very request; the identity its
        // calls carry is read again when it starts. A failure of the
        // host on the way is a failed job with a reason (never a 500),
        // unless it is the storage's: then nothing can be stored, and the
        // caller is told to retry (503). Either way nothing is left under
        // the data directory without a row.
        let cancel = self.cancel_handle(&record.id);
        let ran = self
            .execute(
                module,
                &record,
                Spec::Held(spec),
                &cancel,
                &slot,
                Some(place_by),
            )
            .await
            .map(|report| {
                // Inline jobs have no row to cancel, so nothing ends them
                // early; should one be, it is a failed job, not a lost one.
                report.unwrap_or_else(|| {
                    JobReport::not_run(&record.id, &record.module, "the job was cancelled")
                })
            });
        // The sandbox is done with it: the next job need not wait for the
        // store. The job the slot goes to was woken onto this thread, where
        // it would wait for this one's store write and answer; it goes
        // first, so its guest starts (its `Run` is sent to its worker)
        // while this one's result is stored, and the store's group commit
        // takes both jobs' writes in one transaction when they meet.
        drop(slot);
        tokio::task::yield_now().await;
        let report = match ran {
            Ok(report) => report,
            Err(e) => {
                self.remove_job_files(&record.id).await;
                if matches!(e, ServiceError::NotPlaced) {
                    return Ok(None);
                }
                if matches!(e, ServiceError::Draining) {
                    // Stopped by shutdown: never stored, the caller may
                    // retry elsewhere or later (503).
                    return Err(e);
                }
                if e.is_storage() {
                    return Err(self.noted(e));
                }
                if self.free_space().is_ok_and(|free| free < MIN_FREE) {
                    // The error number was lost on the way; the disk says
                    // what it was.
                    let full = std::io::Error::from_raw_os_error(libc::ENOSPC);
                    return Err(self.noted(full.into()));
                }
                tracing::error!(job = %record.id, error = %e, "job failed: the host could not finish it");
                JobReport::not_run(
                    &record.id,
                    &record.module,
                    format!("the host could not finish the job: {e}"),
                )
            }
        };
        let finished_at = now_ms();
        match (
            self.store
                .insert_finished_job(&record, &report, finished_at, key)
                .await,
            key,
        ) {
            (Ok(Inserted::Existing(job, hash)), Some(key)) => {
                // A retry with the same key ran beside this one and was
                // stored first: this run is dropped.
                self.remove_job_files(&record.id).await;
                return self.replay(*job, &hash, key, true).await.map(Some);
            }
            (Ok(_), _) => {}
            (Err(e), _) => {
                self.remove_job_files(&record.id).await;
                return Err(self.noted(e.into()));
            }
        }
        metrics::counter!("bulkhead_jobs_accepted_total", "module" => record.module.clone())
            .increment(1);
        let record = self.finished(record, report, finished_at).await;
        let (tx, rx) = oneshot::channel();
        let _ = tx.send(Some(record.clone()));
        Ok(Some((record, Some(rx))))
    }

    /// The way out of `record`'s job, for `caller`, when its policy names
    /// services and the host declares a relay; each refusal is audited
    /// ([`Service::refusal_sink`]).
    pub(super) fn egress(
        &self,
        module: &Module,
        record: &JobRecord,
        caller: Result<crate::relay::Caller, String>,
        audits: &AuditWrites,
    ) -> Option<Arc<dyn crate::job::egress::Egress>> {
        if module.policy().network.services.is_empty() {
            return None;
        }
        let sink = self.refusal_sink(record, audits);
        self.relay
            .as_ref()?
            .grant(module.policy(), &record.id, caller, Some(sink))
    }

    /// Writes one `egress.denied` audit entry per refused outbound request
    /// of `record`'s job as it is refused; the writes are collected in
    /// `pending` for the job to await.
    pub(super) fn refusal_sink(
        &self,
        record: &JobRecord,
        pending: &AuditWrites,
    ) -> crate::relay::RefusalSink {
        let pending = pending.clone();
        let store = Arc::clone(&self.store);
        let template = egress_denied(record, String::new());
        crate::relay::RefusalSink(Arc::new(move |r: &crate::relay::CallRecord| {
            let mut entry = template.clone();
            entry.at = now_ms();
            entry.detail = format!(
                "{} {}: {}",
                r.method,
                r.target,
                r.refused.as_deref().unwrap_or_default()
            );
            let store = Arc::clone(&store);
            let write = tokio::spawn(async move {
                if let Err(e) = store.append_audit(&entry).await {
                    tracing::error!(error = %e, "cannot write audit entry");
                }
            });
            pending
                .0
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(write);
        }))
    }

    /// The call metrics of a finished job, and one audit entry counting the
    /// refusals beyond the report's list (those listed were audited as they
    /// happened, see [`Service::refusal_sink`]).
    pub(super) async fn audit_calls(&self, record: &JobRecord, calls: &crate::relay::CallsReport) {
        metrics::counter!("bulkhead_service_calls_total", "module" => record.module.clone())
            .increment(u64::from(calls.made));
        for r in &calls.records {
            if r.refused.is_none() {
                continue;
            }
            let class = r.class.clone().unwrap_or_default();
            metrics::counter!("bulkhead_service_calls_refused_total", "module" => record.module.clone(), "class" => class)
                .increment(1);
        }
        if calls.records_dropped > 0 {
            self.audit(egress_denied(
                record,
                format!(
                    "{} more outbound requests not listed in the job report (see `calls.refused` = {})",
                    calls.records_dropped, calls.refused
                ),
            ))
            .await;
        }
    }

    /// The identity a job's outbound calls carry: its submitting token's,
    /// read again now, so a token revoked or expired since submission
    /// relays nothing.
    pub(super) async fn caller_of(
        &self,
        record: &JobRecord,
    ) -> Result<Result<crate::relay::Caller, String>, ServiceError> {
        let token = self.store.token_by_id(&record.token_id).await?;
        let now = now_ms() / 1000;
        Ok(match token.and_then(|t| t.identity_at(now)) {
            Some(who) if who.tenant == record.tenant => Ok(caller(&who)),
            _ => Err("the submitting token has been revoked or has expired".into()),
        })
    }

    /// Runs a claimed job from its stored inputs, its calls relayed as its
    /// submitting token's identity read now (see [`Service::caller_of`]).
    /// `None` if it was cancelled meanwhile.
    async fn run_stored(
        &self,
        module: &Module,
        record: &JobRecord,
        cancel: &CancelHandle<'_>,
        slot: &Slot,
    ) -> Result<Option<JobReport>, ServiceError> {
        // Only the sizes of its inputs until it can run: a job that waits
        // for room or a place holds none of them meanwhile.
        let sizes = if record.inputs.is_empty() && !record.has_stdin {
            vec![0]
        } else {
            match self
                .blobs
                .input_sizes(&record.id, &record.inputs, record.has_stdin)
                .await
            {
                Ok(sizes) => sizes,
                Err(e @ crate::blob::BlobError::MissingInput { .. }) => {
                    tracing::error!(job = %record.id, error = %e, "stored input unreadable");
                    return Ok(Some(JobReport::not_run(
                        &record.id,
                        &record.module,
                        "stored input unreadable",
                    )));
                }
                Err(e) => return Err(e.into()),
            }
        };
        self.execute(module, record, Spec::Stored(sizes), cancel, slot, None)
            .await
    }

    /// The one run path, for queued jobs a worker claimed and for inline
    /// jobs alike: runs `spec` of `record`'s job in the sandbox, its calls
    /// (when its policy names services) relayed as `caller` and each
    /// refusal audited before it returns, and copies its outputs into the
    /// job's directory. `None` if it was cancelled meanwhile.
    pub(super) async fn execute(
        &self,
        module: &Module,
        record: &JobRecord,
        spec: Spec<'_>,
        cancel: &CancelHandle<'_>,
        slot: &Slot,
        place_by: Option<tokio::time::Instant>,
    ) -> Result<Option<JobReport>, ServiceError> {
        // The identity its calls carry is read when it starts, inline or
        // queued alike: a token revoked while the job waited relays nothing.
        let caller = if module.policy().network.services.is_empty() {
            None
        } else {
            Some(self.caller_of(record).await?)
        };
        let audits = AuditWrites::default();
        let egress = caller.and_then(|caller| self.egress(module, record, caller, &audits));
        // While it waits for room in its zone's disk or a place in its
        // workers, its running place is lent to jobs that can run; the
        // inputs it holds meanwhile are counted (a stored job's are read
        // only once it can run).
        let held = match &spec {
            Spec::Held(spec) => spec
                .inputs
                .iter()
                .map(|i| i.data.len() as u64)
                .sum::<u64>()
                .saturating_add(spec.stdin.len() as u64),
            Spec::Stored(_) => 0,
        };
        let waiting = |waiting| slot.set_aside(waiting, held);
        let queued = Queued {
            tenant: &record.tenant,
            waiting: &waiting,
            place_by,
        };
        // A failure of the storage while reading a stored job's inputs.
        let unreadable: Mutex<Option<ServiceError>> = Mutex::new(None);
        let run = async {
            match spec {
                Spec::Held(spec) => self.runner.run_queued(module, spec, egress, queued).await,
                Spec::Stored(sizes) => {
                    let load = Box::pin(async {
                        match self.stored_spec(record).await {
                            Ok(Some(spec)) => Ok(spec),
                            Ok(None) => Err(crate::sandbox::JobError::Input(
                                "stored input unreadable".into(),
                            )),
                            Err(e) => {
                                let message = e.to_string();
                                *unreadable.lock().unwrap_or_else(|e| e.into_inner()) = Some(e);
                                Err(crate::sandbox::JobError::Input(message))
                            }
                        }
                    });
                    self.runner
                        .run_loaded(module, &sizes, load, egress, queued)
                        .await
                }
            }
        };
        let result = tokio::select! {
            // A cancel already waiting wins before the guest runs at all.
            biased;
            () = cancel.notify.notified() => None,
            r = run => Some(r),
        };
        audits.settle().await;
        if let Some(e) = unreadable.into_inner().unwrap_or_else(|e| e.into_inner()) {
            return Err(e);
        }
        if self
            .guests_stopped
            .load(std::sync::atomic::Ordering::SeqCst)
        {
            // Shutdown stopped the guests: a report now may be its worker's
            // death, not the job's end. Nothing is kept of this run.
            return Err(ServiceError::Draining);
        }
        let mut report = match result {
            None => return Ok(None),
            Some(Ok(finished)) => {
                let mut report = finished.report;
                self.keep_outputs(record, &mut report, &finished.outputs)
                    .await?;
                report
            }
            Some(Err(crate::sandbox::JobError::NotPlaced)) => return Err(ServiceError::NotPlaced),
            Some(Err(e)) => JobReport::not_run(&record.id, &record.module, e.to_string()),
        };
        if report.job_id.is_empty() {
            report.job_id.clone_from(&record.id);
        }
        Ok(Some(report))
    }

    /// Registers `id`'s cancel: [`Service::cancel`] notifies it from now
    /// until the handle is dropped, and a notification sent before the run
    /// waits for it (a permit).
    pub(super) fn cancel_handle<'a>(&'a self, id: &str) -> CancelHandle<'a> {
        let notify = Arc::new(Notify::new());
        self.cancels
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id.to_owned(), Arc::clone(&notify));
        CancelHandle {
            service: self,
            id: id.to_owned(),
            notify,
        }
    }

    /// Deletes finished jobs past retention, every minute.
    pub(super) async fn sweeper(self: Arc<Self>) {
        let mut tick = tokio::time::interval(Duration::from_secs(60));
        loop {
            tick.tick().await;
            if self.is_draining() {
                return;
            }
            self.sweep().await;
        }
    }

    /// Deletes the rows and files of jobs that finished longer than the
    /// retention period ago, job directories no row points to that are
    /// older than [`ORPHAN_AGE`], and audit entries older than the audit
    /// retention. Returns how many jobs expired.
    pub async fn sweep(&self) -> usize {
        let audit_before = now_ms() - self.config.audit.retention.get().as_millis() as i64;
        if let Err(e) = self.store.expire_audit(audit_before).await {
            tracing::error!(error = %e, "audit retention sweep failed");
        }
        let before = now_ms() - self.config.storage.retention.get().as_millis() as i64;
        let expired = match self.store.expire_jobs(before).await {
            Ok(ids) => {
                for id in &ids {
                    self.remove_job_files(id).await;
                }
                ids.len()
            }
            Err(e) => {
                tracing::error!(error = %e, "retention sweep failed");
                self.noted(e.into());
                0
            }
        };
        let orphans = self.remove_orphans(ORPHAN_AGE).await;
        if orphans > 0 {
            tracing::warn!(orphans, "removed job directories no job points to");
        }
        expired
    }

    /// Watches the storage and recovers jobs, every second: while the
    /// storage has failed, probes it (a store write and a file written and
    /// fsynced under the data directory) until it writes again; checks the
    /// data directory's free space; and after a failure on a job's path,
    /// when the storage recovers, and at least every [`RECOVER_EVERY`]
    /// ticks, re-reads the store's unfinished jobs (see
    /// [`Service::recover`]).
    pub(super) async fn keeper(self: Arc<Self>) {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut ticks = 0u32;
        loop {
            tick.tick().await;
            if self.is_draining() {
                return;
            }
            let was_ok = self.storage_ok();
            let ok = if was_ok {
                match self.free_space() {
                    Ok(free) if free < MIN_FREE => {
                        self.storage_failed(&format!("{free} bytes free under the data directory"));
                        false
                    }
                    _ => true,
                }
            } else {
                match self.probe().await {
                    Ok(()) => {
                        self.storage_ok.store(true, Ordering::SeqCst);
                        tracing::warn!("storage writable again: ready");
                        true
                    }
                    Err(e) => {
                        tracing::debug!(error = %e, "storage still failing");
                        false
                    }
                }
            };
            ticks += 1;
            let wanted = self.recover_wanted.swap(false, Ordering::SeqCst);
            if ok && (wanted || !was_ok || ticks >= RECOVER_EVERY) {
                ticks = 0;
                if let Err(e) = self.recover().await {
                    tracing::error!(error = %e, "cannot recover unfinished jobs");
                    self.recover_wanted.store(true, Ordering::SeqCst);
                    self.noted(e.into());
                }
            } else if wanted {
                self.recover_wanted.store(true, Ordering::SeqCst);
            }
        }
    }

    /// Bytes free for this process under the data directory.
    pub(super) fn free_space(&self) -> std::io::Result<u64> {
        let stat = rustix::fs::fstatvfs(self.data_root.fd())?;
        Ok(stat.f_bavail.saturating_mul(stat.f_frsize))
    }

    /// Whether the storage writes again: the store takes a write, a small
    /// file is written and fsynced under the data directory, and the free
    /// space there is at least [`MIN_FREE`].
    pub(super) async fn probe(&self) -> Result<(), ServiceError> {
        self.store.probe(now_ms()).await?;
        // In the held directory, a new file: never one a link at the name
        // points to.
        let path = crate::sandbox::beneath::fd_path(self.data_root.fd()).join(".probe");
        let _ = std::fs::remove_file(&path);
        let written = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .and_then(|mut f| {
                f.write_all(&[0; 4096])?;
                f.sync_all()
            });
        let _ = std::fs::remove_file(&path);
        written?;
        let free = self.free_space()?;
        if free < MIN_FREE {
            return Err(ServiceError::Io(std::io::Error::from_raw_os_error(
                libc::ENOSPC,
            )));
        }
        Ok(())
    }

    /// Puts every unfinished job of the store that no worker here holds
    /// back in the run queue: `queued` ones whose claim failed, `running`
    /// ones a failure left behind on this node (re-queued first, their
    /// attempt spent). Another node's running job is left to its lease
    /// (see [`Service::leaser`]). The scheduler ignores jobs it already has.
    ///
    /// # Errors
    /// Store failures.
    pub async fn recover(&self) -> Result<usize, StoreError> {
        let mut queued = 0;
        for job in self.store.pending_jobs().await? {
            if self.is_held(&job.id) {
                continue;
            }
            if let Some(claim) = &job.claim
                && (claim.node() != Some(self.node()) || !self.store.requeue(claim, true).await?)
            {
                continue;
            }
            self.enqueue(QueuedJob {
                id: job.id,
                tenant: job.tenant,
                module: job.module,
            });
            queued += 1;
        }
        Ok(queued)
    }
}

impl Service {
    /// Keeps this node's leases, every third of `[queue] lease`: renews, in
    /// one statement, the leases of the jobs its workers run, and stops
    /// the run of any job whose claim a renewal found lost (cancelled
    /// through another node, or re-queued after its lease ran out); then
    /// gives back to the queue the running jobs of any node whose lease ran
    /// out (see [`JobStore::expire_leases`]), taking them into this node's
    /// queue, and wakes the waiters of those finished `failed` instead.
    /// Renews while the service drains, until its last job ends.
    pub(super) async fn leaser(self: Arc<Self>) {
        let every = (self.config.queue.lease.get() / 3).max(Duration::from_millis(10));
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let claims: Vec<Claimed> = self
                .claims_lock()
                .values()
                .map(|(c, _)| c.clone())
                .collect();
            if self.is_draining() && claims.is_empty() {
                return;
            }
            self.renew(&claims).await;
            if !self.is_draining() && self.storage_ok() {
                self.expire().await;
            }
            if self.shared
                && let Ok((_, all)) = self.store.queued_counts("").await
            {
                metrics::gauge!("bulkhead_jobs_queued").set(all as f64);
            }
        }
    }

    /// Renews the leases of `claims`; stops the runs whose claim is lost.
    async fn renew(&self, claims: &[Claimed]) {
        if claims.is_empty() {
            return;
        }
        let lost = match self
            .store
            .renew_leases(&self.lease(), claims, now_ms())
            .await
        {
            Ok(lost) => lost,
            Err(e) => {
                tracing::error!(error = %e, jobs = claims.len(), "cannot renew the leases of running jobs");
                self.noted(e.into());
                return;
            }
        };
        for claim in lost {
            let mut held = self.claims_lock();
            let Some((now, state)) = held.get_mut(claim.id()) else {
                continue; // it ended meanwhile
            };
            if *now != claim || *state == ClaimState::Finishing {
                continue;
            }
            *state = ClaimState::Lost;
            drop(held);
            tracing::warn!(job = %claim.id(), attempt = claim.attempt(), "the job's claim is lost (cancelled, or its lease ran out): stopping its run");
            if let Some(cancel) = self
                .cancels
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .get(claim.id())
            {
                cancel.notify_one();
            }
        }
    }

    /// Re-queues (or fails) the running jobs whose lease ran out.
    async fn expire(&self) {
        let max_attempts = self.config.queue.max_attempts;
        let expired = match self.store.expire_leases(now_ms(), max_attempts).await {
            Ok(expired) => expired,
            Err(e) => {
                tracing::error!(error = %e, "cannot look for jobs whose lease ran out");
                self.noted(e.into());
                return;
            }
        };
        for job in expired.failed {
            tracing::error!(job = %job.id, attempts = job.attempts, "job failed: its lease ran out on its last attempt");
            self.remove_inputs(&job).await;
            self.wake(&job.id, Some(&job));
        }
        for job in expired.requeued {
            tracing::warn!(job = %job.id, "the job's lease ran out: it goes back to the queue");
            self.enqueue(QueuedJob {
                id: job.id,
                tenant: job.tenant,
                module: job.module,
            });
        }
        self.update_gauges();
    }
}

/// The identity a job's outbound calls carry, from an authenticated
/// caller's.
fn caller(who: &Identity) -> crate::relay::Caller {
    crate::relay::Caller {
        tenant: who.tenant.clone(),
        subject: who.subject.clone(),
        scopes: who.scopes.clone(),
    }
}

/// A job's registered cancel (see [`Service::cancel_handle`]); dropping it
/// unregisters it.
pub(super) struct CancelHandle<'a> {
    service: &'a Service,
    id: String,
    notify: Arc<Notify>,
}

impl Drop for CancelHandle<'_> {
    fn drop(&mut self) {
        self.service
            .cancels
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.id);
    }
}

/// Where a claimed job's run is, for the leaser.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum ClaimState {
    /// The guest may still be running: a renewal that finds the claim gone
    /// stops it.
    Running,
    /// Its result is being recorded: a renewal that finds the claim gone is
    /// seeing that finish (or a loss the finish itself will meet).
    Finishing,
    /// A renewal found the claim gone (cancelled, or re-queued after its
    /// lease ran out) and stopped the run.
    Lost,
}

/// A job's spec as [`Service::execute`] takes it.
pub(super) enum Spec<'a> {
    /// In memory already: an inline job's, from its request.
    Held(&'a JobSpec),
    /// A stored job's, read from the blob store once the job can run; the
    /// sizes of its inputs and stdin meanwhile.
    Stored(Vec<u64>),
}
