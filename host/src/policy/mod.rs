//! Policies: one TOML file per module saying what its guest may touch and how
//! much it may use. This module turns TOML into a typed, validated [`Policy`].
//!
//! It knows nothing about wasmtime: the sandbox reads a `Policy`, never the
//! other way round. Deny by default: every capability absent from the file is
//! absent from the guest, and every unknown key is an error. Errors name the
//! file, the line and column, and the bad value.

pub mod args;
mod names;
mod units;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

pub use args::ArgEntry;
pub use names::{ModuleName, NameError, NameRule, ParamName, Scope, ServiceName, Sha256Hex, Zone};
pub use units::{ByteSize, HumanDuration, UnitError};

/// The only policy format version this host understands.
pub const POLICY_VERSION: u32 = 1;

/// A validated module policy. See `policies/README.md` for the schema.
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Policy {
    /// Format version; must be [`POLICY_VERSION`].
    pub version: u32,
    /// Which module this policy is for.
    pub module: ModuleSection,
    /// Who may submit jobs.
    #[serde(default)]
    pub access: Access,
    /// Resource limits; each absent limit takes its documented default.
    #[serde(default)]
    pub limits: Limits,
    /// Arguments, environment and accepted job parameters.
    #[serde(default)]
    pub run: Run,
    /// Internal services the guest may call through the host.
    #[serde(default)]
    pub network: Network,
    /// SHA-256 of the policy file's bytes, for audit records.
    #[serde(skip)]
    pub source_sha256: Option<Sha256Hex>,
}

/// `[module]`: the module's identity and pin.
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ModuleSection {
    /// The module's name, as used in the API.
    pub name: ModuleName,
    /// The module's SHA-256. A module whose digest differs is refused before
    /// it is compiled: this guards against a swapped or tampered binary.
    pub sha256: Sha256Hex,
    /// Trust zone; defaults to `untrusted`.
    #[serde(default = "default_zone")]
    pub zone: Zone,
    /// Keys (names in the host's `[trust.keys]`) one of which must have
    /// signed the module; empty: no signature required (see `trust`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub signed_by: Vec<String>,
}

fn default_zone() -> Zone {
    Zone::Untrusted
}

/// `[access]`: scopes allowed to submit jobs. Empty means nobody may.
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Access {
    /// A caller needs one of these scopes to submit jobs to the module.
    #[serde(default)]
    pub scopes: Vec<Scope>,
}

/// `[limits]`: what one job may use. The defaults are deliberately small.
///
/// | key | default | guards against |
/// |---|---|---|
/// | `memory` | 64 MiB | memory exhaustion: all linear memories together |
/// | `table_elements` | 10000 | table growth used as a memory bomb |
/// | `cpu_time` | 2 s | busy loops: guest execution time |
/// | `wall_time` | 10 s | sleeps and blocking waits in host calls |
/// | `output` | 16 MiB | disk exhaustion through `/out` (apparent size, holes count) |
/// | `output_files` | 32 | inode exhaustion: files, directories and links created in `/out` |
/// | `stdout` | 1 MiB | host memory exhaustion through captured stdout |
/// | `stderr` | 64 KiB | the same through stderr |
/// | `input` | 64 MiB | oversized job inputs (files and stdin together) |
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Total linear memory of all the guest's memories.
    pub memory: ByteSize,
    /// Total elements of all the guest's tables.
    pub table_elements: u32,
    /// Guest execution time (measured at the epoch tick's resolution).
    pub cpu_time: HumanDuration,
    /// The whole job, host calls included.
    pub wall_time: HumanDuration,
    /// Bytes the guest may add to `/out`.
    pub output: ByteSize,
    /// Entries (files, directories, links) the guest may create in `/out`.
    pub output_files: u32,
    /// Captured stdout.
    pub stdout: ByteSize,
    /// Captured stderr.
    pub stderr: ByteSize,
    /// Job inputs: all input files plus stdin.
    pub input: ByteSize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            memory: ByteSize::mib(64),
            table_elements: 10_000,
            cpu_time: HumanDuration::secs(2),
            wall_time: HumanDuration::secs(10),
            output: ByteSize::mib(16),
            output_files: 32,
            stdout: ByteSize::mib(1),
            stderr: ByteSize::kib(64),
            input: ByteSize::mib(64),
        }
    }
}

/// `[run]`: what the guest sees as arguments and environment.
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Run {
    /// Arguments after `argv[0]` (the module name): literal strings, or
    /// templates placing parameters and the guest paths of inputs and
    /// outputs, each entry exactly one argv entry; arrays are groups
    /// dropped together when something they place is absent ([`args`]).
    #[serde(default)]
    pub args: Vec<ArgEntry>,
    /// Literal environment variables. The host's environment never reaches a
    /// guest; these are the only variables it sees.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Job parameters the module accepts; each reaches the guest as
    /// `--name=value` after the fixed arguments, or, when `args` is a
    /// template, only where it places them. Any other parameter is
    /// refused.
    #[serde(default)]
    pub params: Vec<ParamName>,
    /// Keeps the guest's stdout as the output file `/out/<name>` instead of
    /// capturing it: bounded by `limits.output` like any write to `/out`
    /// (not by `limits.stdout`), counted as one of `limits.output_files`,
    /// and listed with the other outputs. A flat name (`A-Z a-z 0-9 . _ -`,
    /// not starting with `.`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stdout: Option<String>,
}

impl Run {
    /// Whether `args` is a template (places something): then parameters
    /// reach the guest only where it places them.
    pub fn is_template(&self) -> bool {
        self.args.iter().flat_map(ArgEntry::strings).any(|a| {
            args::parse(a).is_ok_and(|pieces| pieces.iter().any(args::Piece::is_placeholder))
        })
    }
}

/// `[network]`: internal services reachable through the host.
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Network {
    /// Names of services declared in the host config. Empty: no way out.
    #[serde(default)]
    pub services: Vec<ServiceName>,
}

/// Why a policy could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    /// The file could not be read.
    #[error("cannot read policy `{}`: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The file is not valid TOML, has an unknown key, or a value is malformed.
    #[error("{}:{line}:{column}: {message}", path.display())]
    Syntax {
        path: PathBuf,
        line: usize,
        column: usize,
        message: String,
    },
    /// The file parsed but a value breaks a rule that spans fields.
    #[error("{}:{line}:{column}: {message}", path.display())]
    Invalid {
        path: PathBuf,
        line: usize,
        column: usize,
        message: String,
    },
}

impl Policy {
    /// Reads and validates the policy at `path`.
    ///
    /// # Errors
    /// [`PolicyError`] naming the file, and for content errors the line,
    /// column and bad value.
    pub fn load(path: &Path) -> Result<Self, PolicyError> {
        Self::load_with(path, &[])
    }

    /// As [`Policy::load`], on a host that declares the internal services
    /// `declared`: `[network] services` may name only those.
    ///
    /// # Errors
    /// As for [`Policy::load`].
    pub fn load_with(path: &Path, declared: &[ServiceName]) -> Result<Self, PolicyError> {
        let source = std::fs::read_to_string(path).map_err(|source| PolicyError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse_with(&source, path, declared)
    }

    /// Parses and validates policy text; `path` is only used in errors. The
    /// host declares no internal services (see [`Policy::parse_with`]).
    ///
    /// # Errors
    /// As for [`Policy::load`].
    pub fn parse(source: &str, path: &Path) -> Result<Self, PolicyError> {
        Self::parse_with(source, path, &[])
    }

    /// Parses and validates policy text for a host declaring `declared`.
    ///
    /// # Errors
    /// As for [`Policy::load`].
    pub fn parse_with(
        source: &str,
        path: &Path,
        declared: &[ServiceName],
    ) -> Result<Self, PolicyError> {
        let mut policy: Policy = toml::from_str(source).map_err(|e| {
            let (line, column) = e
                .span()
                .map(|s| line_col(source, s.start))
                .unwrap_or((1, 1));
            PolicyError::Syntax {
                path: path.to_owned(),
                line,
                column,
                message: e.message().trim_end().to_owned(),
            }
        })?;
        policy.validate(declared).map_err(|(table, key, message)| {
            let (line, column) = locate_key(source, table, key);
            PolicyError::Invalid {
                path: path.to_owned(),
                line,
                column,
                message,
            }
        })?;
        policy.source_sha256 = Some(Sha256Hex::digest(source.as_bytes()));
        Ok(policy)
    }

    /// Rules that involve more than one value, or values whose type alone
    /// cannot carry the rule. Returns the table, key and message of the first
    /// broken rule.
    fn validate(
        &self,
        declared: &[ServiceName],
    ) -> Result<(), (&'static str, &'static str, String)> {
        if self.version != POLICY_VERSION {
            return Err((
                "",
                "version",
                format!(
                    "unsupported policy version `{}`: this host understands version {POLICY_VERSION}",
                    self.version
                ),
            ));
        }
        let l = &self.limits;
        if l.cpu_time > l.wall_time {
            return Err((
                "limits",
                "cpu_time",
                format!(
                    "cpu_time `{}` is longer than wall_time `{}`: the wall-clock limit would always fire first",
                    l.cpu_time, l.wall_time
                ),
            ));
        }
        for (key, size) in [
            ("memory", l.memory),
            ("stdout", l.stdout),
            ("stderr", l.stderr),
        ] {
            if size.as_u64() == 0 {
                return Err(("limits", key, format!("`{key}` must be greater than zero")));
            }
        }
        let mut seen = std::collections::BTreeSet::new();
        if let Some(dup) = self.run.params.iter().find(|p| !seen.insert(*p)) {
            return Err((
                "run",
                "params",
                format!("parameter `{dup}` is listed twice"),
            ));
        }
        args::validate(&self.run.args, &self.run.params).map_err(|e| ("run", "args", e))?;
        if let Some(name) = &self.run.stdout {
            crate::job::validate_input_name(name).map_err(|e| {
                (
                    "run",
                    "stdout",
                    format!(
                        "stdout file: {}",
                        e.replacen("input name", "output name", 1)
                    ),
                )
            })?;
            if l.output_files == 0 {
                return Err((
                    "run",
                    "stdout",
                    format!(
                        "stdout is kept as `/out/{name}`, but `limits.output_files` is 0: allow at least 1"
                    ),
                ));
            }
        }
        for (k, v) in &self.run.env {
            let bad_key = k.is_empty() || k.contains(['=', '\0']);
            if bad_key || v.contains('\0') {
                return Err((
                    "run",
                    "env",
                    format!("invalid environment variable `{}`", k.escape_debug()),
                ));
            }
        }
        let mut seen = std::collections::BTreeSet::new();
        if let Some(dup) = self.network.services.iter().find(|s| !seen.insert(*s)) {
            return Err((
                "network",
                "services",
                format!("service `{dup}` is listed twice"),
            ));
        }
        if let Some(service) = self.network.services.iter().find(|s| !declared.contains(s)) {
            // Outbound calls are resolved against the host's declared
            // services only.
            let known = if declared.is_empty() {
                "this host declares no internal services".to_owned()
            } else {
                format!(
                    "this host declares {}",
                    declared
                        .iter()
                        .map(|d| format!("`{d}`"))
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            };
            return Err((
                "network",
                "services",
                format!(
                    "unknown service `{service}` in policy `{}`: {known}",
                    self.module.name
                ),
            ));
        }
        Ok(())
    }
}

/// 1-based line and column of byte `offset` in `source`.
fn line_col(source: &str, offset: usize) -> (usize, usize) {
    let before = &source[..offset.min(source.len())];
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, column)
}

/// Where `key` is assigned inside `[table]` (`""` for the top level). Falls
/// back to the table header, then to 1:1, when the key is absent (a rule
/// broken by a default value).
fn locate_key(source: &str, table: &str, key: &str) -> (usize, usize) {
    let mut current = String::new();
    let mut header = None;
    for (i, raw) in source.lines().enumerate() {
        let line = raw.trim_start();
        if let Some(rest) = line.strip_prefix('[') {
            current = rest.split(']').next().unwrap_or("").trim().to_owned();
            if current == table {
                header = Some((i + 1, raw.len() - line.len() + 1));
            }
            continue;
        }
        if current == table
            && let Some(rest) = line.strip_prefix(key)
            && rest.trim_start().starts_with('=')
        {
            return (i + 1, raw.len() - line.len() + 1);
        }
    }
    header.unwrap_or((1, 1))
}

#[cfg(test)]
mod tests {
    use super::*;

    const DIGEST: &str = "0000000000000000000000000000000000000000000000000000000000000000";

    fn parse(body: &str) -> Result<Policy, PolicyError> {
        let text = format!("version = 1\n[module]\nname = \"demo\"\nsha256 = \"{DIGEST}\"\n{body}");
        Policy::parse(&text, Path::new("demo.toml"))
    }

    #[test]
    fn minimal_policy_takes_the_safe_defaults() {
        let p = parse("").unwrap();
        assert_eq!(p.module.zone, Zone::Untrusted);
        assert_eq!(p.limits, Limits::default());
        assert!(p.access.scopes.is_empty(), "nobody may submit by default");
        assert!(p.run.env.is_empty(), "no environment by default");
        assert!(p.run.params.is_empty(), "no parameters by default");
        assert!(p.network.services.is_empty(), "no way out by default");
        assert!(p.source_sha256.is_some());
    }

    #[test]
    fn the_default_limits_are_the_documented_ones() {
        let l = Limits::default();
        assert_eq!(l.memory, ByteSize::mib(64));
        assert_eq!(l.cpu_time, HumanDuration::secs(2));
        assert_eq!(l.wall_time, HumanDuration::secs(10));
        assert_eq!(l.output, ByteSize::mib(16));
        assert_eq!(l.output_files, 32);
        assert_eq!(l.stdout, ByteSize::mib(1));
        assert_eq!(l.stderr, ByteSize::kib(64));
    }

    #[test]
    fn unknown_key_names_file_line_and_column() {
        let err = parse("[limits]\nmemroy = \"64 MiB\"\n")
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("demo.toml:6:1: unknown field `memroy`"),
            "{err}"
        );
    }

    #[test]
    fn bad_size_names_the_value_and_position() {
        let err = parse("[limits]\nmemory = \"64 parsecs\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("demo.toml:6:10:"), "{err}");
        assert!(err.contains("`64 parsecs`"), "{err}");
    }

    #[test]
    fn cross_field_rules_point_at_the_key() {
        let err = parse("[limits]\ncpu_time = \"20 s\"\nwall_time = \"5 s\"\n")
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("demo.toml:6:1: cpu_time `20 s` is longer"),
            "{err}"
        );
    }

    #[test]
    fn line_col_counts_from_one() {
        assert_eq!(line_col("ab\ncd", 0), (1, 1));
        assert_eq!(line_col("ab\ncd", 4), (2, 2));
    }
}
