//! The console destination: alerts printed as log lines (the no-config mode
//! and a debugging aid). Always succeeds; never prints secrets (none here).

use std::sync::atomic::{AtomicU64, Ordering};

use futures_util::future::BoxFuture;

use crate::notify::{
    alert_line_in, headline, tier_text, Delivery, Error, Message, Notifier, Op, Outgoing,
    PlatformRef,
};

#[derive(Default)]
pub struct ConsoleNotifier {
    next_id: AtomicU64,
}

impl ConsoleNotifier {
    pub fn new() -> ConsoleNotifier {
        ConsoleNotifier::default()
    }
}

impl Notifier for ConsoleNotifier {
    fn platform(&self) -> &'static str {
        "console"
    }

    fn send<'a>(&'a self, out: &'a Outgoing<'a>) -> BoxFuture<'a, Result<Delivery, Error>> {
        Box::pin(async move {
            let (op, parent) = match &out.op {
                Op::Post => ("post", None),
                Op::Edit(p) => ("edit", Some(p.message_id.clone())),
                Op::Reply(p) => ("reply", Some(p.message_id.clone())),
            };
            let message_id = match &out.op {
                Op::Edit(p) => p.message_id.clone(),
                _ => format!(
                    "console-{}",
                    self.next_id.fetch_add(1, Ordering::Relaxed) + 1
                ),
            };
            match out.message {
                Message::Alert(m) => {
                    let alerts: Vec<String> = m
                        .alerts
                        .iter()
                        .take(20)
                        .map(|a| alert_line_in(m, a))
                        .collect();
                    tracing::info!(
                        target: "gpuops::alert",
                        op,
                        message_id = %message_id,
                        parent = parent.as_deref().unwrap_or(""),
                        group_id = m.group_id,
                        tier = %tier_text(m),
                        summary = m.summary.as_deref().unwrap_or(""),
                        alerts = %alerts.join("; "),
                        more = m.alerts.len().saturating_sub(20) as u64 + m.truncated_alerts,
                        runbook = m.runbook_id.as_deref().or(m.runbook_url.as_deref()).unwrap_or(""),
                        "{}",
                        headline(m)
                    );
                }
                Message::Report(r) => {
                    tracing::info!(
                        target: "gpuops::alert",
                        op,
                        message_id = %message_id,
                        report = %r.name,
                        title = %r.title,
                        late = r.late,
                        charts = r.charts.len(),
                        "{}",
                        r.text
                    );
                }
                Message::Text(t) => {
                    tracing::info!(
                        target: "gpuops::alert",
                        op,
                        message_id = %message_id,
                        parent = parent.as_deref().unwrap_or(""),
                        code = t.code.as_deref().unwrap_or(""),
                        "{}",
                        t.text
                    );
                }
            }
            Ok(Delivery {
                message: PlatformRef {
                    channel: "console".into(),
                    message_id,
                },
            })
        })
    }
}
