//! The paging sections of the bot's configuration: `[pagerduty]`, `[email]`,
//! `[digest]`, and the paging keys of a `[[routing.destinations]]` entry
//! (`pagerduty_routing_key[_file]`, `email`, `digest`, `[..escalation]`).
//! Raw TOML becomes validated values here; every error is reported against
//! its key, all at once, through the shared [`Reader`]. No network I/O.

use std::path::PathBuf;
use std::str::FromStr as _;
use std::time::Duration;

use crate::config::routing::{pagerduty_id, Escalation, Target};
use crate::config::{load_secret_file, read_secret, Reader, Secret, Section};

/// PagerDuty's Events API base.
pub const DEFAULT_PAGERDUTY_API_URL: &str = "https://events.pagerduty.com";

/// `[pagerduty]`.
#[derive(Debug, Clone)]
pub struct PagerDutyConfig {
    /// Events API base; events go to `<api_url>/v2/enqueue`.
    pub api_url: String,
    /// Verifies PagerDuty's v3 webhooks (`POST /pagerduty/webhook`); the
    /// route is served only when set.
    pub webhook_secret: Option<Secret>,
}

impl Default for PagerDutyConfig {
    fn default() -> Self {
        PagerDutyConfig {
            api_url: DEFAULT_PAGERDUTY_API_URL.to_string(),
            webhook_secret: None,
        }
    }
}

/// `[email]`.
#[derive(Debug, Clone)]
pub struct EmailConfig {
    /// A lettre connection URL (`smtp://`, `smtp://host:587?tls=required`,
    /// `smtps://host:465`), without credentials and without our own
    /// `tls=none` (which only says plain SMTP to a non-loopback host is meant).
    pub smtp_url: String,
    /// `From:` as a mailbox (`name <addr>` or `addr`).
    pub from: String,
    pub credentials: Option<(String, Secret)>,
}

/// `[digest]`.
#[derive(Debug, Clone)]
pub struct DigestConfig {
    /// The `cron` crate's expression (seconds first), as normalised.
    pub schedule_text: String,
    pub schedule: cron::Schedule,
    pub timezone: chrono_tz::Tz,
}

/// The paging keys of one destination.
#[derive(Debug, Clone, Default)]
pub struct DestinationPaging {
    pub pagerduty_routing_key: Option<Secret>,
    pub email: Vec<String>,
    pub digest: bool,
    pub escalation: Option<Escalation>,
}

/// What the other sections say exists, for checking a destination's targets.
#[derive(Debug, Clone, Copy, Default)]
pub struct Available {
    pub slack: bool,
    pub email: bool,
    pub digest: bool,
}

/// Reads `[pagerduty]`.
pub fn read_pagerduty<'i>(r: &mut Reader<'i>, s: &mut Section<'i>) -> PagerDutyConfig {
    let mut c = PagerDutyConfig::default();
    if let Some(url) = r.get_with(s, "api_url", http_base) {
        c.api_url = url;
    }
    c.webhook_secret = read_secret(r, s, "webhook_secret", "webhook_secret_file");
    c
}

/// Reads `[email]`.
pub fn read_email<'i>(r: &mut Reader<'i>, s: &mut Section<'i>) -> Option<EmailConfig> {
    let url: Option<String> = r.get(s, "smtp_url");
    let from = r.get_with(s, "from", |f: String| {
        f.parse::<lettre::message::Mailbox>()
            .map(|m| m.to_string())
            .map_err(|e| format!("{f:?} is not a mailbox ({e})"))
    });
    let username: Option<String> = r.get(s, "username");
    let password = read_secret(r, s, "password", "password_file");
    let credentials = match (username, password) {
        (Some(u), Some(p)) => Some((u, p)),
        (None, None) => None,
        (Some(_), None) => {
            r.error(s, "username", "needs password or password_file");
            None
        }
        (None, Some(_)) => {
            r.error(s, "password", "needs username");
            None
        }
    };
    let has = |s: &Section<'_>, k: &str| s.keys().iter().any(|x| x == k);
    let smtp_url = match url {
        Some(u) => match smtp_url(&u, credentials.is_some()) {
            Ok(u) => Some(u),
            Err(e) => {
                r.error(s, "smtp_url", e);
                None
            }
        },
        None => {
            if !has(s, "smtp_url") {
                r.error(s, "", "needs smtp_url");
            }
            None
        }
    };
    if from.is_none() && !has(s, "from") {
        r.error(s, "", "needs from");
    }
    Some(EmailConfig {
        smtp_url: smtp_url?,
        from: from?,
        credentials,
    })
}

/// Checks an SMTP URL against the transport policy: TLS (`smtps://` or
/// `?tls=required`) whenever credentials are sent; plain SMTP only to a
/// loopback relay or when the URL says `tls=none`. Returns the URL for
/// lettre (our `tls=none` removed).
pub fn smtp_url(raw: &str, authenticating: bool) -> Result<String, String> {
    let mut url = reqwest::Url::parse(raw).map_err(|e| format!("{raw:?} is not a URL ({e})"))?;
    if url.password().is_some() || !url.username().is_empty() {
        return Err(
            "must not carry credentials: set username and password_file instead".to_string(),
        );
    }
    let host = url
        .host_str()
        .ok_or_else(|| "needs a host".to_string())?
        .to_string();
    let tls: Option<String> = url
        .query_pairs()
        .find(|(k, _)| k == "tls")
        .map(|(_, v)| v.into_owned());
    let loopback = host == "localhost"
        || host
            .trim_matches(['[', ']'])
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback());
    match (url.scheme(), tls.as_deref()) {
        ("smtps", None) | ("smtp", Some("required")) => {}
        ("smtp", Some("opportunistic")) if !authenticating => {}
        ("smtp", Some("opportunistic")) => {
            return Err(
                "sends credentials: use ?tls=required (STARTTLS) or smtps://, not opportunistic"
                    .to_string(),
            )
        }
        ("smtp", None) if loopback && !authenticating => {}
        ("smtp", None) if authenticating => {
            return Err(
                "sends credentials over plain SMTP: use ?tls=required (STARTTLS) or smtps://"
                    .to_string(),
            )
        }
        ("smtp", None) => {
            return Err(format!(
                "plain SMTP to {host}, which is not loopback: use ?tls=required (STARTTLS) or smtps://, or say ?tls=none"
            ))
        }
        ("smtp", Some("none")) => {
            let rest: Vec<(String, String)> = url
                .query_pairs()
                .filter(|(k, _)| k != "tls")
                .map(|(k, v)| (k.into_owned(), v.into_owned()))
                .collect();
            if rest.is_empty() {
                url.set_query(None);
            } else {
                url.query_pairs_mut().clear().extend_pairs(rest);
            }
        }
        (scheme, tls) => {
            return Err(format!(
                "scheme {scheme:?} with tls={tls:?}: use smtp://, smtp://host:587?tls=required or smtps://host:465"
            ))
        }
    }
    let out = url.to_string();
    lettre::AsyncSmtpTransport::<lettre::Tokio1Executor>::from_url(&out)
        .map_err(|e| format!("{raw:?}: {e}"))?;
    Ok(out)
}

/// Reads `[digest]`.
pub fn read_digest<'i>(r: &mut Reader<'i>, s: &mut Section<'i>) -> Option<DigestConfig> {
    let schedule = r.get_with(s, "schedule", |v: String| cron_schedule(&v));
    let timezone = r
        .get_with(s, "timezone", |v: String| {
            chrono_tz::Tz::from_str(v.trim()).map_err(|_| {
                format!("{v:?} is not an IANA time zone name (e.g. \"Europe/Berlin\")")
            })
        })
        .unwrap_or(chrono_tz::Tz::UTC);
    if schedule.is_none() && s.keys().iter().all(|k| k != "schedule") {
        r.error(s, "", "needs schedule");
    }
    let (schedule_text, schedule) = schedule?;
    Some(DigestConfig {
        schedule_text,
        schedule,
        timezone,
    })
}

/// The latest time `schedule` fires in `tz` within `(after, now]` (Unix
/// seconds), if any: the slot owed by a `[digest]` or a `[[reports]]`
/// schedule. A very long outage owes one slot, not a search through months.
pub fn latest_slot(
    schedule: &cron::Schedule,
    tz: chrono_tz::Tz,
    after: f64,
    now: f64,
) -> Option<f64> {
    use chrono::TimeZone as _;
    let from = after.max(now - 35.0 * 86_400.0);
    let start = chrono::Utc.timestamp_opt(from as i64, 0).single()?;
    let mut slot = None;
    for t in schedule.after(&start.with_timezone(&tz)) {
        let ts = t.timestamp() as f64;
        if ts > now {
            break;
        }
        if ts > after {
            slot = Some(ts);
        }
    }
    slot
}

/// The first time `schedule` fires in `tz` after `now` (Unix seconds).
pub fn next_slot(schedule: &cron::Schedule, tz: chrono_tz::Tz, now: f64) -> Option<f64> {
    use chrono::TimeZone as _;
    let start = chrono::Utc.timestamp_opt(now as i64, 0).single()?;
    schedule
        .after(&start.with_timezone(&tz))
        .next()
        .map(|t| t.timestamp() as f64)
}

/// Parses a cron expression: the `cron` crate's (6 or 7 fields, seconds
/// first), or a 5-field crontab line (minute first; its numeric days of the
/// week, 0 or 7 = Sunday, are translated to the crate's 1 = Sunday).
pub fn cron_schedule(expr: &str) -> Result<(String, cron::Schedule), String> {
    let fields: Vec<&str> = expr.split_whitespace().collect();
    let text = match fields.len() {
        5 => {
            let dow = crontab_dow(fields[4])?;
            format!("0 {} {} {} {} {dow}", fields[0], fields[1], fields[2], fields[3])
        }
        6 | 7 => fields.join(" "),
        n => {
            return Err(format!(
                "{expr:?} has {n} fields: want 6 (sec min hour day month weekday) or a 5-field crontab line"
            ))
        }
    };
    let schedule = cron::Schedule::from_str(&text).map_err(|e| {
        let e = e.to_string();
        let why = e.lines().last().unwrap_or("").trim().to_string();
        format!("{expr:?} is not a cron expression ({why})")
    })?;
    if schedule.upcoming(chrono::Utc).next().is_none() {
        return Err(format!("{expr:?} never fires"));
    }
    Ok((text, schedule))
}

fn crontab_dow(field: &str) -> Result<String, String> {
    let re = regex::Regex::new(r"\d+").map_err(|e| e.to_string())?;
    let mut bad = None;
    let out = re.replace_all(field, |c: &regex::Captures<'_>| {
        let n: u32 = c[0].parse().unwrap_or(99);
        match n {
            0 | 7 => "1".to_string(),
            1..=6 => (n + 1).to_string(),
            _ => {
                bad = Some(n);
                c[0].to_string()
            }
        }
    });
    match bad {
        Some(n) => Err(format!("day of week {n} is out of range 0-7")),
        None => Ok(out.into_owned()),
    }
}

/// A PagerDuty Events API v2 routing key: 32 letters and digits.
pub fn routing_key_shape(key: &str) -> Result<(), String> {
    if key.len() == 32 && key.bytes().all(|b| b.is_ascii_alphanumeric()) {
        Ok(())
    } else {
        Err(format!(
            "is not an Events API v2 routing key (32 letters and digits, got {} characters)",
            key.chars().count()
        ))
    }
}

/// An email address (bare, no display name).
pub fn email_address(a: &str) -> Result<String, String> {
    a.trim()
        .parse::<lettre::Address>()
        .map(|a| a.to_string())
        .map_err(|e| format!("{a:?} is not an email address ({e})"))
}

/// A duration such as `90s`, `10m`, `1h 30m`.
pub fn duration(v: &str) -> Result<Duration, String> {
    match humantime::parse_duration(v.trim()) {
        Ok(d) if !d.is_zero() && d <= Duration::from_secs(30 * 86_400) => Ok(d),
        Ok(_) => Err(format!("{v:?} must be above zero and at most 30 days")),
        Err(e) => Err(format!(
            "{v:?} is not a duration like \"90s\", \"10m\", \"1h\" ({e})"
        )),
    }
}

/// Reads the paging keys of one destination; `keys` collects every
/// routing key named (id → key) for the PagerDuty notifier.
pub fn read_destination<'i>(
    r: &mut Reader<'i>,
    d: &mut Section<'i>,
    have: Available,
    keys: &mut std::collections::BTreeMap<String, Secret>,
) -> DestinationPaging {
    let mut out = DestinationPaging::default();
    let key = read_secret(r, d, "pagerduty_routing_key", "pagerduty_routing_key_file");
    if let Some(k) = key {
        let which = if d.keys().iter().any(|x| x == "pagerduty_routing_key") {
            "pagerduty_routing_key"
        } else {
            "pagerduty_routing_key_file"
        };
        match routing_key_shape(k.expose()) {
            Ok(()) => {
                keys.insert(pagerduty_id(&k), k.clone());
                out.pagerduty_routing_key = Some(k);
            }
            Err(e) => r.error(d, which, e),
        }
    }
    out.email = r
        .get_with(d, "email", |v: Vec<String>| {
            if v.is_empty() {
                return Err("must list at least one address".to_string());
            }
            v.iter().map(|a| email_address(a)).collect()
        })
        .unwrap_or_default();
    if !out.email.is_empty() && !have.email {
        r.error(
            d,
            "email",
            "needs an [email] section with smtp_url and from",
        );
    }
    out.digest = r.get::<bool>(d, "digest").unwrap_or(false);
    if out.digest && !have.digest {
        r.error(d, "digest", "needs a [digest] section with schedule");
    }
    if let Some(mut e) = r.table(d, "escalation") {
        out.escalation = read_escalation(r, &mut e, have, keys);
        r.finish(e);
    }
    out
}

fn read_escalation<'i>(
    r: &mut Reader<'i>,
    e: &mut Section<'i>,
    have: Available,
    keys: &mut std::collections::BTreeMap<String, Secret>,
) -> Option<Escalation> {
    let after = r.get_with(e, "after", |v: String| duration(&v));
    let repeat_every = r.get_with(e, "repeat_every", |v: String| duration(&v));
    let max_repeats = r.get_with(e, "max_repeats", |n: i64| {
        u32::try_from(n)
            .ok()
            .filter(|n| *n <= 100)
            .ok_or_else(|| format!("must be between 0 and 100, got {n}"))
    });
    let mut bad = Vec::new();
    let notify = r.get_with(e, "notify", |v: Vec<String>| {
        if v.is_empty() {
            return Err("must name at least one target".to_string());
        }
        let mut out = Vec::new();
        for t in &v {
            match escalation_target(t, have, keys) {
                Ok(t) => out.push(t),
                Err(msg) => bad.push(msg),
            }
        }
        Ok(out)
    });
    for msg in bad {
        r.error(e, "notify", msg);
    }
    let has = |k: &str| e.keys().iter().any(|x| x == k);
    if after.is_none() && !has("after") {
        r.error(e, "", "needs after");
    }
    if notify.is_none() && !has("notify") {
        r.error(e, "", "needs notify");
    }
    if max_repeats.is_some_and(|n| n > 0) && repeat_every.is_none() && !has("repeat_every") {
        r.error(e, "max_repeats", "needs repeat_every");
    }
    Some(Escalation {
        after: after?,
        notify: notify?,
        max_repeats: max_repeats.unwrap_or(if repeat_every.is_some() { 3 } else { 0 }),
        repeat_every,
    })
}

/// `slack:CHANNEL`, `email:ADDR`, `pagerduty:KEYFILE`.
fn escalation_target(
    t: &str,
    have: Available,
    keys: &mut std::collections::BTreeMap<String, Secret>,
) -> Result<Target, String> {
    match t.split_once(':') {
        Some(("slack", c)) if !c.is_empty() && !c.contains(char::is_whitespace) => {
            if have.slack {
                Ok(Target::Slack(c.to_string()))
            } else {
                Err(format!("{t:?} needs a [slack] section with bot_token"))
            }
        }
        Some(("email", a)) => {
            let a = email_address(a).map_err(|e| format!("{t:?}: {e}"))?;
            if have.email {
                Ok(Target::Email(a))
            } else {
                Err(format!(
                    "{t:?} needs an [email] section with smtp_url and from"
                ))
            }
        }
        Some(("pagerduty", f)) if !f.is_empty() => {
            let k = load_secret_file(&PathBuf::from(f)).map_err(|e| format!("{t:?}: {e}"))?;
            routing_key_shape(k.expose()).map_err(|e| format!("{t:?}: the key in {f} {e}"))?;
            let id = pagerduty_id(&k);
            keys.insert(id.clone(), k);
            Ok(Target::PagerDuty(id))
        }
        _ => Err(format!(
            "{t:?} is not a target: use slack:CHANNEL, email:ADDRESS or pagerduty:ROUTING_KEY_FILE"
        )),
    }
}

fn http_base(u: String) -> Result<String, String> {
    match reqwest::Url::parse(&u) {
        Ok(p) if matches!(p.scheme(), "http" | "https") && p.host_str().is_some() => {
            Ok(u.trim_end_matches('/').to_string())
        }
        _ => Err(format!("{u:?} is not an http(s) URL")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cron_accepts_six_fields_and_translates_crontab_lines() {
        assert_eq!(
            cron_schedule("0 0 9 * * Mon-Fri").unwrap().0,
            "0 0 9 * * Mon-Fri"
        );
        assert_eq!(cron_schedule("30 9 * * 1-5").unwrap().0, "0 30 9 * * 2-6");
        assert_eq!(cron_schedule("0 9 * * 0").unwrap().0, "0 0 9 * * 1");
        assert!(cron_schedule("0 9 * *").is_err());
        assert!(cron_schedule("0 0 25 * * *").is_err());
        assert!(cron_schedule("0 9 * * 8").is_err());
    }

    #[test]
    fn smtp_policy_wants_tls_for_credentials_and_for_remote_relays() {
        assert!(smtp_url("smtp://127.0.0.1:25", false).is_ok());
        assert!(smtp_url("smtp://localhost:2525", false).is_ok());
        assert!(smtp_url("smtp://127.0.0.1:25", true).is_err());
        assert!(smtp_url("smtp://mail.example.com", false).is_err());
        assert_eq!(
            smtp_url("smtp://mail.example.com?tls=none", false).unwrap(),
            "smtp://mail.example.com"
        );
        assert!(smtp_url("smtp://mail.example.com:587?tls=required", true).is_ok());
        assert!(smtp_url("smtps://mail.example.com:465", true).is_ok());
        assert!(smtp_url("smtp://mail.example.com?tls=opportunistic", true).is_err());
        assert!(smtp_url("smtp://u:p@mail.example.com?tls=required", false).is_err());
        assert!(smtp_url("http://mail.example.com", false).is_err());
    }

    #[test]
    fn routing_keys_emails_and_durations() {
        assert!(routing_key_shape("R0123456789abcdef0123456789abcde").is_ok());
        assert!(routing_key_shape("short").is_err());
        assert!(routing_key_shape("R0123456789abcdef0123456789abcd!").is_err());
        assert_eq!(email_address(" a@example.com").unwrap(), "a@example.com");
        assert!(email_address("not an address").is_err());
        assert_eq!(duration("10m").unwrap(), Duration::from_secs(600));
        assert!(duration("0s").is_err());
        assert!(duration("soon").is_err());
    }
}
