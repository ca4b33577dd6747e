//! One hostile label set (mentions, masked and bare links, HTML and script
//! tags, `javascript:` URLs, control characters, CRLF, a 10 KB value) run
//! through every renderer: the Slack alert (blocks and fallback text), a
//! thread reply, the acknowledgement update, Discord (content, embeds,
//! `allowed_mentions`), email (subject, text, HTML), the PagerDuty event,
//! the P4 digest, and the report (Markdown, HTML, Slack, Discord). No
//! output may hold an active mention, a link the config did not make, or a
//! tag. Test code only: it reaches the alert and paging modules too.

#[cfg(test)]
mod tests {
    use serde_json::{json, Value};

    use crate::alert::{render_group, Links, Webhook};
    use crate::message::{ReportMessage, ReportSection};
    use crate::notify::{
        discord, email, pagerduty, slack, Ack, AlertMessage, Message, Op, Outgoing, TextMessage,
    };
    use crate::report::{render, Line};
    use crate::routing::Routing;
    use crate::store::GroupRecord;

    const MENTIONS: &str =
        "Mention <!channel> <!here> <@U0ADMIN> <!subteam^S0ADMIN> @everyone @here <@123> <@&456> <#789>";
    const MASKED: &str = "[Reset your SSO password](https://evil.example/login)";
    const SLACK_LINK: &str = "<https://evil.example/x|click here>";
    const BARE: &str = "https://evil.example/bare";
    const TAGS: &str = "<img src=x onerror=alert(1)><script>alert(2)</script>";
    const JS_URL: &str = "javascript:alert(document.cookie)";
    const CONTROL: &str = "bell\u{7}esc\u{1b}[31mnul\u{0}del\u{7f}";
    /// The one link gpuops makes in the report lines below.
    const PROM: &str = "https://prom.example/graph?g0.expr=up";
    const CRLF: &str = "first line\r\n## injected heading\r\n- injected item";

    fn huge() -> String {
        "A".repeat(10 * 1024)
    }

    fn hostile_webhook(n: usize) -> Webhook {
        let alerts: Vec<Value> = (0..n)
            .map(|i| {
                json!({
                    "status": "firing",
                    "labels": {
                        "alertname": format!("{MENTIONS} {MASKED}"),
                        "severity": "critical",
                        "instance": format!("node-{i}{CRLF}"),
                        "gpu": "0",
                        "job": SLACK_LINK,
                        "mountpoint": TAGS,
                        "note": CONTROL,
                        "big": huge(),
                        "link": BARE,
                    },
                    "annotations": {
                        "summary": format!("{MENTIONS} {TAGS} {MASKED}"),
                        "description": format!("{CRLF} {TAGS} {SLACK_LINK} {MASKED}"),
                        "runbook_url": JS_URL,
                    },
                    "startsAt": "2026-01-01T00:00:00Z",
                    "endsAt": "0001-01-01T00:00:00Z",
                    "generatorURL": "javascript:alert(3)",
                    "fingerprint": format!("f{i}"),
                })
            })
            .collect();
        let body = json!({
            "version": "4",
            "groupKey": "{}:{alertname=\"x\"}",
            "truncatedAlerts": 0,
            "status": "firing",
            "receiver": "gpuops",
            "groupLabels": {},
            "commonLabels": {"severity": "critical", "cluster": MENTIONS},
            "commonAnnotations": {},
            "externalURL": "data:text/html,<script>alert(4)</script>",
            "alerts": alerts,
        });
        Webhook::parse(body.to_string().as_bytes()).unwrap()
    }

    fn alert_message(ack: bool) -> AlertMessage {
        let hook = hostile_webhook(3);
        let g = GroupRecord {
            id: 9,
            group_key: hook.group_key.clone(),
            status: "firing".into(),
            tier: "P1".into(),
            rev: 1,
            state: serde_json::to_string(&hook).unwrap(),
            ack: ack.then(|| Ack {
                by: "<!channel> Mallory".into(),
                at: 0.0,
            }),
            updated_at: 0.0,
        };
        match render_group(&g, &Routing::default(), &Links::default()) {
            Message::Alert(m) => *m,
            _ => panic!("not an alert"),
        }
    }

    /// A thread reply: an unknown command echoed back, and step output.
    fn reply() -> TextMessage {
        TextMessage::new(
            format!("unknown command `{MENTIONS}` {MASKED} {TAGS} {CRLF}"),
            Some(format!(
                "{MENTIONS}\n{TAGS}\n{MASKED}\n{CONTROL}\n```{SLACK_LINK}"
            )),
        )
    }

    fn strings(v: &Value, out: &mut Vec<String>) {
        match v {
            Value::String(s) => out.push(s.clone()),
            Value::Array(a) => a.iter().for_each(|x| strings(x, out)),
            Value::Object(m) => m.values().for_each(|x| strings(x, out)),
            _ => {}
        }
    }

    fn all_strings(v: &Value) -> Vec<String> {
        let mut out = Vec::new();
        strings(v, &mut out);
        out
    }

    /// Common to every output: no control character but a newline, no
    /// carriage return, and no 10 KB value.
    fn check_plain(what: &str, s: &str) {
        assert!(
            !s.chars().any(|c| c.is_control() && c != '\n'),
            "{what}: a control character in {s:?}"
        );
        assert!(
            !s.contains(&"A".repeat(2000)),
            "{what}: the 10 KB value was not cut"
        );
        assert!(
            !s.contains("javascript:alert(document.cookie)") || !s.contains("href"),
            "{what}"
        );
    }

    /// Slack text: no `<` at all (mentions, `<url|text>`, `<!…>` all start
    /// with one), since no link in the hostile set is a safe one.
    fn check_slack(what: &str, v: &Value) {
        for s in all_strings(v) {
            check_plain(what, &s);
            assert!(!s.contains('<'), "{what}: active Slack markup in {s:?}");
        }
    }

    /// Discord: every `<`, `[`, `]`, `(` escaped; no `@everyone`/`@here`;
    /// no masked link; no heading; and mentions allowed for nobody.
    fn check_discord(what: &str, v: &Value) {
        assert_eq!(
            v["allowed_mentions"]["parse"],
            json!([]),
            "{what}: allowed_mentions: {v}"
        );
        for s in all_strings(v) {
            check_plain(what, &s);
            check_discord_text(what, &s);
        }
    }

    fn check_discord_text(what: &str, s: &str) {
        assert!(
            !s.contains("@everyone") && !s.contains("@here"),
            "{what}: {s:?}"
        );
        let chars: Vec<char> = s.chars().collect();
        let mut in_code = false;
        for (i, c) in chars.iter().enumerate() {
            let escaped = i > 0 && chars[i - 1] == '\\';
            if *c == '`' && !escaped && s[s.char_indices().nth(i).unwrap().0..].starts_with("```") {
                in_code = !in_code;
            }
            if in_code {
                continue;
            }
            if *c == '<' {
                assert!(escaped, "{what}: unescaped < at {i} in {s:?}");
            }
            if *c == ']' && chars.get(i + 1) == Some(&'(') {
                assert!(escaped, "{what}: a masked link in {s:?}");
            }
        }
        for l in s.lines() {
            assert!(!l.starts_with('#'), "{what}: a heading {l:?}");
        }
    }

    /// HTML: no tag but ours, no link to anything but http(s).
    fn check_html(what: &str, s: &str) {
        check_plain(what, s);
        let lower = s.to_ascii_lowercase();
        assert!(!lower.contains("<img src=x"), "{what}: {s}");
        assert!(!lower.contains("<script"), "{what}: {s}");
        assert!(!lower.contains("href=\"javascript"), "{what}: {s}");
        assert!(!lower.contains("href=\"data"), "{what}: {s}");
        assert!(
            !lower.contains("evil.example/login\">"),
            "{what}: a link: {s}"
        );
    }

    /// Markdown: no unescaped `<`, and no unescaped `[`/`]` but our own
    /// link's (to [`PROM`]); CRLF never splits a line.
    fn check_markdown(what: &str, s: &str) {
        check_plain(what, s);
        assert!(!s.contains('\r'), "{what}");
        let mut in_code = false;
        let mut escaped = false;
        let mut opened = 0;
        for (i, c) in s.char_indices() {
            if escaped {
                escaped = false;
                continue;
            }
            match c {
                '\\' if !in_code => escaped = true,
                '`' => in_code = !in_code,
                _ if in_code => {}
                '<' => panic!("{what}: unescaped < at {i} in {s:?}"),
                '[' => opened += 1,
                ']' => assert!(
                    s[i..].starts_with(&format!("]({PROM})")),
                    "{what}: unescaped ] at {i} in {s:?}"
                ),
                _ => {}
            }
        }
        assert_eq!(
            opened,
            s.matches(&format!("]({PROM})")).count(),
            "{what}: {s:?}"
        );
        for l in s.lines() {
            assert!(
                !l.starts_with("## injected") && !l.starts_with("- injected"),
                "{what}: CRLF split a line: {s:?}"
            );
        }
    }

    fn check_pagerduty(what: &str, ev: &Value) {
        let bytes = serde_json::to_vec(ev).unwrap().len();
        assert!(bytes <= pagerduty::EVENT_MAX_BYTES, "{what}: {bytes} bytes");
        assert!(ev.get("links").is_none(), "{what}: links {}", ev["links"]);
        assert!(
            ev.get("client_url").is_none(),
            "{what}: {}",
            ev["client_url"]
        );
        for s in all_strings(ev) {
            check_plain(what, &s);
        }
        for f in ["summary", "source", "class", "component", "group"] {
            if let Some(s) = ev["payload"][f].as_str() {
                assert!(!s.contains('\n'), "{what}: {f} spans lines: {s:?}");
            }
        }
    }

    #[test]
    fn hostile_labels_are_data_in_every_renderer() {
        let firing = alert_message(false);
        let acked = alert_message(true);
        assert_eq!(firing.runbook_url.as_deref(), Some(JS_URL), "the fixture");
        for (what, m) in [("alert", &firing), ("ack update", &acked)] {
            let msg = Message::Alert(Box::new(m.clone()));
            // Slack: chat.postMessage / chat.update content (blocks + text).
            let v = serde_json::to_value(slack::render(&msg)).unwrap();
            check_slack(&format!("slack {what}"), &v);
            let blocks = &v["attachments"][0]["blocks"];
            let total: usize = all_strings(blocks)
                .iter()
                .filter(|s| !s.starts_with("gpuops_") && !s.chars().all(|c| c.is_ascii_digit()))
                .map(|s| s.chars().count())
                .sum();
            assert!(
                total <= slack::MAX_TOTAL_BLOCK_TEXT,
                "slack {what}: {total}"
            );
            assert!(v["text"].as_str().unwrap().contains("&lt;!channel&gt;"));
            // Discord: the create and the edit.
            let c = serde_json::to_value(discord::create_message(&msg)).unwrap();
            check_discord(&format!("discord {what}"), &c);
            let e0 = &c["embeds"][0];
            let mut total = e0["title"].as_str().unwrap().chars().count()
                + e0["description"].as_str().unwrap().chars().count()
                + e0["footer"]["text"].as_str().unwrap().chars().count();
            for f in e0["fields"].as_array().unwrap() {
                total += f["name"].as_str().unwrap().chars().count()
                    + f["value"].as_str().unwrap().chars().count();
            }
            assert!(total <= discord::MAX_EMBED_TOTAL, "discord {what}: {total}");
            let e = serde_json::to_value(discord::edit_message(&msg)).unwrap();
            check_discord(&format!("discord edit {what}"), &e);
            // Email.
            let out = Outgoing {
                channel: "ops@example.com",
                op: Op::Post,
                message: &msg,
                renotify: None,
                incident: None,
            };
            let (mail, _) = email::plan(&out).unwrap();
            check_plain("email subject", &mail.subject);
            assert!(!mail.subject.contains('\n'), "{:?}", mail.subject);
            check_plain("email text", &mail.text);
            check_html(&format!("email html {what}"), &mail.html);
            assert!(!mail.html.contains("<a href"), "{}", mail.html);
            // PagerDuty.
            for action in [pagerduty::Action::Trigger, pagerduty::Action::Acknowledge] {
                let ev = pagerduty::event(&"k".repeat(32), action, "gpuops/9/x", m);
                check_pagerduty(&format!("pagerduty {what}"), &ev);
            }
        }
        assert!(acked_status_is_escaped(&acked));

        // A thread reply (echoed input, step output).
        let r = Message::Text(reply());
        check_slack(
            "slack reply",
            &serde_json::to_value(slack::render(&r)).unwrap(),
        );
        let d = serde_json::to_value(discord::create_message(&r)).unwrap();
        check_discord("discord reply", &d);
        // A Discord follow-up (an answer to a slash command).
        check_discord(
            "discord follow-up",
            &discord::followup_body(&discord::escape(MENTIONS), false),
        );

        // The P4 digest (a text message through every chat and email).
        let hook = hostile_webhook(2);
        let group = crate::store::paging::DigestGroup {
            group_id: 1,
            status: "firing".into(),
            state: serde_json::to_string(&hook).unwrap(),
            first_seen: 0.0,
            updated_at: 0.0,
        };
        let (schedule_text, schedule) =
            crate::config::paging::cron_schedule("0 0 9 * * *").unwrap();
        let d = crate::config::paging::DigestConfig {
            schedule_text,
            schedule,
            timezone: chrono_tz::UTC,
        };
        let text = crate::paging::digest_text(
            &d,
            0.0,
            0.0,
            false,
            &[(&group, hook)],
            &[],
            &crate::inventory::NodeNames::default(),
        );
        check_plain("digest", &text);
        for l in text.lines() {
            assert!(
                !l.starts_with("## injected") && !l.starts_with("- injected"),
                "{text}"
            );
        }
        let digest = Message::Text(TextMessage::new(text, None));
        check_slack(
            "slack digest",
            &serde_json::to_value(slack::render(&digest)).unwrap(),
        );
        check_discord(
            "discord digest",
            &serde_json::to_value(discord::create_message(&digest)).unwrap(),
        );
        let out = Outgoing {
            channel: "ops@example.com",
            op: Op::Post,
            message: &digest,
            renotify: None,
            incident: None,
        };
        let (mail, _) = email::plan(&out).unwrap();
        assert!(!mail.subject.contains(['\r', '\n']));
        check_html("email digest", &mail.html);

        // The report: outside values as a finding's bold node, a value, a
        // link text, and inside our own text (as "Noisiest alerts: …").
        let evil = format!(
            "{MENTIONS} {MASKED} {TAGS} {SLACK_LINK} {CRLF} {CONTROL} {}",
            huge()
        );
        let lines = vec![
            Line::new()
                .bold(evil.clone())
                .text(" GPU 0 ")
                .link(evil.clone(), PROM)
                .text(": runbook `gpu-xid`"),
            Line::new().text(format!(
                "Noisiest alerts: {evil} (3 notifications, 1 groups)"
            )),
            Line::new().text("⚠ Could not compute ").value(evil.clone()),
            Line::new().text("bad link ").link("click", JS_URL),
        ];
        for l in &lines {
            check_markdown("report markdown", &render::line_markdown(l));
            check_html("report html", &render::line_html(l));
            let t = render::line_text(l);
            check_plain("report text", &t);
            assert!(!t.contains('\n'), "{t:?}");
        }
        let md: Vec<String> = lines.iter().map(render::line_markdown).collect();
        let report = ReportMessage {
            name: "daily".into(),
            title: "Daily health report".into(),
            summary: md.clone(),
            sections: vec![ReportSection {
                heading: "Incidents".into(),
                lines: md,
            }],
            text: String::new(),
            html: String::new(),
            charts: vec![],
            late: false,
        };
        let v = serde_json::to_value(slack::report::content(&report)).unwrap();
        for s in all_strings(&v) {
            check_plain("slack report", &s);
            // Our one link, to Prometheus, is the only `<` allowed.
            let stripped = s.replace("<https://prom.example/graph?g0.expr=up|", "");
            assert!(!stripped.contains('<'), "slack report: {s:?}");
            assert!(!s.contains("**"), "slack report: Markdown bold in {s:?}");
        }
        let msg = Message::Report(Box::new(report));
        let v = serde_json::to_value(discord::create_message(&msg)).unwrap();
        for s in all_strings(&v) {
            check_plain("discord report", &s);
            assert!(!s.contains("@everyone") && !s.contains("@here"), "{s:?}");
            let masked = s.matches("](").count();
            let ours = s
                .matches("](https://prom.example/graph?g0.expr=up)")
                .count();
            let escaped = s.matches("\\](").count();
            assert_eq!(
                masked,
                ours + escaped,
                "discord report: a masked link in {s:?}"
            );
        }
    }

    fn acked_status_is_escaped(m: &AlertMessage) -> bool {
        let v = serde_json::to_value(slack::render(&Message::Alert(Box::new(m.clone())))).unwrap();
        let all = all_strings(&v).join("\n");
        all.contains("acknowledged by &lt;!channel&gt; Mallory") && !all.contains("<!channel>")
    }
}
