//! The chat commands that answer from the store and AlertManager: `ack`,
//! `silence`, `unsilence`, `status`, `alerts`, `runbooks`. Dispatch, roles
//! and audit are in `chat/mod.rs`; runs and approvals in `approvals.rs`.

use crate::chat::*;
use crate::lifecycle::{self, Applied};

pub(super) async fn ack(chat: &Arc<ChatState>, user: &User, target: &str) -> Outcome {
    let who = user.key();
    let groups = match resolve_groups(chat, target).await {
        Ok(g) => g,
        Err(msg) => {
            chat.audit(
                &who,
                "ack",
                serde_json::json!({ "target": target }),
                Some(target.to_string()),
                &format!("error: {msg}"),
            )
            .await;
            return Outcome::Now(Reply::private(msg));
        }
    };
    let mut done = Vec::new();
    for g in &groups {
        match chat.bot.outbox.acknowledge(g.id, &user.display()).await {
            Ok(true) => {
                done.push(g.id);
                approvals::post_thread(
                    chat,
                    g.id,
                    format!("👀 {} acknowledged the alert", user.display()),
                    None,
                )
                .await;
                chat.bot
                    .metrics
                    .acknowledgements
                    .with_label_values(&[user.platform.as_str()])
                    .inc();
            }
            Ok(false) => {}
            Err(e) => {
                tracing::error!(error = %e, group_id = g.id, "cannot record the acknowledgement");
            }
        }
    }
    let ids: Vec<String> = done.iter().map(|i| format!("#{i}")).collect();
    let outcome = if done.is_empty() {
        "error: nothing acknowledged".to_string()
    } else {
        format!("ok: {}", ids.join(","))
    };
    chat.audit(
        &who,
        "ack",
        serde_json::json!({ "target": target, "groups": done }),
        Some(target.to_string()),
        &outcome,
    )
    .await;
    if done.is_empty() {
        Outcome::Now(Reply::private(format!("could not acknowledge {target}")))
    } else {
        Outcome::Now(Reply::public(format!(
            "👀 {} acknowledged alert group {}",
            user.display(),
            ids.join(", ")
        )))
    }
}

/// Group ids (`12`, `#12`) or alert names / fingerprints among firing groups.
pub(super) async fn resolve_groups(
    chat: &Arc<ChatState>,
    target: &str,
) -> Result<Vec<GroupRecord>, String> {
    if let Ok(id) = target.trim_start_matches('#').parse::<i64>() {
        return match chat.bot.store.group(id).await {
            Ok(Some(g)) => Ok(vec![g]),
            Ok(None) => Err(format!("no alert group {id} (see `/gpuops alerts`)")),
            Err(e) => Err(format!("store error: {e}")),
        };
    }
    let firing = chat
        .bot
        .store
        .firing_groups(500)
        .await
        .map_err(|e| format!("store error: {e}"))?;
    let hits: Vec<GroupRecord> = firing
        .into_iter()
        .filter(|g| {
            serde_json::from_str::<Webhook>(&g.state).is_ok_and(|h| {
                h.shared_labels().get("alertname").map(String::as_str) == Some(target)
                    || h.alerts.iter().any(|a| {
                        a.fingerprint == target
                            || a.labels.get("alertname").map(String::as_str) == Some(target)
                    })
            })
        })
        .take(20)
        .collect();
    if hits.is_empty() {
        Err(format!(
            "no firing alert group matches {target:?} (see `/gpuops alerts`)"
        ))
    } else {
        Ok(hits)
    }
}

pub(super) async fn silence(
    chat: &Arc<ChatState>,
    user: &User,
    matchers: Vec<Matcher>,
    duration: Duration,
    comment: String,
    responder: Responder,
    group: Option<i64>,
) -> Outcome {
    let who = user.key();
    let params = serde_json::json!({
        "matchers": alertmanager::format_matchers(&matchers),
        "duration": humantime::format_duration(duration).to_string(),
        "comment": comment,
        "group": group,
    });
    let narrowed = matchers
        .iter()
        .any(|m| m.is_equal && !m.is_regex && !m.value.is_empty());
    if let Err(denied) = crate::rbac::authorize_silence(
        &chat.bot.config.rbac,
        chat.role_of(user),
        narrowed,
        duration,
    ) {
        chat.audit(&who, "silence", params, None, &format!("denied: {denied}"))
            .await;
        return Outcome::Now(Reply::private(format!(
            "⛔ {denied}. Ask an admin other than you to create it (admins: {}), or narrow it to one alert (alertname=\"...\") for at most {}.",
            crate::chat::approvals::admins_text(chat, &who),
            humantime::format_duration(
                chat.bot
                    .config
                    .rbac
                    .max_silence
                    .unwrap_or(crate::rbac::DEFAULT_MAX_SILENCE)
            )
        )));
    }
    let Some(am) = chat.alertmanager.clone() else {
        chat.audit(
            &who,
            "silence",
            params,
            None,
            "error: no [alertmanager] url",
        )
        .await;
        return Outcome::Now(Reply::private(
            "silences need `[alertmanager] url` in the bot's configuration",
        ));
    };
    let shown = alertmanager::format_matchers(&matchers);
    let chat2 = chat.clone();
    let user2 = user.clone();
    let created_by = user.display();
    let work = async move {
        let s = alertmanager::new_silence(matchers, duration, &created_by, &comment);
        let (outcome, text) = match am.create_silence(&s).await {
            Ok(id) => (
                format!("ok: {id}"),
                Reply::public(format!(
                    "🔕 {} silenced `{{{shown}}}` for {} (silence `{id}`; `/gpuops unsilence {id}` to lift it)",
                    user2.display(),
                    humantime::format_duration(duration)
                )),
            ),
            Err(e) => (
                format!("error: {e}"),
                Reply::private(format!("could not create the silence: {e}")),
            ),
        };
        chat2
            .audit(
                &user2.key(),
                "silence",
                params,
                Some(shown.clone()),
                &outcome,
            )
            .await;
        if let Some(g) = group {
            if outcome.starts_with("ok") {
                let _ = chat2
                    .bot
                    .outbox
                    .reply(
                        g,
                        &Message::Text(notify::TextMessage {
                            text: text.text.clone(),
                            code: None,
                            buttons: Vec::new(),
                        }),
                    )
                    .await;
            }
        }
        respond(&chat2, &responder, &text).await;
    };
    Outcome::Later {
        ack: Reply::private("creating the silence…"),
        work: Box::pin(work),
    }
}

pub(super) async fn unsilence(
    chat: &Arc<ChatState>,
    user: &User,
    id: String,
    responder: Responder,
) -> Outcome {
    let who = user.key();
    let Some(am) = chat.alertmanager.clone() else {
        chat.audit(
            &who,
            "unsilence",
            serde_json::json!({ "id": id }),
            None,
            "error: no [alertmanager] url",
        )
        .await;
        return Outcome::Now(Reply::private(
            "silences need `[alertmanager] url` in the bot's configuration",
        ));
    };
    let chat2 = chat.clone();
    let user2 = user.clone();
    let work = async move {
        let (outcome, reply) = match am.delete_silence(&id).await {
            Ok(()) => (
                "ok".to_string(),
                Reply::public(format!("🔔 {} lifted silence `{id}`", user2.display())),
            ),
            Err(e) => (
                format!("error: {e}"),
                Reply::private(format!("could not lift silence {id}: {e}")),
            ),
        };
        chat2
            .audit(
                &user2.key(),
                "unsilence",
                serde_json::json!({ "id": id }),
                Some(id.clone()),
                &outcome,
            )
            .await;
        respond(&chat2, &responder, &reply).await;
    };
    Outcome::Later {
        ack: Reply::private("lifting the silence…"),
        work: Box::pin(work),
    }
}

pub(super) async fn status_text(chat: &Arc<ChatState>, node: Option<&str>) -> String {
    let groups = match chat.bot.store.firing_groups(500).await {
        Ok(g) => g,
        Err(e) => {
            return format!(
                "⚠ cannot tell: the alert store could not be asked ({e}); this is not an all-clear"
            )
        }
    };
    let names = chat.bot.identity.names().await;
    if let Some(target) = node {
        let Some(sel) = select_node(&names, &groups, target) else {
            return unknown_node_text(&names, &groups, target);
        };
        // Only instances the inventory or stored alerts name are asked (no
        // probing of arbitrary hosts from chat).
        let mut text = alerts_text_of(&chat.bot.config.routing, groups, Some(&sel), &names);
        for i in &sel.instances {
            if let Some(events) = node_events(chat, i).await {
                text.push('\n');
                text.push_str(&events);
            }
        }
        return text;
    }
    let mut by_tier: BTreeMap<String, usize> = BTreeMap::new();
    let mut acked = 0;
    for g in &groups {
        *by_tier.entry(g.tier.clone()).or_default() += 1;
        acked += usize::from(g.ack.is_some());
    }
    let mut s = if groups.is_empty() {
        "✅ no open alert groups".to_string()
    } else {
        format!(
            "*{} open alert group{}* ({acked} acknowledged): {}",
            groups.len(),
            if groups.len() == 1 { "" } else { "s" },
            by_tier
                .iter()
                .map(|(t, n)| format!("{t} {n}"))
                .collect::<Vec<_>>()
                .join(", ")
        )
    };
    if let Ok(n) = approvals::waiting_count(chat).await {
        if n > 0 {
            let _ = write!(s, "\n⏸ {n} runbook step(s) waiting for approval");
        }
    }
    if let Some(am) = &chat.alertmanager {
        if let Ok(Ok(alerts)) = tokio::time::timeout(INLINE_DEADLINE, am.alerts()).await {
            let silenced = alerts
                .iter()
                .filter(|a| a.status.state == "suppressed")
                .count();
            let _ = write!(
                s,
                "\nAlertManager: {} alert(s), {silenced} silenced or inhibited",
                alerts.len()
            );
        } else {
            s.push_str("\nAlertManager: not reachable");
        }
    }
    if !groups.is_empty() {
        s.push_str("\n\n");
        s.push_str(&alerts_text_of(
            &chat.bot.config.routing,
            groups,
            None,
            &names,
        ));
    }
    s
}

/// The node a person named in `status`: its name and the instances that
/// are it.
pub(super) struct NodeSelection {
    /// The node's name (or the instance, when nothing names it).
    pub name: String,
    pub instances: Vec<String>,
}

impl NodeSelection {
    /// Whether an alert (its `instance` and labels) is on this node.
    fn has(&self, names: &NodeNames, labels: &BTreeMap<String, String>) -> bool {
        let instance = labels.get("instance");
        instance.is_some_and(|i| self.instances.contains(i))
            || names
                .name_of(instance.map(String::as_str), labels)
                .as_deref()
                == Some(self.name.as_str())
    }

    /// `gpu-node-17 (127.0.0.1:18949)`.
    fn text(&self) -> String {
        match self.instances.as_slice() {
            [i] if *i != self.name => format!("{} ({i})", self.name),
            _ => self.name.clone(),
        }
    }
}

/// Maps what a person typed (a node name or an instance) to a node: the
/// inventory's names first, then the names and instances of open alerts.
pub(super) fn select_node(
    names: &NodeNames,
    groups: &[GroupRecord],
    target: &str,
) -> Option<NodeSelection> {
    let inventory = names.instances_of(target);
    if !inventory.is_empty() {
        return Some(NodeSelection {
            name: target.to_string(),
            instances: inventory,
        });
    }
    if let Some(name) = names.inventory_name(target) {
        return Some(NodeSelection {
            name,
            instances: vec![target.to_string()],
        });
    }
    let mut by_name: Option<String> = None;
    let mut instances: Vec<String> = Vec::new();
    for g in groups {
        let Ok(h) = serde_json::from_str::<Webhook>(&g.state) else {
            continue;
        };
        for a in &h.alerts {
            let instance = a.labels.get("instance");
            let name = names.name_of(instance.map(String::as_str), &a.labels);
            let by_instance = instance.is_some_and(|i| {
                i == target
                    || i.strip_prefix(target)
                        .is_some_and(|r| r.starts_with([':', '.']))
            });
            if by_instance || name.as_deref() == Some(target) {
                if let Some(i) = instance {
                    if !instances.contains(i) {
                        instances.push(i.clone());
                    }
                }
                if by_name.is_none() {
                    by_name = name;
                }
            }
        }
    }
    if instances.is_empty() {
        return None;
    }
    instances.sort();
    Some(NodeSelection {
        name: by_name.unwrap_or_else(|| target.to_string()),
        instances,
    })
}

/// "no node called X; known nodes: …" (the inventory's and those open
/// alerts name), never an all-clear.
pub(super) fn unknown_node_text(names: &NodeNames, groups: &[GroupRecord], target: &str) -> String {
    let mut known = names.known_nodes();
    for g in groups {
        if let Ok(h) = serde_json::from_str::<Webhook>(&g.state) {
            for a in &h.alerts {
                let instance = a.labels.get("instance").map(String::as_str);
                if let Some(n) = names
                    .name_of(instance, &a.labels)
                    .or(instance.map(str::to_string))
                {
                    known.push(n);
                }
            }
        }
    }
    known.sort();
    known.dedup();
    let shown = 30;
    let list = if known.is_empty() {
        "none (no [[agents.nodes]], no discovered agent and no open alert names one)".to_string()
    } else if known.len() > shown {
        format!(
            "{} … and {} more",
            known[..shown].join(", "),
            known.len() - shown
        )
    } else {
        known.join(", ")
    };
    let mut s = format!(
        "no node called {}; known nodes: {list}",
        notify::truncate_chars(target, 100)
    );
    if let Some(why) = names.blind() {
        let _ = write!(s, "\n⚠ the list may be incomplete: {why}");
    }
    s
}

/// A line about the node's recent kernel events from its agent's
/// `/v1/events` (agents of the inventory only), within the inline deadline.
pub(super) async fn node_events(chat: &ChatState, instance: &str) -> Option<String> {
    let dir = chat.agents.as_ref()?;
    if !is_hostish(instance) {
        return None;
    }
    let agent = match tokio::time::timeout(INLINE_DEADLINE, dir.agent(instance)).await {
        Ok(Ok(a)) => a,
        Ok(Err(why)) => return Some(format!("agent at {instance}: not asked ({why})")),
        Err(_) => {
            return Some(format!(
                "agent at {instance}: inventory did not answer in time"
            ))
        }
    };
    // The last hour (the agent reads a small `since` as seconds back).
    let got = tokio::time::timeout(
        INLINE_DEADLINE,
        chat.agent_events.events(&agent.url, 3600.0),
    )
    .await;
    let Ok(Ok(events)) = got else {
        return Some(format!("agent at {instance}: not reachable"));
    };
    if events.is_empty() {
        return Some(format!(
            "agent at {instance}: no kernel events in the last hour"
        ));
    }
    let mut by_type: BTreeMap<String, usize> = BTreeMap::new();
    for e in &events {
        *by_type
            .entry(e["type"].as_str().unwrap_or("other").to_string())
            .or_default() += 1;
    }
    let latest = events
        .last()
        .and_then(|e| e["message"].as_str())
        .map(|m| notify::truncate_chars(m, 200))
        .unwrap_or_default();
    Some(format!(
        "agent at {instance}: {} kernel event(s) in the last hour ({}); latest: `{latest}`",
        events.len(),
        by_type
            .iter()
            .map(|(t, n)| format!("{t} {n}"))
            .collect::<Vec<_>>()
            .join(", ")
    ))
}

pub(super) async fn alerts_text(chat: &Arc<ChatState>) -> String {
    match chat.bot.store.firing_groups(500).await {
        Ok(g) => {
            let names = chat.bot.identity.names().await;
            alerts_text_of(&chat.bot.config.routing, g, None, &names)
        }
        Err(e) => format!(
            "⚠ cannot tell: the alert store could not be asked ({e}); this is not an all-clear"
        ),
    }
}

pub(super) fn alerts_text_of(
    routing: &crate::routing::Routing,
    groups: Vec<GroupRecord>,
    node: Option<&NodeSelection>,
    names: &NodeNames,
) -> String {
    let mut lines = Vec::new();
    let mut unreadable = 0usize;
    for g in groups {
        let hook: Option<Webhook> = serde_json::from_str(&g.state).ok();
        if let (Some(node), Some(h)) = (node, &hook) {
            if !h.alerts.iter().any(|a| node.has(names, &a.labels)) {
                continue;
            }
        }
        let links = Links {
            names: names.clone(),
            ..Links::default()
        };
        let Message::Alert(m) = alert::render_group(&g, routing, &links) else {
            unreadable += 1;
            continue;
        };
        let mut line = format!(
            "`#{}` {} {} · {}",
            g.id,
            m.tier,
            m.title,
            notify::status_text(&m)
        );
        if let Some(s) = &m.summary {
            let _ = write!(line, " — {}", notify::truncate_chars(s, 120));
        }
        lines.push(line);
    }
    if unreadable > 0 {
        lines.push(format!(
            "⚠ {unreadable} open group(s) could not be read from the store"
        ));
    }
    if lines.is_empty() {
        return match node {
            Some(n) => format!("✅ no open alerts on {}", n.text()),
            None => "✅ no open alert groups".into(),
        };
    }
    notify::fit_lines(&lines, 2800, 0)
}

pub(super) fn runbooks_text(set: &RunbookSet, alertname: Option<&str>, configured: bool) -> String {
    if !configured {
        return "no runbook directory is configured (`[runbooks] dir`)".into();
    }
    let list: Vec<&crate::runbook::Runbook> = match alertname {
        Some(a) => set.suggest(&BTreeMap::from([("alertname".to_string(), a.to_string())])),
        None => set.runbooks.iter().collect(),
    };
    if list.is_empty() {
        return match alertname {
            Some(a) => format!("no runbook answers {a}"),
            None => "no runbooks found".into(),
        };
    }
    let lines: Vec<String> = list
        .iter()
        .map(|r| {
            let steps = r.steps.len();
            let approvals = r.steps.iter().filter(|s| s.needs_approval).count();
            format!(
                "`{}` {} ({steps} steps, {approvals} need approval)",
                r.id, r.title
            )
        })
        .collect();
    notify::fit_lines(&lines, 2800, 0)
}

/// The node state a run's step leaves (`lifecycle::on_step`), recorded
/// with the run, the alert's thread and the person who acted (the approver
/// of an approved step, else the requester).
pub(super) async fn node_after_step(
    chat: &ChatState,
    row: &crate::store::runs::RunRecord,
    plan: &RunPlan,
    ps: &PlannedStep,
    out: &StepOutcome,
    approver: Option<&str>,
) {
    let who = chat.person_of(approver.unwrap_or(&row.requester));
    let ctx = lifecycle::StepContext {
        run: &row.id,
        group: row.group_id,
        by: &who,
        at: chat.now() as f64,
    };
    let cfg = &chat.bot.config.lifecycle;
    let applied = lifecycle::on_step(&chat.bot.store, cfg, plan, ps, out, ctx).await;
    if let (Some(g), Some(line)) = (
        row.group_id,
        applied.as_ref().and_then(lifecycle::change_line),
    ) {
        approvals::post_thread(chat, g, line, None).await;
    }
}

/// `/gpuops nodes`: the nodes not in service, most GPU-hours lost first.
pub(super) async fn nodes_command(chat: &Arc<ChatState>, user: &User) -> Outcome {
    let text = match chat.bot.store.node_states().await {
        Ok(rows) => lifecycle::nodes_text(&rows, chat.now() as f64),
        Err(e) => {
            format!("⚠ cannot tell: the store could not be asked ({e}); this is not an all-clear")
        }
    };
    chat.audit(&user.key(), "nodes", serde_json::json!({}), None, "ok")
        .await;
    Outcome::Now(Reply::private(text))
}

/// `/gpuops node <node> awaiting-repair|return ["reason"]` (operators):
/// sets the node's state in the store, says so in its incident thread.
pub(super) async fn node_command(
    chat: &Arc<ChatState>,
    user: &User,
    node: &str,
    state: lifecycle::NodeState,
    reason: Option<String>,
) -> Outcome {
    let who = user.key();
    let person = chat.person_of(&who);
    let params = serde_json::json!({ "node": node, "state": state.as_str(), "reason": reason });
    let reason = match (state, reason) {
        (_, Some(r)) => r,
        (lifecycle::NodeState::InService, None) => format!("returned to service by {person}"),
        (s, None) => format!("set {} by {person}", s.words()),
    };
    let cfg = &chat.bot.config.lifecycle;
    let at = chat.now() as f64;
    let applied =
        lifecycle::set_by_person(&chat.bot.store, cfg, node, state, &reason, &person, at).await;
    let (text, outcome) = match &applied {
        Err(e) => (
            format!("⚠ {node}: cannot record its state ({e})"),
            format!("error: {e}"),
        ),
        Ok(a) if !a.changed && a.row.is_none() => (
            format!("{node} is not out of service (gpuops has no record of it leaving)"),
            "refused: not tracked".into(),
        ),
        Ok(a) if !a.changed => (
            format!("{node} is already {}", a.from.words()),
            "unchanged".into(),
        ),
        Ok(a) => {
            let lost = a
                .lost_gpu_seconds
                .map(|s| format!(" after {:.1} GPU-hours out of service", s / 3600.0))
                .unwrap_or_default();
            (
                format!(
                    "🔧 {person} set {node} {} (was {}): {reason}{lost}",
                    state.words(),
                    a.from.words()
                ),
                "ok".into(),
            )
        }
    };
    chat.audit(&who, "node", params, Some(node.to_string()), &outcome)
        .await;
    if let Ok(Applied {
        changed: true,
        row: Some(row),
        ..
    }) = &applied
    {
        if let Some(g) = row.group_id {
            approvals::post_thread(chat, g, text.clone(), None).await;
        }
    }
    Outcome::Now(Reply::public(text))
}
