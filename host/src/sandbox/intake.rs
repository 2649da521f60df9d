//! Module intake: what a module is, what it imports and whether its policy
//! grants it, decided from its bytes before anything is compiled; and the
//! adaptation of a WASIp1 core module into a component.
//!
//! Runs only where guest bytes may be parsed: inside [`Sandbox::load`]
//! (in worker mode, in the worker process). The gateway's
//! [`precheck`](super::precheck) looks at a module's header alone
//! ([`kind`]).
//!
//! - A **component** is taken as it is; its top-level imports are read with
//!   `wasmparser` (nested modules and components are skipped).
//! - A **WASIp1 core module** (Rust `wasm32-wasip1`, C with wasi-libc, Go
//!   `GOOS=wasip1`) must be a command: it exports `_start` and imports only
//!   `wasi_snapshot_preview1` functions the preview1 command adapter
//!   implements. It is then adapted with `wit-component`'s
//!   `ComponentEncoder` and the command adapter of
//!   `wasi-preview1-component-adapter-provider` (the same wasmtime release
//!   this host links), and the resulting component's imports are
//!   classified like any component's. The adapted bytes are a function of
//!   the uploaded bytes and the adapter; the digest pin stays on the
//!   uploaded bytes, and the module cache keys an adapted build by the
//!   digest of the adapted bytes (see `Sandbox::load`).
//!
//! Every import gets a [`Verdict`]: `granted` (linked), `inert` (linked,
//! every use refused) or `denied` (not linked for this policy). A denied
//! import fails the load with [`LoadError::DeniedImports`], naming the
//! import and the policy line that would grant it, or saying no policy
//! does, before the module is compiled.
//!
//! Nothing here runs guest code; malformed input is an error, never a panic
//! (`wit-component` is also run under `catch_unwind`).

use std::collections::BTreeSet;

use wasi_preview1_component_adapter_provider::{
    WASI_SNAPSHOT_PREVIEW1_ADAPTER_NAME, WASI_SNAPSHOT_PREVIEW1_COMMAND_ADAPTER,
};
use wasmparser::{Parser, Payload};

use super::LoadError;
use crate::policy::Policy;

/// What a module's header says it is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// A component (`wasm32-wasip2`).
    Component,
    /// A core module (`wasm32-wasip1`), adapted at load.
    CoreModule,
}

/// Judges `wasm` from its first eight bytes.
///
/// # Errors
/// Why it is neither a component nor a core module.
pub fn kind(wasm: &[u8]) -> Result<Kind, String> {
    match wasm.get(..8) {
        Some([0, b'a', b's', b'm', 0x0d, 0, 0x01, 0]) => Ok(Kind::Component),
        Some([0, b'a', b's', b'm', 1, 0, 0, 0]) => Ok(Kind::CoreModule),
        _ => Err("it is not a WebAssembly binary".into()),
    }
}

/// What the sandbox does with one import.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    /// Linked: the guest gets it, within its policy.
    Granted,
    /// Linked so ordinary programs instantiate, but every use is refused.
    Inert,
    /// Not linked under this policy: the module is refused at load.
    Denied,
}

impl std::fmt::Display for Verdict {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Granted => "granted",
            Self::Inert => "inert",
            Self::Denied => "denied",
        })
    }
}

/// One import and its verdict under a policy.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ImportVerdict {
    /// The import as the module names it (`wasi:http/types@0.2.10`, or
    /// `wasi_snapshot_preview1::sock_open` for a core module's).
    pub name: String,
    /// What the sandbox does with it.
    pub verdict: Verdict,
    /// Why; for a denied import, the policy line that would grant it or
    /// that none does.
    pub why: String,
}

impl std::fmt::Display for ImportVerdict {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:<8} {}  ({})", self.verdict, self.name, self.why)
    }
}

/// What loading a module found, for `bulkhead check` and logs: it crosses
/// a worker's channel in its `Loaded` answer, so the gateway shows it as
/// a worker's word (escaped when printed).
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct LoadInfo {
    /// The compiled code came from the module cache.
    pub from_cache: bool,
    /// It was adapted from a WASIp1 core module.
    pub adapted: bool,
    /// Its component's imports and their verdicts.
    #[serde(deserialize_with = "at_most::<_, _, MAX_IMPORTS>")]
    pub imports: Vec<ImportVerdict>,
    /// In a zone's cache (a worker), the compiled artifact now under the
    /// module's name: what the gateway may record, under its own rule.
    #[serde(default)]
    pub artifact: Option<super::cache::Artifact>,
}

/// Most imports a module may have: a worker reports each one's verdict,
/// and the gateway reads no longer list ([`at_most`]).
pub const MAX_IMPORTS: usize = 1024;

/// A list of at most `N` elements, for what the gateway reads from a
/// worker: a longer one is refused when its length is read, before any
/// element is (postcard writes it first), so a worker's frame costs the
/// gateway no more than the honest list it stands for (found by a tester:
/// a report naming 2.3 million made-up files, in one frame, took the
/// gateway 0.75 s of CPU to read).
///
/// # Errors
/// A longer list, or what its elements' decoding says.
pub fn at_most<'de, D, T, const N: usize>(d: D) -> Result<Vec<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: serde::Deserialize<'de>,
{
    Ok(d.deserialize_seq(AtMost::<T, N>(Vec::new()))?.0)
}

/// [`at_most`], of a list that may be absent.
///
/// # Errors
/// As [`at_most`].
pub fn at_most_if_any<'de, D, T, const N: usize>(d: D) -> Result<Option<Vec<T>>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: serde::Deserialize<'de>,
{
    Ok(<Option<AtMost<T, N>> as serde::Deserialize>::deserialize(d)?.map(|list| list.0))
}

/// [`at_most`], of a map (its keys kept once, the last value of each).
///
/// # Errors
/// As [`at_most`].
pub fn at_most_map<'de, D, K, V, const N: usize>(
    d: D,
) -> Result<std::collections::BTreeMap<K, V>, D::Error>
where
    D: serde::Deserializer<'de>,
    K: serde::Deserialize<'de> + Ord,
    V: serde::Deserialize<'de>,
{
    struct Visit<K, V, const N: usize>(std::marker::PhantomData<(K, V)>);
    impl<'de, K, V, const N: usize> serde::de::Visitor<'de> for Visit<K, V, N>
    where
        K: serde::Deserialize<'de> + Ord,
        V: serde::Deserialize<'de>,
    {
        type Value = std::collections::BTreeMap<K, V>;

        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "a map of at most {N} entries")
        }

        fn visit_map<A: serde::de::MapAccess<'de>>(
            self,
            mut map: A,
        ) -> Result<Self::Value, A::Error> {
            if let Some(len) = map.size_hint().filter(|&len| len > N) {
                return Err(serde::de::Error::invalid_length(len, &self));
            }
            let mut read = 0;
            let mut out = std::collections::BTreeMap::new();
            while let Some((k, v)) = map.next_entry()? {
                read += 1;
                if read > N {
                    return Err(serde::de::Error::invalid_length(read, &self));
                }
                out.insert(k, v);
            }
            Ok(out)
        }
    }
    d.deserialize_map(Visit::<K, V, N>(std::marker::PhantomData))
}

/// A list read by [`at_most`].
struct AtMost<T, const N: usize>(Vec<T>);

impl<'de, T: serde::Deserialize<'de>, const N: usize> serde::Deserialize<'de> for AtMost<T, N> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_seq(AtMost::<T, N>(Vec::new()))
    }
}

impl<'de, T: serde::Deserialize<'de>, const N: usize> serde::de::Visitor<'de> for AtMost<T, N> {
    type Value = Self;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "a list of at most {N}")
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(mut self, mut seq: A) -> Result<Self, A::Error> {
        if let Some(len) = seq.size_hint().filter(|&len| len > N) {
            return Err(serde::de::Error::invalid_length(len, &self));
        }
        while let Some(element) = seq.next_element()? {
            if self.0.len() == N {
                return Err(serde::de::Error::invalid_length(N + 1, &self));
            }
            self.0.push(element);
        }
        Ok(self)
    }
}

/// A module made ready to compile: the component's bytes (adapted, for a
/// core module) and its imports' verdicts.
#[derive(Debug)]
pub struct Prepared<'a> {
    /// The component to compile.
    pub component: std::borrow::Cow<'a, [u8]>,
    /// Whether it was adapted from a WASIp1 core module.
    pub adapted: bool,
    /// Every top-level import of the component, judged.
    pub imports: Vec<ImportVerdict>,
}

/// The `wasi` package version this host links (wasmtime-wasi's WASIp2);
/// any `0.2.x` import is served by it.
const WASI_MAJOR_MINOR: &str = "0.2.";

/// Interfaces wasmtime-wasi's command world and `wasi:http` provide, by
/// package: an import outside these is never linked.
const PROVIDED: &[(&str, &[&str])] = &[
    (
        "wasi:cli",
        &[
            "environment",
            "exit",
            "stdin",
            "stdout",
            "stderr",
            "terminal-input",
            "terminal-output",
            "terminal-stdin",
            "terminal-stdout",
            "terminal-stderr",
        ],
    ),
    ("wasi:io", &["error", "poll", "streams"]),
    ("wasi:clocks", &["monotonic-clock", "wall-clock"]),
    ("wasi:random", &["random", "insecure", "insecure-seed"]),
    ("wasi:filesystem", &["types", "preopens"]),
    (
        "wasi:sockets",
        &[
            "network",
            "instance-network",
            "tcp",
            "tcp-create-socket",
            "udp",
            "udp-create-socket",
            "ip-name-lookup",
        ],
    ),
    ("wasi:http", &["types", "outgoing-handler"]),
];

/// The verdict on one component import `name` under `policy`.
pub fn classify(name: &str, policy: &Policy) -> ImportVerdict {
    let (verdict, why) = judge(name, !policy.network.services.is_empty());
    ImportVerdict {
        name: name.to_owned(),
        verdict,
        why,
    }
}

fn judge(name: &str, gated: bool) -> (Verdict, String) {
    let none = "no policy grants it: this host does not provide it".to_owned();
    let (iface, version) = match name.split_once('@') {
        Some((iface, version)) => (iface, Some(version)),
        None => (name, None),
    };
    let Some((package, interface)) = iface.split_once('/') else {
        return (Verdict::Denied, none);
    };
    let known = PROVIDED
        .iter()
        .any(|(p, ifaces)| *p == package && ifaces.contains(&interface));
    if !known {
        return (Verdict::Denied, none);
    }
    if let Some(version) = version
        && !version.starts_with(WASI_MAJOR_MINOR)
    {
        return (
            Verdict::Denied,
            format!(
                "no policy grants it: this host provides {package} {WASI_MAJOR_MINOR}x, not {version}"
            ),
        );
    }
    match package {
        "wasi:cli" | "wasi:io" | "wasi:clocks" | "wasi:random" => {
            (Verdict::Granted, "always provided".into())
        }
        "wasi:filesystem" => (
            Verdict::Granted,
            "only /in (read-only) and /out (quota)".into(),
        ),
        "wasi:sockets" => (
            Verdict::Inert,
            "linked, every socket and lookup refused".into(),
        ),
        _ if gated => (
            Verdict::Granted,
            "only to the services in `network.services`, through the host's gate".into(),
        ),
        _ => (
            Verdict::Denied,
            "the policy names no services: add `network.services = [\"<service>\"]` \
             (a service the host's config declares) to grant it"
                .into(),
        ),
    }
}

/// Reads, classifies and (for a core module) adapts `wasm` for `policy`.
///
/// # Errors
/// [`LoadError::Unsupported`] for bytes that are not a module or
/// component, [`LoadError::Adapt`] for a core module that is not a WASIp1
/// command or that the adapter refuses, [`LoadError::DeniedImports`] for
/// imports the policy does not grant.
pub fn prepare<'a>(policy: &Policy, wasm: &'a [u8]) -> Result<Prepared<'a>, LoadError> {
    let module = policy.module.name.to_string();
    let unsupported = |reason: String| LoadError::Unsupported {
        module: module.clone(),
        reason,
    };
    let (component, adapted) = match kind(wasm).map_err(unsupported)? {
        Kind::Component => (std::borrow::Cow::Borrowed(wasm), false),
        Kind::CoreModule => (std::borrow::Cow::Owned(adapt(policy, wasm)?), true),
    };
    let names = component_imports(&component).map_err(|e| {
        unsupported(format!(
            "it is not a well-formed component: {}",
            first_line(&e)
        ))
    })?;
    if names.len() > MAX_IMPORTS {
        return Err(unsupported(format!(
            "it imports {} interfaces and functions, more than the {MAX_IMPORTS} a module may",
            names.len()
        )));
    }
    let imports: Vec<ImportVerdict> = names.iter().map(|n| classify(n, policy)).collect();
    refuse_denied(policy, &imports)?;
    Ok(Prepared {
        component,
        adapted,
        imports,
    })
}

fn refuse_denied(policy: &Policy, imports: &[ImportVerdict]) -> Result<(), LoadError> {
    if imports.iter().all(|v| v.verdict != Verdict::Denied) {
        Ok(())
    } else {
        Err(LoadError::DeniedImports {
            module: policy.module.name.to_string(),
            imports: imports.to_vec(),
        })
    }
}

/// The names of a component's own imports (not those of the modules and
/// components nested in it), in order.
fn component_imports(wasm: &[u8]) -> wasmparser::Result<Vec<String>> {
    let mut names = Vec::new();
    let mut depth = 0_usize;
    for payload in Parser::new(0).parse_all(wasm) {
        match payload? {
            Payload::ModuleSection { .. } | Payload::ComponentSection { .. } => depth += 1,
            Payload::End(_) => depth = depth.saturating_sub(1),
            Payload::ComponentImportSection(reader) if depth == 0 => {
                for import in reader {
                    names.push(shown(import?.name.name));
                }
            }
            _ => {}
        }
    }
    Ok(names)
}

/// The module name a WASIp1 core module imports its host functions from.
const P1_MODULE: &str = "wasi_snapshot_preview1";

/// The functions the preview1 command adapter implements.
fn adapter_functions() -> &'static BTreeSet<String> {
    static FUNCTIONS: std::sync::OnceLock<BTreeSet<String>> = std::sync::OnceLock::new();
    FUNCTIONS.get_or_init(|| {
        let mut names = BTreeSet::new();
        for payload in Parser::new(0).parse_all(WASI_SNAPSHOT_PREVIEW1_COMMAND_ADAPTER) {
            if let Ok(Payload::ExportSection(reader)) = payload {
                for export in reader.into_iter().flatten() {
                    if export.kind == wasmparser::ExternalKind::Func {
                        names.insert(export.name.to_owned());
                    }
                }
            }
        }
        names
    })
}

/// Checks that `wasm` is a WASIp1 command whose imports the adapter
/// provides, then adapts it into a component.
fn adapt(policy: &Policy, wasm: &[u8]) -> Result<Vec<u8>, LoadError> {
    let module = policy.module.name.to_string();
    let refuse = |reason: String| LoadError::Adapt {
        module: module.clone(),
        reason,
    };
    let mut imports = Vec::new();
    let mut has_start = false;
    let mut has_memory = false;
    for payload in Parser::new(0).parse_all(wasm) {
        match payload.map_err(|e| refuse(format!("it does not parse: {e}")))? {
            Payload::ImportSection(reader) => {
                for import in reader.into_imports() {
                    let import = import.map_err(|e| refuse(format!("it does not parse: {e}")))?;
                    imports.push((shown(import.module), shown(import.name)));
                }
            }
            Payload::ExportSection(reader) => {
                for export in reader {
                    let export = export.map_err(|e| refuse(format!("it does not parse: {e}")))?;
                    match (export.name, export.kind) {
                        ("_start", wasmparser::ExternalKind::Func) => has_start = true,
                        ("memory", wasmparser::ExternalKind::Memory) => has_memory = true,
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    // An import the adapter cannot provide is a denied import, named as
    // the module names it.
    let provided = adapter_functions();
    let judged: Vec<ImportVerdict> = imports
        .iter()
        .map(|(m, n)| {
            let (verdict, why) = if m == P1_MODULE && provided.contains(n) {
                (Verdict::Granted, "through the WASIp1 adapter".to_owned())
            } else if m == P1_MODULE {
                (
                    Verdict::Denied,
                    "no policy grants it: the WASIp1 adapter does not implement it".to_owned(),
                )
            } else {
                (
                    Verdict::Denied,
                    format!(
                        "no policy grants it: a WASIp1 module may import only from `{P1_MODULE}`"
                    ),
                )
            };
            ImportVerdict {
                name: format!("{m}::{n}"),
                verdict,
                why,
            }
        })
        .collect();
    refuse_denied(policy, &judged)?;
    if !has_start {
        return Err(refuse(
            "it exports no `_start` function: a WASIp1 reactor or library, not a command \
             (build it as a program with a `main`)"
                .into(),
        ));
    }
    if !has_memory {
        return Err(refuse("it exports no `memory`".into()));
    }
    let encode = || {
        wit_component::ComponentEncoder::default()
            .module(wasm)?
            .adapter(
                WASI_SNAPSHOT_PREVIEW1_ADAPTER_NAME,
                WASI_SNAPSHOT_PREVIEW1_COMMAND_ADAPTER,
            )?
            .encode()
    };
    match std::panic::catch_unwind(encode) {
        Ok(Ok(component)) => Ok(component),
        Ok(Err(e)) => Err(refuse(format!(
            "the WASIp1 adapter refuses it: {}",
            format!("{e:#}").lines().next().unwrap_or("")
        ))),
        Err(_) => Err(refuse("the WASIp1 adapter failed on it".into())),
    }
}

/// Longest import name kept, in bytes: names come from the guest's bytes
/// and are shown in terminals, logs and errors.
const MAX_NAME: usize = 256;

/// `name` as it may be shown: control and bidirectional-formatting
/// characters escaped, cut to [`MAX_NAME`] bytes. Names are only compared
/// against this host's own (printable) interface names, so an escaped name
/// is simply an unknown one.
fn shown(name: &str) -> String {
    let mut out = String::new();
    for c in name.chars() {
        let piece = if super::unprintable(c) {
            c.escape_unicode().to_string()
        } else {
            c.to_string()
        };
        if out.len() + piece.len() > MAX_NAME {
            out.push('…');
            break;
        }
        out.push_str(&piece);
    }
    out
}

fn first_line(e: &dyn std::fmt::Display) -> String {
    e.to_string().lines().next().unwrap_or("").to_owned()
}

#[cfg(test)]
mod tests {

    /// A worker's list longer than its bound is refused as its length is
    /// read; one within it, or absent, is read whole.
    #[test]
    fn a_list_past_its_bound_is_refused_unread() {
        #[derive(serde::Serialize, serde::Deserialize, Debug, PartialEq)]
        struct Frame {
            #[serde(deserialize_with = "at_most::<_, _, 3>")]
            list: Vec<String>,
            #[serde(deserialize_with = "at_most_if_any::<_, _, 3>")]
            maybe: Option<Vec<u32>>,
        }
        let frame = |n: usize, maybe: Option<Vec<u32>>| Frame {
            list: (0..n).map(|i| i.to_string()).collect(),
            maybe,
        };
        let read = |f: &Frame| postcard::from_bytes::<Frame>(&postcard::to_allocvec(f).unwrap());
        for f in [
            frame(3, None),
            frame(0, Some(vec![1, 2, 3])),
            frame(1, Some(vec![])),
        ] {
            assert_eq!(read(&f).unwrap(), f);
        }
        assert!(read(&frame(4, None)).is_err());
        assert!(read(&frame(1, Some(vec![1, 2, 3, 4]))).is_err());
        // A length far past what the frame holds is refused, not allocated.
        let mut forged = postcard::to_allocvec(&frame(0, None)).unwrap();
        forged[0] = 0xff;
        forged.splice(1..1, [0xff, 0xff, 0xff, 0x0f]);
        assert!(postcard::from_bytes::<Frame>(&forged).is_err());
        // In JSON, which says no length first, the element past it.
        let json = r#"{"list":["a","b","c","d"],"maybe":null}"#;
        assert!(serde_json::from_str::<Frame>(json).is_err());
        #[derive(serde::Serialize, serde::Deserialize, Debug, PartialEq)]
        struct Map {
            #[serde(deserialize_with = "at_most_map::<_, _, _, 2>")]
            map: std::collections::BTreeMap<u32, String>,
        }
        let map = |n: u32| Map {
            map: (0..n).map(|i| (i, i.to_string())).collect(),
        };
        let read = |m: &Map| postcard::from_bytes::<Map>(&postcard::to_allocvec(m).unwrap());
        assert_eq!(read(&map(2)).unwrap(), map(2));
        assert!(read(&map(3)).is_err());
        assert!(serde_json::from_str::<Map>(r#"{"map":{"1":"a","1":"b","1":"c"}}"#).is_err());
    }

    use super::*;

    fn policy(services: &[&str]) -> Policy {
        let text = format!(
            "version = 1\n[module]\nname = \"demo\"\nsha256 = \"{}\"\n",
            "0".repeat(64)
        );
        let mut policy = Policy::parse(&text, std::path::Path::new("demo.toml")).unwrap();
        policy.network.services = services
            .iter()
            .map(|s| crate::policy::ServiceName::new(*s).unwrap())
            .collect();
        policy
    }

    #[test]
    fn wasi_http_is_denied_without_services_with_the_line_that_grants_it() {
        let v = classify("wasi:http/types@0.2.10", &policy(&[]));
        assert_eq!(v.verdict, Verdict::Denied);
        assert!(v.why.contains("network.services"), "{}", v.why);
        let v = classify("wasi:http/outgoing-handler@0.2.0", &policy(&["palette"]));
        assert_eq!(v.verdict, Verdict::Granted);
    }

    #[test]
    fn unknown_interfaces_and_other_wasi_versions_are_denied_by_no_policy() {
        for name in [
            "acme:secrets/vault@1.0.0",
            "wasi:cli/not-an-interface@0.2.0",
            "wasi:cli/environment@0.3.0",
            "bare-function",
        ] {
            let v = classify(name, &policy(&["palette"]));
            assert_eq!(v.verdict, Verdict::Denied, "{name}");
            assert!(
                v.why.starts_with("no policy grants it"),
                "{name}: {}",
                v.why
            );
        }
        let v = classify("wasi:sockets/tcp@0.2.3", &policy(&[]));
        assert_eq!(v.verdict, Verdict::Inert);
        let v = classify("wasi:filesystem/preopens@0.2.0", &policy(&[]));
        assert_eq!(v.verdict, Verdict::Granted);
    }

    #[test]
    fn the_adapter_implements_the_usual_wasip1_functions() {
        let f = adapter_functions();
        for name in ["fd_write", "fd_read", "path_open", "proc_exit", "args_get"] {
            assert!(f.contains(name), "{name} missing from {f:?}");
        }
    }

    #[test]
    fn import_names_are_shown_escaped_and_bounded() {
        assert_eq!(shown("wasi:cli/stdout@0.2.0"), "wasi:cli/stdout@0.2.0");
        assert_eq!(shown("a\u{1b}[2Jb\u{202e}"), "a\\u{1b}[2Jb\\u{202e}");
        assert!(shown(&"x".repeat(10_000)).len() <= MAX_NAME + '…'.len_utf8());
    }

    #[test]
    fn headers_are_told_apart() {
        assert_eq!(kind(b"\0asm\x0d\0\x01\0rest"), Ok(Kind::Component));
        assert_eq!(kind(b"\0asm\x01\0\0\0rest"), Ok(Kind::CoreModule));
        assert!(kind(b"\0asm\x02\0\0\0").is_err());
        assert!(kind(b"#!/bin/sh\n").is_err());
    }
}
