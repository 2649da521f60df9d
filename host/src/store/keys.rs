//! What nodes sharing one store publish to each other: their call-token
//! public keys, and themselves (the node registry).
//!
//! **Keys.** Each node's private signing key stays in its own data
//! directory; its public keys are rows here, one per key id (an RFC 7638
//! thumbprint, so a key is the same row whichever node publishes it), each
//! with the Unix second it leaves the JWKS (`until`):
//! - a retired key: the end of its grace after the rotation
//!   (`tokens.key_grace`), as the node's own key ring says;
//! - an active key: a little past its node's last heartbeat (the node
//!   refreshes it at every heartbeat, see `service::nodes`), so the key of a
//!   node that stopped leaves once every token it could have signed has
//!   expired.
//!
//! Every node serves as its JWKS every row whose `until` is still ahead,
//! its own keys included, so a call token minted on one node verifies
//! against the JWKS of any other.
//!
//! **Nodes.** One row per start of a node (`Service::node`), written at
//! every heartbeat: its name, when it started, its last heartbeat and the
//! addresses it listens on. A row whose heartbeat is old is a node that
//! stopped or lost the database; rows are dropped a day after.
//!
//! The trait is implemented for both stores here, on their own tables
//! (`published_keys`, `nodes`: created at open on SQLite, migration 0005 on
//! PostgreSQL).

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use super::{PostgresStore, SqliteStore, StoreError};

/// A public key as the store holds it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PublishedKey {
    /// Key id (JWK thumbprint of `x`).
    pub kid: String,
    /// The node that last published it.
    pub node: String,
    /// The Ed25519 public key, base64url without padding.
    pub x: String,
    /// Whether it signs new tokens on its node.
    pub active: bool,
    /// Unix seconds at which it leaves the JWKS.
    pub until: i64,
}

/// A node sharing the store, as its last heartbeat left it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct NodeRecord {
    /// This start of the node (`<name>-<8 hex digits>`).
    pub id: String,
    /// The node's configured name (`[node] name`, or the host name).
    pub name: String,
    /// Unix milliseconds at which it started.
    pub started_at: i64,
    /// Unix milliseconds of its last heartbeat.
    pub heartbeat_at: i64,
    /// The addresses it listens on (public, then admin).
    pub addresses: Vec<String>,
}

/// Public keys and nodes shared between the nodes of one store.
#[async_trait]
pub trait KeyDirectory: Send + Sync {
    /// Writes `keys` (each replacing the row of its key id).
    async fn publish_keys(&self, keys: &[PublishedKey]) -> Result<(), StoreError>;
    /// Every key whose `until` is after `now` (Unix seconds), ordered by
    /// key id.
    async fn live_keys(&self, now: i64) -> Result<Vec<PublishedKey>, StoreError>;
    /// Writes `node`'s row (its heartbeat).
    async fn heartbeat(&self, node: &NodeRecord) -> Result<(), StoreError>;
    /// Every node row, newest start first.
    async fn nodes(&self) -> Result<Vec<NodeRecord>, StoreError>;
    /// Deletes keys whose `until` is at or before `keys_before` (Unix
    /// seconds) and nodes whose last heartbeat is before `nodes_before`
    /// (Unix milliseconds); returns how many rows went.
    async fn sweep_directory(&self, keys_before: i64, nodes_before: i64)
    -> Result<u64, StoreError>;
}

/// The SQLite tables, created at open (idempotent).
pub(super) const SQLITE_SCHEMA: &str = r#"
CREATE TABLE IF NOT EXISTS published_keys (
    kid TEXT PRIMARY KEY,
    node TEXT NOT NULL,
    x TEXT NOT NULL,
    active INTEGER NOT NULL,
    until INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS nodes (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    started_at INTEGER NOT NULL,
    heartbeat_at INTEGER NOT NULL,
    addresses TEXT NOT NULL
);
"#;

fn addresses_json(node: &NodeRecord) -> String {
    serde_json::to_string(&node.addresses).expect("strings serialize")
}

fn addresses_from(text: &str) -> Result<Vec<String>, StoreError> {
    serde_json::from_str(text).map_err(|e| StoreError::Corrupt(format!("nodes.addresses: {e}")))
}

#[async_trait]
impl KeyDirectory for SqliteStore {
    async fn publish_keys(&self, keys: &[PublishedKey]) -> Result<(), StoreError> {
        let keys = keys.to_vec();
        self.write(move |conn| {
            let mut stmt = conn.prepare_cached(
                "INSERT INTO published_keys (kid, node, x, active, until) VALUES (?1, ?2, ?3, ?4, ?5)
                 ON CONFLICT (kid) DO UPDATE SET node = excluded.node, x = excluded.x,
                     active = excluded.active, until = excluded.until",
            )?;
            for k in &keys {
                stmt.execute(rusqlite::params![k.kid, k.node, k.x, k.active, k.until])?;
            }
            Ok(())
        })
        .await
    }

    async fn live_keys(&self, now: i64) -> Result<Vec<PublishedKey>, StoreError> {
        self.read(|conn| {
            let mut stmt = conn.prepare_cached(
                "SELECT kid, node, x, active, until FROM published_keys WHERE until > ?1 ORDER BY kid",
            )?;
            let rows = stmt.query_map([now], |r| {
                Ok(PublishedKey {
                    kid: r.get(0)?,
                    node: r.get(1)?,
                    x: r.get(2)?,
                    active: r.get(3)?,
                    until: r.get(4)?,
                })
            })?;
            Ok(rows.collect::<Result<Vec<_>, _>>()?)
        })
    }

    async fn heartbeat(&self, node: &NodeRecord) -> Result<(), StoreError> {
        let node = node.clone();
        self.write(move |conn| {
            conn.prepare_cached(
                "INSERT INTO nodes (id, name, started_at, heartbeat_at, addresses) VALUES (?1, ?2, ?3, ?4, ?5)
                 ON CONFLICT (id) DO UPDATE SET heartbeat_at = excluded.heartbeat_at,
                     addresses = excluded.addresses",
            )?
            .execute(rusqlite::params![
                node.id,
                node.name,
                node.started_at,
                node.heartbeat_at,
                addresses_json(&node)
            ])?;
            Ok(())
        })
        .await
    }

    async fn nodes(&self) -> Result<Vec<NodeRecord>, StoreError> {
        self.read(|conn| {
            let mut stmt = conn.prepare_cached(
                "SELECT id, name, started_at, heartbeat_at, addresses FROM nodes
                 ORDER BY started_at DESC, id",
            )?;
            let rows = stmt.query_map([], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, i64>(2)?,
                    r.get::<_, i64>(3)?,
                    r.get::<_, String>(4)?,
                ))
            })?;
            rows.map(|row| {
                let (id, name, started_at, heartbeat_at, addresses) = row?;
                Ok(NodeRecord {
                    id,
                    name,
                    started_at,
                    heartbeat_at,
                    addresses: addresses_from(&addresses)?,
                })
            })
            .collect()
        })
    }

    async fn sweep_directory(
        &self,
        keys_before: i64,
        nodes_before: i64,
    ) -> Result<u64, StoreError> {
        self.write(move |conn| {
            let keys = conn.execute(
                "DELETE FROM published_keys WHERE until <= ?1",
                [keys_before],
            )?;
            let nodes =
                conn.execute("DELETE FROM nodes WHERE heartbeat_at < ?1", [nodes_before])?;
            Ok((keys + nodes) as u64)
        })
        .await
    }
}

fn pg_node(row: &sqlx::postgres::PgRow) -> Result<NodeRecord, StoreError> {
    use sqlx::Row as _;
    let addresses: String = row.try_get("addresses")?;
    Ok(NodeRecord {
        id: row.try_get("id")?,
        name: row.try_get("name")?,
        started_at: row.try_get("started_at")?,
        heartbeat_at: row.try_get("heartbeat_at")?,
        addresses: addresses_from(&addresses)?,
    })
}

#[async_trait]
impl KeyDirectory for PostgresStore {
    async fn publish_keys(&self, keys: &[PublishedKey]) -> Result<(), StoreError> {
        if keys.is_empty() {
            return Ok(());
        }
        // One statement for the node's whole ring: arrays, unnested.
        let column = |f: fn(&PublishedKey) -> String| keys.iter().map(f).collect::<Vec<_>>();
        sqlx::query(
            "INSERT INTO published_keys (kid, node, x, active, until)
             SELECT * FROM UNNEST($1::text[], $2::text[], $3::text[], $4::bool[], $5::bigint[])
             ON CONFLICT (kid) DO UPDATE SET node = EXCLUDED.node, x = EXCLUDED.x,
                 active = EXCLUDED.active, until = EXCLUDED.until",
        )
        .bind(column(|k| k.kid.clone()))
        .bind(column(|k| k.node.clone()))
        .bind(column(|k| k.x.clone()))
        .bind(keys.iter().map(|k| k.active).collect::<Vec<_>>())
        .bind(keys.iter().map(|k| k.until).collect::<Vec<_>>())
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn live_keys(&self, now: i64) -> Result<Vec<PublishedKey>, StoreError> {
        use sqlx::Row as _;
        let rows = sqlx::query(
            "SELECT kid, node, x, active, until FROM published_keys WHERE until > $1 ORDER BY kid",
        )
        .bind(now)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(PublishedKey {
                    kid: r.try_get("kid")?,
                    node: r.try_get("node")?,
                    x: r.try_get("x")?,
                    active: r.try_get("active")?,
                    until: r.try_get("until")?,
                })
            })
            .collect()
    }

    async fn heartbeat(&self, node: &NodeRecord) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO nodes (id, name, started_at, heartbeat_at, addresses)
             VALUES ($1, $2, $3, $4, $5::jsonb)
             ON CONFLICT (id) DO UPDATE SET heartbeat_at = EXCLUDED.heartbeat_at,
                 addresses = EXCLUDED.addresses",
        )
        .bind(&node.id)
        .bind(&node.name)
        .bind(node.started_at)
        .bind(node.heartbeat_at)
        .bind(addresses_json(node))
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn nodes(&self) -> Result<Vec<NodeRecord>, StoreError> {
        sqlx::query(
            "SELECT id, name, started_at, heartbeat_at, addresses::text AS addresses FROM nodes
             ORDER BY started_at DESC, id",
        )
        .fetch_all(&self.pool)
        .await?
        .iter()
        .map(pg_node)
        .collect()
    }

    async fn sweep_directory(
        &self,
        keys_before: i64,
        nodes_before: i64,
    ) -> Result<u64, StoreError> {
        let keys = sqlx::query("DELETE FROM published_keys WHERE until <= $1")
            .bind(keys_before)
            .execute(&self.pool)
            .await?
            .rows_affected();
        let nodes = sqlx::query("DELETE FROM nodes WHERE heartbeat_at < $1")
            .bind(nodes_before)
            .execute(&self.pool)
            .await?
            .rows_affected();
        Ok(keys + nodes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::JobStore;

    /// Both stores, each on a fresh database (PostgreSQL only where the
    /// tests can start a server).
    async fn stores() -> Vec<(tempfile::TempDir, Box<dyn JobStore>)> {
        let tmp = tempfile::tempdir().unwrap();
        let sqlite = SqliteStore::open(&tmp.path().join("s.sqlite"))
            .await
            .unwrap();
        let mut v: Vec<(tempfile::TempDir, Box<dyn JobStore>)> = vec![(tmp, Box::new(sqlite))];
        if let Some(url) = crate::store::pg_server::fresh_database().await {
            let pg = PostgresStore::open_waiting(&url, 4, std::time::Duration::from_secs(60))
                .await
                .unwrap();
            v.push((tempfile::tempdir().unwrap(), Box::new(pg)));
        }
        v
    }

    fn key(kid: &str, node: &str, active: bool, until: i64) -> PublishedKey {
        PublishedKey {
            kid: kid.into(),
            node: node.into(),
            x: format!("x-{kid}"),
            active,
            until,
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn keys_of_every_node_are_live_until_they_expire_and_a_rotation_replaces_the_row() {
        for (_tmp, store) in stores().await {
            let now = 1_000_000;
            store
                .publish_keys(&[key("a1", "a", true, now + 30)])
                .await
                .unwrap();
            store
                .publish_keys(&[
                    key("b1", "b", true, now + 30),
                    key("b0", "b", false, now - 1),
                ])
                .await
                .unwrap();
            let live = store.live_keys(now).await.unwrap();
            assert_eq!(
                live,
                vec![
                    key("a1", "a", true, now + 30),
                    key("b1", "b", true, now + 30)
                ],
                "{store:?}"
            );
            // Node a rotates: a1 is retired with its grace, a2 is active.
            store
                .publish_keys(&[
                    key("a2", "a", true, now + 30),
                    key("a1", "a", false, now + 600),
                ])
                .await
                .unwrap();
            let live = store.live_keys(now + 100).await.unwrap();
            let kids: Vec<_> = live.iter().map(|k| (k.kid.as_str(), k.active)).collect();
            assert_eq!(kids, vec![("a1", false)], "{store:?}");
            // The sweep drops what has expired, and only that.
            assert_eq!(store.sweep_directory(now + 30, 0).await.unwrap(), 3);
            assert_eq!(store.live_keys(0).await.unwrap().len(), 1);
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_heartbeat_updates_its_node_and_old_nodes_are_swept() {
        for (_tmp, store) in stores().await {
            let node = |id: &str, started: i64, beat: i64| NodeRecord {
                id: id.into(),
                name: "n".into(),
                started_at: started,
                heartbeat_at: beat,
                addresses: vec!["127.0.0.1:1".into(), "127.0.0.1:2".into()],
            };
            store.heartbeat(&node("n-1", 10, 10)).await.unwrap();
            store.heartbeat(&node("n-2", 20, 20)).await.unwrap();
            store.heartbeat(&node("n-1", 10, 50)).await.unwrap();
            assert_eq!(
                store.nodes().await.unwrap(),
                vec![node("n-2", 20, 20), node("n-1", 10, 50)],
                "{store:?}"
            );
            assert_eq!(store.sweep_directory(0, 30).await.unwrap(), 1);
            assert_eq!(store.nodes().await.unwrap(), vec![node("n-1", 10, 50)]);
        }
    }
}
