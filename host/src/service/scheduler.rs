//! The in-memory run queue: bounded, fair across tenants, with a fixed number
//! of running slots and per-tenant and per-module concurrency caps.
//!
//! It holds two kinds of waiting job, in one fair order:
//! - **durable** jobs, already committed to the store as `queued`, which a
//!   worker claims and runs. Losing them from memory in a crash loses
//!   nothing: startup reloads them.
//! - **inline** jobs: a caller waiting on its request for a short job that
//!   has not been acknowledged and so is not stored yet. When its turn comes
//!   its request's task is handed a [`Slot`] and runs the job itself; a
//!   crash meanwhile leaves the client without an answer, never with a lost
//!   accepted job.
//!
//! Fairness is round-robin over tenants with waiting work: a tenant that
//! floods the queue waits its turn like everyone else, and is refused (429)
//! once its own share is full, long before memory is at stake. A running job
//! holds a [`Slot`]; dropping it (however the job ends, including a request
//! whose client went away) frees the slot and hands it on.
//!
//! A job waiting for room in its zone's disk, or for a place in its
//! zone's workers, sets its slot aside
//! ([`Slot::set_aside`]): it keeps its tenant's and module's counts but
//! not a running slot, so jobs waiting for room do not hold the slots
//! while others, of other tenants and zones, could run. A stored job
//! holds none of its inputs while it waits (they are read once it has its
//! room and place) and counts none. As many jobs as there are slots may be
//! aside whatever their inputs; more, only while the inputs they hold (an
//! inline job's, in its request's memory) fit in [`ASIDE_BYTES`], and no
//! more than `max_queued` in all. One that gets its room runs without
//! taking a slot back: it stays aside until it ends, in its zone's place
//! (a worker's, given with its room). A job given its room taking its slot
//! back (past the number of slots, else its room would sit idle) kept
//! `running` at the number of slots as long as jobs aside were left, since
//! each room comes free before its job's slot: no other job, of any zone,
//! was picked meanwhile (found by an attacker: four tenants' jobs aside
//! kept another zone's jobs waiting 150 s, six tenants' 326 s). So the
//! guests that run at once are at most the slots plus the jobs aside that
//! have their rooms, which their zones' places bound.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use tokio::sync::{Notify, oneshot};

/// The inputs of the jobs set aside beyond as many as there are slots,
/// at most: those the slots' own could hold are not counted.
pub const ASIDE_BYTES: u64 = 64 << 20;

/// A job waiting for a slot.
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
    /// Jobs running at once, durable and inline together.
    pub slots: usize,
    /// Waiting jobs in total.
    pub max_queued: usize,
    /// Waiting jobs per tenant.
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

/// A waiting job; an inline one carries the way to its waiting request.
#[derive(Debug)]
struct Entry {
    job: QueuedJob,
    inline: Option<oneshot::Sender<Slot>>,
}

#[derive(Debug, Default)]
struct State {
    queues: HashMap<String, VecDeque<Entry>>,
    ring: VecDeque<String>,
    running_tenant: HashMap<String, usize>,
    running_module: HashMap<String, usize>,
    queued: usize,
    running: usize,
    /// Running jobs whose slots are set aside while they wait for room.
    aside: usize,
    /// The inputs of those set aside beyond as many as there are slots.
    aside_bytes: u64,
    closed: bool,
    /// Durable jobs waiting or running: a job pushed again (recovery
    /// re-reading the store) is not queued twice.
    durable: std::collections::HashSet<String>,
}

/// What the fair order offers next.
enum Pick {
    /// An inline job, now running.
    Inline(oneshot::Sender<Slot>, QueuedJob),
    /// A durable job, now running (only when asked to take one).
    Durable(QueuedJob),
    /// A durable job is next and runnable, left waiting for a worker.
    DurableNext,
    /// Nothing runnable.
    Nothing,
}

/// The run queue.
#[derive(Debug)]
pub struct Scheduler {
    state: Mutex<State>,
    changed: Notify,
    limits: QueueLimits,
}

/// A running job's hold on its slot and on its tenant's and module's running
/// counts; dropping it releases them and hands the slot on.
#[derive(Debug)]
pub struct Slot {
    scheduler: Arc<Scheduler>,
    job: QueuedJob,
    /// Its running slot is set aside ([`Slot::set_aside`]), and the
    /// inputs it counts in [`ASIDE_BYTES`] meanwhile.
    aside: Mutex<Option<u64>>,
}

impl Slot {
    fn new(scheduler: &Arc<Scheduler>, job: QueuedJob) -> Self {
        Self {
            scheduler: Arc::clone(scheduler),
            job,
            aside: Mutex::new(None),
        }
    }

    /// The job it runs.
    pub fn job(&self) -> &QueuedJob {
        &self.job
    }

    /// Sets the job's running slot aside while it waits for room (`true`),
    /// handing it on; `inputs`, the bytes of its inputs held meanwhile.
    /// Refused (false) where as many jobs as there are slots are aside
    /// already and its inputs do not fit in what is left of
    /// [`ASIDE_BYTES`], or `max_queued` jobs are aside: the job keeps its
    /// slot. Told `false` (its room given), nothing changes: a job aside
    /// stays aside, its inputs counted, until it ends (see the module's
    /// doc).
    pub fn set_aside(&self, aside: bool, inputs: u64) -> bool {
        if !aside {
            return true;
        }
        let mut mine = self.aside.lock().unwrap_or_else(|e| e.into_inner());
        if mine.is_some() {
            return true;
        }
        let mut s = self.scheduler.lock();
        let limits = &self.scheduler.limits;
        let counted = if s.aside < limits.slots {
            0
        } else if s.aside < limits.max_queued && s.aside_bytes.saturating_add(inputs) <= ASIDE_BYTES
        {
            inputs
        } else {
            return false;
        };
        s.aside += 1;
        s.aside_bytes += counted;
        s.running = s.running.saturating_sub(1);
        *mine = Some(counted);
        let (handoffs, _) = self.scheduler.dispatch(&mut s, false);
        self.scheduler.freed(&s);
        drop(s);
        Scheduler::hand_over(handoffs);
        true
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let aside = *self.aside.get_mut().unwrap_or_else(|e| e.into_inner());
        self.scheduler.release(&self.job, aside);
    }
}

/// A free slot taken before there is a job for it (a node on a shared
/// store claims its next job only once it has one); dropped unused, it is
/// free again.
#[derive(Debug)]
pub struct Vacancy {
    scheduler: Option<Arc<Scheduler>>,
}

impl Vacancy {
    /// The slot, now `job`'s (claimed from a shared store's queue): its
    /// tenant's and module's counts too, until the [`Slot`] is dropped.
    pub fn occupy(mut self, job: QueuedJob) -> Slot {
        let scheduler = self.scheduler.take().expect("a vacancy is occupied once");
        let mut s = scheduler.lock();
        *s.running_tenant.entry(job.tenant.clone()).or_default() += 1;
        *s.running_module.entry(job.module.clone()).or_default() += 1;
        s.durable.insert(job.id.clone());
        drop(s);
        Slot::new(&scheduler, job)
    }
}

impl Drop for Vacancy {
    fn drop(&mut self) {
        if let Some(scheduler) = self.scheduler.take() {
            let mut s = scheduler.lock();
            s.running = s.running.saturating_sub(1);
            let (handoffs, _) = scheduler.dispatch(&mut s, false);
            scheduler.freed(&s);
            drop(s);
            Scheduler::hand_over(handoffs);
        }
    }
}

/// How [`Scheduler::start_or_wait`] admitted an inline job.
#[derive(Debug)]
pub enum Admission {
    /// It runs now.
    Now(Slot),
    /// It waits its turn; the receiver yields its slot, or fails if the
    /// queue closed or the job was removed.
    Waiting(oneshot::Receiver<Slot>),
}

/// An inline job's place in the queue, held by its waiting request. Dropping
/// it (the request ended) takes the job out of the queue, or, if its turn
/// came meanwhile, frees the slot it was given.
#[derive(Debug)]
pub struct Ticket {
    scheduler: Arc<Scheduler>,
    id: String,
    turn: oneshot::Receiver<Slot>,
    /// Out of the queue: its slot was received, or the queue closed.
    settled: bool,
}

impl Ticket {
    /// Waits for the job's turn: its slot, or `None` if the queue closed.
    pub async fn turn(&mut self) -> Option<Slot> {
        let slot = (&mut self.turn).await.ok();
        self.settled = true;
        slot
    }

    /// Leaves the queue (the caller stops waiting). If the job's turn came
    /// just now, returns its slot.
    pub fn leave(mut self) -> Option<Slot> {
        self.settled = true;
        if self.scheduler.remove(&self.id) {
            return None;
        }
        self.turn.try_recv().ok()
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        // A settled ticket is no longer queued: skip the queue scan.
        if !self.settled {
            self.scheduler.remove(&self.id);
        }
    }
}

impl Scheduler {
    /// An empty queue with `limits`.
    pub fn new(limits: QueueLimits) -> Arc<Self> {
        Arc::new(Self {
            state: Mutex::new(State::default()),
            changed: Notify::new(),
            limits,
        })
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

    fn enqueue(s: &mut State, entry: Entry) {
        let tenant = entry.job.tenant.clone();
        let queue = s.queues.entry(tenant.clone()).or_default();
        queue.push_back(entry);
        if queue.len() == 1 {
            s.ring.push_back(tenant);
        }
        s.queued += 1;
    }

    /// Enqueues a durable `job` for a worker. With `enforce`, refuses it
    /// when its tenant's share or the queue is full; without (reloading
    /// durable jobs at startup or in recovery), always takes it. A job
    /// already waiting or running is left as it is.
    ///
    /// # Errors
    /// The reason it was refused.
    pub fn push(self: &Arc<Self>, job: QueuedJob, enforce: bool) -> Result<(), Rejection> {
        let mut s = self.lock();
        if s.durable.contains(&job.id) {
            return Ok(());
        }
        if enforce {
            Self::admissible(&s, &self.limits, &job.tenant)?;
        }
        s.durable.insert(job.id.clone());
        Self::enqueue(&mut s, Entry { job, inline: None });
        let (handoffs, _) = self.dispatch(&mut s, false);
        drop(s);
        Self::hand_over(handoffs);
        Ok(())
    }

    /// Queues an inline `job` in the fair order; its [`Ticket`] yields a
    /// slot when its turn comes (at once when nothing is ahead of it and a
    /// slot is free).
    ///
    /// # Errors
    /// The reason it was refused.
    pub fn wait_turn(self: &Arc<Self>, job: QueuedJob) -> Result<Ticket, Rejection> {
        let (tx, rx) = oneshot::channel();
        let id = job.id.clone();
        let mut s = self.lock();
        Self::admissible(&s, &self.limits, &job.tenant)?;
        let mut handoffs = Vec::new();
        if !s.closed {
            // Once closed, `tx` is dropped here and the ticket's turn never
            // comes.
            Self::enqueue(
                &mut s,
                Entry {
                    job,
                    inline: Some(tx),
                },
            );
            handoffs = self.dispatch(&mut s, false).0;
        }
        drop(s);
        Self::hand_over(handoffs);
        Ok(Ticket {
            scheduler: Arc::clone(self),
            id,
            turn: rx,
            settled: false,
        })
    }

    /// Waits for a free slot (a node on a shared store, before it claims
    /// a job for it). `None` once the queue is closed.
    pub async fn vacancy(self: &Arc<Self>) -> Option<Vacancy> {
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            {
                let mut s = self.lock();
                if s.closed {
                    return None;
                }
                if s.running < self.limits.slots {
                    s.running += 1;
                    return Some(Vacancy {
                        scheduler: Some(Arc::clone(self)),
                    });
                }
            }
            changed.await;
        }
    }

    /// Takes a waiting job out (cancelled, or its caller stopped waiting);
    /// false if it is not waiting.
    pub fn remove(&self, id: &str) -> bool {
        let mut s = self.lock();
        let mut found = None;
        for (tenant, q) in &mut s.queues {
            if let Some(pos) = q.iter().position(|e| e.job.id == id) {
                q.remove(pos);
                found = Some((tenant.clone(), q.is_empty()));
                break;
            }
        }
        let Some((tenant, emptied)) = found else {
            return false;
        };
        s.durable.remove(id);
        s.queued -= 1;
        if emptied {
            s.queues.remove(&tenant);
            s.ring.retain(|t| *t != tenant);
        }
        true
    }

    /// Waits for the next durable job a worker may start. `None` once the
    /// queue is closed.
    pub async fn next(self: &Arc<Self>) -> Option<Slot> {
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

    /// `Some(None)`: closed. `Some(Some(slot))`: a durable job. `None`:
    /// nothing for a worker now. Inline jobs met on the way are handed to
    /// their requests.
    fn try_next(self: &Arc<Self>) -> Option<Option<Slot>> {
        let mut s = self.lock();
        if s.closed {
            return Some(None);
        }
        let (handoffs, mine) = self.dispatch(&mut s, true);
        drop(s);
        Self::hand_over(handoffs);
        mine.map(Some)
    }

    /// Starts jobs in fair order while slots are free: inline ones for
    /// their requests (returned, to be handed over once the lock is gone),
    /// and, with `take_durable`, one durable job for the calling worker. At
    /// a durable job it cannot take it wakes a worker and stops, so that job
    /// keeps its turn.
    fn dispatch(
        self: &Arc<Self>,
        s: &mut State,
        mut take_durable: bool,
    ) -> (Vec<(oneshot::Sender<Slot>, Slot)>, Option<Slot>) {
        let mut handoffs = Vec::new();
        let mut mine = None;
        loop {
            let slot = |job| Slot::new(self, job);
            match self.pick(s, take_durable) {
                Pick::Inline(tx, job) => handoffs.push((tx, slot(job))),
                Pick::Durable(job) => {
                    mine = Some(slot(job));
                    take_durable = false;
                }
                Pick::DurableNext => {
                    self.changed.notify_one();
                    break;
                }
                Pick::Nothing => break,
            }
        }
        (handoffs, mine)
    }

    /// Hands inline jobs their slots. A request that stopped waiting in
    /// the meantime drops its slot, which frees it again.
    fn hand_over(handoffs: Vec<(oneshot::Sender<Slot>, Slot)>) {
        for (tx, slot) in handoffs {
            let _ = tx.send(slot);
        }
    }

    /// The next job in fair order that may start now: round-robin over
    /// tenants, skipping a tenant at its running cap or whose next job's
    /// module is at its cap; nothing while every slot is taken.
    fn pick(&self, s: &mut State, take_durable: bool) -> Pick {
        if s.closed || s.running >= self.limits.slots {
            return Pick::Nothing;
        }
        for _ in 0..s.ring.len() {
            let Some(tenant) = s.ring.pop_front() else {
                break;
            };
            let Some(front) = s.queues.get(&tenant).and_then(VecDeque::front) else {
                continue;
            };
            let tenant_running = s.running_tenant.get(&tenant).copied().unwrap_or(0);
            let module_running = s.running_module.get(&front.job.module).copied();
            if tenant_running >= self.limits.max_running_per_tenant
                || module_running.unwrap_or(0) >= self.limits.max_running_per_module
            {
                s.ring.push_back(tenant);
                continue;
            }
            if front.inline.is_none() && !take_durable {
                s.ring.push_front(tenant);
                return Pick::DurableNext;
            }
            let Some(queue) = s.queues.get_mut(&tenant) else {
                continue;
            };
            let Some(entry) = queue.pop_front() else {
                continue;
            };
            if queue.is_empty() {
                s.queues.remove(&tenant);
            } else {
                s.ring.push_back(tenant.clone());
            }
            s.queued -= 1;
            s.running += 1;
            *s.running_tenant.entry(tenant).or_default() += 1;
            *s.running_module
                .entry(entry.job.module.clone())
                .or_default() += 1;
            return match entry.inline {
                Some(tx) => Pick::Inline(tx, entry.job),
                None => Pick::Durable(entry.job),
            };
        }
        Pick::Nothing
    }

    /// A slot's job ended: frees its slot and counts, and starts whatever
    /// may run now.
    fn release(self: &Arc<Self>, job: &QueuedJob, aside: Option<u64>) {
        let mut s = self.lock();
        if let Some(counted) = aside {
            s.aside = s.aside.saturating_sub(1);
            s.aside_bytes = s.aside_bytes.saturating_sub(counted);
        } else {
            s.running = s.running.saturating_sub(1);
        }
        s.durable.remove(&job.id);
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
        let (handoffs, _) = self.dispatch(&mut s, false);
        self.freed(&s);
        drop(s);
        Self::hand_over(handoffs);
    }

    /// A slot came free: a node's worker waiting for one
    /// ([`Scheduler::vacancy`]) looks.
    fn freed(&self, s: &State) {
        if s.running < self.limits.slots {
            self.changed.notify_one();
        }
    }

    /// Stops handing out jobs: waiting workers get `None`, and waiting
    /// inline jobs are dropped, so their requests learn it at once.
    pub fn close(&self) {
        let mut s = self.lock();
        s.closed = true;
        let mut dropped = 0;
        for q in s.queues.values_mut() {
            let before = q.len();
            q.retain(|e| e.inline.is_none());
            dropped += before - q.len();
        }
        s.queues.retain(|_, q| !q.is_empty());
        let State { queues, ring, .. } = &mut *s;
        ring.retain(|t| queues.contains_key(t));
        s.queued -= dropped;
        drop(s);
        self.changed.notify_waiters();
    }

    /// Jobs waiting and running.
    pub fn depth(&self) -> (usize, usize) {
        let s = self.lock();
        (s.queued, s.running + s.aside)
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
            slots: 10,
            max_queued: 100,
            max_queued_per_tenant: 3,
            max_running_per_tenant: 10,
            max_running_per_module: 10,
        }
    }

    fn with_slots(slots: usize) -> Arc<Scheduler> {
        Scheduler::new(QueueLimits { slots, ..limits() })
    }

    /// The slot a ticket has been handed, if any, without waiting.
    fn handed(ticket: &mut Ticket) -> Option<Slot> {
        ticket.turn.try_recv().ok()
    }

    #[tokio::test]
    async fn tenants_take_turns() {
        let s = Scheduler::new(limits());
        for i in 0..3 {
            s.push(job(&format!("a{i}"), "a", "m"), true).unwrap();
        }
        s.push(job("b0", "b", "m"), true).unwrap();
        let mut running = Vec::new();
        for _ in 0..3 {
            running.push(s.next().await.unwrap());
        }
        let order: Vec<_> = running.iter().map(|slot| slot.job().id.as_str()).collect();
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
        assert_eq!(
            s.wait_turn(job("a3", "a", "m")).err(),
            Some(Rejection::TenantFull),
            "inline jobs count against the same share"
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
        drop(first);
        assert_eq!(s.next().await.unwrap().job().id, "a1");
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

    #[tokio::test]
    async fn a_durable_job_pushed_again_is_queued_once_until_its_slot_is_released() {
        let s = with_slots(1);
        s.push(job("a0", "a", "m"), true).unwrap();
        s.push(job("a0", "a", "m"), false).unwrap();
        assert_eq!(s.depth(), (1, 0));
        let slot = s.next().await.unwrap();
        s.push(job("a0", "a", "m"), false).unwrap();
        assert_eq!(s.depth(), (0, 1), "running: not queued again");
        drop(slot);
        s.push(job("a0", "a", "m"), false).unwrap();
        assert_eq!(s.depth(), (1, 0), "released: a new attempt may queue");
        assert!(s.remove("a0"));
        s.push(job("a0", "a", "m"), false).unwrap();
        assert_eq!(s.depth(), (1, 0));
    }

    #[tokio::test]
    async fn an_inline_job_starts_at_once_when_a_slot_is_free() {
        let s = with_slots(1);
        let mut ticket = s.wait_turn(job("a0", "a", "m")).unwrap();
        let slot = ticket.turn().await.expect("its turn");
        assert_eq!(slot.job().id, "a0");
        assert_eq!(s.depth(), (0, 1));
        drop(slot);
        assert_eq!(s.depth(), (0, 0));
    }

    #[tokio::test]
    async fn inline_and_durable_jobs_share_the_slots_and_the_fair_order() {
        let s = with_slots(1);
        s.push(job("a0", "a", "m"), true).unwrap();
        s.push(job("a1", "a", "m"), true).unwrap();
        let mut b0 = s.wait_turn(job("b0", "b", "m")).unwrap();
        let a0 = s.next().await.unwrap();
        assert_eq!(a0.job().id, "a0");
        assert!(handed(&mut b0).is_none(), "the only slot is taken");
        assert!(s.try_next().is_none(), "no second slot for a worker");
        drop(a0);
        let b0_slot = handed(&mut b0).expect("b's turn comes before a's second job");
        assert!(s.try_next().is_none(), "b0 holds the slot");
        drop(b0_slot);
        assert_eq!(s.next().await.unwrap().job().id, "a1");
    }

    #[tokio::test]
    async fn a_request_that_stops_waiting_gives_up_its_place_or_its_slot() {
        let s = with_slots(1);
        let running = s.wait_turn(job("a0", "a", "m")).unwrap();
        let waiting = s.wait_turn(job("b0", "b", "m")).unwrap();
        let mut next = s.wait_turn(job("c0", "c", "m")).unwrap();
        assert_eq!(s.depth(), (2, 1));
        drop(waiting);
        assert_eq!(s.depth(), (1, 1), "b0 left the queue");
        // a0 was handed its slot but its request is gone: the slot passes on.
        drop(running);
        assert_eq!(handed(&mut next).expect("c0's turn").job().id, "c0");
        assert_eq!(s.depth(), (0, 0));
    }

    #[tokio::test]
    async fn leaving_after_the_turn_came_keeps_the_slot() {
        let s = with_slots(1);
        let first = s.next_inline_for_test("a0");
        let ticket = s.wait_turn(job("b0", "b", "m")).unwrap();
        drop(first);
        let slot = ticket.leave().expect("handed over before it left");
        assert_eq!(slot.job().id, "b0");
        assert_eq!(s.depth(), (0, 1));
        let ticket = s.wait_turn(job("c0", "c", "m")).unwrap();
        assert!(ticket.leave().is_none());
        assert_eq!(s.depth(), (0, 1), "c0 left without a slot");
    }

    #[tokio::test]
    async fn closing_turns_inline_waiters_away() {
        let s = with_slots(1);
        let _running = s.wait_turn(job("a0", "a", "m")).unwrap();
        let mut waiting = s.wait_turn(job("b0", "b", "m")).unwrap();
        s.push(job("c0", "c", "m"), true).unwrap();
        s.close();
        assert!(waiting.turn().await.is_none());
        assert_eq!(s.depth().0, 1, "the durable job stays for the next start");
        let mut late = s.wait_turn(job("d0", "d", "m")).unwrap();
        assert!(late.turn().await.is_none());
    }

    impl Scheduler {
        /// Takes the only slot for an inline job.
        fn next_inline_for_test(self: &Arc<Self>, id: &str) -> Slot {
            let mut t = self.wait_turn(job(id, "z", "m")).unwrap();
            handed(&mut t).expect("a free slot")
        }
    }

    /// A job waiting for room lends its slot: the next job runs, its
    /// tenant's count stays. As many as there are slots are aside whatever
    /// their inputs; more only within [`ASIDE_BYTES`] of inputs. Given
    /// its room, a job aside stays aside and takes no slot back, and an
    /// aside slot dropped frees nothing twice.
    #[tokio::test]
    async fn a_slot_set_aside_is_lent_to_the_next_job() {
        let s = Scheduler::new(QueueLimits {
            slots: 1,
            max_running_per_tenant: 3,
            ..limits()
        });
        for id in ["a1", "a2", "a3"] {
            s.push(job(id, "a", "m"), true).unwrap();
        }
        let first = s.next().await.unwrap();
        assert!(s.try_next().is_none(), "one slot");
        assert!(first.set_aside(true, ASIDE_BYTES * 4), "the slot's own");
        assert!(first.set_aside(true, 0), "already aside");
        let second = s.try_next().unwrap().unwrap();
        assert_eq!(second.job().id, "a2");
        assert_eq!(s.depth(), (1, 2));
        // Beyond one per slot, only within the bytes aside.
        assert!(!second.set_aside(true, ASIDE_BYTES + 1));
        assert!(second.set_aside(true, ASIDE_BYTES / 2));
        let third = s.try_next().unwrap().unwrap();
        assert_eq!(third.job().id, "a3");
        assert!(!third.set_aside(true, ASIDE_BYTES / 2 + 1));
        // Given its room, a job aside stays aside: its inputs still count,
        // and it takes no slot back.
        assert!(second.set_aside(false, 0));
        assert!(!third.set_aside(true, ASIDE_BYTES / 2 + 1), "still held");
        drop(second);
        assert!(third.set_aside(true, ASIDE_BYTES / 2 + 1), "given back");
        assert_eq!(s.depth(), (0, 2));
        drop(third);
        assert!(first.set_aside(false, 0));
        assert_eq!(s.depth(), (0, 1));
        s.push(job("a4", "a", "m"), true).unwrap();
        let fourth = s.try_next().unwrap().unwrap();
        assert_eq!(fourth.job().id, "a4", "the first's slot is free");
        drop(fourth);
        drop(first);
        assert_eq!(s.depth(), (0, 0));
        s.push(job("b1", "b", "m"), true).unwrap();
        let b = s.try_next().unwrap().unwrap();
        assert_eq!(b.job().id, "b1");
        assert!(s.try_next().is_none(), "still one slot");
        // A tenant's job aside still counts against its running cap.
        let s = Scheduler::new(QueueLimits {
            slots: 2,
            max_running_per_tenant: 1,
            ..limits()
        });
        s.push(job("c1", "c", "m"), true).unwrap();
        s.push(job("c2", "c", "m"), true).unwrap();
        let c1 = s.next().await.unwrap();
        assert!(c1.set_aside(true, 0));
        assert!(s.try_next().is_none(), "c is at its cap");
    }

    /// A node on a shared store takes a slot before it claims a job, and
    /// waits for one while every slot is taken; one given back unused is
    /// free again.
    #[tokio::test]
    async fn a_vacancy_is_a_slot_taken_before_its_job() {
        let s = with_slots(1);
        let vacancy = s.vacancy().await.unwrap();
        let waiting = tokio::spawn({
            let s = Arc::clone(&s);
            async move { s.vacancy().await.map(|v| v.occupy(job("x", "b", "m"))) }
        });
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished());
        drop(vacancy);
        let slot = waiting.await.unwrap().unwrap();
        assert_eq!(s.depth(), (0, 1));
        drop(slot);
        assert_eq!(s.depth(), (0, 0));
        let _again = s.vacancy().await.unwrap();
        s.close();
        assert!(s.vacancy().await.is_none());
    }
}
