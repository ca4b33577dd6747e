//! Discord health reports: one message with an embed (title, the summary
//! as description, one field per section; Discord's limits: description ≤
//! 4096, ≤ 25 fields, field value ≤ 1024, all embed text ≤ 6000) and the
//! charts as attachments, the first one the embed's image
//! (`attachment://<file_name>`). Built with serenity's builders
//! (`CreateEmbed`, `CreateMessage`, `CreateAttachment::bytes`) and posted as
//! `multipart/form-data` (`payload_json` plus one `files[n]` part per chart)
//! on serenity's route, read by the notifier's own response handling so a
//! 429's `retry_after` reaches the outbox. One request: a retry cannot
//! leave half a report behind.

use serenity::all::{
    ChannelId, CreateAllowedMentions, CreateAttachment, CreateEmbed, CreateEmbedFooter,
    CreateMessage, MessageId, MessageReference,
};
use serenity::http::{LightMethod, Request, Route};

use crate::message::{Chart, ReportMessage};
use crate::notify::discord::{
    DiscordNotifier, MAX_DESCRIPTION, MAX_EMBED_TOTAL, MAX_FIELDS, MAX_FIELD_NAME, MAX_FIELD_VALUE,
    MAX_FOOTER, MAX_TITLE,
};
use crate::notify::report_lines::{discord_markdown, fit_lines, more, safe_file_name};
use crate::notify::{truncate_chars, Delivery, Error, Op, Outgoing, PlatformRef};

/// Attachments per message (Discord's limit).
pub const MAX_ATTACHMENTS: usize = 10;
/// The charts' bytes per message: below the 10 MiB a bot may upload to a
/// server without boosts, leaving room for the form and the JSON.
pub const MAX_ATTACHMENT_BYTES: usize = 8 * 1024 * 1024;
/// Room the summary always leaves for the sections (when there are any).
const SECTIONS_RESERVE: usize = 1500;

/// The charts a message carries: at most [`MAX_ATTACHMENTS`] and
/// [`MAX_ATTACHMENT_BYTES`] (in order; a chart that does not fit is left
/// out), with file names Discord's `attachment://` accepts.
pub fn attachments(r: &ReportMessage) -> Vec<(String, &Chart)> {
    let mut seen = std::collections::HashSet::new();
    let mut bytes = 0usize;
    r.charts
        .iter()
        .filter(|c| {
            let fits = bytes + c.png.len() <= MAX_ATTACHMENT_BYTES;
            if fits {
                bytes += c.png.len();
            }
            fits
        })
        .take(MAX_ATTACHMENTS)
        .enumerate()
        .map(|(i, c)| {
            let mut name = safe_file_name(&c.file_name, 100);
            if !seen.insert(name.clone()) {
                name = format!("{i}-{name}");
                seen.insert(name.clone());
            }
            (name, c)
        })
        .collect()
}

/// The report's embed; `image` is the first attachment's file name.
pub fn embed(r: &ReportMessage, image: Option<&str>) -> CreateEmbed {
    let title = truncate_chars(&r.title, MAX_TITLE);
    let dropped = r.charts.len().saturating_sub(attachments(r).len());
    let mut footer = format!("gpuops · {} report", r.name);
    if dropped > 0 {
        footer.push_str(&format!(" · {dropped} more charts not attached"));
    }
    let footer = truncate_chars(&footer, MAX_FOOTER);
    let mut used = title.chars().count() + footer.chars().count();
    let mut description = String::new();
    if r.late {
        description.push_str("⏰ *Sent late: gpuops was not running at the scheduled time.*\n");
    }
    let reserve = if r.sections.is_empty() {
        0
    } else {
        SECTIONS_RESERVE
    };
    let room = MAX_DESCRIPTION
        .min(MAX_EMBED_TOTAL.saturating_sub(used + reserve))
        .saturating_sub(description.chars().count());
    description.push_str(&fit_lines(&r.summary, room, "lines", &discord_markdown));
    used += description.chars().count();
    let mut fields: Vec<(String, String, bool)> = Vec::new();
    let n = r.sections.len();
    for (i, s) in r.sections.iter().enumerate() {
        let last = i + 1 == n;
        let name = truncate_chars(&s.heading, MAX_FIELD_NAME);
        // Room for a "… N more sections" field unless this is the last.
        let keep = if last { 0 } else { 60 };
        let room =
            MAX_FIELD_VALUE.min(MAX_EMBED_TOTAL.saturating_sub(used + keep + name.chars().count()));
        let slots_ok = fields.len() + if last { 1 } else { 2 } <= MAX_FIELDS;
        if !slots_ok || room < 60 {
            let name = more(n - i, "sections");
            let rest: Vec<&str> = r.sections[i..].iter().map(|s| s.heading.as_str()).collect();
            let room =
                MAX_FIELD_VALUE.min(MAX_EMBED_TOTAL.saturating_sub(used + name.chars().count()));
            let value = truncate_chars(&rest.join(", "), room.max(1));
            fields.push((name, value, false));
            break;
        }
        let value = if s.lines.is_empty() {
            "nothing to report".to_string()
        } else {
            fit_lines(&s.lines, room, "lines", &discord_markdown)
        };
        let value = if value.is_empty() {
            more(s.lines.len(), "lines")
        } else {
            value
        };
        used += name.chars().count() + value.chars().count();
        fields.push((name, value, false));
    }
    let mut e = CreateEmbed::new().title(title).colour(0x4A_90_E2);
    if !description.is_empty() {
        e = e.description(description);
    }
    e = e.fields(fields).footer(CreateEmbedFooter::new(footer));
    if let Some(img) = image {
        e = e.image(format!("attachment://{img}"));
    }
    e
}

/// A file to attach: its name and bytes.
pub type File = (String, Vec<u8>);

/// The message (embed, attachments' metadata) as `payload_json`, and the
/// files to send with it.
pub fn payload(
    r: &ReportMessage,
    reply_to: Option<MessageReference>,
) -> Result<(String, Vec<File>), Error> {
    let files = attachments(r);
    let mut msg = CreateMessage::new()
        .embed(embed(r, files.first().map(|(n, _)| n.as_str())))
        .allowed_mentions(CreateAllowedMentions::new());
    for (name, c) in &files {
        msg = msg.add_file(
            CreateAttachment::bytes(Vec::new(), name.clone())
                .description(truncate_chars(&c.title, 1024)),
        );
    }
    if let Some(reference) = reply_to {
        msg = msg.reference_message(reference);
    }
    let mut v = serde_json::to_value(&msg)
        .map_err(|e| Error::permanent(format!("cannot encode message: {e}")))?;
    // Each attachment's id names its `files[n]` part (serenity numbers them
    // only when it sends the request itself).
    if let Some(list) = v.get_mut("attachments").and_then(|a| a.as_array_mut()) {
        for (i, a) in list.iter_mut().enumerate() {
            a["id"] = serde_json::json!(i);
        }
    }
    let json = serde_json::to_string(&v)
        .map_err(|e| Error::permanent(format!("cannot encode message: {e}")))?;
    let bytes = files
        .into_iter()
        .map(|(name, c)| (name, c.png.clone()))
        .collect();
    Ok((json, bytes))
}

/// Posts the report (a new message, or a reply) with its charts.
pub(super) async fn send(
    n: &DiscordNotifier,
    out: &Outgoing<'_>,
    r: &ReportMessage,
) -> Result<Delivery, Error> {
    let parse_id = |s: &str, what: &str| {
        s.parse::<u64>()
            .ok()
            .filter(|n| *n > 0)
            .ok_or_else(|| Error::permanent(format!("{what} {s:?} is not a Discord id")))
    };
    let (channel, reference) = match &out.op {
        Op::Reply(p) => {
            let channel_id = ChannelId::new(parse_id(&p.channel, "channel")?);
            let parent = MessageId::new(parse_id(&p.message_id, "message")?);
            let mut reference = MessageReference::from((channel_id, parent));
            reference.fail_if_not_exists = Some(false);
            (p.channel.as_str(), Some(reference))
        }
        _ => (out.channel, None),
    };
    let channel_id = ChannelId::new(parse_id(channel, "channel")?);
    let (json, files) = payload(r, reference)?;
    let mut form = reqwest::multipart::Form::new();
    for (i, (name, png)) in files.into_iter().enumerate() {
        let part = reqwest::multipart::Part::bytes(png)
            .file_name(name)
            .mime_str("image/png")
            .map_err(|e| Error::permanent(format!("attachment: {e}")))?;
        form = form.part(format!("files[{i}]"), part);
    }
    form = form.text("payload_json", json);
    let builder = Request::new(Route::ChannelMessages { channel_id }, LightMethod::Post)
        .build(&n.client, n.http.token(), n.http.proxy.as_deref())
        .map_err(|e| Error::permanent(format!("discord request: {e}")))?;
    let (client, request) = builder.build_split();
    let mut request =
        request.map_err(|e| Error::permanent(format!("discord request: {}", e.without_url())))?;
    // serenity sets `Content-Length: 0` on a request without a body; the
    // form sets its own.
    request
        .headers_mut()
        .remove(reqwest::header::CONTENT_LENGTH);
    let builder = reqwest::RequestBuilder::from_parts(client, request).multipart(form);
    let token = n.http.token().trim_start_matches("Bot ").to_string();
    let text = n
        .respond(builder)
        .await
        .map_err(|e| e.scrubbed(&[&token]))?;
    let v: serde_json::Value = serde_json::from_str(&text).unwrap_or(serde_json::Value::Null);
    let id = v["id"]
        .as_str()
        .map(str::to_string)
        .or_else(|| v["id"].as_u64().map(|n| n.to_string()));
    let channel = v["channel_id"]
        .as_str()
        .map(str::to_string)
        .unwrap_or_else(|| channel.to_string());
    match id {
        Some(message_id) => Ok(Delivery {
            message: PlatformRef {
                channel,
                message_id,
            },
        }),
        None => Err(Error::retryable("discord answered without a message id")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::ReportSection;

    fn report(sections: usize, lines: usize, charts: usize) -> ReportMessage {
        let line = |i: usize| {
            format!("node-{i:04} GPU 3: [XID 79](http://prom:9090/graph?g0.expr=increase(x[24h])) fell off the bus — runbook `gpu-xid`")
        };
        ReportMessage {
            name: "daily".into(),
            title: "T".repeat(400),
            summary: (0..lines).map(line).collect(),
            sections: (0..sections)
                .map(|s| ReportSection {
                    heading: format!("Section {s}"),
                    lines: (0..lines).map(line).collect(),
                })
                .collect(),
            text: "plain".into(),
            html: String::new(),
            charts: (0..charts)
                .map(|i| Chart {
                    file_name: format!("chart {i}.png"),
                    title: format!("Chart {i}"),
                    png: vec![i as u8; 4],
                })
                .collect(),
            late: false,
        }
    }

    #[test]
    fn a_huge_report_stays_within_discord_limits() {
        let (json, files) = payload(&report(100, 300, 12), None).unwrap();
        let v: serde_json::Value = serde_json::from_str(&json).unwrap();
        let e = &v["embeds"][0];
        let title = e["title"].as_str().unwrap();
        let desc = e["description"].as_str().unwrap();
        assert!(title.chars().count() <= MAX_TITLE);
        assert!(desc.chars().count() <= MAX_DESCRIPTION);
        assert!(desc.ends_with("more lines"), "{desc}");
        let fields = e["fields"].as_array().unwrap();
        assert!(fields.len() <= MAX_FIELDS);
        let mut total = title.chars().count()
            + desc.chars().count()
            + e["footer"]["text"].as_str().unwrap().chars().count();
        for f in fields {
            let (n, val) = (f["name"].as_str().unwrap(), f["value"].as_str().unwrap());
            assert!(n.chars().count() <= MAX_FIELD_NAME && val.chars().count() <= MAX_FIELD_VALUE);
            assert!(!val.is_empty());
            total += n.chars().count() + val.chars().count();
        }
        assert!(total <= MAX_EMBED_TOTAL, "{total}");
        let last = fields.last().unwrap()["name"].as_str().unwrap();
        assert!(
            last.starts_with("… ") && last.ends_with("more sections"),
            "{last}"
        );
        assert_eq!(files.len(), MAX_ATTACHMENTS);
        assert!(e["footer"]["text"]
            .as_str()
            .unwrap()
            .ends_with("2 more charts not attached"));
        assert_eq!(e["image"]["url"], "attachment://chart_0.png");
        let ids: Vec<i64> = v["attachments"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a["id"].as_i64().unwrap())
            .collect();
        assert_eq!(ids, (0..10).collect::<Vec<i64>>());
        assert_eq!(v["attachments"][3]["filename"], "chart_3.png");
        assert!(desc.contains("[XID 79](http://prom:9090/graph?g0.expr=increase%28x[24h]%29)"));
        assert_eq!(v["allowed_mentions"]["parse"], serde_json::json!([]));
    }

    #[test]
    fn charts_beyond_the_upload_limit_are_left_out() {
        let mut r = report(1, 1, 3);
        r.charts[0].png = vec![0; MAX_ATTACHMENT_BYTES - 6];
        r.charts[1].png = vec![0; 10];
        let names: Vec<String> = attachments(&r).into_iter().map(|(n, _)| n).collect();
        assert_eq!(names, ["chart_0.png", "chart_2.png"].map(String::from));
    }

    #[test]
    fn a_small_report_has_every_section() {
        let (json, files) = payload(&report(3, 2, 0), None).unwrap();
        let v: serde_json::Value = serde_json::from_str(&json).unwrap();
        let fields = v["embeds"][0]["fields"].as_array().unwrap();
        assert_eq!(fields.len(), 3);
        assert_eq!(fields[2]["name"], "Section 2");
        assert!(files.is_empty());
        assert!(v["embeds"][0].get("image").is_none());
    }
}
