//! Nodes found out of service by their scheduler (`src/found.rs`), through
//! the bot (store, outbox, router) with a fake Prometheus: a node Slurm has
//! drained (the agents' series) or Kubernetes has cordoned
//! (kube-state-metrics) becomes quarantined and is said once in the report
//! channel; it returns when the scheduler shows it back, only if gpuops
//! quarantined it for that alone; a node gpuops took out itself is never
//! returned on the scheduler's word (its reminder says what Slurm shows);
//! a Prometheus error, a run in progress or a recent change leave the
//! node alone. Each case on SQLite and PostgreSQL (`chat_on_both!`).

use crate::chat_support;

use axum::body::Body;
use axum::http::Request;
use chat_support::*;
use gpuops::found::{found_pass, Pass, KUBE_CORDONS, SLURM_REASONS, SLURM_STATES};
use gpuops::lifecycle::{NodeRecord, NodeState, Transition};
use gpuops::report::prom::Prometheus;
use gpuops::signing::Clock as _;

use crate::report_support::{fake_prometheus, Series};

const REPORTS: &str = "[lifecycle]\ngpus_per_node = 8\n[[reports]]\nname = \"daily\"\nschedule = \"0 9 * * *\"\nslack_channel = \"C0REPORTS\"\n";

/// A bot whose `[prometheus] url` is `prom` and whose report channel is
/// `C0REPORTS` (`more` appended).
async fn bot(prom: &str, more: &str) -> Bot {
    Bot::start(
        &format!("[prometheus]\nurl = \"{prom}\"\n{REPORTS}{more}"),
        None,
    )
    .await
}

fn client(url: &str) -> Prometheus {
    Prometheus::new(url, std::time::Duration::from_secs(5)).unwrap()
}

/// Slurm's series for gpu-node-17's agent: `on` the states at 1.
fn slurm(on: &[&'static str], reason: Option<&'static str>) -> Vec<(String, Vec<Series>)> {
    let states = [
        "drain",
        "drained",
        "draining",
        "down",
        "idle",
        "allocated",
        "mixed",
    ]
    .into_iter()
    .map(|s| {
        (
            vec![
                ("__name__", "gpuops_node_scheduler_state"),
                ("instance", "gpu-node-17:9949"),
                ("job", "gpuops"),
                ("scheduler", "slurm"),
                ("state", s),
            ],
            if on.contains(&s) { 1.0 } else { 0.0 },
        )
    })
    .collect();
    let reasons = reason
        .map(|r| {
            vec![(
                vec![
                    ("__name__", "gpuops_node_scheduler_info"),
                    ("instance", "gpu-node-17:9949"),
                    ("job", "gpuops"),
                    ("scheduler", "slurm"),
                    ("reason", r),
                    ("since", "2026-12-03T10:00:00"),
                ],
                1.0,
            )]
        })
        .unwrap_or_default();
    vec![
        (SLURM_STATES.to_string(), states),
        (SLURM_REASONS.to_string(), reasons),
    ]
}

async fn node(b: &Bot, name: &str) -> Option<NodeRecord> {
    b.state
        .store
        .node_states()
        .await
        .unwrap()
        .into_iter()
        .find(|r| r.node == name)
}

async fn pass(b: &Bot, prom: &str, at: f64) -> Pass {
    found_pass(&b.state, &client(prom), at).await.unwrap()
}

/// The texts posted to the report channel so far.
fn in_channel(b: &Bot) -> Vec<String> {
    b.slack
        .calls()
        .into_iter()
        .filter(|c| c.channel == "C0REPORTS")
        .filter_map(|c| match c.message {
            gpuops::notify::Message::Text(t) => Some(t.text),
            _ => None,
        })
        .collect()
}

async fn wait_channel(b: &Bot, n: usize) -> Vec<String> {
    b.state.outbox.wake();
    b.wait_for(10, &format!("{n} posts in the report channel"), move |b| {
        in_channel(b).len() >= n
    })
    .await;
    in_channel(b)
}

fn text(v: &serde_json::Value) -> String {
    v["text"].as_str().unwrap_or_default().to_string()
}

/// Puts `name` in `state` `hours` ago, set by a runbook step or a person.
async fn set(b: &Bot, name: &str, state: NodeState, at: f64, step: &str) {
    let a = b
        .state
        .store
        .node_transition(Transition {
            node: name.into(),
            to: Some(state),
            at,
            reason: format!("{step} by hand"),
            step: Some(step.into()),
            by: Some("alice".into()),
            gpus: 8,
            ..Transition::default()
        })
        .await
        .unwrap();
    assert!(a.changed);
}

const HOLD: f64 = 1800.0;

async fn slurm_drained_node_is_quarantined_and_said_once_in_the_report_channel() {
    let prom = fake_prometheus(slurm(
        &["drain", "drained", "idle"],
        Some("XID 79 <!channel> @everyone"),
    ))
    .await;
    let b = bot(&prom, "").await;
    let now = b.clock.now_unix() as f64;
    let p = pass(&b, &prom, now).await;
    assert_eq!(p.quarantined, ["gpu-node-17"], "{p:?}");
    let r = node(&b, "gpu-node-17").await.unwrap();
    assert_eq!(r.state, NodeState::Quarantined);
    assert_eq!(r.by.as_deref(), Some("slurm"));
    assert_eq!(r.step.as_deref(), Some("found-slurm"));
    assert_eq!(r.run, None);
    assert_eq!(r.gpus, 8);
    assert_eq!(
        r.reason,
        "found drained in Slurm: XID 79 <!channel> @everyone"
    );
    // Again (the next pass, or another replica): nothing more.
    let again = pass(&b, &prom, now + 2.0 * HOLD).await;
    assert!(again.quarantined.is_empty(), "{again:?}");
    let posts = wait_channel(&b, 1).await;
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    assert_eq!(in_channel(&b).len(), 1, "said once: {posts:?}");
    assert_eq!(
        posts[0],
        "🔎 gpu-node-17 found drained in Slurm (XID 79 <!channel> @everyone): now quarantined (was in service); gpuops returns it to service when Slurm shows it back. `/gpuops nodes` lists the nodes out."
    );
    // The reason is data on every platform.
    let msg =
        gpuops::message::Message::Text(gpuops::message::TextMessage::new(posts[0].clone(), None));
    let slack = serde_json::to_string(&gpuops::notify::slack::render(&msg)).unwrap();
    assert!(slack.contains("XID 79 &lt;!channel&gt;"), "{slack}");
    assert!(!slack.contains("<!channel>"), "{slack}");
    let discord = gpuops::notify::discord::render(&msg).content;
    assert!(!discord.contains("@everyone"), "{discord}");
    // `/gpuops nodes` lists it, found drained.
    let (_, v) = b.slack_command(STRANGER, "nodes").await;
    assert!(
        text(&v).contains("gpu-node-17 · 8 GPUs · quarantined since"),
        "{v}"
    );
    assert!(
        text(&v).contains("found drained in Slurm: XID 79 &lt;!channel&gt;"),
        "{v}"
    );
    assert!(text(&v).contains("last: found-slurm by slurm"), "{v}");
    b.stop();
}

async fn slurm_resumed_by_hand_returns_a_node_found_drained() {
    let drained = fake_prometheus(slurm(&["drain", "drained", "idle"], Some("bad DIMM"))).await;
    let idle = fake_prometheus(slurm(&["idle"], None)).await;
    let b = bot(&drained, "").await;
    let now = b.clock.now_unix() as f64;
    assert_eq!(pass(&b, &drained, now).await.quarantined, ["gpu-node-17"]);
    // Seen idle within the hold: left alone.
    let early = pass(&b, &idle, now + 60.0).await;
    assert!(early.returned.is_empty(), "{early:?}");
    // Two hours later Slurm shows it idle: back in service, said once.
    let later = now + 7200.0;
    let p = pass(&b, &idle, later).await;
    assert_eq!(p.returned, ["gpu-node-17"], "{p:?}");
    let r = node(&b, "gpu-node-17").await.unwrap();
    assert_eq!(r.state, NodeState::InService);
    assert_eq!(r.reason, "resumed in Slurm by hand (Slurm shows it idle)");
    let hist = b.state.store.node_transitions(0.0).await.unwrap();
    assert_eq!(hist.len(), 2);
    assert_eq!(hist[1].lost_gpu_seconds, Some(7200.0 * 8.0));
    let posts = wait_channel(&b, 2).await;
    assert_eq!(
        posts[1],
        "📍 gpu-node-17 is back in service (was quarantined, found drained in Slurm: bad DIMM): resumed in Slurm by hand (Slurm shows it idle); 16.0 GPU-hours lost while out"
    );
    let (_, v) = b.slack_command(STRANGER, "nodes").await;
    assert!(text(&v).contains("every tracked node is in service"), "{v}");
    b.stop();
}

async fn slurm_idle_never_returns_a_node_gpuops_took_out_itself_but_its_reminder_says_so() {
    let idle = fake_prometheus(slurm(&["idle"], None)).await;
    let b = bot(&idle, "").await;
    let now = b.clock.now_unix() as f64;
    set(
        &b,
        "gpu-node-17",
        NodeState::AwaitingRepair,
        now - 3600.0,
        "chat",
    )
    .await;
    let p = pass(&b, &idle, now).await;
    assert!(p.returned.is_empty() && p.quarantined.is_empty(), "{p:?}");
    assert_eq!(
        node(&b, "gpu-node-17").await.unwrap().state,
        NodeState::AwaitingRepair
    );
    assert_eq!(
        p.notes.get("gpu-node-17").map(String::as_str),
        Some("Slurm shows it idle")
    );
    // The reminder (after remind_after, at most daily) says it.
    let cfg = b.state.config.lifecycle.clone();
    let channels = gpuops::lifecycle::report_channels(&b.state.config);
    let remind = |at: f64| {
        let (store, cfg, channels, notes) = (
            b.state.store.clone(),
            cfg.clone(),
            channels.clone(),
            p.notes.clone(),
        );
        async move {
            gpuops::lifecycle::remind_due_noted(&store, &cfg, &channels, at, &notes)
                .await
                .unwrap()
        }
    };
    assert_eq!(remind(now).await, 0, "remind_after is 12 h");
    assert_eq!(remind(now + 12.0 * 3600.0).await, 1);
    assert_eq!(remind(now + 13.0 * 3600.0).await, 0, "at most daily");
    let posts = wait_channel(&b, 1).await;
    assert!(
        posts[0].starts_with("⏰ gpu-node-17 has been awaiting repair for 13h 0m (chat by hand; last: chat by alice); 104.0 GPU-hours lost so far."),
        "{posts:?}"
    );
    assert!(
        posts[0].ends_with(" Slurm shows it idle, gpuops still tracks it awaiting repair: `/gpuops node gpu-node-17 return` if repaired."),
        "{posts:?}"
    );
    // Without the note, a node awaiting repair gets no reminder.
    let none = gpuops::lifecycle::remind_due(&b.state.store, &cfg, &channels, now + 48.0 * 3600.0)
        .await
        .unwrap();
    assert_eq!(none, 0);
    b.stop();
}

async fn a_node_gpuops_drained_itself_is_not_returned_by_slurms_view() {
    let idle = fake_prometheus(slurm(&["idle"], None)).await;
    let b = bot(&idle, "").await;
    let now = b.clock.now_unix() as f64;
    set(
        &b,
        "gpu-node-17",
        NodeState::Quarantined,
        now - 7200.0,
        "drain-slurm",
    )
    .await;
    let p = pass(&b, &idle, now).await;
    assert!(p.returned.is_empty(), "{p:?}");
    assert_eq!(
        node(&b, "gpu-node-17").await.unwrap().state,
        NodeState::Quarantined
    );
    assert!(p.notes.contains_key("gpu-node-17"), "{p:?}");
    b.stop();
}

async fn prometheus_error_changes_nothing_and_is_counted() {
    let drained = fake_prometheus(slurm(&["drain", "drained", "idle"], None)).await;
    let down = format!("http://127.0.0.1:{}", crate::support::free_port());
    let b = bot(&drained, "").await;
    let now = b.clock.now_unix() as f64;
    assert_eq!(pass(&b, &drained, now).await.quarantined, ["gpu-node-17"]);
    // No answer is never "not drained": the node stays out.
    let p = pass(&b, &down, now + 7200.0).await;
    assert_eq!(p.errors.len(), 2, "{p:?}");
    assert!(p.returned.is_empty(), "{p:?}");
    assert_eq!(
        node(&b, "gpu-node-17").await.unwrap().state,
        NodeState::Quarantined
    );
    let (_, m) = b
        .send(Request::get("/metrics").body(Body::empty()).unwrap())
        .await;
    for line in [
        "gpuops_node_found_checks_total{outcome=\"error\",scheduler=\"slurm\"} 1",
        "gpuops_node_found_checks_total{outcome=\"ok\",scheduler=\"slurm\"} 1",
        "gpuops_node_found_checks_total{outcome=\"error\",scheduler=\"kubernetes\"} 1",
    ] {
        assert!(m.lines().any(|l| l == line), "{line} in\n{m}");
    }
    b.stop();
}

async fn a_node_with_a_run_in_progress_or_set_by_a_person_recently_is_left_alone() {
    let drained = fake_prometheus(slurm(&["drain", "drained", "idle"], None)).await;
    let b = bot(&drained, "").await;
    let now = b.clock.now_unix() as f64;
    // A person returned it ten minutes ago (Slurm not resumed yet).
    set(
        &b,
        "gpu-node-17",
        NodeState::Quarantined,
        now - 7200.0,
        "drain-slurm",
    )
    .await;
    set(&b, "gpu-node-17", NodeState::InService, now - 600.0, "chat").await;
    let p = pass(&b, &drained, now).await;
    assert!(p.quarantined.is_empty(), "{p:?}");
    assert_eq!(
        node(&b, "gpu-node-17").await.unwrap().state,
        NodeState::InService
    );
    // A run waits for approval on it: still left alone after the hold.
    let labels: std::collections::BTreeMap<String, String> = [
        ("alertname", "GPUXIDFellOffBus"),
        ("instance", "gpu-node-17:9949"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    b.state
        .store
        .insert_run(
            gpuops::store::runs::RunRecord {
                id: String::new(),
                runbook: "gpu-fell-off-bus".into(),
                only_steps: None,
                given: Default::default(),
                labels,
                group_id: None,
                requester: "slack:U0OPER".into(),
                requester_name: "oper".into(),
                requester_role: "operator".into(),
                status: "waiting".into(),
                next_step: 0,
                results: Vec::new(),
                expires_at: Some(now + 600.0),
                decided_by: None,
                planned: Default::default(),
            },
            now,
        )
        .await
        .unwrap();
    let p = pass(&b, &drained, now + 2.0 * HOLD).await;
    assert!(p.quarantined.is_empty(), "{p:?}");
    assert_eq!(
        node(&b, "gpu-node-17").await.unwrap().state,
        NodeState::InService
    );
    b.stop();
}

/// kube-state-metrics' cordons: its `node` label is the Kubernetes node
/// name (here the FQDN), mapped to the inventory's name; a cordoned node
/// the inventory does not know (a CPU node) is left out.
fn kube(value: f64) -> Vec<(String, Vec<Series>)> {
    vec![(
        KUBE_CORDONS.to_string(),
        vec![
            (
                vec![
                    ("__name__", "kube_node_spec_unschedulable"),
                    ("instance", "kube-state-metrics:8080"),
                    ("node", "gpu-node-17.cluster.local"),
                ],
                value,
            ),
            (
                vec![
                    ("__name__", "kube_node_spec_unschedulable"),
                    ("instance", "kube-state-metrics:8080"),
                    ("node", "cpu-node-1"),
                ],
                1.0,
            ),
        ],
    )]
}

async fn kubernetes_cordoned_node_is_quarantined_and_uncordoning_returns_it() {
    let cordoned = fake_prometheus(kube(1.0)).await;
    let open = fake_prometheus(kube(0.0)).await;
    let inventory =
        "[agents]\n[[agents.nodes]]\ninstance = \"10.0.0.17:9949\"\nnode = \"gpu-node-17\"\n";
    let b = bot(&cordoned, inventory).await;
    let now = b.clock.now_unix() as f64;
    let p = pass(&b, &cordoned, now).await;
    assert_eq!(p.quarantined, ["gpu-node-17"], "{p:?}");
    assert!(node(&b, "cpu-node-1").await.is_none());
    let r = node(&b, "gpu-node-17").await.unwrap();
    assert_eq!(r.reason, "found cordoned in Kubernetes");
    assert_eq!(r.by.as_deref(), Some("kubernetes"));
    let p = pass(&b, &open, now + 3600.0).await;
    assert_eq!(p.returned, ["gpu-node-17"], "{p:?}");
    let posts = wait_channel(&b, 2).await;
    assert!(
        posts[0].starts_with("🔎 gpu-node-17 found cordoned in Kubernetes: now quarantined"),
        "{posts:?}"
    );
    assert!(
        posts[1].contains("uncordoned in Kubernetes by hand (Kubernetes shows it schedulable); 8.0 GPU-hours lost while out"),
        "{posts:?}"
    );
    b.stop();
}

/// No series (no kube-state-metrics, no agent reading Slurm): nothing.
async fn no_series_changes_nothing() {
    let empty = fake_prometheus(Vec::new()).await;
    let b = bot(&empty, "").await;
    let p = pass(&b, &empty, b.clock.now_unix() as f64).await;
    assert_eq!(p, Pass::default());
    assert!(b.state.store.node_states().await.unwrap().is_empty());
    b.stop();
}

chat_on_both!(
    slurm_drained_node_is_quarantined_and_said_once_in_the_report_channel,
    slurm_resumed_by_hand_returns_a_node_found_drained,
    slurm_idle_never_returns_a_node_gpuops_took_out_itself_but_its_reminder_says_so,
    a_node_gpuops_drained_itself_is_not_returned_by_slurms_view,
    prometheus_error_changes_nothing_and_is_counted,
    a_node_with_a_run_in_progress_or_set_by_a_person_recently_is_left_alone,
    kubernetes_cordoned_node_is_quarantined_and_uncordoning_returns_it,
    no_series_changes_nothing,
);

// The bot names pods: an alert's `namespace`, `pod` and `container` labels
// are named as "pod <namespace>/<pod>" in its line on every platform, and
// the report's utilization section names the pod and namespace instead of
// a uid where the agent's `gpu_workload_*` series carry them.

/// The card the bot posted for its only alert group, once it is sent.
async fn card(b: &Bot) -> gpuops::message::Message {
    b.state.outbox.wake();
    b.wait_for(10, "the alert card", |b| {
        b.slack
            .calls()
            .iter()
            .any(|c| matches!(c.message, gpuops::message::Message::Alert(_)))
    })
    .await;
    b.slack
        .calls()
        .into_iter()
        .find_map(|c| match c.message {
            m @ gpuops::message::Message::Alert(_) => Some(m),
            _ => None,
        })
        .expect("an alert card")
}

#[tokio::test]
async fn alert_line_names_the_pod_on_every_platform() {
    let b = Bot::start("", None).await;
    b.alert(webhook(
        "GPUMemoryNearlyFull",
        "gpu-node-17:9949",
        &[
            ("gpu", "3"),
            ("namespace", "training"),
            ("pod", "llama-ft-7b-0"),
            ("container", "trainer <!channel> @everyone"),
        ],
    ))
    .await;
    let msg = card(&b).await;
    let gpuops::message::Message::Alert(m) = &msg else {
        unreachable!()
    };
    let line = gpuops::notify::alert_line_in(m, &m.alerts[0]);
    assert_eq!(
        line,
        "🔥 gpu-node-17 (gpu-node-17:9949) GPU 3 pod training/llama-ft-7b-0 (container trainer <!channel> @everyone) — GPUMemoryNearlyFull on gpu-node-17"
    );
    let slack = serde_json::to_string(&gpuops::notify::slack::render(&msg)).unwrap();
    assert!(
        slack.contains("pod training/llama-ft-7b-0 (container trainer &lt;!channel&gt; @everyone)"),
        "{slack}"
    );
    assert!(!slack.contains("<!channel>"), "{slack}");
    let discord = gpuops::notify::discord::render(&msg);
    let discord = format!(
        "{} {}",
        discord.content,
        serde_json::to_string(&discord.embed).unwrap()
    );
    assert!(discord.contains("pod training/llama-ft-7b-0"), "{discord}");
    assert!(!discord.contains(" @everyone"), "{discord}");
    let (mail, _) = gpuops::notify::email::plan(&gpuops::notify::Outgoing {
        channel: "oncall@example.com",
        op: gpuops::notify::Op::Post,
        message: &msg,
        renotify: None,
        incident: None,
    })
    .expect("a mail");
    assert!(
        mail.text
            .contains("pod training/llama-ft-7b-0 (container trainer <!channel> @everyone)"),
        "{}",
        mail.text
    );
    assert!(
        mail.html
            .contains("pod training/llama-ft-7b-0 (container trainer &lt;!channel&gt; @everyone)"),
        "{}",
        mail.html
    );
    let ev = gpuops::notify::pagerduty::event(
        "key",
        gpuops::notify::pagerduty::Action::Trigger,
        "dedup",
        m,
    );
    let summary = ev["payload"]["summary"].as_str().unwrap();
    assert!(
        summary.ends_with(" · pod training/llama-ft-7b-0 (container trainer <!channel> @everyone)"),
        "{summary}"
    );
    assert_eq!(
        ev["payload"]["custom_details"]["alerts"][0]["pod"],
        "pod training/llama-ft-7b-0 (container trainer <!channel> @everyone)"
    );
    b.stop();
}

#[tokio::test]
async fn report_utilization_names_workloads_by_pod_not_uid() {
    let dir = tempfile::tempdir().unwrap();
    let q = gpuops::report::queries::WORKLOADS_TOP.render(86_400);
    let prom = fake_prometheus(vec![(
        q,
        vec![
            (
                vec![
                    ("instance", "10.0.0.1:9949"),
                    ("workload_type", "kubernetes"),
                    ("workload", "3f2a1b2c-0000-4000-8000-000000000001"),
                    ("namespace", "training"),
                    ("pod", "llama-ft-7b-0"),
                ],
                70.0 * 1024.0 * 1024.0 * 1024.0,
            ),
            (
                vec![
                    ("instance", "10.0.0.1:9949"),
                    ("workload_type", "kubernetes"),
                    ("workload", "9d8c7b6a-0000-4000-8000-000000000002"),
                ],
                2.0 * 1024.0 * 1024.0 * 1024.0,
            ),
            (
                vec![
                    ("instance", "10.0.0.1:9949"),
                    ("workload_type", "slurm"),
                    ("workload", "4242"),
                ],
                10.0 * 1024.0 * 1024.0 * 1024.0,
            ),
            // Behind prometheus-operator: `namespace`/`pod` name the
            // agent's own pod; the workload's are `exported_*`.
            (
                vec![
                    ("instance", "10.0.0.1:9949"),
                    ("workload_type", "kubernetes"),
                    ("workload", "uid-3"),
                    ("endpoint", "metrics"),
                    ("namespace", "gpuops"),
                    ("pod", "gpuops-agent-x7k2p"),
                    ("exported_namespace", "inference"),
                    ("exported_pod", "vllm-0"),
                ],
                5.0 * 1024.0 * 1024.0 * 1024.0,
            ),
            (
                vec![
                    ("instance", "10.0.0.1:9949"),
                    ("workload_type", "kubernetes"),
                    ("workload", "uid-4"),
                    ("endpoint", "metrics"),
                    ("namespace", "gpuops"),
                    ("pod", "gpuops-agent-x7k2p"),
                ],
                3.0 * 1024.0 * 1024.0 * 1024.0,
            ),
        ],
    )])
    .await;
    let text = format!(
        "[store]\npath = \"{}\"\n[slack]\nbot_token = \"xoxb-test\"\napi_url = \"http://127.0.0.1:1/api\"\n[prometheus]\nurl = \"{prom}\"\n[[reports]]\nname = \"daily\"\nschedule = \"0 9 * * *\"\ntimezone = \"UTC\"\nslack_channel = \"C0REPORTS\"\nsections = [\"utilization\"]\n",
        dir.path().join("bot.db").display()
    );
    let cfg = gpuops::config::BotConfig::from_str(&dir.path().join("bot.toml"), &text).unwrap();
    let names = gpuops::inventory::NodeNames::fixed([("10.0.0.1:9949", "gpu-node-1")]);
    let built = gpuops::report::build(gpuops::report::Inputs {
        config: &cfg.reports[0],
        prometheus_url: &prom,
        store: None,
        at: chrono::DateTime::from_timestamp(1_764_316_800, 0).unwrap(),
        late: false,
        agent_events: None,
        names: &names,
        lifecycle: &cfg.lifecycle,
    })
    .await;
    let md = &built.markdown;
    let first = md
        .find("GPU memory held: pod training/llama-ft-7b-0 on **gpu-node-1** (10.0.0.1:9949): [70 GiB](")
        .unwrap_or_else(|| panic!("{md}"));
    let slurm = md
        .find("GPU memory held: Slurm job 4242 on **gpu-node-1**")
        .unwrap_or_else(|| panic!("{md}"));
    let uid = md
        .find("GPU memory held: Kubernetes pod uid 9d8c7b6a-0000-4000-8000-000000000002 on")
        .unwrap_or_else(|| panic!("{md}"));
    assert!(first < slurm && slurm < uid, "most memory first: {md}");
    assert!(
        !md.contains("3f2a1b2c"),
        "a named pod is not shown by uid: {md}"
    );
}

/// Behind prometheus-operator the agent's `namespace`/`pod` labels arrive
/// as `exported_*` and the plain ones name the agent's own pod: the line
/// names the workload's pod, never the agent's.
#[tokio::test]
async fn alert_line_names_the_workload_pod_not_the_agents_own_behind_prometheus_operator() {
    let b = Bot::start("", None).await;
    b.alert(webhook(
        "GPUMemoryNearlyFull",
        "10.0.0.17:9949",
        &[
            ("gpu", "3"),
            ("node", "gpu-node-17"),
            ("endpoint", "metrics"),
            ("namespace", "gpuops"),
            ("pod", "gpuops-agent-x7k2p"),
            ("exported_namespace", "training"),
            ("exported_pod", "llama-ft-7b-0"),
        ],
    ))
    .await;
    let msg = card(&b).await;
    let gpuops::message::Message::Alert(m) = &msg else {
        unreachable!()
    };
    let line = gpuops::notify::alert_line_in(m, &m.alerts[0]);
    assert!(line.contains(" pod training/llama-ft-7b-0"), "{line}");
    assert!(!line.contains("gpuops-agent"), "{line}");
    // The agent's own pod alone is no workload's.
    let mut plain = m.clone();
    plain.common_labels.remove("exported_namespace");
    plain.common_labels.remove("exported_pod");
    assert_eq!(plain.pod_of(&plain.alerts[0]), None);
    b.stop();
}

/// The Slurm and Kubernetes queries against a real Prometheus (a
/// backfilled TSDB): only fresh series count (a series that stopped 10
/// minutes ago is not a reading), and only from agents whose last
/// `scontrol` reading succeeded (`gpuops_collector_success` 1).
#[tokio::test]
#[ignore = "needs prometheus: run by .ci/run"]
async fn found_reads_only_fresh_series_from_agents_whose_reading_succeeded() {
    use crate::report_support::{backfill_and_start, History, AT};
    use gpuops::found::{read_kubernetes, read_slurm, Seen};
    let dir = tempfile::tempdir().unwrap();
    let mut h = History::default();
    // (instance, states at 1, collector success, last sample's age in s)
    let agents: [(&str, &[&str], f64, i64); 4] = [
        ("10.0.0.1:9949", &["drain", "drained", "idle"], 1.0, 0),
        ("10.0.0.2:9949", &["drain", "drained", "idle"], 0.0, 0),
        ("10.0.0.3:9949", &["drain", "drained", "idle"], 1.0, 600),
        ("10.0.0.4:9949", &["idle"], 1.0, 0),
    ];
    for (instance, on, ok, age) in agents {
        let mut t = AT - 3600;
        while t <= AT - age {
            for s in [
                "drain",
                "drained",
                "draining",
                "down",
                "idle",
                "allocated",
                "mixed",
            ] {
                h.push(
                    "gpuops_node_scheduler_state",
                    &[
                        ("instance", instance),
                        ("job", "gpuops"),
                        ("scheduler", "slurm"),
                        ("state", s),
                    ],
                    t,
                    if on.contains(&s) { 1.0 } else { 0.0 },
                );
            }
            if on.contains(&"drain") {
                h.push(
                    "gpuops_node_scheduler_info",
                    &[
                        ("instance", instance),
                        ("job", "gpuops"),
                        ("reason", "XID 79"),
                        ("scheduler", "slurm"),
                        ("since", "2026-12-03T10:00:00"),
                    ],
                    t,
                    1.0,
                );
            }
            t += 60;
        }
        let mut t = AT - 3600;
        while t <= AT {
            h.push(
                "gpuops_collector_success",
                &[
                    ("collector", "node_state"),
                    ("instance", instance),
                    ("job", "gpuops"),
                ],
                t,
                ok,
            );
            t += 60;
        }
    }
    let mut t = AT - 3600;
    while t <= AT {
        h.push(
            "kube_node_spec_unschedulable",
            &[
                ("instance", "ksm:8080"),
                ("job", "kube-state-metrics"),
                ("node", "gpu-node-5.cluster.local"),
            ],
            t,
            1.0,
        );
        t += 60;
    }
    let file = dir.path().join("history.om");
    let mut f = std::fs::File::create(&file).unwrap();
    h.write_openmetrics(&mut f).unwrap();
    drop(f);
    let p = backfill_and_start(&file, dir.path());
    let prom = client(&p.url);
    let names = gpuops::inventory::NodeNames::fixed(
        (1..=4).map(|i| (format!("10.0.0.{i}:9949"), format!("gpu-node-{i}"))),
    );
    let view = read_slurm(&prom, &names, (AT + 30) as f64).await.unwrap();
    assert_eq!(
        view.into_iter().collect::<Vec<_>>(),
        vec![
            (
                "gpu-node-1".to_string(),
                Seen::Out {
                    what: "drained",
                    reason: Some("XID 79".into())
                }
            ),
            ("gpu-node-4".to_string(), Seen::Back { what: "idle" }),
        ]
    );
    let known = ["gpu-node-5".to_string()].into_iter().collect();
    let kube = read_kubernetes(&prom, &known, (AT + 30) as f64)
        .await
        .unwrap();
    assert_eq!(
        kube.get("gpu-node-5"),
        Some(&Seen::Out {
            what: "cordoned",
            reason: None
        })
    );
}

/// The real bot binary finds a node Slurm has drained on its own (its
/// lifecycle task's first pass runs at start) and says it once in the
/// report channel through Slack's API.
#[tokio::test]
async fn the_bot_finds_a_drained_node_on_its_own_and_says_it_in_the_report_channel() {
    use crate::support::{bot_config, free_port, gpuops, wait_http_ok, FakeApi};
    let dir = tempfile::tempdir().unwrap();
    let slack = FakeApi::slack().await;
    let discord = FakeApi::discord().await;
    let prom = fake_prometheus(slurm(&["drain", "drained", "idle"], Some("XID 79"))).await;
    let extra = format!("[prometheus]\nurl = \"{prom}\"\n{REPORTS}");
    let cfg = dir.path().join("bot.toml");
    std::fs::write(&cfg, bot_config(dir.path(), &slack, &discord, &extra)).unwrap();
    std::fs::set_permissions(
        &cfg,
        <std::fs::Permissions as std::os::unix::fs::PermissionsExt>::from_mode(0o600),
    )
    .unwrap();
    let port = free_port();
    let _bot = crate::support::Proc(
        std::process::Command::new(gpuops())
            .arg("bot")
            .args(["--listen", &format!("127.0.0.1:{port}"), "--config"])
            .arg(&cfg)
            .current_dir(dir.path())
            .env_remove("GPUOPS_BOT_CONFIG")
            .env_remove("STATE_DIRECTORY")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    wait_http_ok(
        &format!("http://127.0.0.1:{port}/healthz"),
        std::time::Duration::from_secs(20),
    )
    .await;
    let posts = slack.wait_for(1, std::time::Duration::from_secs(20)).await;
    let post = posts
        .iter()
        .find(|r| r.path.ends_with("chat.postMessage"))
        .unwrap_or_else(|| panic!("{posts:#?}"));
    assert_eq!(post.body["channel"], "C0REPORTS", "{:#?}", post.body);
    assert!(
        post.raw
            .contains("gpu-node-17 found drained in Slurm (XID 79): now quarantined"),
        "{}",
        post.raw
    );
    // Its /metrics count the read, and the node is out.
    let m = reqwest::get(format!("http://127.0.0.1:{port}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        m.contains("gpuops_node_found_checks_total{outcome=\"ok\",scheduler=\"slurm\"} 1"),
        "{m}"
    );
    assert!(m.contains("gpuops_nodes{state=\"quarantined\"} 1"), "{m}");
    slack
        .expect_no_more(1, std::time::Duration::from_millis(500))
        .await;
}
