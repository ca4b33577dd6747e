//! PostgreSQL only: what several replicas on one database rely on. Ignored
//! in plain `cargo test`; `.ci/run` starts a server and includes them.

use crate::store::pg::{open_url, test_url};
use crate::store::{now, GroupUpdate, Store};

fn update(key: &str, hash: &str, dests: &[&str]) -> GroupUpdate {
    GroupUpdate {
        group_key: key.into(),
        receiver: "r".into(),
        status: "firing".into(),
        tier: "P1".into(),
        state_hash: hash.into(),
        state: "{}".into(),
        destinations: dests.iter().map(|s| s.to_string()).collect(),
        resolved_reply: "resolved".into(),
        change: None,
        correlate: None,
    }
}

async fn two_replicas() -> (Store, Store) {
    let url = test_url().await.unwrap();
    (open_url(&url).await.unwrap(), open_url(&url).await.unwrap())
}

#[tokio::test]
#[ignore = "needs PostgreSQL: run by .ci/run"]
async fn the_same_state_at_two_replicas_enqueues_once() {
    let (a, b) = two_replicas().await;
    for i in 0..20 {
        let key = format!("g{i}");
        let (ra, rb) = tokio::join!(
            a.ingest("{}".into(), update(&key, "h1", &["slack:C1", "discord:2"])),
            b.ingest("{}".into(), update(&key, "h1", &["slack:C1", "discord:2"])),
        );
        let (ra, rb) = (ra.unwrap(), rb.unwrap());
        assert_eq!(ra.group_id, rb.group_id);
        assert!(ra.duplicate != rb.duplicate, "exactly one of them is new");
    }
    assert_eq!(
        a.pending().await.unwrap(),
        40,
        "one row per group and destination"
    );
}

/// One fault, one page across replicas: two groups about the same GPU
/// ingested at the same moment on two replicas share one incident.
#[tokio::test]
#[ignore = "needs PostgreSQL: run by .ci/run"]
async fn two_replicas_correlate_groups_about_one_gpu_into_one_incident() {
    let (a, b) = two_replicas().await;
    for i in 0..20 {
        let with = |key: &str| {
            let mut u = update(key, "h1", &["pagerduty:abc"]);
            u.correlate = Some(crate::store::Correlation {
                subjects: vec![format!("node-{i}:9949|5")],
                window_secs: 600.0,
            });
            u
        };
        let (ra, rb) = tokio::join!(
            a.ingest("{}".into(), with(&format!("bus{i}"))),
            b.ingest("{}".into(), with(&format!("down{i}"))),
        );
        let (ra, rb) = (ra.unwrap(), rb.unwrap());
        let ia = a.incident(ra.group_id).await.unwrap().unwrap();
        let ib = b.incident(rb.group_id).await.unwrap().unwrap();
        assert_eq!(ia.group_id, ib.group_id, "round {i}: two incidents");
        assert!(ia.others_firing && ib.others_firing);
    }
}

#[tokio::test]
#[ignore = "needs PostgreSQL: run by .ci/run"]
async fn replicas_claim_disjoint_rows_in_order_and_take_over_expired_leases() {
    let (a, b) = two_replicas().await;
    for i in 0..10 {
        a.ingest("{}".into(), update(&format!("g{i}"), "h1", &["slack:C1"]))
            .await
            .unwrap();
    }
    let (ra, rb) = tokio::join!(a.due(now() + 1.0, 6), b.due(now() + 1.0, 6));
    let (ra, rb) = (ra.unwrap(), rb.unwrap());
    assert_eq!(ra.len() + rb.len(), 10);
    assert!(ra.iter().all(|x| rb.iter().all(|y| x.id != y.id)));
    assert!(
        a.due(now() + 1.0, 10).await.unwrap().is_empty(),
        "all claimed"
    );
    // A resolve while the post is claimed: the edit's reply waits behind it.
    let first = ra.first().or(rb.first()).unwrap().clone();
    let mut u = update(&format!("g{}", first.group_id - 1), "h2", &["slack:C1"]);
    u.status = "resolved".into();
    let _ = a.ingest("{}".into(), u).await.unwrap();
    // Leases far in the future have expired for a replica looking later.
    let later = now() + crate::store::pg::LEASE.as_secs_f64() + 1.0;
    let pg = b.pg().unwrap().clone();
    let c = pg.client().await.unwrap();
    c.execute(
        "UPDATE outbox SET lease_until = $1 WHERE claimed_by IS NOT NULL",
        &[&(now() - 1.0)],
    )
    .await
    .unwrap();
    let again = b.due(later, 100).await.unwrap();
    assert_eq!(again.len(), 10, "expired leases are taken over");
    assert!(
        again.iter().all(|r| r.kind == "alert"),
        "replies wait behind posts"
    );
}

#[tokio::test]
#[ignore = "needs PostgreSQL: run by .ci/run"]
async fn replay_keys_and_approvals_are_shared_by_replicas() {
    let (a, b) = two_replicas().await;
    let key = [7u8; 32];
    assert!(a.first_use(key, 100, 600).await.unwrap());
    assert!(
        !b.first_use(key, 101, 600).await.unwrap(),
        "replayed elsewhere"
    );
    let rec = crate::store::runs::RunRecord {
        id: String::new(),
        runbook: "rb".into(),
        only_steps: None,
        given: Default::default(),
        labels: Default::default(),
        group_id: None,
        requester: "slack:U1".into(),
        requester_name: "u".into(),
        requester_role: "operator".into(),
        status: "running".into(),
        next_step: 0,
        results: Vec::new(),
        expires_at: None,
        decided_by: None,
        planned: Default::default(),
    };
    let id = a.insert_run(rec, now()).await.unwrap();
    a.run_waits_for_approval(&id, 1, &[], now() + 60.0, now())
        .await
        .unwrap();
    let (x, y) = tokio::join!(
        a.decide_run(&id, "approved", "slack:U2", now()),
        b.decide_run(&id, "expired", "expiry", now())
    );
    assert!(x.unwrap() != y.unwrap(), "one decision wins");
}

#[tokio::test]
#[ignore = "needs PostgreSQL: run by .ci/run"]
async fn escalation_steps_and_digest_slots_fire_once_across_replicas() {
    let (a, b) = two_replicas().await;
    let r = a
        .ingest("{}".into(), update("g", "h1", &["slack:C1"]))
        .await
        .unwrap();
    a.start_escalations(vec![(r.group_id, 0, 1, now() - 1.0)])
        .await
        .unwrap();
    let plans = vec![crate::store::paging::EscalationPlan {
        dest: 0,
        targets: vec!["slack:ONCALL".into()],
        steps: 1,
        repeat_every_secs: None,
    }];
    let text: crate::store::seam::StepText = std::sync::Arc::new(|_, s, n| format!("{s}/{n}"));
    let (x, y) = tokio::join!(
        a.fire_due_escalations(now(), plans.clone(), text.clone()),
        b.fire_due_escalations(now(), plans, text)
    );
    assert_eq!(x.unwrap().len() + y.unwrap().len(), 1, "one step fired");
    let (x, y) = tokio::join!(
        a.claim_digest_slot(1000.0, false, 0, Vec::new()),
        b.claim_digest_slot(1000.0, false, 0, Vec::new())
    );
    assert!(x.unwrap() != y.unwrap(), "one replica claims the slot");
}

#[tokio::test]
#[ignore = "needs PostgreSQL: run by .ci/run"]
async fn migrations_are_recorded_and_idempotent() {
    let url = test_url().await.unwrap();
    let s = open_url(&url).await.unwrap();
    let pg = s.pg().unwrap();
    assert_eq!(pg.migrate().await.unwrap(), 0, "nothing left to apply");
    pg.check_schema().await.unwrap();
    assert_eq!(s.count_rows("outbox").await.unwrap(), 0);
}

#[test]
fn remote_plain_text_is_refused_and_the_password_is_not_shown() {
    let e = crate::store::pg::Settings::new(
        "postgres://gpuops:hunter2@db.example/gpuops?sslmode=disable",
        None,
        None,
        4,
        std::time::Duration::from_secs(1),
    )
    .err()
    .unwrap()
    .to_string();
    assert!(e.contains("sslmode=disable"), "{e}");
    assert!(!e.contains("hunter2"), "{e}");
    let bad = crate::store::pg::Settings::new(
        "postgres://gpuops:hunter2@db.example:notaport/gpuops",
        None,
        None,
        4,
        std::time::Duration::from_secs(1),
    )
    .err()
    .unwrap()
    .to_string();
    assert!(!bad.contains("hunter2"), "{bad}");
}

#[tokio::test]
#[ignore = "needs PostgreSQL: run by .ci/run"]
async fn a_starting_replica_interrupts_only_runs_of_replicas_that_are_gone() {
    let (a, b) = two_replicas().await;
    let rec = crate::store::runs::RunRecord {
        id: String::new(),
        runbook: "rb".into(),
        only_steps: None,
        given: Default::default(),
        labels: Default::default(),
        group_id: None,
        requester: "slack:U1".into(),
        requester_name: "u".into(),
        requester_role: "operator".into(),
        status: "running".into(),
        next_step: 0,
        results: Vec::new(),
        expires_at: None,
        decided_by: None,
        planned: Default::default(),
    };
    let id = a.insert_run(rec, now()).await.unwrap();
    // Replica a is alive: its listener connection holds the owner lock.
    let (stop, rx) = tokio::sync::watch::channel(false);
    a.pg()
        .unwrap()
        .spawn_listener(std::sync::Arc::new(|| {}), rx);
    let c = b.pg().unwrap().client().await.unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let held: i64 = c
            .query_one(
                "SELECT COUNT(*)::BIGINT FROM pg_locks WHERE locktype='advisory' AND classid=7262 AND granted",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        if held > 0 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "owner lock never taken"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert!(b.interrupt_running_runs(now()).await.unwrap().is_empty());
    assert_eq!(b.run(&id).await.unwrap().unwrap().status, "running");
    // Replica a goes away: its runs are interrupted by the next start.
    let _ = stop.send(true);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let cut = b.interrupt_running_runs(now()).await.unwrap();
        if !cut.is_empty() {
            assert_eq!(cut[0].0, id);
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "run never interrupted"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

#[tokio::test]
#[ignore = "needs PostgreSQL: run by .ci/run"]
async fn tls_verifies_the_server_against_ca_file_and_refuses_an_unknown_one() {
    let admin = std::env::var(crate::store::pg::TEST_URL_VAR).expect("GPUOPS_TEST_POSTGRES_URL");
    let ca = std::env::var("GPUOPS_TEST_PG_CA").expect("GPUOPS_TEST_PG_CA (set by .ci/postgres)");
    let url = admin.replace("sslmode=disable", "sslmode=require");
    assert!(url.contains("sslmode=require"), "{url}");
    let settings = |ca: Option<&std::path::Path>| {
        crate::store::pg::Settings::new(&url, None, ca, 2, std::time::Duration::from_secs(5))
            .unwrap()
    };
    let pg = crate::store::pg::Pg::connect(settings(Some(std::path::Path::new(&ca))))
        .await
        .unwrap();
    let c = pg.client().await.unwrap();
    let tls: bool = c
        .query_one(
            "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(tls, "the connection is encrypted");
    // The same server with only the system roots: its certificate is unknown.
    let e = crate::store::pg::Pg::connect(settings(None))
        .await
        .err()
        .expect("an unverified server is refused")
        .to_string();
    assert!(e.contains("cannot connect"), "{e}");
}

#[test]
fn a_ca_file_without_certificates_is_an_error_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("ca.pem");
    std::fs::write(&f, "not a certificate\n").unwrap();
    let e = crate::store::pg::Settings::new(
        "postgres://u@127.0.0.1/db?sslmode=require",
        None,
        Some(&f),
        2,
        std::time::Duration::from_secs(1),
    )
    .err()
    .unwrap()
    .to_string();
    assert!(e.contains("ca_file") && e.contains("ca.pem"), "{e}");
}

#[test]
fn sslmode_prefer_is_require_remotely_and_plain_on_loopback() {
    use tokio_postgres::config::SslMode;
    let mode = |url: &str| {
        crate::store::pg::Settings::new(url, None, None, 2, std::time::Duration::from_secs(1))
            .unwrap()
            .config
            .get_ssl_mode()
    };
    assert_eq!(mode("postgres://u@db.example/db"), SslMode::Require);
    assert_eq!(
        mode("postgres://u@db.example/db?sslmode=prefer"),
        SslMode::Require
    );
    assert_eq!(mode("postgres://u@127.0.0.1/db"), SslMode::Disable);
    assert_eq!(
        mode("postgres://u@localhost/db?sslmode=require"),
        SslMode::Require
    );
    assert_eq!(
        mode("postgres://u@[::1]/db?sslmode=disable"),
        SslMode::Disable
    );
}
