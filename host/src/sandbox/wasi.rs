//! The guest's view of the world: the only place that builds a `WasiCtx` and
//! the only place that decides which interfaces are linked.
//!
//! Deny by default. A guest gets literal arguments and environment from its
//! policy and job (never the host's), `/in` read-only and `/out` under quota
//! (nothing else preopened), bounded stdout/stderr, stdin from the job, clocks
//! and bounded randomness. Socket interfaces are linked so that ordinary std
//! programs instantiate, but every socket operation and name lookup is
//! refused.

use std::sync::Arc;

use wasmtime::StoreContextMut;
use wasmtime::component::{Linker, Resource, ResourceTable, WasmList};
use wasmtime::{Engine, ResourceLimiter};
use wasmtime_wasi::filesystem::{Descriptor, Dir, WasiFilesystemCtxView};
use wasmtime_wasi::p2::bindings::filesystem::preopens;
use wasmtime_wasi::p2::pipe::MemoryInputPipe;
use wasmtime_wasi::{FsPerms, OpenMode, WasiCtx, WasiCtxBuilder, WasiCtxView, WasiView};

use wasmtime_wasi_http::{WasiHttpCtx, WasiHttpCtxView, WasiHttpView};
use wasmtime_wasi_io::bindings::wasi::io::poll;
use wasmtime_wasi_io::poll::DynPollable;

use super::cpu::CpuMeter;
use super::http::JobHooks;
use super::job::JobDir;
use super::limits::{JobLimiter, LimitKind, LimitLatch, Refusals};
use super::pipe::CappedPipe;
use super::quota::{OutputQuota, QuotaFs, QuotaFsData, StdoutFile};
use crate::job::JobSpec;
use crate::job::egress::Egress;
use crate::policy::Policy;

/// Largest `get-random-bytes` request served in one call. wasmtime-wasi's
/// default is 64 MiB, a host allocation a guest can ask for in a loop.
pub const MAX_RANDOM_PER_CALL: u64 = 1024 * 1024;

/// Most resource handles (streams, descriptors, pollables) one guest may
/// hold at once; a guest that leaks handles in a loop hits this instead of
/// growing host memory.
pub const MAX_HANDLES: usize = 4096;

/// Most resource handles a guest whose policy names services may hold at
/// once: each may hold `wasi:http` state ([`HELD_PER_HANDLE`]), which its
/// worker's memory is counted for.
pub const MAX_HANDLES_CALLING: usize = 1024;

/// The most one `fields` resource (a request's or response's headers and
/// trailers) holds in host memory: 16 KiB rather than wasmtime-wasi-http's
/// 128 KiB, since a guest may keep thousands of them (found by an attacker:
/// about 500 MiB of a worker's memory held by one job allowed 16 MiB).
pub const FIELD_SIZE_LIMIT: usize = 16 * 1024;

/// Whether file operations run on the calling thread
/// (`allow_blocking_current_thread`); descriptors the sandbox opens itself
/// ([`super::quota`]) are made the same way.
pub const BLOCKS_CURRENT_THREAD: bool = true;

/// Per-job store data.
pub struct JobState {
    wasi: WasiCtx,
    table: ResourceTable,
    /// `/in`, `/out` (and the escape suite's hole): the very descriptors
    /// the sandbox opened, handed out by `get-directories` ([`Preopens`]).
    preopens: Vec<(Dir, String)>,
    pub(crate) limiter: JobLimiter,
    pub(crate) quota: Arc<OutputQuota>,
    pub(crate) latch: LimitLatch,
    /// The job's real CPU time, host calls included.
    pub(crate) cpu: Arc<CpuMeter>,
    /// Requests the host refused the guest.
    pub(crate) refusals: Refusals,
    http: WasiHttpCtx,
    /// The guest-facing half of outbound calls, each call's send charged
    /// to `cpu`.
    pub(crate) hooks: JobHooks,
}

impl std::fmt::Debug for JobState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JobState")
            .field("latch", &self.latch)
            .field("cpu", &self.cpu)
            .finish_non_exhaustive()
    }
}

impl WasiView for JobState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

impl WasiHttpView for JobState {
    fn http(&mut self) -> WasiHttpCtxView<'_> {
        WasiHttpCtxView {
            ctx: &mut self.http,
            table: &mut self.table,
            hooks: &mut self.hooks,
        }
    }
}

impl JobState {
    /// The resource limiter, for `Store::limiter`.
    pub(crate) fn limiter(&mut self) -> &mut dyn ResourceLimiter {
        &mut self.limiter
    }
}

/// What the host, rather than the policy, contributes to a job's state.
#[derive(Clone, Debug)]
pub struct HostSide<'a> {
    /// Where the job's outbound calls go, if its policy names services
    /// and the caller gave it a way out.
    pub egress: Option<Arc<dyn Egress>>,
    /// The escape suite's deliberate hole
    /// ([`SandboxConfig::unsafe_extra_preopen`](super::SandboxConfig)),
    /// `None` everywhere else.
    pub extra_preopen: Option<&'a (std::path::PathBuf, String)>,
    /// Host file descriptors the job may hold open at once.
    pub max_open: u64,
}

/// The captured stdout and stderr of a job.
#[derive(Debug)]
pub struct Captures {
    /// stdout.
    pub stdout: CappedPipe,
    /// stderr.
    pub stderr: CappedPipe,
}

/// Builds the store data for one job: the WASI context, the limiter and the
/// quota, all from `policy` and `job`, with what the host adds (`host`).
/// `args` must already be validated (see [`guest_args`]).
///
/// # Errors
/// If a preopen cannot be opened.
pub fn job_state(
    policy: &Policy,
    job: &JobSpec,
    dir: &JobDir,
    args: &[String],
    cpu_budget_ns: u64,
    host: &HostSide<'_>,
) -> std::io::Result<(JobState, Captures)> {
    let HostSide {
        egress,
        extra_preopen,
        max_open,
    } = host.clone();
    let latch = LimitLatch::default();
    let limits = &policy.limits;
    let stdout = CappedPipe::new(limits.stdout.as_usize(), LimitKind::Stdout, latch.clone());
    let stderr = CappedPipe::new(limits.stderr.as_usize(), LimitKind::Stderr, latch.clone());

    let quota = OutputQuota::new(
        limits.output.as_u64(),
        u64::from(limits.output_files),
        max_open,
        latch.clone(),
    );
    // `/in` and `/out` are the directories made for the job, opened from
    // the work directory without following a link or crossing a mount,
    // and preopened as those very descriptors (no path is opened again):
    // not what was put at their paths since.
    // The guest reads only its inputs and what it creates; the escape
    // suite's deliberate hole is a hole for reading too.
    if extra_preopen.is_none() {
        quota.restrict_reads(dir.inputs());
    }
    let (input_fd, output_fd) = (dir.open_input()?, dir.open_output()?);
    quota.out_is(&output_fd);
    // `[run] stdout`: the guest's stdout goes to a file in `/out`, under
    // the `/out` quota, instead of the capture.
    let stdout_file = policy
        .run
        .stdout
        .as_deref()
        .map(|name| StdoutFile::create(&super::beneath::fd_path(&output_fd), name, &quota))
        .transpose()?;

    let mut b = WasiCtxBuilder::new();
    // File operations run on the calling thread instead of a blocking-pool
    // hop per call: job directories live on tmpfs by default, where each
    // call is a memory copy, and every call is bounded (reads of at most
    // 64 KiB). This must be set before the preopens are added.
    b.allow_blocking_current_thread(BLOCKS_CURRENT_THREAD);
    b.args(args)
        .envs(&policy.run.env.iter().collect::<Vec<_>>())
        .stdin(MemoryInputPipe::new(job.stdin.clone()))
        .stderr(stderr.clone())
        .max_random_size(MAX_RANDOM_PER_CALL)
        // No network: no TCP, no UDP, no name lookup, and the address check
        // refuses every address should anything else try.
        .allow_tcp(false)
        .allow_udp(false)
        .allow_ip_name_lookup(false)
        .socket_addr_check(|_, _| Box::pin(async { false }));
    match stdout_file {
        Some(file) => b.stdout(file),
        None => b.stdout(stdout.clone()),
    };
    let mut preopens = vec![
        (preopen(input_fd, FsPerms::ReadOnly), "/in".to_owned()),
        (preopen(output_fd, FsPerms::ReadWrite), "/out".to_owned()),
    ];
    if let Some((host, guest)) = extra_preopen {
        let hole = rustix::fs::open(
            host,
            rustix::fs::OFlags::PATH | rustix::fs::OFlags::DIRECTORY | rustix::fs::OFlags::CLOEXEC,
            rustix::fs::Mode::empty(),
        )?;
        preopens.push((preopen(hole, FsPerms::ReadWrite), guest.clone()));
    }

    let mut table = ResourceTable::new();
    table.set_max_capacity(if policy.network.services.is_empty() {
        MAX_HANDLES
    } else {
        MAX_HANDLES_CALLING
    });
    let cpu = Arc::new(CpuMeter::new(cpu_budget_ns, latch.clone()));
    let refusals = Refusals::default();
    let state = JobState {
        wasi: b.build(),
        table,
        preopens,
        limiter: JobLimiter::new(
            limits.memory.as_usize(),
            limits.table_elements as usize,
            latch.clone(),
        ),
        quota: Arc::clone(&quota),
        cpu: Arc::clone(&cpu),
        refusals: refusals.clone(),
        latch,
        http: {
            let mut http = WasiHttpCtx::new();
            http.set_field_size_limit(FIELD_SIZE_LIMIT);
            http
        },
        hooks: JobHooks {
            egress,
            cpu: Arc::clone(&cpu),
            quota,
            refusals: refusals.clone(),
        },
    };
    Ok((state, Captures { stdout, stderr }))
}

/// A preopen of the directory `fd` holds, as wasmtime-wasi makes one of a
/// path: `perms` and the matching open mode.
fn preopen(fd: std::os::fd::OwnedFd, perms: FsPerms) -> Dir {
    let mode = match perms {
        FsPerms::ReadOnly => OpenMode::READ,
        FsPerms::ReadWrite => OpenMode::READ | OpenMode::WRITE,
    };
    Dir::new(fd.into(), perms, mode, BLOCKS_CURRENT_THREAD)
}

/// `wasi:filesystem/preopens` over a job's own descriptors: wasmtime-wasi's
/// builder takes a path and opens it again, and a path naming a held
/// descriptor (`/proc/self/fd/N`) cost a walk of procfs for each preopen of
/// each job (about 6 µs each, a tenth of a trivial job's time in a worker).
pub struct Preopens<'a> {
    dirs: &'a [(Dir, String)],
    table: &'a mut ResourceTable,
}

/// [`Preopens`]' place in the linker.
pub struct PreopensData;

impl wasmtime::component::HasData for PreopensData {
    type Data<'a> = Preopens<'a>;
}

impl preopens::Host for Preopens<'_> {
    fn get_directories(&mut self) -> wasmtime::Result<Vec<(Resource<Descriptor>, String)>> {
        // Clones share the descriptor: no new one is opened.
        self.dirs
            .iter()
            .map(|(dir, name)| Ok((self.table.push(Descriptor::Dir(dir.clone()))?, name.clone())))
            .collect()
    }
}

/// The guest's argv: the module name, then the policy's `args` rendered
/// for this job (see [`crate::policy::args`]: each entry one argument,
/// groups dropped when something they place is absent), then — only when
/// `args` is not a template — each job parameter as `--name=value` in name
/// order. Every parameter is checked against the policy's list and the
/// value rules before anything is substituted.
///
/// # Errors
/// A message naming a parameter the policy does not accept, a bad value,
/// or a parameter or input the args require that the job lacks.
pub fn guest_args(policy: &Policy, job: &JobSpec) -> Result<Vec<String>, String> {
    for (name, value) in &job.params {
        if !policy.run.params.iter().any(|p| p.as_str() == name) {
            return Err(format!(
                "unknown parameter `{}` for module `{}`{}",
                name.escape_debug(),
                policy.module.name,
                match policy.run.params.as_slice() {
                    [] => " (it accepts none)".to_owned(),
                    ps => format!(
                        " (it accepts {})",
                        ps.iter().map(|p| p.as_str()).collect::<Vec<_>>().join(", ")
                    ),
                }
            ));
        }
        if value.len() > crate::job::MAX_PARAM_VALUE || value.chars().any(char::is_control) {
            return Err(format!(
                "invalid value for parameter `{name}`: at most {} bytes, no control characters",
                crate::job::MAX_PARAM_VALUE
            ));
        }
    }
    let mut args = vec![policy.module.name.to_string()];
    args.extend(crate::policy::args::render(
        &policy.run.args,
        policy.module.name.as_str(),
        |p| job.params.get(p).cloned(),
        |i| job.inputs.iter().any(|input| input.name == i),
    )?);
    if !policy.run.is_template() {
        for (name, value) in &job.params {
            args.push(format!("--{name}={value}"));
        }
    }
    Ok(args)
}

/// The linker for modules whose policy names services: [`linker`] plus
/// `wasi:http` (types and outgoing handler), whose requests go only to the
/// job's egress ([`JobHooks`]).
///
/// # Errors
/// Only if wasmtime refuses a definition, which is a bug.
pub fn http_linker(engine: &Engine) -> wasmtime::Result<Linker<JobState>> {
    use wasmtime_wasi_http::p2::bindings::http::types::{HostOutgoingRequest, Method};
    use wasmtime_wasi_http::p2::types::HostOutgoingRequest as OutgoingRequest;

    let mut linker = linker(engine)?;
    wasmtime_wasi_http::p2::add_only_http_to_linker_async(&mut linker)?;
    // An outgoing request's path, authority and method are held in host
    // memory for as long as the guest keeps the request: each is refused
    // past its bound, as a malformed one is, so what a job's requests hold
    // is bounded by its handles ([`HELD_PER_HANDLE`]).
    linker.allow_shadowing(true);
    let mut types = linker.instance(HTTP_TYPES_INTERFACE)?;
    types.func_wrap(
        "[method]outgoing-request.set-path-with-query",
        |mut store: StoreContextMut<'_, JobState>,
         (request, path): (Resource<OutgoingRequest>, Option<String>)| {
            if path.as_ref().is_some_and(|p| p.len() > MAX_PATH_WITH_QUERY) {
                return Ok((Err(()),));
            }
            let mut http = store.data_mut().http();
            Ok((http.set_path_with_query(request, path)?,))
        },
    )?;
    types.func_wrap(
        "[method]outgoing-request.set-authority",
        |mut store: StoreContextMut<'_, JobState>,
         (request, authority): (Resource<OutgoingRequest>, Option<String>)| {
            if authority.as_ref().is_some_and(|a| a.len() > MAX_AUTHORITY) {
                return Ok((Err(()),));
            }
            let mut http = store.data_mut().http();
            Ok((http.set_authority(request, authority)?,))
        },
    )?;
    types.func_wrap(
        "[method]outgoing-request.set-method",
        |mut store: StoreContextMut<'_, JobState>,
         (request, method): (Resource<OutgoingRequest>, Method)| {
            if matches!(&method, Method::Other(m) if m.len() > MAX_METHOD) {
                return Ok((Err(()),));
            }
            let mut http = store.data_mut().http();
            Ok((http.set_method(request, method)?,))
        },
    )?;
    linker.allow_shadowing(false);
    Ok(linker)
}

/// The `wasi:http/types` interface as wasmtime-wasi-http links it.
const HTTP_TYPES_INTERFACE: &str = "wasi:http/types@0.2.12";

/// The longest path and query an outgoing request may be given (the
/// request-line bound common servers keep, 8 KiB).
pub const MAX_PATH_WITH_QUERY: usize = 8 * 1024;

/// The longest method of its own an outgoing request may be given.
pub const MAX_METHOD: usize = 64;

/// The longest authority an outgoing request may be given: a host name of
/// the most DNS allows, and a port.
pub const MAX_AUTHORITY: usize = 255 + 6;

/// The most an outgoing body takes in one write, and holds of each write
/// until the request is sent and read: 16 KiB, not wasmtime-wasi-http's
/// 1 MiB ([`super::http::JobHooks`]). A body holds two such writes (its
/// channel's), sent or not.
pub const OUTGOING_CHUNK: usize = 16 * 1024;

/// What a headers resource at [`FIELD_SIZE_LIMIT`] can take of host memory:
/// the limit counts each entry's bytes and its two structs, not the map's
/// buckets and index nor the allocator's own, and a map's storage grows by
/// doubling (found by an attacker: 4,080 of them took 2.1 to 2.5 times
/// the limit each).
pub const FIELDS_HELD: usize = 4 * FIELD_SIZE_LIMIT;

/// The most host memory one of a guest's handles holds through
/// `wasi:http`: a headers resource, or an outgoing request (its headers,
/// path, authority, and scheme and method of at most 64 bytes each), or a
/// request and its body (two chunks) over the two handles they take.
pub const HELD_PER_HANDLE: usize = {
    let request = FIELDS_HELD + MAX_PATH_WITH_QUERY + MAX_AUTHORITY + 64 + MAX_METHOD;
    let with_body = (request + 2 * OUTGOING_CHUNK).div_ceil(2);
    if with_body > request {
        with_body
    } else {
        request
    }
};

/// The linker every job uses: wasmtime-wasi's WASIp2 command world, with
/// `wasi:filesystem/types` replaced by the quota-enforcing [`QuotaFs`],
/// `wasi:filesystem/preopens` by [`Preopens`] (the job's own descriptors),
/// `wasi:io/poll.poll` by one that refuses (traps on) a list longer than
/// [`MAX_HANDLES`] before lifting it: each entry costs host memory and CPU,
/// and a longer list can only repeat handles.
/// `wasi:http` is not in it: a module importing it fails to instantiate
/// unless its policy names services ([`http_linker`]).
///
/// # Errors
/// Only if wasmtime refuses a definition, which is a bug.
pub fn linker(engine: &Engine) -> wasmtime::Result<Linker<JobState>> {
    let mut linker = Linker::new(engine);
    wasmtime_wasi::p2::add_to_linker_async(&mut linker)?;
    // Shadow wasmtime-wasi's filesystem types with the quota wrapper, and
    // its preopens with the job's descriptors. Nothing else is replaced;
    // shadowing is switched off again straight after.
    linker.allow_shadowing(true);
    wasmtime_wasi::p2::bindings::filesystem::types::add_to_linker::<JobState, QuotaFsData>(
        &mut linker,
        |s| QuotaFs {
            inner: WasiFilesystemCtxView {
                ctx: s.wasi.filesystem(),
                table: &mut s.table,
            },
            quota: &s.quota,
            refusals: &s.refusals,
        },
    )?;
    preopens::add_to_linker::<JobState, PreopensData>(&mut linker, |s| Preopens {
        dirs: &s.preopens,
        table: &mut s.table,
    })?;
    refuse_sockets(&mut linker)?;
    // And `poll`, so that a list longer than any guest can hold distinct
    // handles is refused before it is lifted into host memory.
    linker.instance(POLL_INTERFACE)?.func_wrap_async(
        "poll",
        |mut store: StoreContextMut<'_, JobState>,
         (list,): (WasmList<Resource<DynPollable>>,)| {
            Box::new(async move {
                if list.len() > MAX_HANDLES {
                    wasmtime::bail!(
                        "poll of {} pollables, more than the {MAX_HANDLES} handles a guest may hold",
                        list.len()
                    );
                }
                let pollables = list
                    .iter(&mut store)?
                    .collect::<wasmtime::Result<Vec<_>>>()?;
                let ready = poll::Host::poll(&mut store.data_mut().table, pollables).await?;
                Ok((ready,))
            })
        },
    )?;
    linker.allow_shadowing(false);
    Ok(linker)
}

/// Replaces the three ways a guest starts using the network (creating a
/// TCP or UDP socket, looking up a name) with functions that refuse with
/// `access-denied`, as wasmtime-wasi does when TCP, UDP and lookups are
/// switched off, and count the refusal: a socket attempt is then evidence
/// the host saw. Every other socket function needs a socket or a lookup
/// stream, which the guest can no longer get.
fn refuse_sockets(linker: &mut Linker<JobState>) -> wasmtime::Result<()> {
    use wasmtime_wasi::p2::bindings::sockets::ip_name_lookup::ResolveAddressStream;
    use wasmtime_wasi::p2::bindings::sockets::network::{ErrorCode, IpAddressFamily, Network};
    use wasmtime_wasi::p2::{TcpSocket, UdpSocket};

    linker
        .instance(&format!("wasi:sockets/tcp-create-socket@{SOCKETS_VERSION}"))?
        .func_wrap(
            "create-tcp-socket",
            |store: StoreContextMut<'_, JobState>, (_,): (IpAddressFamily,)| {
                store.data().refusals.note();
                Ok((Err::<Resource<TcpSocket>, _>(ErrorCode::AccessDenied),))
            },
        )?;
    linker
        .instance(&format!("wasi:sockets/udp-create-socket@{SOCKETS_VERSION}"))?
        .func_wrap(
            "create-udp-socket",
            |store: StoreContextMut<'_, JobState>, (_,): (IpAddressFamily,)| {
                store.data().refusals.note();
                Ok((Err::<Resource<UdpSocket>, _>(ErrorCode::AccessDenied),))
            },
        )?;
    linker
        .instance(&format!("wasi:sockets/ip-name-lookup@{SOCKETS_VERSION}"))?
        .func_wrap(
            "resolve-addresses",
            |store: StoreContextMut<'_, JobState>, (_, _): (Resource<Network>, String)| {
                store.data().refusals.note();
                Ok((Err::<Resource<ResolveAddressStream>, _>(
                    ErrorCode::AccessDenied,
                ),))
            },
        )?;
    Ok(())
}

/// The `wasi:sockets` package version wasmtime-wasi links.
const SOCKETS_VERSION: &str = "0.2.12";

/// The `wasi:io/poll` interface as wasmtime-wasi links it.
const POLL_INTERFACE: &str = "wasi:io/poll@0.2.12";
