//! The bound on what unauthenticated callers make the service write: audit
//! entries for failed authentication (`auth.denied`) are rate-limited per
//! client address, and what is held back is counted, not lost.
//!
//! In each window (a minute), a client address gets its first
//! `denials_per_client` entries written row by row, and all addresses
//! together at most `denials_per_minute`; the rest are counted. When the
//! window ends, each address that was held back gets one
//! `auth.denied.summary` row with its count (the [`MAX_SUMMARIES`] largest;
//! the others share one more row). So a window writes at most
//! `denials_per_minute + MAX_SUMMARIES + 1` rows, whatever the flood, and
//! the limiter's memory is bounded by [`MAX_TRACKED`] addresses.
//!
//! Denials of authenticated callers (`scope.denied`, `quota.denied`) go
//! through a [`TenantDenials`] limiter of the same kind, keyed by tenant,
//! client address and action, with `<action>.summary` rows.

use std::collections::HashMap;
use std::hash::Hash;
use std::net::IpAddr;
use std::sync::{Mutex, PoisonError};

use axum::http::request::Parts;

use super::budget::client_key;
use crate::config::Audit;
use crate::service::Service;
use crate::store::{AuditEntry, now_ms};

/// Addresses a window keeps a count for; denials from any further address
/// in that window are counted together and never written one by one.
pub const MAX_TRACKED: usize = 4096;

/// Addresses that get a summary row of their own per window.
pub const MAX_SUMMARIES: usize = 16;

#[derive(Debug, Default)]
struct Count {
    written: u32,
    held_back: u64,
}

#[derive(Debug)]
struct Window<K> {
    written: u32,
    clients: HashMap<K, Count>,
    untracked: u64,
}

impl<K> Default for Window<K> {
    fn default() -> Self {
        Self {
            written: 0,
            clients: HashMap::new(),
            untracked: 0,
        }
    }
}

/// What a window held back: the [`MAX_SUMMARIES`] largest counts by key,
/// then the sum of the others and how many keys they were.
struct HeldBack<K> {
    largest: Vec<(K, u64)>,
    others: u64,
    others_keys: String,
}

/// The windowed limiter behind [`Denials`] and [`TenantDenials`].
#[derive(Debug)]
struct Limiter<K> {
    per_client: u32,
    per_window: u32,
    window: Mutex<Window<K>>,
}

impl<K: Hash + Eq + Ord> Limiter<K> {
    fn new(config: &Audit) -> Self {
        Self {
            per_client: config.denials_per_client,
            per_window: config.denials_per_minute,
            window: Mutex::default(),
        }
    }

    fn admit(&self, key: K) -> bool {
        let mut w = self.window.lock().unwrap_or_else(PoisonError::into_inner);
        if w.clients.len() >= MAX_TRACKED && !w.clients.contains_key(&key) {
            w.untracked += 1;
            return false;
        }
        let room = w.written < self.per_window;
        let c = w.clients.entry(key).or_default();
        if room && c.written < self.per_client {
            c.written += 1;
            w.written += 1;
            true
        } else {
            c.held_back += 1;
            false
        }
    }

    fn roll(&self) -> HeldBack<K> {
        let w = std::mem::take(&mut *self.window.lock().unwrap_or_else(PoisonError::into_inner));
        let mut held: Vec<(K, u64)> = w
            .clients
            .into_iter()
            .filter(|(_, c)| c.held_back > 0)
            .map(|(k, c)| (k, c.held_back))
            .collect();
        held.sort_unstable_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        let rest = held.split_off(held.len().min(MAX_SUMMARIES));
        HeldBack {
            largest: held,
            others: rest.iter().map(|r| r.1).sum::<u64>() + w.untracked,
            others_keys: if w.untracked > 0 {
                format!("{} or more", rest.len() + 1)
            } else {
                rest.len().to_string()
            },
        }
    }
}

/// The per-address limiter of unauthenticated denial entries.
#[derive(Debug)]
pub struct Denials(Limiter<IpAddr>);

impl Denials {
    /// A limiter with the config's allowances.
    pub fn new(config: &Audit) -> Self {
        Self(Limiter::new(config))
    }

    /// Whether a denial from `ip` is written now; if not, it is counted.
    pub fn admit(&self, ip: IpAddr) -> bool {
        self.0.admit(client_key(ip))
    }

    /// Ends the window: the summary rows for what was held back in it.
    pub fn roll(&self) -> Vec<AuditEntry> {
        let held = self.0.roll();
        let at = now_ms();
        let mut rows: Vec<AuditEntry> = held
            .largest
            .into_iter()
            .map(|(ip, n)| AuditEntry {
                at,
                action: "auth.denied.summary".into(),
                client: Some(ip.to_string()),
                detail: format!("{n} more unauthenticated denials from this address"),
                ..AuditEntry::default()
            })
            .collect();
        if held.others > 0 {
            rows.push(AuditEntry {
                at,
                action: "auth.denied.summary".into(),
                detail: format!(
                    "{} more unauthenticated denials from {} other addresses",
                    held.others, held.others_keys
                ),
                ..AuditEntry::default()
            });
        }
        rows
    }
}

/// Which authenticated denials share an allowance: the tenant, the client
/// address (when known) and the action (`scope.denied`, `quota.denied`...).
type TenantKey = (String, Option<IpAddr>, String);

/// The limiter of denial entries for authenticated callers, keyed by
/// tenant, client address and action, with the same allowances and bounds
/// as [`Denials`]: a tenant's token cannot make the service write more per
/// window than an anonymous flood can. Each held-back key gets one
/// `<action>.summary` row with its count.
#[derive(Debug)]
pub struct TenantDenials(Limiter<TenantKey>);

impl TenantDenials {
    /// A limiter with the config's allowances.
    pub fn new(config: &Audit) -> Self {
        Self(Limiter::new(config))
    }

    /// Whether the denial `entry` (its tenant, client and action) is written
    /// now; if not, it is counted.
    pub fn admit(&self, entry: &AuditEntry) -> bool {
        let client = entry
            .client
            .as_deref()
            .and_then(|c| c.parse().ok())
            .map(client_key);
        self.0.admit((
            entry.tenant.clone().unwrap_or_default(),
            client,
            entry.action.clone(),
        ))
    }

    /// Ends the window: the summary rows for what was held back in it.
    pub fn roll(&self) -> Vec<AuditEntry> {
        let held = self.0.roll();
        let at = now_ms();
        let mut rows: Vec<AuditEntry> = held
            .largest
            .into_iter()
            .map(|((tenant, client, action), n)| AuditEntry {
                at,
                detail: format!("{n} more {action} entries for this tenant from this address"),
                action: format!("{action}.summary"),
                tenant: Some(tenant),
                client: client.map(|c| c.to_string()),
                ..AuditEntry::default()
            })
            .collect();
        if held.others > 0 {
            rows.push(AuditEntry {
                at,
                action: "denied.summary".into(),
                detail: format!(
                    "{} more authenticated denials from {} other tenants or addresses",
                    held.others, held.others_keys
                ),
                ..AuditEntry::default()
            });
        }
        rows
    }
}

/// Records an unauthenticated denial of the request whose head is `parts`:
/// with its client address, and through that client's limiter when the
/// request came through [`super::serve`] (a router driven another way, as in
/// unit tests, writes every entry).
pub async fn record(service: &Service, parts: &Parts, mut entry: AuditEntry) {
    match parts.extensions.get::<super::Client>() {
        Some(client) => {
            entry.client = Some(client.addr.ip().to_string());
            if client.denials.admit(client.addr.ip()) {
                service.audit(entry).await;
            }
        }
        None => service.audit(entry).await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limiter(per_client: u32, per_minute: u32) -> Denials {
        Denials::new(&Audit {
            denials_per_client: per_client,
            denials_per_minute: per_minute,
            ..Audit::default()
        })
    }

    #[test]
    fn each_address_gets_its_allowance_then_one_summary_with_its_count() {
        let d = limiter(3, 100);
        let a: IpAddr = "127.0.0.2".parse().unwrap();
        let b: IpAddr = "127.0.0.3".parse().unwrap();
        let written = (0..10).filter(|_| d.admit(a)).count();
        assert_eq!(written, 3);
        assert!(d.admit(b));
        let rows = d.roll();
        assert_eq!(rows.len(), 1);
        assert_eq!(rows[0].client.as_deref(), Some("127.0.0.2"));
        assert!(rows[0].detail.starts_with("7 more"), "{}", rows[0].detail);
        // A new window starts afresh.
        assert!(d.admit(a));
        assert!(d.roll().is_empty());
    }

    #[test]
    fn many_addresses_share_the_window_and_get_bounded_summaries() {
        let d = limiter(5, 20);
        let mut written = 0;
        for i in 0..10_000u32 {
            let ip = IpAddr::from(std::net::Ipv6Addr::new(
                0x2001, 0xdb8, 0, i as u16, 0, 0, 0, 1,
            ));
            written += usize::from(d.admit(ip));
            written += usize::from(d.admit(ip));
        }
        assert_eq!(written, 20);
        let rows = d.roll();
        assert_eq!(rows.len(), MAX_SUMMARIES + 1);
        let last = rows.last().unwrap();
        assert!(last.client.is_none());
        assert!(last.detail.contains("or more"), "{}", last.detail);
    }

    #[test]
    fn tenant_denials_are_limited_per_tenant_address_and_action() {
        let d = TenantDenials::new(&Audit {
            denials_per_client: 2,
            denials_per_minute: 100,
            ..Audit::default()
        });
        let entry = |tenant: &str, action: &str| AuditEntry {
            action: action.into(),
            tenant: Some(tenant.into()),
            client: Some("127.0.0.2".into()),
            ..AuditEntry::default()
        };
        let written = (0..10)
            .filter(|_| d.admit(&entry("acme", "scope.denied")))
            .count();
        assert_eq!(written, 2);
        assert!(d.admit(&entry("acme", "quota.denied")));
        assert!(d.admit(&entry("other", "scope.denied")));
        let rows = d.roll();
        assert_eq!(rows.len(), 1);
        assert_eq!(rows[0].action, "scope.denied.summary");
        assert_eq!(rows[0].tenant.as_deref(), Some("acme"));
        assert_eq!(rows[0].client.as_deref(), Some("127.0.0.2"));
        assert!(rows[0].detail.starts_with("8 more"), "{}", rows[0].detail);
    }
}
