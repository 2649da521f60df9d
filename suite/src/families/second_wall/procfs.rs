//! What the host reads of a process from `/proc`, as the drill's judge:
//! namespaces, credentials and flags, limits, descriptors, mounts, and the
//! processes it started.

use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;

/// What the host saw of the drill at one moment.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    /// `/proc/<pid>/ns/<name>` -> link target, e.g. `net:[4026531840]`.
    pub ns: BTreeMap<String, String>,
    /// `/proc/<pid>/status` fields.
    pub status: BTreeMap<String, String>,
    /// `/proc/<pid>/limits`: name -> (soft, hard).
    pub limits: BTreeMap<String, (String, String)>,
    /// `/proc/<pid>/fd/<n>` -> link target.
    pub fds: BTreeMap<i32, String>,
    /// `/proc/<pid>/mountinfo`.
    pub mounts: String,
    /// Owner of `/proc/<pid>/mem` (root when the process is not dumpable;
    /// the directory itself keeps the process's uid either way).
    pub owner: Option<u32>,
}

fn proc(pid: u32) -> PathBuf {
    PathBuf::from(format!("/proc/{pid}"))
}

/// The namespace links of `pid` (`self` for this process).
pub fn ns_links(pid: &str) -> BTreeMap<String, String> {
    let dir = PathBuf::from(format!("/proc/{pid}/ns"));
    let mut out = BTreeMap::new();
    if let Ok(entries) = std::fs::read_dir(&dir) {
        for e in entries.flatten() {
            if let Ok(target) = std::fs::read_link(e.path()) {
                out.insert(
                    e.file_name().to_string_lossy().into_owned(),
                    target.to_string_lossy().into_owned(),
                );
            }
        }
    }
    out
}

/// `/proc/<pid>/status` as fields (`self` for this process).
pub fn status(pid: &str) -> BTreeMap<String, String> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
        .collect()
}

/// `/proc/<pid>/limits`: `Max open files` -> (soft, hard).
fn limits(pid: u32) -> BTreeMap<String, (String, String)> {
    let text = std::fs::read_to_string(proc(pid).join("limits")).unwrap_or_default();
    let mut out = BTreeMap::new();
    for line in text.lines().skip(1) {
        // The name is padded to 26 columns; then soft, hard, units.
        if line.len() < 26 {
            continue;
        }
        let (name, rest) = line.split_at(26);
        let mut cols = rest.split_whitespace();
        if let (Some(soft), Some(hard)) = (cols.next(), cols.next()) {
            out.insert(name.trim().to_owned(), (soft.to_owned(), hard.to_owned()));
        }
    }
    out
}

fn fds(pid: u32) -> BTreeMap<i32, String> {
    let mut out = BTreeMap::new();
    if let Ok(entries) = std::fs::read_dir(proc(pid).join("fd")) {
        for e in entries.flatten() {
            if let (Ok(n), Ok(target)) = (
                e.file_name().to_string_lossy().parse::<i32>(),
                std::fs::read_link(e.path()),
            ) {
                out.insert(n, target.to_string_lossy().into_owned());
            }
        }
    }
    out
}

/// What the host sees of `pid` now.
pub fn snapshot(pid: u32) -> Snapshot {
    Snapshot {
        ns: ns_links(&pid.to_string()),
        status: status(&pid.to_string()),
        limits: limits(pid),
        fds: fds(pid),
        mounts: std::fs::read_to_string(proc(pid).join("mountinfo")).unwrap_or_default(),
        owner: std::fs::metadata(proc(pid).join("mem"))
            .ok()
            .map(|m| m.uid()),
    }
}

/// `pid` and every process it started (and they started), each with its
/// thread count.
pub fn tree(root: u32) -> Vec<(u32, u64)> {
    let mut parent = BTreeMap::new();
    if let Ok(entries) = std::fs::read_dir("/proc") {
        for e in entries.flatten() {
            let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
                continue;
            };
            let Ok(stat) = std::fs::read_to_string(e.path().join("stat")) else {
                continue;
            };
            // `pid (comm) state ppid ...`; comm may hold spaces and parens.
            let Some(after) = stat.rfind(')').map(|i| &stat[i + 1..]) else {
                continue;
            };
            let mut fields = after.split_whitespace();
            let ppid = fields.nth(1).and_then(|p| p.parse::<u32>().ok());
            // Field 20 (num_threads) is the 18th after the comm.
            let threads = after
                .split_whitespace()
                .nth(17)
                .and_then(|t| t.parse::<u64>().ok())
                .unwrap_or(1);
            if let Some(ppid) = ppid {
                parent.insert(pid, (ppid, threads));
            }
        }
    }
    let mut out: Vec<(u32, u64)> = parent
        .get(&root)
        .map(|&(_, t)| vec![(root, t)])
        .unwrap_or_default();
    let mut i = 0;
    while i < out.len() {
        let p = out[i].0;
        for (&child, &(ppid, threads)) in &parent {
            if ppid == p && !out.iter().any(|(q, _)| *q == child) {
                out.push((child, threads));
            }
        }
        i += 1;
    }
    out
}
