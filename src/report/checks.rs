//! The "Checks" section: each `[[reports.checks]]` query at the period's
//! end, one row per series, with its value in its unit and pass or warn.

use crate::config::reports::{CheckConfig, SectionKind, Unit};
use crate::report::compute::Answers;
use crate::report::prom::Sample;
use crate::report::render::{fmt_bytes, fmt_duration, fmt_num};
use crate::report::{Finding, Level, Line, Section};

/// Formats a check's value in its unit.
pub fn fmt_unit(v: f64, unit: Unit) -> String {
    match unit {
        Unit::Seconds => fmt_duration(v),
        Unit::Bytes => fmt_bytes(v),
        Unit::Percent => format!("{} %", fmt_num(v)),
        Unit::Ratio => format!("{} %", fmt_num(v * 100.0)),
        Unit::Count => fmt_num(v),
    }
}

pub(super) fn section(
    a: &Answers,
    configs: &[CheckConfig],
    results: &[Result<Vec<Sample>, String>],
) -> Section {
    let mut s = Section::new(SectionKind::Checks);
    for (c, r) in configs.iter().zip(results) {
        let link = a.link_expr(&c.query);
        if r.is_ok() {
            s.answered += 1;
        }
        match r {
            Err(why) => s.failures.push(format!("check {:?}: {why}", c.name)),
            Ok(rows) if rows.is_empty() => s.findings.push(Finding {
                level: Level::Warning,
                line: Line::new()
                    .bold(c.name.clone())
                    .text(": ")
                    .link("no data", link)
                    .text(": the query returned no series"),
            }),
            Ok(rows) => {
                for row in rows {
                    let which: Vec<String> = row
                        .labels
                        .iter()
                        .filter(|(k, _)| k.as_str() != "__name__")
                        .map(|(k, v)| format!("{k}={v}"))
                        .collect();
                    let mut line = Line::new().bold(c.name.clone());
                    if !which.is_empty() {
                        line = line.text(format!(" ({})", which.join(", ")));
                    }
                    line = line
                        .text(": ")
                        .link(fmt_unit(row.value, c.unit), link.clone());
                    let warn = match (c.warn_above, c.warn_below) {
                        (Some(hi), _) if row.value > hi || row.value.is_nan() => {
                            Some(format!("above {}", fmt_unit(hi, c.unit)))
                        }
                        (_, Some(lo)) if row.value < lo || row.value.is_nan() => {
                            Some(format!("below {}", fmt_unit(lo, c.unit)))
                        }
                        _ => None,
                    };
                    match warn {
                        Some(w) => s.findings.push(Finding {
                            level: Level::Warning,
                            line: line.text(format!(": warn ({w})")),
                        }),
                        None => s.lines.push(line.text(": ok")),
                    }
                }
            }
        }
    }
    if configs.is_empty() {
        s.lines
            .push(Line::new().text("No checks configured ([[reports.checks]])."));
    }
    s
}
