//! The Grafana dashboard: its structure (datasource and node variables, USE
//! rows, contract metric names) and, against a real Prometheus scraping a real
//! agent with the shipped rules loaded, that every query evaluates.

use crate::ops_support;

use std::collections::BTreeSet;

use ops_support::*;

/// Prometheus' own series the dashboard may read besides the agent's.
const PROMETHEUS_SERIES: &[&str] = &["up", "scrape_duration_seconds"];

#[test]
fn dashboard_has_variables_use_rows_and_enough_queries() {
    let d = load_dashboard();
    assert_eq!(d["schemaVersion"], 39);
    assert_eq!(d["uid"], "gpuops-node");
    let vars = d["templating"]["list"].as_array().expect("templating");
    let var = |name: &str| {
        vars.iter()
            .find(|v| v["name"] == name)
            .unwrap_or_else(|| panic!("no ${name} variable"))
    };
    assert_eq!(var("datasource")["type"], "datasource");
    assert_eq!(var("datasource")["query"], "prometheus");
    assert_eq!(
        var("node")["query"]["query"],
        "label_values(gpuops_build_info, instance)"
    );
    // Every panel and target reads the datasource variable.
    let rows: Vec<String> = d["panels"]
        .as_array()
        .expect("panels")
        .iter()
        .filter(|p| p["type"] == "row")
        .filter_map(|p| p["title"].as_str().map(str::to_string))
        .collect();
    for wanted in [
        "GPU: utilization",
        "GPU: saturation",
        "GPU: errors",
        "CPU",
        "Memory",
        "Storage",
        "gpuops agent health",
    ] {
        assert!(
            rows.iter().any(|r| r == wanted),
            "no {wanted:?} row: {rows:?}"
        );
    }
    for p in d["panels"].as_array().expect("panels") {
        if p["type"] != "row" {
            assert_eq!(p["datasource"]["uid"], "${datasource}", "{}", p["title"]);
        }
    }
    let queries = dashboard_queries(&d);
    assert!(queries.len() >= 10, "only {} queries", queries.len());
    for q in &queries {
        assert!(
            q.expr.contains("$node"),
            "{}: {} is not limited to $node",
            q.panel,
            q.expr
        );
    }
    let titles: BTreeSet<&str> = queries.iter().map(|q| q.panel.as_str()).collect();
    for wanted in [
        "XID errors (last 1h)",
        "ECC errors (totals)",
        "Row remapping",
        "OOM kills (per 5m)",
        "Collectors",
    ] {
        assert!(titles.contains(wanted), "no {wanted:?} panel");
    }
}

#[test]
fn dashboard_reads_only_contract_series_and_recording_rules() {
    let text = std::fs::read_to_string(repo().join("config/prometheus/rules/gpuops-recording.yml"))
        .expect("recording rules");
    let doc: serde_norway::Value = serde_norway::from_str(&text).expect("yaml");
    let mut recorded = BTreeSet::new();
    for g in doc["groups"].as_sequence().expect("groups") {
        for r in g["rules"].as_sequence().expect("rules") {
            if let Some(n) = r["record"].as_str() {
                recorded.insert(n.to_string());
            }
        }
    }
    // The agent's metric names, from the generated metric reference.
    let contract = contract_metrics();
    let mut unknown = Vec::new();
    for q in dashboard_queries(&load_dashboard()) {
        for s in series_names(&q.expr) {
            let known = recorded.contains(&s)
                || PROMETHEUS_SERIES.contains(&s.as_str())
                || contract.contains(&s);
            if !known {
                unknown.push(format!("{}: {s}", q.panel));
            }
        }
    }
    assert!(unknown.is_empty(), "unknown series: {unknown:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs prometheus; run by .ci/run"]
async fn every_dashboard_query_evaluates_against_a_real_prometheus() {
    let dir = tempfile::tempdir().expect("tempdir");
    let agent = start_agent(dir.path()).await;
    let rules = copy_rules_fast(dir.path());
    let mut prom = start_prometheus(dir.path(), agent.addr, &rules, None).await;
    let client = http();
    wait_scraped(&client, &mut prom).await;
    // A few scrapes so that rate() and the 1s recording rules have values.
    tokio::time::sleep(std::time::Duration::from_secs(6)).await;
    wait_rules_evaluated(&client, &prom).await;

    let node = agent.addr.to_string();
    let (total, empty) = check_dashboard_queries(&client, &prom.url, &node).await;
    eprintln!(
        "{total} dashboard queries evaluated without error; {} returned no series:",
        empty.len()
    );
    for q in &empty {
        eprintln!("  empty: {}: {}", q.panel, q.expr);
    }
    if agent.fake_gpus {
        // With the 8-GPU fixture the per-GPU panels must show data.
        for must in ["GPU utilization", "GPU temperature", "GPU $gpu utilization"] {
            assert!(
                !empty.iter().any(|q| q.panel == must),
                "{must} is empty with the fake GPUs"
            );
        }
    }
    // The agent's own health always has data.
    for must in ["Collectors", "Agent up", "Kernel log readable"] {
        assert!(!empty.iter().any(|q| q.panel == must), "{must} is empty");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs prometheus; run by .ci/run"]
async fn prometheus_loads_every_shipped_rule_with_health_ok() {
    let dir = tempfile::tempdir().expect("tempdir");
    let agent = start_agent(dir.path()).await;
    // The shipped files as they are (30s recording interval): health turns ok
    // on each rule's first evaluation.
    let rules = vec![
        repo().join("config/prometheus/rules/gpuops-alerts.yml"),
        repo().join("config/prometheus/rules/gpuops-recording.yml"),
    ];
    let mut prom = start_prometheus(dir.path(), agent.addr, &rules, None).await;
    let client = http();
    wait_scraped(&client, &mut prom).await;
    let groups = wait_rules_evaluated(&client, &prom).await;
    let names: BTreeSet<&str> = groups.iter().filter_map(|g| g["name"].as_str()).collect();
    let expected: BTreeSet<&str> = [
        "gpuops-gpu",
        "gpuops-host",
        "gpuops-storage",
        "gpuops-agent",
        "gpuops-lifecycle",
        "gpuops-recording",
    ]
    .into();
    assert_eq!(names, expected);
    let rules: Vec<&serde_json::Value> = groups
        .iter()
        .flat_map(|g| g["rules"].as_array().into_iter().flatten())
        .collect();
    assert_eq!(rules.len(), shipped_rule_count());
    let bad: Vec<String> = rules
        .iter()
        .filter(|r| r["health"] != "ok")
        .map(|r| format!("{}: {} {}", r["name"], r["health"], r["lastError"]))
        .collect();
    assert!(bad.is_empty(), "rules not healthy: {bad:#?}");
}
