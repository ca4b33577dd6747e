//! `POST /alertmanager` and the other bot routes through the real router:
//! 200 only after commit, 400 with a reason, 413 over the size limit, 401 on
//! a wrong token, 415 for a body that is not JSON; the store's file modes;
//! plus the generic JSON webhook destination.

use crate::support;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use gpuops::bot::BotState;
use gpuops::bot_role::router;
use gpuops::config::BotConfig;
use gpuops::store::Store;
use http_body_util::BodyExt as _;
use support::{am_payload, FakeApi};
use tower::ServiceExt as _;

async fn state(extra: &str) -> (tempfile::TempDir, Arc<BotState>) {
    let (d, s, _w) = state_and_worker(extra).await;
    (d, s)
}

async fn state_and_worker(
    extra: &str,
) -> (tempfile::TempDir, Arc<BotState>, gpuops::outbox::Worker) {
    let dir = tempfile::tempdir().unwrap();
    let text = format!(
        "[server]\nwebhook_token = \"tok-123\"\nmax_body_bytes = 4096\n[store]\npath = \"{}\"\n{extra}",
        dir.path().join("bot.db").display()
    );
    let cfg = BotConfig::from_str(Path::new("t.toml"), &text).unwrap();
    let store = support::open_store(&cfg).await;
    let (state, worker) = BotState::new(Arc::new(cfg), store).unwrap();
    (dir, state, worker)
}

async fn call(state: &Arc<BotState>, auth: Option<&str>, body: String) -> (StatusCode, String) {
    call_as(state, Some("application/json"), auth, body).await
}

async fn call_as(
    state: &Arc<BotState>,
    content_type: Option<&str>,
    auth: Option<&str>,
    body: String,
) -> (StatusCode, String) {
    let mut req = Request::post("/alertmanager");
    if let Some(ct) = content_type {
        req = req.header("content-type", ct);
    }
    if let Some(a) = auth {
        req = req.header("authorization", a);
    }
    let resp = router(state.clone())
        .oneshot(req.body(Body::from(body)).unwrap())
        .await
        .unwrap();
    let status = resp.status();
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&bytes).into_owned())
}

fn check(state: &Arc<BotState>, auth: Option<&str>, body: &str, status: u16, contains: &str) {
    let rt = tokio::runtime::Handle::current();
    let (s, text) =
        tokio::task::block_in_place(|| rt.block_on(call(state, auth, body.to_string())));
    assert_eq!(s.as_u16(), status, "{text}");
    assert!(text.contains(contains), "{text:?} lacks {contains:?}");
}

async fn webhook_answers() {
    let (_d, st) = state("").await;
    let good = am_payload("GpuXid", "firing", &[("n1", "critical", "firing")]);
    let ok = Some("Bearer tok-123");
    check(&st, ok, &good, 200, r#""duplicate":false"#);
    // Stored before the answer: the group is in the store now.
    let g = st
        .store
        .group_by_key(r#"{}:{alertname="GpuXid"}"#.into())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(g.status, "firing");
    assert_eq!(g.tier, "P1");
    check(&st, ok, &good, 200, r#""duplicate":true"#);
    check(&st, None, &good, 401, "bearer token");
    check(&st, Some("Bearer nope"), &good, 401, "bearer token");
    check(&st, Some("tok-123"), &good, 401, "bearer token");
    check(
        &st,
        ok,
        "{not json",
        400,
        "invalid AlertManager webhook JSON",
    );
    check(
        &st,
        ok,
        r#"{"groupKey":"g","status":"firing"}"#,
        400,
        "missing field `alerts`",
    );
    check(
        &st,
        ok,
        r#"{"groupKey":"g","status":"exploding","alerts":[{"status":"firing"}]}"#,
        400,
        "status must be",
    );
    let huge = am_payload(
        "Big",
        "firing",
        &[("n".repeat(5000).as_str(), "critical", "firing")],
    );
    check(&st, ok, &huge, 413, "");
    // Refused requests changed nothing.
    assert!(st.store.group_by_key("g".into()).await.unwrap().is_none());
    assert_eq!(st.store.pending().await.unwrap(), 1);
}

async fn health_and_metrics() {
    let (_d, st) = state("").await;
    check(
        &st,
        Some("Bearer tok-123"),
        &am_payload("A", "firing", &[("n", "warning", "firing")]),
        200,
        "stored",
    );
    let get = |path: &'static str| {
        let st = st.clone();
        async move {
            let resp = router(st)
                .oneshot(Request::get(path).body(Body::empty()).unwrap())
                .await
                .unwrap();
            let status = resp.status();
            let b = resp.into_body().collect().await.unwrap().to_bytes();
            (status, String::from_utf8_lossy(&b).into_owned())
        }
    };
    assert_eq!(get("/healthz").await.0, StatusCode::OK);
    assert_eq!(get("/readyz").await, (StatusCode::OK, "ready\n".into()));
    let (s, m) = get("/metrics").await;
    assert_eq!(s, StatusCode::OK);
    for name in [
        "api_requests_total",
        "api_request_duration_seconds_bucket",
        "gpuops_alerts_received_total{status=\"firing\",tier=\"P3\"} 1",
        "gpuops_outbox_pending 1",
        "gpuops_build_info",
        "process_resident_memory_bytes",
    ] {
        assert!(m.contains(name), "{name} missing from\n{m}");
    }
}

async fn generic_webhook_gets_documented_json_and_no_secret_in_keys() {
    let sink = FakeApi::slack().await;
    let url = format!("http://{}/hook?token=hook-url-s3cret", sink.addr);
    let extra = format!("[[routing.destinations]]\ntiers = [\"P1\"]\nwebhook_url = \"{url}\"\n");
    let (_d, st, worker) = state_and_worker(&extra).await;
    tokio::spawn(worker.run(std::future::pending()));
    check(
        &st,
        Some("Bearer tok-123"),
        &am_payload("GpuXid", "firing", &[("n1", "critical", "firing")]),
        200,
        "stored",
    );
    let r = sink.wait_for(1, Duration::from_secs(10)).await;
    let b = &r[0].body;
    assert_eq!(b["version"], "1");
    assert_eq!(b["op"], "post");
    assert!(b["id"].as_str().unwrap().starts_with("wh-"));
    assert_eq!(b["message"]["Alert"]["tier"], "P1");
    assert!(b["headline"].as_str().unwrap().contains("GpuXid"));
    let g = st
        .store
        .group_by_key(r#"{}:{alertname="GpuXid"}"#.into())
        .await
        .unwrap()
        .unwrap();
    // The platform answered; the bot records the message right after.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let msgs = loop {
        let m = st.store.messages(g.id).await.unwrap();
        if !m.is_empty() || std::time::Instant::now() > deadline {
            break m;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    assert_eq!(msgs.len(), 1);
    assert!(msgs[0].destination.starts_with("webhook:"));
    assert!(!msgs[0].destination.contains("s3cret"));
}

async fn webhook_with_wrong_content_type_is_415() {
    let (_d, st) = state("").await;
    let good = am_payload("GpuXid", "firing", &[("n1", "critical", "firing")]);
    let ok = Some("Bearer tok-123");
    for ct in [
        None,
        Some("text/plain"),
        Some("application/x-www-form-urlencoded"),
        Some("multipart/form-data; boundary=x"),
        Some("application/json; charset=iso-8859-1"),
    ] {
        let (s, text) = call_as(&st, ct, ok, good.clone()).await;
        assert_eq!(s.as_u16(), 415, "{ct:?}: {text}");
        assert!(text.contains("application/json"), "{ct:?}: {text}");
    }
    // Nothing was stored.
    let stored: i64 = st.store.count_rows("webhooks").await.unwrap();
    assert_eq!(stored, 0);
    assert!(st
        .store
        .group_by_key(r#"{}:{alertname="GpuXid"}"#.into())
        .await
        .unwrap()
        .is_none());
    assert_eq!(st.store.pending().await.unwrap(), 0);
    // What AlertManager sends (with or without a charset) is accepted.
    for ct in ["application/json", "application/json; charset=utf-8"] {
        let (s, text) = call_as(&st, Some(ct), ok, good.clone()).await;
        assert_eq!(s.as_u16(), 200, "{ct}: {text}");
    }
}

#[test]
fn store_files_are_created_0600() {
    use std::os::unix::fs::PermissionsExt as _;
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    let dir = tempfile::tempdir().unwrap();
    // Run by hand without a umask: everything would be created 0644 or 0666.
    let old = rustix::process::umask(rustix::fs::Mode::empty());
    let fresh = dir.path().join("state/bot.db");
    let store = Store::open(&fresh);
    // An old store left world-readable is tightened (with a warning).
    let old_db = dir.path().join("old.db");
    drop(Store::open(&old_db).unwrap());
    for suffix in ["", "-wal", "-shm"] {
        let p = dir.path().join(format!("old.db{suffix}"));
        if !p.exists() {
            std::fs::write(&p, b"").unwrap();
        }
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
    }
    let reopened = Store::open(&old_db);
    rustix::process::umask(old);
    let store = store.unwrap();
    let reopened = reopened.unwrap();
    // Write through both so that the WAL and shared-memory files exist.
    for s in [&store, &reopened] {
        s.sqlite()
            .unwrap()
            .write_blocking(|c| {
                c.execute_batch("CREATE TABLE IF NOT EXISTS t(x); INSERT INTO t VALUES (1);")?;
                Ok(())
            })
            .unwrap();
    }
    for db in [&fresh, &old_db] {
        for suffix in ["", "-wal", "-shm"] {
            let p = std::path::PathBuf::from(format!("{}{suffix}", db.display()));
            assert!(p.exists(), "{} missing", p.display());
            assert_eq!(mode(&p), 0o600, "{} is {:o}", p.display(), mode(&p));
        }
    }
    assert_eq!(
        mode(&dir.path().join("state")),
        0o700,
        "a created directory"
    );
}

on_both!(
    webhook_answers,
    health_and_metrics,
    generic_webhook_gets_documented_json_and_no_secret_in_keys,
    webhook_with_wrong_content_type_is_415,
);
