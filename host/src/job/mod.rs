//! What a job is and what it yields, as plain data: the [`JobSpec`] a
//! runner is handed, the [`JobReport`] it hands back, and the report's
//! parts ([`LimitKind`], [`FailureKind`], [`Measurements`], the outbound
//! [`CallsReport`]), plus the [`egress`] seam through which a running job's
//! outbound requests leave.
//!
//! Nothing here names wasmtime or the relay
//! (`structure::module_boundaries_hold_in_the_source`): the sandbox runs a
//! spec, the service stores a report, and either can move to another
//! process without taking the other's types along.

pub mod egress;
mod report;

use std::collections::BTreeMap;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

pub use egress::{CallRecord, CallsReport};
pub use report::{
    Backtrace, BacktraceFrame, Captured, Failure, FailureKind, HEAVY_REPORT, HELD_PER_BYTE,
    JobReport, LimitKind, MAX_BACKTRACE_FRAMES, MAX_FRAME_NAME, Measurements, Outcome, OutputFile,
    ReportSummary, SkippedOutput, answers_share, largest_report,
};

/// Most input files one job may have.
pub const MAX_INPUTS: usize = 64;
/// Longest parameter value, in bytes.
pub const MAX_PARAM_VALUE: usize = 4096;

/// One named input file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobInput {
    /// File name inside `/in`; see [`validate_input_name`].
    pub name: String,
    /// Content.
    #[serde(with = "bytes_serde")]
    pub data: Bytes,
}

/// Everything a job brings: inputs, parameters, stdin. Plain data: no
/// identity and no callback, so it can be handed to another process as
/// it is (it serializes; `Bytes` as a byte sequence).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobSpec {
    /// Identifier used in the report and logs.
    pub id: String,
    /// Files placed in `/in`.
    pub inputs: Vec<JobInput>,
    /// Parameters; each must be listed in the policy's `run.params`.
    pub params: BTreeMap<String, String>,
    /// Bytes readable on stdin.
    #[serde(with = "bytes_serde")]
    pub stdin: Bytes,
}

impl JobSpec {
    /// A spec with a fresh random id and nothing else.
    pub fn new() -> Self {
        Self {
            id: uuid::Uuid::new_v4().to_string(),
            ..Self::default()
        }
    }
}

/// The longest input name: a file name's 255 bytes, less the blob store's
/// `in-` before it (found by an attacker: names of 253 to 255 bytes were
/// accepted, then failed with a 500 when stored).
pub const MAX_INPUT_NAME: usize = 252;

/// Checks an input file name: 1 to [`MAX_INPUT_NAME`] bytes of
/// `A-Z a-z 0-9 . _ -`, not starting with `.`. Names are a flat
/// namespace; there are no subdirectories in `/in`.
///
/// # Errors
/// A message naming the bad value.
pub fn validate_input_name(name: &str) -> Result<(), String> {
    let ok_chars = name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if name.is_empty() || name.len() > MAX_INPUT_NAME || name.starts_with('.') || !ok_chars {
        return Err(format!(
            "invalid input name `{}`: use 1 to {MAX_INPUT_NAME} characters of A-Z a-z 0-9 . _ -, not starting with `.`",
            name.escape_debug()
        ));
    }
    Ok(())
}

/// `Bytes` as a serde byte sequence (the `bytes` crate's own serde support
/// is a feature this workspace does not enable).
mod bytes_serde {
    use bytes::Bytes;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(data: &Bytes, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(data)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Bytes, D::Error> {
        Ok(Bytes::from(Vec::<u8>::deserialize(d)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn input_names_are_flat_and_plain() {
        assert!(validate_input_name("photo.PNG").is_ok());
        let longest = "n".repeat(MAX_INPUT_NAME);
        assert!(validate_input_name(&longest).is_ok());
        let too_long = "n".repeat(MAX_INPUT_NAME + 1);
        for bad in ["", ".hidden", "../x", "a/b", "a\0b", "ünï", &too_long] {
            assert!(validate_input_name(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn a_spec_is_plain_data_that_round_trips_through_serde() {
        let mut spec = JobSpec::new();
        spec.inputs.push(JobInput {
            name: "in.txt".into(),
            data: Bytes::from_static(b"\x00bytes"),
        });
        spec.params.insert("width".into(), "64".into());
        spec.stdin = Bytes::from_static(b"stdin");
        let json = serde_json::to_string(&spec).unwrap();
        assert_eq!(serde_json::from_str::<JobSpec>(&json).unwrap(), spec);
    }
}
