//! Request bodies held in memory while a submission is read: a bound on
//! each tenant's uploads in flight and on the bytes all of them may hold.
//!
//! A submission's body is read whole before the job is stored (at most
//! `max_body`). Without a bound, one token trickling 48 bodies of 60 MB
//! held 3 GB, and a thousand in flight hold every connection the listener
//! has. Each upload reserves its declared length (`max_body` when none is
//! declared) before any byte is read; a reservation over the tenant's
//! count or share, or over the total, is refused with 429 and
//! `Retry-After`, and the connection closes without the body being read.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use super::ApiError;

/// How long a refused uploader is told to wait.
const RETRY_AFTER_SECS: u64 = 1;

#[derive(Debug, Default)]
struct Held {
    /// Per tenant: uploads in flight and the bytes they reserved.
    tenants: HashMap<String, (usize, u64)>,
    total: u64,
}

/// Uploads in flight, bounded per tenant and in bytes.
#[derive(Debug)]
pub struct Uploads {
    max_per_tenant: usize,
    max_bytes: u64,
    tenant_share: u64,
    held: Mutex<Held>,
}

impl Uploads {
    /// `max_per_tenant` uploads per tenant, `max_bytes` reserved in all,
    /// of which one tenant may hold a quarter (but always one `max_body`).
    pub fn new(max_per_tenant: usize, max_bytes: u64, max_body: u64) -> Arc<Self> {
        Arc::new(Self {
            max_per_tenant,
            max_bytes,
            tenant_share: (max_bytes / 4).max(max_body),
            held: Mutex::default(),
        })
    }

    /// Reserves `bytes` for one upload of `tenant`, held until the permit
    /// drops (the request is answered or abandoned).
    ///
    /// # Errors
    /// [`ApiError::TooManyRequests`] over any bound.
    pub fn acquire(self: &Arc<Self>, tenant: &str, bytes: u64) -> Result<UploadPermit, ApiError> {
        let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        let (count, reserved) = held.tenants.get(tenant).copied().unwrap_or((0, 0));
        let refusal = if count >= self.max_per_tenant {
            Some(format!(
                "tenant `{tenant}` already has {count} uploads in flight"
            ))
        } else if reserved + bytes > self.tenant_share {
            Some(format!(
                "tenant `{tenant}` already has {reserved} bytes of uploads in flight"
            ))
        } else if held.total + bytes > self.max_bytes {
            Some("the service holds as many uploads as it may; retry".to_owned())
        } else {
            None
        };
        if let Some(message) = refusal {
            return Err(ApiError::TooManyRequests {
                message,
                retry_after: RETRY_AFTER_SECS,
            });
        }
        held.tenants
            .insert(tenant.to_owned(), (count + 1, reserved + bytes));
        held.total += bytes;
        Ok(UploadPermit {
            uploads: Arc::clone(self),
            tenant: tenant.to_owned(),
            bytes,
            counted: true,
        })
    }
}

/// One upload in flight; dropping it gives its reservation back.
#[derive(Debug)]
pub struct UploadPermit {
    uploads: Arc<Uploads>,
    tenant: String,
    bytes: u64,
    /// Whether it still counts as an upload in flight (until its body has
    /// been read).
    counted: bool,
}

impl UploadPermit {
    /// The body has been read: it no longer counts as an upload in flight,
    /// though its bytes stay reserved until the permit drops.
    pub fn received(&mut self) {
        if std::mem::take(&mut self.counted) {
            let mut held = self.uploads.held.lock().unwrap_or_else(|p| p.into_inner());
            if let Some((count, _)) = held.tenants.get_mut(&self.tenant) {
                *count -= 1;
            }
        }
    }
}

impl Drop for UploadPermit {
    fn drop(&mut self) {
        let mut held = self.uploads.held.lock().unwrap_or_else(|p| p.into_inner());
        held.total = held.total.saturating_sub(self.bytes);
        if let Some((count, reserved)) = held.tenants.get_mut(&self.tenant) {
            if self.counted {
                *count -= 1;
            }
            *reserved = reserved.saturating_sub(self.bytes);
            if *count == 0 && *reserved == 0 {
                held.tenants.remove(&self.tenant);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uploads_are_bounded_per_tenant_in_count_and_bytes_and_in_total() {
        let uploads = Uploads::new(2, 400, 100);
        let a1 = uploads.acquire("a", 50).unwrap();
        let a2 = uploads.acquire("a", 10).unwrap();
        assert!(uploads.acquire("a", 1).is_err(), "a third upload of a");
        drop(a2);
        let mut a3 = uploads.acquire("a", 1).expect("given back");
        a3.received();
        let a4 = uploads
            .acquire("a", 1)
            .expect("a read body is no upload in flight");
        drop(a3);
        assert!(uploads.acquire("a", 100).is_err(), "over a's share of 100");
        let b = uploads.acquire("b", 100).unwrap();
        let c = uploads.acquire("c", 100).unwrap();
        let d = uploads.acquire("d", 100).unwrap();
        assert!(uploads.acquire("e", 100).is_err(), "over the total of 400");
        drop((a1, a4, b, c, d));
        assert!(uploads.acquire("e", 100).is_ok());
        assert_eq!(uploads.held.lock().unwrap().total, 0);
    }
}
