//! Attacks on what the host keeps on disk for itself: the precompiled-module
//! cache (native code the host maps and runs) and the work directory. Another
//! local user plants an artifact under the pinned module's name, or prepares
//! the directories before the host first uses them. These run locally only:
//! they need the host's own directories. A planted artifact is planted in
//! the cache of the runner the suite's guests run in (a hardened worker's
//! zone cache, which the gateway writes and its workers read, or this
//! process's); the directory checks are the gateway's own, made in this
//! process in both modes.
//!
//! Held means, judged on the host: a planted artifact is never loaded (the
//! module is compiled from its pinned `.wasm`, the job behaves exactly as a
//! job of the pinned module does, and the planted file is replaced); a
//! directory others can write, or that another user owns, is refused before
//! the host writes anything into it, with an error naming it.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Instant;

use crate::harness::{self, Harness};
use crate::model::{Attack, AttackResult, Check, DirAttack, hello_wasm, hostile_wasm, ms};
use bulkhead::policy::Sha256Hex;
use std::sync::Arc;

use bulkhead::runner::Runner;
use bulkhead::sandbox::{JobSpec, Sandbox, SandboxConfig};
use bytes::Bytes;

fn chmod(path: &Path, mode: u32) -> std::io::Result<()> {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
}

/// Runs one attack.
pub async fn run_local(
    h: &Harness,
    attack: &Attack,
    kind: DirAttack,
    started: Instant,
) -> AttackResult {
    let area = h
        .scratch
        .join(format!("dirs-{}", uuid::Uuid::new_v4().simple()));
    let result = match kind {
        DirAttack::PlantedCopy | DirAttack::PlantedGarbage | DirAttack::PlantedLink => {
            planted(h, &area, kind).await
        }
        _ => refused(h, &area, kind),
    };
    let _ = std::fs::remove_dir_all(&area);
    match result {
        Ok((checks, stopped, attempted)) => {
            AttackResult::judge(attack, checks, stopped, None, ms(started)).unless_attempted(
                attempted,
                "cannot set up a directory another user owns without running as root",
            )
        }
        Err(e) => AttackResult::judge(attack, Vec::new(), String::new(), Some(e), ms(started)),
    }
}

type Outcome = Result<(Vec<Check>, String, bool), String>;

/// A runner over `work` and `cache` where the suite runs guests (a
/// hardened worker, or this process's sandbox).
async fn runner(h: &Harness, work: &Path, cache: &Path) -> Result<Arc<dyn Runner>, String> {
    let mut config = SandboxConfig::new(work);
    config.cache_dir = Some(cache.to_owned());
    config.max_concurrent_jobs = 1;
    harness::start_runner(config, &h.base.zone, &h.mode)
        .await
        .map(|(runner, _, _)| runner)
        .map_err(|e| e.to_string())
}

fn sandbox(work: &Path, cache: Option<&Path>) -> Result<Sandbox, String> {
    let mut config = SandboxConfig::new(work);
    config.cache_dir = cache.map(Path::to_owned);
    config.max_concurrent_jobs = 1;
    Sandbox::new(config).map_err(|e| e.to_string())
}

/// The first file named `name` under `dir`.
fn find(dir: &Path, name: &str) -> Option<PathBuf> {
    for entry in std::fs::read_dir(dir).ok()?.flatten() {
        let path = entry.path();
        if entry.file_name() == name {
            return Some(path);
        }
        if entry.file_type().ok()?.is_dir()
            && let Some(found) = find(&path, name)
        {
            return Some(found);
        }
    }
    None
}

/// The cache entry of the module whose `.wasm` has the sha256 `module`:
/// in this process's own cache `<engine key>/<module>.cwasm`; in a zone's
/// cache, the artifact the gateway recorded for it
/// (`zones/<zone>.records/<module>.json` names `<engine key>/<artifact
/// sha256>.cwasm` in `zones/<zone>`).
fn entry(cache: &Path, module: &Sha256Hex) -> Option<PathBuf> {
    if let Some(own) = find(cache, &format!("{module}.cwasm")) {
        return Some(own);
    }
    let record = find(cache, &format!("{module}.json"))?;
    let artifact: bulkhead::sandbox::Artifact =
        serde_json::from_slice(&std::fs::read(&record).ok()?).ok()?;
    let records = record.parent()?;
    let zone = records.with_file_name(records.file_name()?.to_str()?.strip_suffix(".records")?);
    Some(zone.join(&artifact.engine).join(artifact.handoff_name()))
}

async fn planted(h: &Harness, area: &Path, kind: DirAttack) -> Outcome {
    let cache = area.join("cache");
    let work = area.join("jobs");
    let hostile = hostile_wasm();
    let hello = hello_wasm();
    let hostile_name = Sha256Hex::digest(&hostile);
    let hello_name = Sha256Hex::digest(hello);

    // The attacker's module, compiled into the cache by the host itself
    // (where the suite runs guests: in a worker, into its zone's cache):
    // a genuine artifact of this engine, under its own name.
    {
        // Each runner its own work directory: a closed pool's directories
        // go some time after it closes.
        let first = runner(h, &work.join("first"), &cache).await?;
        let text = h.base.policy_text("suite-cache-other", &hostile, None, &[]);
        let loaded = first
            .load(harness::parse(&text)?, Bytes::copy_from_slice(&hostile))
            .await
            .map_err(|e| e.to_string());
        // The pinned module too: the plant then replaces a genuine entry
        // (tagged, or recorded by the gateway for a zone's cache), which
        // the host would otherwise load.
        let pinned = h.base.policy_text("suite-cache-pinned", hello, None, &[]);
        let loaded = match loaded {
            Ok(_) => first
                .load(harness::parse(&pinned)?, Bytes::from_static(hello))
                .await
                .map_err(|e| e.to_string()),
            Err(e) => Err(e),
        };
        first.close();
        loaded?;
    }
    let other = entry(&cache, &hostile_name)
        .filter(|p| p.is_file())
        .ok_or_else(|| format!("the cache holds no entry of {hostile_name} after compiling it"))?;
    let target = entry(&cache, &hello_name)
        .ok_or_else(|| format!("the cache holds no entry of {hello_name} after compiling it"))?;
    match kind {
        DirAttack::PlantedCopy => std::fs::copy(&other, &target).map(drop),
        DirAttack::PlantedGarbage => {
            let mut bytes = b"\x7fELF not really an artifact".to_vec();
            bytes.extend([0xa5; 32]);
            std::fs::write(&target, bytes)
        }
        _ => {
            let _ = std::fs::remove_file(&target);
            std::os::unix::fs::symlink(&other, &target)
        }
    }
    .map_err(|e| format!("cannot plant {}: {e}", target.display()))?;
    let planted = std::fs::read(&target).unwrap_or_default();

    // A restart: a new runner on the same cache loads the pinned module.
    let second = runner(h, &work.join("second"), &cache).await?;
    let text = h.base.policy_text("suite-cache-pinned", hello, None, &[]);
    let ran = async {
        let module = second
            .load(harness::parse(&text)?, Bytes::from_static(hello))
            .await
            .map_err(|e| e.to_string())?;
        let job = JobSpec::new();
        let finished = second
            .run(&module, &job, None)
            .await
            .map_err(|e| format!("the job was refused: {e}"))?;
        Ok::<_, String>((module, finished.report))
    }
    .await;
    second.close();
    let (module, report) = ran?;
    // The same module, compiled by the suite's own sandbox: what the pinned
    // module really does.
    let reference_job = JobSpec::new();
    let reference = h
        .main
        .run(&h.main.neighbour, &reference_job)
        .await
        .map_err(|e| format!("the reference job was refused: {e}"))?
        .report;

    let mut checks = Vec::new();
    checks.push(Check::new(
        "cache",
        !module.from_cache(),
        if module.from_cache() {
            "the host loaded the planted file as the pinned module's code".to_owned()
        } else {
            "the planted file was not loaded: the module was compiled from its pinned .wasm"
                .to_owned()
        },
    ));
    let same = report.succeeded() == reference.succeeded()
        && report.exit_code == reference.exit_code
        && report.stdout == reference.stdout
        && report.outputs == reference.outputs
        && report.skipped_outputs == reference.skipped_outputs;
    checks.push(Check::new(
        "behaviour",
        same,
        if same {
            format!(
                "the job behaved as the pinned module does (exit {:?}, {} bytes of stdout, {} outputs)",
                report.exit_code,
                report.stdout.bytes,
                report.outputs.len()
            )
        } else {
            format!(
                "the job did not behave as the pinned module: exit {:?} vs {:?}, stdout {:?} vs {:?}",
                report.exit_code, reference.exit_code, report.stdout.text, reference.stdout.text
            )
        },
    ));
    let meta = std::fs::symlink_metadata(&target);
    let replaced = meta.as_ref().is_ok_and(|m| m.is_file())
        && std::fs::read(&target).is_ok_and(|now| now != planted);
    checks.push(Check::new(
        "replaced",
        replaced,
        if replaced {
            "the planted entry was overwritten with the host's own artifact".to_owned()
        } else {
            format!(
                "the planted entry is still there ({})",
                if meta.is_ok_and(|m| m.file_type().is_symlink()) {
                    "a symlink"
                } else {
                    "unchanged"
                }
            )
        },
    ));
    let stopped = if module.from_cache() {
        "loaded from the cache".to_owned()
    } else {
        "artifact failed authentication; recompiled".to_owned()
    };
    Ok((checks, stopped, true))
}

fn refused(h: &Harness, area: &Path, kind: DirAttack) -> Outcome {
    std::fs::create_dir_all(area).map_err(|e| e.to_string())?;
    let root = is_root();
    let bad = match kind {
        DirAttack::WritableCacheParent => area.join("open").join("cache"),
        DirAttack::LinkedCache => area.join("link"),
        _ => area.join("dir"),
    };
    let setup = |e: std::io::Error| format!("cannot set up {}: {e}", bad.display());
    match kind {
        DirAttack::WritableCache | DirAttack::WritableWork => {
            std::fs::create_dir(&bad).map_err(setup)?;
            chmod(&bad, 0o777).map_err(setup)?;
        }
        DirAttack::WritableCacheParent => {
            std::fs::create_dir_all(&bad).map_err(setup)?;
            chmod(&bad, 0o700).map_err(setup)?;
            chmod(&area.join("open"), 0o777).map_err(setup)?;
        }
        DirAttack::LinkedCache => {
            let open = area.join("open");
            std::fs::create_dir(&open).map_err(setup)?;
            chmod(&open, 0o777).map_err(setup)?;
            std::os::unix::fs::symlink(&open, &bad).map_err(setup)?;
        }
        DirAttack::ForeignCache | DirAttack::ForeignWork => {
            if !root {
                return Ok((Vec::new(), "not run: needs root".to_owned(), false));
            }
            std::fs::create_dir(&bad).map_err(setup)?;
            chmod(&bad, 0o700).map_err(setup)?;
            std::os::unix::fs::chown(&bad, Some(65534), Some(65534)).map_err(setup)?;
        }
        _ => unreachable!("planted attacks are run by `planted`"),
    }
    let is_work = matches!(kind, DirAttack::WritableWork | DirAttack::ForeignWork);
    let work_ok = h.scratch.join("jobs");
    let result = if is_work {
        sandbox(&bad, None)
    } else {
        sandbox(&work_ok, Some(&bad))
    };
    let mut checks = Vec::new();
    let shown = bad.display().to_string();
    let (passed, detail, stopped) = match &result {
        Ok(_) => (
            false,
            format!("the host accepted {shown}"),
            "accepted".to_owned(),
        ),
        Err(e) if e.contains(&area.display().to_string()) => {
            (true, format!("refused: {e}"), "refused at start".to_owned())
        }
        Err(e) => (
            false,
            format!("refused, but without naming the directory: {e}"),
            "refused at start".to_owned(),
        ),
    };
    drop(result);
    checks.push(Check::new("refused", passed, detail));
    // Nothing of the host's was written into the attacker's directory.
    let written: Vec<String> = std::fs::read_dir(&bad)
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    checks.push(Check::new(
        "untouched",
        written.is_empty(),
        if written.is_empty() {
            format!("the host wrote nothing into {shown}")
        } else {
            format!("the host wrote {written:?} into {shown}")
        },
    ));
    Ok((checks, stopped, true))
}

fn is_root() -> bool {
    // SAFETY: `geteuid` has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}
