//! The `hostile` guest: a deliberately malicious WASI command for the
//! containment tests. Never give it a policy you would give real code.
//!
//! Usage: `hostile <mode> [--key=value...]`. The mode is the first
//! positional (not `--`) argument that names one, so policy arguments may
//! come first, or else `--mode=<mode>`; every `--key=value` is a parameter. Each mode really performs its attack through
//! std / wasi-libc, prints one `attempt <what>: ok ...|err <error>` line per
//! step, and copies anything it manages to read from outside the sandbox
//! into `/out/loot-<n>`, so the host detects a breach by looking at `/out`.
//! Unknown or missing mode: exit 2.
//!
//! The modes live in small modules by theme: [`fs`] (escaping the
//! filesystem), [`net`] (sockets and name lookup), [`exhaust`] (resource
//! exhaustion) and [`leak`] (environment, leftovers and cross-job memory
//! leaks). `bulkhead escape-suite` runs each mode as one or more attacks.

mod authors;
mod exhaust;
mod fs;
mod leak;
mod net;

use std::cell::Cell;
use std::fmt::Display;
use std::process::ExitCode;

/// Parsed command line plus the loot counter shared by all modes.
pub struct Ctx {
    params: Vec<(String, String)>,
    next_loot: Cell<u32>,
}

impl Ctx {
    /// Value of `--name=value` (the last one wins), if given.
    pub fn param(&self, name: &str) -> Option<&str> {
        self.params
            .iter()
            .rev()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// Records a breach: writes `what` followed by the stolen bytes to
    /// `/out/loot-<n>`. The header line makes a loot file self-explaining
    /// when a test prints it.
    pub fn loot(&self, what: &str, bytes: &[u8]) {
        let n = self.next_loot.get();
        self.next_loot.set(n + 1);
        let path = format!("/out/loot-{n}");
        let mut data = format!("{what}\n").into_bytes();
        data.extend_from_slice(bytes);
        attempt(
            format!("write {path} (loot from {what})"),
            std::fs::write(&path, data),
        );
    }
}

/// Prints the outcome of one step as `attempt <what>: ok|err <error>` and
/// hands back the value on success.
pub fn attempt<T, E: Display>(what: impl Display, result: Result<T, E>) -> Option<T> {
    match result {
        Ok(value) => {
            println!("attempt {what}: ok");
            Some(value)
        }
        Err(e) => {
            println!("attempt {what}: err {e}");
            None
        }
    }
}

const MODES: &[&str] = &[
    "read-dotdot",
    "read-abs",
    "symlink-escape",
    "write-in",
    "socket",
    "env",
    "memory-bomb",
    "loop",
    "sleep",
    "stdout-flood",
    "stderr-flood",
    "disk-big",
    "disk-many",
    "disk-link-create",
    "disk-setsize",
    "disk-seek-write",
    "disk-append",
    "deep-dirs",
    "recursion",
    "recursion-native",
    "leave-links",
    "canary-write",
    "canary-scan",
    "read-dotdot-plain",
    "read-trailing",
    "read-climb",
    "read-long",
    "symlink-loop",
    "rename-escape",
    "hardlink",
    "proc-dev",
    "harvest",
    "leftovers",
    "memory-grow",
    "fd-flood",
    "sleep-loop",
    "host-call-loop",
    "stdout-one-write",
    "log-inject",
    "tcp-connect",
    "tcp-linklocal",
    "udp-send",
    "tcp-listen",
    "dns",
    "out-deep",
    "out-names",
    "out-wait",
    "open-race",
    "fd-streams",
    "fd-preopens",
    "fd-dirs",
    "fd-every-way",
    "cpu-huge-poll",
    "cpu-huge-path",
    "cpu-stream-reads",
    "listings-held",
    "deep-tree",
    "deep-mkdir",
    "disk-rewrite",
    "disk-rewrite-at",
    "disk-truncate-regrow",
    "argv",
    "exit-code",
    "trap",
    "full-out",
    "every-call",
    "memory-held",
    "report-heavy",
];

fn main() -> ExitCode {
    // Must run before the arguments are read: the canary scan has to see
    // memory as it was before this instance copied its own `--canary=` into
    // it. It costs a few pages and microseconds in every mode.
    let snapshot = leak::Snapshot::take();

    let mut positional = Vec::new();
    let mut params = Vec::new();
    for arg in std::env::args().skip(1) {
        match arg.strip_prefix("--") {
            Some(param) => {
                let (k, v) = param.split_once('=').unwrap_or((param, ""));
                params.push((k.to_owned(), v.to_owned()));
            }
            None => positional.push(arg),
        }
    }
    let ctx = Ctx {
        params,
        next_loot: Cell::new(0),
    };

    // The mode is the first positional argument naming one; other
    // positional arguments belong to the policy and are ignored.
    // Or `--mode=`, so one policy can run several modes (the escape suite
    // runs a cross-job writer and reader as one module this way).
    let by_param = ctx.param("mode").map(str::to_owned);
    let Some(mode) = positional
        .iter()
        .find(|a| MODES.contains(&a.as_str()))
        .or(by_param.as_ref().filter(|m| MODES.contains(&m.as_str())))
    else {
        match positional.first() {
            Some(first) => eprintln!(
                "hostile: unknown mode {first:?}; one of: {}",
                MODES.join(", ")
            ),
            None => eprintln!("hostile: missing mode; one of: {}", MODES.join(", ")),
        }
        return ExitCode::from(2);
    };
    println!("mode {mode}");
    match mode.as_str() {
        "read-dotdot" => fs::read_dotdot(&ctx),
        "read-abs" => fs::read_abs(&ctx),
        "symlink-escape" => fs::symlink_escape(&ctx),
        "write-in" => fs::write_in(&ctx),
        "leave-links" => fs::leave_links(&ctx),
        "socket" => net::socket(&ctx),
        "env" => leak::env(&ctx),
        "canary-write" => leak::canary_write(&ctx),
        "canary-scan" => leak::canary_scan(&ctx, snapshot),
        "memory-bomb" => exhaust::memory_bomb(),
        "memory-held" => exhaust::memory_held(&ctx),
        "report-heavy" => exhaust::report_heavy(),
        "loop" => exhaust::busy_loop(),
        "sleep" => exhaust::sleep(),
        "stdout-flood" => exhaust::stdout_flood(),
        "stderr-flood" => exhaust::stderr_flood(),
        "disk-big" => exhaust::disk_big(),
        "disk-many" => exhaust::disk_many(),
        "disk-link-create" => exhaust::disk_link_create(),
        "disk-setsize" => exhaust::disk_setsize(),
        "disk-seek-write" => exhaust::disk_seek_write(),
        "disk-append" => exhaust::disk_append(),
        "deep-dirs" => exhaust::deep_dirs(),
        "recursion" => exhaust::recursion(),
        "recursion-native" => exhaust::recursion_native(),
        "read-dotdot-plain" => fs::read_dotdot_plain(&ctx),
        "read-trailing" => fs::read_trailing(&ctx),
        "read-climb" => fs::read_climb(&ctx),
        "read-long" => fs::read_long(&ctx),
        "symlink-loop" => fs::symlink_loop(&ctx),
        "rename-escape" => fs::rename_escape(&ctx),
        "hardlink" => fs::hardlink(&ctx),
        "proc-dev" => fs::proc_dev(&ctx),
        "harvest" => fs::harvest(&ctx),
        "leftovers" => leak::leftovers(&ctx),
        "memory-grow" => exhaust::memory_grow(),
        "fd-flood" => exhaust::fd_flood(),
        "sleep-loop" => exhaust::sleep_loop(),
        "host-call-loop" => exhaust::host_call_loop(),
        "stdout-one-write" => exhaust::stdout_one_write(),
        "log-inject" => exhaust::log_inject(),
        "tcp-connect" => net::tcp_connect(&ctx),
        "tcp-linklocal" => net::tcp_linklocal(&ctx),
        "udp-send" => net::udp_send(&ctx),
        "tcp-listen" => net::tcp_listen(&ctx),
        "dns" => net::dns(&ctx),
        "out-deep" => fs::out_deep(&ctx),
        "out-names" => fs::out_names(&ctx),
        "out-wait" => fs::out_wait(),
        "open-race" => fs::open_race(&ctx),
        "fd-streams" => exhaust::fd_streams(&ctx),
        "fd-preopens" => exhaust::fd_preopens(&ctx),
        "fd-dirs" => exhaust::fd_dirs(&ctx),
        "fd-every-way" => exhaust::fd_every_way(&ctx),
        "cpu-huge-poll" => exhaust::cpu_huge_poll(&ctx),
        "cpu-huge-path" => exhaust::cpu_huge_path(&ctx),
        "cpu-stream-reads" => exhaust::cpu_stream_reads(&ctx),
        "listings-held" => exhaust::listings_held(&ctx),
        "deep-tree" => exhaust::deep_tree(&ctx),
        "deep-mkdir" => exhaust::deep_mkdir(),
        "disk-rewrite" => exhaust::disk_rewrite(&ctx),
        "disk-rewrite-at" => exhaust::disk_rewrite_at(&ctx),
        "disk-truncate-regrow" => exhaust::disk_truncate_regrow(&ctx),
        "argv" => authors::argv(),
        "exit-code" => authors::exit_code(&ctx),
        "trap" => authors::trap(),
        "full-out" => authors::full_out(),
        "every-call" => fs::every_call(&ctx),
        _ => unreachable!("mode {mode} is in MODES but not dispatched"),
    }
}
