//! Email health reports: one mail per report and address,
//! `multipart/alternative` of the plain text (`ReportMessage::text`) and a
//! `multipart/related` HTML part (`ReportMessage::html`) carrying each chart
//! inline (`Content-ID: <file_name>`, `Content-Disposition: inline`, the
//! HTML's `cid:<file_name>`). Subject: the title, `[late] ` first when the
//! slot was sent late. The `Message-ID` is derived from the report and the
//! address, so a mail re-sent after a failure the server did not report
//! (a cut connection after `DATA`) threads as a duplicate instead of a
//! second report. Sent through the notifier's SMTP transport.

use lettre::message::header::ContentType;
use lettre::message::{Attachment, Mailbox, MultiPart, SinglePart};
use lettre::AsyncTransport as _;
use sha2::Digest as _;

use crate::message::ReportMessage;
use crate::notify::email::EmailNotifier;
use crate::notify::{truncate_chars, Delivery, Error, Op, Outgoing, PlatformRef};

/// The mail's subject.
pub fn subject(r: &ReportMessage) -> String {
    let s = if r.late {
        format!("[late] {}", r.title)
    } else {
        r.title.clone()
    };
    truncate_chars(&s, 200)
}

/// The `Message-ID` of a report mailed to `address`.
pub fn message_id(r: &ReportMessage, address: &str) -> String {
    let mut h = sha2::Sha256::new();
    h.update(address.to_ascii_lowercase().as_bytes());
    h.update([0]);
    h.update(serde_json::to_vec(r).unwrap_or_default());
    let h = h.finalize();
    format!("<gpuops.report.{}@gpuops>", hex::encode(&h[..12]))
}

/// The content id of a chart (its file name, kept to characters a
/// `Content-ID` and a `cid:` URL share).
pub fn content_id(file_name: &str) -> String {
    file_name
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_' | '@'))
        .take(120)
        .collect()
}

/// The whole mail.
pub fn build(from: Mailbox, to: Mailbox, r: &ReportMessage) -> Result<lettre::Message, Error> {
    let address = to.email.to_string();
    let mut related = MultiPart::related().singlepart(SinglePart::html(r.html.clone()));
    for c in &r.charts {
        let cid = content_id(&c.file_name);
        if cid.is_empty() {
            continue;
        }
        let png = ContentType::parse("image/png")
            .map_err(|e| Error::permanent(format!("content type: {e}")))?;
        related = related.singlepart(Attachment::new_inline(cid).body(c.png.clone(), png));
    }
    let body = MultiPart::alternative()
        .singlepart(SinglePart::plain(r.text.clone()))
        .multipart(related);
    lettre::Message::builder()
        .from(from)
        .to(to)
        .subject(subject(r))
        .message_id(Some(message_id(r, &address)))
        .multipart(body)
        .map_err(|e| Error::permanent(format!("cannot build the mail: {e}")))
}

/// Mails a report (posts and replies; an edit mails nothing).
pub(super) async fn send(
    n: &EmailNotifier,
    out: &Outgoing<'_>,
    to: Mailbox,
    r: &ReportMessage,
) -> Result<Delivery, Error> {
    let id = message_id(r, out.channel);
    if let Op::Edit(p) = &out.op {
        return Ok(Delivery { message: p.clone() });
    }
    let mail = build(n.from.clone(), to, r)?;
    match n.transport.send(mail).await {
        Ok(_) => Ok(Delivery {
            message: PlatformRef {
                channel: out.channel.to_string(),
                message_id: id,
            },
        }),
        Err(e) if e.is_permanent() => Err(Error::permanent(format!("smtp: {e}"))),
        Err(e) => Err(Error::retryable(format!("smtp: {e}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::Chart;

    fn report(late: bool) -> ReportMessage {
        ReportMessage {
            name: "daily".into(),
            title: "Daily health report".into(),
            summary: vec![],
            sections: vec![],
            text: "plain text".into(),
            html: "<html><body><img src=\"cid:util.png\"></body></html>".into(),
            charts: vec![Chart {
                file_name: "util.png".into(),
                title: "Utilization".into(),
                png: vec![0x89, b'P', b'N', b'G'],
            }],
            late,
        }
    }

    #[test]
    fn the_mail_is_text_and_related_html_with_inline_charts() {
        let m = build(
            "gpuops <gpuops@example.com>".parse().unwrap(),
            "ops@example.com".parse().unwrap(),
            &report(true),
        )
        .unwrap();
        let raw = String::from_utf8(m.formatted()).unwrap();
        assert!(raw.contains("Subject: [late] Daily health report"), "{raw}");
        assert!(raw.contains("multipart/alternative"), "{raw}");
        assert!(raw.contains("multipart/related"), "{raw}");
        assert!(raw.contains("Content-ID: <util.png>"), "{raw}");
        assert!(raw.contains("Content-Disposition: inline"), "{raw}");
        let a = raw.find("text/plain").unwrap();
        let b = raw.find("multipart/related").unwrap();
        assert!(a < b, "the plain part comes first");
        assert_eq!(
            message_id(&report(true), "OPS@example.com"),
            message_id(&report(true), "ops@example.com")
        );
        assert_ne!(
            message_id(&report(true), "ops@example.com"),
            message_id(&report(false), "ops@example.com")
        );
        assert_eq!(subject(&report(false)), "Daily health report");
    }
}
