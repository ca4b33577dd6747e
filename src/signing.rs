//! Request signatures: Slack's v0 request signatures, Discord's Ed25519
//! interaction signatures, and the clock and time window they share with
//! the agents' exec requests (`exec_auth`).
//!
//! Every check is time-bound against an injectable [`Clock`] and compares in
//! constant time (through `hmac`'s `verify_slice` and `ed25519-dalek`). This
//! module never logs, never sees a secret outside [`Secret`]-like byte slices
//! handed in by the caller, and does no I/O.

use std::sync::atomic::{AtomicI64, Ordering};

use axum::http::HeaderMap;
use hmac::{Hmac, Mac};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

/// How far a signed timestamp may be from now, either way (seconds).
pub const WINDOW_SECS: i64 = 300;

pub const SLACK_TIMESTAMP: &str = "x-slack-request-timestamp";
pub const SLACK_SIGNATURE: &str = "x-slack-signature";
pub const DISCORD_SIGNATURE: &str = "x-signature-ed25519";
pub const DISCORD_TIMESTAMP: &str = "x-signature-timestamp";

/// Why a request was refused. Callers answer 401 for all of them; the kind is
/// for logs and tests.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SigError {
    #[error("missing header {0}")]
    Missing(&'static str),
    #[error("malformed header {0}")]
    Malformed(&'static str),
    #[error("timestamp outside the {WINDOW_SECS}s window")]
    Stale,
    #[error("signature does not match")]
    BadSignature,
    #[error("nonce already used")]
    Replayed,
    #[error("too many requests in the replay window")]
    CacheFull,
}

/// Wall-clock seconds, injectable for tests.
pub trait Clock: Send + Sync {
    fn now_unix(&self) -> i64;
}

/// The system clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_unix(&self) -> i64 {
        chrono::Utc::now().timestamp()
    }
}

/// A settable clock for tests.
#[derive(Debug, Default)]
pub struct FixedClock(AtomicI64);

impl FixedClock {
    pub fn new(t: i64) -> FixedClock {
        FixedClock(AtomicI64::new(t))
    }

    pub fn set(&self, t: i64) {
        self.0.store(t, Ordering::SeqCst);
    }
}

impl Clock for FixedClock {
    fn now_unix(&self) -> i64 {
        self.0.load(Ordering::SeqCst)
    }
}

impl<C: Clock + ?Sized> Clock for std::sync::Arc<C> {
    fn now_unix(&self) -> i64 {
        (**self).now_unix()
    }
}

/// HMAC-SHA256 accepts keys of any length; `new_from_slice` cannot fail.
#[cold]
fn unreachable_hmac() -> ! {
    unreachable!("HMAC-SHA256 takes keys of any length")
}

/// Slack's v0 signature: `v0=<hex HMAC-SHA256(signing_secret, "v0:{ts}:{body}")>`
/// in `X-Slack-Signature`, the timestamp in `X-Slack-Request-Timestamp`,
/// valid within [`WINDOW_SECS`] of `now`.
pub fn verify_slack(
    signing_secret: &[u8],
    headers: &HeaderMap,
    body: &[u8],
    now: i64,
) -> Result<(), SigError> {
    let ts = header(headers, SLACK_TIMESTAMP)?;
    let sig = header(headers, SLACK_SIGNATURE)?;
    let t: i64 = ts
        .parse()
        .map_err(|_| SigError::Malformed(SLACK_TIMESTAMP))?;
    if (now - t).abs() > WINDOW_SECS {
        return Err(SigError::Stale);
    }
    let hex_sig = sig
        .strip_prefix("v0=")
        .ok_or(SigError::Malformed(SLACK_SIGNATURE))?;
    let raw = hex::decode(hex_sig).map_err(|_| SigError::Malformed(SLACK_SIGNATURE))?;
    let mut mac = match HmacSha256::new_from_slice(signing_secret) {
        Ok(m) => m,
        Err(_) => unreachable_hmac(),
    };
    mac.update(b"v0:");
    mac.update(ts.as_bytes());
    mac.update(b":");
    mac.update(body);
    mac.verify_slice(&raw).map_err(|_| SigError::BadSignature)
}

/// Computes a Slack v0 signature (for tests and local fakes).
pub fn sign_slack(signing_secret: &[u8], timestamp: i64, body: &[u8]) -> String {
    let mut mac = match HmacSha256::new_from_slice(signing_secret) {
        Ok(m) => m,
        Err(_) => unreachable_hmac(),
    };
    mac.update(format!("v0:{timestamp}:").as_bytes());
    mac.update(body);
    format!("v0={}", hex::encode(mac.finalize().into_bytes()))
}

/// A Discord application's public key (hex, from the developer portal).
#[derive(Debug, Clone)]
pub struct DiscordKey(ed25519_dalek::VerifyingKey);

impl DiscordKey {
    pub fn from_hex(hex_key: &str) -> Result<DiscordKey, String> {
        let raw = hex::decode(hex_key.trim()).map_err(|e| format!("not hex: {e}"))?;
        let bytes: [u8; 32] = raw
            .try_into()
            .map_err(|_| "an Ed25519 public key is 32 bytes (64 hex digits)".to_string())?;
        ed25519_dalek::VerifyingKey::from_bytes(&bytes)
            .map(DiscordKey)
            .map_err(|e| format!("not an Ed25519 public key: {e}"))
    }

    pub fn from_verifying_key(k: ed25519_dalek::VerifyingKey) -> DiscordKey {
        DiscordKey(k)
    }
}

/// Discord's interaction signature: Ed25519 over `timestamp + body`, hex in
/// `X-Signature-Ed25519`, timestamp in `X-Signature-Timestamp` (also held to
/// the [`WINDOW_SECS`] window).
pub fn verify_discord(
    key: &DiscordKey,
    headers: &HeaderMap,
    body: &[u8],
    now: i64,
) -> Result<(), SigError> {
    let sig = header(headers, DISCORD_SIGNATURE)?;
    let ts = header(headers, DISCORD_TIMESTAMP)?;
    let t: i64 = ts
        .parse()
        .map_err(|_| SigError::Malformed(DISCORD_TIMESTAMP))?;
    if (now - t).abs() > WINDOW_SECS {
        return Err(SigError::Stale);
    }
    let raw = hex::decode(sig).map_err(|_| SigError::Malformed(DISCORD_SIGNATURE))?;
    let raw: [u8; 64] = raw
        .try_into()
        .map_err(|_| SigError::Malformed(DISCORD_SIGNATURE))?;
    let signature = ed25519_dalek::Signature::from_bytes(&raw);
    let mut msg = Vec::with_capacity(ts.len() + body.len());
    msg.extend_from_slice(ts.as_bytes());
    msg.extend_from_slice(body);
    key.0
        .verify_strict(&msg, &signature)
        .map_err(|_| SigError::BadSignature)
}

fn header<'h>(headers: &'h HeaderMap, name: &'static str) -> Result<&'h str, SigError> {
    let v = headers.get(name).ok_or(SigError::Missing(name))?;
    let s = v.to_str().map_err(|_| SigError::Malformed(name))?.trim();
    if s.is_empty() {
        return Err(SigError::Missing(name));
    }
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn headers(pairs: &[(&'static str, String)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, HeaderValue::from_str(v).unwrap());
        }
        h
    }

    // Slack's worked example from "Verifying requests from Slack"
    // (api.slack.com/authentication/verifying-requests-from-slack).
    const SLACK_SECRET: &str = "8f742231b10e8888abcd99yyyzzz85a5";
    const SLACK_TS: i64 = 1531420618;
    const SLACK_BODY: &str = "token=xyzz0WbapA4vBCDEFasx0q6G&team_id=T1DC2JH3J&team_domain=testteamnow&channel_id=G8PSS9T3V&channel_name=foobar&user_id=U2CERLKJA&user_name=roadrunner&command=%2Fwebhook-collect&text=&response_url=https%3A%2F%2Fhooks.slack.com%2Fcommands%2FT1DC2JH3J%2F397700885554%2F96rGlfmibIGlgcZRskXaIFfN&trigger_id=398738663015.47445629121.803a0bc887a14d10d2c447fce8b6703c";
    const SLACK_SIG: &str = "v0=a2114d57b48eac39b9ad189dd8316235a7b4a8d21a10bd27519666489c69b503";

    fn slack_headers() -> HeaderMap {
        headers(&[
            (SLACK_TIMESTAMP, SLACK_TS.to_string()),
            (SLACK_SIGNATURE, SLACK_SIG.to_string()),
        ])
    }

    #[test]
    fn slack_documented_example_verifies_when_clock_is_pinned() {
        let h = slack_headers();
        let secret = SLACK_SECRET.as_bytes();
        assert_eq!(
            verify_slack(secret, &h, SLACK_BODY.as_bytes(), SLACK_TS),
            Ok(())
        );
        assert_eq!(
            verify_slack(secret, &h, SLACK_BODY.as_bytes(), SLACK_TS + 299),
            Ok(())
        );
        assert_eq!(
            sign_slack(secret, SLACK_TS, SLACK_BODY.as_bytes()),
            SLACK_SIG
        );
    }

    #[test]
    fn slack_documented_example_is_stale_otherwise() {
        let h = slack_headers();
        let secret = SLACK_SECRET.as_bytes();
        assert_eq!(
            verify_slack(secret, &h, SLACK_BODY.as_bytes(), SLACK_TS + 301),
            Err(SigError::Stale)
        );
        assert_eq!(
            verify_slack(secret, &h, SLACK_BODY.as_bytes(), SystemClock.now_unix()),
            Err(SigError::Stale)
        );
        let tampered = SLACK_BODY.replace("roadrunner", "coyote");
        assert_eq!(
            verify_slack(secret, &h, tampered.as_bytes(), SLACK_TS),
            Err(SigError::BadSignature)
        );
        assert_eq!(
            verify_slack(b"wrong", &h, SLACK_BODY.as_bytes(), SLACK_TS),
            Err(SigError::BadSignature)
        );
        assert_eq!(
            verify_slack(secret, &HeaderMap::new(), SLACK_BODY.as_bytes(), SLACK_TS),
            Err(SigError::Missing(SLACK_TIMESTAMP))
        );
    }

    #[test]
    fn discord_ed25519_valid_forged_and_wrong_timestamp() {
        use ed25519_dalek::Signer;
        let signing = ed25519_dalek::SigningKey::generate(&mut rand_core::OsRng);
        let key = DiscordKey::from_hex(&hex::encode(signing.verifying_key().to_bytes())).unwrap();
        let body = br#"{"type":1}"#;
        let ts = 1_700_000_000i64;
        let sign = |ts: i64, body: &[u8]| {
            let mut m = ts.to_string().into_bytes();
            m.extend_from_slice(body);
            hex::encode(signing.sign(&m).to_bytes())
        };
        let h = |sig: String, ts: i64| {
            headers(&[
                (DISCORD_SIGNATURE, sig),
                (DISCORD_TIMESTAMP, ts.to_string()),
            ])
        };
        assert_eq!(
            verify_discord(&key, &h(sign(ts, body), ts), body, ts),
            Ok(())
        );
        // Forged: signed by another key.
        let other = ed25519_dalek::SigningKey::generate(&mut rand_core::OsRng);
        let mut m = ts.to_string().into_bytes();
        m.extend_from_slice(body);
        let forged = hex::encode(other.sign(&m).to_bytes());
        assert_eq!(
            verify_discord(&key, &h(forged, ts), body, ts),
            Err(SigError::BadSignature)
        );
        // Tampered body.
        assert_eq!(
            verify_discord(&key, &h(sign(ts, body), ts), br#"{"type":2}"#, ts),
            Err(SigError::BadSignature)
        );
        // Signature over one timestamp, header claims another.
        assert_eq!(
            verify_discord(&key, &h(sign(ts, body), ts + 1), body, ts),
            Err(SigError::BadSignature)
        );
        // Old timestamp, correctly signed.
        assert_eq!(
            verify_discord(&key, &h(sign(ts - 600, body), ts - 600), body, ts),
            Err(SigError::Stale)
        );
        assert!(DiscordKey::from_hex("abcd").is_err());
    }
}
