//! The edge: the one function that serves the public and admin routers on
//! their listeners, [`serve`], and the bounds it holds whatever a client
//! sends, with or without a token.
//!
//! Per connection (hyper's HTTP/1 server, driven by our own accept loop,
//! since `axum::serve` does not expose hyper's builder):
//! - **header read timeout** (hyper's timer): from when the connection
//!   starts waiting for a request to the request's last header;
//! - **idle timeout** ([`idle::IdleIo`]): a connection between requests that
//!   receives nothing is closed;
//! - **body read timeout** (`tower_http::timeout::RequestBodyTimeout`):
//!   between two frames of a request body;
//! - **header size** (hyper's `max_buf_size`): the most a connection buffers
//!   before its request is parsed, 431 beyond;
//! - **minimum rates**: a request body must arrive at `min_body_rate`
//!   ([`rate::MinRateBody`]) and a response be taken at `min_write_rate`
//!   once a write waits on the client ([`idle::IdleIo`]), each checked
//!   after `min_rate_grace`;
//! - **hyper's own answers** (400, 414, 431 for a request head it cannot
//!   parse) are rewritten to the JSON error shape by [`idle::IdleIo`].
//!
//! Per listener, a [`budget::Budget`] checked at accept time, before any byte
//! is read: open connections in total and per client address. When the
//! total is full, the budget first sheds an idle connection (the one that
//! has waited longest without a request in flight, from the address holding
//! the most connections, and only for a newcomer from an address holding
//! fewer): its task closes the socket. A connection still beyond it is
//! answered 503 and closed at once, so it holds nothing and the
//! kernel's backlog keeps draining. **The reserve**: (1) no single address
//! can take more than its share of the public listener; (2) beyond the
//! public total, `health_reserve` more connections are served, but only for
//! `/healthz` and `/readyz`, one request each with short timeouts, so
//! probes answer while the listener is full; (3) the admin listener has a
//! budget of its own, so the admin API and its `/healthz` answer whatever
//! the public listener carries; (4) both budgets are clamped to the
//! descriptors the process has left after its jobs' share, so `accept` does
//! not run out of descriptors under a flood.
//!
//! Memory: a connection buffers at most `max_header_size` before its request
//! is parsed; after a flood, when the open connections fall to a quarter of
//! their peak, the allocator is asked to give freed memory back.
//!
//! Shutdown: when `shutdown` resolves, both listeners close and every
//! connection is asked to finish (idle ones close at once); after
//! [`CLOSE_MARGIN`] the remaining ones are dropped, whatever they are doing.
//!
//! Unauthenticated denials are audited through [`denials`], which bounds
//! what an anonymous caller can make the service write.
//!
//! This module knows the HTTP server, never the job store's or the
//! sandbox's types.

pub mod budget;
pub mod denials;
mod idle;
pub mod memory;
mod rate;

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::ConnectInfo;
use http::{Request, Response, StatusCode, header};
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tower::ServiceExt;
use tower_http::timeout::RequestBodyTimeoutLayer;

use crate::api::AppState;
use crate::service::Service;
use budget::{Admission, Budget, Limits, Permit};
use denials::Denials;
use idle::{Idle, IdleIo, MarkIdle, MinRate};
use rate::MinRateBody;

/// How long open connections get to finish once shutdown begins, before
/// they are dropped. `bulkhead serve` exits within `shutdown_grace` (jobs)
/// plus this plus 2.5 s at most (1 s for dropped connections' tasks to
/// end, 1 s for the last audit summaries, 0.5 s for the runtime), whatever
/// clients hold open.
pub const CLOSE_MARGIN: Duration = Duration::from_secs(2);

/// Header and idle timeouts of a connection served from the health reserve.
const RESERVE_TIMEOUT: Duration = Duration::from_secs(2);

/// Descriptors kept for the process itself beyond its connections: the
/// store's connections, the module cache, logs, the listeners.
const OWN_DESCRIPTORS: u64 = 128;

/// The client of a request, put in its extensions by [`serve`].
#[derive(Clone, Debug)]
pub struct Client {
    /// The peer's address.
    pub addr: SocketAddr,
    denials: Arc<Denials>,
}

/// How one listener serves its connections.
#[derive(Clone, Debug)]
struct Edge {
    router: Router,
    budget: Arc<Budget>,
    denials: Arc<Denials>,
    header_read_timeout: Duration,
    idle_timeout: Duration,
    body_read_timeout: Duration,
    write_timeout: Duration,
    max_header_size: usize,
    min_body_rate: MinRate,
    min_write_rate: MinRate,
}

/// The two listeners a service is served on: the public API and the
/// admin API, each on its own socket.
#[derive(Debug)]
pub struct Listeners {
    /// Where the public API is served.
    pub public: TcpListener,
    /// Where the admin API (tokens, audit, metrics, keys) is served.
    pub admin: TcpListener,
}

/// A listener that could not be bound.
#[derive(Debug, thiserror::Error)]
#[error("cannot listen on {addr}: {source}")]
pub struct BindError {
    /// The address asked for.
    pub addr: SocketAddr,
    /// Why the bind failed.
    #[source]
    pub source: std::io::Error,
}

impl Listeners {
    /// Binds the public listener to `public` and the admin one to `admin`.
    ///
    /// # Errors
    /// [`BindError`] naming the address that could not be bound.
    pub async fn bind(public: SocketAddr, admin: SocketAddr) -> Result<Self, BindError> {
        let bind = |addr: SocketAddr| async move {
            TcpListener::bind(addr)
                .await
                .map_err(|source| BindError { addr, source })
        };
        Ok(Self {
            public: bind(public).await?,
            admin: bind(admin).await?,
        })
    }

    /// Both listeners on 127.0.0.1, on ports the kernel picks.
    ///
    /// # Errors
    /// As for [`Listeners::bind`].
    pub async fn loopback() -> Result<Self, BindError> {
        let any = SocketAddr::from(([127, 0, 0, 1], 0));
        Self::bind(any, any).await
    }

    /// The addresses the listeners are bound to: (public, admin).
    ///
    /// # Errors
    /// If a listener's address cannot be read.
    pub fn local_addrs(&self) -> std::io::Result<(SocketAddr, SocketAddr)> {
        Ok((self.public.local_addr()?, self.admin.local_addr()?))
    }
}

/// A service served by [`spawn`] in a task of its own. Dropping it stops
/// serving (without waiting); [`Serving::stop`] stops and waits.
#[derive(Debug)]
pub struct Serving {
    /// Where the public API is served.
    pub public: SocketAddr,
    /// Where the admin API is served.
    pub admin: SocketAddr,
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl Serving {
    /// Closes both listeners and waits for [`serve`] to return (within
    /// [`CLOSE_MARGIN`] and the last audit summaries).
    ///
    /// # Errors
    /// What [`serve`] returned; a task that panicked is reported as an
    /// error too.
    pub async fn stop(self) -> std::io::Result<()> {
        let _ = self.stop.send(());
        self.task.await.map_err(std::io::Error::other)?
    }
}

/// Serves `service` on `listeners` in a task of its own, until the
/// returned [`Serving`] is stopped or dropped.
///
/// # Errors
/// If a listener's address cannot be read.
pub fn spawn(service: Arc<Service>, listeners: Listeners) -> std::io::Result<Serving> {
    let (public, admin) = listeners.local_addrs()?;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(serve(service, listeners, async {
        // Sent or dropped: either way, stop.
        let _ = stopped.await;
    }));
    Ok(Serving {
        public,
        admin,
        stop,
        task,
    })
}

/// Serves `service`'s public API and admin API on `listeners` until
/// `shutdown` resolves, then closes both listeners and every connection
/// within [`CLOSE_MARGIN`]. Bounds come from the service's `[server]`
/// config (see the module documentation). This is the one way a service is
/// put on the network: `bulkhead serve`, the escape suite's own service and
/// the tests all go through it.
///
/// # Errors
/// If a listener's address cannot be read.
pub async fn serve(
    service: Arc<Service>,
    listeners: Listeners,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()> {
    let Listeners { public, admin } = listeners;
    let state = AppState { service };
    let config = state.service.config();
    let server = &config.server;
    let denials = Arc::new(Denials::new(&config.audit));
    let (public_limits, admin_limits) = budgets(server, config.queue.workers);
    let edge = |router: Router, limits: Limits| Edge {
        router,
        budget: Budget::new(limits),
        denials: Arc::clone(&denials),
        header_read_timeout: server.header_read_timeout.get(),
        idle_timeout: server.idle_timeout.get(),
        body_read_timeout: server.body_read_timeout.get(),
        write_timeout: server.write_timeout.get(),
        max_header_size: server.max_header_size.as_usize(),
        min_body_rate: MinRate {
            bytes_per_sec: server.min_body_rate.as_u64(),
            grace: server.min_rate_grace.get(),
        },
        min_write_rate: MinRate {
            bytes_per_sec: server.min_write_rate.as_u64(),
            grace: server.min_rate_grace.get(),
        },
    };
    let public_edge = edge(crate::api::app(state.clone()), public_limits);
    let admin_edge = edge(crate::api::admin_app(state.clone()), admin_limits);
    let addresses = [public.local_addr()?, admin.local_addr()?];
    // This node's heartbeat in the registry of nodes sharing the store.
    let heartbeat = tokio::spawn(
        Arc::clone(&state.service).heartbeat(addresses.iter().map(ToString::to_string).collect()),
    );

    let (stop_tx, stop) = watch::channel(false);
    let (force_tx, force) = watch::channel(false);
    let mut listeners = tokio::task::JoinSet::new();
    listeners.spawn(listen(public, public_edge, stop.clone(), force.clone()));
    listeners.spawn(listen(admin, admin_edge, stop.clone(), force));
    let flusher = tokio::spawn(flush_denials(state.clone(), Arc::clone(&denials), stop));

    shutdown.await;
    heartbeat.abort();
    let _ = stop_tx.send(true);
    let all_closed = async { while listeners.join_next().await.is_some() {} };
    if tokio::time::timeout(CLOSE_MARGIN, all_closed)
        .await
        .is_err()
    {
        tracing::info!("closing connections still open after the shutdown margin");
        let _ = force_tx.send(true);
        // Each connection's task drops it as soon as it sees the flag.
        let _ = tokio::time::timeout(Duration::from_secs(1), async {
            while listeners.join_next().await.is_some() {}
        })
        .await;
        listeners.abort_all();
    }
    // The summaries of held-back denials; a store that hangs does not hold
    // the exit.
    let _ = tokio::time::timeout(Duration::from_secs(1), flusher).await;
    Ok(())
}

/// The two listeners' budgets from the config, clamped so that connections
/// and the jobs' descriptors together stay under the process's limit.
fn budgets(server: &crate::config::Server, workers: u32) -> (Limits, Limits) {
    let mut public = Limits {
        total: server.max_connections,
        per_client: server.max_connections_per_client.max(1),
        reserve: server.health_reserve,
    };
    // One address may take a quarter of the admin budget, so clients on
    // other addresses (the operator's) are still answered.
    let admin_share = |total: usize| (total / 4).max(1);
    let mut admin = Limits {
        total: server.admin_max_connections,
        per_client: admin_share(server.admin_max_connections),
        reserve: 0,
    };
    let wanted = (public.total + public.reserve + admin.total) as u64;
    // The jobs' share is exactly what the sandbox gives them
    // (`descriptor_budget`): connections live in the reserve it leaves.
    let limit = descriptor_limit();
    let per_job = crate::sandbox::descriptor_budget(limit, workers)
        .unwrap_or(crate::sandbox::MAX_OPEN_PER_JOB)
        + crate::sandbox::JOB_OVERHEAD_DESCRIPTORS;
    let room = limit
        .saturating_sub(u64::from(workers) * per_job)
        .saturating_sub(OWN_DESCRIPTORS);
    if wanted > room {
        let scale = |n: usize| ((n as u64 * room / wanted) as usize).max(1);
        public.total = scale(public.total);
        public.reserve = scale(public.reserve);
        admin.total = scale(admin.total);
        admin.per_client = admin_share(admin.total);
        tracing::warn!(
            wanted,
            room,
            public = public.total,
            admin = admin.total,
            "connection budgets lowered to fit the descriptor limit"
        );
    }
    public.per_client = public.per_client.min(public.total);
    (public, admin)
}

/// The process's soft limit on open descriptors.
fn descriptor_limit() -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `lim` is a valid, writable `rlimit`.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } == 0 {
        lim.rlim_cur
    } else {
        1024
    }
}

/// Accepts connections until `stop`, then waits for them to finish (each
/// is dropped when `force` is raised).
async fn listen(
    listener: TcpListener,
    edge: Edge,
    mut stop: watch::Receiver<bool>,
    force: watch::Receiver<bool>,
) {
    let graceful = GracefulShutdown::new();
    let mut warned: Option<Instant> = None;
    loop {
        let accepted = tokio::select! {
            _ = raised(&mut stop) => break,
            accepted = listener.accept() => accepted,
        };
        let (tcp, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                if !is_connection_error(&e) {
                    // Out of descriptors or memory: pause instead of
                    // spinning, and say so at most every ten seconds.
                    if warned.is_none_or(|w| w.elapsed() > Duration::from_secs(10)) {
                        tracing::warn!(error = %e, "accept failed");
                        warned = Some(Instant::now());
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                continue;
            }
        };
        match edge.budget.admit(peer.ip()) {
            Admission::Full(permit) => {
                connection(&edge, &graceful, &force, tcp, peer, permit, false)
            }
            Admission::HealthOnly(permit) => {
                connection(&edge, &graceful, &force, tcp, peer, permit, true);
            }
            Admission::Refused => refuse(&tcp),
        }
    }
    drop(listener);
    graceful.shutdown().await;
}

/// Resolves once the flag behind `rx` is raised (or its sender is gone).
async fn raised(rx: &mut watch::Receiver<bool>) {
    let _ = rx.wait_for(|raised| *raised).await;
}

fn is_connection_error(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::{ConnectionAborted, ConnectionRefused, ConnectionReset};
    matches!(
        e.kind(),
        ConnectionRefused | ConnectionAborted | ConnectionReset
    )
}

/// What a connection beyond its budget is sent before it is closed.
const REFUSAL: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nretry-after: 1\r\nconnection: close\r\ncontent-length: 80\r\n\r\n{\"error\":{\"code\":\"unavailable\",\"message\":\"too many connections, retry later\"}}";

/// Answers a connection beyond its budget without reading from it, and
/// closes it (on drop).
fn refuse(tcp: &TcpStream) {
    // A fresh socket's send buffer is empty: this never blocks, and if it
    // cannot write at once the connection is closed all the same.
    let _ = tcp.try_write(REFUSAL);
}

/// Bytes a connection's socket holds not yet sent, at most, before a write
/// to it waits (`TCP_NOTSENT_LOWAT`).
///
/// By default a socket takes writes until its send buffer is full — up to
/// `tcp_wmem`'s 4 MiB — and says it can take more only once half of what it
/// holds has gone. For a client whose window is small (a reader at 80 KB/s
/// with an 8 KiB receive buffer), that half took more than `write_timeout`
/// to go, with the client reading all along: it was cut as a client that
/// stopped reading, at about 50 s, every time. Bounded, the socket takes
/// more as soon as what it holds unsent drops below the bound, so a write
/// waits only while the client takes nothing; and a slow reader holds that
/// much of the kernel's memory unsent, not megabytes.
const UNSENT_AT_MOST: u32 = 128 << 10;

/// Sets `tcp`'s `TCP_NOTSENT_LOWAT` to `bytes` (see [`UNSENT_AT_MOST`]).
fn unsent_at_most(tcp: &TcpStream, bytes: u32) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let value = libc::c_int::try_from(bytes).map_err(std::io::Error::other)?;
    // SAFETY: `tcp` is an open socket for the call's duration; the option
    // value is a `c_int` read by the kernel from the pointer and length
    // given, nothing is kept.
    let set = unsafe {
        libc::setsockopt(
            tcp.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_NOTSENT_LOWAT,
            std::ptr::from_ref(&value).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if set == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Serves one admitted connection on its own task.
fn connection(
    edge: &Edge,
    graceful: &GracefulShutdown,
    force: &watch::Receiver<bool>,
    tcp: TcpStream,
    peer: SocketAddr,
    permit: Permit,
    health_only: bool,
) {
    let _ = tcp.set_nodelay(true);
    let _ = unsent_at_most(&tcp, UNSENT_AT_MOST);
    let (header_timeout, idle_timeout) = if health_only {
        (RESERVE_TIMEOUT, RESERVE_TIMEOUT)
    } else {
        (edge.header_read_timeout, edge.idle_timeout)
    };
    let idle = Idle::new();
    let slot = Arc::clone(permit.slot());
    let write_timeout = if health_only {
        RESERVE_TIMEOUT
    } else {
        edge.write_timeout
    };
    let io = TokioIo::new(IdleIo::new(
        tcp,
        Arc::clone(&idle),
        Arc::clone(&slot),
        idle_timeout,
        write_timeout,
        edge.min_write_rate,
    ));
    let client = Client {
        addr: peer,
        denials: Arc::clone(&edge.denials),
    };
    let router = tower::ServiceBuilder::new()
        .layer(RequestBodyTimeoutLayer::new(edge.body_read_timeout))
        .service(edge.router.clone());
    let min_body_rate = edge.min_body_rate;
    let service_slot = Arc::clone(&slot);
    let service = tower::service_fn(move |req: Request<Incoming>| {
        let (idle, slot, client, router) = (
            Arc::clone(&idle),
            Arc::clone(&service_slot),
            client.clone(),
            router.clone(),
        );
        async move {
            idle.busy();
            if !slot.set_busy() {
                // Shed as its head completed: the socket is being closed
                // and no handler may start.
                return Ok::<_, Infallible>(refusal().map(|b| MarkIdle::new(b, idle, slot)));
            }
            if health_only && !matches!(req.uri().path(), "/healthz" | "/readyz") {
                return Ok(refusal().map(|b| MarkIdle::new(b, idle, slot)));
            }
            let too_slow = Arc::new(AtomicBool::new(false));
            let mut req = req.map(|b| MinRateBody::new(b, min_body_rate, Arc::clone(&too_slow)));
            req.extensions_mut().insert(ConnectInfo(client.addr));
            req.extensions_mut().insert(client);
            let mut response = router.oneshot(req).await?;
            if too_slow.load(Ordering::SeqCst) {
                // The rest of the body will not be read: close after the
                // answer rather than wait for it.
                response.headers_mut().insert(
                    header::CONNECTION,
                    header::HeaderValue::from_static("close"),
                );
            }
            Ok(response.map(|b| MarkIdle::new(b, idle, slot)))
        }
    });
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(header_timeout)
        .max_buf_size(edge.max_header_size)
        .keep_alive(!health_only);
    let conn = graceful.watch(builder.serve_connection(io, TowerToHyperService::new(service)));
    let mut force = force.clone();
    tokio::spawn(async move {
        let _permit = permit;
        tokio::select! {
            done = conn => {
                if let Err(e) = done {
                    // Timeouts and resets of hostile clients are routine:
                    // nothing a flood could turn into log volume.
                    tracing::debug!(client = %peer, error = %e, "connection ended");
                }
            }
            _ = raised(&mut force) => {}
            // Shed for a newcomer: it had no request in flight.
            () = slot.shed() => {}
        }
    });
}

/// The answer to a non-health request on a reserve connection.
fn refusal() -> Response<axum::body::Body> {
    let mut response = Response::new(axum::body::Body::from(
        &br#"{"error":{"code":"unavailable","message":"too many connections, retry later"}}"#[..],
    ));
    *response.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    headers.insert(header::RETRY_AFTER, header::HeaderValue::from(1u64));
    response
}

/// Writes the summary rows of held-back denials once a minute, and once
/// more at shutdown.
async fn flush_denials(state: AppState, denials: Arc<Denials>, mut stop: watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(Duration::from_secs(60));
    tick.tick().await;
    loop {
        let stopping = tokio::select! {
            _ = tick.tick() => false,
            _ = raised(&mut stop) => true,
        };
        for row in denials.roll() {
            state.service.audit(row).await;
        }
        for row in state.service.roll_denials() {
            state.service.audit(row).await;
        }
        if stopping {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ServeConfig;

    #[tokio::test]
    async fn a_listener_that_cannot_be_bound_is_named_in_the_error() {
        let taken = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = taken.local_addr().unwrap();
        let any = SocketAddr::from(([127, 0, 0, 1], 0));
        let err = Listeners::bind(any, addr).await.unwrap_err();
        assert_eq!(err.addr, addr);
        assert!(
            err.to_string()
                .starts_with(&format!("cannot listen on {addr}: ")),
            "{err}"
        );
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn a_spawned_service_serves_both_listeners_until_stopped() {
        let dir = tempfile::tempdir().unwrap();
        let mut config = ServeConfig::default();
        config.storage.data_dir = dir.path().join("data");
        config.modules.policies_dir = dir.path().join("policies");
        config.modules.modules_dir = dir.path().join("modules");
        std::fs::create_dir_all(&config.modules.policies_dir).unwrap();
        std::fs::create_dir_all(&config.modules.modules_dir).unwrap();
        let service = Service::start(config, None).await.unwrap();
        let listeners = Listeners::loopback().await.unwrap();
        let (public, admin) = listeners.local_addrs().unwrap();
        let serving = spawn(Arc::clone(&service), listeners).unwrap();
        assert_eq!((serving.public, serving.admin), (public, admin));
        for addr in [public, admin] {
            let mut conn = TcpStream::connect(addr).await.unwrap();
            let answer = healthz(&mut conn).await;
            assert!(answer.starts_with("HTTP/1.1 200"), "{addr}: {answer}");
        }
        tokio::time::timeout(Duration::from_secs(30), serving.stop())
            .await
            .expect("serving stops")
            .unwrap();
        for addr in [public, admin] {
            assert!(
                TcpStream::connect(addr).await.is_err(),
                "{addr} still accepts connections"
            );
        }
        service.shutdown().await;
    }

    /// Sends `GET /healthz` on `conn` and returns what comes back first.
    async fn healthz(conn: &mut TcpStream) -> String {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        conn.write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n")
            .await
            .unwrap();
        let mut buf = vec![0u8; 1024];
        let n = conn.read(&mut buf).await.unwrap();
        String::from_utf8_lossy(&buf[..n]).into_owned()
    }
}
