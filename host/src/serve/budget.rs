//! Connection budgets: how many connections a listener holds open, in total
//! and per client address, and the small reserve kept for health probes.
//!
//! A budget is checked at accept time, before any byte of the connection is
//! read: a connection beyond it is answered and closed at once (see
//! `serve::refuse`), so it holds neither a descriptor nor a buffer, and the
//! kernel's accept backlog keeps draining.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, PoisonError};

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

#[derive(Debug, Default)]
struct Counts {
    open: usize,
    reserve_open: usize,
    per_client: HashMap<IpAddr, usize>,
    /// Most connections open at once since memory was last given back.
    peak: usize,
}

/// One listener's budget, shared by its connections' [`Permit`]s.
#[derive(Debug)]
pub struct Budget {
    limits: Limits,
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
            counts: Mutex::default(),
        })
    }

    /// Admits a connection from `ip`, or refuses it.
    pub fn admit(self: &Arc<Self>, ip: IpAddr) -> Admission {
        let key = client_key(ip);
        let mut c = self.counts.lock().unwrap_or_else(PoisonError::into_inner);
        let mine = c.per_client.get(&key).copied().unwrap_or(0);
        if mine >= self.limits.per_client {
            return Admission::Refused;
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
        let permit = Permit {
            budget: Arc::clone(self),
            key,
            reserve,
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

/// A connection's place in its budget, given back on drop.
#[derive(Debug)]
pub struct Permit {
    budget: Arc<Budget>,
    key: IpAddr,
    reserve: bool,
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
            } else {
                c.open -= 1;
            }
            if let Some(n) = c.per_client.get_mut(&self.key) {
                *n -= 1;
                if *n == 0 {
                    c.per_client.remove(&self.key);
                }
            }
            let now = c.open + c.reserve_open;
            if c.peak >= TRIM_AFTER_PEAK && now <= c.peak / 4 {
                c.peak = now;
                // The map's own table keeps its peak capacity otherwise.
                c.per_client.shrink_to_fit();
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

    #[test]
    fn ipv6_clients_are_counted_by_their_64_and_mapped_ipv4_as_ipv4() {
        let a: IpAddr = "2001:db8:1:2::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:ffff::9".parse().unwrap();
        assert_eq!(client_key(a), client_key(b));
        let mapped: IpAddr = "::ffff:10.0.0.1".parse().unwrap();
        assert_eq!(client_key(mapped), "10.0.0.1".parse::<IpAddr>().unwrap());
    }
}
