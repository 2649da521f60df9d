//! Host-side meters around one attack: the process's CPU time and the
//! bytes it wrote, and the checks that hold a job to what its policy
//! allows of each (`host cpu`, `bytes written`), plus the bound on the
//! descriptors the process may hold during an attack. Judged from the
//! kernel's accounting of this process (`getrusage`, `/proc/self/io`),
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

/// The process's CPU time, in milliseconds (all threads, user and system).
fn process_cpu_ms() -> f64 {
    // SAFETY: `usage` is a valid, writable `rusage`.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: as above; `RUSAGE_SELF` always exists.
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) } != 0 {
        return 0.0;
    }
    let ms = |t: libc::timeval| t.tv_sec as f64 * 1000.0 + t.tv_usec as f64 / 1000.0;
    ms(usage.ru_utime) + ms(usage.ru_stime)
}

/// Bytes this process has passed to `write`-like calls (`wchar` in
/// `/proc/self/io`): every byte, whatever the filesystem, overwrites
/// included.
fn process_written() -> u64 {
    std::fs::read_to_string("/proc/self/io")
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
    /// Reads the meters.
    pub fn start() -> Self {
        Self {
            cpu_ms: process_cpu_ms(),
            written: process_written(),
        }
    }

    /// What was spent since [`Meters::start`].
    pub fn stop(self) -> Spent {
        Spent {
            cpu_ms: (process_cpu_ms() - self.cpu_ms).max(0.0),
            written: process_written().saturating_sub(self.written),
        }
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
                "the process used {:.0} ms of CPU during the attack (bound {cpu_bound:.0} ms: \
                 twice cpu_time, plus instantiation and the neighbour)",
                spent.cpu_ms
            ),
        ),
        Check::new(
            "bytes written",
            spent.written <= written_bound,
            format!(
                "the process wrote {} during the attack (bound {}: {WRITTEN_PER_OUTPUT} times \
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
        let m = Meters::start();
        let mut x = 0u64;
        for i in 0..5_000_000u64 {
            x = std::hint::black_box(x.wrapping_add(i));
        }
        let f = tempfile::tempfile().unwrap();
        std::io::Write::write_all(&mut &f, &[0u8; 65536]).unwrap();
        let spent = m.stop();
        assert!(spent.written >= 65536, "{spent:?}");
        assert!(spent.cpu_ms >= 0.0);
    }
}
