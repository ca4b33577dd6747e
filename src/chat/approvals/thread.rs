//! A run's timeline messages: the [`RunThread`] that posts step outputs and
//! summaries to the alert's thread (or answers the requester), and the
//! thread helpers the chat commands share.

use crate::chat::approvals::*;

pub(super) struct RunThread {
    group: Option<i64>,
    responder: Responder,
    /// Messages sent through a Slack `response_url` (Slack allows five).
    sent: std::sync::atomic::AtomicUsize,
    /// Held back once the `response_url` budget is nearly spent.
    held: std::sync::Mutex<Vec<String>>,
}

/// Step messages sent one by one through a Slack `response_url` before the
/// rest are held for the final message (Slack accepts five uses).
pub(super) const SLACK_RESPONSES_PER_RUN: usize = 3;

impl RunThread {
    pub(super) fn new(group: Option<i64>, responder: Responder) -> RunThread {
        RunThread {
            group,
            responder,
            sent: Default::default(),
            held: Default::default(),
        }
    }

    /// A step's message: into the alert's thread when the run belongs to
    /// one, else to whoever asked (response_url / follow-up).
    pub(super) async fn post(&self, chat: &ChatState, text: String, code: Option<String>) {
        self.send(chat, text, code, false).await
    }

    /// The run's last message (summary, approval request, failure): also
    /// flushes anything held back.
    pub(super) async fn finish(&self, chat: &ChatState, text: String, code: Option<String>) {
        self.send(chat, text, code, true).await
    }

    pub(super) async fn send(
        &self,
        chat: &ChatState,
        text: String,
        code: Option<String>,
        last: bool,
    ) {
        use std::sync::atomic::Ordering;
        if let Some(g) = self.group {
            return post_thread(chat, g, text, code).await;
        }
        let mut t = text;
        if let Some(c) = code {
            t.push_str("\n```\n");
            t.push_str(&c);
            t.push_str("\n```");
        }
        if !matches!(self.responder, Responder::Slack { .. }) {
            return respond(chat, &self.responder, &Reply::public(t)).await;
        }
        // Decide without holding the lock across an await.
        let earlier = {
            let mut held = self
                .held
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if !last && self.sent.load(Ordering::SeqCst) >= SLACK_RESPONSES_PER_RUN {
                held.push(t);
                return;
            }
            if last {
                Some(std::mem::take(&mut *held))
            } else {
                None
            }
        };
        let Some(earlier) = earlier else {
            self.sent.fetch_add(1, Ordering::SeqCst);
            return respond(chat, &self.responder, &Reply::public(t)).await;
        };
        let limit = crate::chat::Platform::Slack.text_limit() - 100;
        let mut kept: Vec<String> = Vec::new();
        let mut used = t.chars().count();
        for m in earlier.iter().rev() {
            let n = m.chars().count() + 2;
            if used + n > limit {
                break;
            }
            used += n;
            kept.push(m.clone());
        }
        kept.reverse();
        let omitted = earlier.len() - kept.len();
        let mut out = String::new();
        if omitted > 0 {
            out.push_str(&format!(
                "({omitted} earlier step message(s) left out: see `gpuops audit`)\n\n"
            ));
        }
        for m in kept {
            out.push_str(&m);
            out.push_str("\n\n");
        }
        out.push_str(&t);
        self.sent.fetch_add(1, Ordering::SeqCst);
        respond(chat, &self.responder, &Reply::public(out)).await;
    }
}

/// Posts a line into the alert group's thread (the incident timeline).
pub async fn post_thread(chat: &ChatState, group: i64, text: String, code: Option<String>) {
    post_message(chat, group, TextMessage::new(text, code)).await
}

pub(super) async fn post_message(chat: &ChatState, group: i64, mut msg: TextMessage) {
    msg.code = msg
        .code
        .map(|c| notify::truncate_chars(&c, crate::chat::OUTPUT_CHARS + 200));
    if let Err(e) = chat.bot.outbox.reply(group, &Message::Text(msg)).await {
        tracing::error!(error = %e, group_id = group, "cannot enqueue the thread reply");
    }
}

pub(super) async fn group_labels(
    chat: &ChatState,
    group: i64,
) -> Result<BTreeMap<String, String>, String> {
    let g = match chat.bot.store.group(group).await {
        Ok(Some(g)) => g,
        Ok(None) => return Err(format!("no alert group {group} (see `/gpuops alerts`)")),
        Err(e) => return Err(format!("store error: {e}")),
    };
    let hook: Webhook = serde_json::from_str(&g.state)
        .map_err(|e| format!("alert group {group} is unreadable: {e}"))?;
    // The first firing alert names the node; the group's shared labels fill in.
    let mut labels = hook
        .alerts
        .iter()
        .find(|a| a.status == "firing")
        .or_else(|| hook.alerts.first())
        .map(|a| a.labels.clone())
        .unwrap_or_default();
    for (k, v) in hook.shared_labels() {
        labels.entry(k).or_insert(v);
    }
    Ok(labels)
}

/// The GPU indexes (`gpu` label) of the group's firing alerts on `instance`,
/// sorted and once each: a group can hold several GPUs of one node, and a
/// runbook run acts on one of them.
pub(super) async fn group_gpus(
    chat: &ChatState,
    group: i64,
    instance: Option<&str>,
) -> Vec<String> {
    let Ok(Some(g)) = chat.bot.store.group(group).await else {
        return Vec::new();
    };
    let Ok(hook) = serde_json::from_str::<Webhook>(&g.state) else {
        return Vec::new();
    };
    let mut gpus: Vec<String> = hook
        .alerts
        .iter()
        .filter(|a| a.status == "firing")
        .filter(|a| instance.is_none() || a.labels.get("instance").map(String::as_str) == instance)
        .filter_map(|a| a.labels.get("gpu").cloned())
        .collect();
    gpus.sort_by_key(|g| (g.parse::<u64>().unwrap_or(u64::MAX), g.clone()));
    gpus.dedup();
    gpus
}
