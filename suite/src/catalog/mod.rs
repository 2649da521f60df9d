//! The bundled attacks, as data. Each names a class from the attack list,
//! says what it tries, how to run it (a mode of the embedded `hostile`
//! guest, a generated module, a sequence of jobs, or requests to the API)
//! and what the host expects to see when the compartment holds.
//!
//! Adding an attack is adding an entry here; the runners and the checks
//! in [`crate::harness::evidence`] (and [`crate::families`]) do the
//! rest.

mod api;
mod artifacts;
mod bombs;
mod forge;
mod second_wall;

pub use crate::model::{
    Attack, AttackKind, BUNDLED, Class, Expect, GuestRun, HttpAttack, INPUT, Param, hello_wasm,
    hostile_wasm, lateral_wasm,
};
use crate::model::{HttpHeld, lateral};
use bulkhead::sandbox::LimitKind;

fn hostile(mode: &str) -> GuestRun {
    GuestRun {
        wasm: hostile_wasm(),
        args: vec![mode.to_owned()],
        params: Vec::new(),
        inputs: Vec::new(),
        limits: Vec::new(),
        expect: Expect::Contained,
        forbidden: Vec::new(),
        untouched: Vec::new(),
        services: Vec::new(),
    }
}

fn http(id: &str, title: &str, mode: &str, held: HttpHeld) -> Attack {
    attack(
        id,
        Class::Lateral,
        title,
        AttackKind::Http(HttpAttack {
            run: lateral(mode),
            held,
        }),
    )
}

/// The lateral attacks over HTTP, through the outbound gate.
fn http_attacks() -> Vec<Attack> {
    use HttpHeld::{BigBody, Common, Flood, Hunt, Reflect, Refused, Smuggle};
    vec![
        http(
            "lateral.http-ungranted",
            "call the declared but ungranted `payments` service by name",
            "payments",
            Refused(vec![("not_granted", 2)]),
        ),
        http(
            "lateral.http-raw-ip",
            "reach the forbidden service's real port by IP: decimal, hex, octal, short, IPv6, \
             v4-mapped; the metadata addresses",
            "ips",
            Refused(vec![("raw_ip", 11)]),
        ),
        http(
            "lateral.http-authority",
            "authority tricks: user info, ports, case, trailing dot, dotted names, undeclared names",
            "authority",
            Refused(vec![("authority", 8), ("undeclared", 1)]),
        ),
        http(
            "lateral.http-host-header",
            "address the allowed service with a `Host: payments` header",
            "host-header",
            Common,
        ),
        http(
            "lateral.http-redirect",
            "follow the allowed service's open redirect to the forbidden one's real address",
            "redirect",
            Refused(vec![("redirect", 1)]),
        ),
        http(
            "lateral.http-paths",
            "escape the allowed paths (`..`, encoded dots and slashes, `//`) and methods",
            "paths",
            Refused(vec![("path", 6), ("method", 1)]),
        ),
        http(
            "lateral.http-https",
            "ask for https, so the host would pick another transport",
            "https",
            Refused(vec![("scheme", 1)]),
        ),
        http(
            "lateral.http-smuggle",
            "set Authorization, Cookie, X-Bulkhead-* and forwarding headers of its own",
            "smuggle",
            Smuggle,
        ),
        http(
            "lateral.http-hunt",
            "look for the call token in responses, headers, environment, arguments and files",
            "hunt",
            Hunt,
        ),
        http(
            "lateral.http-flood",
            "call the allowed service more often than its declaration allows",
            "flood",
            Flood,
        ),
        http(
            "lateral.http-big-body",
            "send a request body over the service's max_request",
            "big-body",
            BigBody,
        ),
        http(
            "lateral.http-reflect-body",
            "get the call token back from a service that echoes it in its body: plain, split \
             into 5-byte frames, base64, hex",
            "reflect-body",
            Reflect(vec![("leak", 4)]),
        ),
        http(
            "lateral.http-reflect-encoding",
            "get the echoed call token back compressed (gzip, deflate; asked for, forced, \
             identity refused), then decode it",
            "reflect-encoding",
            Reflect(vec![("encoding", 4)]),
        ),
        http(
            "lateral.http-reflect-trailers",
            "get the echoed call token back in response trailers, with and without `TE: trailers`",
            "reflect-trailers",
            Reflect(Vec::new()),
        ),
        http(
            "lateral.http-reflect-headers",
            "get the echoed call token back in a header, `Set-Cookie`, a `Location` inside the \
             allowed paths, the reason phrase",
            "reflect-headers",
            Reflect(vec![("leak", 2)]),
        ),
        http(
            "lateral.http-reflect-stash",
            "get one call's token back in the next call's answer",
            "reflect-stash",
            Reflect(vec![("leak", 2)]),
        ),
        http(
            "lateral.http-forward",
            "pass 30 identity, routing and method-override headers an auth proxy would trust \
             (X-Forwarded-User, X-Original-URL, Impersonate-User, X-HTTP-Method-Override…)",
            "forward",
            Smuggle,
        ),
        http(
            "lateral.http-trailers",
            "send credentials and identity claims as request trailers (declared with `Trailer:` \
             and `TE: trailers`, and undeclared)",
            "trailers",
            Smuggle,
        ),
        http(
            "lateral.http-path-escapes",
            "escape the allowed paths the way servlet, Spring, IIS and double-decoding routers \
             would: `..;`, `;jsessionid`, `%252e`, overlong and fullwidth dots, `%u002e`, \
             dot-only segments",
            "path-escapes",
            Refused(vec![("path", 12)]),
        ),
        http(
            "lateral.http-query",
            "smuggle through the query: `_method=DELETE`, method-override parameters, escaped \
             traversal, `;` separators",
            "query",
            Refused(vec![("path", 6)]),
        ),
        http(
            "lateral.http-reflect-compressed",
            "get the echoed call token back compressed inside an identity body: a gzip payload \
             sent as `application/gzip`, a deflated zip entry, a gzip member after a log line, \
             a zstd payload",
            "reflect-compressed",
            Reflect(vec![("leak", 3), ("unsearchable", 1)]),
        ),
        http(
            "lateral.http-reflect-text",
            "get the echoed call token back as UTF-16LE, UTF-16BE, lowercased, and \
             quoted-printable with soft line breaks",
            "reflect-text",
            Reflect(vec![("leak", 4)]),
        ),
        http(
            "lateral.http-reflect-escapes",
            "get the echoed call token back escaped as a debug page or a logger would: \
             lowercase `%xx`, HTML hex and decimal entities, JSON `\\u00xx`",
            "reflect-escapes",
            Reflect(vec![("leak", 4)]),
        ),
        http(
            "lateral.http-reflect-offset",
            "get the call token's raw signature back in base64 after 1 or 2 other bytes, in the \
             URL alphabet, and `\\/`-escaped in JSON",
            "reflect-offset",
            Reflect(vec![("leak", 4)]),
        ),
        http(
            "lateral.http-body-override",
            "override the method from the request body: `_method=DELETE` in a form, a \
             multipart part name, a top-level JSON key, a percent-escaped key under an oddly \
             written content type",
            "body-override",
            Refused(vec![("method_override", 4)]),
        ),
        http(
            "lateral.http-reflect-split",
            "get the echoed call token back past a piecewise scan: zlib with a 1 KiB window, \
             zlib asking for a preset dictionary, the signature in pieces across six `Vary` \
             values and between the last header and the body",
            "reflect-split",
            Reflect(vec![("leak", 3), ("unsearchable", 1)]),
        ),
        http(
            "lateral.http-body-override-multipart",
            "override the method from a multipart part name as Rack reads it: folded onto the \
             next line, on the next line unfolded, backslash-escaped in its quoted string",
            "body-override-multipart",
            Refused(vec![("method_override", 3)]),
        ),
    ]
}

impl GuestRun {
    fn param(mut self, name: &str, value: Param) -> Self {
        self.params.push((name.to_owned(), value));
        self
    }

    fn input(mut self) -> Self {
        self.inputs.push((INPUT.0.to_owned(), INPUT.1.to_vec()));
        self
    }

    fn expect(mut self, expect: Expect) -> Self {
        self.expect = expect;
        self
    }

    fn limit(self, kinds: &[LimitKind]) -> Self {
        self.expect(Expect::Limit(kinds.to_vec()))
    }

    /// A longer `wall_time` than the suite's, so that only the limit under
    /// test can stop the job (the checks still hold it to the suite's).
    fn wall(mut self, wall_time: &str) -> Self {
        self.limits.push((
            "wall_time".to_owned(),
            toml::Value::String(wall_time.to_owned()),
        ));
        self
    }
}

fn attack(id: &str, class: Class, title: &str, kind: AttackKind) -> Attack {
    Attack {
        id: id.to_owned(),
        class,
        title: title.to_owned(),
        source: BUNDLED.to_owned(),
        kind,
    }
}

fn guest(id: &str, class: Class, title: &str, run: GuestRun) -> Attack {
    attack(id, class, title, AttackKind::Guest(run))
}

/// Every bundled attack, in run order.
pub fn bundled() -> Vec<Attack> {
    use Class::{CrossJob, Exhaustion, Filesystem, Lateral};
    use LimitKind as L;
    use Param::{BaitPort, CanaryDir, CanaryFile, Secret};
    let mut all = vec![
        // Reach the host filesystem.
        guest(
            "fs.dotdot",
            Filesystem,
            "climb out of /in and /out with `..` chains",
            hostile("read-dotdot-plain").input(),
        ),
        guest(
            "fs.trailing-slash",
            Filesystem,
            "`..` paths ending in `/` or `/.`, read and listed",
            hostile("read-trailing").input(),
        ),
        guest(
            "fs.climb-to-canary",
            Filesystem,
            "climb to the host canary's path with 1-12 `../` from each preopen",
            hostile("read-climb").input().param("target", CanaryFile),
        ),
        guest(
            "fs.long-paths",
            Filesystem,
            "paths past PATH_MAX, and deep real trees, climbing back out",
            hostile("read-long").param("target", CanaryFile),
        ),
        guest(
            "fs.absolute",
            Filesystem,
            "open host files by absolute path, the canary's included",
            hostile("read-abs").param("target", CanaryFile),
        ),
        guest(
            "fs.absolute-dir",
            Filesystem,
            "list host directories by absolute path, the canary's included",
            hostile("read-abs").param("target", CanaryDir),
        ),
        guest(
            "fs.symlink-file",
            Filesystem,
            "create symlinks to host files (relative, absolute) and follow them",
            hostile("symlink-escape")
                .input()
                .param("target", CanaryFile),
        ),
        guest(
            "fs.symlink-dir",
            Filesystem,
            "create symlinks to host directories and list, read, write through them",
            hostile("symlink-escape").param("target", CanaryDir),
        ),
        guest(
            "fs.write-inputs",
            Filesystem,
            "write, append, truncate, rename, delete the read-only inputs",
            hostile("write-in").input(),
        ),
        guest(
            "fs.hardlink",
            Filesystem,
            "hard-link inputs into /out and outputs out of it, then write",
            hostile("hardlink").input(),
        ),
        guest(
            "fs.rename",
            Filesystem,
            "rename files and the preopens themselves out of the compartment",
            hostile("rename-escape").input(),
        ),
        guest(
            "fs.leave-links",
            Filesystem,
            "leave symlinks to the canary and /etc/passwd in /out for output collection",
            hostile("leave-links").param("target", CanaryFile),
        ),
        guest(
            "fs.symlink-loop",
            Filesystem,
            "leave symlink loops in /out so a following walker never ends",
            hostile("symlink-loop"),
        ),
        guest(
            "fs.proc-dev",
            Filesystem,
            "read /proc/self, /dev and /sys, directly and via `..`",
            hostile("proc-dev"),
        ),
        guest(
            "fs.out-deep-long",
            Filesystem,
            "leave 15 directories of 255-byte names in /out: a 4095-byte path, past PATH_MAX on the host",
            hostile("out-deep").param("shape", Param::Lit("deep-long".into())),
        ),
        guest(
            "fs.out-deep-files",
            Filesystem,
            "leave a file at every level of a tree of 255-byte names in /out",
            hostile("out-deep").param("shape", Param::Lit("files-each-level".into())),
        ),
        guest(
            "fs.out-long-top",
            Filesystem,
            "leave 255-byte names at the top of /out and in a short chain",
            hostile("out-deep").param("shape", Param::Lit("long-top".into())),
        ),
        guest(
            "fs.out-names-control",
            Filesystem,
            "name outputs with CR, LF, ESC, TAB, DEL and U+0085, a directory too",
            hostile("out-names").param("set", Param::Lit("controls".into())),
        ),
        guest(
            "fs.out-names-format",
            Filesystem,
            "name outputs with U+202E and other bidi or invisible controls, quotes, `\\`, `%`, `;`",
            hostile("out-names").param("set", Param::Lit("format".into())),
        ),
        // Exhaust the host.
        guest(
            "exhaust.memory-alloc",
            Exhaustion,
            "allocate and touch 1 MiB chunks forever",
            hostile("memory-bomb").limit(&[L::Memory]),
        ),
        guest(
            "exhaust.memory-grow",
            Exhaustion,
            "`memory.grow` 64 MiB at a time, bypassing the allocator",
            hostile("memory-grow").limit(&[L::Memory]),
        ),
        guest(
            "exhaust.cpu-loop",
            Exhaustion,
            "spin in a loop forever",
            hostile("loop").limit(&[L::CpuTime]),
        ),
        guest(
            "exhaust.sleep",
            Exhaustion,
            "sleep for eleven days inside a host call",
            hostile("sleep").limit(&[L::WallTime]),
        ),
        guest(
            "exhaust.sleep-loop",
            Exhaustion,
            "sleep 10 ms at a time, forever",
            hostile("sleep-loop").limit(&[L::WallTime, L::CpuTime]),
        ),
        guest(
            "exhaust.host-call-loop",
            Exhaustion,
            "spin inside host calls (`stat`) rather than in wasm",
            hostile("host-call-loop").limit(&[L::CpuTime, L::WallTime]),
        ),
        guest(
            "exhaust.stack-native",
            Exhaustion,
            "unbounded recursion on the wasm stack",
            hostile("recursion-native").limit(&[L::Stack]),
        ),
        guest(
            "exhaust.stack-shadow",
            Exhaustion,
            "unbounded recursion on the shadow stack in linear memory",
            hostile("recursion").expect(Expect::Failed),
        ),
        guest(
            "exhaust.stdout-flood",
            Exhaustion,
            "flood stdout",
            hostile("stdout-flood").limit(&[L::Stdout]),
        ),
        guest(
            "exhaust.stderr-flood",
            Exhaustion,
            "flood stderr",
            hostile("stderr-flood").limit(&[L::Stderr]),
        ),
        guest(
            "exhaust.stdout-one-write",
            Exhaustion,
            "hand the host a 24 MiB buffer in one write call",
            hostile("stdout-one-write").limit(&[L::Stdout, L::Memory]),
        ),
        guest(
            "exhaust.disk-big",
            Exhaustion,
            "one ever-growing file in /out",
            hostile("disk-big").limit(&[L::Output]),
        ),
        guest(
            "exhaust.disk-append",
            Exhaustion,
            "an ever-growing file through an append handle",
            hostile("disk-append").limit(&[L::Output]),
        ),
        guest(
            "exhaust.disk-setsize",
            Exhaustion,
            "grow a file without writing (set-size to 10 GiB)",
            hostile("disk-setsize").limit(&[L::Output]),
        ),
        guest(
            "exhaust.disk-seek-write",
            Exhaustion,
            "write one byte 8 GiB past the end (sparse file)",
            hostile("disk-seek-write").limit(&[L::Output]),
        ),
        guest(
            "exhaust.disk-many",
            Exhaustion,
            "one-byte files until the disk gives up",
            hostile("disk-many").limit(&[L::OutputFiles]),
        ),
        guest(
            "exhaust.disk-link-create",
            Exhaustion,
            "create files through dangling symlinks to dodge the entry count (refused: nothing \
             is made through one)",
            hostile("disk-link-create").expect(Expect::Failed),
        ),
        guest(
            "exhaust.deep-dirs",
            Exhaustion,
            "an unbounded chain of nested directories",
            hostile("deep-dirs").limit(&[L::OutputFiles]),
        ),
        guest(
            "exhaust.fd-flood",
            Exhaustion,
            "open descriptors and never close them",
            hostile("fd-flood").input().limit(&[L::Descriptors]),
        ),
        guest(
            "exhaust.fd-streams",
            Exhaustion,
            "keep a stream on each file and drop its descriptor, so the count goes back",
            hostile("fd-streams")
                .input()
                .wall("10 s")
                .limit(&[L::Descriptors]),
        ),
        guest(
            "exhaust.fd-preopens",
            Exhaustion,
            "fetch the preopens again and drop them after each open, to give back a count",
            hostile("fd-preopens")
                .input()
                .wall("10 s")
                .limit(&[L::Descriptors]),
        ),
        guest(
            "exhaust.fd-dirs",
            Exhaustion,
            "hold directory descriptors and their listings",
            hostile("fd-dirs")
                .input()
                .wall("10 s")
                .limit(&[L::Descriptors]),
        ),
        guest(
            "exhaust.fd-every-way",
            Exhaustion,
            "streams, directories, appends, re-fetched preopens and churn, all in one job",
            hostile("fd-every-way")
                .input()
                .wall("10 s")
                .limit(&[L::Descriptors]),
        ),
        guest(
            "exhaust.every-call",
            Exhaustion,
            "make every WASI call on every kind of descriptor, each advice among them: each answered, none ending the worker",
            hostile("every-call").input().expect(Expect::Served),
        ),
        guest(
            "exhaust.cpu-huge-poll",
            Exhaustion,
            "make the host lift a 20,000-entry poll list into host memory, call after call",
            hostile("cpu-huge-poll")
                .param("entries", Param::Lit("20000".into()))
                .wall("10 s")
                .expect(Expect::Failed),
        ),
        guest(
            "exhaust.cpu-huge-path",
            Exhaustion,
            "hand the host a 16 MiB path in every `stat` call (a call may carry 4 MiB in)",
            hostile("cpu-huge-path").wall("10 s").expect(Expect::Failed),
        ),
        guest(
            "exhaust.disk-rewrite",
            Exhaustion,
            "rewrite the same bytes in place with fsync, forever (no growth)",
            hostile("disk-rewrite").limit(&[L::Written]),
        ),
        guest(
            "exhaust.disk-rewrite-at",
            Exhaustion,
            "positioned rewrites at offset 0 with fsync, forever",
            hostile("disk-rewrite-at").limit(&[L::Written]),
        ),
        guest(
            "exhaust.disk-truncate-regrow",
            Exhaustion,
            "truncate to zero and write again with fsync, forever",
            hostile("disk-truncate-regrow").limit(&[L::Output, L::Written]),
        ),
        guest(
            "exhaust.log-inject",
            Exhaustion,
            "terminal escapes, NULs, forged report lines and HTML on stdout/stderr",
            hostile("log-inject").expect(Expect::Any),
        ),
        // Move laterally.
        guest(
            "lateral.tcp-loopback",
            Lateral,
            "TCP to a host listener: IPv4, IPv6, mapped, 0.0.0.0, decimal",
            hostile("tcp-connect").param("port", BaitPort),
        ),
        guest(
            "lateral.tcp-metadata",
            Lateral,
            "TCP to the cloud metadata address and IPv6 link-local",
            hostile("tcp-linklocal"),
        ),
        guest(
            "lateral.udp",
            Lateral,
            "UDP datagrams to a host socket, IPv4 and IPv6",
            hostile("udp-send").param("port", BaitPort),
        ),
        guest(
            "lateral.listen",
            Lateral,
            "open listening sockets to be reached from outside",
            hostile("tcp-listen"),
        ),
        guest(
            "lateral.dns",
            Lateral,
            "resolve names, one carrying a secret (DNS exfiltration)",
            hostile("dns").param("canary", Secret),
        ),
        guest(
            "lateral.all-sockets",
            Lateral,
            "every socket kind std offers, in one job",
            hostile("socket").param("port", BaitPort),
        ),
        guest(
            "lateral.env",
            Lateral,
            "read environment, arguments, working directory and stdin for host secrets",
            hostile("env").expect(Expect::Any),
        ),
        guest(
            "lateral.harvest",
            Lateral,
            "walk everything reachable and read every file outside /in and /out",
            hostile("harvest").input(),
        ),
        // Leak across jobs.
        attack(
            "cross-job.memory",
            CrossJob,
            "plant a secret in memory and /out; later jobs in the same pool slot scan memory and files for it",
            AttackKind::Sequence {
                writer: hostile("canary-write").param("canary", Secret),
                reader: hostile("canary-scan")
                    .param("canary", Secret)
                    .param("fresh-mib", Param::Lit("8".into())),
                readers: 2,
            },
        ),
        attack(
            "cross-job.files",
            CrossJob,
            "leave a file in /out; a later job lists everything around it",
            AttackKind::Sequence {
                writer: hostile("canary-write").param("canary", Secret),
                reader: hostile("leftovers"),
                readers: 1,
            },
        ),
        attack(
            "cross-job.shared-input",
            CrossJob,
            "write into the shared empty /in of input-less jobs; a later job looks",
            AttackKind::Sequence {
                writer: hostile("write-in"),
                reader: hostile("leftovers"),
                readers: 1,
            },
        ),
    ];
    // The HTTP attacks run with the other lateral ones.
    let at = all
        .iter()
        .position(|a| a.class == CrossJob)
        .unwrap_or(all.len());
    all.splice(at..at, http_attacks());
    all.extend(bombs::catalog());
    all.extend(api::catalog());
    all.extend(forge::catalog());
    all.extend(artifacts::attacks());
    all.extend(second_wall::attacks());
    all
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::services as egress;

    #[test]
    fn attack_ids_are_unique_and_http_attacks_are_granted_the_allowed_service_only() {
        let all = bundled();
        let mut ids: Vec<&str> = all.iter().map(|a| a.id.as_str()).collect();
        ids.sort_unstable();
        ids.dedup();
        assert_eq!(ids.len(), all.len());
        for a in &all {
            if let AttackKind::Http(h) = &a.kind {
                assert_eq!(h.run.services, vec![egress::ALLOWED.to_owned()], "{}", a.id);
                assert!(a.local_only().is_some(), "{}", a.id);
            }
        }
    }
}
