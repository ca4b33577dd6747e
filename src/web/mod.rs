//! The HTTP server both roles run instead of `axum::serve`: an accept loop
//! that cannot be starved or made to spin, and per-connection limits.
//!
//! - A cap on connections open at once ([`WebLimits::max_connections`], or
//!   the open-file limit minus [`FD_RESERVE`], whichever is lower). At the
//!   cap, the oldest idle connection (no request in flight: never sent a
//!   byte, or a kept-alive connection between requests; failing that, the
//!   oldest one still sending its request head) is closed to admit the new
//!   one, preferring the peer holding the most connections, and counted in
//!   `gpuops_http_connections_evicted_total`. One peer (an IPv4 address or
//!   an IPv6 /64) holds at most [`PEER_SHARE_PERCENT`] % of the slots: a new
//!   connection beyond that closes that peer's own oldest idle one. So one
//!   client holding thousands of idle connections cannot keep a scrape out
//!   (issue 20, finding 9). While more than [`EVICTIONS_IN_FLIGHT`] evicted
//!   connections are still closing, the accept loop waits for one (new
//!   connections queue in the kernel's backlog) instead of refusing.
//!   Only when nothing can be closed (every connection has a request in
//!   flight) is the new connection accepted and closed at once, counted in
//!   `gpuops_http_connections_refused_total`.
//! - A header timeout (from accept, or from the first byte after a keep-alive
//!   wait, to the end of the request head; TLS handshake included), a body
//!   timeout (a request body still trickling is cut off and answered 408),
//!   and an idle timeout for keep-alive connections with nothing moving.
//! - Accept errors (EMFILE, ENFILE, ENOBUFS) are logged at most once a minute and
//!   followed by a short, growing pause instead of a hot loop.
//! - Graceful shutdown: on the shutdown future, stop accepting, let requests
//!   in flight finish (bounded), close idle connections.
//!
//! [`raise_open_file_limit`] lifts the soft `RLIMIT_NOFILE` to the hard one
//! at start, as the Go runtime does for node_exporter.
//! `webconfig` reads exporter-toolkit's web configuration file (TLS, basic
//! auth) for the agent; `auth` checks basic auth.
//!
//! This module serves a given router: it must not know any route, read the
//! role's configuration or keep per-request state beyond its timeouts.

pub mod auth;
pub mod webconfig;

use std::collections::{BTreeMap, HashMap};
use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::http::{header, Request, Response, StatusCode};
use axum::Router;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Notify, Semaphore};
use tokio::time::Instant;
use tower::ServiceExt as _;

pub use crate::config::WebLimits;
use crate::telemetry::HttpMetrics;

/// Gives the TLS configuration for the next connection (it may change while
/// the server runs: certificates are rotated by editing files).
pub type TlsSource = Arc<dyn Fn() -> Arc<rustls::ServerConfig> + Send + Sync>;

/// How long a graceful shutdown waits for requests in flight.
const DRAIN: Duration = Duration::from_secs(10);

/// Serves `app` on `listener` until `shutdown` resolves, then drains.
/// With `tls`, every connection is a TLS connection.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    limits: WebLimits,
    metrics: Arc<HttpMetrics>,
    tls: Option<TlsSource>,
    shutdown: impl Future<Output = ()> + Send,
) -> io::Result<()> {
    let mut limits = limits;
    limits.max_connections = fit_open_file_limit(limits.max_connections);
    let shared = Arc::new(Shared {
        app,
        limits,
        metrics,
    });
    // Evicted connections close a moment after the new one is admitted:
    // the semaphore bounds those in flight too.
    let permits = Arc::new(Semaphore::new(
        shared.limits.max_connections + EVICTIONS_IN_FLIGHT,
    ));
    let registry = Arc::new(Mutex::new(Registry::new(shared.limits.max_connections)));
    let (close_tx, close_rx) = watch::channel(false);
    let mut shutdown = std::pin::pin!(shutdown);
    let mut accept_errors = 0u64;
    let mut backoff = Duration::from_millis(5);
    let mut accept_log = LogEvery::new();
    let mut refusal_log = LogEvery::new();
    loop {
        let accepted = tokio::select! {
            () = &mut shutdown => break,
            r = listener.accept() => r,
        };
        let (stream, peer) = match accepted {
            Ok(a) => a,
            Err(e) if is_per_connection_error(&e) => continue,
            Err(e) => {
                shared.metrics.accept_errors.inc();
                accept_errors += 1;
                if let Some(n) = accept_log.due() {
                    tracing::warn!(error = %e, errors = n, "accept failed, pausing before the next accept (logged at most once a minute)");
                }
                tokio::select! {
                    () = &mut shutdown => break,
                    () = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(1));
                continue;
            }
        };
        if accept_errors > 0 {
            tracing::debug!(errors = accept_errors, "accepting connections again");
            accept_errors = 0;
            backoff = Duration::from_millis(5);
        }
        let activity = Arc::new(Activity::new());
        let admitted = lock_registry(&registry).admit(peer.ip(), &activity);
        let permit = match admitted {
            Admission::Refused => None,
            Admission::Admitted { id, evicted } => {
                if evicted {
                    shared.metrics.connections_evicted.inc();
                }
                match permits.clone().try_acquire_owned() {
                    Ok(p) => Some((id, p)),
                    // Every spare slot is held by an evicted connection
                    // still closing (a client reopening each one it loses
                    // evicts faster than those tasks run): wait for one
                    // rather than refuse a scrape, with new connections
                    // queued in the kernel's backlog meanwhile.
                    Err(_) => {
                        let wait =
                            tokio::time::timeout(EVICTION_WAIT, permits.clone().acquire_owned());
                        let permit = tokio::select! {
                            () = &mut shutdown => break,
                            p = wait => p.ok().and_then(Result::ok),
                        };
                        if permit.is_none() {
                            lock_registry(&registry).remove(id);
                        }
                        permit.map(|p| (id, p))
                    }
                }
            }
        };
        let Some((id, permit)) = permit else {
            shared.metrics.connections_refused.inc();
            if let Some(n) = refusal_log.due() {
                tracing::warn!(
                    max_connections = shared.limits.max_connections,
                    refused = n,
                    peer = %peer,
                    "connection limit reached and no idle connection to close: closing new connections at once (logged at most once a minute)"
                );
            }
            drop(stream);
            continue;
        };
        let shared = shared.clone();
        let tls = tls.as_ref().map(|source| source());
        let close = close_rx.clone();
        let registry = registry.clone();
        tokio::spawn(async move {
            shared.metrics.connections_open.inc();
            connection(stream, peer, &shared, activity, tls, close).await;
            lock_registry(&registry).remove(id);
            shared.metrics.connections_open.dec();
            drop(permit);
        });
    }
    drop(listener);
    let _ = close_tx.send(true);
    let all =
        u32::try_from(shared.limits.max_connections + EVICTIONS_IN_FLIGHT).unwrap_or(u32::MAX);
    if tokio::time::timeout(DRAIN, permits.acquire_many(all))
        .await
        .is_err()
    {
        tracing::warn!(
            open = shared.metrics.connections_open.get(),
            "connections still open after the drain period, closing them"
        );
    }
    Ok(())
}

/// Pending connections the kernel queues before we accept them. tokio's
/// `TcpListener::bind` asks for 1,024; a burst above that (a fleet's
/// scrapes, AlertManager HA retries, a reconnect storm) has SYNs dropped
/// and each client waits a second for its retransmit. The kernel caps it
/// at `net.core.somaxconn` (4,096 on current kernels).
pub const LISTEN_BACKLOG: u32 = 4096;

/// Binds a listener for [`serve`] with [`LISTEN_BACKLOG`] (and
/// `SO_REUSEADDR`, as `TcpListener::bind` sets it).
pub fn bind(addr: std::net::SocketAddr) -> io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

/// Resolves on SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
    tracing::info!("shutdown signal received, draining");
}

/// Lifts the soft `RLIMIT_NOFILE` to the hard limit (capped at 2^20), as the
/// Go runtime does for node_exporter, and logs both. Returns the soft limit
/// now in force.
pub fn raise_open_file_limit() -> Option<u64> {
    use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
    const CAP: u64 = 1 << 20;
    let old = getrlimit(Resource::Nofile);
    let hard = old.maximum.unwrap_or(CAP).min(CAP);
    match old.current {
        Some(soft) if soft >= hard => {
            tracing::info!(soft, hard, "open file limit");
            Some(soft)
        }
        soft => match setrlimit(
            Resource::Nofile,
            Rlimit {
                current: Some(hard),
                maximum: old.maximum,
            },
        ) {
            Ok(()) => {
                tracing::info!(
                    from = soft.unwrap_or(u64::MAX),
                    to = hard,
                    "raised the open file limit to the hard limit"
                );
                Some(hard)
            }
            Err(e) => {
                tracing::warn!(error = %e, soft = soft.unwrap_or(u64::MAX), hard, "cannot raise the open file limit");
                soft
            }
        },
    }
}

/// File descriptors kept free for everything but connections (the store,
/// /proc and /sys reads, NVML, the kernel log, logging, and connections
/// accepted while an evicted one is still closing).
pub const FD_RESERVE: u64 = 128;

/// The share of the connection slots one peer may hold.
pub const PEER_SHARE_PERCENT: usize = 75;

/// Evicted connections that may still be closing while their replacements
/// are open (beyond this, a new connection waits for one to close).
const EVICTIONS_IN_FLIGHT: usize = 64;

/// How long a new connection waits for an evicted one to finish closing
/// before it is refused. An evicted connection's task returns as soon as
/// it runs; this bound only matters if the runtime is stalled.
const EVICTION_WAIT: Duration = Duration::from_secs(1);

/// The unit connections are counted by per peer: an IPv4 address, or an
/// IPv6 /64 (one host usually holds a whole /64).
pub fn peer_key(addr: IpAddr) -> IpAddr {
    match addr {
        IpAddr::V4(_) => addr,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let s = v6.segments();
                IpAddr::V6(std::net::Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
            }
        },
    }
}

/// The connections open, in the order they were admitted, for choosing
/// which to close when a new one needs a slot.
struct Registry {
    capacity: usize,
    per_peer_cap: usize,
    next_id: u64,
    conns: BTreeMap<u64, (IpAddr, Arc<Activity>)>,
    per_peer: HashMap<IpAddr, usize>,
}

enum Admission {
    /// Registered as `id`; `evicted` when another connection was closed
    /// for it.
    Admitted { id: u64, evicted: bool },
    /// Full, and nothing idle to close.
    Refused,
}

fn lock_registry(r: &Mutex<Registry>) -> std::sync::MutexGuard<'_, Registry> {
    r.lock().unwrap_or_else(|p| p.into_inner())
}

impl Registry {
    fn new(capacity: usize) -> Registry {
        Registry {
            capacity,
            per_peer_cap: (capacity * PEER_SHARE_PERCENT / 100).max(1),
            next_id: 0,
            conns: BTreeMap::new(),
            per_peer: HashMap::new(),
        }
    }

    /// Admits a connection from `addr`, closing an idle one if it must.
    fn admit(&mut self, addr: IpAddr, activity: &Arc<Activity>) -> Admission {
        let peer = peer_key(addr);
        let mut evicted = false;
        if self.per_peer.get(&peer).copied().unwrap_or(0) >= self.per_peer_cap {
            // The peer holds its share: it gives up its own oldest idle one.
            match self.oldest_idle(Some(peer)) {
                Some(victim) => {
                    self.evict(victim);
                    evicted = true;
                }
                None => return Admission::Refused,
            }
        } else if self.conns.len() >= self.capacity {
            // Full: the peer holding the most gives up its oldest idle one,
            // else anyone's oldest idle one.
            let busiest = self
                .per_peer
                .iter()
                .max_by_key(|(_, n)| **n)
                .map(|(p, _)| *p);
            match busiest
                .and_then(|p| self.oldest_idle(Some(p)))
                .or_else(|| self.oldest_idle(None))
            {
                Some(victim) => {
                    self.evict(victim);
                    evicted = true;
                }
                None => return Admission::Refused,
            }
        }
        let id = self.next_id;
        self.next_id += 1;
        self.conns.insert(id, (peer, activity.clone()));
        *self.per_peer.entry(peer).or_insert(0) += 1;
        Admission::Admitted { id, evicted }
    }

    /// The oldest connection (of `peer`, or of anyone) with no request in
    /// flight: a waiting one first, else one still sending its head.
    fn oldest_idle(&self, peer: Option<IpAddr>) -> Option<u64> {
        let mine = |p: &IpAddr| peer.is_none_or(|want| want == *p);
        let mut sending_head = None;
        for (id, (p, activity)) in &self.conns {
            if !mine(p) {
                continue;
            }
            match activity.lock().phase {
                Phase::Waiting { .. } => return Some(*id),
                Phase::Head { .. } if sending_head.is_none() => sending_head = Some(*id),
                _ => {}
            }
        }
        sending_head
    }

    /// Tells a connection to close and forgets it (its slot is free now).
    fn evict(&mut self, id: u64) {
        if let Some((_, activity)) = self.conns.get(&id) {
            activity.evict();
        }
        self.remove(id);
    }

    /// Forgets a connection (closed, or evicted).
    fn remove(&mut self, id: u64) {
        if let Some((peer, _)) = self.conns.remove(&id) {
            if let Some(n) = self.per_peer.get_mut(&peer) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    self.per_peer.remove(&peer);
                }
            }
        }
    }
}

/// `wanted`, lowered so that connections alone can never exhaust the
/// process's open file limit (accept would fail with EMFILE instead of
/// refusing cleanly, and the store or collectors could not open files).
fn fit_open_file_limit(wanted: usize) -> usize {
    use rustix::process::{getrlimit, Resource};
    let Some(soft) = getrlimit(Resource::Nofile).current else {
        return wanted;
    };
    let room = usize::try_from(soft.saturating_sub(FD_RESERVE)).unwrap_or(usize::MAX);
    if wanted <= room {
        return wanted;
    }
    let fitted = room.max(16);
    tracing::warn!(
        max_connections = wanted,
        open_file_limit = soft,
        using = fitted,
        "max_connections is above what the open file limit allows; raise LimitNOFILE="
    );
    fitted
}

/// Rate-limits a warning that could otherwise flood the log.
struct LogEvery {
    last: Option<Instant>,
    count: u64,
}

impl LogEvery {
    fn new() -> LogEvery {
        LogEvery {
            last: None,
            count: 0,
        }
    }

    /// Counts one event; `Some(events since the last log line)` when one is due.
    fn due(&mut self) -> Option<u64> {
        self.count += 1;
        let now = Instant::now();
        match self.last {
            Some(t) if now - t < Duration::from_secs(60) => None,
            _ => {
                self.last = Some(now);
                Some(std::mem::take(&mut self.count))
            }
        }
    }
}

/// What every connection task shares.
struct Shared {
    app: Router,
    limits: WebLimits,
    metrics: Arc<HttpMetrics>,
}

/// Errors about one connection that died while queued: accept again at once.
fn is_per_connection_error(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionRefused
            | io::ErrorKind::Interrupted
    )
}

async fn connection(
    stream: TcpStream,
    peer: SocketAddr,
    shared: &Shared,
    activity: Arc<Activity>,
    tls: Option<Arc<rustls::ServerConfig>>,
    mut close: watch::Receiver<bool>,
) {
    let _ = stream.set_nodelay(true);
    let io = Tracked {
        inner: stream,
        activity: activity.clone(),
    };
    match tls {
        None => drive(io, peer, shared, &activity, close).await,
        Some(cfg) => {
            let handshake = tokio_rustls::TlsAcceptor::from(cfg).accept(io);
            let io = tokio::select! {
                r = handshake => match r {
                    Ok(io) => io,
                    Err(e) => {
                        tracing::debug!(peer = %peer, error = %e, "tls handshake failed");
                        return;
                    }
                },
                kind = activity.expired(&shared.limits) => {
                    count_close(shared, kind);
                    return;
                }
                _ = close.changed() => return,
            };
            drive(io, peer, shared, &activity, close).await
        }
    }
}

/// Serves HTTP/1.1 on one connection under the watchdog.
async fn drive<IO>(
    io: IO,
    peer: SocketAddr,
    shared: &Shared,
    activity: &Arc<Activity>,
    mut close: watch::Receiver<bool>,
) where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let service = {
        let app = shared.app.clone();
        let activity = activity.clone();
        let body_timeout = shared.limits.body_timeout;
        let metrics = shared.metrics.clone();
        hyper::service::service_fn(move |req: Request<Incoming>| {
            let app = app.clone();
            let busy = Busy::start(activity.clone());
            let metrics = metrics.clone();
            async move {
                let timed_out = Arc::new(AtomicBool::new(false));
                let mut req = req.map(|body| {
                    Body::new(DeadlineBody {
                        inner: body,
                        deadline: Instant::now() + body_timeout,
                        sleep: None,
                        timed_out: timed_out.clone(),
                    })
                });
                req.extensions_mut().insert(ConnectInfo(peer));
                let resp = match app.oneshot(req).await {
                    Ok(r) => r,
                    Err(never) => match never {},
                };
                drop(busy);
                if timed_out.load(Ordering::Relaxed) {
                    metrics.timeouts.with_label_values(&["body"]).inc();
                    return Ok::<_, Infallible>(body_timeout_response());
                }
                Ok(resp)
            }
        })
    };
    // The header timeout is the watchdog's (hyper's would also cut idle
    // keep-alive connections at the header timeout).
    let conn = hyper::server::conn::http1::Builder::new()
        .keep_alive(true)
        .header_read_timeout(None)
        .serve_connection(TokioIo::new(io), service);
    let mut conn = std::pin::pin!(conn);
    let mut closing = false;
    loop {
        tokio::select! {
            r = conn.as_mut() => {
                if let Err(e) = r {
                    tracing::debug!(peer = %peer, error = %e, "connection ended with an error");
                }
                return;
            }
            kind = activity.expired(&shared.limits) => {
                count_close(shared, kind);
                tracing::debug!(peer = %peer, reason = kind, "closing a slow or evicted connection");
                return;
            }
            _ = close.changed(), if !closing => {
                closing = true;
                conn.as_mut().graceful_shutdown();
            }
        }
    }
}

/// Counts a connection the watchdog closed: a timeout by its name (an
/// eviction was counted when it was decided).
fn count_close(shared: &Shared, kind: &'static str) {
    if kind != EVICTED {
        shared.metrics.timeouts.with_label_values(&[kind]).inc();
    }
}

/// What [`Activity::expired`] returns for an evicted connection.
const EVICTED: &str = "evicted";

fn body_timeout_response() -> Response<Body> {
    let mut resp = Response::new(Body::from("request body not received in time\n"));
    *resp.status_mut() = StatusCode::REQUEST_TIMEOUT;
    resp.headers_mut().insert(
        header::CONNECTION,
        header::HeaderValue::from_static("close"),
    );
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}

/// Where one connection is, for its timeouts.
#[derive(Debug, Clone, Copy)]
enum Phase {
    /// No byte since `since` (accept, or the end of the last request).
    Waiting { since: Instant },
    /// A request head (or TLS handshake) began at `since`.
    Head { since: Instant },
    /// This many requests are being handled.
    Busy(usize),
}

struct ActivityState {
    phase: Phase,
    /// The last time a byte was read or written.
    last_io: Instant,
    /// Requests answered on this connection.
    answered: u64,
}

/// Updated by the connection's I/O and its service, read by its watchdog.
struct Activity {
    state: Mutex<ActivityState>,
    /// Set when the connection was chosen to make room for a new one.
    evicted: AtomicBool,
    /// Woken when a deadline may have moved earlier.
    changed: Notify,
}

impl Activity {
    fn new() -> Activity {
        let now = Instant::now();
        Activity {
            state: Mutex::new(ActivityState {
                phase: Phase::Waiting { since: now },
                last_io: now,
                answered: 0,
            }),
            evicted: AtomicBool::new(false),
            changed: Notify::new(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ActivityState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn on_read(&self) {
        let now = Instant::now();
        let mut s = self.lock();
        s.last_io = now;
        if let Phase::Waiting { since } = s.phase {
            // The first request's head is timed from accept.
            let since = if s.answered == 0 { since } else { now };
            s.phase = Phase::Head { since };
            drop(s);
            self.changed.notify_one();
        }
    }

    /// Closes the connection (its watchdog returns [`EVICTED`]).
    fn evict(&self) {
        self.evicted.store(true, Ordering::Relaxed);
        self.changed.notify_one();
    }

    fn on_write(&self) {
        self.lock().last_io = Instant::now();
    }

    /// The deadline now in force and the timeout it belongs to.
    fn deadline(&self, limits: &WebLimits) -> Option<(Instant, &'static str)> {
        let s = self.lock();
        match s.phase {
            Phase::Busy(_) => None,
            Phase::Head { since } => Some((since + limits.header_timeout, "header")),
            Phase::Waiting { since } if s.answered == 0 => {
                Some((since + limits.header_timeout, "header"))
            }
            Phase::Waiting { since } => Some((since.max(s.last_io) + limits.idle_timeout, "idle")),
        }
    }

    /// Resolves with the timeout's name once the connection has overstayed.
    async fn expired(&self, limits: &WebLimits) -> &'static str {
        loop {
            let notified = self.changed.notified();
            if self.evicted.load(Ordering::Relaxed) {
                return EVICTED;
            }
            match self.deadline(limits) {
                None => notified.await,
                Some((at, _)) => {
                    tokio::select! {
                        () = tokio::time::sleep_until(at) => {
                            // Still the same deadline (nothing moved it later)?
                            if let Some((now_at, now_kind)) = self.deadline(limits) {
                                if now_at <= Instant::now() {
                                    return now_kind;
                                }
                            }
                        }
                        () = notified => {}
                    }
                }
            }
        }
    }
}

/// Marks a request in flight for as long as it lives.
struct Busy(Arc<Activity>);

impl Busy {
    fn start(activity: Arc<Activity>) -> Busy {
        {
            let mut s = activity.lock();
            s.phase = match s.phase {
                Phase::Busy(n) => Phase::Busy(n + 1),
                _ => Phase::Busy(1),
            };
        }
        Busy(activity)
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        let now = Instant::now();
        let mut s = self.0.lock();
        s.phase = match s.phase {
            Phase::Busy(n) if n > 1 => Phase::Busy(n - 1),
            _ => {
                s.answered += 1;
                Phase::Waiting { since: now }
            }
        };
        drop(s);
        self.0.changed.notify_one();
    }
}

/// A socket that reports its reads and writes to [`Activity`].
struct Tracked<S> {
    inner: S,
    activity: Arc<Activity>,
}

impl<S: AsyncRead + Unpin> AsyncRead for Tracked<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if matches!(r, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.activity.on_read();
        }
        r
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Tracked<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, data);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.on_write();
        }
        r
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.on_write();
        }
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// The request body, cut off at `deadline` (the handler then gets an error
/// and the response is replaced by 408).
struct DeadlineBody {
    inner: Incoming,
    deadline: Instant,
    sleep: Option<Pin<Box<tokio::time::Sleep>>>,
    timed_out: Arc<AtomicBool>,
}

/// The error a handler sees when the body came too slowly.
#[derive(Debug, thiserror::Error)]
#[error("request body not received within the body timeout")]
pub struct BodyTimeout;

impl http_body::Body for DeadlineBody {
    type Data = axum::body::Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        let this = &mut *self;
        if let Poll::Ready(frame) = Pin::new(&mut this.inner).poll_frame(cx) {
            return Poll::Ready(frame.map(|f| f.map_err(Into::into)));
        }
        let deadline = this.deadline;
        let sleep = this
            .sleep
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
        match sleep.as_mut().poll(cx) {
            Poll::Ready(()) => {
                this.timed_out.store(true, Ordering::Relaxed);
                Poll::Ready(Some(Err(Box::new(BodyTimeout))))
            }
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> WebLimits {
        WebLimits {
            max_connections: 16,
            header_timeout: Duration::from_secs(10),
            body_timeout: Duration::from_secs(30),
            idle_timeout: Duration::from_secs(60),
        }
    }

    /// Regression (web_load failed in CI): tokio's `TcpListener::bind`
    /// queues 1,024 pending connections; a burst of 2,500 had SYNs dropped,
    /// each costing its client a 1 s retransmit (2,500 sequential connects
    /// took 10–11 s, past the 10 s header timeout). `bind` queues 4,096:
    /// with nothing accepting, 1,500 connects all complete their handshake.
    #[tokio::test]
    async fn listener_queues_a_burst_beyond_tokios_default_backlog() {
        let somaxconn = std::fs::read_to_string("/proc/sys/net/core/somaxconn")
            .ok()
            .and_then(|s| s.trim().parse::<u32>().ok())
            .unwrap_or(0);
        assert!(
            somaxconn >= 1500,
            "net.core.somaxconn is {somaxconn}; this test needs >= 1500"
        );
        let listener = bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = listener.local_addr().unwrap();
        let mut open = Vec::new();
        for i in 0..1500 {
            let c = tokio::time::timeout(Duration::from_millis(500), TcpStream::connect(addr))
                .await
                .unwrap_or_else(|_| panic!("connect {i} waited for a SYN retransmit"))
                .unwrap();
            open.push(c);
        }
        assert_eq!(open.len(), 1500);
        drop(listener);
    }

    #[test]
    fn shipped_examples_document_the_default_limits() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
        let agent = crate::config::AgentConfig::from_file(&root.join("config/agent.example.toml"))
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(agent.web, WebLimits::default());
        // As text: the checked-out example is world-readable, and a live
        // config holding inline secrets like its placeholders may not be.
        let example = root.join("config/bot.example.toml");
        let text = std::fs::read_to_string(&example).unwrap_or_default();
        let bot =
            crate::config::BotConfig::from_str(&example, &text).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(bot.server.limits, WebLimits::default());
        let bad = crate::config::AgentConfig::from_str(
            std::path::Path::new("a.toml"),
            "[web]\nmax_connections = 3\nheader_timeout_secs = 0\n",
        )
        .map(|_| ())
        .unwrap_err()
        .to_string();
        assert!(
            bad.contains("a.toml:2: web.max_connections: must be between 16 and 1000000, got 3"),
            "{bad}"
        );
        assert!(
            bad.contains("a.toml:3: web.header_timeout_secs: must be a positive number of seconds"),
            "{bad}"
        );
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn admitted(a: Admission) -> (u64, bool) {
        match a {
            Admission::Admitted { id, evicted } => (id, evicted),
            Admission::Refused => panic!("refused"),
        }
    }

    #[test]
    fn a_full_server_closes_the_oldest_idle_connection_of_the_busiest_peer() {
        let mut r = Registry::new(8);
        assert_eq!(r.per_peer_cap, 6);
        let conns: Vec<Arc<Activity>> = (0..8).map(|_| Arc::new(Activity::new())).collect();
        // Prometheus keeps one connection; a flood holds the rest.
        let (prom, _) = admitted(r.admit(ip("10.0.0.1"), &conns[0]));
        let mut flood = Vec::new();
        for c in &conns[1..7] {
            flood.push(admitted(r.admit(ip("10.0.0.66"), c)).0);
        }
        // The flood's oldest has a request in flight; one other peer.
        let busy = Busy::start(conns[1].clone());
        admitted(r.admit(ip("10.0.0.2"), &conns[7]));
        assert_eq!(r.conns.len(), 8);
        // Full: a new peer's connection evicts the flood's oldest idle one
        // (not Prometheus's older one, not the busy one).
        let new = Arc::new(Activity::new());
        let (_, evicted) = admitted(r.admit(ip("10.0.0.3"), &new));
        assert!(evicted);
        assert!(conns[2].evicted.load(Ordering::Relaxed));
        assert!(!conns[1].evicted.load(Ordering::Relaxed));
        assert!(!conns[0].evicted.load(Ordering::Relaxed));
        assert!(r.conns.contains_key(&prom));
        assert!(!r.conns.contains_key(&flood[1]));
        assert_eq!(r.conns.len(), 8);
        drop(busy);
    }

    #[test]
    fn one_peer_holds_at_most_its_share_and_busy_connections_are_kept() {
        let mut r = Registry::new(16);
        let cap = r.per_peer_cap;
        assert_eq!(cap, 12);
        let conns: Vec<Arc<Activity>> = (0..cap).map(|_| Arc::new(Activity::new())).collect();
        for c in &conns {
            let (_, evicted) = admitted(r.admit(ip("127.0.0.1"), c));
            assert!(!evicted);
        }
        // At its share, the peer's next connection replaces its own oldest.
        let next = Arc::new(Activity::new());
        let (_, evicted) = admitted(r.admit(ip("127.0.0.1"), &next));
        assert!(evicted && conns[0].evicted.load(Ordering::Relaxed));
        assert_eq!(r.per_peer[&ip("127.0.0.1")], cap);
        // Another peer still gets in without evicting anything.
        let other = Arc::new(Activity::new());
        assert!(!admitted(r.admit(ip("127.0.0.2"), &other)).1);
        // An IPv6 /64 counts as one peer.
        let a = Arc::new(Activity::new());
        let b = Arc::new(Activity::new());
        admitted(r.admit(ip("2001:db8::1"), &a));
        admitted(r.admit(ip("2001:db8::ffff:2"), &b));
        assert_eq!(r.per_peer[&ip("2001:db8::")], 2);
        // Every connection of the peer busy: the new one is refused.
        let busy: Vec<Busy> = conns[1..]
            .iter()
            .chain([&next])
            .map(|c| Busy::start(c.clone()))
            .collect();
        assert!(matches!(
            r.admit(ip("127.0.0.1"), &Arc::new(Activity::new())),
            Admission::Refused
        ));
        drop(busy);
        // Closed connections give their slots back.
        let ids: Vec<u64> = r.conns.keys().copied().collect();
        for id in ids {
            r.remove(id);
        }
        assert!(r.conns.is_empty() && r.per_peer.is_empty());
    }

    #[tokio::test]
    async fn an_evicted_connection_is_closed_by_its_watchdog() {
        let l = limits();
        let a = Arc::new(Activity::new());
        let watchdog = {
            let a = a.clone();
            let l = l.clone();
            tokio::spawn(async move { a.expired(&l).await })
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
        a.evict();
        let kind = tokio::time::timeout(Duration::from_secs(1), watchdog)
            .await
            .expect("the watchdog did not wake")
            .unwrap();
        assert_eq!(kind, EVICTED);
    }

    #[test]
    fn deadlines_follow_the_connection() {
        let l = limits();
        let a = Arc::new(Activity::new());
        let (first, kind) = a.deadline(&l).unwrap();
        assert_eq!(kind, "header");
        a.on_read();
        // The first head is timed from accept, not from its first byte.
        assert_eq!(a.deadline(&l), Some((first, "header")));
        let busy = Busy::start(a.clone());
        assert_eq!(a.deadline(&l), None, "no deadline while a request runs");
        drop(busy);
        let (idle, kind) = a.deadline(&l).unwrap();
        assert_eq!(kind, "idle");
        assert!(idle > first + (l.idle_timeout - l.header_timeout) - Duration::from_millis(1));
        // A new head on the kept-alive connection is timed from its first byte.
        a.on_read();
        let (head, kind) = a.deadline(&l).unwrap();
        assert_eq!(kind, "header");
        assert!(head < idle);
    }
}
