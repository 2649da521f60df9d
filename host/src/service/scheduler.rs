//! The in-memory run queue: bounded, fair across tenants, with per-tenant and
//! per-module concurrency caps.
//!
//! The queue is a cache of the store's `queued` jobs: everything in it is
//! already durable, so losing it in a crash loses nothing (startup reloads
//! it). Fairness is round-robin over tenants with queued work: a tenant that
//! floods the queue waits its turn like everyone else, and is refused (429)
//! once its own share is full, long before memory is at stake.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;

use tokio::sync::Notify;

/// A job waiting for a worker.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QueuedJob {
    /// Job id.
    pub id: String,
    /// Owning tenant.
    pub tenant: String,
    /// Module to run.
    pub module: String,
}

/// Capacity settings.
#[derive(Clone, Copy, Debug)]
pub struct QueueLimits {
    /// Queued jobs in total.
    pub max_queued: usize,
    /// Queued jobs per tenant.
    pub max_queued_per_tenant: usize,
    /// Running jobs per tenant.
    pub max_running_per_tenant: usize,
    /// Running jobs per module.
    pub max_running_per_module: usize,
}

/// Why a job was not admitted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rejection {
    /// The tenant's share of the queue is full.
    TenantFull,
    /// The whole queue is full.
    ServiceFull,
}

#[derive(Debug, Default)]
struct State {
    queues: HashMap<String, VecDeque<QueuedJob>>,
    ring: VecDeque<String>,
    running_tenant: HashMap<String, usize>,
    running_module: HashMap<String, usize>,
    queued: usize,
    running: usize,
    closed: bool,
}

/// The run queue.
#[derive(Debug)]
pub struct Scheduler {
    state: Mutex<State>,
    changed: Notify,
    limits: QueueLimits,
}

impl Scheduler {
    /// An empty queue with `limits`.
    pub fn new(limits: QueueLimits) -> Self {
        Self {
            state: Mutex::new(State::default()),
            changed: Notify::new(),
            limits,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether `tenant` could enqueue a job now.
    ///
    /// # Errors
    /// The reason it could not.
    pub fn check(&self, tenant: &str) -> Result<(), Rejection> {
        let s = self.lock();
        Self::admissible(&s, &self.limits, tenant)
    }

    fn admissible(s: &State, limits: &QueueLimits, tenant: &str) -> Result<(), Rejection> {
        if s.queued >= limits.max_queued {
            return Err(Rejection::ServiceFull);
        }
        if s.queues.get(tenant).map_or(0, VecDeque::len) >= limits.max_queued_per_tenant {
            return Err(Rejection::TenantFull);
        }
        Ok(())
    }

    /// Enqueues `job`. With `enforce`, refuses it when its tenant's share or
    /// the queue is full; without (reloading durable jobs at startup), always
    /// takes it.
    ///
    /// # Errors
    /// The reason it was refused.
    pub fn push(&self, job: QueuedJob, enforce: bool) -> Result<(), Rejection> {
        let mut s = self.lock();
        if enforce {
            Self::admissible(&s, &self.limits, &job.tenant)?;
        }
        let tenant = job.tenant.clone();
        let queue = s.queues.entry(tenant.clone()).or_default();
        queue.push_back(job);
        if queue.len() == 1 {
            s.ring.push_back(tenant);
        }
        s.queued += 1;
        drop(s);
        // One more runnable job needs one worker: waking all of them would
        // cost a thread switch each for nothing. A worker checks the queue
        // before it waits, and a stored permit covers a push that lands
        // while no worker is waiting.
        self.changed.notify_one();
        Ok(())
    }

    /// Takes a queued job out (it was cancelled); false if not queued.
    pub fn remove(&self, id: &str) -> bool {
        let mut s = self.lock();
        let mut found = None;
        for (tenant, q) in &mut s.queues {
            if let Some(pos) = q.iter().position(|j| j.id == id) {
                q.remove(pos);
                found = Some((tenant.clone(), q.is_empty()));
                break;
            }
        }
        let Some((tenant, emptied)) = found else {
            return false;
        };
        s.queued -= 1;
        if emptied {
            s.queues.remove(&tenant);
            s.ring.retain(|t| *t != tenant);
        }
        true
    }

    /// Waits for the next job a worker may start: round-robin over tenants,
    /// skipping a tenant at its running cap or whose next job's module is at
    /// its cap. `None` once the queue is closed.
    pub async fn next(&self) -> Option<QueuedJob> {
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            // Register before looking, so a push between the look and the
            // wait is not missed.
            changed.as_mut().enable();
            if let Some(found) = self.try_next() {
                return found;
            }
            changed.await;
        }
    }

    /// `Some(None)`: closed. `Some(Some(job))`: a job. `None`: nothing
    /// runnable now.
    fn try_next(&self) -> Option<Option<QueuedJob>> {
        let mut s = self.lock();
        if s.closed {
            return Some(None);
        }
        for _ in 0..s.ring.len() {
            let tenant = s.ring.pop_front()?;
            let tenant_running = s.running_tenant.get(&tenant).copied().unwrap_or(0);
            let module_ok = s
                .queues
                .get(&tenant)
                .and_then(VecDeque::front)
                .is_some_and(|j| {
                    s.running_module.get(&j.module).copied().unwrap_or(0)
                        < self.limits.max_running_per_module
                });
            if tenant_running >= self.limits.max_running_per_tenant || !module_ok {
                s.ring.push_back(tenant);
                continue;
            }
            let queue = s.queues.get_mut(&tenant)?;
            let job = queue.pop_front()?;
            if queue.is_empty() {
                s.queues.remove(&tenant);
            } else {
                s.ring.push_back(tenant.clone());
            }
            s.queued -= 1;
            s.running += 1;
            *s.running_tenant.entry(tenant).or_default() += 1;
            *s.running_module.entry(job.module.clone()).or_default() += 1;
            return Some(Some(job));
        }
        None
    }

    /// Starts `job` at once, outside the queue, if that jumps no one: nothing
    /// is queued, fewer than `slots` jobs run, and the tenant's and module's
    /// running caps allow it. Returns whether it started; if so, the caller
    /// runs it and then calls [`Scheduler::done`].
    pub fn try_start_now(&self, job: &QueuedJob, slots: usize) -> bool {
        let mut s = self.lock();
        let tenant_running = s.running_tenant.get(&job.tenant).copied().unwrap_or(0);
        let module_running = s.running_module.get(&job.module).copied().unwrap_or(0);
        if s.closed
            || s.queued > 0
            || s.running >= slots
            || tenant_running >= self.limits.max_running_per_tenant
            || module_running >= self.limits.max_running_per_module
        {
            return false;
        }
        s.running += 1;
        *s.running_tenant.entry(job.tenant.clone()).or_default() += 1;
        *s.running_module.entry(job.module.clone()).or_default() += 1;
        true
    }

    /// Marks a job taken by [`Scheduler::next`] as no longer running.
    pub fn done(&self, job: &QueuedJob) {
        let mut s = self.lock();
        s.running = s.running.saturating_sub(1);
        let State {
            running_tenant,
            running_module,
            ..
        } = &mut *s;
        for (map, key) in [(running_tenant, &job.tenant), (running_module, &job.module)] {
            if let Some(n) = map.get_mut(key) {
                *n -= 1;
                if *n == 0 {
                    map.remove(key);
                }
            }
        }
        drop(s);
        // A freed slot can make at most one held-back job runnable.
        self.changed.notify_one();
    }

    /// Stops handing out jobs; waiting workers get `None`.
    pub fn close(&self) {
        self.lock().closed = true;
        self.changed.notify_waiters();
    }

    /// Jobs queued and running.
    pub fn depth(&self) -> (usize, usize) {
        let s = self.lock();
        (s.queued, s.running)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(id: &str, tenant: &str, module: &str) -> QueuedJob {
        QueuedJob {
            id: id.into(),
            tenant: tenant.into(),
            module: module.into(),
        }
    }

    fn limits() -> QueueLimits {
        QueueLimits {
            max_queued: 100,
            max_queued_per_tenant: 3,
            max_running_per_tenant: 10,
            max_running_per_module: 10,
        }
    }

    #[tokio::test]
    async fn tenants_take_turns() {
        let s = Scheduler::new(limits());
        for i in 0..3 {
            s.push(job(&format!("a{i}"), "a", "m"), true).unwrap();
        }
        s.push(job("b0", "b", "m"), true).unwrap();
        let order: Vec<_> = [s.next().await, s.next().await, s.next().await]
            .into_iter()
            .map(|j| j.unwrap().id)
            .collect();
        assert_eq!(order, ["a0", "b0", "a1"]);
    }

    #[test]
    fn a_full_tenant_is_refused_while_others_are_not() {
        let s = Scheduler::new(limits());
        for i in 0..3 {
            s.push(job(&format!("a{i}"), "a", "m"), true).unwrap();
        }
        assert_eq!(
            s.push(job("a3", "a", "m"), true),
            Err(Rejection::TenantFull)
        );
        assert!(s.push(job("b0", "b", "m"), true).is_ok());
        assert!(
            s.push(job("a4", "a", "m"), false).is_ok(),
            "reloads are never refused"
        );
    }

    #[tokio::test]
    async fn running_caps_hold_jobs_back_until_done() {
        let mut l = limits();
        l.max_running_per_tenant = 1;
        let s = Scheduler::new(l);
        s.push(job("a0", "a", "m"), true).unwrap();
        s.push(job("a1", "a", "m"), true).unwrap();
        let first = s.next().await.unwrap();
        assert!(s.try_next().is_none(), "tenant at its cap");
        s.done(&first);
        assert_eq!(s.next().await.unwrap().id, "a1");
    }

    #[tokio::test]
    async fn removed_jobs_are_never_handed_out_and_close_ends_workers() {
        let s = Scheduler::new(limits());
        s.push(job("a0", "a", "m"), true).unwrap();
        assert!(s.remove("a0"));
        assert!(!s.remove("a0"));
        assert_eq!(s.depth(), (0, 0));
        s.close();
        assert!(s.next().await.is_none());
    }
}
