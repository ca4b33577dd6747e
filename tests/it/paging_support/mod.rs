//! A fake PagerDuty Events API v2 that validates what it is sent the way
//! PagerDuty documents it (routing key shape, `event_action` values,
//! `dedup_key` length, a trigger's payload: summary 1..=1024 characters,
//! source, severity from the closed set; and, strictly as PagerDuty does,
//! a 400 for an event larger than 512 KiB) and records every event and
//! the size of the largest body; answers can be scripted (429, 5xx, 400). Also: an aiosmtpd SMTP server on
//! loopback that stores messages in a maildir.
#![allow(dead_code)]

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::{json, Value};

#[derive(Debug, Clone)]
pub struct Event {
    pub at: Instant,
    pub body: Value,
}

impl Event {
    pub fn action(&self) -> &str {
        self.body["event_action"].as_str().unwrap_or("")
    }
    pub fn dedup_key(&self) -> &str {
        self.body["dedup_key"].as_str().unwrap_or("")
    }
    pub fn routing_key(&self) -> &str {
        self.body["routing_key"].as_str().unwrap_or("")
    }
}

#[derive(Default)]
struct Inner {
    /// Accepted events (202).
    events: Vec<Event>,
    /// Every request, accepted or not.
    attempts: usize,
    /// Schema violations seen (a test fails if any).
    invalid: Vec<String>,
    script: VecDeque<(u16, Value)>,
    /// The largest request body seen, in bytes.
    largest: usize,
}

/// PagerDuty refuses an event larger than this (400).
pub const MAX_EVENT_BYTES: usize = 512 * 1024;

#[derive(Clone)]
pub struct FakePagerDuty {
    pub addr: SocketAddr,
    inner: Arc<Mutex<Inner>>,
}

/// Why an event is invalid, as PagerDuty would say; empty when valid.
pub fn schema_errors(v: &Value) -> Vec<String> {
    let mut e = Vec::new();
    let key = v["routing_key"].as_str().unwrap_or("");
    if key.len() != 32 || !key.bytes().all(|b| b.is_ascii_alphanumeric()) {
        e.push("'routing_key' must be 32 characters".into());
    }
    let action = v["event_action"].as_str().unwrap_or("");
    if !["trigger", "acknowledge", "resolve"].contains(&action) {
        e.push(format!("'event_action' is invalid: {action:?}"));
    }
    match v.get("dedup_key").and_then(|d| d.as_str()) {
        Some(d) if d.is_empty() || d.chars().count() > 255 => {
            e.push("'dedup_key' must be 1..255 characters".into())
        }
        None if action != "trigger" => e.push("'dedup_key' is required".into()),
        _ => {}
    }
    if action == "trigger" {
        let p = &v["payload"];
        let summary = p["summary"].as_str().unwrap_or("");
        if summary.is_empty() || summary.chars().count() > 1024 {
            e.push("'payload.summary' must be 1..1024 characters".into());
        }
        if p["source"].as_str().unwrap_or("").is_empty() {
            e.push("'payload.source' is required".into());
        }
        let sev = p["severity"].as_str().unwrap_or("");
        if !["critical", "error", "warning", "info"].contains(&sev) {
            e.push(format!("'payload.severity' is invalid: {sev:?}"));
        }
        if let Some(links) = v.get("links") {
            if !links
                .as_array()
                .is_some_and(|a| a.iter().all(|l| l["href"].is_string()))
            {
                e.push("'links' must be a list of {href, text}".into());
            }
        }
    }
    e
}

impl FakePagerDuty {
    pub async fn start() -> FakePagerDuty {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let inner = Arc::new(Mutex::new(Inner::default()));
        let app = axum::Router::new()
            .route("/v2/enqueue", axum::routing::post(enqueue))
            .with_state(inner.clone());
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        FakePagerDuty { addr, inner }
    }

    /// `[pagerduty] api_url`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn script(&self, answers: impl IntoIterator<Item = (u16, Value)>) {
        self.inner.lock().unwrap().script.extend(answers);
    }

    pub fn events(&self) -> Vec<Event> {
        self.inner.lock().unwrap().events.clone()
    }

    pub fn attempts(&self) -> usize {
        self.inner.lock().unwrap().attempts
    }

    pub fn invalid(&self) -> Vec<String> {
        self.inner.lock().unwrap().invalid.clone()
    }

    /// The largest request body seen (accepted or not), in bytes.
    pub fn largest_body(&self) -> usize {
        self.inner.lock().unwrap().largest
    }

    /// Waits until `n` events were accepted.
    pub async fn wait_for(&self, n: usize, timeout: Duration) -> Vec<Event> {
        let deadline = Instant::now() + timeout;
        loop {
            let e = self.events();
            if e.len() >= n {
                return e;
            }
            assert!(
                Instant::now() < deadline,
                "expected {n} PagerDuty events within {timeout:?}, got {}: {:#?}",
                e.len(),
                e.iter().map(|e| &e.body).collect::<Vec<_>>()
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

async fn enqueue(State(inner): State<Arc<Mutex<Inner>>>, body: Bytes) -> Response {
    {
        let mut g = inner.lock().unwrap();
        g.largest = g.largest.max(body.len());
        if body.len() > MAX_EVENT_BYTES {
            g.attempts += 1;
            let error = format!("Event object is larger than 512 KiB ({} bytes)", body.len());
            g.invalid.push(error.clone());
            return (
                StatusCode::BAD_REQUEST,
                axum::Json(json!({"status": "invalid event", "message": "Event object is invalid", "errors": [error]})),
            )
                .into_response();
        }
    }
    let v: Value = match serde_json::from_slice(&body) {
        Ok(v) => v,
        Err(_) => {
            return (
                StatusCode::BAD_REQUEST,
                axum::Json(json!({"status": "invalid event", "message": "Event object is invalid", "errors": ["not JSON"]})),
            )
                .into_response()
        }
    };
    let mut g = inner.lock().unwrap();
    g.attempts += 1;
    if let Some((status, body)) = g.script.pop_front() {
        return (StatusCode::from_u16(status).unwrap(), axum::Json(body)).into_response();
    }
    let errors = schema_errors(&v);
    if !errors.is_empty() {
        g.invalid.extend(errors.clone());
        return (
            StatusCode::BAD_REQUEST,
            axum::Json(json!({"status": "invalid event", "message": "Event object is invalid", "errors": errors})),
        )
            .into_response();
    }
    let dedup = v["dedup_key"].as_str().unwrap_or("generated").to_string();
    g.events.push(Event {
        at: Instant::now(),
        body: v,
    });
    (
        StatusCode::ACCEPTED,
        axum::Json(json!({"status": "success", "message": "Event processed", "dedup_key": dedup})),
    )
        .into_response()
}

/// Debian's aiosmtpd on 127.0.0.1, storing every message in a maildir.
pub struct Smtp {
    pub port: u16,
    pub maildir: PathBuf,
    child: std::process::Child,
}

impl Smtp {
    /// `None` when `/usr/bin/python3 -m aiosmtpd` is not installed.
    pub fn start(dir: &Path) -> Option<Smtp> {
        Smtp::start_with(dir, "aiosmtpd.handlers.Mailbox")
    }

    /// An SMTP server that answers RCPT TO `perm…` with 550, and the first
    /// RCPT TO of each `temp…` address with 451; it stores the rest.
    pub fn start_picky(dir: &Path) -> Option<Smtp> {
        std::fs::write(
            dir.join("gpuops_test_smtp.py"),
            r#"from aiosmtpd.handlers import Mailbox

class Picky(Mailbox):
    seen = set()

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        if address.startswith("perm"):
            return "550 5.1.1 no such user here"
        if address.startswith("temp") and address not in Picky.seen:
            Picky.seen.add(address)
            return "451 4.3.0 try again later"
        envelope.rcpt_tos.append(address)
        return "250 OK"
"#,
        )
        .unwrap();
        Smtp::start_with(dir, "gpuops_test_smtp.Picky")
    }

    fn start_with(dir: &Path, class: &str) -> Option<Smtp> {
        let ok = std::process::Command::new("/usr/bin/python3")
            .args(["-c", "import aiosmtpd"])
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            return None;
        }
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let maildir = dir.join("maildir");
        let child = std::process::Command::new("/usr/bin/python3")
            .args([
                "-m",
                "aiosmtpd",
                "-n",
                "-l",
                &format!("127.0.0.1:{port}"),
                "-c",
                class,
                maildir.to_str().unwrap(),
            ])
            .env("PYTHONPATH", dir)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .ok()?;
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "aiosmtpd did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
        Some(Smtp {
            port,
            maildir,
            child,
        })
    }

    /// Every stored message, raw, oldest first.
    pub fn messages(&self) -> Vec<String> {
        let mut files: Vec<(std::time::SystemTime, PathBuf)> = Vec::new();
        for sub in ["new", "cur"] {
            if let Ok(rd) = std::fs::read_dir(self.maildir.join(sub)) {
                for e in rd.flatten() {
                    let m = e.metadata().and_then(|m| m.modified()).unwrap();
                    files.push((m, e.path()));
                }
            }
        }
        files.sort();
        files
            .into_iter()
            .map(|(_, p)| std::fs::read_to_string(p).unwrap())
            .collect()
    }

    pub async fn wait_for(&self, n: usize, timeout: Duration) -> Vec<String> {
        let deadline = Instant::now() + timeout;
        loop {
            let m = self.messages();
            if m.len() >= n {
                return m;
            }
            assert!(
                Instant::now() < deadline,
                "expected {n} mails within {timeout:?}, got {}",
                m.len()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Smtp {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A header's value in a raw message (first occurrence, unfolded).
pub fn header(raw: &str, name: &str) -> Option<String> {
    let mut lines = raw.lines().peekable();
    let prefix = format!("{}:", name.to_ascii_lowercase());
    while let Some(l) = lines.next() {
        if l.is_empty() {
            return None;
        }
        if l.to_ascii_lowercase().starts_with(&prefix) {
            let mut v = l[prefix.len()..].trim().to_string();
            while let Some(n) = lines.peek() {
                if n.starts_with(' ') || n.starts_with('\t') {
                    v.push(' ');
                    v.push_str(n.trim());
                    lines.next();
                } else {
                    break;
                }
            }
            return Some(v);
        }
    }
    None
}
