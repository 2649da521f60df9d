//! Turns of the jobs waiting for a share of their zone (room in its disk,
//! memory in one of its workers), and what each tenant's jobs hold of it:
//! the order [`super::disk`] and [`super::memory`] both keep.
//!
//! A job waiting holds back a later one only where the later one's tenant
//! holds at least as much as the waiting job's tenant, or is that tenant:
//! a tenant's large job is not passed for ever by smaller later ones, and
//! a tenant holding much does not hold back every other tenant with its
//! jobs waiting.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// The jobs waiting for a share, by their turn, and what each tenant's
/// jobs hold.
#[derive(Debug, Default)]
pub struct Turns {
    /// The jobs waiting, by their turn: what each needs, and its tenant.
    waiting: Mutex<BTreeMap<u64, (u64, Arc<str>)>>,
    /// What each tenant's jobs hold now.
    held: Mutex<HashMap<Arc<str>, u64>>,
    next: AtomicU64,
}

impl Turns {
    /// A turn for a job of `tenant` that needs `need`, after every job
    /// already waiting; the tenant as the turn keeps it.
    pub fn enter(&self, need: u64, tenant: &str) -> (u64, Arc<str>) {
        let turn = self.next.fetch_add(1, Ordering::Relaxed);
        let tenant: Arc<str> = Arc::from(tenant);
        lock(&self.waiting).insert(turn, (need, Arc::clone(&tenant)));
        (turn, tenant)
    }

    /// The job of `turn` waits no more (it was given its share, or gave
    /// up).
    pub fn leave(&self, turn: u64) {
        lock(&self.waiting).remove(&turn);
    }

    /// What the jobs waiting before `turn`, a job of `tenant`, that hold
    /// it back need, folded with `fold` from 0: those of its own tenant,
    /// and those of tenants holding no more than its tenant.
    pub fn ahead(&self, turn: u64, tenant: &Arc<str>, fold: fn(u64, u64) -> u64) -> u64 {
        let held = lock(&self.held);
        let held_by = |t: &Arc<str>| held.get(t).copied().unwrap_or(0);
        let mine = held_by(tenant);
        lock(&self.waiting)
            .range(..turn)
            .filter(|(_, (_, t))| t == tenant || held_by(t) <= mine)
            .map(|(_, (need, _))| *need)
            .fold(0, fold)
    }

    /// `tenant`'s jobs hold `bytes` more (`more`) or fewer.
    pub fn hold(&self, tenant: &Arc<str>, bytes: u64, more: bool) {
        let mut held = lock(&self.held);
        let now = held.entry(Arc::clone(tenant)).or_default();
        *now = if more {
            now.saturating_add(bytes)
        } else {
            now.saturating_sub(bytes)
        };
        if *now == 0 {
            held.remove(tenant);
        }
    }

    /// What `tenant`'s jobs hold now.
    pub fn held_by(&self, tenant: &str) -> u64 {
        lock(&self.held).get(tenant).copied().unwrap_or(0)
    }

    /// Whether no tenant's jobs hold anything.
    #[cfg(test)]
    pub fn nothing_held(&self) -> bool {
        lock(&self.held).is_empty()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_waiting_job_holds_back_its_own_tenant_and_tenants_holding_no_more() {
        let turns = Turns::default();
        let (first, a) = turns.enter(100, "a");
        let (_, b) = turns.enter(10, "b");
        let (late_a, _) = turns.enter(1, "a");
        let (late_b, _) = turns.enter(1, "b");
        // Nobody holds anything: every earlier job holds back every later.
        assert_eq!(turns.ahead(late_b, &b, u64::saturating_add), 111);
        assert_eq!(turns.ahead(late_b, &b, u64::max), 100);
        // `a` holds more than `b`: its waiting job holds `b`'s back no
        // more, and still holds back its own.
        turns.hold(&a, 50, true);
        assert_eq!(turns.ahead(late_b, &b, u64::saturating_add), 10);
        assert_eq!(turns.ahead(late_a, &a, u64::saturating_add), 110);
        turns.leave(first);
        assert_eq!(turns.ahead(late_a, &a, u64::saturating_add), 10);
        turns.hold(&a, 50, false);
        assert!(turns.nothing_held());
        assert_eq!(turns.held_by("a"), 0);
    }
}
