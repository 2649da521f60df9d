//! Validated identifiers that appear in policies: module names, scopes,
//! parameter names, service names, digests. Each validates on deserialize so a
//! bad one is reported with its line and column.

use std::fmt;

use serde::{Deserialize, Serialize};

/// A name that breaks its rule: which kind of name, the value, and the rule.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("invalid {what} `{}`: {rule}", value.escape_debug())]
pub struct NameError {
    /// The kind of name (`module name`, `scope`, …).
    pub what: &'static str,
    /// The value given.
    pub value: String,
    /// The rule it broke.
    pub rule: NameRule,
}

/// The rule a [`NameError`]'s value broke.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum NameRule {
    /// Empty or longer than `max` bytes.
    #[error("must be 1 to {max} characters")]
    Length {
        /// The longest allowed.
        max: usize,
    },
    /// Does not start with a lowercase ASCII letter.
    #[error("must start with a lowercase letter")]
    FirstChar,
    /// Holds a character the kind of name does not allow.
    #[error("character `{}` is not allowed", .0.escape_debug())]
    Char(char),
    /// Not 64 lowercase hex characters.
    #[error("expected 64 lowercase hex characters")]
    Hex,
}

/// Defines a `String` newtype checked by `$check` (which returns the rule
/// the value breaks) on construction and on deserialize.
macro_rules! validated_name {
    ($(#[$doc:meta])* $name:ident, $what:literal, $check:expr) => {
        $(#[$doc])*
        #[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize, Serialize)]
        #[serde(try_from = "String", into = "String")]
        pub struct $name(String);

        impl $name {
            /// Validates `s`.
            ///
            /// # Errors
            /// A [`NameError`] naming the bad value and the rule it broke.
            pub fn new(s: impl Into<String>) -> Result<Self, NameError> {
                let s = s.into();
                let check: fn(&str) -> Result<(), NameRule> = $check;
                match check(&s) {
                    Ok(()) => Ok(Self(s)),
                    Err(rule) => Err(NameError { what: $what, value: s, rule }),
                }
            }

            /// The validated string.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl TryFrom<String> for $name {
            type Error = NameError;
            fn try_from(s: String) -> Result<Self, NameError> {
                Self::new(s)
            }
        }

        impl From<$name> for String {
            fn from(n: $name) -> String {
                n.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
    };
}

fn slug(s: &str, max: usize, extra: &[char]) -> Result<(), NameRule> {
    if s.is_empty() || s.len() > max {
        return Err(NameRule::Length { max });
    }
    if !s.starts_with(|c: char| c.is_ascii_lowercase()) {
        return Err(NameRule::FirstChar);
    }
    if let Some(c) = s
        .chars()
        .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '-' || extra.contains(c)))
    {
        return Err(NameRule::Char(c));
    }
    Ok(())
}

validated_name!(
    /// A module's name: lowercase letters, digits and `-`, starting with a
    /// letter, at most 63 characters (it appears in URLs and file names).
    ModuleName,
    "module name",
    |s| slug(s, 63, &[])
);

validated_name!(
    /// An access scope such as `thumbnail:run`.
    Scope,
    "scope",
    |s| slug(s, 128, &[':', '.', '_'])
);

validated_name!(
    /// A job parameter name; it reaches the guest as `--name=value`, or where
    /// the policy's `args` template places it (`{param.NAME}`).
    ParamName,
    "parameter name",
    |s| slug(s, 64, &['_'])
);

validated_name!(
    /// The name of an internal service declared in the host config.
    ServiceName,
    "service name",
    |s| slug(s, 63, &[])
);

validated_name!(
    /// A lowercase hex SHA-256 digest (64 characters).
    Sha256Hex,
    "sha256 digest",
    |s| {
        if s.len() == 64 && s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) {
            Ok(())
        } else {
            Err(NameRule::Hex)
        }
    }
);

impl Sha256Hex {
    /// The digest of `bytes`.
    pub fn digest(bytes: &[u8]) -> Self {
        use sha2::{Digest, Sha256};
        Self(hex::encode(Sha256::digest(bytes)))
    }
}

/// The trust zone a module runs in. Zones decide which worker pool runs a
/// module once execution moves out of the gateway process; in-process they
/// are recorded in every report.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Zone {
    /// Code from outside the organisation, or code parsing hostile input.
    Untrusted,
    /// Code the organisation builds and reviews itself.
    FirstParty,
}

impl fmt::Display for Zone {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Zone::Untrusted => "untrusted",
            Zone::FirstParty => "first-party",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_name_the_bad_value() {
        let err = ModuleName::new("Thumb Nail").unwrap_err();
        assert_eq!(
            err.to_string(),
            "invalid module name `Thumb Nail`: must start with a lowercase letter"
        );
        assert_eq!(err.rule, NameRule::FirstChar);
        let err = ModuleName::new("thumb/../nail").unwrap_err();
        assert_eq!(err.rule, NameRule::Char('/'));
        assert!(err.to_string().contains("character `/`"), "{err}");
        assert_eq!(
            ParamName::new("").unwrap_err().to_string(),
            "invalid parameter name ``: must be 1 to 64 characters"
        );
        assert!(ModuleName::new("thumbnail-2").is_ok());
        assert!(Scope::new("thumbnail:run").is_ok());
        assert!(Sha256Hex::new("ABC").is_err());
    }
}
