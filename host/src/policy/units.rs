//! Human-unit newtypes used by policies: byte sizes ("64 MiB") and durations
//! ("2 s"). They validate while deserializing, so a bad value is reported by
//! the TOML parser with the file's line and column.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// A byte size or duration that does not parse, naming the value.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum UnitError {
    /// A byte size given without a unit.
    #[error("invalid byte size `{0}`: a unit is required, for example \"64 MiB\"")]
    SizeWithoutUnit(String),
    /// A byte size that is not a number and a unit.
    #[error("invalid byte size `{0}`: expected a number and a unit such as B, KiB, MiB, GiB")]
    Size(String),
    /// A duration that is not a number and a unit.
    #[error("invalid duration `{0}`: expected a number and a unit such as ms, s, min")]
    Duration(String),
    /// A duration of zero.
    #[error("invalid duration `{0}`: must be greater than zero")]
    ZeroDuration(String),
}

/// A byte count written with a unit: `"64 MiB"`, `"512 KiB"`, `"1 GiB"`,
/// `"100 B"`. `KiB`/`MiB`/`GiB` are powers of 1024, `KB`/`MB`/`GB` powers of
/// 1000. A bare number is refused so that `memory = "64"` cannot silently
/// mean 64 bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize, Serialize)]
#[serde(try_from = "String", into = "String")]
pub struct ByteSize(u64);

impl ByteSize {
    /// A size of exactly `bytes` bytes.
    pub const fn bytes(bytes: u64) -> Self {
        Self(bytes)
    }

    /// A size of `n` KiB.
    pub const fn kib(n: u64) -> Self {
        Self(n * 1024)
    }

    /// A size of `n` MiB.
    pub const fn mib(n: u64) -> Self {
        Self(n * 1024 * 1024)
    }

    /// A size of `n` GiB.
    pub const fn gib(n: u64) -> Self {
        Self(n * 1024 * 1024 * 1024)
    }

    /// The size in bytes.
    pub const fn as_u64(self) -> u64 {
        self.0
    }

    /// The size in bytes, saturated to `usize`.
    pub fn as_usize(self) -> usize {
        usize::try_from(self.0).unwrap_or(usize::MAX)
    }
}

impl FromStr for ByteSize {
    type Err = UnitError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let trimmed = s.trim();
        let has_unit = trimmed.chars().any(|c| c.is_ascii_alphabetic());
        if !has_unit {
            return Err(UnitError::SizeWithoutUnit(s.to_owned()));
        }
        trimmed
            .parse::<bytesize::ByteSize>()
            .map(|b| Self(b.as_u64()))
            .map_err(|_| UnitError::Size(s.to_owned()))
    }
}

impl TryFrom<String> for ByteSize {
    type Error = UnitError;

    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<ByteSize> for String {
    fn from(b: ByteSize) -> String {
        b.to_string()
    }
}

impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const UNITS: [(&str, u64); 3] = [("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)];
        for (name, size) in UNITS {
            if self.0 >= size && self.0.is_multiple_of(size) {
                return write!(f, "{} {name}", self.0 / size);
            }
        }
        write!(f, "{} B", self.0)
    }
}

/// A duration written with a unit: `"2 s"`, `"500 ms"`, `"1 min"`. Zero is
/// refused: every limit must allow something to run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize, Serialize)]
#[serde(try_from = "String", into = "String")]
pub struct HumanDuration(Duration);

impl HumanDuration {
    /// A duration of `secs` seconds.
    pub const fn secs(secs: u64) -> Self {
        Self(Duration::from_secs(secs))
    }

    /// A duration of `ms` milliseconds.
    pub const fn millis(ms: u64) -> Self {
        Self(Duration::from_millis(ms))
    }

    /// The wrapped duration.
    pub const fn get(self) -> Duration {
        self.0
    }
}

impl FromStr for HumanDuration {
    type Err = UnitError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        // humantime wants "2s"; policies read better as "2 s", so glue a
        // number to the unit that follows it.
        let compact: String = s.split_whitespace().collect();
        let d =
            humantime::parse_duration(&compact).map_err(|_| UnitError::Duration(s.to_owned()))?;
        if d.is_zero() {
            return Err(UnitError::ZeroDuration(s.to_owned()));
        }
        Ok(Self(d))
    }
}

impl TryFrom<String> for HumanDuration {
    type Error = UnitError;

    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<HumanDuration> for String {
    fn from(d: HumanDuration) -> String {
        d.to_string()
    }
}

impl fmt::Display for HumanDuration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ms = self.0.as_millis();
        if ms.is_multiple_of(60_000) {
            write!(f, "{} min", ms / 60_000)
        } else if ms.is_multiple_of(1000) {
            write!(f, "{} s", ms / 1000)
        } else {
            write!(f, "{ms} ms")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_sizes_parse_binary_and_decimal_units() {
        assert_eq!("64 MiB".parse::<ByteSize>().unwrap(), ByteSize::mib(64));
        assert_eq!("64MiB".parse::<ByteSize>().unwrap(), ByteSize::mib(64));
        assert_eq!("1 KB".parse::<ByteSize>().unwrap(), ByteSize::bytes(1000));
        assert_eq!("100 B".parse::<ByteSize>().unwrap(), ByteSize::bytes(100));
    }

    #[test]
    fn byte_sizes_without_unit_or_garbage_are_refused() {
        for bad in ["64", "", "lots", "64 parsecs", "-1 MiB"] {
            let err = bad.parse::<ByteSize>().unwrap_err().to_string();
            assert!(err.contains(&format!("`{bad}`")), "{err}");
        }
    }

    #[test]
    fn durations_parse_with_or_without_space() {
        assert_eq!(
            "2 s".parse::<HumanDuration>().unwrap(),
            HumanDuration::secs(2)
        );
        assert_eq!(
            "500ms".parse::<HumanDuration>().unwrap(),
            HumanDuration::millis(500)
        );
        assert_eq!(
            "1 min".parse::<HumanDuration>().unwrap(),
            HumanDuration::secs(60)
        );
    }

    #[test]
    fn zero_and_garbage_durations_are_refused() {
        for bad in ["0 s", "2", "soon", "2 fortnights"] {
            assert!(bad.parse::<HumanDuration>().is_err(), "{bad}");
        }
        assert_eq!(
            "0 s".parse::<HumanDuration>(),
            Err(UnitError::ZeroDuration("0 s".into()))
        );
    }

    #[test]
    fn display_round_trips() {
        for s in ["64 MiB", "1 GiB", "100 B", "2 s", "500 ms", "1 min"] {
            let shown = if s.ends_with('B') {
                s.parse::<ByteSize>().unwrap().to_string()
            } else {
                s.parse::<HumanDuration>().unwrap().to_string()
            };
            assert_eq!(shown, s);
        }
    }
}
