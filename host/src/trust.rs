//! Signed modules: a policy may require that its module carry a
//! [minisign](https://jedisct1.github.io/minisign/) signature by a key the
//! host trusts, checked on the module's bytes before anything parses or
//! compiles them.
//!
//! The host names its keys in config (`[trust.keys]`, a name per minisign
//! public key, as `minisign -G` prints it); a policy lists the names it
//! accepts (`[module] signed_by = ["release"]`). The signature is the
//! standard `<module>.wasm.minisig` file next to the module, made with
//! `minisign -S -m <module>.wasm` (or any minisign-compatible signer).
//! Only the current, pre-hashed signature format is accepted (not the
//! legacy one), and the trusted comment is shown, never trusted for
//! anything.

use std::collections::BTreeMap;

use minisign_verify::{PublicKey, Signature};

use crate::policy::Policy;

/// Where a module's signature lies: `<module file>.minisig` beside it.
pub fn signature_path(wasm: &std::path::Path) -> std::path::PathBuf {
    let mut path = wasm.as_os_str().to_owned();
    path.push(".minisig");
    path.into()
}

/// Largest signature file read (a minisign signature is about 300 bytes).
pub const MAX_SIGNATURE: u64 = 4096;

/// A key in `[trust.keys]` that is not a minisign public key.
#[derive(Debug, thiserror::Error)]
#[error(
    "[trust.keys] {name}: not a minisign public key ({reason}); give the base64 line `minisign -G` prints (RW…)"
)]
pub struct KeyError {
    /// The key's name.
    pub name: String,
    /// What was wrong.
    pub reason: String,
}

/// Why a module's signature is not accepted.
#[derive(Debug, thiserror::Error)]
pub enum SignatureError {
    /// The policy names a key the host does not trust.
    #[error(
        "module {module}: its policy requires a signature by {key:?}, which is not a key this host trusts ([trust.keys] has {known})"
    )]
    UnknownKey {
        /// The module.
        module: String,
        /// The name in `signed_by`.
        key: String,
        /// The host's key names.
        known: String,
    },
    /// No signature came with the module.
    #[error(
        "module {module}: its policy requires a signature by {keys}, and there is none ({expected})"
    )]
    Missing {
        /// The module.
        module: String,
        /// The accepted keys.
        keys: String,
        /// Where it was looked for.
        expected: String,
    },
    /// The signature file is not a minisign signature.
    #[error("module {module}: {file} is not a minisign signature ({reason})")]
    Malformed {
        /// The module.
        module: String,
        /// Where it came from.
        file: String,
        /// What was wrong.
        reason: String,
    },
    /// The signature does not verify under any accepted key.
    #[error(
        "module {module}: the signature in {file} is not a valid signature of these bytes by {keys} ({reason})"
    )]
    Invalid {
        /// The module.
        module: String,
        /// Where it came from.
        file: String,
        /// The accepted keys.
        keys: String,
        /// The last key's reason.
        reason: String,
    },
}

/// What the check found, for `bulkhead check` and logs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// The policy requires no signature.
    NotRequired,
    /// Signed by the named trusted key.
    Signed {
        /// The key's name in `[trust.keys]`.
        key: String,
        /// The signature's trusted comment (shown, not relied on).
        comment: String,
    },
}

impl std::fmt::Display for Verdict {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Verdict::NotRequired => f.write_str("not required by the policy"),
            Verdict::Signed { key, comment } => {
                write!(f, "valid, signed by {key:?} ({comment})")
            }
        }
    }
}

/// The keys this host trusts, by name.
#[derive(Clone, Default)]
pub struct TrustedKeys {
    keys: BTreeMap<String, PublicKey>,
}

impl std::fmt::Debug for TrustedKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.keys.keys()).finish()
    }
}

impl TrustedKeys {
    /// Parses `[trust.keys]`.
    ///
    /// # Errors
    /// [`KeyError`] for the first value that is not a minisign public key.
    pub fn new(keys: &BTreeMap<String, String>) -> Result<Self, KeyError> {
        let keys = keys
            .iter()
            .map(|(name, b64)| {
                PublicKey::from_base64(b64.trim())
                    .map(|key| (name.clone(), key))
                    .map_err(|e| KeyError {
                        name: name.clone(),
                        reason: e.to_string(),
                    })
            })
            .collect::<Result<_, _>>()?;
        Ok(Self { keys })
    }

    /// The names of the keys.
    pub fn names(&self) -> Vec<&str> {
        self.keys.keys().map(String::as_str).collect()
    }

    fn known(&self) -> String {
        if self.keys.is_empty() {
            "no keys".to_owned()
        } else {
            self.names().join(", ")
        }
    }

    /// Checks that every key `policy` accepts is trusted here (at start,
    /// before any module is read).
    ///
    /// # Errors
    /// [`SignatureError::UnknownKey`] for the first name that is not.
    pub fn check_policy(&self, policy: &Policy) -> Result<(), SignatureError> {
        for key in &policy.module.signed_by {
            if !self.keys.contains_key(key) {
                return Err(SignatureError::UnknownKey {
                    module: policy.module.name.to_string(),
                    key: key.clone(),
                    known: self.known(),
                });
            }
        }
        Ok(())
    }

    /// Checks `wasm` against what `policy` requires: a `signature` (the
    /// text of a `.minisig` file, `source` naming where it came from, or
    /// where it was looked for when `None`) by one of its `signed_by` keys.
    ///
    /// # Errors
    /// [`SignatureError`] naming the module and what is wrong.
    pub fn verify(
        &self,
        policy: &Policy,
        wasm: &[u8],
        signature: Option<&str>,
        source: &str,
    ) -> Result<Verdict, SignatureError> {
        let accepted = &policy.module.signed_by;
        if accepted.is_empty() {
            return Ok(Verdict::NotRequired);
        }
        self.check_policy(policy)?;
        let module = policy.module.name.to_string();
        let keys = accepted.join(" or ");
        let Some(text) = signature else {
            return Err(SignatureError::Missing {
                module,
                keys,
                expected: source.to_owned(),
            });
        };
        let signature = Signature::decode(text).map_err(|e| SignatureError::Malformed {
            module: module.clone(),
            file: source.to_owned(),
            reason: e.to_string(),
        })?;
        let mut reason = String::new();
        for name in accepted {
            // Present: `check_policy` above.
            let key = &self.keys[name];
            match key.verify(wasm, &signature, false) {
                Ok(()) => {
                    return Ok(Verdict::Signed {
                        key: name.clone(),
                        comment: signature.trusted_comment().to_owned(),
                    });
                }
                Err(e) => reason = format!("{name}: {e}"),
            }
        }
        Err(SignatureError::Invalid {
            module,
            file: source.to_owned(),
            keys,
            reason,
        })
    }
}

/// Reads the signature beside a module file, if there is one, bounded.
///
/// # Errors
/// An I/O error other than the file not existing, or a file larger than
/// [`MAX_SIGNATURE`] or not UTF-8.
pub fn read_signature(path: &std::path::Path) -> std::io::Result<Option<String>> {
    use std::io::Read;
    let file = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let mut text = String::new();
    file.take(MAX_SIGNATURE + 1).read_to_string(&mut text)?;
    if text.len() as u64 > MAX_SIGNATURE {
        return Err(std::io::Error::other(format!(
            "{} is larger than {MAX_SIGNATURE} bytes",
            path.display()
        )));
    }
    Ok(Some(text))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::{ModuleName, Sha256Hex};

    struct Signer {
        public: String,
        secret: minisign::SecretKey,
    }

    fn signer() -> Signer {
        let minisign::KeyPair { pk, sk } =
            minisign::KeyPair::generate_unencrypted_keypair().unwrap();
        Signer {
            public: pk.to_base64(),
            secret: sk,
        }
    }

    impl Signer {
        fn sign(&self, bytes: &[u8]) -> String {
            minisign::sign(None, &self.secret, bytes, Some("file:m.wasm"), None)
                .unwrap()
                .to_string()
        }
    }

    fn policy(signed_by: &[&str]) -> Policy {
        let toml = format!(
            "version = 1\n[module]\nname = \"m\"\nsha256 = \"{}\"\nsigned_by = {:?}\n",
            Sha256Hex::digest(b"module"),
            signed_by
        );
        let policy: Policy = toml::from_str(&toml).unwrap();
        assert_eq!(policy.module.name, ModuleName::new("m").unwrap());
        policy
    }

    fn keys(pairs: &[(&str, &Signer)]) -> TrustedKeys {
        TrustedKeys::new(
            &pairs
                .iter()
                .map(|(n, s)| ((*n).to_owned(), s.public.clone()))
                .collect(),
        )
        .unwrap()
    }

    #[test]
    fn a_module_signed_by_an_accepted_key_passes_and_says_by_whom() {
        let (release, other) = (signer(), signer());
        let trusted = keys(&[("release", &release), ("other", &other)]);
        let sig = release.sign(b"module");
        let verdict = trusted
            .verify(
                &policy(&["other", "release"]),
                b"module",
                Some(&sig),
                "m.wasm.minisig",
            )
            .unwrap();
        match verdict {
            Verdict::Signed { key, comment } => {
                assert_eq!(key, "release");
                assert_eq!(comment, "file:m.wasm");
            }
            v => panic!("{v:?}"),
        }
    }

    #[test]
    fn changed_bytes_a_missing_or_foreign_signature_are_refused() {
        let (release, stranger) = (signer(), signer());
        let trusted = keys(&[("release", &release)]);
        let p = policy(&["release"]);
        let sig = release.sign(b"module");
        let err = trusted
            .verify(&p, b"modulE", Some(&sig), "m.wasm.minisig")
            .unwrap_err();
        assert!(matches!(err, SignatureError::Invalid { .. }), "{err}");
        let err = trusted
            .verify(&p, b"module", None, "m.wasm.minisig")
            .unwrap_err();
        assert!(err.to_string().contains("m.wasm.minisig"), "{err}");
        assert!(matches!(err, SignatureError::Missing { .. }), "{err}");
        let foreign = stranger.sign(b"module");
        let err = trusted
            .verify(&p, b"module", Some(&foreign), "m.wasm.minisig")
            .unwrap_err();
        assert!(matches!(err, SignatureError::Invalid { .. }), "{err}");
        let err = trusted
            .verify(&p, b"module", Some("not a signature"), "m.wasm.minisig")
            .unwrap_err();
        assert!(matches!(err, SignatureError::Malformed { .. }), "{err}");
    }

    #[test]
    fn a_policy_naming_an_untrusted_key_is_refused_and_no_key_is_needed_without_signed_by() {
        let release = signer();
        let trusted = keys(&[("release", &release)]);
        let err = trusted.check_policy(&policy(&["nightly"])).unwrap_err();
        assert!(err.to_string().contains("\"nightly\""), "{err}");
        assert!(err.to_string().contains("release"), "{err}");
        // A signature by a trusted key the policy does not accept is not
        // enough, nor is the policy's key unknown to an empty host.
        assert!(
            TrustedKeys::default()
                .check_policy(&policy(&["release"]))
                .is_err()
        );
        assert_eq!(
            TrustedKeys::default()
                .verify(&policy(&[]), b"anything", None, "-")
                .unwrap(),
            Verdict::NotRequired
        );
        let bad = TrustedKeys::new(&[("x".to_owned(), "RWnotakey".to_owned())].into()).unwrap_err();
        assert!(bad.to_string().contains("[trust.keys] x"), "{bad}");
    }
}
