//! Connection budgets: how many connections a listener holds open, in total
//! and per client address, and the small reserve kept for health probes.
//!
//! A budget is checked at accept time, before any byte of the connection is
//! read: a connection beyond it is answered and closed at once (see
//! `serve::refuse`), so it holds neither a descriptor nor a buffer, and the
//! kernel's accept backlog keeps draining.
//!
//! **Shedding**: per-address caps cannot stop a flood spread over many
//! addresses, each under its cap, that fills the total with connections
//! doing nothing. So when the total is full, a new connection takes the
//! place of one that has no request in flight (no complete request head
//! yet, or idle between requests): the one that has waited longest, from
//! the address holding the most connections. **A connection with a request
//! in flight is never shed**: a connection's [`Slot`] moves between idle and
//! busy by compare-and-swap, so a request that completes its head as its
//! connection is chosen finds it shed and is answered 503 without reaching
//! a handler. For fairness, only a newcomer from an address holding fewer
//! connections than the victim's may shed: a client re-opening connections
//! as fast as it can from the top address cannot push others out, and a
//! spread flood's newcomers only displace each other's oldest idle sockets,
//! while a normal client's connection, once its request is in, stays.

use std::cmp::Reverse;
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

use tokio::sync::Notify;

/// The key a client address is counted under: an IPv4 address (IPv4-mapped
/// IPv6 included) as is, an IPv6 address by its /64, the smallest block a
/// single site is usually given.
pub fn client_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(v4) => IpAddr::V4(v4),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let s = v6.segments();
                IpAddr::V6(std::net::Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
            }
        },
    }
}

/// What a listener may hold open.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Connections in total.
    pub total: usize,
    /// Connections per client key.
    pub per_client: usize,
    /// Extra connections, beyond `total`, that may only ask for health.
    pub reserve: usize,
}

/// A [`Slot`] state: a request is in flight.
const BUSY: u64 = 0;
/// A [`Slot`] state: shed; the connection is being closed.
const SHED: u64 = 1;
/// A [`Slot`] state at or above this is idle: milliseconds since the
/// budget's epoch when the connection became idle, plus `IDLE_BASE`.
const IDLE_BASE: u64 = 2;

/// One connection's state as the budget sees it, shared with the code
/// serving it: whether a request is in flight, since when it has been
/// waiting otherwise, and the signal that it was shed.
#[derive(Debug)]
pub struct Slot {
    state: AtomicU64,
    /// Requests that reached the service on this connection.
    requests: AtomicU64,
    epoch: Instant,
    shed: Notify,
}

impl Slot {
    fn new(epoch: Instant) -> Arc<Self> {
        let slot = Arc::new(Self {
            state: AtomicU64::new(BUSY),
            requests: AtomicU64::new(0),
            epoch,
            shed: Notify::new(),
        });
        slot.set_idle();
        slot
    }

    fn now(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX - IDLE_BASE) + IDLE_BASE
    }

    /// A complete request head reached the service. False if the
    /// connection was shed first: the request must not be served.
    pub fn set_busy(&self) -> bool {
        let mut current = self.state.load(Ordering::SeqCst);
        loop {
            if current == SHED {
                return false;
            }
            match self
                .state
                .compare_exchange(current, BUSY, Ordering::SeqCst, Ordering::SeqCst)
            {
                Ok(_) => {
                    self.requests.fetch_add(1, Ordering::SeqCst);
                    return true;
                }
                Err(now) => current = now,
            }
        }
    }

    /// The request's response is done (written or abandoned): the
    /// connection waits for the next one from now on.
    pub fn set_idle(&self) {
        let now = self.now();
        let _ = self
            .state
            .compare_exchange(BUSY, now, Ordering::SeqCst, Ordering::SeqCst);
    }

    /// Whether a request is in flight.
    pub fn is_busy(&self) -> bool {
        self.state.load(Ordering::SeqCst) == BUSY
    }

    /// Requests that reached the service on this connection.
    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::SeqCst)
    }

    /// Resolves once the connection has been shed.
    pub async fn shed(&self) {
        self.shed.notified().await;
    }

    /// Marks the connection shed if it is idle; whether it was.
    fn try_shed(&self) -> bool {
        let current = self.state.load(Ordering::SeqCst);
        current >= IDLE_BASE
            && self
                .state
                .compare_exchange(current, SHED, Ordering::SeqCst, Ordering::SeqCst)
                .is_ok()
    }
}

#[derive(Debug)]
struct Counts {
    open: usize,
    reserve_open: usize,
    per_client: HashMap<IpAddr, usize>,
    /// Most connections open at once since memory was last given back.
    peak: usize,
    /// The connections counted in `open`, by id: the candidates for
    /// shedding. A connection shed leaves this map (and the counts) at
    /// once, so its permit's drop counts nothing.
    conns: HashMap<u64, (IpAddr, Arc<Slot>)>,
    next_id: u64,
}

/// One listener's budget, shared by its connections' [`Permit`]s.
#[derive(Debug)]
pub struct Budget {
    limits: Limits,
    epoch: Instant,
    counts: Mutex<Counts>,
}

/// How a connection was admitted.
#[derive(Debug)]
pub enum Admission {
    /// Within the budget: served in full.
    Full(Permit),
    /// Over the total, within the reserve: health probes only.
    HealthOnly(Permit),
    /// Refused: answer 503 and close.
    Refused,
}

impl Budget {
    /// A budget with `limits`.
    pub fn new(limits: Limits) -> Arc<Self> {
        Arc::new(Self {
            limits,
            epoch: Instant::now(),
            counts: Mutex::new(Counts {
                open: 0,
                reserve_open: 0,
                per_client: HashMap::new(),
                peak: 0,
                conns: HashMap::new(),
                next_id: 0,
            }),
        })
    }

    /// Admits a connection from `ip`, shedding an idle one if the total
    /// is full (see the module documentation), or refuses it.
    pub fn admit(self: &Arc<Self>, ip: IpAddr) -> Admission {
        let key = client_key(ip);
        let mut c = self.counts.lock().unwrap_or_else(PoisonError::into_inner);
        let mine = c.per_client.get(&key).copied().unwrap_or(0);
        if mine >= self.limits.per_client {
            return Admission::Refused;
        }
        if c.open >= self.limits.total {
            shed_one(&mut c, mine);
        }
        let reserve = if c.open < self.limits.total {
            false
        } else if c.reserve_open < self.limits.reserve {
            true
        } else {
            return Admission::Refused;
        };
        *c.per_client.entry(key).or_insert(0) += 1;
        if reserve {
            c.reserve_open += 1;
        } else {
            c.open += 1;
        }
        c.peak = c.peak.max(c.open + c.reserve_open);
        let slot = Slot::new(self.epoch);
        let id = c.next_id;
        c.next_id += 1;
        if !reserve {
            c.conns.insert(id, (key, Arc::clone(&slot)));
        }
        let permit = Permit {
            budget: Arc::clone(self),
            key,
            reserve,
            id,
            slot,
        };
        if reserve {
            Admission::HealthOnly(permit)
        } else {
            Admission::Full(permit)
        }
    }

    /// Connections open now (reserve included).
    pub fn open(&self) -> usize {
        let c = self.counts.lock().unwrap_or_else(PoisonError::into_inner);
        c.open + c.reserve_open
    }
}

/// Sheds the idle connection that has waited longest from the address
/// holding the most connections, if that address holds more than `mine`
/// (the newcomer's address). Whether one was shed.
fn shed_one(c: &mut Counts, mine: usize) -> bool {
    // A candidate can turn busy between the choice and the swap: choose
    // again then, a bounded number of times.
    for _ in 0..4 {
        let victim = c
            .conns
            .iter()
            .filter_map(|(id, (key, slot))| {
                let state = slot.state.load(Ordering::SeqCst);
                let held = c.per_client.get(key).copied().unwrap_or(0);
                (state >= IDLE_BASE && held > mine).then_some((held, Reverse(state), Reverse(*id)))
            })
            .max();
        let Some((_, _, Reverse(id))) = victim else {
            return false;
        };
        let Some((key, slot)) = c.conns.get(&id).cloned() else {
            return false;
        };
        if !slot.try_shed() {
            continue;
        }
        c.conns.remove(&id);
        c.open -= 1;
        release(c, key);
        slot.shed.notify_one();
        return true;
    }
    false
}

/// Takes one connection of `key` off the per-address counts.
fn release(c: &mut Counts, key: IpAddr) {
    if let Some(n) = c.per_client.get_mut(&key) {
        *n -= 1;
        if *n == 0 {
            c.per_client.remove(&key);
        }
    }
}

/// A connection's place in its budget, given back on drop.
#[derive(Debug)]
pub struct Permit {
    budget: Arc<Budget>,
    key: IpAddr,
    reserve: bool,
    id: u64,
    slot: Arc<Slot>,
}

impl Permit {
    /// The connection's state, shared with the code serving it.
    pub fn slot(&self) -> &Arc<Slot> {
        &self.slot
    }
}

/// A flood leaves the allocator holding the memory its connections used
/// (glibc keeps freed heap in its arenas). Once the open connections fall to
/// a quarter of a peak of at least this many, the memory is given back.
const TRIM_AFTER_PEAK: usize = 64;

impl Drop for Permit {
    fn drop(&mut self) {
        let trim = {
            let mut c = self
                .budget
                .counts
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            if self.reserve {
                c.reserve_open -= 1;
                release(&mut c, self.key);
            } else if c.conns.remove(&self.id).is_some() {
                // Not shed: a shed connection was counted out already.
                c.open -= 1;
                release(&mut c, self.key);
            }
            let now = c.open + c.reserve_open;
            if c.peak >= TRIM_AFTER_PEAK && now <= c.peak / 4 {
                c.peak = now;
                // The maps' own tables keep their peak capacity otherwise.
                c.per_client.shrink_to_fit();
                c.conns.shrink_to_fit();
                true
            } else {
                false
            }
        };
        if trim {
            give_memory_back();
        }
    }
}

/// Returns freed heap to the operating system (glibc's `malloc_trim`), off
/// the async threads: it can take a few milliseconds on a large heap.
fn give_memory_back() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    if let Ok(handle) = tokio::runtime::Handle::try_current() {
        handle.spawn_blocking(|| {
            // SAFETY: `malloc_trim` only walks the allocator's own arenas;
            // it is safe to call at any time from any thread.
            unsafe { libc::malloc_trim(0) };
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_client_at_its_cap_is_refused_while_others_are_admitted() {
        let budget = Budget::new(Limits {
            total: 4,
            per_client: 2,
            reserve: 1,
        });
        let a: IpAddr = "127.0.0.2".parse().unwrap();
        let b: IpAddr = "127.0.0.3".parse().unwrap();
        let p1 = budget.admit(a);
        let _p2 = budget.admit(a);
        assert!(matches!(p1, Admission::Full(_)));
        assert!(matches!(budget.admit(a), Admission::Refused));
        let _p3 = budget.admit(b);
        drop(p1);
        assert!(matches!(budget.admit(a), Admission::Full(_)));
    }

    #[test]
    fn beyond_the_total_only_the_reserve_is_admitted_then_nothing() {
        let budget = Budget::new(Limits {
            total: 2,
            per_client: 10,
            reserve: 1,
        });
        let ip: IpAddr = "::1".parse().unwrap();
        let _held: Vec<_> = (0..2).map(|_| budget.admit(ip)).collect();
        let reserve = budget.admit(ip);
        assert!(matches!(reserve, Admission::HealthOnly(_)));
        assert!(matches!(budget.admit(ip), Admission::Refused));
        assert_eq!(budget.open(), 3);
        drop(reserve);
        assert_eq!(budget.open(), 2);
    }

    fn idle(admission: Admission) -> Permit {
        match admission {
            Admission::Full(p) => p,
            other => panic!("not admitted in full: {other:?}"),
        }
    }

    #[test]
    fn a_full_budget_sheds_the_oldest_idle_connection_of_the_top_address() {
        let budget = Budget::new(Limits {
            total: 4,
            per_client: 4,
            reserve: 0,
        });
        let (a, b, c): (IpAddr, IpAddr, IpAddr) = (
            "127.0.0.2".parse().unwrap(),
            "127.0.0.3".parse().unwrap(),
            "127.0.0.4".parse().unwrap(),
        );
        let a1 = idle(budget.admit(a));
        std::thread::sleep(std::time::Duration::from_millis(5));
        let a2 = idle(budget.admit(a));
        let b1 = idle(budget.admit(b));
        let a3 = idle(budget.admit(a));
        // a1 is busy: of a's idle ones, a2 waited longest.
        assert!(a1.slot().set_busy());
        let newcomer = idle(budget.admit(c));
        assert!(!a2.slot().set_busy(), "a2 was shed");
        assert!(a3.slot().set_busy() && b1.slot().set_busy());
        assert_eq!(budget.open(), 4);
        drop(a2);
        assert_eq!(budget.open(), 4, "a shed permit was counted out already");
        // Everything busy but the newcomer, which holds fewer than a: no
        // one can be shed by c.
        assert!(newcomer.slot().set_busy());
        assert!(matches!(budget.admit(c), Admission::Refused));
        newcomer.slot().set_idle();
        // An address holding as many as the victim's may not shed.
        a3.slot().set_idle();
        assert!(matches!(budget.admit(a), Admission::Refused));
        assert!(a3.slot().set_busy(), "nothing was shed for a");
        drop(b1);
        assert_eq!(budget.open(), 3);
    }

    #[test]
    fn a_spread_flood_is_displaced_by_a_newcomer_but_a_request_in_flight_never_is() {
        let budget = Budget::new(Limits {
            total: 8,
            per_client: 2,
            reserve: 0,
        });
        let addr = |i: u32| IpAddr::from([127, 1, (i >> 8) as u8, i as u8]);
        let mut held: Vec<Permit> = (0..8).map(|i| idle(budget.admit(addr(i)))).collect();
        assert!(held[0].slot().set_busy(), "one has a request in flight");
        // A flood re-opening from fresh addresses sheds only idle ones.
        for i in 8..64 {
            held.push(idle(budget.admit(addr(i))));
        }
        assert!(held[0].slot().is_busy());
        assert_eq!(budget.open(), 8);
        assert!(held[1..8].iter().all(|p| !p.slot().set_busy()));
    }

    #[test]
    fn ipv6_clients_are_counted_by_their_64_and_mapped_ipv4_as_ipv4() {
        let a: IpAddr = "2001:db8:1:2::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:ffff::9".parse().unwrap();
        assert_eq!(client_key(a), client_key(b));
        let mapped: IpAddr = "::ffff:10.0.0.1".parse().unwrap();
        assert_eq!(client_key(mapped), "10.0.0.1".parse::<IpAddr>().unwrap());
    }
}
