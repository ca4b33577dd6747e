//! The hardened HTTP server (`src/web`) in-process, on loopback: timeouts
//! for slow headers, trickling bodies and idle keep-alive connections, the
//! connection cap; and the closed label sets of the RED metrics in both
//! roles' routers. One regression test per finding, named after it.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::http::Request;
use axum::routing::{get, post};
use axum::Router;
use gpuops::config::{AgentConfig, BotConfig, WebLimits};
use gpuops::telemetry::HttpMetrics;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tower::ServiceExt as _;

fn limits() -> WebLimits {
    WebLimits {
        max_connections: 16,
        header_timeout: Duration::from_secs(1),
        body_timeout: Duration::from_secs(1),
        idle_timeout: Duration::from_secs(2),
    }
}

/// Starts `web::serve` with a small router; returns its address, metrics
/// and the sender that stops it.
async fn start(
    limits: WebLimits,
) -> (
    std::net::SocketAddr,
    Arc<HttpMetrics>,
    tokio::sync::oneshot::Sender<()>,
) {
    let app = Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route(
            "/echo",
            post(|body: Bytes| async move { format!("{} bytes\n", body.len()) }),
        );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let metrics = Arc::new(HttpMetrics::new());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let m = metrics.clone();
    tokio::spawn(async move {
        gpuops::web::serve(listener, app, limits, m, None, async {
            let _ = stopped.await;
        })
        .await
        .unwrap();
    });
    (addr, metrics, stop)
}

/// Reads until the peer closes (or 10 s pass); returns what came and when
/// the connection ended.
async fn read_to_close(s: &mut TcpStream) -> (String, Instant) {
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut buf)).await;
    (String::from_utf8_lossy(&buf).into_owned(), Instant::now())
}

async fn get_ok(addr: std::net::SocketAddr) -> String {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(b"GET /healthz HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    read_to_close(&mut s).await.0
}

#[tokio::test]
async fn slow_header_sender_is_disconnected() {
    let (addr, metrics, _stop) = start(limits()).await;
    let mut s = TcpStream::connect(addr).await.unwrap();
    let started = Instant::now();
    // One byte every 200 ms: the head would take minutes.
    let head = b"GET /healthz HTTP/1.1\r\nHost: slow.example\r\nX-Padding: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n\r\n";
    let mut closed = false;
    for b in head {
        if s.write_all(&[*b]).await.is_err() {
            closed = true;
            break;
        }
        let mut probe = [0u8; 1];
        match tokio::time::timeout(Duration::from_millis(200), s.read(&mut probe)).await {
            Ok(Ok(0)) | Ok(Err(_)) => {
                closed = true;
                break;
            }
            Ok(Ok(_)) => panic!("the server answered an incomplete head"),
            Err(_) => {}
        }
    }
    let took = started.elapsed();
    assert!(closed, "a 1-byte-per-200-ms head was never cut off");
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(3),
        "cut off after {took:?}, header timeout is 1 s"
    );
    assert_eq!(metrics.timeouts.with_label_values(&["header"]).get(), 1);
    // The server still answers others.
    assert!(get_ok(addr).await.starts_with("HTTP/1.1 200"));
}

#[tokio::test]
async fn silent_connection_is_closed_after_the_header_timeout() {
    let (addr, metrics, _stop) = start(limits()).await;
    let mut s = TcpStream::connect(addr).await.unwrap();
    let started = Instant::now();
    let (got, at) = read_to_close(&mut s).await;
    let took = at - started;
    assert_eq!(got, "");
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(3),
        "{took:?}"
    );
    assert_eq!(metrics.timeouts.with_label_values(&["header"]).get(), 1);
}

#[tokio::test]
async fn trickling_body_is_cut_off_with_408() {
    let (addr, metrics, _stop) = start(limits()).await;
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 1000\r\n\r\n0123456789")
        .await
        .unwrap();
    let started = Instant::now();
    let (got, at) = read_to_close(&mut s).await;
    let took = at - started;
    assert!(got.starts_with("HTTP/1.1 408"), "{got}");
    assert!(took < Duration::from_secs(3), "{took:?}");
    assert_eq!(metrics.timeouts.with_label_values(&["body"]).get(), 1);

    // A body that arrives in time is served.
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(
        b"POST /echo HTTP/1.1\r\nHost: t\r\nConnection: close\r\nContent-Length: 5\r\n\r\nhello",
    )
    .await
    .unwrap();
    let (got, _) = read_to_close(&mut s).await;
    assert!(
        got.starts_with("HTTP/1.1 200") && got.ends_with("5 bytes\n"),
        "{got}"
    );
}

#[tokio::test]
async fn idle_keep_alive_connection_is_closed_after_the_idle_timeout() {
    let l = WebLimits {
        header_timeout: Duration::from_secs(5),
        idle_timeout: Duration::from_secs(1),
        ..limits()
    };
    let (addr, metrics, _stop) = start(l).await;
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n")
        .await
        .unwrap();
    let mut buf = [0u8; 512];
    let n = s.read(&mut buf).await.unwrap();
    assert!(buf[..n].starts_with(b"HTTP/1.1 200"));
    let answered = Instant::now();
    let (rest, at) = read_to_close(&mut s).await;
    assert_eq!(rest, "");
    let took = at - answered;
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_millis(2500),
        "idle keep-alive connection closed after {took:?}, idle timeout 1 s, header 5 s"
    );
    assert_eq!(metrics.timeouts.with_label_values(&["idle"]).get(), 1);
}

/// A connection from `from` (a loopback address) to `addr`.
async fn connect_from(from: &str, addr: std::net::SocketAddr) -> TcpStream {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind(format!("{from}:0").parse().unwrap()).unwrap();
    socket.connect(addr).await.unwrap()
}

/// With nothing idle to close (every connection of the peer has a request
/// in flight), a connection beyond the peer's share is closed at once;
/// another peer still gets in.
#[tokio::test]
async fn connections_over_the_cap_are_closed_at_once() {
    let l = WebLimits {
        max_connections: 16,
        header_timeout: Duration::from_secs(30),
        body_timeout: Duration::from_secs(30),
        ..limits()
    };
    let (addr, metrics, _stop) = start(l).await;
    // One peer may hold 75 % of the 16 slots.
    let share = 12;
    let mut held = Vec::new();
    for _ in 0..share {
        let mut s = connect_from("127.0.0.1", addr).await;
        // A request whose body never comes: in flight, not idle.
        s.write_all(b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 100\r\n\r\nx")
            .await
            .unwrap();
        held.push(s);
    }
    // Wait until the server has taken all of them.
    let until = Instant::now() + Duration::from_secs(5);
    while metrics.connections_open.get() < share && Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(metrics.connections_open.get(), share);
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut extra = connect_from("127.0.0.1", addr).await;
    let started = Instant::now();
    let (got, at) = read_to_close(&mut extra).await;
    assert_eq!(got, "");
    assert!(at - started < Duration::from_secs(1), "{:?}", at - started);
    assert_eq!(metrics.connections_refused.get(), 1);
    assert_eq!(metrics.connections_evicted.get(), 0);
    // Another peer gets one of the remaining slots.
    let mut other = connect_from("127.0.0.2", addr).await;
    other
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    assert!(read_to_close(&mut other)
        .await
        .0
        .starts_with("HTTP/1.1 200"));
    drop(held);
    let until = Instant::now() + Duration::from_secs(5);
    while metrics.connections_open.get() > 0 && Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(get_ok(addr).await.starts_with("HTTP/1.1 200"));
}

/// Finding 9 (issue 20), in-process: a full server closes the oldest idle
/// connection to admit a new one instead of refusing it.
#[tokio::test]
async fn a_full_server_closes_the_oldest_idle_connection_for_a_new_one() {
    let l = WebLimits {
        max_connections: 16,
        header_timeout: Duration::from_secs(30),
        ..limits()
    };
    let (addr, metrics, _stop) = start(l).await;
    // Three peers hold three idle connections each, a fourth seven: the
    // server is full.
    let mut held = Vec::new();
    for (peer, n) in [
        ("127.0.0.4", 7),
        ("127.0.0.1", 3),
        ("127.0.0.2", 3),
        ("127.0.0.3", 3),
    ] {
        for _ in 0..n {
            held.push(connect_from(peer, addr).await);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let until = Instant::now() + Duration::from_secs(5);
    while metrics.connections_open.get() < 16 && Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(metrics.connections_open.get(), 16);
    let started = Instant::now();
    let got = get_ok(addr).await;
    assert!(got.starts_with("HTTP/1.1 200"), "{got:?}");
    assert!(started.elapsed() < Duration::from_secs(1));
    assert_eq!(metrics.connections_refused.get(), 0);
    assert_eq!(metrics.connections_evicted.get(), 1);
    // The oldest one of the peer holding the most was closed; the others
    // are still open.
    let (rest, at) = read_to_close(&mut held[0]).await;
    assert_eq!(rest, "");
    assert!(at - started < Duration::from_secs(2), "not closed");
    let mut buf = [0u8; 16];
    for s in &held[1..] {
        assert!(matches!(
            s.try_read(&mut buf),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock
        ));
    }
}

#[tokio::test]
async fn graceful_shutdown_finishes_and_returns() {
    let (addr, _metrics, stop) = start(limits()).await;
    let idle = TcpStream::connect(addr).await.unwrap();
    assert!(get_ok(addr).await.starts_with("HTTP/1.1 200"));
    stop.send(()).unwrap();
    // The listener goes away; the idle connection is closed.
    let mut idle = idle;
    let started = Instant::now();
    let _ = read_to_close(&mut idle).await;
    assert!(started.elapsed() < Duration::from_secs(3));
}

/// Counts the series of `api_requests_total` in `metrics`.
fn request_series(metrics: &HttpMetrics) -> Vec<String> {
    metrics
        .gather()
        .iter()
        .filter(|f| f.name() == "api_requests_total")
        .flat_map(|f| f.get_metric().iter())
        .map(|m| {
            m.get_label()
                .iter()
                .map(|l| format!("{}={}", l.name(), l.value()))
                .collect::<Vec<_>>()
                .join(",")
        })
        .collect()
}

async fn made_up_methods(app: Router) {
    for i in 0..50 {
        for path in ["/metrics", "/healthz", &format!("/made-up-{i}")] {
            let req = Request::builder()
                .method(format!("BREW{i}").as_str())
                .uri(path)
                .body(Body::empty())
                .unwrap();
            let _ = app.clone().oneshot(req).await.unwrap();
        }
    }
}

#[tokio::test]
async fn made_up_http_methods_do_not_add_series() {
    // Agent.
    let mut cfg = AgentConfig::default();
    let host = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/host/full");
    cfg.roots.procfs = host.join("proc");
    cfg.roots.sysfs = host.join("sys");
    cfg.roots.rootfs = host.join("root");
    cfg.roots.kmsg = host.join("kmsg");
    cfg.collectors.gpu = false;
    let cfg = Arc::new(cfg);
    let events = Arc::new(gpuops::collector::KernelEvents::new());
    let ctx = Arc::new(gpuops::collector::Context::new(cfg, events.clone(), false));
    let collectors = gpuops::collector::all(&ctx);
    let state = Arc::new(gpuops::exporter::AgentState {
        runner: Arc::new(gpuops::collector::Runner::new(ctx, collectors)),
        events,
        http: Arc::new(HttpMetrics::new()),
    });
    made_up_methods(gpuops::exporter::router(state.clone())).await;
    let series = request_series(&state.http);
    assert!(
        series.len() <= 3,
        "agent: 150 requests with made-up methods made {} series: {series:?}",
        series.len()
    );
    assert!(
        series.iter().all(|s| s.contains("method=other")),
        "{series:?}"
    );
    assert!(
        series.iter().all(|s| [
            "endpoint=/metrics,",
            "endpoint=/healthz,",
            "endpoint=unmatched,"
        ]
        .iter()
        .any(|e| s.starts_with(e))),
        "{series:?}"
    );

    // Bot.
    let dir = tempfile::tempdir().unwrap();
    let text = format!(
        "[store]\npath = \"{}\"\n",
        dir.path().join("bot.db").display()
    );
    let cfg = BotConfig::from_str(Path::new("t.toml"), &text).unwrap();
    let store = gpuops::store::Store::open(&cfg.store.path).unwrap();
    let (bot, _worker) = gpuops::bot::BotState::new(Arc::new(cfg), store).unwrap();
    made_up_methods(gpuops::bot_role::router(bot.clone())).await;
    let series = request_series(&bot.http);
    assert!(
        series.len() <= 3,
        "bot: 150 requests with made-up methods made {} series: {series:?}",
        series.len()
    );
    assert!(
        series.iter().all(|s| s.contains("method=other")),
        "{series:?}"
    );
}
