//! Outside text is data: one escaping function per output format, applied
//! by the renderers at the last step before the wire to every piece of text
//! that does not come from gpuops itself (labels, annotations, PagerDuty
//! names, chat input echoed back, step output).
//!
//! - [`line`]: a value that sits in one line (a label, an alert name, who
//!   acknowledged): control characters, CR and LF become a space, and a
//!   value longer than [`MAX_VALUE_CHARS`] is cut with `…`.
//! - [`slack`] (mrkdwn: `&`, `<`, `>`), [`discord`] (Markdown and mentions),
//!   [`markdown`] (the report's `report.md` and lines), [`html`] (email and
//!   the report's HTML), [`email_header`] (Subject), [`pagerduty`] (plain).
//!   Each keeps newlines (a description stays a paragraph) and turns any
//!   other control character into a space.
//! - [`safe_url`]: the only door for a link target from outside: `http` and
//!   `https` only, anything else (`javascript:`, `data:`, …) is shown as text.
//!
//! Mentions and links that gpuops adds itself (from configuration) are
//! written by the renderers around the escaped values, never through here.
//! A base-layer leaf: it imports nothing from the crate.

/// The longest single value shown (a 10 KB label is cut to this, with `…`).
pub const MAX_VALUE_CHARS: usize = 1024;

/// The longest URL taken as a link.
pub const MAX_URL_CHARS: usize = 2048;

/// A value for one line: every control character (CR, LF and tab included)
/// becomes a space, so one line stays one line; cut to
/// [`MAX_VALUE_CHARS`] with `…`.
pub fn line(s: &str) -> String {
    let mut out = String::with_capacity(s.len().min(MAX_VALUE_CHARS * 4));
    let cut = s.chars().nth(MAX_VALUE_CHARS).is_some();
    for (n, c) in s.chars().enumerate() {
        if cut && n + 1 == MAX_VALUE_CHARS {
            out.push('…');
            break;
        }
        out.push(if c.is_control() || is_line_break(c) {
            ' '
        } else {
            c
        });
    }
    out
}

/// Text that may span lines: CRLF and CR become LF; every other control
/// character (and Unicode line separators) becomes a space.
fn normalize(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\r' => {
                if chars.peek() == Some(&'\n') {
                    chars.next();
                }
                out.push('\n');
            }
            '\n' => out.push('\n'),
            c if c.is_control() || is_line_break(c) => out.push(' '),
            c => out.push(c),
        }
    }
    out
}

fn is_line_break(c: char) -> bool {
    matches!(c, '\u{2028}' | '\u{2029}' | '\u{85}')
}

/// Slack mrkdwn (and plain text fields): `&`, `<` and `>` as entities, so
/// no `<!channel>`, `<@U…>` or `<url|text>` can come from outside.
pub fn slack(s: &str) -> String {
    let s = normalize(s);
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            c => out.push(c),
        }
    }
    out
}

/// Discord Markdown: every Markdown character backslash-escaped (no masked
/// link `[x](url)`, header, bold or code span from outside; `\<@123>`
/// shows as text), and `@everyone` / `@here` broken by a zero-width space.
/// The messages also carry `allowed_mentions` that allow nothing.
pub fn discord(s: &str) -> String {
    let s = normalize(s);
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        if matches!(
            c,
            '\\' | '*' | '_' | '~' | '`' | '|' | '>' | '<' | '#' | '[' | ']' | '(' | ')' | ':'
        ) {
            out.push('\\');
        }
        out.push(c);
        if c == '@' {
            out.push('\u{200B}');
        }
    }
    out
}

/// Markdown (`report.md`, the report's lines): one line ([`line`]), with
/// Markdown's special characters backslash-escaped, so a value is never a
/// link, an image, a tag, emphasis or a heading.
pub fn markdown(s: &str) -> String {
    let s = line(s);
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        if matches!(
            c,
            '\\' | '*' | '_' | '`' | '[' | ']' | '<' | '>' | '~' | '|' | '#' | '!' | '&'
        ) {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// HTML content and attribute values (`&`, `<`, `>`, `"`, `'`).
pub fn html(s: &str) -> String {
    let s = normalize(s);
    let mut out = String::with_capacity(s.len() + 8);
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

/// A mail header value (Subject): one line, no CR or LF (no header
/// injection), at most 200 characters; the mail library encodes the rest.
pub fn email_header(s: &str) -> String {
    let l = line(s);
    let l = l.trim();
    if l.chars().count() <= 200 {
        return l.to_string();
    }
    let mut out: String = l.chars().take(199).collect();
    out.push('…');
    out
}

/// PagerDuty text fields: plain text, newlines kept, other control
/// characters removed (as spaces).
pub fn pagerduty(s: &str) -> String {
    normalize(s)
}

/// `url` when it may be a link: an `http` or `https` URL with a host, no
/// whitespace, control or quoting characters, at most [`MAX_URL_CHARS`].
/// Anything else (`javascript:`, `data:`, `vbscript:`, relative) is `None`:
/// show it as text.
pub fn safe_url(url: &str) -> Option<&str> {
    let u = url.trim();
    let rest = strip_prefix_ci(u, "https://").or_else(|| strip_prefix_ci(u, "http://"))?;
    let host_ok = rest
        .chars()
        .next()
        .is_some_and(|c| c.is_alphanumeric() || c == '[');
    let chars_ok = !u.chars().any(|c| {
        c.is_whitespace()
            || c.is_control()
            || matches!(c, '<' | '>' | '"' | '\'' | '`' | '\\' | '|' | '{' | '}')
    });
    (host_ok && chars_ok && u.chars().count() <= MAX_URL_CHARS).then_some(u)
}

fn strip_prefix_ci<'a>(s: &'a str, prefix: &str) -> Option<&'a str> {
    let head = s.get(..prefix.len())?;
    head.eq_ignore_ascii_case(prefix)
        .then(|| &s[prefix.len()..])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_line_stays_one_line_and_a_huge_value_is_cut() {
        assert_eq!(line("a\r\nb\tc\u{7}d\u{2028}e"), "a  b c d e");
        let big = "x".repeat(10_000);
        let l = line(&big);
        assert_eq!(l.chars().count(), MAX_VALUE_CHARS);
        assert!(l.ends_with('…'));
        assert_eq!(
            line(&"y".repeat(MAX_VALUE_CHARS)),
            "y".repeat(MAX_VALUE_CHARS)
        );
    }

    #[test]
    fn each_format_neutralises_its_own_syntax() {
        assert_eq!(
            slack("<!channel> & <@U0ADMIN> <https://e|x>"),
            "&lt;!channel&gt; &amp; &lt;@U0ADMIN&gt; &lt;https://e|x&gt;"
        );
        assert_eq!(
            discord("@everyone [x](https://e) <@123> # h"),
            "@\u{200B}everyone \\[x\\]\\(https\\://e\\) \\<@\u{200B}123\\> \\# h"
        );
        assert_eq!(
            markdown("[a](u) <img src=x onerror=y> **b**\r\nc"),
            r"\[a\](u) \<img src=x onerror=y\> \*\*b\*\*  c"
        );
        assert_eq!(html("<a href=\"x\">'"), "&lt;a href=&quot;x&quot;&gt;&#39;");
        assert_eq!(email_header("Subject\r\nBcc: x@y"), "Subject  Bcc: x@y");
        assert_eq!(pagerduty("a\r\nb\u{1b}[31m"), "a\nb [31m");
    }

    #[test]
    fn only_http_and_https_urls_are_links() {
        assert_eq!(safe_url(" https://wiki/x "), Some("https://wiki/x"));
        assert_eq!(
            safe_url("HTTP://prom:9090/g?x=1"),
            Some("HTTP://prom:9090/g?x=1")
        );
        for bad in [
            "javascript:alert(document.cookie)",
            "JavaScript:alert(1)",
            "data:text/html,<script>",
            "vbscript:msgbox",
            "/relative",
            "https://",
            "https://a b",
            "https://x\"onmouseover=\"y",
            "http://x/<script>",
        ] {
            assert_eq!(safe_url(bad), None, "{bad}");
        }
    }
}
