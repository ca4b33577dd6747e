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

/// Escapes Markdown's special characters in a value from outside.
pub fn md_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if matches!(
            c,
            '\\' | '*' | '_' | '`' | '[' | ']' | '<' | '>' | '~' | '|' | '#'
        ) {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// Escapes text for HTML content and attribute values.
pub fn html_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// A line as Markdown: our own text as written (it may hold `code`
/// spans), bold and link texts escaped, URLs percent-encoded already.
pub fn line_markdown(line: &Line) -> String {
    line.0
        .iter()
        .map(|p| match p {
            Part::Text(t) => t.clone(),
            Part::Value(v) => md_escape(v),
            Part::Bold(b) => format!("**{}**", md_escape(b)),
            Part::Link { text, url } => format!("[{}]({url})", md_escape(text)),
        })
        .collect()
}

/// A line as plain text (no markup, no URLs).
pub fn line_text(line: &Line) -> String {
    line.0
        .iter()
        .map(|p| match p {
            Part::Text(t) => t.replace('`', ""),
            Part::Value(v) => v.clone(),
            Part::Bold(b) => b.clone(),
            Part::Link { text, .. } => text.clone(),
        })
        .collect()
}

/// A line as HTML; our text's `code` spans become `<code>`.
pub fn line_html(line: &Line) -> String {
    line.0
        .iter()
        .map(|p| match p {
            Part::Text(t) => {
                let mut out = String::new();
                for (i, piece) in t.split('`').enumerate() {
                    if i % 2 == 1 {
                        out.push_str(&format!("<code>{}</code>", html_escape(piece)));
                    } else {
                        out.push_str(&html_escape(piece));
                    }
                }
                out
            }
            Part::Value(v) => html_escape(v),
            Part::Bold(b) => format!("<strong>{}</strong>", html_escape(b)),
            Part::Link { text, url } => {
                format!("<a href=\"{}\">{}</a>", html_escape(url), html_escape(text))
            }
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
        out.push(
            Line::new()
                .text("⚠ Could not compute ")
                .text(md_escape(why)),
        );
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
