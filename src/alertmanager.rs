//! A small client for AlertManager's v2 API: create a silence
//! (`POST /api/v2/silences`), expire one (`DELETE /api/v2/silence/{id}`) and
//! list alerts (`GET /api/v2/alerts`), plus the parser for the matcher
//! syntax people type in chat (`alertname=GpuDown,instance=~"node1.*"`).
//!
//! Every call has a deadline; errors carry AlertManager's own message and
//! never a URL's credentials. This module knows nothing about chat, roles or
//! the store.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Deadline of one AlertManager call.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// Shortest and longest silence accepted from chat.
pub const MIN_SILENCE: Duration = Duration::from_secs(60);
pub const MAX_SILENCE: Duration = Duration::from_secs(90 * 86_400);

/// One label matcher, as AlertManager's v2 API takes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Matcher {
    pub name: String,
    pub value: String,
    pub is_regex: bool,
    pub is_equal: bool,
}

/// A silence to create.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct NewSilence {
    pub matchers: Vec<Matcher>,
    pub starts_at: String,
    pub ends_at: String,
    pub created_by: String,
    pub comment: String,
}

/// An alert as `GET /api/v2/alerts` lists it (the fields we show).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ActiveAlert {
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default)]
    pub annotations: BTreeMap<String, String>,
    #[serde(default)]
    pub starts_at: String,
    #[serde(default)]
    pub fingerprint: String,
    #[serde(default)]
    pub status: AlertStatus,
}

#[derive(Debug, Clone, PartialEq, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AlertStatus {
    #[serde(default)]
    pub state: String,
    #[serde(default)]
    pub silenced_by: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    #[error("AlertManager at {url} cannot be reached: {reason}")]
    Unreachable { url: String, reason: String },
    #[error("AlertManager refused ({status}): {message}")]
    Refused { status: u16, message: String },
    #[error("AlertManager sent an unreadable answer: {0}")]
    Unreadable(String),
}

/// Talks to one AlertManager.
#[derive(Clone)]
pub struct Client {
    base: String,
    http: reqwest::Client,
}

impl Client {
    /// `base` like `http://127.0.0.1:9093` (no trailing slash needed).
    pub fn new(base: &str) -> Client {
        Client {
            base: base.trim_end_matches('/').to_string(),
            http: reqwest::Client::builder()
                .connect_timeout(Duration::from_secs(3))
                .timeout(CALL_TIMEOUT)
                .redirect(reqwest::redirect::Policy::none())
                .build()
                .unwrap_or_else(|_| reqwest::Client::new()),
        }
    }

    /// Creates a silence; returns its id.
    pub async fn create_silence(&self, silence: &NewSilence) -> Result<String, Error> {
        #[derive(Deserialize)]
        #[serde(rename_all = "camelCase")]
        struct Created {
            #[serde(rename = "silenceID")]
            silence_id: String,
        }
        let resp = self
            .http
            .post(format!("{}/api/v2/silences", self.base))
            .json(silence)
            .send()
            .await
            .map_err(|e| self.unreachable(e))?;
        let body = self.checked(resp).await?;
        serde_json::from_str::<Created>(&body)
            .map(|c| c.silence_id)
            .map_err(|e| Error::Unreadable(format!("{e}: {}", clip(&body))))
    }

    /// Expires a silence.
    pub async fn delete_silence(&self, id: &str) -> Result<(), Error> {
        let resp = self
            .http
            .delete(format!("{}/api/v2/silence/{id}", self.base))
            .send()
            .await
            .map_err(|e| self.unreachable(e))?;
        self.checked(resp).await.map(|_| ())
    }

    /// Alerts AlertManager holds now (active, silenced and inhibited).
    pub async fn alerts(&self) -> Result<Vec<ActiveAlert>, Error> {
        let resp = self
            .http
            .get(format!("{}/api/v2/alerts", self.base))
            .send()
            .await
            .map_err(|e| self.unreachable(e))?;
        let body = self.checked(resp).await?;
        serde_json::from_str(&body).map_err(|e| Error::Unreadable(format!("{e}")))
    }

    fn unreachable(&self, e: reqwest::Error) -> Error {
        Error::Unreachable {
            url: crate::telemetry::redact(&self.base),
            reason: crate::telemetry::redact(&without_url(&e)),
        }
    }

    async fn checked(&self, resp: reqwest::Response) -> Result<String, Error> {
        let status = resp.status();
        let body = resp.text().await.map_err(|e| self.unreachable(e))?;
        if status.is_success() {
            return Ok(body);
        }
        // AlertManager answers errors as a JSON string or plain text.
        let message = serde_json::from_str::<String>(&body).unwrap_or_else(|_| body.clone());
        Err(Error::Refused {
            status: status.as_u16(),
            message: clip(message.trim()),
        })
    }
}

/// A parse error in a matcher list, fit to show the user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MatcherError(pub String);

impl fmt::Display for MatcherError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for MatcherError {}

/// Parses what someone typed after `silence`: a bare alert name (`GpuDown`),
/// or matchers `name=value`, `name!=value`, `name=~regex`, `name!~regex`
/// separated by commas, optionally in braces, values optionally in double
/// quotes (`\"` and `\\` escapes inside).
pub fn parse_matchers(text: &str) -> Result<Vec<Matcher>, MatcherError> {
    let t = text.trim();
    let t = t
        .strip_prefix('{')
        .and_then(|x| x.strip_suffix('}'))
        .unwrap_or(t)
        .trim();
    if t.is_empty() {
        return Err(MatcherError("no matchers given".into()));
    }
    if is_label_value_word(t) && !t.contains(['=', '!', '~', ',']) {
        return Ok(vec![Matcher {
            name: "alertname".into(),
            value: t.to_string(),
            is_regex: false,
            is_equal: true,
        }]);
    }
    let chars: Vec<char> = t.chars().collect();
    let mut i = 0;
    let mut out = Vec::new();
    loop {
        while i < chars.len() && chars[i].is_whitespace() {
            i += 1;
        }
        let start = i;
        while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '_') {
            i += 1;
        }
        let name: String = chars[start..i].iter().collect();
        if name.is_empty() || name.starts_with(|c: char| c.is_ascii_digit()) {
            return Err(MatcherError(format!(
                "expected a label name at position {} of {t:?}",
                start + 1
            )));
        }
        while i < chars.len() && chars[i].is_whitespace() {
            i += 1;
        }
        let op: String = chars[i..chars.len().min(i + 2)].iter().collect();
        let (is_equal, is_regex, len) = if op.starts_with("=~") {
            (true, true, 2)
        } else if op.starts_with("!=") {
            (false, false, 2)
        } else if op.starts_with("!~") {
            (false, true, 2)
        } else if op.starts_with('=') {
            (true, false, 1)
        } else {
            return Err(MatcherError(format!(
                "expected =, !=, =~ or !~ after {name:?}"
            )));
        };
        i += len;
        while i < chars.len() && chars[i].is_whitespace() {
            i += 1;
        }
        let mut value = String::new();
        if i < chars.len() && chars[i] == '"' {
            i += 1;
            let mut closed = false;
            while i < chars.len() {
                match chars[i] {
                    '\\' if i + 1 < chars.len() => {
                        value.push(chars[i + 1]);
                        i += 2;
                    }
                    '"' => {
                        closed = true;
                        i += 1;
                        break;
                    }
                    c => {
                        value.push(c);
                        i += 1;
                    }
                }
            }
            if !closed {
                return Err(MatcherError(format!(
                    "unclosed quote in the value of {name}"
                )));
            }
        } else {
            while i < chars.len() && chars[i] != ',' {
                value.push(chars[i]);
                i += 1;
            }
            value = value.trim().to_string();
        }
        if value.chars().any(char::is_control) {
            return Err(MatcherError(format!(
                "the value of {name} contains a control character"
            )));
        }
        if is_regex {
            if let Err(e) = regex::Regex::new(&format!("^(?:{value})$")) {
                return Err(MatcherError(format!(
                    "the regex for {name} is invalid: {}",
                    e.to_string().lines().last().unwrap_or("")
                )));
            }
        }
        out.push(Matcher {
            name,
            value,
            is_regex,
            is_equal,
        });
        while i < chars.len() && chars[i].is_whitespace() {
            i += 1;
        }
        if i >= chars.len() {
            break;
        }
        if chars[i] != ',' {
            return Err(MatcherError(format!(
                "expected a comma at position {} of {t:?}",
                i + 1
            )));
        }
        i += 1;
    }
    if out.len() > 32 {
        return Err(MatcherError("at most 32 matchers".into()));
    }
    Ok(out)
}

/// Equality matchers for a set of labels (a group's common labels).
pub fn matchers_for_labels(labels: &BTreeMap<String, String>) -> Vec<Matcher> {
    labels
        .iter()
        .map(|(k, v)| Matcher {
            name: k.clone(),
            value: v.clone(),
            is_regex: false,
            is_equal: true,
        })
        .collect()
}

/// `alertname="GpuDown", instance=~"node1.*"` (for messages and the audit).
pub fn format_matchers(ms: &[Matcher]) -> String {
    ms.iter()
        .map(|m| {
            let op = match (m.is_equal, m.is_regex) {
                (true, false) => "=",
                (false, false) => "!=",
                (true, true) => "=~",
                (false, true) => "!~",
            };
            format!("{}{op}{:?}", m.name, m.value)
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// Parses a silence duration (`30m`, `1h`, `2d`) within
/// [`MIN_SILENCE`]..=[`MAX_SILENCE`].
pub fn parse_silence_duration(text: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(text.trim())
        .map_err(|e| format!("{text:?} is not a duration like 30m, 2h or 1d ({e})"))?;
    if d < MIN_SILENCE || d > MAX_SILENCE {
        return Err(format!(
            "a silence lasts between 1m and 90d, got {}",
            humantime::format_duration(d)
        ));
    }
    Ok(d)
}

/// A silence from now for `duration`.
pub fn new_silence(
    matchers: Vec<Matcher>,
    duration: Duration,
    created_by: &str,
    comment: &str,
) -> NewSilence {
    let now = chrono::Utc::now();
    let end = now + chrono::Duration::from_std(duration).unwrap_or(chrono::Duration::hours(1));
    NewSilence {
        matchers,
        starts_at: now.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
        ends_at: end.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
        created_by: created_by.to_string(),
        comment: comment.to_string(),
    }
}

/// True for a silence id as AlertManager makes them (a UUID) — checked
/// before it goes into a URL path.
pub fn is_silence_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= 64 && id.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-')
}

fn is_label_value_word(s: &str) -> bool {
    s.chars()
        .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
        && !s.is_empty()
}

fn without_url(e: &reqwest::Error) -> String {
    let mut s = e.to_string();
    if let Some(u) = e.url() {
        s = s.replace(u.as_str(), "<url>");
    }
    s
}

fn clip(s: &str) -> String {
    crate::notify::truncate_chars(s, 300)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(input: &str, expect: &str) {
        let got = match parse_matchers(input) {
            Ok(ms) => format_matchers(&ms),
            Err(e) => format!("error: {e}"),
        };
        assert_eq!(got, expect, "input {input:?}");
    }

    #[test]
    fn matchers_parse_like_amtool() {
        check("GpuDown", r#"alertname="GpuDown""#);
        check(
            r#"alertname=GpuDown,instance=~"node1.*""#,
            r#"alertname="GpuDown", instance=~"node1.*""#,
        );
        check(
            r#"{alertname="A", job!="x,y", gpu!~"[0-3]"}"#,
            r#"alertname="A", job!="x,y", gpu!~"[0-3]""#,
        );
        check(r#"a="say \"hi\"""#, r#"a="say \"hi\"""#);
        check("", "error: no matchers given");
        check(
            "1abc=x",
            "error: expected a label name at position 1 of \"1abc=x\"",
        );
        check("a<x", "error: expected =, !=, =~ or !~ after \"a\"");
        check(
            r#"a="x"b="y""#,
            "error: expected a comma at position 6 of \"a=\\\"x\\\"b=\\\"y\\\"\"",
        );
        check(
            r#"a=~"(""#,
            "error: the regex for a is invalid: error: unclosed group",
        );
        check(r#"a="x"#, "error: unclosed quote in the value of a");
    }

    #[test]
    fn silence_durations_are_bounded() {
        assert_eq!(
            parse_silence_duration("1h").unwrap(),
            Duration::from_secs(3600)
        );
        assert_eq!(
            parse_silence_duration("2d").unwrap(),
            Duration::from_secs(2 * 86_400)
        );
        assert!(parse_silence_duration("5s").is_err());
        assert!(parse_silence_duration("1000d").is_err());
        assert!(parse_silence_duration("soon").is_err());
    }

    #[test]
    fn silence_ids_are_checked_before_use_in_a_path() {
        assert!(is_silence_id("0f3c2d1e-aaaa-bbbb-cccc-0123456789ab"));
        assert!(!is_silence_id("../../api/v2/status"));
        assert!(!is_silence_id(""));
    }
}
