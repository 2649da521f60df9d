//! The worker process: hardens itself, then compiles and runs what the
//! gateway sends it.
//!
//! Order matters and is the point: arguments (from the gateway, trusted)
//! are read first; then [`harden::apply`] runs while the process is still
//! single-threaded; only then do the async runtimes (one for guests, one
//! for the channel), the sandbox and the channel's reader start, and the
//! first guest byte arrives after the worker has told the gateway which
//! layers it applied. When the channel closes (the gateway is gone or let
//! it go) the worker exits at once.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{oneshot, watch};

use super::calls::{CallLimits, CallSink, WorkerCalls};
use super::link::Link;
use super::proto::{self, Down, MAX_DOWN_FRAME, MAX_UP_FRAME, Up};
use super::{CHANNEL_FD, WorkerArgs, harden, process};
use crate::policy::{Policy, Sha256Hex};
use crate::sandbox::{JobDir, LoadError, LoadedModule, Sandbox, SandboxConfig};

/// The most a job's report may take in its frame: the frame's bound less
/// room for the message around it.
const REPORT_BUDGET: usize = MAX_UP_FRAME - (64 << 10);

/// How long a guest runs before the worker says so (`Up::Running`).
const RUNNING_AFTER: Duration = Duration::from_millis(100);

/// How often the channel's thread looks for guests running that long.
const RUNNING_TICK: Duration = Duration::from_millis(50);

/// The longest compile error message sent back.
const MAX_LOAD_MESSAGE: usize = 16 << 10;

/// A module as the worker holds it: compiled once, on its `Load`.
type Compiled = tokio::sync::watch::Receiver<Option<Result<Arc<LoadedModule>, LoadError>>>;

/// Signals that ask a process to stop or that come from a terminal, which
/// a worker ignores: they are meant for the service (`kill -- -PGID`, a
/// unit's control group, `pkill bulkhead`, Ctrl-C, a closed terminal),
/// whose drain decides when its workers go — by closing their channels,
/// or by dying, which kills them (`PR_SET_PDEATHSIG`). A worker that
/// heeded them would die under its running jobs before the drain began,
/// and fail them. (SIGKILL and SIGSTOP cannot be ignored: those are
/// faults.)
pub const IGNORED_SIGNALS: [libc::c_int; 6] = [
    libc::SIGTERM,
    libc::SIGINT,
    libc::SIGHUP,
    libc::SIGQUIT,
    libc::SIGTSTP,
    libc::SIGTTIN,
];

fn ignore_stop_requests() {
    for signal in IGNORED_SIGNALS {
        // SAFETY: setting a disposition to SIG_IGN installs no handler;
        // the process is still single-threaded.
        unsafe { libc::signal(signal, libc::SIG_IGN) };
    }
}

/// The worker's entry point: `args` is its [`WorkerArgs`] as JSON.
pub fn main(args: &OsStr) -> ExitCode {
    let Some(args) = args
        .to_str()
        .and_then(|a| serde_json::from_str::<WorkerArgs>(a).ok())
    else {
        return ExitCode::from(2);
    };
    let Some(channel) = process::inherited_channel() else {
        return ExitCode::from(2);
    };
    ignore_stop_requests();
    // Before any thread starts: large blocks are mappings of their own,
    // given back when freed, and the arenas are few.
    crate::serve::memory::tune();
    // Job directories are made, opened and removed relative to the working
    // directory, which is the work directory handed over: each path through
    // `/proc/self/fd/N` cost a walk of procfs per call.
    // SAFETY: WORK_FD was handed over open by the gateway; fchdir(2) has
    // no memory effects.
    if unsafe { libc::fchdir(super::WORK_FD) } != 0 {
        return ExitCode::from(2);
    }
    let applied = harden::apply(&args.plan(CHANNEL_FD));
    // Two runtimes. Guests run on `guest_runtime`, two threads that check
    // for timers and I/O after every poll (`event_interval(1)`): a poll
    // can last as long as one host call (lifting a path of the guest's
    // whole memory, say), and by default a thread looks at its timers only
    // every 61 polls, so guests whose host calls kept both threads busy
    // could hold every other job's clock still for seconds. The channel
    // runs on `channel_runtime`, a runtime of its own on this thread with
    // its own driver, which runs no guest: the gateway's frames are read,
    // pings answered and reports written however busy the guests keep
    // theirs.
    let guest_runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(super::GUEST_THREADS as usize)
        .event_interval(1)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(_) => return ExitCode::from(2),
    };
    let channel_runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(_) => return ExitCode::from(2),
    };
    let guests = guest_runtime.handle().clone();
    channel_runtime.block_on(async move {
        if channel.set_nonblocking(true).is_err() {
            return ExitCode::from(2);
        }
        // Registered with the guests' runtime, whose threads read it: a
        // job's `Run` is read by a guest thread, which then runs the job
        // (`serve`), rather than by this thread, which would have to wake
        // one.
        let framed = {
            let _guests = guests.enter();
            proto::split(channel, MAX_DOWN_FRAME, MAX_UP_FRAME)
        };
        let Ok((mut reader, mut writer)) = framed else {
            return ExitCode::from(2);
        };
        let started = applied.map_err(|e| e.to_string()).and_then(|applied| {
            let mut config = SandboxConfig::new(".");
            config.cache_dir = Some(args.cache_dir.clone());
            config.max_concurrent_jobs = args.max_concurrent_jobs;
            config.dirs_handed_over = true;
            Sandbox::new(config)
                .map(|s| (applied, s))
                .map_err(|e| e.to_string())
        });
        let (applied, sandbox) = match started {
            Ok(s) => s,
            Err(error) => {
                let _ = proto::send(&mut writer, &Up::StartFailed { error }).await;
                return ExitCode::from(3);
            }
        };
        let hello = Up::Hello {
            version: proto::VERSION,
            pid: std::process::id(),
            applied,
        };
        if proto::send(&mut writer, &hello).await.is_err() {
            return ExitCode::from(3);
        }
        match proto::recv::<Down>(&mut reader).await {
            Ok(Down::Hello { version }) if version == proto::VERSION => {}
            _ => return ExitCode::from(3),
        }
        let places = args.max_concurrent_jobs;
        serve(
            Arc::new(sandbox),
            guests,
            args.give_back,
            places,
            reader,
            writer,
        )
        .await;
        ExitCode::SUCCESS
    })
}

/// What the worker keeps between frames.
struct State {
    sandbox: Arc<Sandbox>,
    /// The runtime guests (and everything done for them) run on.
    guests: tokio::runtime::Handle,
    up: Arc<Link>,
    calls: WorkerCalls,
    modules: Mutex<HashMap<u64, Compiled>>,
    /// Running jobs' cancel triggers.
    cancels: Mutex<HashMap<u64, oneshot::Sender<()>>>,
    /// Finished jobs' directories, kept until the gateway has copied their
    /// outputs.
    dirs: Mutex<HashMap<u64, JobDir>>,
    /// Jobs whose guest has started, since when, until their `Running` is
    /// sent (by the channel's thread, [`say_running`]) or they end.
    started: Mutex<HashMap<u64, Instant>>,
    /// What a job's host allocations freed goes back to the system before
    /// its report ([`WorkerArgs::give_back`]).
    give_back: bool,
    /// When the reader last took a frame off the channel ([`vouch`]).
    last_read: Mutex<Instant>,
}

async fn serve(
    sandbox: Arc<Sandbox>,
    guests: tokio::runtime::Handle,
    give_back: bool,
    places: u32,
    mut reader: proto::Reader,
    writer: proto::Writer,
) {
    // Frames go up from the thread that sends them (a report from its
    // guest's thread); what the socket does not take at once is written
    // by `drain`, on this thread.
    let up = Arc::new(Link::new(writer.into_inner(), MAX_UP_FRAME));
    // A call's frames go up the same way as reports, in the order sent, so
    // none of them can arrive after the report of the job that made the
    // call.
    let calls_up = Arc::clone(&up);
    let calls = WorkerCalls::with_sink(
        CallSink::new(move |frame| {
            send(&calls_up, Up::Call(frame));
            true
        }),
        CallLimits::for_places(places),
    );
    let draining = Arc::downgrade(&up);
    let pump = async move {
        if Link::drain(draining).await.is_err() {
            // The gateway is gone: nothing left to work for.
            std::process::exit(0);
        }
    };
    let state = Arc::new(State {
        sandbox,
        guests,
        up,
        calls,
        modules: Mutex::default(),
        cancels: Mutex::default(),
        dirs: Mutex::default(),
        started: Mutex::default(),
        give_back,
        last_read: Mutex::new(Instant::now()),
    });
    let ticking = Arc::clone(&state);
    let tick = async move {
        let mut tick = tokio::time::interval(RUNNING_TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            say_running(&ticking);
            vouch(&ticking);
            push(&ticking);
        }
    };
    let reading = Arc::clone(&state);
    let guests = state.guests.clone();
    let read = async move {
        loop {
            let message = match proto::recv::<Down>(&mut reader).await {
                Ok(m) => m,
                // Closed or broken: the gateway let this worker go.
                Err(_) => std::process::exit(0),
            };
            *lock(&reading.last_read) = Instant::now();
            match message {
                Down::Hello { .. } => std::process::exit(3),
                Down::Load {
                    module,
                    policy_json,
                    policy_sha256,
                    wasm,
                    artifact,
                    hand_over,
                } => load(
                    &state,
                    module,
                    policy_json,
                    policy_sha256,
                    (wasm.0, artifact),
                    hand_over,
                ),
                Down::Run { job, module, spec } => {
                    let (cancel, cancelled) = oneshot::channel();
                    lock(&state.cancels).insert(job, cancel);
                    state
                        .guests
                        .spawn(run(Arc::clone(&state), job, module, spec, cancelled));
                }
                Down::Cancel { job } => {
                    if let Some(cancel) = lock(&state.cancels).remove(&job) {
                        let _ = cancel.send(());
                    }
                    let dir = lock(&state.dirs).remove(&job);
                    drop(dir);
                }
                Down::Release { job } => {
                    // An empty `/out` without inputs goes with one `rmdir`
                    // here; anything more on blocking threads (as on
                    // `Cancel`): `JobDir::removed_on`.
                    let dir = lock(&state.dirs).remove(&job);
                    drop(dir);
                }
                Down::Call(down) => state.calls.deliver(down),
                Down::Ping { seq } => send(&state.up, Up::Pong { seq }),
            }
        }
    };
    // The channel is read on the guests' threads: a job's `Run` is read
    // by the thread that then runs it (spawned from there, it goes first
    // in that thread's queue). What the socket did not take at once is
    // written, and `Running` said, on this thread and its own runtime,
    // which runs no guest; so is the worker vouched for while guests' host
    // calls hold every thread of theirs and frames wait unread (`vouch`).
    let read = guests.spawn(read);
    let read = async move {
        // The reader panicked: nothing reads the channel any more.
        if read.await.is_err() {
            std::process::exit(3);
        }
    };
    futures_util::future::join3(pump, read, tick).await;
}

/// Sends `message` up (its [`stand_in`] if it is too large); exits when
/// the gateway is gone, as there is nothing left to work for.
fn send(up: &Link, message: Up) {
    if up.send(message, stand_in).is_err() {
        std::process::exit(0);
    }
}

/// What is sent instead of a message whose frame would be over the
/// channel's bound: the failure of the one job or module it was about.
/// Reports are cut to fit before they get here ([`REPORT_BUDGET`]); a
/// module's answer can still be too large (a component with a vast
/// import list).
fn stand_in(up: Up) -> Option<Up> {
    let too_large = |what: &str| format!("{what} is larger than a worker's channel carries");
    match up {
        Up::Report { job, .. } => Some(Up::Report {
            job,
            result: Err(too_large("the job's report")),
            created: proto::CreatedFiles::default(),
        }),
        Up::Loaded { module, .. } => Some(Up::Loaded {
            module,
            result: Err(LoadError::Compile {
                module: String::new(),
                message: too_large("what the worker found in the module (its imports)"),
            }),
        }),
        _ => None,
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn load(
    state: &Arc<State>,
    module: u64,
    policy_json: String,
    policy_sha256: Option<String>,
    (wasm, artifact): (bytes::Bytes, Option<crate::sandbox::Artifact>),
    hand_over: bool,
) {
    let (done, compiled) = watch::channel(None);
    lock(&state.modules).insert(module, compiled);
    let state = Arc::clone(state);
    let guests = state.guests.clone();
    guests.spawn(async move {
        let sandbox = Arc::clone(&state.sandbox);
        let unreadable = |message: String| LoadError::Compile {
            module: String::new(),
            message,
        };
        let compiled = match serde_json::from_str::<Policy>(&policy_json) {
            Ok(mut policy) => {
                policy.source_sha256 = policy_sha256.and_then(|s| Sha256Hex::new(s).ok());
                // Only the artifact the gateway recorded is loaded from
                // the zone's cache, read into memory and checked there;
                // what is compiled is handed over in this worker's own
                // directory (see `sandbox::cache`).
                tokio::task::spawn_blocking(move || {
                    sandbox.load_expecting(policy, &wasm, artifact.as_ref(), hand_over)
                })
                .await
                .unwrap_or_else(|e| Err(unreadable(format!("compilation stopped: {e}"))))
            }
            Err(e) => Err(unreadable(format!("unreadable policy: {e}"))),
        };
        let result = compiled
            .as_ref()
            .map(|m| m.info())
            .map_err(|e| bounded_load_error(e.clone()));
        done.send_replace(Some(compiled));
        if state.give_back {
            // What compiling took goes back before the gateway hears of
            // the load: an idle worker holding more than its base and its
            // modules' code is replaced (`Pool::round`).
            crate::serve::memory::trim();
        }
        send(&state.up, Up::Loaded { module, result });
    });
}

/// `error`, cut to [`MAX_LOAD_MESSAGE`] when what it says is longer (a
/// compiler's message about hostile bytes can be), so that its `Loaded`
/// always fits its frame.
fn bounded_load_error(error: LoadError) -> LoadError {
    let message = error.to_string();
    if message.len() <= MAX_LOAD_MESSAGE {
        return error;
    }
    let end = message.floor_char_boundary(MAX_LOAD_MESSAGE);
    LoadError::Compile {
        module: String::new(),
        message: message[..end].to_owned(),
    }
}

/// Sends `Running` for every job whose guest has run for
/// [`RUNNING_AFTER`]. Called on the channel's thread, which no guest
/// holds, so a guest stuck in a host call cannot keep the gateway's clock
/// from starting; a job that ends sooner sends only its report. Sent
/// under the `started` lock, which a job takes to leave it before its
/// report, so no `Running` follows its job's report.
fn say_running(state: &State) {
    let mut started = lock(&state.started);
    let now = Instant::now();
    started.retain(|&job, since| {
        if now.duration_since(*since) < RUNNING_AFTER {
            return true;
        }
        send(&state.up, Up::Running { job });
        false
    });
}

/// How long frames may wait unread on the channel, with the reader taking
/// none, before the channel's thread vouches for the worker.
const VOUCH_AFTER: Duration = Duration::from_secs(1);

/// Says the worker is there (`Pong { seq: 0 }`, which no ping carries)
/// when frames have waited unread for [`VOUCH_AFTER`] with the reader
/// taking none: guests' host calls hold every guest thread, so the
/// gateway's pings wait with them. Called on the channel's thread, which
/// no guest holds: one guest's long host calls do not make the gateway
/// fault the worker, and every other job on it, as silent. A worker that
/// hangs vouches for nothing.
fn vouch(state: &State) {
    let behind = lock(&state.last_read).elapsed() >= VOUCH_AFTER;
    // SAFETY: CHANNEL_FD is the channel, open for the worker's life.
    let channel = unsafe { std::os::fd::BorrowedFd::borrow_raw(CHANNEL_FD) };
    if behind && rustix::io::ioctl_fionread(channel).is_ok_and(|n| n > 0) {
        *lock(&state.last_read) = Instant::now();
        send(&state.up, Up::Pong { seq: 0 });
    }
}

/// Writes what waits for the drain, as far as the socket takes it, from
/// the channel's thread: the drain learns that the socket takes more from
/// the guests' runtime, with which the channel is registered, and guests'
/// host calls may hold every thread of it; a vouch, or a report, waiting
/// behind what the gateway had not read would wait with them.
fn push(state: &State) {
    // SAFETY: CHANNEL_FD is the channel, open for the worker's life.
    let channel = unsafe { std::os::fd::BorrowedFd::borrow_raw(CHANNEL_FD) };
    if state.up.push(channel).is_err() {
        // The gateway is gone: nothing left to work for.
        std::process::exit(0);
    }
}

/// A job's place in [`State::started`], left when the job ends however it
/// ends (a cancelled job's future is dropped).
struct Started<'a> {
    state: &'a State,
    job: u64,
}

impl<'a> Started<'a> {
    fn new(state: &'a State, job: u64) -> Self {
        lock(&state.started).insert(job, Instant::now());
        Self { state, job }
    }
}

impl Drop for Started<'_> {
    fn drop(&mut self) {
        lock(&self.state.started).remove(&self.job);
    }
}

async fn run(
    state: Arc<State>,
    job: u64,
    module: u64,
    spec: crate::job::JobSpec,
    cancelled: oneshot::Receiver<()>,
) {
    let work = async {
        let compiled = lock(&state.modules).get(&module).cloned();
        let Some(mut compiled) = compiled else {
            return Err(format!("module {module} was never loaded in this worker"));
        };
        let loaded = compiled
            .wait_for(Option::is_some)
            .await
            .map_err(|_| "module compilation stopped".to_owned())?
            .clone()
            .expect("waited for Some")
            .map_err(|e| e.to_string())?;
        // Removed off the async threads whenever it goes — on cancel too,
        // when this future is dropped with the guest's tree in it.
        let dir = JobDir::create(&state.sandbox.config().work_dir, &format!("j{job}"))
            .map_err(|e| format!("cannot prepare job directory: {e}"))?
            .removed_on(state.guests.clone())
            .then_removed({
                let up = Arc::clone(&state.up);
                move || send(&up, Up::Released { job })
            });
        let egress =
            (!loaded.policy().network.services.is_empty()).then(|| state.calls.egress(job));
        // The gateway's watchdog starts at `Running`, sent only once the
        // guest has run for `RUNNING_AFTER` ([`say_running`]): a job that
        // ends sooner costs one frame up (its report), not two, and the
        // gateway's clock never starts before the guest did.
        let result = {
            let _started = Started::new(&state, job);
            state.sandbox.run_with(&loaded, &spec, &dir, egress).await
        };
        if state.give_back {
            // The gateway counts an ended job's memory as free once its
            // report is in: the allocator's arenas keep what the job's
            // host state freed (headers, listings, handles) unless told
            // to give it back (found by an attacker: an idle worker held
            // 343 MiB its ended jobs had freed, and the next job it was
            // given took it past its ceiling).
            crate::serve::memory::trim();
        }
        // A job that did not run has nothing to copy: its directory (with
        // any inputs written) goes now, as the gateway releases nothing
        // for an error.
        let mut report = result.map_err(|e| e.to_string())?;
        // The gateway lists outputs (what it copies) and calls (from its
        // own egress) itself.
        report.outputs.clear();
        report.skipped_outputs.clear();
        report.calls = None;
        // However much the guest wrote, its report fits its frame: one
        // the channel could not carry would end the channel, and the
        // worker with every job in it.
        let json = report.to_json_within(REPORT_BUDGET)?;
        // What its guest created in `/out`: the gateway collects nothing
        // else (a file moved or linked in from outside this worker).
        let created = proto::CreatedFiles::pack(dir.created());
        // A job without inputs that left `/out` empty has nothing to copy
        // or check: its directory goes now, before the report, and the
        // gateway sends no `Release`. Anything else stays until then —
        // unless the gateway cancelled the job while its report was being
        // built (a large capture takes a while), when nothing will release
        // it: the job's cancel entry, taken under the same lock as its
        // place in `dirs`, says which happened first.
        let keep = dir.has_inputs() || !dir.remove_output_if_empty();
        let mut cancels = lock(&state.cancels);
        if cancels.remove(&job).is_none() {
            return Ok(None);
        }
        if keep {
            lock(&state.dirs).insert(job, dir);
        }
        Ok(Some((json, created)))
    };
    tokio::select! {
        biased;
        _ = cancelled => {}
        result = work => {
            let (result, created) = match result {
                // Cancelled after its work was done: its directory is
                // gone, and the gateway waits for no report.
                Ok(None) => return,
                Ok(Some((json, created))) => (Ok(json), created),
                Err(e) => {
                    lock(&state.cancels).remove(&job);
                    (Err(e), proto::CreatedFiles::default())
                }
            };
            send(
                &state.up,
                Up::Report {
                    job,
                    result,
                    created,
                },
            );
        }
    }
}
