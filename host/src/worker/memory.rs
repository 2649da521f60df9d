//! A worker's memory: what its jobs may hold at once, all of them together
//! within its zone's memory ceiling.
//!
//! A worker past its ceiling is killed by the kernel with every job it
//! runs, other tenants' among them; so where a zone has a ceiling, a job is
//! sent only to a worker whose jobs, with it, cannot take more than the
//! ceiling leaves them ([`ZoneMemory::budget`]). What a job can take is
//! counted from its policy before it is sent ([`weight`]): its linear
//! memory, what a host call's arguments can take ([`LIFTED`]), its
//! tables, what the host holds for it (its captured stdout and
//! stderr and the report built from them, its directory listings, its inputs as they are handed over, the
//! headers, paths and authorities of its outbound requests where its policy
//! names services, its store), and, where the worker's directory is a tmpfs (whose pages are
//! charged to the worker's memory), its room there ([`super::disk`]).
//! What the worker holds whatever it runs comes off the ceiling first: its
//! runtime ([`WORKER_BASE`]) and what each of its places keeps between jobs
//! ([`per_place`]). A module one of whose jobs could not fit an idle worker
//! is refused at its load.
//!
//! A job that fits no worker waits, in turn: a later job is sent to a
//! worker only while that worker, with it, could still take every earlier
//! waiting job of its own tenant and of tenants holding no more of the
//! zone's memory than its tenant does — as a zone's disk does for its
//! rooms, so a large job is not passed for ever by smaller ones, and one
//! tenant's large jobs do not hold back every other tenant's.

use std::sync::Arc;

use super::turns::Turns;
use crate::policy::Policy;
use crate::sandbox::{
    HELD_PER_HANDLE, HOSTCALL_FUEL, MAX_CAPTURE, MAX_HANDLES_CALLING, MAX_LISTED,
};

/// What a worker holds whatever it runs: its runtimes, engine, channel
/// buffers and the code of its modules. (An idle worker is about 16 MiB
/// resident.)
pub const WORKER_BASE: u64 = 32 << 20;

/// What a job holds beside what its limits count: its store, instance,
/// WASI context, resource table, report.
pub const JOB_BASE: u64 = 4 << 20;

/// What one host call's arguments can take of host memory: the
/// [`HOSTCALL_FUEL`] wasmtime lets it carry in, a list's items each in an
/// allocation of its own (a 1-byte value, fuel 25, takes 56 bytes), and the
/// copy the host function may make of them before checking them.
pub const LIFTED: u64 = 5 * HOSTCALL_FUEL as u64;

/// What a report takes besides its captured text: its measurements,
/// failure, backtrace.
const REPORT_REST: u64 = 4 << 20;

/// Bytes a table element takes (a function reference).
const TABLE_ELEMENT: u64 = 8;

/// What each of a worker's places keeps resident between its jobs: the
/// part of each linear memory and table reset in place rather than given
/// back, and its guest stack.
pub fn per_place() -> u64 {
    crate::sandbox::kept_resident_per_place()
}

/// What one job of `policy`, given `inputs` bytes of inputs and stdin, can
/// take of its worker's memory, its room in the worker's directory aside.
pub fn weight(policy: &Policy, inputs: u64) -> u64 {
    let l = &policy.limits;
    let capture = |limit: u64| limit.min(MAX_CAPTURE as u64);
    let calls = if policy.network.services.is_empty() {
        0
    } else {
        // Every handle a headers resource or an outgoing request, each at
        // its most; and every call in flight with its response's window
        // sent down unread, each frame waiting taking at most its charge
        // of the window (`FRAME_COST`), twice over for what reading it
        // copies.
        let limits = crate::worker::calls::CallLimits::default();
        let windows = (limits.per_job as u64)
            .saturating_mul(u64::from(limits.window))
            .saturating_mul(2);
        ((MAX_HANDLES_CALLING * HELD_PER_HANDLE) as u64).saturating_add(windows)
    };
    let captures = capture(l.stdout.as_u64()).saturating_add(capture(l.stderr.as_u64()));
    // Its report, built after the guest ends: the captures' text, and its
    // JSON twice over (encoded, then framed), a byte of text taking up to
    // six of JSON, within what a report frame carries.
    let json = captures
        .saturating_mul(6)
        .saturating_add(REPORT_REST)
        .min(crate::worker::proto::MAX_UP_FRAME as u64);
    [
        l.memory.as_u64(),
        // A host call's string or list argument, copied out of the guest's
        // memory before anything checks it (a path, a write, a headers
        // list), within `HOSTCALL_FUEL`.
        LIFTED,
        u64::from(l.table_elements).saturating_mul(TABLE_ELEMENT),
        captures,
        captures,
        json.saturating_mul(2),
        MAX_LISTED,
        inputs,
        calls,
        JOB_BASE,
    ]
    .into_iter()
    .fold(0, u64::saturating_add)
}

/// What the compiled code of a module of `wasm_len` bytes takes of a
/// worker's memory once it is loaded: the artifact's length where the
/// worker is sent a recorded one (read into memory and checked there),
/// four times the module's bytes where it compiles its own (compiled
/// code runs to about three).
pub fn code(wasm_len: u64, artifact: Option<&crate::sandbox::Artifact>) -> u64 {
    artifact.map_or(wasm_len.saturating_mul(4), |a| a.len)
}

/// The most any job of `policy` can take ([`weight`] with its whole input
/// limit).
pub fn most(policy: &Policy) -> u64 {
    weight(policy, policy.limits.input.as_u64())
}

/// One zone's memory: what each of its workers' jobs may hold together,
/// and the jobs waiting for a worker with that much left.
#[derive(Debug)]
pub struct ZoneMemory {
    /// What one worker's jobs may take together: its ceiling less what it
    /// holds whatever it runs.
    pub budget: u64,
    /// What a worker holds whatever it runs ([`ZoneMemory::base`]).
    pub base: u64,
    /// The jobs waiting, by their turn, and what each tenant's jobs hold
    /// in the zone's workers now.
    turns: Turns,
}

/// A job's place among those waiting for a worker with memory for it.
#[derive(Debug)]
pub struct MemoryTurn<'a> {
    zone: &'a ZoneMemory,
    turn: u64,
    tenant: Arc<str>,
}

impl Drop for MemoryTurn<'_> {
    fn drop(&mut self) {
        self.zone.turns.leave(self.turn);
    }
}

impl ZoneMemory {
    /// A zone whose workers each have `ceiling` bytes and run
    /// `places` jobs at once; `None` when what they hold whatever they run
    /// leaves their jobs nothing.
    pub fn new(ceiling: u64, places: u32) -> Option<Self> {
        let base = Self::base(places);
        let budget = ceiling.checked_sub(base).filter(|b| *b > 0)?;
        Some(Self {
            budget,
            base,
            turns: Turns::default(),
        })
    }

    /// What a worker of a zone with `places` places holds whatever it
    /// runs.
    pub fn base(places: u32) -> u64 {
        WORKER_BASE.saturating_add(per_place().saturating_mul(u64::from(places.max(1))))
    }

    /// A turn for a job of `tenant` taking `bytes`, after every job already
    /// waiting.
    pub fn turn(&self, bytes: u64, tenant: &str) -> MemoryTurn<'_> {
        let (turn, tenant) = self.turns.enter(bytes, tenant);
        MemoryTurn {
            zone: self,
            turn,
            tenant,
        }
    }

    /// Whether the job of `turn`, taking `bytes`, may be sent to a worker
    /// whose jobs hold `held` now: they fit its budget together, and what
    /// is left still takes the largest earlier waiting job that holds this
    /// one back (its own tenant's, or one of a tenant holding no more of
    /// the zone's memory than its tenant).
    pub fn fits(&self, held: u64, bytes: u64, turn: &MemoryTurn<'_>) -> bool {
        let Some(left) = self
            .budget
            .checked_sub(held)
            .and_then(|l| l.checked_sub(bytes))
        else {
            return false;
        };
        left >= self.turns.ahead(turn.turn, &turn.tenant, u64::max)
    }

    /// `tenant`'s jobs hold `bytes` more (`more`) or fewer.
    pub fn hold(&self, tenant: &Arc<str>, bytes: u64, more: bool) {
        self.turns.hold(tenant, bytes, more);
    }
}

impl MemoryTurn<'_> {
    /// The tenant the turn is for.
    pub fn tenant(&self) -> &Arc<str> {
        &self.tenant
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    fn zone(budget: u64) -> ZoneMemory {
        let mut z = ZoneMemory::new(u64::MAX, 1).unwrap();
        z.budget = budget;
        z
    }

    #[test]
    fn a_job_fits_a_worker_only_within_what_its_jobs_hold_together() {
        let z = zone(300 * MIB);
        let t = z.turn(200 * MIB, "a");
        assert!(z.fits(0, 200 * MIB, &t));
        assert!(z.fits(100 * MIB, 200 * MIB, &t));
        assert!(!z.fits(101 * MIB, 200 * MIB, &t));
        assert!(!z.fits(400 * MIB, 0, &t));
    }

    #[test]
    fn a_later_job_leaves_room_for_an_earlier_waiting_one_of_a_tenant_holding_no_more() {
        let z = zone(300 * MIB);
        let big = z.turn(250 * MIB, "a");
        let small = z.turn(100 * MIB, "b");
        // Taken, the small one would leave 200: less than the big one.
        assert!(!z.fits(0, 100 * MIB, &small));
        assert!(z.fits(0, 250 * MIB, &big));
        drop(big);
        assert!(z.fits(0, 100 * MIB, &small));
    }

    #[test]
    fn a_waiting_job_does_not_hold_back_a_tenant_holding_less() {
        let z = zone(300 * MIB);
        let tenant_a: Arc<str> = Arc::from("a");
        z.hold(&tenant_a, 40 * MIB, true);
        let big = z.turn(250 * MIB, "a");
        let small = z.turn(100 * MIB, "b");
        // `a` holds more than `b`: its waiting job holds `b`'s back no more.
        assert!(z.fits(40 * MIB, 100 * MIB, &small));
        z.hold(&tenant_a, 40 * MIB, false);
        assert!(!z.fits(40 * MIB, 100 * MIB, &small));
        drop(big);
    }

    #[test]
    fn what_a_job_can_take_counts_its_limits_and_what_the_host_holds_for_it() {
        let mut policy: Policy = toml::from_str(&format!(
            "version = 1\n[module]\nname = \"m\"\nsha256 = \"{}\"\n[access]\nscopes = [\"m:run\"]\n",
            "0".repeat(64)
        ))
        .unwrap();
        policy.limits.memory = crate::policy::ByteSize::mib(100);
        policy.limits.stdout = crate::policy::ByteSize::gib(1);
        let w = weight(&policy, 3 * MIB);
        let captured = MAX_CAPTURE as u64 + policy.limits.stderr.as_u64();
        assert!(w >= 100 * MIB + captured + MAX_LISTED + 3 * MIB + JOB_BASE);
        assert!(most(&policy) >= w - 3 * MIB + policy.limits.input.as_u64());
    }
}
