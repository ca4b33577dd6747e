//! The generic JSON webhook destination (`webhook_url` in a destination).
//!
//! Every post, edit and thread reply is one `POST` of this JSON body:
//!
//! ```json
//! {
//!   "version": "1",
//!   "op": "post" | "update" | "reply",
//!   "id": "wh-…",              // stable across updates of one message
//!   "parent_id": "wh-…",       // the alert message a reply belongs to (replies only)
//!   "headline": "[P1] [FIRING 2] GpuXid",
//!   "message": { "Alert": { …AlertMessage… } } | { "Text": { "text": "…", "code": null } }
//!            | { "Report": { "name", "title", "summary": [], "sections": [{"heading", "lines"}],
//!                          "text", "late", "charts": [{"file_name", "title", "bytes"}] } }
//! }
//! ```
//!
//! A report's lines are Markdown with `[text](url)` links; its charts are
//! described (name, title, size), never sent as PNG bytes, and its HTML
//! rendering (an email body) is left out.
//!
//! `message` is `notify::Message` as serde writes it (tier, title, summary,
//! severity, severity_unknown, status, acknowledged, alerts[], links,
//! buttons); each of `alerts[]` carries `instance` and, resolved by the bot,
//! `node` (the node's name), `device` (`GPU 3 (GPU-8c3e2a5d)`), `value` and
//! `victim` (an OOM victim). 2xx is success; 429 honours `Retry-After` (seconds); 408 and 5xx
//! are retried; other 4xx are dead-lettered. The URL is a secret: it is never
//! logged and never put in an error (reqwest errors are stripped of it).

use std::collections::HashMap;
use std::time::Duration;

use futures_util::future::BoxFuture;

use crate::config::Secret;
use crate::notify::{
    headline, truncate_chars, Delivery, Error, Message, Notifier, Op, Outgoing, PlatformRef,
};
use crate::routing::{webhook_id, Routing};

pub struct WebhookNotifier {
    client: reqwest::Client,
    /// `webhook_id(url)` → url.
    urls: HashMap<String, Secret>,
}

impl WebhookNotifier {
    /// `None` when no destination names a webhook.
    pub fn new(routing: &Routing, timeout: Duration) -> anyhow::Result<Option<WebhookNotifier>> {
        let urls: HashMap<String, Secret> = routing
            .destinations
            .iter()
            .filter_map(|d| d.webhook_url.clone())
            .map(|u| (webhook_id(&u), u))
            .collect();
        if urls.is_empty() {
            return Ok(None);
        }
        let client = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout.min(Duration::from_secs(5)))
            .user_agent(concat!("gpuops/", env!("CARGO_PKG_VERSION")))
            .build()?;
        Ok(Some(WebhookNotifier { client, urls }))
    }
}

impl Notifier for WebhookNotifier {
    fn platform(&self) -> &'static str {
        "webhook"
    }

    fn send<'a>(&'a self, out: &'a Outgoing<'a>) -> BoxFuture<'a, Result<Delivery, Error>> {
        Box::pin(async move {
            let result = self.call(out).await;
            match self.urls.get(out.channel) {
                Some(url) => {
                    let parts = url_secrets(url.expose());
                    let parts: Vec<&str> = parts.iter().map(String::as_str).collect();
                    result.map_err(|e| e.scrubbed(&parts))
                }
                None => result,
            }
        })
    }
}

/// The URL and every part of it that may be a credential: userinfo, path
/// segments, query values.
fn url_secrets(url: &str) -> Vec<String> {
    let mut out = vec![url.to_string()];
    if let Ok(u) = reqwest::Url::parse(url) {
        if !u.username().is_empty() {
            out.push(u.username().to_string());
        }
        if let Some(p) = u.password() {
            out.push(p.to_string());
        }
        for seg in u.path_segments().into_iter().flatten() {
            if seg.len() >= 6 {
                out.push(seg.to_string());
            }
        }
        for (_, v) in u.query_pairs() {
            out.push(v.into_owned());
        }
    }
    out.sort_by_key(|s| std::cmp::Reverse(s.len()));
    out
}

impl WebhookNotifier {
    async fn call(&self, out: &Outgoing<'_>) -> Result<Delivery, Error> {
        {
            let Some(url) = self.urls.get(out.channel) else {
                return Err(Error::permanent(format!(
                    "webhook {} is no longer configured",
                    out.channel
                )));
            };
            let (op, id, parent) = match &out.op {
                Op::Post => ("post", new_id(), None),
                Op::Edit(p) => ("update", p.message_id.clone(), None),
                Op::Reply(p) => ("reply", new_id(), Some(p.message_id.clone())),
            };
            let head = match out.message {
                Message::Alert(m) => headline(m),
                Message::Text(t) => truncate_chars(&t.text, 200),
                Message::Report(r) => truncate_chars(&r.title, 200),
            };
            let body = serde_json::json!({
                "version": "1",
                "op": op,
                "id": id,
                "parent_id": parent,
                "headline": head,
                "message": message_json(out.message),
            });
            let resp = self
                .client
                .post(url.expose())
                .json(&body)
                .send()
                .await
                .map_err(|e| {
                    Error::retryable(format!("webhook request failed: {}", e.without_url()))
                })?;
            let status = resp.status().as_u16();
            if (200..300).contains(&status) {
                return Ok(Delivery {
                    message: PlatformRef {
                        channel: out.channel.to_string(),
                        message_id: id,
                    },
                });
            }
            let retry_after = resp
                .headers()
                .get(reqwest::header::RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
                .and_then(|s| s.trim().parse::<f64>().ok())
                .filter(|s| s.is_finite() && *s >= 0.0)
                .map(|s| Duration::from_secs_f64(s.min(3600.0)));
            let text = resp.text().await.unwrap_or_default();
            Err(Error::from_status(
                status,
                retry_after,
                &format!("webhook: {}", truncate_chars(&text, 200)),
            ))
        }
    }
}

/// `message` as the body carries it: a report without its PNG bytes and
/// HTML, everything else as serde writes it.
pub fn message_json(m: &Message) -> serde_json::Value {
    match m {
        Message::Report(r) => serde_json::json!({
            "Report": {
                "name": r.name,
                "title": r.title,
                "summary": r.summary,
                "sections": r.sections,
                "text": r.text,
                "late": r.late,
                "charts": r.charts.iter().map(|c| serde_json::json!({
                    "file_name": c.file_name,
                    "title": c.title,
                    "bytes": c.png.len(),
                })).collect::<Vec<_>>(),
            }
        }),
        other => serde_json::to_value(other).unwrap_or(serde_json::Value::Null),
    }
}

fn new_id() -> String {
    format!("wh-{:016x}", rand::random::<u64>())
}
