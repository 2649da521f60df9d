//! This node among the nodes sharing the store: its heartbeat in the node
//! registry, and its call-token public keys published for the others (see
//! `store::keys`).
//!
//! Every [`HEARTBEAT`] the node writes its row (last heartbeat, the
//! addresses it listens on), publishes its keys, and reads back every live
//! key into its key ring, which serves them in its JWKS: so the JWKS a node
//! serves is at most one heartbeat (plus a request's round trip) behind the
//! store. A rotation through the admin API publishes at once.
//!
//! A node's active key is published until [`active_hold`] past the
//! heartbeat that wrote it: while the node runs, that moves forward at
//! every beat; once it stops, the key stays until every token it may have
//! signed has expired and a verifier that pinned it has had the grace to
//! refresh (`tokens.key_grace`), as if it had been rotated out then.
//! Retired keys leave when their grace ends. Keys past their time, and
//! nodes silent for a day, are swept by whichever node gets there.
//!
//! A heartbeat that fails on the storage takes the node out of readiness
//! (as any storage failure does) until the keeper's probe passes again.

use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{Service, ServiceError};
use crate::relay::keys::PeerKey;
use crate::store::{NodeRecord, PublishedKey, StoreError, now_ms};

/// How often a node writes its heartbeat and refreshes the keys it serves.
pub const HEARTBEAT: Duration = Duration::from_secs(2);

/// A node whose last heartbeat is older than this is listed as stale.
pub const STALE_AFTER: Duration = Duration::from_secs(10);

/// Nodes silent for this long leave the registry.
const FORGET_AFTER: Duration = Duration::from_secs(24 * 3600);

/// Heartbeats between two sweeps of expired keys and forgotten nodes.
const SWEEP_EVERY: u32 = 30;

/// A node, for the admin API.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct NodeInfo {
    /// Its row in the registry.
    #[serde(flatten)]
    pub record: NodeRecord,
    /// Whether its last heartbeat is within [`STALE_AFTER`].
    pub live: bool,
    /// Whether it is the node that answered.
    pub this: bool,
}

/// How long past a heartbeat the active key it published stays in the
/// JWKS: [`STALE_AFTER`], then the longer of the key grace and the token
/// lifetime.
pub fn active_hold(tokens: &crate::relay::TokenConfig) -> Duration {
    STALE_AFTER + tokens.key_grace.get().max(tokens.lifetime.get())
}

impl Service {
    /// Publishes this node's public keys in the store and refreshes the
    /// other nodes' keys its JWKS serves.
    ///
    /// # Errors
    /// The store's.
    pub async fn publish_keys(&self) -> Result<(), StoreError> {
        let Some(ring) = self.keys() else {
            return Ok(());
        };
        let now = now_ms() / 1000;
        let hold = active_hold(&self.config.tokens).as_secs() as i64;
        let own: Vec<PublishedKey> = ring
            .own_keys()
            .into_iter()
            .map(|k| PublishedKey {
                active: k.retired_until.is_none(),
                until: k.retired_until.map_or(now + hold, |u| u as i64),
                kid: k.kid,
                node: self.node.clone(),
                x: k.x,
            })
            .collect();
        self.store.publish_keys(&own).await?;
        let live = self.store.live_keys(now).await?;
        ring.set_peers(live.into_iter().map(|k| PeerKey {
            kid: k.kid,
            x: k.x,
            active: k.active,
            until: k.until.max(0) as u64,
            node: k.node,
        }));
        Ok(())
    }

    /// Every node in the registry, live or stale.
    ///
    /// # Errors
    /// The store's.
    pub async fn nodes(&self) -> Result<Vec<NodeInfo>, StoreError> {
        let since = now_ms() - STALE_AFTER.as_millis() as i64;
        Ok(self
            .store
            .nodes()
            .await?
            .into_iter()
            .map(|record| NodeInfo {
                live: record.heartbeat_at >= since,
                this: record.id == self.node,
                record,
            })
            .collect())
    }

    /// Writes this node's heartbeat and publishes its keys every
    /// [`HEARTBEAT`], until the task is dropped. `addresses` are the ones
    /// it listens on.
    pub async fn heartbeat(self: Arc<Self>, addresses: Vec<String>) {
        let name = self
            .node
            .rsplit_once('-')
            .map_or(self.node.as_str(), |(name, _)| name)
            .to_owned();
        let mut record = NodeRecord {
            id: self.node.clone(),
            name,
            started_at: now_ms(),
            heartbeat_at: 0,
            addresses,
        };
        let mut tick = tokio::time::interval(HEARTBEAT);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut beats = 0u32;
        loop {
            tick.tick().await;
            record.heartbeat_at = now_ms();
            let sweep = beats.is_multiple_of(SWEEP_EVERY);
            beats = beats.wrapping_add(1);
            if let Err(e) = self.beat(&record, sweep).await {
                tracing::warn!(error = %e, "node heartbeat failed");
                self.noted(ServiceError::Store(e));
            }
        }
    }

    async fn beat(&self, record: &NodeRecord, sweep: bool) -> Result<(), StoreError> {
        self.store.heartbeat(record).await?;
        self.publish_keys().await?;
        if sweep {
            let gone = self
                .store
                .sweep_directory(
                    record.heartbeat_at / 1000,
                    record.heartbeat_at - FORGET_AFTER.as_millis() as i64,
                )
                .await?;
            if gone > 0 {
                tracing::debug!(gone, "swept expired keys and forgotten nodes");
            }
        }
        Ok(())
    }
}
