//! A computed report as words: the title (period and time zone), the
//! summary (most important first), Markdown (`report.md` and the lines of
//! `Message::Report`), plain text and self-contained HTML (charts as
//! `cid:` images for email, or by file name for the preview). Values that
//! come from outside (node names, alert names, mount points) are escaped
//! for Markdown and HTML here; this module does no I/O.

use chrono::{DateTime, Utc};

use crate::message::{Chart, ReportMessage, ReportSection};
use crate::report::{Computed, Figures, Finding, Inputs, Level, Line, Part, Section};

/// Findings the summary lists before "and N more".
const SUMMARY_FINDINGS: usize = 5;

/// A number with at most one decimal (`3`, `2.5`, `43.2`).
pub fn fmt_num(v: f64) -> String {
    if !v.is_finite() {
        return if v.is_nan() {
            "NaN".into()
        } else if v > 0.0 {
            "∞".into()
        } else {
            "-∞".into()
        };
    }
    let s = format!("{v:.1}");
    s.strip_suffix(".0").map(str::to_string).unwrap_or(s)
}

/// Seconds as `45s`, `12m`, `1h 30m`, `2d 3h`.
pub fn fmt_duration(secs: f64) -> String {
    if !secs.is_finite() || secs < 0.0 {
        return fmt_num(secs);
    }
    let s = secs.round() as u64;
    match s {
        0..=59 => format!("{s}s"),
        60..=3599 => format!("{}m", s / 60),
        3600..=86_399 => match (s % 3600) / 60 {
            0 => format!("{}h", s / 3600),
            m => format!("{}h {m}m", s / 3600),
        },
        _ => match (s % 86_400) / 3600 {
            0 => format!("{}d", s / 86_400),
            h => format!("{}d {h}h", s / 86_400),
        },
    }
}

/// Bytes in binary units (`512 B`, `1.5 GiB`).
pub fn fmt_bytes(v: f64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut x = v;
    let mut i = 0;
    while x.abs() >= 1024.0 && i + 1 < UNITS.len() {
        x /= 1024.0;
        i += 1;
    }
    format!("{} {}", fmt_num(x), UNITS[i])
}

/// A Unix time in the report's time zone (`27 Nov 20:14`).
pub fn fmt_local(tz: chrono_tz::Tz, unix: f64) -> String {
    DateTime::from_timestamp(unix as i64, 0)
        .map(|t| t.with_timezone(&tz).format("%-d %b %H:%M").to_string())
        .unwrap_or_else(|| "?".to_string())
}

/// Escapes Markdown's special characters in a value from outside (one
/// line): [`crate::escape::markdown`].
pub fn md_escape(s: &str) -> String {
    crate::escape::markdown(s)
}

/// Escapes text for HTML content and attribute values:
/// [`crate::escape::html`].
pub fn html_escape(s: &str) -> String {
    crate::escape::html(s)
}

/// Our text's pieces: `(is_code, piece)`, split at backticks. A piece may
/// still carry an outside value (a node or alert name formatted into the
/// text), so every renderer escapes both kinds for its format.
fn text_pieces(t: &str) -> impl Iterator<Item = (bool, &str)> {
    t.split('`').enumerate().map(|(i, p)| (i % 2 == 1, p))
}

/// A line as Markdown: our text's `code` spans kept (their content on one
/// line), everything else escaped, link texts escaped, link URLs only
/// `http(s)` ones (already percent-encoded), else the text alone.
pub fn line_markdown(line: &Line) -> String {
    line.0
        .iter()
        .map(|p| match p {
            Part::Text(t) => text_pieces(t)
                .map(|(code, piece)| {
                    if code {
                        format!("`{}`", crate::escape::line(piece))
                    } else {
                        md_escape(piece)
                    }
                })
                .collect(),
            Part::Value(v) => md_escape(v),
            Part::Bold(b) => format!("**{}**", md_escape(b)),
            Part::Link { text, url } => match crate::escape::safe_url(url) {
                Some(u) => format!("[{}]({u})", md_escape(text)),
                None => md_escape(text),
            },
        })
        .collect()
}

/// A line as plain text (no markup, no URLs), one line.
pub fn line_text(line: &Line) -> String {
    line.0
        .iter()
        .map(|p| match p {
            Part::Text(t) => crate::escape::line(&t.replace('`', "")),
            Part::Value(v) => crate::escape::line(v),
            Part::Bold(b) => crate::escape::line(b),
            Part::Link { text, .. } => crate::escape::line(text),
        })
        .collect()
}

/// A line as HTML; our text's `code` spans become `<code>`; a link only
/// to an `http(s)` URL.
pub fn line_html(line: &Line) -> String {
    let h = |s: &str| html_escape(&crate::escape::line(s));
    line.0
        .iter()
        .map(|p| match p {
            Part::Text(t) => text_pieces(t)
                .map(|(code, piece)| {
                    if code {
                        format!("<code>{}</code>", h(piece))
                    } else {
                        h(piece)
                    }
                })
                .collect(),
            Part::Value(v) => h(v),
            Part::Bold(b) => format!("<strong>{}</strong>", h(b)),
            Part::Link { text, url } => match crate::escape::safe_url(url) {
                Some(u) => format!("<a href=\"{}\">{}</a>", html_escape(u), h(text)),
                None => h(text),
            },
        })
        .collect()
}

/// A finding's severity: an emoji and its word (an emoji alone renders as
/// an empty box where no emoji font is installed).
pub fn marker(level: Level) -> &'static str {
    match level {
        Level::Critical => "🔴 critical: ",
        Level::Warning => "🟠 warning: ",
    }
}

/// The first summary line when a section could not be computed: the
/// report says it is blind before anything else, never "no findings".
/// `None` when every section was computed.
pub fn incomplete_headline(sections: &[Section], figures: &Figures) -> Option<Line> {
    let not: Vec<&str> = sections
        .iter()
        .filter(|s| s.computed() == Computed::Not)
        .map(|s| s.kind.heading())
        .collect();
    let partly: Vec<&str> = sections
        .iter()
        .filter(|s| s.computed() == Computed::Partly)
        .map(|s| s.kind.heading())
        .collect();
    if not.is_empty() && partly.is_empty() {
        return None;
    }
    let total = sections.len();
    let blind = not.len() == total;
    let mut line = Line::new().bold(if blind {
        "⚠ not computed"
    } else {
        "⚠ incomplete"
    });
    line = line.text(": ");
    if let Some(why) = &figures.prometheus_down {
        line = line.value(why.clone()).text(": ");
    }
    let mut what = Vec::new();
    if blind {
        what.push(format!(
            "none of the {total} section{} could be computed ({}), so this report cannot tell whether anything needs attention",
            if total == 1 { "" } else { "s" },
            not.join(", ")
        ));
    } else {
        if !not.is_empty() {
            what.push(format!(
                "{} of {total} section{} not computed ({})",
                not.len(),
                if total == 1 { "" } else { "s" },
                not.join(", ")
            ));
        }
        if !partly.is_empty() {
            what.push(format!(
                "{} of {total} section{} only partly computed ({})",
                partly.len(),
                if total == 1 { "" } else { "s" },
                partly.join(", ")
            ));
        }
    }
    Some(line.text(format!(
        "{}: see each section for which query failed and why",
        what.join("; ")
    )))
}

/// The title: `Daily health report: 27 Nov 08:00 – 28 Nov 08:00 (Europe/Berlin)`.
pub fn title(inputs: &Inputs<'_>) -> String {
    let cfg = inputs.config;
    let end = inputs.at.timestamp() as f64;
    let start = end - cfg.period.as_secs_f64();
    let mut name = cfg.name.replace(['-', '_'], " ");
    if let Some(first) = name.get(..1) {
        name = format!("{}{}", first.to_uppercase(), name.get(1..).unwrap_or(""));
    }
    format!(
        "{name} health report: {} – {} ({}){}",
        fmt_local(cfg.timezone, start),
        fmt_local(cfg.timezone, end),
        cfg.timezone.name(),
        if inputs.late { " [late]" } else { "" }
    )
}

/// The summary lines, most important first: what could not be computed
/// (before any count of findings), then the findings.
pub fn summary(inputs: &Inputs<'_>, sections: &[Section], figures: &Figures) -> Vec<Line> {
    let mut all: Vec<&Finding> = sections.iter().flat_map(|s| s.findings.iter()).collect();
    all.sort_by_key(|f| f.level);
    let critical = all.iter().filter(|f| f.level == Level::Critical).count();
    let warnings = all.len() - critical;
    let mut out = Vec::new();
    let headline = incomplete_headline(sections, figures);
    let incomplete = headline.is_some();
    let blind = sections.iter().all(|s| s.computed() == Computed::Not);
    out.extend(headline);
    if all.is_empty() {
        if !incomplete {
            out.push(
                Line::new()
                    .bold("No findings")
                    .text(": nothing needs attention."),
            );
        } else if !blind {
            out.push(Line::new().text(
                "0 findings in what could be computed: that is not an all-clear for the rest.",
            ));
        }
    } else {
        out.push(
            Line::new()
                .bold(format!(
                    "{} finding{}",
                    all.len(),
                    if all.len() == 1 { "" } else { "s" }
                ))
                .text(format!(
                    " ({critical} critical, {warnings} warning{}){}",
                    if warnings == 1 { "" } else { "s" },
                    if incomplete {
                        " in what could be computed"
                    } else {
                        ""
                    }
                )),
        );
    }
    for f in all.iter().take(SUMMARY_FINDINGS) {
        let mut line = Line::new().text(marker(f.level));
        line.0.extend(f.line.0.iter().cloned());
        out.push(line);
    }
    if all.len() > SUMMARY_FINDINGS {
        out.push(Line::new().text(format!("… and {} more below", all.len() - SUMMARY_FINDINGS)));
    }
    if inputs.late {
        out.push(Line::new().text(format!(
            "Sent late: the bot was not running at {}.",
            fmt_local(inputs.config.timezone, inputs.at.timestamp() as f64)
        )));
    }
    out
}

/// A section's lines: findings first, then facts, then what failed.
pub fn section_lines(s: &Section) -> Vec<Line> {
    let mut out: Vec<Line> = Vec::new();
    for f in &s.findings {
        let mut line = Line::new().text(marker(f.level));
        line.0.extend(f.line.0.iter().cloned());
        out.push(line);
    }
    out.extend(s.lines.iter().cloned());
    for why in &s.failures {
        out.push(Line::new().text("⚠ Could not compute ").value(why.clone()));
    }
    out
}

/// Every rendering of one report.
pub struct Rendered {
    pub message: ReportMessage,
    pub markdown: String,
    pub preview_html: String,
}

pub fn render(
    inputs: &Inputs<'_>,
    sections: &[Section],
    figures: &Figures,
    charts: Vec<Chart>,
) -> Rendered {
    let title = title(inputs);
    let summary = summary(inputs, sections, figures);
    let body: Vec<(&str, Vec<Line>)> = sections
        .iter()
        .map(|s| (s.kind.heading(), section_lines(s)))
        .collect();
    let caption = format!(
        "Generated by gpuops at {} UTC.",
        Utc::now().format("%Y-%m-%d %H:%M")
    );

    let mut md = format!("# {}\n\n", md_escape(&title));
    for l in &summary {
        md.push_str(&format!("- {}\n", line_markdown(l)));
    }
    for (heading, lines) in &body {
        md.push_str(&format!("\n## {heading}\n\n"));
        for l in lines {
            md.push_str(&format!("- {}\n", line_markdown(l)));
        }
    }
    if !charts.is_empty() {
        md.push_str("\n## Charts\n\n");
        for c in &charts {
            md.push_str(&format!("![{}]({})\n\n", md_escape(&c.title), c.file_name));
        }
    }
    md.push_str(&format!("\n_{caption}_\n"));

    let mut text = format!("{title}\n\n");
    for l in &summary {
        text.push_str(&format!("* {}\n", line_text(l)));
    }
    for (heading, lines) in &body {
        text.push_str(&format!(
            "\n{heading}\n{}\n",
            "-".repeat(heading.chars().count())
        ));
        for l in lines {
            text.push_str(&format!("* {}\n", line_text(l)));
        }
    }
    if !charts.is_empty() {
        let names: Vec<&str> = charts.iter().map(|c| c.file_name.as_str()).collect();
        text.push_str(&format!("\nCharts attached: {}\n", names.join(", ")));
    }

    let html = |src: &dyn Fn(&Chart) -> String| -> String {
        let mut h = format!(
            "<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>{t}</title></head>\n<body style=\"font-family: -apple-system, 'Segoe UI', Helvetica, Arial, sans-serif; color: #1d1d1f; max-width: 860px; margin: 0 auto; padding: 16px; line-height: 1.45\">\n<h1 style=\"font-size: 20px\">{t}</h1>\n<ul>\n",
            t = html_escape(&title)
        );
        for l in &summary {
            h.push_str(&format!("<li>{}</li>\n", line_html(l)));
        }
        h.push_str("</ul>\n");
        for (heading, lines) in &body {
            h.push_str(&format!(
                "<h2 style=\"font-size: 16px; border-bottom: 1px solid #ddd\">{}</h2>\n<ul>\n",
                html_escape(heading)
            ));
            for l in lines {
                h.push_str(&format!("<li>{}</li>\n", line_html(l)));
            }
            h.push_str("</ul>\n");
        }
        for c in &charts {
            h.push_str(&format!(
                "<p><img src=\"{}\" alt=\"{}\" width=\"800\" style=\"max-width: 100%\"></p>\n",
                html_escape(&src(c)),
                html_escape(&c.title)
            ));
        }
        h.push_str(&format!(
            "<p style=\"color: #888; font-size: 12px\">{}</p>\n</body></html>\n",
            html_escape(&caption)
        ));
        h
    };
    let email_html = html(&|c: &Chart| format!("cid:{}", c.file_name));
    let preview_html = html(&|c: &Chart| c.file_name.clone());

    let message = ReportMessage {
        name: inputs.config.name.clone(),
        title,
        summary: summary.iter().map(line_markdown).collect(),
        sections: body
            .iter()
            .map(|(heading, lines)| ReportSection {
                heading: heading.to_string(),
                lines: lines.iter().map(line_markdown).collect(),
            })
            .collect(),
        text,
        html: email_html,
        charts,
        late: inputs.late,
    };
    Rendered {
        message,
        markdown: md,
        preview_html,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::Section;

    #[test]
    fn numbers_durations_bytes() {
        assert_eq!(fmt_num(3.0), "3");
        assert_eq!(fmt_num(2.5), "2.5");
        assert_eq!(fmt_num(43.26), "43.3");
        assert_eq!(fmt_duration(45.0), "45s");
        assert_eq!(fmt_duration(600.0), "10m");
        assert_eq!(fmt_duration(5400.0), "1h 30m");
        assert_eq!(fmt_duration(3.0 * 86_400.0 + 7200.0), "3d 2h");
        assert_eq!(fmt_bytes(1536.0 * 1024.0 * 1024.0), "1.5 GiB");
        assert_eq!(fmt_bytes(512.0), "512 B");
    }

    #[test]
    fn outside_values_are_escaped_for_markdown_and_html() {
        let line = Line::new()
            .text("node ")
            .bold("gpu_node*1")
            .text(" `/data` ")
            .link("3 [x]", "http://p/graph?g0.expr=a%20b");
        assert_eq!(
            line_markdown(&line),
            r"node **gpu\_node\*1** `/data` [3 \[x\]](http://p/graph?g0.expr=a%20b)"
        );
        let evil = Line::new()
            .bold("<script>alert('x')</script>")
            .text("a & `b<c>`");
        assert_eq!(
            line_html(&evil),
            "<strong>&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt;</strong>a &amp; <code>b&lt;c&gt;</code>"
        );
        assert_eq!(line_text(&line), "node gpu_node*1 /data 3 [x]");
    }

    /// Finding 2 (issue 20): an alert name `[Reset your SSO
    /// password](https://evil.example/login)` became a link in the report
    /// (Slack `<url|text>`, a Discord masked link, Markdown, HTML).
    #[test]
    fn report_phishing_link_in_an_alert_name_is_text() {
        use crate::notify::report_lines::{discord_markdown, slack_mrkdwn};
        let name = "[Reset your SSO password](https://evil.example/login)";
        for line in [
            Line::new().text(format!(
                "Noisiest alerts: {name} (3 notifications, 1 groups)"
            )),
            Line::new().text("Still firing: ").bold(name),
            Line::new().value(name),
        ] {
            let md = line_markdown(&line);
            assert!(!md.contains("[Reset your SSO password]("), "{md}");
            let slack = slack_mrkdwn(&md);
            assert!(!slack.contains("<https://evil"), "{slack}");
            assert!(slack.contains("[Reset your SSO password](https://evil.example/login)"));
            let discord = discord_markdown(&md);
            assert!(discord.contains(r"\](https://evil"), "{discord}");
            assert!(!discord.replace(r"\](", "").contains("]("), "{discord}");
            let html = line_html(&line);
            assert!(!html.contains("<a "), "{html}");
        }
        // gpuops's own links stay links.
        let ours = Line::new().link("3", "https://prom.example/graph?g0.expr=up");
        assert_eq!(
            slack_mrkdwn(&line_markdown(&ours)),
            "<https://prom.example/graph?g0.expr=up|3>"
        );
        let js = Line::new().link("3", "javascript:alert(1)");
        assert_eq!(line_markdown(&js), "3");
        assert_eq!(line_html(&js), "3");
    }

    /// Finding 2 (issue 20): `report.md` carried a raw `<img src=x
    /// onerror=…>`, and CRLF in a label split its lines.
    #[test]
    fn report_markdown_has_no_tag_and_crlf_splits_no_line() {
        let evil = "<img src=x onerror=alert(1)>\r\n## heading\r\n- item";
        for line in [
            Line::new().text(format!(
                "Noisiest alerts: {evil} (1 notifications, 1 groups)"
            )),
            Line::new().bold(evil).text(" `").text(evil).text("`"),
            Line::new().value(evil),
        ] {
            let md = line_markdown(&line);
            assert!(!md.replace(r"\<", "").contains("<img"), "{md}");
            assert!(!md.contains(['\r', '\n']), "{md:?}");
            let html = line_html(&line);
            assert!(!html.contains("<img"), "{html}");
            assert!(!line_text(&line).contains(['\r', '\n']));
        }
    }

    /// Issue 21, item 7: Markdown escapes (`NODES\_NOW`) showed in the HTML.
    #[test]
    fn report_html_shows_no_markdown_escapes() {
        let mut s = Section::new(crate::config::reports::SectionKind::Fleet);
        s.failures
            .push("NODES_NOW: Prometheus unreachable (connection refused)".into());
        let lines = section_lines(&s);
        let html: String = lines.iter().map(line_html).collect();
        assert!(html.contains("NODES_NOW"), "{html}");
        assert!(!html.contains('\\'), "{html}");
        let md: String = lines.iter().map(line_markdown).collect();
        assert!(md.contains(r"NODES\_NOW"), "{md}");
        let text: String = lines.iter().map(line_text).collect();
        assert!(text.contains("NODES_NOW") && !text.contains('\\'), "{text}");
    }

    #[test]
    fn severity_has_a_word_beside_the_emoji() {
        use crate::config::reports::SectionKind;
        let mut s = Section::new(SectionKind::Fleet);
        for level in [Level::Critical, Level::Warning] {
            s.findings.push(Finding {
                level,
                line: Line::new().bold("gpu-node-3").text(" lost a GPU"),
            });
        }
        let lines: Vec<String> = section_lines(&s).iter().map(line_text).collect();
        assert_eq!(
            lines,
            vec![
                "🔴 critical: gpu-node-3 lost a GPU".to_string(),
                "🟠 warning: gpu-node-3 lost a GPU".to_string()
            ]
        );
    }

    #[test]
    fn a_section_with_one_failed_query_is_partly_computed_not_blind() {
        use crate::config::reports::SectionKind;
        let mut gpu = Section::new(SectionKind::GpuHealth);
        gpu.answered = 6;
        gpu.failures
            .push("throttling (THROTTLE_SECONDS): timeout".into());
        let mut host = Section::new(SectionKind::Host);
        host.failures.push("OOM kills (OOM_KILLS): timeout".into());
        let fleet = Section::new(SectionKind::Fleet);
        assert_eq!(gpu.computed(), Computed::Partly);
        assert_eq!(host.computed(), Computed::Not);
        assert_eq!(fleet.computed(), Computed::Fully);
        let figures = Figures::default();
        let line = incomplete_headline(&[fleet.clone(), gpu, host], &figures).unwrap();
        assert_eq!(
            line_text(&line),
            "⚠ incomplete: 1 of 3 sections not computed (Host); 1 of 3 sections only partly computed (GPU health): see each section for which query failed and why"
        );
        assert_eq!(incomplete_headline(&[fleet], &figures), None);
    }
}
