//! HTTP basic authentication against the web configuration's
//! `basic_auth_users` (bcrypt hashes), and its response headers, as an axum
//! middleware over every route of the agent.
//!
//! bcrypt is slow on purpose (about 70 ms at cost 10), so a flood of wrong
//! passwords must not lock out the right ones (issue 20, finding 10):
//! - A successful check is remembered for [`CACHE_TTL`] after its last use
//!   (at most [`CACHE_MAX`] entries), keyed on an HMAC-SHA256 under a
//!   per-process random key of the user, the stored hash and the presented
//!   password (a changed hash never matches an old entry, and the cache
//!   holds nothing a dump could test guesses against): a scraper that keeps
//!   scraping never waits for bcrypt again.
//! - bcrypt runs off the async threads, at most [`BCRYPT_SLOTS`] checks at
//!   a time, and at most [`PEER_BCRYPT_SLOTS`] per peer (an IPv4 address or
//!   an IPv6 /64): a flooding peer queues behind itself, so it holds at most
//!   one slot and other peers' logins go on. A request that cannot get its
//!   turn within [`BCRYPT_WAIT`] is refused (401).
//! - bcrypt reads only the first 72 bytes of a password: a longer one is
//!   refused without being checked ([`MAX_PASSWORD_BYTES`]), so a valid
//!   password with anything appended is not accepted.
//!
//! An unknown user costs the same bcrypt as a known one. Passwords and
//! hashes are never logged.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{ConnectInfo, Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use hmac::{Hmac, Mac as _};

use crate::telemetry::{self, HttpMetrics};
use crate::web::peer_key;
use crate::web::webconfig::WebConfigSource;

/// How long a successful check is remembered.
pub const CACHE_TTL: Duration = Duration::from_secs(60);
/// bcrypt checks running at once.
pub const BCRYPT_SLOTS: usize = 2;
/// bcrypt checks one peer may have running or waiting for a slot at once;
/// its other requests wait behind them.
pub const PEER_BCRYPT_SLOTS: usize = 1;
/// How long a request waits for its turn at bcrypt before it is refused.
pub const BCRYPT_WAIT: Duration = Duration::from_secs(2);
/// bcrypt uses the first 72 bytes of a password and ignores the rest.
pub const MAX_PASSWORD_BYTES: usize = 72;
/// Entries kept at most (expired ones are dropped first).
pub const CACHE_MAX: usize = 1024;
/// Checked when the user is unknown, so that its timing does not tell.
const DUMMY_HASH: &str = "$2y$10$QOauhQNbBCuQDKes6eFzPeMqBSjb7Mr5DUmpZ/VcEd00UAV/LDeSi";

/// The state of [`require`].
pub struct BasicAuth {
    source: Arc<WebConfigSource>,
    metrics: Arc<HttpMetrics>,
    /// Keys the cache's HMAC; never leaves the process.
    cache_key: [u8; 32],
    cache: Mutex<HashMap<[u8; 32], Instant>>,
    slots: tokio::sync::Semaphore,
    /// Per-peer queues in front of `slots`; an entry lives while a request
    /// of that peer holds or waits for it.
    peers: Mutex<HashMap<IpAddr, Arc<tokio::sync::Semaphore>>>,
}

/// Removes a peer's queue once its last request is done with it.
struct PeerTurn<'a> {
    auth: &'a BasicAuth,
    peer: IpAddr,
    queue: Option<Arc<tokio::sync::Semaphore>>,
}

impl Drop for PeerTurn<'_> {
    fn drop(&mut self) {
        let mut peers = self.auth.peers.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(queue) = self.queue.take() {
            // Clones are made under this lock: the map's and ours are the
            // last two.
            if Arc::strong_count(&queue) <= 2 {
                peers.remove(&self.peer);
            }
        }
    }
}

impl BasicAuth {
    pub fn new(source: Arc<WebConfigSource>, metrics: Arc<HttpMetrics>) -> Arc<BasicAuth> {
        Arc::new(BasicAuth {
            source,
            metrics,
            cache_key: rand::random(),
            cache: Mutex::new(HashMap::new()),
            slots: tokio::sync::Semaphore::new(BCRYPT_SLOTS),
            peers: Mutex::new(HashMap::new()),
        })
    }

    /// Whether `user` with `password`, presented by `peer`, matches the
    /// configuration in force.
    async fn check(
        &self,
        users: &std::collections::BTreeMap<String, String>,
        user: &str,
        password: &str,
        peer: Option<IpAddr>,
    ) -> bool {
        if password.len() > MAX_PASSWORD_BYTES {
            tracing::debug!(
                max_bytes = MAX_PASSWORD_BYTES,
                "basic auth password longer than bcrypt reads refused"
            );
            return false;
        }
        let (hash, known) = match users.get(user) {
            Some(h) => (h.clone(), true),
            None => (DUMMY_HASH.to_string(), false),
        };
        let key = self.cache_key(user, &hash, password);
        if known && self.cached(&key) {
            return true;
        }
        let started = Instant::now();
        // A peer's requests queue behind each other first, so one peer
        // never holds more than its share of the bcrypt slots.
        let mut turn = PeerTurn {
            auth: self,
            peer: peer.map_or(IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED), peer_key),
            queue: None,
        };
        let queue = {
            let mut peers = self.peers.lock().unwrap_or_else(|p| p.into_inner());
            let q = peers
                .entry(turn.peer)
                .or_insert_with(|| Arc::new(tokio::sync::Semaphore::new(PEER_BCRYPT_SLOTS)))
                .clone();
            turn.queue = Some(q.clone());
            q
        };
        let Ok(Ok(_peer_slot)) = tokio::time::timeout(BCRYPT_WAIT, queue.acquire()).await else {
            return false;
        };
        let left = BCRYPT_WAIT.saturating_sub(started.elapsed());
        let Ok(Ok(_slot)) = tokio::time::timeout(left, self.slots.acquire()).await else {
            return false;
        };
        let password = password.to_string();
        let ok = tokio::task::spawn_blocking(move || {
            // Passwords over 72 bytes were refused above; bcrypt's own
            // length check would also refuse exactly 72 (it counts a NUL).
            bcrypt::verify(password, &hash).unwrap_or(false)
        })
        .await
        .unwrap_or(false)
            && known;
        if ok {
            let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
            if cache.len() >= CACHE_MAX {
                let now = Instant::now();
                cache.retain(|_, until| *until > now);
                if cache.len() >= CACHE_MAX {
                    cache.clear();
                }
            }
            cache.insert(key, Instant::now() + CACHE_TTL);
        }
        ok
    }

    /// HMAC-SHA256 under the per-process key of the length-prefixed user,
    /// hash and password.
    fn cache_key(&self, user: &str, hash: &str, password: &str) -> [u8; 32] {
        let mut mac = match Hmac::<sha2::Sha256>::new_from_slice(&self.cache_key) {
            Ok(m) => m,
            // HMAC takes a key of any length.
            Err(_) => return [0; 32],
        };
        for part in [user.as_bytes(), hash.as_bytes(), password.as_bytes()] {
            mac.update(&(part.len() as u64).to_le_bytes());
            mac.update(part);
        }
        mac.finalize().into_bytes().into()
    }

    /// Whether `key` was checked recently; a hit extends its life.
    fn cached(&self, key: &[u8; 32]) -> bool {
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        match cache.get_mut(key) {
            Some(until) if *until > now => {
                *until = now + CACHE_TTL;
                true
            }
            _ => false,
        }
    }
}

/// Middleware: with `basic_auth_users` configured, a request without the
/// right credentials gets 401 with `WWW-Authenticate: Basic`; every response
/// gets the configured headers.
pub async fn require(State(auth): State<Arc<BasicAuth>>, req: Request, next: Next) -> Response {
    let config = auth.source.current();
    let mut resp = if config.users.is_empty() {
        next.run(req).await
    } else {
        let presented = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(basic_credentials);
        let peer = req
            .extensions()
            .get::<ConnectInfo<SocketAddr>>()
            .map(|c| c.0.ip());
        let ok = match &presented {
            Some((user, password)) => auth.check(&config.users, user, password, peer).await,
            None => false,
        };
        if ok {
            next.run(req).await
        } else {
            let endpoint = telemetry::endpoint_label(&req);
            let method = telemetry::method_label(req.method());
            auth.metrics
                .observe(&endpoint, method, 401, 0.0, None, None);
            let too_long = presented
                .as_ref()
                .is_some_and(|(_, p)| p.len() > MAX_PASSWORD_BYTES);
            unauthorized(if too_long {
                "unauthorized: password longer than 72 bytes (bcrypt reads only 72; use a shorter one)\n"
            } else {
                "unauthorized\n"
            })
        }
    };
    for (name, value) in &config.headers {
        resp.headers_mut().insert(name.clone(), value.clone());
    }
    resp
}

fn unauthorized(text: &'static str) -> Response {
    (
        StatusCode::UNAUTHORIZED,
        [(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Basic realm=\"gpuops\", charset=\"UTF-8\""),
        )],
        text,
    )
        .into_response()
}

/// `Basic base64(user:password)` → (user, password).
fn basic_credentials(value: &str) -> Option<(String, String)> {
    let (scheme, rest) = value.trim().split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let raw = base64::engine::general_purpose::STANDARD
        .decode(rest.trim())
        .ok()?;
    let text = String::from_utf8(raw).ok()?;
    let (user, password) = text.split_once(':')?;
    Some((user.to_string(), password.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Body;
    use axum::routing::get;
    use tower::ServiceExt as _;

    /// The agent's shape: a route behind [`require`], with `users` as the
    /// web configuration's `basic_auth_users` (user → password, hashed at
    /// `cost`).
    fn app(dir: &std::path::Path, users: &[(&str, &str)], cost: u32) -> axum::Router {
        let mut yaml = String::from("basic_auth_users:\n");
        for (user, password) in users {
            yaml.push_str(&format!(
                "  {user}: '{}'\n",
                bcrypt::hash(password, cost).unwrap()
            ));
        }
        let path = dir.join("web.yml");
        std::fs::write(&path, yaml).unwrap();
        let source = WebConfigSource::open(&path).unwrap();
        let auth = BasicAuth::new(source, Arc::new(HttpMetrics::new()));
        axum::Router::new()
            .route("/metrics", get(|| async { "ok" }))
            .layer(axum::middleware::from_fn_with_state(auth, require))
    }

    /// One GET from `peer`: its status and how long it took.
    async fn login(app: &axum::Router, peer: &str, user: &str, password: &str) -> (u16, Duration) {
        let (status, took, _) = login_text(app, peer, user, password).await;
        (status, took)
    }

    async fn login_text(
        app: &axum::Router,
        peer: &str,
        user: &str,
        password: &str,
    ) -> (u16, Duration, String) {
        let value = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
        let mut req = Request::builder()
            .uri("/metrics")
            .header(header::AUTHORIZATION, format!("Basic {value}"))
            .body(Body::empty())
            .unwrap();
        let peer: SocketAddr = peer.parse().unwrap();
        req.extensions_mut().insert(ConnectInfo(peer));
        let started = Instant::now();
        let resp = app.clone().oneshot(req).await.unwrap();
        let status = resp.status().as_u16();
        let took = started.elapsed();
        let body = axum::body::to_bytes(resp.into_body(), 1 << 16)
            .await
            .unwrap();
        (status, took, String::from_utf8_lossy(&body).into_owned())
    }

    /// Finding 10 (issue 20): 100 threads sending wrong passwords made
    /// valid logins fail with 401 after 2 s (they queued behind the flood
    /// for a bcrypt slot). The flood now waits on its own peer's queue.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn wrong_password_flood_does_not_lock_out_valid_logins() {
        let dir = tempfile::tempdir().unwrap();
        // Cost 8 takes tens of milliseconds here: 100 waiting guesses are
        // seconds of bcrypt work, past BCRYPT_WAIT for whoever queues last.
        let app = app(
            dir.path(),
            &[
                ("prometheus", "right"),
                ("ops", "also-right"),
                ("timer", "t"),
            ],
            8,
        );
        let one = Instant::now();
        assert_eq!(login(&app, "10.0.0.9:1", "timer", "t").await.0, 200);
        let bcrypt_time = one.elapsed();
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let refused = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let mut flood = Vec::new();
        for i in 0..100 {
            let (app, stop, refused) = (app.clone(), stop.clone(), refused.clone());
            flood.push(tokio::spawn(async move {
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let (status, _) = login(
                        &app,
                        &format!("127.0.0.2:{}", 1000 + i),
                        "prometheus",
                        "guess",
                    )
                    .await;
                    assert_eq!(status, 401);
                    refused.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
            }));
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        let mut times = Vec::new();
        for (peer, user, password) in [
            ("127.0.0.1:5000", "prometheus", "right"),
            ("127.0.0.1:5001", "prometheus", "right"),
            ("[2001:db8::1]:5002", "ops", "also-right"),
            ("127.0.0.3:5003", "prometheus", "right"),
        ] {
            let (status, took) = login(&app, peer, user, password).await;
            assert_eq!(status, 200, "{user} from {peer} after {took:?}");
            times.push(took);
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        for f in flood {
            f.await.unwrap();
        }
        eprintln!(
            "one bcrypt check {bcrypt_time:?}; valid logins during a 100-client wrong-password flood: {times:?} \
             (uncached; cached; another user, uncached, over IPv6; cached, from another address); {} wrong guesses answered",
            refused.load(std::sync::atomic::Ordering::Relaxed)
        );
        // The first login is one bcrypt check plus at most one of the
        // flood's (its peer holds one slot); cached ones skip bcrypt.
        let budget = bcrypt_time * 4 + Duration::from_millis(500);
        for t in &times {
            assert!(*t < budget, "{times:?} (budget {budget:?})");
        }
        assert!(times[1] < Duration::from_millis(100), "{times:?}");
    }

    /// Finding 10 (issue 20): bcrypt reads 72 bytes, so the valid 72-byte
    /// password with any suffix was accepted.
    #[tokio::test]
    async fn password_longer_than_72_bytes_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let password = "p".repeat(MAX_PASSWORD_BYTES);
        let app = app(dir.path(), &[("ops", &password)], 4);
        assert_eq!(login(&app, "127.0.0.1:1", "ops", &password).await.0, 200);
        for suffix in ["x", "anything at all"] {
            let longer = format!("{password}{suffix}");
            let (status, _, text) = login_text(&app, "127.0.0.1:1", "ops", &longer).await;
            assert_eq!(status, 401);
            assert!(text.contains("longer than 72 bytes"), "{text}");
        }
        // Not even as a cache hit of the right one.
        assert_eq!(login(&app, "127.0.0.1:1", "ops", &password).await.0, 200);
        assert_eq!(
            login(&app, "127.0.0.1:1", "ops", &format!("{password}x"))
                .await
                .0,
            401
        );
    }

    #[test]
    fn peers_are_queued_by_address_or_v6_prefix() {
        let key = |s: &str| peer_key(s.parse().unwrap());
        assert_eq!(key("10.1.2.3"), key("10.1.2.3"));
        assert_ne!(key("10.1.2.3"), key("10.1.2.4"));
        assert_eq!(key("2001:db8:1:2::1"), key("2001:db8:1:2:ffff::9"));
        assert_ne!(key("2001:db8:1:2::1"), key("2001:db8:1:3::1"));
        assert_eq!(key("::ffff:10.1.2.3"), key("10.1.2.3"));
    }

    #[test]
    fn basic_credentials_are_parsed() {
        for (header, expect) in [
            ("Basic YWxpY2U6czNjcmV0", Some(("alice", "s3cret"))),
            ("basic YWxpY2U6czNjcmV0", Some(("alice", "s3cret"))),
            ("Basic YWxpY2U6YTpi", Some(("alice", "a:b"))),
            ("Bearer YWxpY2U6czNjcmV0", None),
            ("Basic !!!", None),
            ("Basic YWxpY2U=", None),
        ] {
            let got = basic_credentials(header);
            assert_eq!(
                got.as_ref().map(|(u, p)| (u.as_str(), p.as_str())),
                expect,
                "{header}"
            );
        }
    }

    #[test]
    fn dummy_hash_is_a_bcrypt_hash() {
        assert!(DUMMY_HASH.parse::<bcrypt::HashParts>().is_ok());
        assert_eq!(bcrypt::verify("x", DUMMY_HASH).ok(), Some(false));
    }
}
