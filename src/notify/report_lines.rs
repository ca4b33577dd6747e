//! The lines of a health report (`message::ReportMessage`): Markdown with
//! `[text](url)` links, parsed once here and written out in each platform's
//! syntax (Slack mrkdwn `<url|text>`, Discord's own Markdown with the URL's
//! parentheses encoded, plain `text` without the URL), and fitted into a
//! platform's limits without ever cutting a link in half: a line that is
//! too long loses its links first, then its tail; lines that do not fit are
//! counted in a last `… N more` line. No wire format lives here.

use crate::notify::truncate_chars;

/// A piece of a report line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Span<'a> {
    Text(&'a str),
    Link { text: &'a str, url: &'a str },
}

/// Splits `line` into text and `[text](url)` links. The lines are the
/// report's own Markdown, in which every outside value is escaped
/// (`crate::escape::markdown`): a backslash-escaped `[`, `]` or `\\` is
/// text, so only the links gpuops wrote are links. Only `http(s)://`
/// (`crate::escape::safe_url`) and `mailto:` targets are links; anything
/// else stays text. Parentheses in the URL are balanced (PromQL in a graph
/// link: `rate(x[5m])`).
pub fn spans(line: &str) -> Vec<Span<'_>> {
    let mut out = Vec::new();
    let mut text_start = 0usize;
    let mut pos = 0usize;
    let bytes = line.as_bytes();
    while pos < bytes.len() {
        match bytes[pos] {
            b'\\' => pos += 2,
            b'[' => match parse_link(&line[pos..]) {
                Some((text, url, len)) => {
                    if pos > text_start {
                        out.push(Span::Text(&line[text_start..pos]));
                    }
                    out.push(Span::Link { text, url });
                    pos += len;
                    text_start = pos;
                }
                None => pos += 1,
            },
            _ => pos += 1,
        }
    }
    if text_start < line.len() {
        out.push(Span::Text(&line[text_start..]));
    }
    out
}

/// `[text](url)` at the start of `s`: `(text, url, bytes consumed)`. The
/// text ends at the first `]` that is not escaped; it holds no unescaped
/// `[` and no newline.
fn parse_link(s: &str) -> Option<(&str, &str, usize)> {
    let bytes = s.as_bytes();
    let mut i = 1usize;
    let close = loop {
        match bytes.get(i)? {
            b'\\' => i += 2,
            b'[' | b'\n' => return None,
            b']' => break i,
            _ => i += 1,
        }
    };
    if bytes.get(close + 1) != Some(&b'(') {
        return None;
    }
    let text = s.get(1..close)?;
    let url_start = close + 2;
    let mut depth = 0usize;
    for (i, c) in s[url_start..].char_indices() {
        match c {
            '(' => depth += 1,
            ')' if depth == 0 => {
                let url = &s[url_start..url_start + i];
                let ok = crate::escape::safe_url(url) == Some(url)
                    || (url.starts_with("mailto:") && !url.contains(['<', '>', '"', '\'']));
                if !ok || url.contains(char::is_whitespace) {
                    return None;
                }
                return Some((text, url, url_start + i + 1));
            }
            ')' => depth -= 1,
            c if c.is_whitespace() => return None,
            _ => {}
        }
    }
    None
}

/// The line without its URLs (link texts kept).
pub fn plain(line: &str) -> String {
    spans(line)
        .into_iter()
        .map(|s| match s {
            Span::Text(t) => t,
            Span::Link { text, .. } => text,
        })
        .collect()
}

/// The line as plain text (the Slack fallback `text`, logs): link texts
/// without URLs, no `**` and no backslash escapes.
pub fn plain_text(line: &str) -> String {
    spans(line)
        .into_iter()
        .map(|s| match s {
            Span::Text(t) => unescape(&t.replace("**", "")),
            Span::Link { text, .. } => unescape(text),
        })
        .collect()
}

/// Drops Markdown's backslash before ASCII punctuation (`node\_1` → `node_1`).
fn unescape(t: &str) -> String {
    let mut out = String::with_capacity(t.len());
    let mut chars = t.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\\' {
            if let Some(&n) = chars.peek() {
                if n.is_ascii_punctuation() {
                    out.push(n);
                    chars.next();
                    continue;
                }
            }
        }
        out.push(c);
    }
    out
}

/// Renders `line` with `render` and keeps it within `max` characters:
/// first as rendered, then without links (`render` of the plain line),
/// then cut with `…`.
pub fn fit_line(line: &str, max: usize, render: &dyn Fn(&str) -> String) -> String {
    let full = render(line);
    if full.chars().count() <= max {
        return full;
    }
    let bare = render(&plain(line));
    truncate_chars(&bare, max)
}

/// Joins the rendered `lines` (newline-separated) into at most `max`
/// characters. Lines that do not fit are counted in a last line
/// `… N more` (`what` names them: "lines", "sections").
pub fn fit_lines(
    lines: &[String],
    max: usize,
    what: &str,
    render: &dyn Fn(&str) -> String,
) -> String {
    let mut out = String::new();
    let mut used = 0usize;
    for (i, line) in lines.iter().enumerate() {
        let left_after = lines.len() - i - 1;
        let reserve = if left_after > 0 {
            more(left_after, what).len() + 1
        } else {
            0
        };
        let sep = usize::from(i > 0);
        let room = max.saturating_sub(used + sep + reserve);
        // A line gets at least what it needs, up to the room left; one that
        // would have to be cut below 40 characters is left to the count.
        let rendered = fit_line(line, room.min(max), render);
        let n = rendered.chars().count();
        let cut = rendered.ends_with('…') && n < 40 && render(line).chars().count() > n;
        if n > room || cut || (n == 0 && !line.is_empty()) {
            let tail = more(lines.len() - i, what);
            if used + sep + tail.chars().count() <= max {
                if i > 0 {
                    out.push('\n');
                }
                out.push_str(&tail);
            }
            return out;
        }
        if i > 0 {
            out.push('\n');
        }
        out.push_str(&rendered);
        used += sep + n;
    }
    out
}

/// `… 3 more lines`.
pub fn more(n: usize, what: &str) -> String {
    format!("… {n} more {what}")
}

/// Report Markdown to the bare text Slack shows: `**bold**` becomes Slack's
/// `*bold*`, and backslash escapes (`node\_1`, which Discord honours and
/// Slack would show) lose their backslash (an escaped `\*\*` stays text).
fn slack_text(t: &str) -> String {
    unescape(&t.replace("**", "*"))
}

/// Slack mrkdwn: text escaped (`&`, `<`, `>`), links as `<url|text>`; a URL
/// that would break the syntax (`|`, `<`, `>`) shows as escaped text.
pub fn slack_mrkdwn(line: &str) -> String {
    let esc = |t: &str| crate::notify::slack::escape(&slack_text(t));
    spans(line)
        .into_iter()
        .map(|s| match s {
            Span::Text(t) => esc(t),
            Span::Link { text, url } => {
                if url.contains(['|', '<', '>']) {
                    format!("{} ({})", esc(text), esc(url))
                } else {
                    let text = esc(text).replace('|', "¦");
                    format!("<{}|{text}>", url.replace('&', "&amp;"))
                }
            }
        })
        .collect()
}

/// Discord Markdown: masked links kept (only gpuops's own, see [`spans`]),
/// with `(`, `)` and spaces in the URL percent-encoded so Discord's parser
/// finds the link's end; the text's escapes are Discord's too, and
/// `@everyone` / `@here` are broken by a zero-width space.
pub fn discord_markdown(line: &str) -> String {
    let no_everyone = |t: &str| {
        t.replace("@everyone", "@\u{200B}everyone")
            .replace("@here", "@\u{200B}here")
    };
    spans(line)
        .into_iter()
        .map(|s| match s {
            Span::Text(t) => no_everyone(t),
            Span::Link { text, url } => format!(
                "[{}]({})",
                no_everyone(
                    &text
                        .replace(r"\[", "")
                        .replace(r"\]", "")
                        .replace(['[', ']'], "")
                ),
                url.replace('(', "%28").replace(')', "%29")
            ),
        })
        .collect()
}

/// A chart's file name as Slack, Discord (`attachment://`) and browsers
/// take it: letters, digits and `.-_` (others become `_`), at most `max`
/// characters; `chart.png` when nothing is left.
pub fn safe_file_name(name: &str, max: usize) -> String {
    let n: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_') {
                c
            } else {
                '_'
            }
        })
        .take(max)
        .collect();
    if n.is_empty() {
        "chart.png".into()
    } else {
        n
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn report_markdown_bold_and_escapes_become_slack_mrkdwn() {
        let line = r"🔴 **XID 79** on [gpu\_node\-1 GPU 3](http://p/graph?g0.expr=x) node\_2 \*";
        assert_eq!(
            slack_mrkdwn(line),
            "🔴 *XID 79* on <http://p/graph?g0.expr=x|gpu_node-1 GPU 3> node_2 *"
        );
        assert_eq!(discord_markdown(r"**a** b\_c"), r"**a** b\_c");
    }

    #[test]
    fn links_are_parsed_with_balanced_parentheses() {
        let line = "XIDs: [3](http://prom:9090/graph?g0.expr=sum(rate(x[5m]))) on [node-1](https://g/d?a=1&b=2) [not a link](foo) [x]";
        let s = spans(line);
        assert_eq!(s[0], Span::Text("XIDs: "));
        assert_eq!(
            s[1],
            Span::Link {
                text: "3",
                url: "http://prom:9090/graph?g0.expr=sum(rate(x[5m]))"
            }
        );
        assert_eq!(
            s[3],
            Span::Link {
                text: "node-1",
                url: "https://g/d?a=1&b=2"
            }
        );
        assert_eq!(s[4], Span::Text(" [not a link](foo) [x]"));
        assert_eq!(plain(line), "XIDs: 3 on node-1 [not a link](foo) [x]");
    }

    #[test]
    fn slack_links_and_escapes() {
        assert_eq!(
            slack_mrkdwn("a <b> & [n&1](https://x/?a=1&b=2)"),
            "a &lt;b&gt; &amp; <https://x/?a=1&amp;b=2|n&amp;1>"
        );
        // A URL that could break the syntax is no link: it stays text.
        assert_eq!(slack_mrkdwn("[t](https://x/a|b)"), "[t](https://x/a|b)");
    }

    #[test]
    fn discord_links_encode_parentheses() {
        assert_eq!(
            discord_markdown("[3](http://p/graph?e=sum(x))"),
            "[3](http://p/graph?e=sum%28x%29)"
        );
    }

    #[test]
    fn a_long_line_loses_its_link_before_its_text() {
        let line = format!("[node-1 has 3 XIDs](https://p/{})", "x".repeat(500));
        assert_eq!(fit_line(&line, 100, &slack_mrkdwn), "node-1 has 3 XIDs");
        assert_eq!(fit_line("abcdef", 4, &slack_mrkdwn), "abc…");
    }

    #[test]
    fn lines_that_do_not_fit_are_counted() {
        let lines: Vec<String> = (0..100).map(|i| format!("line number {i:03}")).collect();
        let out = fit_lines(&lines, 200, "lines", &|s: &str| s.to_string());
        assert!(out.chars().count() <= 200, "{out}");
        let kept = out.lines().filter(|l| l.starts_with("line")).count();
        assert_eq!(
            out.lines().last().unwrap(),
            format!("… {} more lines", 100 - kept)
        );
        assert_eq!(
            fit_lines(&lines[..2], 200, "lines", &|s: &str| s.to_string()),
            "line number 000\nline number 001"
        );
        assert_eq!(fit_lines(&[], 200, "lines", &|s: &str| s.to_string()), "");
    }
}
