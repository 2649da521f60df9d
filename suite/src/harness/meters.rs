//! Host-side meters around one attack: the CPU time of the process and of
//! the lane's worker processes, and the bytes they wrote, and the checks
//! that hold a job to what its policy allows of each (`host cpu`, `bytes
//! written`), plus the bound on the descriptors they may hold during an
//! attack. Judged from the kernel's accounting (`getrusage`,
//! `/proc/self/io`, a worker's `/proc/<pid>/stat` and `/proc/<pid>/io`),
//! never from the job's report.

use bulkhead::policy::ByteSize;
use bulkhead::sandbox::{JOB_OVERHEAD_DESCRIPTORS, WRITTEN_PER_OUTPUT};

use crate::model::Check;

/// Slack on the process's CPU during an attack: instantiation, the
/// neighbour job, the sampler threads, output collection, and one host
/// call's overshoot before the meter stops the job.
const CPU_SLACK_MS: f64 = 1000.0;
/// Slack on bytes written: the suite's own progress and logs.
const WRITTEN_SLACK: u64 = 1024 * 1024;
/// Descriptors the suite itself may open while an attack runs (its
/// sampler reading `/proc`, inotify, logging).
const SUITE_DESCRIPTORS: usize = 16;

/// The most descriptors the process may hold during an attack: the job at
/// its bound, the job's and the neighbour's own, and the suite's.
pub fn fd_peak_bound(max_open_per_job: u64, before: usize) -> usize {
    let jobs = max_open_per_job + 2 * JOB_OVERHEAD_DESCRIPTORS;
    before + usize::try_from(jobs).unwrap_or(usize::MAX) + SUITE_DESCRIPTORS
}

/// The process's CPU time, in milliseconds (all threads, user and system),
/// and that of its children that ended (a worker that died during an
/// attack is counted there once reaped).
fn process_cpu_ms() -> f64 {
    let ms = |t: libc::timeval| t.tv_sec as f64 * 1000.0 + t.tv_usec as f64 / 1000.0;
    let mut total = 0.0;
    for who in [libc::RUSAGE_SELF, libc::RUSAGE_CHILDREN] {
        // SAFETY: `usage` is a valid, writable `rusage`.
        let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
        // SAFETY: as above; both `who` values always exist.
        if unsafe { libc::getrusage(who, &mut usage) } == 0 {
            total += ms(usage.ru_utime) + ms(usage.ru_stime);
        }
    }
    total
}

/// A worker process's CPU time in milliseconds (`utime` + `stime` of
/// `/proc/<pid>/stat`) and the bytes it wrote (`wchar`).
fn worker_meters(pid: u32) -> (f64, u64) {
    // SAFETY: `sysconf` has no preconditions.
    let tick = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    let cpu = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| {
            // Fields after the command name, which may hold spaces.
            let rest = &stat[stat.rfind(')')? + 2..];
            let fields: Vec<&str> = rest.split_whitespace().collect();
            let utime: f64 = fields.get(11)?.parse().ok()?;
            let stime: f64 = fields.get(12)?.parse().ok()?;
            Some((utime + stime) * 1000.0 / tick)
        })
        .unwrap_or(0.0);
    (cpu, wchar(&format!("/proc/{pid}/io")))
}

/// Bytes this process has passed to `write`-like calls (`wchar` in
/// `/proc/self/io`): every byte, whatever the filesystem, overwrites
/// included.
fn process_written() -> u64 {
    wchar("/proc/self/io")
}

fn wchar(path: &str) -> u64 {
    std::fs::read_to_string(path)
        .ok()
        .and_then(|io| {
            io.lines()
                .find_map(|l| l.strip_prefix("wchar:")?.trim().parse().ok())
        })
        .unwrap_or(0)
}

/// The meters when an attack started.
#[derive(Debug)]
pub struct Meters {
    cpu_ms: f64,
    written: u64,
    /// Each worker process's, by pid.
    workers: std::collections::BTreeMap<u32, (f64, u64)>,
}

/// What the process spent while an attack ran.
#[derive(Debug, Default, Clone, Copy)]
pub struct Spent {
    /// CPU time, all threads.
    pub cpu_ms: f64,
    /// Bytes written.
    pub written: u64,
}

impl Meters {
    /// Reads the meters of this process and of the worker processes
    /// `workers` (whose spending counts as the host's).
    pub fn start(workers: &[u32]) -> Self {
        Self {
            cpu_ms: process_cpu_ms(),
            written: process_written(),
            workers: workers.iter().map(|&p| (p, worker_meters(p))).collect(),
        }
    }

    /// What was spent since [`Meters::start`], by this process and the
    /// worker processes `workers` (those started since counted whole).
    pub fn stop(self, workers: &[u32]) -> Spent {
        let mut spent = Spent {
            cpu_ms: (process_cpu_ms() - self.cpu_ms).max(0.0),
            written: process_written().saturating_sub(self.written),
        };
        for pid in workers {
            let (cpu, written) = worker_meters(*pid);
            let (cpu0, written0) = self.workers.get(pid).copied().unwrap_or_default();
            spent.cpu_ms += (cpu - cpu0).max(0.0);
            spent.written += written.saturating_sub(written0);
        }
        spent
    }
}

/// `host cpu` and `bytes written` for an attack under `cpu_ms` of CPU time
/// and `output` bytes of output.
pub fn checks(spent: &Spent, cpu_ms: f64, output: u64) -> Vec<Check> {
    let cpu_bound = cpu_ms * 2.0 + CPU_SLACK_MS;
    let written_bound = output.saturating_mul(WRITTEN_PER_OUTPUT) + WRITTEN_SLACK;
    vec![
        Check::new(
            "host cpu",
            spent.cpu_ms <= cpu_bound,
            format!(
                "the host used {:.0} ms of CPU during the attack (bound {cpu_bound:.0} ms: \
                 twice cpu_time, plus instantiation and the neighbour)",
                spent.cpu_ms
            ),
        ),
        Check::new(
            "bytes written",
            spent.written <= written_bound,
            format!(
                "the host wrote {} during the attack (bound {}: {WRITTEN_PER_OUTPUT} times \
                 the output limit, plus the suite's own)",
                ByteSize::bytes(spent.written),
                ByteSize::bytes(written_bound)
            ),
        ),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_process_meters_move() {
        let m = Meters::start(&[]);
        let mut x = 0u64;
        for i in 0..5_000_000u64 {
            x = std::hint::black_box(x.wrapping_add(i));
        }
        let f = tempfile::tempfile().unwrap();
        std::io::Write::write_all(&mut &f, &[0u8; 65536]).unwrap();
        let spent = m.stop(&[]);
        assert!(spent.written >= 65536, "{spent:?}");
        assert!(spent.cpu_ms >= 0.0);
    }
}
