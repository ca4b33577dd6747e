//! `[[reports]]` of the bot's configuration: scheduled health reports (their
//! schedule, time zone, period, destinations, sections and the team's own
//! `[[reports.checks]]`). Raw TOML becomes a validated [`ReportConfig`] here;
//! every error is reported against its key, all at once, through the shared
//! [`Reader`]. No network I/O; what a report says is `src/report/`.

use std::str::FromStr as _;
use std::time::Duration;

use crate::config::paging::{cron_schedule, email_address};
use crate::config::routing::Target;
use crate::config::{Reader, Section};

/// Longest period a report may cover (a quarter).
pub const MAX_PERIOD: Duration = Duration::from_secs(93 * 86_400);
/// Default deadline of one Prometheus query.
pub const DEFAULT_QUERY_TIMEOUT: Duration = Duration::from_secs(20);

/// One `[[reports]]` entry.
#[derive(Debug, Clone)]
pub struct ReportConfig {
    pub name: String,
    /// The `cron` crate's expression (seconds first), as normalised.
    pub schedule_text: String,
    pub schedule: cron::Schedule,
    pub timezone: chrono_tz::Tz,
    /// What the report covers, ending at the scheduled time.
    pub period: Duration,
    pub slack_channel: Option<String>,
    pub discord_channel: Option<u64>,
    pub email: Vec<String>,
    /// Say nothing when no section found anything.
    pub only_if_findings: bool,
    /// The sections, in the order they are shown.
    pub sections: Vec<SectionKind>,
    pub checks: Vec<CheckConfig>,
    /// Deadline of each Prometheus query.
    pub query_timeout: Duration,
}

impl ReportConfig {
    /// Where the report goes.
    pub fn targets(&self) -> Vec<Target> {
        let mut out = Vec::new();
        if let Some(c) = &self.slack_channel {
            out.push(Target::Slack(c.clone()));
        }
        if let Some(c) = self.discord_channel {
            out.push(Target::Discord(c));
        }
        out.extend(self.email.iter().cloned().map(Target::Email));
        out
    }
}

/// The sections of a report, in their default order (most important first).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum SectionKind {
    Fleet,
    GpuHealth,
    Utilization,
    Host,
    Incidents,
    Checks,
}

impl SectionKind {
    pub const ALL: [SectionKind; 6] = [
        SectionKind::Fleet,
        SectionKind::GpuHealth,
        SectionKind::Utilization,
        SectionKind::Host,
        SectionKind::Incidents,
        SectionKind::Checks,
    ];

    /// The config spelling (`sections = ["fleet", "gpu_health", ...]`).
    pub fn as_str(self) -> &'static str {
        match self {
            SectionKind::Fleet => "fleet",
            SectionKind::GpuHealth => "gpu_health",
            SectionKind::Utilization => "utilization",
            SectionKind::Host => "host",
            SectionKind::Incidents => "incidents",
            SectionKind::Checks => "checks",
        }
    }

    /// The heading shown in the report.
    pub fn heading(self) -> &'static str {
        match self {
            SectionKind::Fleet => "Fleet",
            SectionKind::GpuHealth => "GPU health",
            SectionKind::Utilization => "Utilization and waste",
            SectionKind::Host => "Host",
            SectionKind::Incidents => "Incidents",
            SectionKind::Checks => "Checks",
        }
    }

    pub fn parse(s: &str) -> Option<SectionKind> {
        SectionKind::ALL.into_iter().find(|k| k.as_str() == s)
    }
}

/// The unit of a check's value (how it is formatted).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unit {
    Seconds,
    Bytes,
    Percent,
    Ratio,
    Count,
}

impl Unit {
    pub fn parse(s: &str) -> Option<Unit> {
        Some(match s {
            "seconds" => Unit::Seconds,
            "bytes" => Unit::Bytes,
            "percent" => Unit::Percent,
            "ratio" => Unit::Ratio,
            "count" => Unit::Count,
            _ => return None,
        })
    }
}

/// One `[[reports.checks]]` row.
#[derive(Debug, Clone)]
pub struct CheckConfig {
    pub name: String,
    /// PromQL, evaluated at the period's end; each series is one row.
    pub query: String,
    pub unit: Unit,
    pub warn_above: Option<f64>,
    pub warn_below: Option<f64>,
}

/// What the other sections say exists, for checking a report's destinations.
#[derive(Debug, Clone, Copy, Default)]
pub struct Available {
    pub slack: bool,
    pub discord: bool,
    pub email: bool,
    pub prometheus: bool,
}

/// A report period such as `24h`, `7d`, `1 day`.
pub fn period(v: &str) -> Result<Duration, String> {
    match humantime::parse_duration(v.trim()) {
        Ok(d) if d >= Duration::from_secs(3600) && d <= MAX_PERIOD => {
            if d.as_secs() % 60 != 0 || d.subsec_nanos() != 0 {
                Err(format!("{v:?} must be whole minutes"))
            } else {
                Ok(d)
            }
        }
        Ok(_) => Err(format!("{v:?} must be between 1h and 93 days")),
        Err(e) => Err(format!(
            "{v:?} is not a duration like \"24h\" or \"7d\" ({e})"
        )),
    }
}

/// Reads every `[[reports]]` entry of the root table.
pub fn read_reports<'i>(
    r: &mut Reader<'i>,
    root: &mut Section<'i>,
    have: Available,
) -> Vec<ReportConfig> {
    let mut out: Vec<ReportConfig> = Vec::new();
    let mut names: Vec<String> = Vec::new();
    for mut s in r.tables(root, "reports") {
        if let Some(c) = read_report(r, &mut s, have, &mut names) {
            out.push(c);
        }
        r.finish(s);
    }
    out
}

fn read_report<'i>(
    r: &mut Reader<'i>,
    s: &mut Section<'i>,
    have: Available,
    names: &mut Vec<String>,
) -> Option<ReportConfig> {
    let has = |s: &Section<'_>, k: &str| s.keys().iter().any(|x| x == k);
    let name = r.get_with(s, "name", |n: String| {
        let ok = !n.is_empty()
            && n.len() <= 64
            && n.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
        if ok {
            Ok(n)
        } else {
            Err(format!(
                "{n:?} must be 1-64 letters, digits, '-' or '_' (it names files and metrics)"
            ))
        }
    });
    if name.is_none() && !has(s, "name") {
        r.error(s, "", "needs name");
    }
    let name = match name {
        Some(n) if names.contains(&n) => {
            r.error(s, "name", format!("{n:?} is used by another report"));
            None
        }
        Some(n) => {
            names.push(n.clone());
            Some(n)
        }
        None => None,
    };
    let schedule = r.get_with(s, "schedule", |v: String| cron_schedule(&v));
    if schedule.is_none() && !has(s, "schedule") {
        r.error(s, "", "needs schedule");
    }
    let timezone = r
        .get_with(s, "timezone", |v: String| {
            chrono_tz::Tz::from_str(v.trim()).map_err(|_| {
                format!("{v:?} is not an IANA time zone name (e.g. \"Europe/Berlin\")")
            })
        })
        .unwrap_or(chrono_tz::Tz::UTC);
    let period = r
        .get_with(s, "period", |v: String| period(&v))
        .unwrap_or(Duration::from_secs(86_400));
    let query_timeout = r
        .get_with(
            s,
            "query_timeout",
            |v: String| match humantime::parse_duration(v.trim()) {
                Ok(d) if d >= Duration::from_secs(1) && d <= Duration::from_secs(300) => Ok(d),
                Ok(_) => Err(format!("{v:?} must be between 1s and 5m")),
                Err(e) => Err(format!("{v:?} is not a duration like \"20s\" ({e})")),
            },
        )
        .unwrap_or(DEFAULT_QUERY_TIMEOUT);
    let slack_channel = r.get_with(s, "slack_channel", |c: String| {
        if c.is_empty() || c.contains(char::is_whitespace) {
            Err(format!("{c:?} is not a channel id"))
        } else {
            Ok(c)
        }
    });
    if slack_channel.is_some() && !have.slack {
        r.error(s, "slack_channel", "needs a [slack] section with bot_token");
    }
    let discord_channel = r.get_with(s, "discord_channel", |c: String| {
        c.trim()
            .parse::<u64>()
            .map_err(|_| format!("{c:?} is not a channel id (a number, in quotes)"))
    });
    if discord_channel.is_some() && !have.discord {
        r.error(
            s,
            "discord_channel",
            "needs a [discord] section with bot_token",
        );
    }
    let email: Vec<String> = r
        .get_with(s, "email", |v: Vec<String>| {
            if v.is_empty() {
                return Err("must list at least one address".to_string());
            }
            v.iter().map(|a| email_address(a)).collect()
        })
        .unwrap_or_default();
    if !email.is_empty() && !have.email {
        r.error(
            s,
            "email",
            "needs an [email] section with smtp_url and from",
        );
    }
    let given = |k: &str| has(s, k);
    if !given("slack_channel") && !given("discord_channel") && !given("email") {
        r.error(
            s,
            "",
            "needs a destination: slack_channel, discord_channel or email",
        );
    }
    if !have.prometheus {
        r.error(
            s,
            "",
            "needs [prometheus] url (reports query Prometheus's HTTP API)",
        );
    }
    let only_if_findings = r.get::<bool>(s, "only_if_findings").unwrap_or(false);
    let sections = r
        .get_with(s, "sections", |v: Vec<String>| {
            let mut out: Vec<SectionKind> = Vec::new();
            for name in &v {
                let Some(k) = SectionKind::parse(name) else {
                    let all: Vec<&str> = SectionKind::ALL.iter().map(|k| k.as_str()).collect();
                    return Err(format!(
                        "{name:?} is not a section (one of {})",
                        all.join(", ")
                    ));
                };
                if out.contains(&k) {
                    return Err(format!("{name:?} is listed twice"));
                }
                out.push(k);
            }
            if out.is_empty() {
                return Err("must list at least one section".to_string());
            }
            Ok(out)
        })
        .unwrap_or_else(|| SectionKind::ALL.to_vec());
    let mut checks = Vec::new();
    for mut c in r.tables(s, "checks") {
        if let Some(check) = read_check(r, &mut c) {
            checks.push(check);
        }
        r.finish(c);
    }
    let (schedule_text, schedule) = schedule?;
    Some(ReportConfig {
        name: name?,
        schedule_text,
        schedule,
        timezone,
        period,
        slack_channel,
        discord_channel,
        email,
        only_if_findings,
        sections,
        checks,
        query_timeout,
    })
}

fn read_check<'i>(r: &mut Reader<'i>, c: &mut Section<'i>) -> Option<CheckConfig> {
    let has = |s: &Section<'_>, k: &str| s.keys().iter().any(|x| x == k);
    let name = r.get_with(c, "name", |n: String| {
        if n.trim().is_empty() {
            Err("must not be empty".to_string())
        } else {
            Ok(n)
        }
    });
    let query = r.get_with(c, "query", |q: String| {
        if q.trim().is_empty() {
            Err("must not be empty".to_string())
        } else {
            Ok(q)
        }
    });
    let unit = r
        .get_with(c, "unit", |u: String| {
            Unit::parse(&u).ok_or_else(|| {
                format!("{u:?} is not a unit (seconds, bytes, percent, ratio, count)")
            })
        })
        .unwrap_or(Unit::Count);
    let number = |v: f64| {
        if v.is_finite() {
            Ok(v)
        } else {
            Err(format!("must be a number, got {v}"))
        }
    };
    let warn_above = r.get_with(c, "warn_above", number);
    let warn_below = r.get_with(c, "warn_below", number);
    if name.is_none() && !has(c, "name") {
        r.error(c, "", "needs name");
    }
    if query.is_none() && !has(c, "query") {
        r.error(c, "", "needs query");
    }
    if let (Some(a), Some(b)) = (warn_above, warn_below) {
        if b > a {
            r.error(
                c,
                "warn_below",
                "is above warn_above: every value would warn",
            );
        }
    }
    Some(CheckConfig {
        name: name?,
        query: query?,
        unit,
        warn_above,
        warn_below,
    })
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use crate::config::BotConfig;

    fn errors(text: &str) -> String {
        match BotConfig::from_str(Path::new("bot.toml"), text) {
            Ok(_) => String::new(),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn a_crontab_line_and_the_defaults() {
        let c = BotConfig::from_str(
            Path::new("bot.toml"),
            "[slack]\nbot_token = \"x\"\n[prometheus]\nurl = \"http://p:9090\"\n[[reports]]\nname = \"daily\"\nschedule = \"30 7 * * 1-5\"\nslack_channel = \"C1\"\n",
        )
        .unwrap();
        let r = &c.reports[0];
        assert_eq!(r.schedule_text, "0 30 7 * * 2-6");
        assert_eq!(r.timezone, chrono_tz::Tz::UTC);
        assert_eq!(r.period, std::time::Duration::from_secs(86_400));
        assert_eq!(r.sections, super::SectionKind::ALL.to_vec());
        assert!(!r.only_if_findings);
        assert_eq!(r.targets()[0].key(), "slack:C1");
    }

    #[test]
    fn every_error_is_reported_against_its_key() {
        let e = errors(
            r#"[prometheus]
url = "http://p:9090"
[[reports]]
name = "daily"
schedule = "0 0 25 * * *"
timezone = "Mars/Olympus"
period = "10m"
slack_channel = "C1"
sections = ["fleet", "gossip"]
[[reports.checks]]
name = "x"
unit = "furlongs"
warn_above = 1
warn_below = 2
[[reports]]
name = "daily"
schedule = "0 8 * * *"
email = ["a@example.com"]
[[reports]]
name = "bad name!"
"#,
        );
        let want = [
            "bot.toml:5: reports[0].schedule: \"0 0 25 * * *\" is not a cron expression",
            "bot.toml:6: reports[0].timezone: \"Mars/Olympus\" is not an IANA time zone name",
            "bot.toml:7: reports[0].period: \"10m\" must be between 1h and 93 days",
            "bot.toml:8: reports[0].slack_channel: needs a [slack] section with bot_token",
            "bot.toml:9: reports[0].sections: \"gossip\" is not a section (one of fleet, gpu_health, utilization, host, incidents, checks)",
            "bot.toml:10: reports[0].checks[0]: needs query",
            "bot.toml:12: reports[0].checks[0].unit: \"furlongs\" is not a unit",
            "bot.toml:14: reports[0].checks[0].warn_below: is above warn_above",
            "bot.toml:16: reports[1].name: \"daily\" is used by another report",
            "bot.toml:18: reports[1].email: needs an [email] section with smtp_url and from",
            "bot.toml:19: reports[2]: needs a destination: slack_channel, discord_channel or email",
            "bot.toml:20: reports[2].name: \"bad name!\" must be 1-64 letters",
        ];
        for w in want {
            assert!(e.contains(w), "{w:?} not in:\n{e}");
        }
        assert!(e.contains("reports[2]: needs schedule"), "{e}");
        let no_prom = errors("[slack]\nbot_token = \"x\"\n[[reports]]\nname = \"d\"\nschedule = \"0 8 * * *\"\nslack_channel = \"C1\"\n");
        assert!(
            no_prom.contains("bot.toml:3: reports[0]: needs [prometheus] url"),
            "{no_prom}"
        );
    }
}
