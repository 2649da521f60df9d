//! The host's Ed25519 signing keys: one active key that signs call tokens,
//! and retired keys still published in the JWKS for a grace period after a
//! rotation, so tokens signed just before it still verify.
//!
//! On disk, under `<data_dir>/keys` (mode 0700):
//! - `<kid>.pem`: the active private key, PKCS#8 PEM, mode 0600;
//! - `keyring.json`: which key is active, and the retired public keys with
//!   the time they leave the JWKS.
//!
//! A retired key's private half is deleted at rotation: only its public
//! key is kept, for the JWKS. Key ids are RFC 7638 JWK thumbprints.
//! An operator may supply the key instead (`tokens.signing_key`); the host
//! then never writes keys, and rotation is the operator's (replace the file
//! and restart).
//!
//! Nodes sharing one store publish their public keys there
//! (`store::keys`); the ring holds the other nodes' live keys as last read
//! from the store ([`KeyRing::set_peers`], at every heartbeat of
//! `service::nodes`), and its JWKS is its own keys and theirs.

use std::io::Write as _;
use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::sync::RwLock;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use bulkhead_verify::{CallClaims, JwkSet, call_header, ed25519_jwk};
use ed25519_dalek::SigningKey;
use ed25519_dalek::pkcs8::{DecodePrivateKey as _, EncodePrivateKey as _};
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

/// Why keys could not be loaded, saved or used.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// File system.
    #[error("signing keys: {path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// A key file or the key ring is not what it should be.
    #[error("signing keys: {0}")]
    Invalid(String),
    /// Signing failed.
    #[error("signing a call token: {0}")]
    Sign(String),
}

/// A published key, for listings.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct KeyInfo {
    /// Key id (JWK thumbprint).
    pub kid: String,
    /// Whether it signs new tokens.
    pub active: bool,
    /// Unix seconds at which a retired key leaves the JWKS.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retired_until: Option<u64>,
    /// For a key of another node sharing the store: that node's id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
}

/// One of this node's public keys, to publish.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OwnKey {
    /// Key id (JWK thumbprint).
    pub kid: String,
    /// Public key, base64url.
    pub x: String,
    /// `None` for the active key; for a retired one, the Unix second it
    /// leaves the JWKS.
    pub retired_until: Option<u64>,
}

/// A public key another node published.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerKey {
    /// Key id; must be the thumbprint of `x`.
    pub kid: String,
    /// Public key, base64url.
    pub x: String,
    /// Whether it signs new tokens on its node.
    pub active: bool,
    /// Unix seconds at which it leaves the JWKS.
    pub until: u64,
    /// The node that published it.
    pub node: String,
}

struct Active {
    kid: String,
    public: [u8; 32],
    key: SigningKey,
    /// `base64url(header) + "."`, the same for every token this key signs.
    header_prefix: String,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
struct Retired {
    kid: String,
    /// Public key, base64url.
    x: String,
    /// Unix seconds.
    until: u64,
}

#[derive(Debug, Serialize, Deserialize)]
struct RingFile {
    active: String,
    #[serde(default)]
    retired: Vec<Retired>,
}

struct Ring {
    active: Active,
    retired: Vec<Retired>,
}

/// Another node's key, checked: its id is the thumbprint of its public key.
struct Peer {
    kid: String,
    public: [u8; 32],
    active: bool,
    until: u64,
    node: String,
}

/// The signing keys. Cheap to read concurrently; rotation takes a write
/// lock for a moment.
pub struct KeyRing {
    /// `None` for an operator-supplied or in-memory key.
    dir: Option<PathBuf>,
    /// The directory `dir` names through `/proc/self/fd`, when the ring is
    /// a data directory's ([`KeyRing::open_in`]): held for the ring's life.
    _held: Option<crate::sandbox::beneath::Root>,
    grace: Duration,
    ring: RwLock<Ring>,
    /// Other nodes' live keys, as last read from the store.
    peers: RwLock<Vec<Peer>>,
}

impl std::fmt::Debug for KeyRing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyRing")
            .field("dir", &self.dir)
            .field("keys", &self.list())
            .finish_non_exhaustive()
    }
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs()
}

/// The RFC 7638 thumbprint of an Ed25519 public key.
pub fn thumbprint(public: &[u8; 32]) -> String {
    let canonical = format!(
        r#"{{"crv":"Ed25519","kty":"OKP","x":"{}"}}"#,
        URL_SAFE_NO_PAD.encode(public)
    );
    URL_SAFE_NO_PAD.encode(Sha256::digest(canonical.as_bytes()))
}

fn active_from(key: &SigningKey) -> Result<Active, KeyError> {
    let public = key.verifying_key().to_bytes();
    let kid = thumbprint(&public);
    let header = serde_json::to_vec(&call_header(&kid))
        .map_err(|e| KeyError::Invalid(format!("cannot encode the header: {e}")))?;
    Ok(Active {
        header_prefix: format!("{}.", URL_SAFE_NO_PAD.encode(header)),
        kid,
        public,
        key: key.clone(),
    })
}

fn generate() -> SigningKey {
    use rand::TryRngCore as _;
    let mut seed = [0u8; 32];
    rand::rngs::OsRng
        .try_fill_bytes(&mut seed)
        .expect("the OS random source is available");
    SigningKey::from_bytes(&seed)
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> KeyError + '_ {
    move |source| KeyError::Io {
        path: path.to_owned(),
        source,
    }
}

/// An Ed25519 public key from base64url.
fn decode_public(x: &str) -> Option<[u8; 32]> {
    let bytes = URL_SAFE_NO_PAD.decode(x).ok()?;
    <[u8; 32]>::try_from(bytes.as_slice()).ok()
}

/// Reads the regular file `path`, never through a link at its name, nor
/// one with a second name (a hard link to another's file).
fn read_own(path: &Path) -> std::io::Result<(Vec<u8>, std::fs::Metadata)> {
    use std::io::Read as _;
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)?;
    let meta = f.metadata()?;
    if !meta.is_file() {
        return Err(std::io::Error::other("not a regular file"));
    }
    if std::os::unix::fs::MetadataExt::nlink(&meta) > 1 {
        return Err(std::io::Error::other(
            "has a second name (a hard link): not the ring's own file",
        ));
    }
    let mut bytes = Vec::new();
    f.read_to_end(&mut bytes)?;
    Ok((bytes, meta))
}

/// Reads a PKCS#8 PEM Ed25519 key, refusing a file others may read; the
/// ring's own keys (`own`) never through a link at their names.
fn read_key(path: &Path, own: bool) -> Result<SigningKey, KeyError> {
    let (pem, meta) = if own {
        read_own(path).map_err(io(path))?
    } else {
        let meta = std::fs::metadata(path).map_err(io(path))?;
        (std::fs::read(path).map_err(io(path))?, meta)
    };
    if meta.permissions().mode() & 0o077 != 0 {
        return Err(KeyError::Invalid(format!(
            "{} is readable by other users (mode {:o}); run `chmod 600` on it",
            path.display(),
            meta.permissions().mode() & 0o777
        )));
    }
    let pem = String::from_utf8(pem)
        .map_err(|_| KeyError::Invalid(format!("{} is not a PEM file", path.display())))?;
    SigningKey::from_pkcs8_pem(&pem).map_err(|e| {
        KeyError::Invalid(format!(
            "{} is not a PKCS#8 PEM Ed25519 private key: {e}",
            path.display()
        ))
    })
}

/// Writes `bytes` to `path` atomically with mode 0600.
fn write_private(path: &Path, bytes: &[u8]) -> Result<(), KeyError> {
    let tmp = path.with_extension("tmp");
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(io(&tmp))?;
    f.write_all(bytes).map_err(io(&tmp))?;
    f.sync_all().map_err(io(&tmp))?;
    std::fs::rename(&tmp, path).map_err(io(path))
}

impl KeyRing {
    /// Opens the key ring under `dir`, generating the first key if there is
    /// none, and dropping retired keys whose grace has passed.
    ///
    /// # Errors
    /// [`KeyError`] for unreadable, world-readable or malformed files.
    pub fn open(dir: &Path, grace: Duration) -> Result<Self, KeyError> {
        crate::sandbox::create_private_dir_all(dir).map_err(io(dir))?;
        let ring_path = dir.join("keyring.json");
        let file = match read_own(&ring_path).map(|(bytes, _)| bytes) {
            Ok(bytes) => serde_json::from_slice::<RingFile>(&bytes).map_err(|e| {
                KeyError::Invalid(format!("{} is corrupt: {e}", ring_path.display()))
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let key = generate();
                let active = active_from(&key)?;
                Self::save_key(dir, &active.kid, &key)?;
                let file = RingFile {
                    active: active.kid.clone(),
                    retired: Vec::new(),
                };
                Self::save_ring(dir, &file)?;
                tracing::info!(kid = %active.kid, "generated the call-token signing key");
                file
            }
            Err(e) => return Err(io(&ring_path)(e)),
        };
        if file.active.contains(['/', '\\', '.']) || file.active.is_empty() {
            return Err(KeyError::Invalid(format!(
                "{}: bad active key id",
                ring_path.display()
            )));
        }
        let key = read_key(&dir.join(format!("{}.pem", file.active)), true)?;
        let active = active_from(&key)?;
        if active.kid != file.active {
            return Err(KeyError::Invalid(format!(
                "{}.pem does not hold the key its name says",
                file.active
            )));
        }
        let t = now();
        let retired: Vec<Retired> = file.retired.into_iter().filter(|r| r.until > t).collect();
        Ok(Self {
            dir: Some(dir.to_owned()),
            _held: None,
            grace,
            ring: RwLock::new(Ring { active, retired }),
            peers: RwLock::default(),
        })
    }

    /// [`KeyRing::open`] on `keys` in the data directory `data` holds: the
    /// directory is made and opened from `data`'s descriptor, refusing a
    /// link or a mount at `keys`, and held; the ring's files are reached
    /// through it, never through a link at their names.
    ///
    /// # Errors
    /// As [`KeyRing::open`]; a link or a mount at `keys`.
    pub fn open_in(
        data: &crate::sandbox::beneath::Root,
        grace: Duration,
    ) -> Result<Self, KeyError> {
        let at = data.path().join("keys");
        let keys = data.made_below(Path::new("keys")).map_err(io(&at))?;
        let mut ring = Self::open(&crate::sandbox::beneath::fd_path(keys.fd()), grace)?;
        ring._held = Some(keys);
        Ok(ring)
    }

    /// A ring holding one operator-supplied key (PKCS#8 PEM, mode 0600).
    ///
    /// # Errors
    /// [`KeyError`] as for [`KeyRing::open`].
    pub fn supplied(path: &Path) -> Result<Self, KeyError> {
        let key = read_key(path, false)?;
        Ok(Self {
            dir: None,
            _held: None,
            grace: Duration::ZERO,
            ring: RwLock::new(Ring {
                active: active_from(&key)?,
                retired: Vec::new(),
            }),
            peers: RwLock::default(),
        })
    }

    /// A ring with a fresh key held only in memory (tests, benchmarks,
    /// `bulkhead run`).
    pub fn ephemeral() -> Self {
        Self {
            dir: None,
            _held: None,
            grace: Duration::ZERO,
            ring: RwLock::new(Ring {
                active: active_from(&generate()).expect("a fresh key encodes"),
                retired: Vec::new(),
            }),
            peers: RwLock::default(),
        }
    }

    fn save_key(dir: &Path, kid: &str, key: &SigningKey) -> Result<(), KeyError> {
        let pem = key
            .to_pkcs8_pem(ed25519_dalek::pkcs8::spki::der::pem::LineEnding::LF)
            .map_err(|e| KeyError::Invalid(format!("cannot encode the key: {e}")))?;
        write_private(&dir.join(format!("{kid}.pem")), pem.as_bytes())
    }

    fn save_ring(dir: &Path, file: &RingFile) -> Result<(), KeyError> {
        let json = serde_json::to_vec_pretty(file).expect("the ring serializes");
        write_private(&dir.join("keyring.json"), &json)
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Ring> {
        self.ring.read().unwrap_or_else(|e| e.into_inner())
    }

    /// Signs `claims` with the active key: a JWS compact token with the
    /// header of [`call_header`] (what `jsonwebtoken::encode` produces),
    /// signed with the key held expanded in memory. `jsonwebtoken` would
    /// re-parse the PKCS#8 key and re-derive its public half on every
    /// call, doubling the cost of each outbound call's token.
    ///
    /// # Errors
    /// [`KeyError::Sign`] if the claims do not serialize.
    pub fn mint(&self, claims: &CallClaims) -> Result<String, KeyError> {
        use ed25519_dalek::Signer as _;
        let payload = serde_json::to_vec(claims).map_err(|e| KeyError::Sign(e.to_string()))?;
        let ring = self.read();
        let mut token = ring.active.header_prefix.clone();
        URL_SAFE_NO_PAD.encode_string(payload, &mut token);
        let signature = ring.active.key.sign(token.as_bytes());
        token.push('.');
        URL_SAFE_NO_PAD.encode_string(signature.to_bytes(), &mut token);
        Ok(token)
    }

    /// The id of the active key.
    pub fn active_kid(&self) -> String {
        self.read().active.kid.clone()
    }

    fn read_peers(&self) -> std::sync::RwLockReadGuard<'_, Vec<Peer>> {
        self.peers.read().unwrap_or_else(|e| e.into_inner())
    }

    /// The published keys: the active one, retired ones within their
    /// grace, and the live keys of the other nodes sharing the store (as
    /// last read from it).
    pub fn jwks(&self) -> JwkSet {
        let ring = self.read();
        let t = now();
        let mut keys = vec![ed25519_jwk(&ring.active.kid, &ring.active.public)];
        for r in ring.retired.iter().filter(|r| r.until > t) {
            if let Some(public) = decode_public(&r.x) {
                keys.push(ed25519_jwk(&r.kid, &public));
            }
        }
        let own = keys.len();
        for p in self.read_peers().iter().filter(|p| p.until > t) {
            if !keys[..own]
                .iter()
                .any(|k| k.common.key_id.as_deref() == Some(p.kid.as_str()))
            {
                keys.push(ed25519_jwk(&p.kid, &p.public));
            }
        }
        JwkSet { keys }
    }

    /// Every published key: this node's, then the other nodes'.
    pub fn list(&self) -> Vec<KeyInfo> {
        let ring = self.read();
        let t = now();
        let mut v = vec![KeyInfo {
            kid: ring.active.kid.clone(),
            active: true,
            retired_until: None,
            node: None,
        }];
        v.extend(
            ring.retired
                .iter()
                .filter(|r| r.until > t)
                .map(|r| KeyInfo {
                    kid: r.kid.clone(),
                    active: false,
                    retired_until: Some(r.until),
                    node: None,
                }),
        );
        let own = v.len();
        for p in self.read_peers().iter().filter(|p| p.until > t) {
            if !v[..own].iter().any(|k| k.kid == p.kid) {
                v.push(KeyInfo {
                    kid: p.kid.clone(),
                    active: p.active,
                    retired_until: (!p.active).then_some(p.until),
                    node: Some(p.node.clone()),
                });
            }
        }
        v
    }

    /// This node's public keys, to publish: the active one and the retired
    /// ones within their grace.
    pub fn own_keys(&self) -> Vec<OwnKey> {
        let ring = self.read();
        let t = now();
        let mut v = vec![OwnKey {
            kid: ring.active.kid.clone(),
            x: URL_SAFE_NO_PAD.encode(ring.active.public),
            retired_until: None,
        }];
        v.extend(ring.retired.iter().filter(|r| r.until > t).map(|r| OwnKey {
            kid: r.kid.clone(),
            x: r.x.clone(),
            retired_until: Some(r.until),
        }));
        v
    }

    /// Replaces the other nodes' keys with `keys` (this node's own among
    /// them are left out: the ring knows them better). A key whose id is
    /// not the thumbprint of its public key is skipped with a warning: a
    /// corrupt row is never served.
    pub fn set_peers(&self, keys: impl IntoIterator<Item = PeerKey>) {
        let own: Vec<String> = self.own_keys().into_iter().map(|k| k.kid).collect();
        let mut peers = Vec::new();
        for k in keys {
            if own.contains(&k.kid) {
                continue;
            }
            match decode_public(&k.x) {
                Some(public) if thumbprint(&public) == k.kid => peers.push(Peer {
                    kid: k.kid,
                    public,
                    active: k.active,
                    until: k.until,
                    node: k.node,
                }),
                _ => {
                    tracing::warn!(kid = %k.kid, node = %k.node, "a published key does not match its id: not served");
                }
            }
        }
        *self.peers.write().unwrap_or_else(|e| e.into_inner()) = peers;
    }

    /// Generates a new active key. The old one stops signing at once, its
    /// private half is deleted, and its public key stays in the JWKS for
    /// the grace period.
    ///
    /// # Errors
    /// [`KeyError`] if the ring is not host-managed or cannot be saved.
    pub fn rotate(&self) -> Result<KeyInfo, KeyError> {
        let Some(dir) = &self.dir else {
            return Err(KeyError::Invalid(
                "this key is supplied by the operator (tokens.signing_key) or held in memory; rotate it by replacing the file and restarting".into(),
            ));
        };
        let key = generate();
        let next = active_from(&key)?;
        let mut ring = self.ring.write().unwrap_or_else(|e| e.into_inner());
        Self::save_key(dir, &next.kid, &key)?;
        let t = now();
        let mut retired: Vec<Retired> = ring
            .retired
            .iter()
            .filter(|r| r.until > t)
            .cloned()
            .collect();
        retired.push(Retired {
            kid: ring.active.kid.clone(),
            x: URL_SAFE_NO_PAD.encode(ring.active.public),
            until: t + self.grace.as_secs(),
        });
        Self::save_ring(
            dir,
            &RingFile {
                active: next.kid.clone(),
                retired: retired.clone(),
            },
        )?;
        let old = dir.join(format!("{}.pem", ring.active.kid));
        if let Err(e) = std::fs::remove_file(&old) {
            tracing::warn!(path = %old.display(), error = %e, "cannot delete the retired private key");
        }
        tracing::info!(old = %ring.active.kid, new = %next.kid, "rotated the call-token signing key");
        let info = KeyInfo {
            kid: next.kid.clone(),
            active: true,
            retired_until: None,
            node: None,
        };
        *ring = Ring {
            active: next,
            retired,
        };
        Ok(info)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claims() -> CallClaims {
        let t = now();
        CallClaims {
            iss: "bulkhead".into(),
            aud: "palette".into(),
            sub: "alice".into(),
            tenant: "acme".into(),
            scopes: vec!["thumbnail:run".into()],
            job: "j".into(),
            module: "m".into(),
            iat: t,
            nbf: t,
            exp: t + 30,
            jti: "x".into(),
        }
    }

    fn verifier(jwks: &JwkSet) -> bulkhead_verify::Verifier {
        bulkhead_verify::Verifier::new(
            bulkhead_verify::VerifierConfig::new("bulkhead", "palette"),
            jwks,
        )
        .unwrap()
    }

    #[test]
    fn a_new_ring_is_private_and_survives_a_restart() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("keys");
        let ring = KeyRing::open(&dir, Duration::from_secs(60)).unwrap();
        let kid = ring.active_kid();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&dir), 0o700);
        assert_eq!(mode(&dir.join(format!("{kid}.pem"))), 0o600);
        assert_eq!(
            KeyRing::open(&dir, Duration::from_secs(60))
                .unwrap()
                .active_kid(),
            kid
        );
    }

    #[test]
    fn minted_tokens_verify_against_the_published_keys() {
        let ring = KeyRing::ephemeral();
        let token = ring.mint(&claims()).unwrap();
        let got = verifier(&ring.jwks()).verify(&token).unwrap();
        assert_eq!(got.sub, "alice");
    }

    #[test]
    fn minting_matches_jsonwebtoken_byte_for_byte() {
        let key = generate();
        let active = active_from(&key).unwrap();
        let ring = KeyRing {
            dir: None,
            _held: None,
            grace: Duration::ZERO,
            ring: RwLock::new(Ring {
                active,
                retired: Vec::new(),
            }),
            peers: RwLock::default(),
        };
        let der = key.to_pkcs8_der().unwrap();
        let reference = jsonwebtoken::encode(
            &call_header(&ring.active_kid()),
            &claims(),
            &jsonwebtoken::EncodingKey::from_ed_der(der.as_bytes()),
        )
        .unwrap();
        // Ed25519 signatures are deterministic: the same bytes or a bug.
        assert_eq!(ring.mint(&claims()).unwrap(), reference);
    }

    #[test]
    fn rotation_keeps_the_old_key_published_for_the_grace_only() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("keys");
        let ring = KeyRing::open(&dir, Duration::from_secs(60)).unwrap();
        let old_kid = ring.active_kid();
        let old_token = ring.mint(&claims()).unwrap();
        let info = ring.rotate().unwrap();
        assert_ne!(info.kid, old_kid);
        assert!(
            !dir.join(format!("{old_kid}.pem")).exists(),
            "retired private key deleted"
        );
        let jwks = ring.jwks();
        assert_eq!(jwks.keys.len(), 2);
        verifier(&jwks).verify(&old_token).unwrap();
        verifier(&jwks)
            .verify(&ring.mint(&claims()).unwrap())
            .unwrap();
        // After a restart the retired key is still published…
        let reopened = KeyRing::open(&dir, Duration::from_secs(60)).unwrap();
        assert_eq!(reopened.jwks().keys.len(), 2);
        // …and with no grace it is gone at once.
        let dir0 = tmp.path().join("keys0");
        let ring0 = KeyRing::open(&dir0, Duration::ZERO).unwrap();
        let token0 = ring0.mint(&claims()).unwrap();
        ring0.rotate().unwrap();
        assert_eq!(ring0.list().len(), 1);
        assert!(verifier(&ring0.jwks()).verify(&token0).is_err());
        let reopened = KeyRing::open(&dir0, Duration::ZERO).unwrap();
        assert_eq!(reopened.list().len(), 1);
    }

    #[test]
    fn another_nodes_keys_are_served_and_a_key_not_matching_its_id_is_not() {
        let a = KeyRing::ephemeral();
        let b = KeyRing::ephemeral();
        let token = b.mint(&claims()).unwrap();
        assert!(verifier(&a.jwks()).verify(&token).is_err());
        let peer = |ring: &KeyRing, until: u64| {
            let k = ring.own_keys().remove(0);
            PeerKey {
                kid: k.kid,
                x: k.x,
                active: true,
                until,
                node: "b-1".into(),
            }
        };
        let forged = PeerKey {
            kid: a.active_kid(),
            ..peer(&b, now() + 60)
        };
        let mismatched = PeerKey {
            kid: "not-its-thumbprint".into(),
            ..peer(&b, now() + 60)
        };
        a.set_peers([
            peer(&b, now() + 60),
            peer(&a, now() + 60),
            forged,
            mismatched,
        ]);
        let jwks = a.jwks();
        assert_eq!(jwks.keys.len(), 2, "its own key once, and b's");
        verifier(&jwks).verify(&token).unwrap();
        verifier(&jwks).verify(&a.mint(&claims()).unwrap()).unwrap();
        let listed = a.list();
        assert_eq!(listed.len(), 2);
        assert_eq!(listed[1].node.as_deref(), Some("b-1"));
        // A key past its time is not served, whatever the store said.
        a.set_peers([peer(&b, now() - 1)]);
        assert!(verifier(&a.jwks()).verify(&token).is_err());
    }

    #[test]
    fn a_world_readable_key_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("keys");
        let kid = KeyRing::open(&dir, Duration::ZERO).unwrap().active_kid();
        let pem = dir.join(format!("{kid}.pem"));
        std::fs::set_permissions(&pem, std::fs::Permissions::from_mode(0o644)).unwrap();
        let err = KeyRing::open(&dir, Duration::ZERO).unwrap_err().to_string();
        assert!(err.contains("chmod 600"), "{err}");
        let err = KeyRing::supplied(&pem).unwrap_err().to_string();
        assert!(err.contains("chmod 600"), "{err}");
    }
}
