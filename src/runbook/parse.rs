//! The runbook YAML walker: [`parse_runbook`] turns a file's text into a
//! [`Runbook`], walking the YAML value key by key so that every problem is
//! reported at once (file, line, location, key, message). The step keys and
//! the step-flow checks are in `parse/step.rs`. No I/O.

use std::collections::BTreeSet;
use std::path::Path;

use regex::Regex;
use serde_norway::Value;

use crate::runbook::*;

mod step;

/// Parses and validates the text of one runbook file, reporting every error.
pub fn parse_runbook(file: &Path, text: &str) -> Result<Runbook, CheckErrors> {
    let doc: Value = match serde_norway::from_str(text) {
        Ok(v) => v,
        Err(e) => {
            return Err(CheckErrors(vec![CheckError {
                file: file.to_path_buf(),
                line: e.location().map(|l| l.line()).unwrap_or(0),
                location: String::new(),
                key: String::new(),
                message: format!("invalid YAML: {e}"),
            }]));
        }
    };
    let mut w = Walker {
        file: file.to_path_buf(),
        errors: Vec::new(),
        declared: BTreeSet::new(),
    };
    let rb = w.runbook(&doc);
    if w.errors.is_empty() {
        rb.ok_or_else(|| CheckErrors(Vec::new()))
    } else {
        let mut errors = w.errors;
        for e in &mut errors {
            e.line = locate(text, &e.location, &e.key);
        }
        errors.sort_by_key(|e| e.line);
        Err(CheckErrors(errors))
    }
}

/// Finds the line an error points at: the key's line inside its section
/// (`params.x`, `steps[i]`, `triggers[i]`), else the section's line, else 0.
/// Block and flow style both work as long as keys start their own line or
/// appear on the item's line.
pub(super) fn locate(text: &str, location: &str, key: &str) -> usize {
    let lines: Vec<&str> = text.lines().collect();
    let indent = |l: &str| l.len() - l.trim_start().len();
    let is_content = |l: &str| {
        let t = l.trim_start();
        !t.is_empty() && !t.starts_with('#')
    };
    let key_at = |l: &str, k: &str| {
        let t = l
            .trim_start()
            .trim_start_matches("- ")
            .trim_start_matches('{')
            .trim_start();
        t.strip_prefix(k)
            .is_some_and(|r| r.trim_start().starts_with(':'))
    };
    let top = |k: &str| lines.iter().position(|l| indent(l) == 0 && key_at(l, k));
    // The block of lines belonging to the item or key starting at `start`.
    let block_end = |start: usize| {
        let base = indent(lines[start]);
        (start + 1..lines.len())
            .find(|&j| is_content(lines[j]) && indent(lines[j]) <= base)
            .unwrap_or(lines.len())
    };
    // The i-th item of a top-level sequence.
    let item = |section: &str, i: usize| -> Option<usize> {
        let s = top(section)?;
        let items: Vec<usize> = (s + 1..lines.len())
            .take_while(|&j| {
                !is_content(lines[j]) || indent(lines[j]) > 0 || lines[j].starts_with('-')
            })
            .filter(|&j| {
                let t = lines[j].trim_start();
                t.starts_with("- ") || t == "-"
            })
            .collect();
        let first_indent = items.first().map(|&j| indent(lines[j]))?;
        items
            .into_iter()
            .filter(|&j| indent(lines[j]) == first_indent)
            .nth(i)
    };
    let key_name = key.split('[').next().unwrap_or("");
    let find_key_in = |start: usize, end: usize| -> Option<usize> {
        if key_name.is_empty() {
            return Some(start);
        }
        if lines[start].contains(&format!("{key_name}:")) {
            return Some(start);
        }
        (start + 1..end).find(|&j| key_at(lines[j], key_name))
    };
    let found = if location.is_empty() {
        top(key_name)
    } else if let Some(name) = location.strip_prefix("params.") {
        top("params").and_then(|p| {
            let start = (p + 1..lines.len()).find(|&j| key_at(lines[j], name))?;
            find_key_in(start, block_end(start)).or(Some(start))
        })
    } else if let Some(rest) = location
        .strip_prefix("steps[")
        .map(|r| ("steps", r))
        .or_else(|| location.strip_prefix("triggers[").map(|r| ("triggers", r)))
    {
        let (section, r) = rest;
        let i: Option<usize> = r.split(']').next().and_then(|n| n.parse().ok());
        i.and_then(|i| item(section, i)).map(|start| {
            let end = block_end(start);
            find_key_in(start, end).unwrap_or(start)
        })
    } else {
        None
    };
    found.map(|j| j + 1).unwrap_or(0)
}

/// Zero-width and bidirectional formatting characters: they make a value
/// read differently from what runs (Trojan Source), so no value may hold one.
pub(super) fn is_invisible_format_char(c: char) -> bool {
    matches!(c, '\u{200B}'..='\u{200F}' | '\u{202A}'..='\u{202E}' | '\u{2060}'..='\u{2069}' | '\u{FEFF}' | '\u{00AD}')
}

pub(super) fn is_param_name(s: &str) -> bool {
    let mut b = s.bytes();
    matches!(b.next(), Some(c) if c.is_ascii_lowercase() || c == b'_')
        && b.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'_')
        && s.len() <= 64
}

fn is_step_name(s: &str) -> bool {
    is_runbook_id(s)
}

/// Compiles `pattern` anchored at both ends, as Prometheus does.
fn anchored(pattern: &str) -> Result<Regex, String> {
    Regex::new(&format!("^(?:{pattern})$")).map_err(|e| {
        // The regex crate's message spans lines (pattern, caret, error): keep the error.
        let text = e.to_string();
        let why = text
            .lines()
            .rev()
            .find(|l| !l.trim().is_empty())
            .unwrap_or("")
            .trim()
            .trim_start_matches("error: ")
            .to_string();
        format!("invalid regex {pattern:?}: {why}")
    })
}

struct Walker {
    file: PathBuf,
    errors: Vec<CheckError>,
    /// Parameter names declared (valid or not), so one bad declaration does
    /// not also make every use of it "unknown".
    declared: BTreeSet<String>,
}

const TOP_KEYS: &[&str] = &["id", "title", "description", "triggers", "params", "steps"];
const PARAM_KEYS: &[&str] = &["pattern", "from_label", "default", "description"];
const STEP_KEYS: &[&str] = &[
    "name",
    "description",
    "phase",
    "kind",
    "run",
    "target",
    "timeout",
    "needs_approval",
    "releases_gpu",
    "roles",
    "method",
    "url",
    "body",
    "query",
    "when",
    "requires",
    "alternative",
    "only_if_exists",
    "approval_group",
    "state_on_success",
    "state_on_failure",
    "fail_if_any",
    "fail_if_none",
    "node_state",
    "node_state_on_failure",
    "nothing_found_exit",
];

fn value_kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Sequence(_) => "a list",
        Value::Mapping(_) => "a mapping",
        Value::Tagged(_) => "a tagged value",
    }
}

/// A string, or a number/boolean read as its text.
fn scalar_string(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

type Entries<'v> = Vec<(String, &'v Value)>;

impl Walker {
    fn err(&mut self, location: &str, key: &str, message: impl Into<String>) {
        self.errors.push(CheckError {
            file: self.file.clone(),
            line: 0,
            location: location.to_string(),
            key: key.to_string(),
            message: message.into(),
        });
    }

    /// The entries of a mapping with string keys; unknown keys are errors.
    fn mapping<'v>(
        &mut self,
        v: &'v Value,
        location: &str,
        key: &str,
        known: Option<&[&str]>,
    ) -> Option<Entries<'v>> {
        let Value::Mapping(m) = v else {
            self.err(
                location,
                key,
                format!("must be a mapping, got {}", value_kind(v)),
            );
            return None;
        };
        let mut out = Vec::new();
        for (k, val) in m {
            let Some(k) = scalar_string(k) else {
                self.err(location, key, "keys must be strings");
                continue;
            };
            if let Some(known) = known {
                if !known.contains(&k.as_str()) {
                    self.err(
                        location,
                        &k,
                        format!("unknown key (expected one of: {})", known.join(", ")),
                    );
                    continue;
                }
            }
            out.push((k, val));
        }
        Some(out)
    }

    fn string(&mut self, v: &Value, location: &str, key: &str) -> Option<String> {
        match v {
            Value::String(s) => Some(s.clone()),
            other => {
                self.err(
                    location,
                    key,
                    format!("must be a string, got {}", value_kind(other)),
                );
                None
            }
        }
    }

    fn runbook(&mut self, doc: &Value) -> Option<Runbook> {
        let entries = self.mapping(doc, "", "", Some(TOP_KEYS))?;
        let get = |k: &str| entries.iter().find(|(n, _)| n == k).map(|(_, v)| *v);

        let id = match get("id") {
            Some(v) => self.string(v, "", "id").and_then(|id| {
                if is_runbook_id(&id) {
                    Some(id)
                } else {
                    self.err(
                        "",
                        "id",
                        format!("{id:?} must be lower-case letters, digits and `-` (at most 64)"),
                    );
                    None
                }
            }),
            None => {
                self.err("", "id", "is required");
                None
            }
        };
        let title = match get("title") {
            Some(v) => self.string(v, "", "title"),
            None => {
                self.err("", "title", "is required");
                None
            }
        };
        let description = get("description")
            .and_then(|v| self.string(v, "", "description"))
            .unwrap_or_default();

        let triggers = match get("triggers") {
            Some(v) => self.triggers(v),
            None => Vec::new(),
        };
        let params = match get("params") {
            Some(Value::Null) | None => Vec::new(),
            Some(v) => self.params(v),
        };
        let steps_before = self.errors.len();
        // Every step's name as written, valid step or not: `requires` may
        // name a step that has errors of its own without being "unknown".
        let raw_names: Vec<String> = match get("steps") {
            Some(Value::Sequence(seq)) => seq
                .iter()
                .map(|v| {
                    v.get("name")
                        .and_then(|n| n.as_str())
                        .unwrap_or("")
                        .to_string()
                })
                .collect(),
            _ => Vec::new(),
        };
        let steps = match get("steps") {
            Some(Value::Sequence(seq)) if !seq.is_empty() => {
                let mut steps = Vec::new();
                for (i, s) in seq.iter().enumerate() {
                    if let Some(step) = self.step(i, s) {
                        steps.push(step);
                    }
                }
                steps
            }
            Some(Value::Sequence(_)) => {
                self.err("", "steps", "must not be empty");
                Vec::new()
            }
            Some(v) => {
                self.err(
                    "",
                    "steps",
                    format!("must be a list of steps, got {}", value_kind(v)),
                );
                Vec::new()
            }
            None => {
                self.err("", "steps", "is required");
                Vec::new()
            }
        };
        let mut seen = BTreeSet::new();
        for (i, s) in steps.iter().enumerate() {
            if !seen.insert(s.name.as_str()) {
                self.err(
                    &format!("steps[{i}] {}", s.name),
                    "name",
                    "duplicate step name",
                );
            }
        }
        self.check_flow(&steps, &raw_names);
        // Unused parameters are reported only when every step is valid (a
        // broken step would make its parameters look unused).
        let steps_ok = self.errors.len() == steps_before;
        let used: BTreeSet<&str> = steps.iter().flat_map(|s| s.params_used()).collect();
        for p in &params {
            if steps_ok && !used.contains(p.name.as_str()) {
                self.err(
                    &format!("params.{}", p.name),
                    "",
                    "declared but not used by any step",
                );
            }
        }
        Some(Runbook {
            id: id?,
            title: title?,
            description,
            triggers,
            params,
            steps,
            source: self.file.clone(),
        })
    }

    fn triggers(&mut self, v: &Value) -> Vec<Trigger> {
        let Value::Sequence(seq) = v else {
            self.err(
                "",
                "triggers",
                format!(
                    "must be a list of label matcher maps, got {}",
                    value_kind(v)
                ),
            );
            return Vec::new();
        };
        let mut out = Vec::new();
        for (i, t) in seq.iter().enumerate() {
            let loc = format!("triggers[{i}]");
            let Some(entries) = self.mapping(t, &loc, "", None) else {
                continue;
            };
            if entries.is_empty() {
                self.err(&loc, "", "a trigger needs at least one label matcher");
                continue;
            }
            let mut matchers = Vec::new();
            for (label, val) in entries {
                let Some(src) = scalar_string(val) else {
                    self.err(&loc, &label, "must be a regex string");
                    continue;
                };
                match anchored(&src) {
                    Ok(regex) => matchers.push(LabelMatcher {
                        label,
                        source: src,
                        regex,
                    }),
                    Err(e) => self.err(&loc, &label, e),
                }
            }
            out.push(Trigger { matchers });
        }
        out
    }

    fn params(&mut self, v: &Value) -> Vec<Param> {
        let Some(entries) = self.mapping(v, "", "params", None) else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for (name, pv) in entries {
            let loc = format!("params.{name}");
            self.declared.insert(name.clone());
            if !is_param_name(&name) {
                self.err(
                    &loc,
                    "",
                    "a parameter name is lower-case letters, digits and `_`",
                );
                continue;
            }
            let Some(fields) = self.mapping(pv, &loc, "", Some(PARAM_KEYS)) else {
                continue;
            };
            let get = |k: &str| fields.iter().find(|(n, _)| n == k).map(|(_, v)| *v);
            let pattern = match get("pattern") {
                None => {
                    self.err(
                        &loc,
                        "pattern",
                        "is required (every parameter needs a pattern)",
                    );
                    None
                }
                Some(v) => self.string(v, &loc, "pattern").and_then(|p| {
                    if p.trim().is_empty() {
                        self.err(&loc, "pattern", "must not be empty");
                        return None;
                    }
                    match anchored(&p) {
                        Ok(r) => Some((p, r)),
                        Err(e) => {
                            self.err(&loc, "pattern", e);
                            None
                        }
                    }
                }),
            };
            let from_label = get("from_label").and_then(|v| self.string(v, &loc, "from_label"));
            let default = get("default").and_then(|v| match scalar_string(v) {
                Some(s) => Some(s),
                None => {
                    self.err(&loc, "default", "must be a string");
                    None
                }
            });
            let description = get("description")
                .and_then(|v| self.string(v, &loc, "description"))
                .unwrap_or_default();
            let Some((pattern_source, pattern)) = pattern else {
                continue;
            };
            let p = Param {
                name,
                pattern_source,
                pattern,
                from_label,
                default,
                description,
            };
            if let Some(d) = &p.default {
                if let Err(e) = p.validate(d) {
                    self.err(&loc, "default", format!("default {e}"));
                }
            }
            out.push(p);
        }
        out
    }
}
