//! The structured result of one job: what the CLI prints and the service
//! stores. Plain data; serializes to the JSON documented in the README.

use serde::{Deserialize, Serialize};

/// A limit that can end a job.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum LimitKind {
    /// Total linear memory (`limits.memory`).
    Memory,
    /// Total table elements (`limits.table_elements`).
    Tables,
    /// Guest execution time (`limits.cpu_time`).
    CpuTime,
    /// Whole-job deadline (`limits.wall_time`).
    WallTime,
    /// Wasm call stack depth (engine-wide `max_wasm_stack`).
    Stack,
    /// Captured stdout (`limits.stdout`).
    Stdout,
    /// Captured stderr (`limits.stderr`).
    Stderr,
    /// Bytes added to `/out` (`limits.output`).
    Output,
    /// Entries created in `/out` (`limits.output_files`).
    OutputFiles,
    /// Instances, memories or tables beyond what one job may create.
    Instances,
    /// Host file descriptors the job holds at once (the host's per-job
    /// share, the sandbox's `max_open_per_job`): fires when the guest keeps
    /// asking for more after being refused.
    Descriptors,
    /// Bytes written to `/out` in total, overwrites included
    /// (the sandbox's `WRITTEN_PER_OUTPUT` times `limits.output`).
    Written,
}

impl LimitKind {
    /// Every limit, in a fixed order (the latch stores an index into it).
    pub const ALL: [LimitKind; 12] = [
        LimitKind::Memory,
        LimitKind::Tables,
        LimitKind::CpuTime,
        LimitKind::WallTime,
        LimitKind::Stack,
        LimitKind::Stdout,
        LimitKind::Stderr,
        LimitKind::Output,
        LimitKind::OutputFiles,
        LimitKind::Instances,
        LimitKind::Descriptors,
        LimitKind::Written,
    ];

    /// The policy key (or engine setting) this limit comes from.
    pub fn as_str(self) -> &'static str {
        match self {
            LimitKind::Memory => "memory",
            LimitKind::Tables => "table_elements",
            LimitKind::CpuTime => "cpu_time",
            LimitKind::WallTime => "wall_time",
            LimitKind::Stack => "stack",
            LimitKind::Stdout => "stdout",
            LimitKind::Stderr => "stderr",
            LimitKind::Output => "output",
            LimitKind::OutputFiles => "output_files",
            LimitKind::Instances => "instances",
            LimitKind::Descriptors => "descriptors",
            LimitKind::Written => "written",
        }
    }
}

impl std::fmt::Display for LimitKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One collected output: a regular file under `/out`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct OutputFile {
    /// Path relative to `/out`, `/`-separated.
    pub name: String,
    /// Size in bytes.
    pub size: u64,
    /// Lowercase hex SHA-256 of the content.
    pub sha256: String,
}

/// An entry of `/out` that was not collected, and why.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct SkippedOutput {
    /// Path relative to `/out`, with every character the sandbox's `outputs::check_name` refuses
    /// escaped (`\u{202e}`, `\u{1b}`, and `\xff` for a byte that is not
    /// UTF-8), so it is safe to print.
    pub name: String,
    /// Why: `symlink`, `hard-link` (a file with a second name),
    /// `not-created` (a file the job did not create: moved or linked into
    /// `/out` from elsewhere), `fifo`,
    /// `socket`, `device`, `not-utf8`, `control-char`, `format-char`,
    /// `reserved-char`, `path-too-long`, `too-deep`, `unreadable`,
    /// `not-regular`.
    pub reason: String,
}

/// Whether the job did its work.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// The guest exited 0 and no limit fired.
    Succeeded,
    /// A trap, a non-zero exit, or a limit.
    Failed,
}

/// What ended a failed job.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum FailureKind {
    /// A limit fired; `limit` names it.
    Limit,
    /// The guest trapped (for example `unreachable`, a panic under
    /// `panic = "abort"`, an out-of-bounds access).
    Trap,
    /// The guest exited with a non-zero code.
    Exit,
    /// The module could not be instantiated (an import the policy does not
    /// grant, or a start function that failed).
    Instantiate,
    /// The job's outputs could not be collected (the sandbox's
    /// `outputs::collect`); nothing the guest leaves in `/out` makes the
    /// host fail instead.
    Output,
    /// The host could not run or finish the job: its module is no longer
    /// served, its stored inputs are unreadable, or the host failed on it
    /// [`queue.max_attempts`](crate::config) times. Not the guest's doing.
    Host,
    /// The worker process running the job failed under it (it crashed,
    /// was killed, outgrew its memory ceiling, stopped answering, or broke
    /// the channel's protocol); the message names which. A fresh worker
    /// replaced it.
    Worker,
}

/// Why a job failed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Failure {
    /// The class of failure.
    pub kind: FailureKind,
    /// One line for people. For traps it is wasmtime's trap description, which
    /// the service logs but redacts from clients.
    pub message: String,
}

/// A bounded capture of stdout or stderr.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Captured {
    /// The captured bytes as UTF-8 (invalid sequences replaced): at most
    /// the first 4 MiB, whatever the limit.
    pub text: String,
    /// Bytes the guest wrote (at most the policy's limit).
    pub bytes: u64,
    /// Whether `text` is less than the guest wrote: it wrote more than
    /// the limit, or more than the host keeps.
    pub truncated: bool,
}

impl Captured {
    /// Cuts the text to at most `max` bytes, at a character boundary,
    /// marked truncated if it was longer.
    pub fn cut_to(&mut self, max: usize) {
        if self.text.len() > max {
            self.text.truncate(self.text.floor_char_boundary(max));
            self.truncated = true;
        }
    }
}

/// What the job used.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Measurements {
    /// Whole job, from store creation to the guest's exit, in milliseconds.
    pub wall_time_ms: f64,
    /// Guest execution time in milliseconds, at the epoch tick's resolution.
    pub cpu_time_ms: f64,
    /// Most linear memory held at once, in bytes.
    pub peak_memory_bytes: u64,
    /// Bytes charged to the `/out` quota.
    pub output_bytes: u64,
    /// Entries charged to the `/out` quota.
    pub output_entries: u64,
    /// Calls the guest made into the host (WASI functions and runtime
    /// calls such as `memory.grow`), counted by the host; epoch ticks are
    /// not counted. Evidence of what a guest tried: a job that only prints
    /// a line makes a few dozen.
    #[serde(default)]
    pub host_calls: u64,
    /// Requests the host refused the guest, counted by the host: every
    /// filesystem call answered with an error and every socket or name
    /// lookup (all are refused). Refusals by the service gate are in
    /// `calls.refused`.
    #[serde(default)]
    pub refused: u64,
}

/// Most frames a report's backtrace keeps (the innermost).
pub const MAX_BACKTRACE_FRAMES: usize = 16;
/// Longest function or module name a backtrace frame keeps, in bytes.
pub const MAX_FRAME_NAME: usize = 96;

/// One frame of a trapped guest's backtrace, innermost first.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct BacktraceFrame {
    /// The function's name from the module's name section (demangled),
    /// with anything unprintable escaped; absent when the module has none.
    pub function: Option<String>,
    /// The function's index in its core module.
    pub func_index: u32,
    /// Byte offset of the trapping or calling instruction in its core
    /// module, when known: what `wasm-tools objdump` or `addr2line` take.
    pub module_offset: Option<u64>,
    /// The core module's name, when it has one.
    pub module: Option<String>,
}

/// A trapped guest's backtrace: at most [`MAX_BACKTRACE_FRAMES`] frames
/// (innermost first) of at most [`MAX_FRAME_NAME`]-byte names, so a few
/// KiB at most (under 4 KiB as JSON), whatever the guest's names. The bounds are applied
/// whenever one is built or read back (a worker's report included).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(from = "RawBacktrace")]
pub struct Backtrace {
    /// The frames kept.
    pub frames: Vec<BacktraceFrame>,
    /// Whether frames were left out.
    pub truncated: bool,
}

#[derive(Deserialize)]
struct RawBacktrace {
    frames: Vec<BacktraceFrame>,
    #[serde(default)]
    truncated: bool,
}

impl From<RawBacktrace> for Backtrace {
    fn from(raw: RawBacktrace) -> Self {
        Self::new(raw.frames, raw.truncated)
    }
}

impl Backtrace {
    /// A backtrace of `frames`, cut to the bounds and with names made
    /// printable.
    pub fn new(mut frames: Vec<BacktraceFrame>, truncated: bool) -> Self {
        let truncated = truncated || frames.len() > MAX_BACKTRACE_FRAMES;
        frames.truncate(MAX_BACKTRACE_FRAMES);
        for f in &mut frames {
            for name in [&mut f.function, &mut f.module].into_iter().flatten() {
                *name = printable_name(name);
            }
        }
        Self { frames, truncated }
    }
}

/// `name` with control and bidirectional-formatting characters escaped,
/// cut to [`MAX_FRAME_NAME`] bytes at a character boundary.
fn printable_name(name: &str) -> String {
    crate::sandbox::shown_within(name, MAX_FRAME_NAME)
}

/// The structured report of one job.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct JobReport {
    /// Job identifier.
    pub job_id: String,
    /// Module name from the policy.
    pub module: String,
    /// SHA-256 of the module that ran.
    pub module_sha256: String,
    /// SHA-256 of the policy file.
    pub policy_sha256: Option<String>,
    /// Trust zone it ran in.
    pub zone: String,
    /// Succeeded or failed.
    pub outcome: Outcome,
    /// The guest's exit code, when it exited: 0 for a normal return, else
    /// the code it passed to `wasi:cli/exit` (`exit-with-code` carries
    /// 0-255; plain `exit(err)`, which wasi-libc's WASIp2 `exit` uses,
    /// is 1). Absent for a trap or a limit.
    pub exit_code: Option<i32>,
    /// The limit that fired first, if any.
    pub limit: Option<LimitKind>,
    /// Why the job failed, if it did.
    pub failure: Option<Failure>,
    /// Regular files collected from `/out`.
    pub outputs: Vec<OutputFile>,
    /// Entries of `/out` not collected (links, FIFOs, …).
    pub skipped_outputs: Vec<SkippedOutput>,
    /// Captured stdout.
    pub stdout: Captured,
    /// Captured stderr.
    pub stderr: Captured,
    /// Resource use.
    pub measurements: Measurements,
    /// Outbound calls to internal services, when the policy names any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub calls: Option<super::CallsReport>,
    /// Where the guest trapped (function names and wasm offsets, bounded),
    /// when it trapped.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backtrace: Option<Backtrace>,
}

/// How a job ended, in a few words: what a listing of many jobs shows of
/// each report, whose captured text and outputs list can be megabytes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ReportSummary {
    /// Succeeded or failed.
    pub outcome: Outcome,
    /// The guest's exit code, when it exited.
    pub exit_code: Option<i32>,
    /// The limit that fired first, if any.
    pub limit: Option<LimitKind>,
    /// The class of failure, if the job failed.
    pub failure: Option<FailureKind>,
    /// How many output files were kept.
    pub outputs: u64,
}

/// What answering a report holds in memory, at most, per byte of its
/// stored JSON: the decoded report (up to two and a half times its JSON
/// with many small outputs, each a struct and two strings) and, while it is
/// decoded, the store's copy of the JSON. With the whole body held, 3.7 to
/// 3.9 was measured for 100,000 to 120,000 outputs of 155 bytes each;
/// written as read (`api::answers::ViewBody`), about 2 for long names.
pub const HELD_PER_BYTE: u64 = 4;

/// A tenant's share of `max_buffered_answers`: what its heavy answers may
/// hold at once.
pub fn answers_share(max_buffered_answers: u64) -> u64 {
    (max_buffered_answers / 4).max(1)
}

/// The longest report, as stored JSON, whose answer fits a tenant's share
/// of `max_buffered_answers`: what a job's report is cut to when it ends
/// ([`JobReport::fit`]).
pub fn largest_report(max_buffered_answers: u64) -> u64 {
    answers_share(max_buffered_answers) / HELD_PER_BYTE
}

/// A report this long as JSON, or this heavy ([`JobReport::weight`]), is
/// decoded, encoded or turned into a response off the async threads.
pub const HEAVY_REPORT: usize = 256 * 1024;

impl JobReport {
    /// Roughly how many bytes it takes as JSON, without encoding it: what
    /// says whether building or encoding it belongs off an async thread.
    pub fn weight(&self) -> usize {
        const ENTRY: usize = 256;
        let calls = self.calls.as_ref().map_or(0, |c| c.records.len());
        // A name is written in the report and again in its URL.
        let names: usize = self.outputs.iter().map(|o| 2 * o.name.len()).sum();
        self.stdout.text.len()
            + self.stderr.text.len()
            + names
            + ENTRY * (1 + self.outputs.len() + self.skipped_outputs.len() + calls)
    }

    /// Its JSON's length in bytes, as the store keeps it: counted as it
    /// is encoded, not built.
    pub fn json_len(&self) -> u64 {
        struct Count(u64);
        impl std::io::Write for Count {
            fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
                self.0 += buf.len() as u64;
                Ok(buf.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let mut count = Count(0);
        serde_json::to_writer(&mut count, self).expect("a report serializes");
        count.0
    }

    /// Makes the report at most `max` bytes of JSON, so that answering it
    /// holds at most what one answer may ([`HELD_PER_BYTE`]). When it is
    /// longer, its outputs are not listed (they are not kept), and the job
    /// fails for it ([`FailureKind::Output`], or an earlier failure says
    /// so); if it is still longer, its captured stdout and stderr are cut
    /// to a sixteenth of `max` each (escaped as JSON, each of their bytes
    /// takes at most six) and its call records dropped (they stay counted).
    /// Returns the length it had, when it was cut.
    pub fn fit(&mut self, max: u64) -> Option<u64> {
        if self.json_bound() <= max {
            return None;
        }
        let len = self.json_len();
        if len <= max {
            return None;
        }
        let why = format!(
            "its report would be {len} bytes of JSON, more than this service answers ({max} bytes: `max_buffered_answers` over {}); its outputs are not kept",
            4 * HELD_PER_BYTE
        );
        match &mut self.failure {
            Some(failure) if self.outcome == Outcome::Failed => {
                failure.message = format!("{} ({why})", failure.message);
                self.outputs.clear();
                self.skipped_outputs.clear();
            }
            _ => {
                self.failure = None;
                self.fail_outputs(format!(
                    "the job left more outputs than can be listed: {why}"
                ));
            }
        }
        if self.json_len() > max {
            self.stdout.cut_to((max / 16) as usize);
            self.stderr.cut_to((max / 16) as usize);
            if let Some(calls) = &mut self.calls {
                calls.records_dropped = calls
                    .records_dropped
                    .saturating_add(calls.records.len() as u32);
                calls.records.clear();
            }
        }
        if self.json_len() > max {
            // A bound too small for even that (a few KiB): what is left is
            // the job's fixed fields and a short reason.
            for captured in [&mut self.stdout, &mut self.stderr] {
                captured.truncated |= !captured.text.is_empty();
                captured.text.clear();
            }
            self.backtrace = None;
            if let Some(failure) = &mut self.failure {
                failure
                    .message
                    .truncate(failure.message.floor_char_boundary(256));
            }
        }
        Some(len)
    }

    /// At least [`JobReport::json_len`], found without encoding the report:
    /// escaped as JSON a byte of text takes at most six (`\u001f`), and
    /// every entry's fixed part is counted at more than it takes.
    pub fn json_bound(&self) -> u64 {
        fn text(s: &str) -> u64 {
            6 * s.len() as u64 + 2
        }
        fn opt(s: Option<&String>) -> u64 {
            s.map_or(4, |s| text(s))
        }
        let outputs: u64 = self
            .outputs
            .iter()
            .map(|o| text(&o.name) + text(&o.sha256) + 128)
            .sum();
        let skipped: u64 = self
            .skipped_outputs
            .iter()
            .map(|o| text(&o.name) + text(&o.reason) + 64)
            .sum();
        let calls: u64 = self.calls.as_ref().map_or(0, |c| {
            256 + c
                .records
                .iter()
                .map(|r| {
                    text(&r.method)
                        + text(&r.target)
                        + opt(r.service.as_ref())
                        + opt(r.refused.as_ref())
                        + opt(r.class.as_ref())
                        + opt(r.error.as_ref())
                        + r.stripped_headers.iter().map(|h| text(h) + 1).sum::<u64>()
                        + 256
                })
                .sum::<u64>()
        });
        let backtrace: u64 = self.backtrace.as_ref().map_or(0, |b| {
            64 + b
                .frames
                .iter()
                .map(|f| opt(f.function.as_ref()) + opt(f.module.as_ref()) + 128)
                .sum::<u64>()
        });
        let failure = self.failure.as_ref().map_or(0, |f| text(&f.message) + 64);
        text(&self.job_id)
            + text(&self.module)
            + text(&self.module_sha256)
            + opt(self.policy_sha256.as_ref())
            + text(&self.zone)
            + text(&self.stdout.text)
            + text(&self.stderr.text)
            + outputs
            + skipped
            + calls
            + backtrace
            + failure
            + 1024
    }

    /// A report from its JSON. A report can list thousands of outputs and
    /// carry megabytes of captured output: one that long is decoded off
    /// the async threads ([`crate::blocking`]), so that a client reading
    /// it again and again holds up no other request.
    ///
    /// # Errors
    /// Not a report.
    pub fn decode(text: &str) -> serde_json::Result<Self> {
        if text.len() >= HEAVY_REPORT {
            crate::blocking(|| serde_json::from_str(text))
        } else {
            serde_json::from_str(text)
        }
    }

    /// The report as JSON; a heavy one ([`JobReport::weight`]) encoded off
    /// the async threads.
    pub fn encode(&self) -> String {
        let encode = || serde_json::to_string(self).expect("a report serializes");
        if self.weight() >= HEAVY_REPORT {
            crate::blocking(encode)
        } else {
            encode()
        }
    }

    /// The report in a few words.
    pub fn summary(&self) -> ReportSummary {
        ReportSummary {
            outcome: self.outcome,
            exit_code: self.exit_code,
            limit: self.limit,
            failure: self.failure.as_ref().map(|f| f.kind),
            outputs: self.outputs.len() as u64,
        }
    }

    /// Lists what the host itself collected of the job's outputs, in place
    /// of whatever the runner (perhaps a compromised worker) said it left.
    pub fn list_collected(&mut self, collected: crate::sandbox::outputs::Collected) {
        self.outputs = collected.files;
        self.skipped_outputs = collected.skipped;
    }

    /// Fails the job for outputs that cannot be kept: nothing is listed,
    /// and the failure is named unless one already is.
    pub fn fail_outputs(&mut self, message: String) {
        self.outputs.clear();
        self.skipped_outputs.clear();
        self.outcome = Outcome::Failed;
        self.failure.get_or_insert(Failure {
            kind: FailureKind::Output,
            message,
        });
    }

    /// A failed report, of kind [`FailureKind::Host`], for a job the host
    /// could not run or finish (its module is no longer served, its stored
    /// inputs are unreadable, the sandbox failed, or its attempts ran out).
    pub fn not_run(job_id: &str, module: &str, message: impl Into<String>) -> Self {
        Self {
            job_id: job_id.to_owned(),
            module: module.to_owned(),
            module_sha256: String::new(),
            policy_sha256: None,
            zone: String::new(),
            outcome: Outcome::Failed,
            exit_code: None,
            limit: None,
            failure: Some(Failure {
                kind: FailureKind::Host,
                message: message.into(),
            }),
            outputs: Vec::new(),
            skipped_outputs: Vec::new(),
            stdout: Captured::default(),
            stderr: Captured::default(),
            measurements: Measurements::default(),
            calls: None,
            backtrace: None,
        }
    }

    /// Whether the job succeeded.
    pub fn succeeded(&self) -> bool {
        self.outcome == Outcome::Succeeded
    }

    /// The report as JSON of at most `max` bytes, for a channel whose
    /// frames are bounded. What a guest wrote can be larger than that
    /// (the host keeps up to 4 MiB of each stream, and JSON writes a
    /// control byte as six), so what does not fit is cut from
    /// the end of the captured text, which is then marked truncated; if
    /// that is not enough, the captured text, the backtrace and all but
    /// 1 KiB of the failure's message go. `Err` only when even that does
    /// not fit.
    ///
    /// # Errors
    /// A message saying why, when nothing of the report fits.
    pub fn to_json_within(mut self, max: usize) -> Result<String, String> {
        let encode =
            |r: &Self| serde_json::to_string(r).map_err(|e| format!("unencodable report: {e}"));
        // The texts are cut to what their escaped JSON leaves room for
        // before anything is encoded, so the report is encoded once, at
        // most `max` bytes of it (a byte of text can take six of JSON, and
        // encoding the whole to find out held six times the captures, twice
        // over, in the worker).
        let texts = escaped_len(&self.stdout.text) + escaped_len(&self.stderr.text);
        // Texts within half the bound: encoded whole first, and kept as it
        // is when it fits (what the cut below would leave uncut), so most
        // reports are encoded once, not twice.
        if texts <= max / 2 {
            let json = encode(&self)?;
            if json.len() <= max {
                return Ok(json);
            }
        }
        if texts > 0 {
            let rest = {
                let stdout = std::mem::take(&mut self.stdout.text);
                let stderr = std::mem::take(&mut self.stderr.text);
                let rest = encode(&self)?.len();
                self.stdout.text = stdout;
                self.stderr.text = stderr;
                rest
            };
            let mut over = (rest + texts).saturating_sub(max);
            let (first, second) = if self.stdout.text.len() >= self.stderr.text.len() {
                (&mut self.stdout, &mut self.stderr)
            } else {
                (&mut self.stderr, &mut self.stdout)
            };
            for captured in [first, second] {
                if over == 0 {
                    break;
                }
                let before = escaped_len(&captured.text);
                captured.cut_to(escaped_prefix(&captured.text, before.saturating_sub(over)));
                over = over.saturating_sub(before - escaped_len(&captured.text));
            }
        }
        let json = encode(&self)?;
        if json.len() <= max {
            return Ok(json);
        }
        drop(json);
        for captured in [&mut self.stdout, &mut self.stderr] {
            captured.truncated |= !captured.text.is_empty();
            captured.text.clear();
        }
        self.backtrace = None;
        if let Some(failure) = &mut self.failure {
            failure
                .message
                .truncate(failure.message.floor_char_boundary(1024));
        }
        let json = encode(&self)?;
        if json.len() <= max {
            return Ok(json);
        }
        Err(format!(
            "the job's report is larger than {max} bytes even without its captured output"
        ))
    }
}

/// The bytes `text` takes as a JSON string's contents (as serde_json
/// writes it: `"` and `\\` escaped in two bytes, control characters in two
/// or six).
fn escaped_len(text: &str) -> usize {
    text.bytes().map(escaped_byte).sum()
}

fn escaped_byte(b: u8) -> usize {
    match b {
        b'"' | b'\\' | b'\n' | b'\r' | b'\t' | 0x08 | 0x0c => 2,
        0..0x20 => 6,
        _ => 1,
    }
}

/// The longest prefix of `text`, in bytes and at a character boundary,
/// whose escaped JSON takes at most `room` bytes.
fn escaped_prefix(text: &str, room: usize) -> usize {
    let mut taken = 0;
    for (i, c) in text.char_indices() {
        let cost = if c.is_ascii() {
            escaped_byte(c as u8)
        } else {
            c.len_utf8()
        };
        if taken + cost > room {
            return i;
        }
        taken += cost;
    }
    text.len()
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    fn listing(n: usize) -> JobReport {
        let mut report = JobReport::not_run("j", "m", "unused");
        report.outcome = Outcome::Succeeded;
        report.failure = None;
        report.outputs = (0..n)
            .map(|i| OutputFile {
                name: format!("tile-{i:06}.png"),
                size: 1,
                sha256: "0".repeat(64),
            })
            .collect();
        report.skipped_outputs.push(SkippedOutput {
            name: "link".into(),
            reason: "symlink".into(),
        });
        report
    }

    #[test]
    fn json_len_is_the_stored_length() {
        let mut report = listing(3);
        report.stdout.text = "\u{1}\"é".repeat(100);
        assert_eq!(report.json_len(), report.encode().len() as u64);
    }

    /// Whatever the report holds, the bound is at least its JSON: names of
    /// control characters (six bytes each), long skipped paths, captured
    /// text, call records, a backtrace.
    #[test]
    fn json_bound_is_never_below_json_len() {
        let control = "\u{1f}".repeat(255);
        let mut report = listing(50);
        for o in &mut report.outputs {
            o.name = format!("{}/{control}", "d".repeat(1000));
        }
        report.skipped_outputs = (0..50)
            .map(|_| SkippedOutput {
                name: format!("{}/{control}", "d".repeat(1000)),
                reason: "control-char".into(),
            })
            .collect();
        report.stdout.text = "\u{1}\"\\".repeat(1000);
        report.stderr.text = control.clone();
        report.failure = Some(Failure {
            kind: FailureKind::Exit,
            message: control.clone(),
        });
        report.calls = Some(crate::job::CallsReport {
            records: vec![
                crate::job::CallRecord {
                    method: control.clone(),
                    target: control.clone(),
                    service: Some(control.clone()),
                    stripped_headers: vec![control.clone(); 3],
                    ..Default::default()
                };
                64
            ],
            ..Default::default()
        });
        report.backtrace = Some(Backtrace {
            frames: vec![
                BacktraceFrame {
                    function: Some(control.clone()),
                    func_index: u32::MAX,
                    module_offset: Some(u64::MAX),
                    module: Some(control.clone()),
                };
                16
            ],
            truncated: true,
        });
        assert!(report.json_bound() >= report.json_len());
        assert!(listing(0).json_bound() >= listing(0).json_len());
        // The shortcut trusts the bound: a report just over its limit is
        // measured and cut, whatever its entries.
        let len = report.json_len();
        assert_eq!(report.fit(len - 1), Some(len));
        assert!(report.json_len() < len);
    }

    #[test]
    fn a_bound_of_a_few_kib_leaves_the_fixed_fields_only() {
        let mut report = listing(100);
        report.stdout.text = "\u{1}".repeat(10_000);
        report.failure = Some(Failure {
            kind: FailureKind::Exit,
            message: "x".repeat(1024),
        });
        report.outcome = Outcome::Failed;
        assert!(report.fit(2048).is_some());
        assert!(report.json_len() <= 2048, "{}", report.json_len());
        assert!(report.stdout.truncated);
    }

    #[test]
    fn a_report_that_fits_is_left_as_it_is() {
        let mut report = listing(10_000);
        let before = report.clone();
        assert_eq!(report.fit(report.json_len()), None);
        assert_eq!(report, before);
    }

    #[test]
    fn a_report_too_long_keeps_no_outputs_and_fails_saying_why() {
        let mut report = listing(10_000);
        let len = report.json_len();
        assert_eq!(report.fit(len - 1), Some(len));
        assert!(report.outputs.is_empty() && report.skipped_outputs.is_empty());
        assert_eq!(report.outcome, Outcome::Failed);
        let failure = report.failure.as_ref().unwrap();
        assert_eq!(failure.kind, FailureKind::Output);
        assert!(
            failure.message.contains(&format!("{len} bytes")),
            "{}",
            failure.message
        );
        assert!(report.json_len() < len - 1);
        assert_eq!(report.summary().outputs, 0);
    }

    #[test]
    fn an_earlier_failure_is_kept_and_says_the_outputs_went() {
        let mut report = listing(10_000);
        report.outcome = Outcome::Failed;
        report.exit_code = Some(1);
        report.failure = Some(Failure {
            kind: FailureKind::Exit,
            message: "exited with 1".into(),
        });
        assert!(report.fit(100 << 10).is_some());
        let failure = report.failure.as_ref().unwrap();
        assert_eq!(failure.kind, FailureKind::Exit);
        assert!(
            failure.message.starts_with("exited with 1 (") && failure.message.contains("not kept"),
            "{}",
            failure.message
        );
        assert!(report.outputs.is_empty());
    }

    #[test]
    fn escaped_lengths_are_what_serde_json_writes() {
        let every: String = (0u8..0x80).map(char::from).collect();
        for text in [
            every.as_str(),
            "",
            "plain",
            "é\u{fffd}\"\\\u{1}\n",
            "\u{7f}\u{0}",
        ] {
            let json = serde_json::to_string(text).unwrap();
            assert_eq!(escaped_len(text) + 2, json.len(), "{text:?}");
            for room in [0, 1, 5, 6, 7, 40] {
                let end = escaped_prefix(text, room);
                assert!(escaped_len(&text[..end]) <= room);
                if end < text.len() {
                    let next = text[end..].chars().next().unwrap().len_utf8();
                    assert!(escaped_len(&text[..end + next]) > room);
                }
            }
        }
    }

    #[test]
    fn captured_text_escaped_six_times_over_is_cut_to_fit() {
        let mut report = listing(0);
        // Each control character is six bytes as JSON.
        report.stdout.text = "\u{1}".repeat(crate::sandbox::MAX_CAPTURE);
        report.stderr.text = "\u{1}".repeat(crate::sandbox::MAX_CAPTURE);
        report.calls = Some(crate::job::CallsReport {
            made: 1,
            records: vec![crate::job::CallRecord::default(); 64],
            ..Default::default()
        });
        let max = 1 << 20;
        assert!(report.fit(max).is_some());
        assert!(report.json_len() <= max, "{}", report.json_len());
        assert!(report.stdout.truncated && report.stderr.truncated);
        let calls = report.calls.as_ref().unwrap();
        assert_eq!((calls.records.len(), calls.records_dropped), (0, 64));
    }

    /// A heavy report is decoded and encoded off the async threads: the
    /// gateway's other tasks run meanwhile. A light one is not moved.
    #[test]
    fn a_heavy_report_is_decoded_and_encoded_off_the_async_threads() {
        let mut heavy = JobReport::not_run("j", "m", "failed");
        heavy.stdout.text = "x".repeat(4 << 20);
        heavy.outputs = (0..20_000)
            .map(|i| OutputFile {
                name: format!("out-{i}.bin"),
                size: i,
                sha256: "0".repeat(64),
            })
            .collect();
        let heavy = Arc::new(heavy);
        let text: Arc<str> = heavy.encode().into();
        assert!(text.len() >= HEAVY_REPORT && heavy.weight() >= HEAVY_REPORT);
        let decoding = Arc::clone(&text);
        assert!(crate::another_task_runs_meanwhile(move || {
            JobReport::decode(&decoding).unwrap();
        }));
        assert!(crate::another_task_runs_meanwhile(move || {
            heavy.encode();
        }));
        // The same test, with work that stays on the thread's turn, would
        // see nothing run meanwhile.
        let light: Arc<str> = JobReport::not_run("j", "m", "failed").encode().into();
        assert!(!crate::another_task_runs_meanwhile(move || {
            JobReport::decode(&light).unwrap();
        }));
    }

    /// Captured output that JSON writes six times over (control bytes) or
    /// that is simply long is cut to fit the bound, marked truncated, and
    /// what is kept is its beginning; a report that fits is untouched.
    #[test]
    fn a_report_is_cut_to_fit_its_bound_whatever_its_guest_wrote() {
        let mut report = JobReport::not_run("j", "m", "failed");
        report.stdout.text = "\u{1}".repeat(3 << 20);
        report.stdout.bytes = 3 << 20;
        report.stderr.text = "é".repeat(1 << 20);
        let max = 1 << 20;
        let json = report.clone().to_json_within(max).unwrap();
        assert!(json.len() <= max, "{}", json.len());
        let back: JobReport = serde_json::from_str(&json).unwrap();
        assert!(back.stdout.truncated && back.stderr.truncated);
        assert_eq!(back.stdout.bytes, 3 << 20);
        assert!(report.stdout.text.starts_with(&back.stdout.text));
        assert!(report.stderr.text.starts_with(&back.stderr.text));
        assert_eq!(back.failure, report.failure);

        let small = JobReport::not_run("j", "m", "failed");
        let json = small.clone().to_json_within(max).unwrap();
        assert_eq!(json, serde_json::to_string(&small).unwrap());

        // A failure message past any bound goes down to 1 KiB.
        let long = JobReport::not_run("j", "m", "x".repeat(4 << 20));
        let json = long.to_json_within(max).unwrap();
        let back: JobReport = serde_json::from_str(&json).unwrap();
        assert_eq!(back.failure.unwrap().message.len(), 1024);
        assert!(
            JobReport::not_run("j", "m", "x")
                .to_json_within(10)
                .is_err()
        );
    }

    #[test]
    fn a_backtrace_is_bounded_and_printable_whatever_it_is_read_from() {
        let frame = |i: u32| BacktraceFrame {
            function: Some(format!("f{i}\u{1b}[2J\u{202e}{}", "x".repeat(1000))),
            func_index: i,
            module_offset: Some(u64::from(i)),
            module: None,
        };
        let json = serde_json::json!({
            "frames": (0..1000).map(frame).collect::<Vec<_>>(),
        });
        let bt: Backtrace = serde_json::from_value(json).unwrap();
        assert_eq!(bt.frames.len(), MAX_BACKTRACE_FRAMES);
        assert!(bt.truncated);
        let name = bt.frames[0].function.as_deref().unwrap();
        assert!(name.starts_with("f0\\u{1b}[2J\\u{202e}xx"), "{name}");
        assert!(name.len() <= MAX_FRAME_NAME);
        assert!(serde_json::to_string(&bt).unwrap().len() < 4 * 1024);
    }
}
