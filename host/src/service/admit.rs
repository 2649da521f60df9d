//! Admission: checking a submission (module, scope, inputs, parameters,
//! capacity, `Idempotency-Key`) and either storing it durably and queueing
//! it, or, for a waited-for job short enough, taking the inline path: its
//! turn in the scheduler's fair order, then the one run path
//! ([`run`](super::run)) in the request's task.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::Ordering;

use bytes::Bytes;
use tokio::sync::oneshot;

use super::*;
use crate::auth::Identity;
use crate::runner::Module;
use crate::sandbox::{JobError, JobInput, JobSpec};
use crate::store::{Idempotency, Inserted, JobRecord, JobState, now_ms};

/// An accepted job, and with a wait, a receiver that fires when it ends
/// (see [`Service::submit`]).
pub type Accepted = (JobRecord, Option<oneshot::Receiver<Option<JobRecord>>>);

/// What a caller submits.
#[derive(Debug, Default)]
pub struct Submission {
    /// Input files.
    pub inputs: Vec<JobInput>,
    /// Parameters.
    pub params: BTreeMap<String, String>,
    /// Standard input.
    pub stdin: Option<Bytes>,
    /// The client's `Idempotency-Key`: a retry with the same key (same
    /// tenant, within `queue.idempotency_retention`) returns the first job.
    pub idempotency_key: Option<String>,
}

/// Keys are 1 to this many bytes of visible ASCII.
pub const MAX_IDEMPOTENCY_KEY: usize = 255;

/// Checks an `Idempotency-Key`'s syntax: 1 to [`MAX_IDEMPOTENCY_KEY`] bytes,
/// each visible ASCII (`!` to `~`).
///
/// # Errors
/// [`ServiceError::BadInput`] saying what is wrong with it.
pub fn check_idempotency_key(key: &str) -> Result<(), ServiceError> {
    if key.is_empty() || key.len() > MAX_IDEMPOTENCY_KEY {
        return Err(ServiceError::BadInput(format!(
            "idempotency key of {} bytes: it must be 1 to {MAX_IDEMPOTENCY_KEY} bytes",
            key.len()
        )));
    }
    if let Some(c) = key.chars().find(|c| !c.is_ascii_graphic()) {
        return Err(ServiceError::BadInput(format!(
            "idempotency key holds {c:?}: only visible ASCII is accepted"
        )));
    }
    Ok(())
}

/// SHA-256 over everything a submission asks for: the module, parameters,
/// inputs and stdin, each length-prefixed so no two requests share an
/// encoding.
pub(super) fn request_sha256(module: &str, sub: &Submission) -> String {
    use sha2::{Digest, Sha256};
    let mut hash = Sha256::new();
    let mut field = |bytes: &[u8]| {
        hash.update((bytes.len() as u64).to_le_bytes());
        hash.update(bytes);
    };
    field(module.as_bytes());
    for (name, value) in &sub.params {
        field(b"param");
        field(name.as_bytes());
        field(value.as_bytes());
    }
    for input in &sub.inputs {
        field(b"input");
        field(input.name.as_bytes());
        field(&input.data);
    }
    if let Some(stdin) = &sub.stdin {
        field(b"stdin");
        field(stdin);
    }
    hex::encode(hash.finalize())
}

/// Input bytes inline jobs may hold in memory at once, waiting for their
/// turn or running; beyond it a waited-for job is stored and queued like any
/// other, its inputs on disk.
pub(super) const INLINE_INPUT_BUDGET: usize = 64 << 20;

/// One inline job's share of [`INLINE_INPUT_BUDGET`], given back on drop.
#[derive(Debug)]
pub(super) struct InlineInputs {
    total: Arc<std::sync::atomic::AtomicUsize>,
    bytes: usize,
}

impl InlineInputs {
    /// Reserves the bytes of `spec`'s inputs and stdin; `None` if they do
    /// not fit in what is left of the budget.
    fn hold(total: &Arc<std::sync::atomic::AtomicUsize>, spec: &JobSpec) -> Option<Self> {
        let bytes = spec.inputs.iter().map(|i| i.data.len()).sum::<usize>() + spec.stdin.len();
        total
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |held| {
                held.checked_add(bytes)
                    .filter(|&n| n <= INLINE_INPUT_BUDGET)
            })
            .ok()?;
        Some(Self {
            total: Arc::clone(total),
            bytes,
        })
    }
}

impl Drop for InlineInputs {
    fn drop(&mut self) {
        self.total.fetch_sub(self.bytes, Ordering::AcqRel);
    }
}

/// The `Idempotency-Key`s of this node's submissions not yet stored nor
/// refused, by tenant and key. An inline job is stored only once it has
/// run: a same-key request meanwhile would otherwise run it again (found by
/// an attacker: an identical retry ran a second copy, and a different
/// request took the key while the first one's run was recorded nowhere).
#[derive(Debug, Default)]
pub(super) struct InlineKeys(Arc<std::sync::Mutex<HashMap<(String, String), InFlight>>>);

/// A held key: its job's id and request hash, and what tells its waiters
/// it is let go.
#[derive(Debug, Clone)]
pub(super) struct InFlight {
    job: (String, String),
    done: tokio::sync::watch::Receiver<()>,
}

/// A key held by one submission, let go on drop.
pub(super) struct KeyHeld {
    keys: Arc<std::sync::Mutex<HashMap<(String, String), InFlight>>>,
    name: (String, String),
    _done: tokio::sync::watch::Sender<()>,
}

impl Drop for KeyHeld {
    fn drop(&mut self) {
        self.keys
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.name);
    }
}

impl InlineKeys {
    /// Holds `key` of `tenant` for job `job`, or says who holds it.
    fn hold(&self, tenant: &str, key: &Idempotency, job: &str) -> Result<KeyHeld, InFlight> {
        let name = (tenant.to_owned(), key.key.clone());
        let mut keys = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(held) = keys.get(&name) {
            return Err(held.clone());
        }
        let (tx, rx) = tokio::sync::watch::channel(());
        keys.insert(
            name.clone(),
            InFlight {
                job: (job.to_owned(), key.request_sha256.clone()),
                done: rx,
            },
        );
        Ok(KeyHeld {
            keys: Arc::clone(&self.0),
            name,
            _done: tx,
        })
    }
}

impl Service {
    /// Accepts a job: checks module, scope, inputs, parameters and capacity,
    /// stores the inputs and the job durably, then queues it. With `wait`,
    /// also returns a receiver that fires when the job finishes.
    ///
    /// # Errors
    /// [`ServiceError`] saying why the job was refused; nothing is stored.
    pub async fn submit(
        &self,
        who: &Identity,
        module_name: &str,
        mut sub: Submission,
        wait: Option<std::time::Duration>,
    ) -> Result<Accepted, ServiceError> {
        if self.is_draining() {
            return Err(ServiceError::Draining);
        }
        let Some(module) = self.modules.get(module_name) else {
            return Err(ServiceError::UnknownModule(module_name.to_owned()));
        };
        let policy = module.policy();
        let scopes = scope_strings(policy);
        if !who.has_any(&scopes) {
            self.audit_denial(denial(
                who,
                "scope.denied",
                Some(module),
                "submit without a required scope",
            ))
            .await;
            return Err(ServiceError::ScopeMissing {
                module: module_name.to_owned(),
                scopes,
            });
        }
        let key = match sub.idempotency_key.take() {
            Some(key) => {
                check_idempotency_key(&key)?;
                let retention = self.config.queue.idempotency_retention.get();
                Some(Idempotency {
                    request_sha256: request_sha256(module_name, &sub),
                    key,
                    since: now_ms().saturating_sub(retention.as_millis() as i64),
                })
            }
            None => None,
        };
        let spec = JobSpec {
            id: uuid::Uuid::new_v4().to_string(),
            inputs: sub.inputs,
            params: sub.params,
            stdin: sub.stdin.clone().unwrap_or_default(),
        };
        crate::sandbox::validate(policy, &spec).map_err(|e| match e {
            JobError::Param(m) => ServiceError::BadParams(m),
            e @ JobError::InputTooLarge { .. } => ServiceError::TooLarge(e.to_string()),
            other => ServiceError::BadInput(other.to_string()),
        })?;
        // Held until the job is stored or refused: a request with the same
        // key meanwhile waits for that, then is answered from the store.
        let mut _key_held = None;
        while let Some(key) = &key {
            if let Some((job, hash)) = self
                .store
                .job_by_key(&who.tenant, &key.key, key.since)
                .await
                .map_err(|e| self.noted(e.into()))?
            {
                return self.replay(job, &hash, key, wait.is_some()).await;
            }
            if self.shared {
                // No inline path: the store's insert settles a race.
                break;
            }
            match self.inline_keys.hold(&who.tenant, key, &spec.id) {
                Ok(held) => {
                    _key_held = Some(held);
                    break;
                }
                Err(InFlight { job, .. }) if job.1 != key.request_sha256 => {
                    return Err(ServiceError::Conflict(format!(
                        "idempotency key `{}` is being used for a different request (job `{}`, still running)",
                        key.key, job.0
                    )));
                }
                Err(InFlight { mut done, .. }) => {
                    // Its sender goes when the first request's job is
                    // stored or refused.
                    while done.changed().await.is_ok() {}
                }
            }
        }
        if let Err(why) = self.admissible(&who.tenant).await? {
            return Err(self.busy(who, module, why).await);
        }
        // On a shared store every job goes through the store's queue, under
        // the caps of all nodes: no inline path (it would run beside them).
        if !self.shared
            && let Some(wait) = wait
            && let Some(slack) = wait.checked_sub(policy.limits.wall_time.get())
            && !slack.is_zero()
            && let Some(held) = InlineInputs::hold(&self.inline_inputs, &spec)
        {
            let job = QueuedJob {
                id: spec.id.clone(),
                tenant: who.tenant.clone(),
                module: module_name.to_owned(),
            };
            // Once only its wall time is left of the wait, it no longer
            // waits inline: not for its turn, nor for room or a place in
            // its zone.
            let place_by = tokio::time::Instant::now() + slack;
            let mut ticket = match self.scheduler.wait_turn(job) {
                Ok(ticket) => ticket,
                Err(why) => return Err(self.busy(who, module, why).await),
            };
            let slot = match tokio::time::timeout_at(place_by, ticket.turn()).await {
                Ok(Some(slot)) => Some(slot),
                Ok(None) => return Err(ServiceError::Draining),
                Err(_) => ticket.leave(),
            };
            if let Some(slot) = slot {
                // The queue gauges are refreshed when metrics are read
                // (`render_metrics`), not on this path.
                let has_stdin = sub.stdin.is_some();
                let result = self
                    .run_now(who, module, &spec, has_stdin, slot, key.as_ref(), place_by)
                    .await;
                drop(held);
                if let Some(accepted) = result.transpose() {
                    return accepted;
                }
            }
            // Its turn, or its room and place, did not come in time to
            // finish within the wait: it is stored and queued like any job,
            // and the caller gets 202 unless it ends within what is left of
            // the wait.
        }

        self.store_inputs(&spec, sub.stdin.is_some())
            .await
            .map_err(|e| self.noted(e))?;
        let record = new_record(who, module, &spec, sub.stdin.is_some(), now_ms());
        let q = &self.config.queue;
        let bounds = crate::store::QueueBounds {
            total: q.max_queued as u64,
            per_tenant: q.max_queued_per_tenant as u64,
        };
        let inserted = self
            .store
            .insert_queued_within(&record, key.as_ref(), &bounds)
            .await;
        match (inserted, &key) {
            (Ok(Ok(Inserted::Existing(job, hash))), Some(key)) => {
                // A retry with the same key raced this one and won.
                self.remove_job_files(&record.id).await;
                return self.replay(*job, &hash, key, wait.is_some()).await;
            }
            (Ok(Err(full)), _) => {
                // Others filled the queue since the check above.
                self.remove_job_files(&record.id).await;
                let why = match full {
                    crate::store::QueueFull::Tenant => Rejection::TenantFull,
                    crate::store::QueueFull::Service => Rejection::ServiceFull,
                };
                return Err(self.busy(who, module, why).await);
            }
            (Ok(Ok(_)), _) => {}
            (Err(e), _) => {
                self.remove_job_files(&record.id).await;
                return Err(self.noted(e.into()));
            }
        }
        let receiver = wait.is_some().then(|| self.subscribe(&record.id));
        let queued = QueuedJob {
            id: record.id.clone(),
            tenant: record.tenant.clone(),
            module: record.module.clone(),
        };
        if self.shared {
            // Its bounds were checked by the store, in the insert's
            // transaction.
            self.work.notify_one();
        } else if let Err(why) = self.scheduler.push(queued, true) {
            // Lost a race for the last queue slot: take the job back.
            let _ = self
                .store
                .cancel_job(&record.tenant, &record.id, now_ms())
                .await;
            let _ = self.store.delete_job(&record.tenant, &record.id).await;
            self.remove_job_files(&record.id).await;
            return Err(self.busy(who, module, why).await);
        }
        metrics::counter!("bulkhead_jobs_accepted_total", "module" => module_name.to_owned())
            .increment(1);
        self.update_gauges();
        Ok((record, receiver))
    }

    /// The answer to a submission whose idempotency key already names
    /// `job`: that job (and, with `wait`, a receiver for its end), or a
    /// conflict if the key came with another request.
    pub(super) async fn replay(
        &self,
        job: JobRecord,
        hash: &str,
        key: &Idempotency,
        wait: bool,
    ) -> Result<Accepted, ServiceError> {
        if hash != key.request_sha256 {
            return Err(ServiceError::Conflict(format!(
                "idempotency key `{}` was already used for a different request (job `{}`)",
                key.key, job.id
            )));
        }
        if !wait || job.state.is_final() {
            return Ok((job, None));
        }
        let receiver = self.subscribe(&job.id);
        // It may have finished between the read and the subscription: then
        // no worker will wake the receiver, so wake it here.
        if let Some(now) = self.store.get_job(&job.tenant, &job.id).await?
            && now.state.is_final()
        {
            self.wake(&job.id, Some(&now));
        }
        Ok((job, Some(receiver)))
    }

    pub(super) async fn busy(
        &self,
        who: &Identity,
        module: &Module,
        why: Rejection,
    ) -> ServiceError {
        let tenant = why == Rejection::TenantFull;
        metrics::counter!("bulkhead_jobs_rejected_total", "reason" => if tenant { "tenant_full" } else { "service_full" })
            .increment(1);
        self.audit_denial(denial(
            who,
            "quota.denied",
            Some(module),
            if tenant {
                "tenant queue full"
            } else {
                "service queue full"
            },
        ))
        .await;
        ServiceError::Busy {
            tenant,
            retry_after: 1,
        }
    }

    /// Whether `tenant` may queue a job now: the scheduler's bounds, or on
    /// a shared store the same bounds counted in the store (all nodes).
    async fn admissible(&self, tenant: &str) -> Result<Result<(), Rejection>, ServiceError> {
        if !self.shared {
            return Ok(self.scheduler.check(tenant));
        }
        let (mine, all) = self
            .store
            .queued_counts(tenant)
            .await
            .map_err(|e| self.noted(e.into()))?;
        let q = &self.config.queue;
        Ok(if all >= q.max_queued as u64 {
            Err(Rejection::ServiceFull)
        } else if mine >= q.max_queued_per_tenant as u64 {
            Err(Rejection::TenantFull)
        } else {
            Ok(())
        })
    }

    /// A receiver that fires when the job ends: with the finished record
    /// when a worker finished it, `None` when it was cancelled.
    pub(super) fn subscribe(&self, id: &str) -> oneshot::Receiver<Option<JobRecord>> {
        let (tx, rx) = oneshot::channel();
        self.waiters
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(id.to_owned())
            .or_default()
            .push(tx);
        rx
    }

    pub(super) fn wake(&self, id: &str, finished: Option<&JobRecord>) {
        let senders = self
            .waiters
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(id);
        // A report goes to the first waiter only (the submission that made
        // the job); the others, repeats of a keyed submission, read it from
        // the store within the answers' budget: a copy each would all be
        // held before any of them could be refused (found by an attacker:
        // 900 keyed waiters of a light report held 48 MB over a 16 MiB
        // budget).
        let has_report = finished.is_some_and(|record| record.report.is_some());
        for (i, tx) in senders.into_iter().flatten().enumerate() {
            let _ = tx.send(if has_report && i > 0 {
                None
            } else {
                finished.cloned()
            });
        }
    }
}

/// The record of a job `who` submitted to `module`, created at `now`, as
/// admission makes it: queued, never started. The inline path runs it at
/// once, started, its first attempt.
pub(super) fn new_record(
    who: &Identity,
    module: &Module,
    spec: &JobSpec,
    has_stdin: bool,
    now: i64,
) -> JobRecord {
    let policy = module.policy();
    JobRecord {
        id: spec.id.clone(),
        tenant: who.tenant.clone(),
        subject: who.subject.clone(),
        token_id: who.token_id.clone(),
        module: policy.module.name.to_string(),
        module_sha256: module.sha256().to_string(),
        policy_sha256: policy.source_sha256.as_ref().map(ToString::to_string),
        params: spec.params.clone(),
        inputs: spec.inputs.iter().map(|i| i.name.clone()).collect(),
        has_stdin,
        state: JobState::Queued,
        created_at: now,
        started_at: None,
        finished_at: None,
        attempts: 0,
        report: None,
    }
}
