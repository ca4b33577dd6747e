//! HTTP basic authentication against the web configuration's
//! `basic_auth_users` (bcrypt hashes), and its response headers, as an axum
//! middleware over every route of the agent.
//!
//! bcrypt is slow on purpose (about 70 ms at cost 10), so a successful check
//! is remembered for [`CACHE_TTL`] after its last use, keyed on a SHA-256 of
//! the user, the stored hash and the presented password (a changed hash never
//! matches an old entry): a scraper that keeps scraping never waits for bcrypt
//! again. Checks run off the async threads, at most [`BCRYPT_SLOTS`] at a
//! time, so wrong guesses cannot take more than that many cores; a request
//! that cannot get a slot within [`BCRYPT_WAIT`] is refused. An unknown user
//! costs the same bcrypt as a known one. Passwords and hashes are never
//! logged.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use sha2::Digest as _;

use crate::telemetry::{self, HttpMetrics};
use crate::web::webconfig::WebConfigSource;

/// How long a successful check is remembered.
pub const CACHE_TTL: Duration = Duration::from_secs(60);
/// bcrypt checks running at once.
pub const BCRYPT_SLOTS: usize = 2;
/// How long a request waits for a bcrypt slot before it is refused.
pub const BCRYPT_WAIT: Duration = Duration::from_secs(2);
/// Entries kept at most (expired ones are dropped first).
const CACHE_MAX: usize = 1024;
/// Checked when the user is unknown, so that its timing does not tell.
const DUMMY_HASH: &str = "$2y$10$QOauhQNbBCuQDKes6eFzPeMqBSjb7Mr5DUmpZ/VcEd00UAV/LDeSi";

/// The state of [`require`].
pub struct BasicAuth {
    source: Arc<WebConfigSource>,
    metrics: Arc<HttpMetrics>,
    cache: Mutex<HashMap<[u8; 32], Instant>>,
    slots: tokio::sync::Semaphore,
}

impl BasicAuth {
    pub fn new(source: Arc<WebConfigSource>, metrics: Arc<HttpMetrics>) -> Arc<BasicAuth> {
        Arc::new(BasicAuth {
            source,
            metrics,
            cache: Mutex::new(HashMap::new()),
            slots: tokio::sync::Semaphore::new(BCRYPT_SLOTS),
        })
    }

    /// Whether `user` with `password` matches the configuration in force.
    async fn check(
        &self,
        users: &std::collections::BTreeMap<String, String>,
        user: &str,
        password: &str,
    ) -> bool {
        let (hash, known) = match users.get(user) {
            Some(h) => (h.clone(), true),
            None => (DUMMY_HASH.to_string(), false),
        };
        let mut key = sha2::Sha256::new();
        for part in [user.as_bytes(), hash.as_bytes(), password.as_bytes()] {
            key.update((part.len() as u64).to_le_bytes());
            key.update(part);
        }
        let key: [u8; 32] = key.finalize().into();
        if known && self.cached(&key) {
            return true;
        }
        let Ok(Ok(_slot)) = tokio::time::timeout(BCRYPT_WAIT, self.slots.acquire()).await else {
            return false;
        };
        let password = password.to_string();
        let ok =
            tokio::task::spawn_blocking(move || bcrypt::verify(password, &hash).unwrap_or(false))
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
        let ok = match &presented {
            Some((user, password)) => auth.check(&config.users, user, password).await,
            None => false,
        };
        if ok {
            next.run(req).await
        } else {
            let endpoint = telemetry::endpoint_label(&req);
            let method = telemetry::method_label(req.method());
            auth.metrics
                .observe(&endpoint, method, 401, 0.0, None, None);
            unauthorized()
        }
    };
    for (name, value) in &config.headers {
        resp.headers_mut().insert(name.clone(), value.clone());
    }
    resp
}

fn unauthorized() -> Response {
    (
        StatusCode::UNAUTHORIZED,
        [(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Basic realm=\"gpuops\", charset=\"UTF-8\""),
        )],
        "unauthorized\n",
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
