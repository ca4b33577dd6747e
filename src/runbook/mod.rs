//! Codified runbooks: the YAML format, its validation into typed [`Runbook`]s,
//! and parameter substitution.
//!
//! A file is parsed into a YAML value, then walked key by key into a
//! [`Runbook`] so that every problem in it is reported at once (file, step,
//! key, message). Code past [`parse_runbook`] never sees an invalid runbook:
//! commands are argv arrays, every parameter has an anchored pattern, every
//! `{{placeholder}}` names a declared parameter.
//!
//! Parameter values are substituted only after they matched their pattern,
//! only inside single argv elements (or URL / PromQL / body text, escaped),
//! and exactly once: a value is never re-scanned for placeholders, can never
//! add an argv element and never reaches a shell. This module does no I/O
//! besides reading runbook files; processes are spawned only by
//! [`exec`], and the engine ([`engine`]) is where steps run.

pub mod agent_exec;
pub mod cli;
pub mod engine;
pub mod exec;

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use regex::Regex;
use serde_norway::Value;

pub use cli::cli;

/// Default step timeout when a step names none.
pub const DEFAULT_STEP_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest timeout a step may ask for.
pub const MAX_STEP_TIMEOUT: Duration = Duration::from_secs(3600);
/// Longest parameter value accepted, whatever the pattern says.
pub const MAX_PARAM_LEN: usize = 256;

/// A validated runbook.
#[derive(Debug, Clone)]
pub struct Runbook {
    pub id: String,
    pub title: String,
    pub description: String,
    /// Any one trigger matching an alert's labels suggests this runbook.
    pub triggers: Vec<Trigger>,
    /// Declared parameters, in file order.
    pub params: Vec<Param>,
    pub steps: Vec<Step>,
    /// The file it came from.
    pub source: PathBuf,
}

/// Label matchers that must all match (label → anchored regex). A missing
/// label reads as the empty string, as in Prometheus.
#[derive(Debug, Clone)]
pub struct Trigger {
    pub matchers: Vec<LabelMatcher>,
}

#[derive(Debug, Clone)]
pub struct LabelMatcher {
    pub label: String,
    /// The regex as written.
    pub source: String,
    regex: Regex,
}

/// A typed parameter.
#[derive(Debug, Clone)]
pub struct Param {
    pub name: String,
    /// The pattern as written (matched anchored, as `^(?:pattern)$`).
    pub pattern_source: String,
    pattern: Regex,
    /// Filled from this alert label when not given explicitly.
    pub from_label: Option<String>,
    pub default: Option<String>,
    pub description: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Phase {
    Investigate,
    Mitigate,
    Escalate,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    Command,
    Http,
    Promql,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Target {
    /// Run by the agent on the alert's node (or locally by `gpuops runbook run`).
    Node,
    /// Run where the bot (or the CLI) runs.
    Bot,
}

/// Chat roles, lowest first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Role {
    Viewer,
    Operator,
    Admin,
}

/// One validated step.
#[derive(Debug, Clone)]
pub struct Step {
    pub name: String,
    pub description: String,
    pub phase: Phase,
    pub target: Target,
    pub timeout: Duration,
    pub needs_approval: bool,
    /// Roles that may run (or, with `needs_approval`, request) this step.
    pub roles: Vec<Role>,
    pub action: Action,
    /// How this step depends on earlier ones (`when`, `requires`).
    pub flow: Flow,
    /// `approval_group`: one approval covers every step of the group in a run.
    pub approval_group: Option<String>,
    /// `state_on_success`: the node's state in plain words once this
    /// mitigation succeeded (a template, e.g. `{{node}} is drained`).
    pub state_on_success: Option<Template>,
    /// `state_on_failure`: the node's state when this mitigation ran and failed.
    pub state_on_failure: Option<Template>,
}

/// When a step may run, decided by [`engine::next_action`] from the
/// outcomes of the earlier steps of the same run.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Flow {
    /// `when: previous_succeeded`: the step just before it in this run (the
    /// last one that got an outcome) succeeded.
    pub previous_succeeded: bool,
    /// `requires: [a, b]`: each named earlier step (or alternative group)
    /// succeeded in this run. `requires: []` declares that the step depends
    /// on no earlier step.
    pub requires: Vec<String>,
    /// `when` or `requires` was given: only they decide. A mitigation
    /// without either is held back by any earlier mitigation of the run
    /// that failed, timed out, was denied, expired or was skipped.
    pub declared: bool,
    /// `alternative: drain`: this step is one member of the group `drain`;
    /// the first member (in file order) that is available runs, the others
    /// are skipped. A member is available unless its `only_if_exists` path
    /// is missing on the machine that would run it.
    pub alternative: Option<String>,
    /// `only_if_exists: /usr/bin/scontrol`: an absolute path that must exist
    /// on the machine that runs the step (the agent checks node steps on the
    /// node); otherwise the step is `unavailable` and does not run.
    pub only_if_exists: Option<String>,
}

/// What a step does, with `{{param}}` templates still unrendered.
#[derive(Debug, Clone)]
pub enum Action {
    Command {
        argv: Vec<Template>,
    },
    Http {
        method: HttpMethod,
        url: Template,
        body: Option<Template>,
    },
    Promql {
        query: Template,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HttpMethod {
    Get,
    Post,
    Put,
}

/// A string with `{{name}}` placeholders, split once at load time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template {
    parts: Vec<Part>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Text(String),
    Param(String),
}

/// How a parameter value is escaped where it lands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Escape {
    /// One argv element: the value is inserted verbatim (it cannot split).
    None,
    /// A URL: everything outside `A-Za-z0-9-._~:` is percent-encoded.
    Url,
    /// A PromQL string literal: `\`, `"`, `'` and control characters escaped.
    Promql,
    /// JSON string content: escaped as serde_json would inside quotes.
    Json,
}

/// Parameter values that each matched their pattern.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Params(BTreeMap<String, String>);

/// One problem in a runbook file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckError {
    pub file: PathBuf,
    /// 1-based line the error points at, or 0 when unknown. Found from the
    /// text by the error's location and key (YAML values carry no spans).
    pub line: usize,
    /// `""`, `"params.gpu"`, `"steps[2] drain"`…
    pub location: String,
    pub key: String,
    pub message: String,
}

/// Every problem found, in file order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CheckErrors(pub Vec<CheckError>);

/// A parameter that could not be resolved or failed its pattern.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParamError {
    pub param: String,
    pub message: String,
}

/// Every parameter problem at once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParamErrors(pub Vec<ParamError>);

/// Runbooks loaded from one directory, sorted by id.
#[derive(Debug, Clone, Default)]
pub struct RunbookSet {
    pub runbooks: Vec<Runbook>,
}

impl fmt::Display for CheckError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:", self.file.display())?;
        if self.line > 0 {
            write!(f, "{}:", self.line)?;
        }
        if !self.location.is_empty() {
            write!(f, " {}:", self.location)?;
        }
        if !self.key.is_empty() {
            write!(f, " {}:", self.key)?;
        }
        write!(f, " {}", self.message)
    }
}

impl fmt::Display for CheckErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for CheckErrors {}

impl fmt::Display for ParamErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                write!(f, "; ")?;
            }
            write!(f, "parameter {}: {}", e.param, e.message)?;
        }
        Ok(())
    }
}

impl std::error::Error for ParamErrors {}

impl Phase {
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Investigate => "investigate",
            Phase::Mitigate => "mitigate",
            Phase::Escalate => "escalate",
        }
    }
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Command => "command",
            Kind::Http => "http",
            Kind::Promql => "promql",
        }
    }
}

impl Target {
    pub fn as_str(self) -> &'static str {
        match self {
            Target::Node => "node",
            Target::Bot => "bot",
        }
    }
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Viewer => "viewer",
            Role::Operator => "operator",
            Role::Admin => "admin",
        }
    }
}

impl HttpMethod {
    pub fn as_str(self) -> &'static str {
        match self {
            HttpMethod::Get => "GET",
            HttpMethod::Post => "POST",
            HttpMethod::Put => "PUT",
        }
    }
}

impl Step {
    pub fn kind(&self) -> Kind {
        match self.action {
            Action::Command { .. } => Kind::Command,
            Action::Http { .. } => Kind::Http,
            Action::Promql { .. } => Kind::Promql,
        }
    }

    /// Names of the parameters this step uses, sorted.
    pub fn params_used(&self) -> BTreeSet<&str> {
        let mut out = BTreeSet::new();
        for t in self.templates() {
            out.extend(t.params());
        }
        out
    }

    fn templates(&self) -> Vec<&Template> {
        let action: Vec<&Template> = match &self.action {
            Action::Command { argv } => argv.iter().collect(),
            Action::Http { url, body, .. } => std::iter::once(url).chain(body.as_ref()).collect(),
            Action::Promql { query } => vec![query],
        };
        action
            .into_iter()
            .chain(self.state_on_success.as_ref())
            .chain(self.state_on_failure.as_ref())
            .collect()
    }
}

impl Template {
    /// Splits `text` at `{{name}}` placeholders.
    pub fn parse(text: &str) -> Result<Template, String> {
        let mut parts = Vec::new();
        let mut rest = text;
        while let Some(start) = rest.find("{{") {
            let after = &rest[start + 2..];
            let Some(end) = after.find("}}") else {
                return Err(format!("unclosed `{{{{` in {text:?}"));
            };
            let name = after[..end].trim();
            if !is_param_name(name) {
                return Err(format!(
                    "bad placeholder `{{{{{}}}}}`: a parameter name is lower-case letters, digits and `_`",
                    &after[..end]
                ));
            }
            if start > 0 {
                parts.push(Part::Text(rest[..start].to_string()));
            }
            parts.push(Part::Param(name.to_string()));
            rest = &after[end + 2..];
        }
        if rest.contains("}}") {
            return Err(format!("stray `}}}}` in {text:?}"));
        }
        if !rest.is_empty() {
            parts.push(Part::Text(rest.to_string()));
        }
        Ok(Template { parts })
    }

    /// Parameter names referenced.
    pub fn params(&self) -> impl Iterator<Item = &str> {
        self.parts.iter().filter_map(|p| match p {
            Part::Param(n) => Some(n.as_str()),
            Part::Text(_) => None,
        })
    }

    /// Substitutes validated values, each exactly once (values are never
    /// re-scanned). Missing values are an error naming them.
    pub fn render(&self, params: &Params, escape: Escape) -> Result<String, ParamErrors> {
        let mut out = String::new();
        let mut missing = Vec::new();
        for p in &self.parts {
            match p {
                Part::Text(t) => out.push_str(t),
                Part::Param(n) => match params.get(n) {
                    Some(v) => escape_into(&mut out, v, escape),
                    None => missing.push(ParamError {
                        param: n.clone(),
                        message: "has no value".into(),
                    }),
                },
            }
        }
        if missing.is_empty() {
            Ok(out)
        } else {
            Err(ParamErrors(missing))
        }
    }

    /// The template as written.
    pub fn source(&self) -> String {
        let mut s = String::new();
        for p in &self.parts {
            match p {
                Part::Text(t) => s.push_str(t),
                Part::Param(n) => {
                    s.push_str("{{");
                    s.push_str(n);
                    s.push_str("}}");
                }
            }
        }
        s
    }
}

impl Params {
    pub fn get(&self, name: &str) -> Option<&str> {
        self.0.get(name).map(String::as_str)
    }

    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.0.iter().map(|(k, v)| (k.as_str(), v.as_str()))
    }

    pub fn as_map(&self) -> &BTreeMap<String, String> {
        &self.0
    }
}

impl Param {
    /// Checks `value` against the anchored pattern (and the universal limits:
    /// at most [`MAX_PARAM_LEN`] bytes, no control characters). If the pattern
    /// has a capture group named `value`, the parameter takes that group (so
    /// `(?P<value>[a-z0-9.-]+)(:[0-9]+)?` turns `node1:9949` into `node1`).
    pub fn validate(&self, value: &str) -> Result<String, String> {
        if value.len() > MAX_PARAM_LEN {
            return Err(format!("longer than {MAX_PARAM_LEN} bytes"));
        }
        if value.chars().any(char::is_control) {
            return Err("contains a control character (newline, tab, NUL…)".into());
        }
        if value.chars().any(is_invisible_format_char) {
            return Err("contains an invisible or bidirectional-override character".into());
        }
        let Some(caps) = self.pattern.captures(value) else {
            return Err(format!(
                "{value:?} does not match pattern {}",
                self.pattern_source
            ));
        };
        Ok(caps
            .name("value")
            .map(|m| m.as_str())
            .unwrap_or(value)
            .to_string())
    }
}

impl LabelMatcher {
    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        let v = labels.get(&self.label).map(String::as_str).unwrap_or("");
        self.regex.is_match(v)
    }
}

impl Trigger {
    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.matchers.iter().all(|m| m.matches(labels))
    }
}

impl fmt::Display for Trigger {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{{")?;
        for (i, m) in self.matchers.iter().enumerate() {
            if i > 0 {
                write!(f, ",")?;
            }
            write!(f, "{}=~{:?}", m.label, m.source)?;
        }
        write!(f, "}}")
    }
}

impl Runbook {
    pub fn step(&self, name: &str) -> Option<&Step> {
        self.steps.iter().find(|s| s.name == name)
    }

    pub fn param(&self, name: &str) -> Option<&Param> {
        self.params.iter().find(|p| p.name == name)
    }

    /// True when any trigger matches the alert's labels.
    pub fn answers(&self, labels: &BTreeMap<String, String>) -> bool {
        self.triggers.iter().any(|t| t.matches(labels))
    }

    /// Resolves every declared parameter: an explicit value first, then the
    /// `from_label` alert label (or, without an alert, a given value of that
    /// name, so `instance=host:9949` fills `node` from_label instance), then
    /// the default. Each value must match its
    /// pattern. Unknown explicit names and parameters left without a value
    /// are errors; all are reported at once.
    pub fn resolve_params(
        &self,
        given: &BTreeMap<String, String>,
        labels: &BTreeMap<String, String>,
    ) -> Result<Params, ParamErrors> {
        let mut errors = Vec::new();
        for k in given.keys() {
            if self.param(k).is_none() {
                errors.push(ParamError {
                    param: k.clone(),
                    message: format!("runbook {} has no such parameter", self.id),
                });
            }
        }
        let mut values = BTreeMap::new();
        for p in &self.params {
            let (raw, source) = if let Some(v) = given.get(&p.name) {
                (v.as_str(), "given".to_string())
            } else if let Some(v) = p
                .from_label
                .as_ref()
                .and_then(|l| labels.get(l).or_else(|| given.get(l)))
            {
                (
                    v.as_str(),
                    format!("from label {}", p.from_label.as_deref().unwrap_or("")),
                )
            } else if let Some(v) = &p.default {
                (v.as_str(), "default".to_string())
            } else {
                let hint = match &p.from_label {
                    Some(l) => format!("no value given, alert has no {l} label, no default"),
                    None => "no value given and no default".to_string(),
                };
                errors.push(ParamError {
                    param: p.name.clone(),
                    message: hint,
                });
                continue;
            };
            match p.validate(raw) {
                Ok(v) => {
                    values.insert(p.name.clone(), v);
                }
                Err(m) => errors.push(ParamError {
                    param: p.name.clone(),
                    message: format!("{m} ({source})"),
                }),
            }
        }
        if errors.is_empty() {
            Ok(Params(values))
        } else {
            Err(ParamErrors(errors))
        }
    }
}

impl RunbookSet {
    /// Loads every `*.yaml` / `*.yml` file of `dir`, keeping the valid
    /// runbooks and returning every error found (a duplicate id keeps the
    /// first file's runbook).
    pub fn load_dir(dir: &Path) -> (RunbookSet, CheckErrors) {
        let mut errors = Vec::new();
        let mut files = match std::fs::read_dir(dir) {
            Ok(rd) => rd
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| {
                    matches!(
                        p.extension().and_then(|e| e.to_str()),
                        Some("yaml") | Some("yml")
                    )
                })
                .collect::<Vec<_>>(),
            Err(e) => {
                errors.push(CheckError {
                    file: dir.to_path_buf(),
                    line: 0,
                    location: String::new(),
                    key: String::new(),
                    message: format!("cannot read runbook directory: {e}"),
                });
                Vec::new()
            }
        };
        files.sort();
        let mut runbooks: Vec<Runbook> = Vec::new();
        for f in files {
            match load_file(&f) {
                Ok(rb) => {
                    if let Some(first) = runbooks.iter().find(|r| r.id == rb.id) {
                        errors.push(CheckError {
                            file: f.clone(),
                            line: std::fs::read_to_string(&f)
                                .map(|t| locate(&t, "", "id"))
                                .unwrap_or(0),
                            location: String::new(),
                            key: "id".into(),
                            message: format!(
                                "duplicate id {:?} (also in {})",
                                rb.id,
                                first.source.display()
                            ),
                        });
                    } else {
                        runbooks.push(rb);
                    }
                }
                Err(e) => errors.extend(e.0),
            }
        }
        runbooks.sort_by(|a, b| a.id.cmp(&b.id));
        (RunbookSet { runbooks }, CheckErrors(errors))
    }

    pub fn get(&self, id: &str) -> Option<&Runbook> {
        self.runbooks.iter().find(|r| r.id == id)
    }

    /// Runbooks whose triggers match an alert's labels, by id.
    pub fn suggest(&self, labels: &BTreeMap<String, String>) -> Vec<&Runbook> {
        self.runbooks.iter().filter(|r| r.answers(labels)).collect()
    }
}

/// Reads and validates one runbook file. Its id must equal the file stem.
pub fn load_file(path: &Path) -> Result<Runbook, CheckErrors> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        CheckErrors(vec![CheckError {
            file: path.to_path_buf(),
            line: 0,
            location: String::new(),
            key: String::new(),
            message: format!("cannot read: {e}"),
        }])
    })?;
    let rb = parse_runbook(path, &text)?;
    let stem = path.file_stem().and_then(|s| s.to_str()).unwrap_or("");
    if rb.id != stem {
        return Err(CheckErrors(vec![CheckError {
            file: path.to_path_buf(),
            line: locate(&text, "", "id"),
            location: String::new(),
            key: "id".into(),
            message: format!("id {:?} must equal the file name ({stem:?})", rb.id),
        }]));
    }
    Ok(rb)
}

/// Checks that `id` is a plausible runbook id (so it can name a file safely).
pub fn is_runbook_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 64
        && id
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !id.starts_with('-')
}

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
fn locate(text: &str, location: &str, key: &str) -> usize {
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
fn is_invisible_format_char(c: char) -> bool {
    matches!(c, '\u{200B}'..='\u{200F}' | '\u{202A}'..='\u{202E}' | '\u{2060}'..='\u{2069}' | '\u{FEFF}' | '\u{00AD}')
}

fn is_param_name(s: &str) -> bool {
    let mut b = s.bytes();
    matches!(b.next(), Some(c) if c.is_ascii_lowercase() || c == b'_')
        && b.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'_')
        && s.len() <= 64
}

fn is_step_name(s: &str) -> bool {
    is_runbook_id(s)
}

fn escape_into(out: &mut String, v: &str, escape: Escape) {
    match escape {
        Escape::None => out.push_str(v),
        Escape::Url => {
            for b in v.bytes() {
                if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~' | b':') {
                    out.push(b as char);
                } else {
                    out.push_str(&format!("%{b:02X}"));
                }
            }
        }
        Escape::Promql => {
            for c in v.chars() {
                match c {
                    '\\' => out.push_str("\\\\"),
                    '"' => out.push_str("\\\""),
                    '\'' => out.push_str("\\'"),
                    '`' => out.push_str("\\x60"),
                    '\n' => out.push_str("\\n"),
                    c if c.is_control() => out.push_str(&format!("\\u{:04x}", c as u32)),
                    c => out.push(c),
                }
            }
        }
        Escape::Json => {
            let quoted = serde_json::Value::String(v.to_string()).to_string();
            out.push_str(&quoted[1..quoted.len() - 1]);
        }
    }
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

    fn step(&mut self, i: usize, v: &Value) -> Option<Step> {
        let name_hint = match v {
            Value::Mapping(m) => m
                .get("name")
                .and_then(|n| n.as_str())
                .unwrap_or("")
                .to_string(),
            _ => String::new(),
        };
        let loc = if name_hint.is_empty() {
            format!("steps[{i}]")
        } else {
            format!("steps[{i}] {name_hint}")
        };
        let fields = self.mapping(v, &loc, "", Some(STEP_KEYS))?;
        let get = |k: &str| fields.iter().find(|(n, _)| n == k).map(|(_, v)| *v);
        let before = self.errors.len();

        let name = match get("name") {
            Some(v) => self.string(v, &loc, "name").and_then(|n| {
                if is_step_name(&n) {
                    Some(n)
                } else {
                    self.err(
                        &loc,
                        "name",
                        "must be lower-case letters, digits and `-` (at most 64)",
                    );
                    None
                }
            }),
            None => {
                self.err(&loc, "name", "is required");
                None
            }
        };
        let description = get("description")
            .and_then(|v| self.string(v, &loc, "description"))
            .unwrap_or_default();
        let phase = match get("phase").map(|v| (v, v.as_str())) {
            None => {
                self.err(
                    &loc,
                    "phase",
                    "is required (investigate, mitigate or escalate)",
                );
                None
            }
            Some((_, Some("investigate"))) => Some(Phase::Investigate),
            Some((_, Some("mitigate"))) => Some(Phase::Mitigate),
            Some((_, Some("escalate"))) => Some(Phase::Escalate),
            Some((v, _)) => {
                self.err(
                    &loc,
                    "phase",
                    format!(
                        "unknown phase {} (expected investigate, mitigate or escalate)",
                        display_value(v)
                    ),
                );
                None
            }
        };
        let kind = match get("kind").map(|v| (v, v.as_str())) {
            None => {
                self.err(&loc, "kind", "is required (command, http or promql)");
                None
            }
            Some((_, Some("command"))) => Some(Kind::Command),
            Some((_, Some("http"))) => Some(Kind::Http),
            Some((_, Some("promql"))) => Some(Kind::Promql),
            Some((v, _)) => {
                self.err(
                    &loc,
                    "kind",
                    format!(
                        "unknown kind {} (expected command, http or promql)",
                        display_value(v)
                    ),
                );
                None
            }
        };
        let target = match get("target").map(|v| (v, v.as_str())) {
            None => match kind {
                Some(Kind::Command) => {
                    self.err(&loc, "target", "is required for commands (node or bot)");
                    None
                }
                _ => Some(Target::Bot),
            },
            Some((_, Some("node"))) => Some(Target::Node),
            Some((_, Some("bot"))) => Some(Target::Bot),
            Some((v, _)) => {
                self.err(
                    &loc,
                    "target",
                    format!("unknown target {} (expected node or bot)", display_value(v)),
                );
                None
            }
        };
        if target == Some(Target::Node) && matches!(kind, Some(Kind::Http) | Some(Kind::Promql)) {
            self.err(
                &loc,
                "target",
                "http and promql steps run where the bot runs: use target: bot",
            );
        }
        let timeout = match get("timeout") {
            None => Some(DEFAULT_STEP_TIMEOUT),
            Some(v) => match v.as_str().map(humantime::parse_duration) {
                Some(Ok(d)) if d >= Duration::from_secs(1) && d <= MAX_STEP_TIMEOUT => Some(d),
                Some(Ok(d)) => {
                    self.err(
                        &loc,
                        "timeout",
                        format!(
                            "{} is out of range (1s to 1h)",
                            humantime::format_duration(d)
                        ),
                    );
                    None
                }
                Some(Err(e)) => {
                    self.err(
                        &loc,
                        "timeout",
                        format!("{} is not a duration like 30s or 2m: {e}", display_value(v)),
                    );
                    None
                }
                None => {
                    self.err(
                        &loc,
                        "timeout",
                        format!(
                            "must be a duration string like 30s, got {}",
                            display_value(v)
                        ),
                    );
                    None
                }
            },
        };
        let needs_approval = match get("needs_approval") {
            None => false,
            Some(Value::Bool(b)) => *b,
            Some(v) => {
                self.err(
                    &loc,
                    "needs_approval",
                    format!("must be true or false, got {}", display_value(v)),
                );
                false
            }
        };
        let roles = match get("roles") {
            None => vec![Role::Operator, Role::Admin],
            Some(Value::Sequence(seq)) if !seq.is_empty() => {
                let mut roles = Vec::new();
                for r in seq {
                    match r.as_str() {
                        Some("operator") => roles.push(Role::Operator),
                        Some("admin") => roles.push(Role::Admin),
                        Some("viewer") => self.err(&loc, "roles", "viewers cannot run steps"),
                        _ => self.err(
                            &loc,
                            "roles",
                            format!(
                                "unknown role {} (expected operator or admin)",
                                display_value(r)
                            ),
                        ),
                    }
                }
                roles
            }
            Some(v) => {
                self.err(
                    &loc,
                    "roles",
                    format!(
                        "must be a non-empty list of roles, got {}",
                        display_value(v)
                    ),
                );
                Vec::new()
            }
        };

        let template = |w: &mut Walker, v: &Value, key: &str| -> Option<Template> {
            let s = w.string(v, &loc, key)?;
            match Template::parse(&s) {
                Ok(t) => {
                    for p in t.params() {
                        if !w.declared.contains(p) {
                            w.err(
                                &loc,
                                key,
                                format!("unknown parameter {{{{{p}}}}} (declare it under params)"),
                            );
                        }
                    }
                    Some(t)
                }
                Err(e) => {
                    w.err(&loc, key, e);
                    None
                }
            }
        };
        let forbid = |w: &mut Walker, keys: &[&str], kind: &str| {
            for k in keys {
                if get(k).is_some() {
                    w.err(&loc, k, format!("not allowed in a {kind} step"));
                }
            }
        };
        let action = match kind {
            Some(Kind::Command) => {
                forbid(self, &["method", "url", "body", "query"], "command");
                match get("run") {
                    None => {
                        self.err(&loc, "run", "is required: an argv array");
                        None
                    }
                    Some(Value::String(s)) => {
                        self.err(
                            &loc,
                            "run",
                            format!(
                                "must be an argv array, not a shell string (write [{}] as separate elements)",
                                s.split_whitespace()
                                    .map(|w| format!("{w:?}"))
                                    .collect::<Vec<_>>()
                                    .join(", ")
                            ),
                        );
                        None
                    }
                    Some(Value::Sequence(seq)) if !seq.is_empty() => {
                        let mut argv = Vec::new();
                        for (j, a) in seq.iter().enumerate() {
                            let key = format!("run[{j}]");
                            match a {
                                Value::String(_) => {
                                    if let Some(t) = template(self, a, &key) {
                                        argv.push(t);
                                    }
                                }
                                Value::Number(_) | Value::Bool(_) => {
                                    let s = scalar_string(a).unwrap_or_default();
                                    argv.push(Template {
                                        parts: vec![Part::Text(s)],
                                    });
                                }
                                other => self.err(
                                    &loc,
                                    &key,
                                    format!("must be a string, got {}", value_kind(other)),
                                ),
                            }
                        }
                        if let Some(first) = argv.first() {
                            if first.params().next().is_some() {
                                self.err(
                                    &loc,
                                    "run[0]",
                                    "the program must be literal, not a parameter",
                                );
                            }
                            let prog = first.source();
                            if matches!(
                                prog.rsplit('/').next(),
                                Some("sh" | "bash" | "dash" | "zsh" | "ksh" | "busybox" | "env")
                            ) {
                                self.err(
                                    &loc,
                                    "run[0]",
                                    format!("{prog:?} would run a shell or an arbitrary program: call the command itself"),
                                );
                            }
                        }
                        Some(Action::Command { argv })
                    }
                    Some(v) => {
                        self.err(
                            &loc,
                            "run",
                            format!("must be a non-empty argv array, got {}", value_kind(v)),
                        );
                        None
                    }
                }
            }
            Some(Kind::Http) => {
                forbid(self, &["run", "query"], "http");
                let method = match get("method").map(|v| (v, v.as_str())) {
                    None => Some(HttpMethod::Get),
                    Some((_, Some(m))) if m.eq_ignore_ascii_case("get") => Some(HttpMethod::Get),
                    Some((_, Some(m))) if m.eq_ignore_ascii_case("post") => Some(HttpMethod::Post),
                    Some((_, Some(m))) if m.eq_ignore_ascii_case("put") => Some(HttpMethod::Put),
                    Some((v, _)) => {
                        self.err(
                            &loc,
                            "method",
                            format!("unknown method {} (GET, POST or PUT)", display_value(v)),
                        );
                        None
                    }
                };
                let url = match get("url") {
                    None => {
                        self.err(&loc, "url", "is required");
                        None
                    }
                    Some(v) => template(self, v, "url").and_then(|t| {
                        let src = t.source();
                        let starts_with_param = matches!(t.parts.first(), Some(Part::Param(_)));
                        if starts_with_param
                            || !(src.starts_with("http://") || src.starts_with("https://"))
                        {
                            self.err(&loc, "url", "must start with a literal http:// or https://");
                            None
                        } else {
                            Some(t)
                        }
                    }),
                };
                let body = get("body").and_then(|v| template(self, v, "body"));
                match (method, url) {
                    (Some(method), Some(url)) => Some(Action::Http { method, url, body }),
                    _ => None,
                }
            }
            Some(Kind::Promql) => {
                forbid(self, &["run", "method", "url", "body"], "promql");
                match get("query") {
                    None => {
                        self.err(&loc, "query", "is required");
                        None
                    }
                    Some(v) => template(self, v, "query").map(|query| Action::Promql { query }),
                }
            }
            None => None,
        };
        if self.errors.len() > before {
            return None;
        }
        let flow = self.flow(&loc, get, phase);
        let approval_group =
            get("approval_group").and_then(|v| self.group_name(v, &loc, "approval_group"));
        let state_on_success =
            get("state_on_success").and_then(|v| template(self, v, "state_on_success"));
        let state_on_failure =
            get("state_on_failure").and_then(|v| template(self, v, "state_on_failure"));
        if phase != Some(Phase::Mitigate) {
            for k in ["state_on_success", "state_on_failure"] {
                if get(k).is_some() {
                    self.err(&loc, k, "only mitigations change the node's state");
                }
            }
        }
        if approval_group.is_some() && !needs_approval {
            self.err(
                &loc,
                "approval_group",
                "only steps with needs_approval: true have an approval to share",
            );
        }
        if self.errors.len() > before {
            return None;
        }
        Some(Step {
            name: name?,
            description,
            phase: phase?,
            target: target?,
            timeout: timeout?,
            needs_approval,
            roles,
            action: action?,
            flow,
            approval_group,
            state_on_success,
            state_on_failure,
        })
    }
}

impl Walker {
    /// `when`, `requires`, `alternative`, `only_if_exists` of one step.
    fn flow<'v>(
        &mut self,
        loc: &str,
        get: impl Fn(&str) -> Option<&'v Value>,
        phase: Option<Phase>,
    ) -> Flow {
        let mut flow = Flow::default();
        if let Some(v) = get("when") {
            match v.as_str() {
                Some("previous_succeeded") => {
                    flow.previous_succeeded = true;
                    flow.declared = true;
                }
                _ => self.err(
                    loc,
                    "when",
                    format!(
                        "unknown condition {} (expected previous_succeeded)",
                        display_value(v)
                    ),
                ),
            }
        }
        match get("requires") {
            None => {}
            Some(Value::Sequence(seq)) => {
                flow.declared = true;
                for n in seq {
                    match n.as_str() {
                        Some(n) if is_step_name(n) => flow.requires.push(n.to_string()),
                        _ => self.err(
                            loc,
                            "requires",
                            format!("{} is not a step name", display_value(n)),
                        ),
                    }
                }
            }
            Some(v) => self.err(
                loc,
                "requires",
                format!(
                    "must be a list of step names ([] for none), got {}",
                    display_value(v)
                ),
            ),
        }
        flow.alternative = get("alternative").and_then(|v| self.group_name(v, loc, "alternative"));
        if let Some(v) = get("only_if_exists") {
            match v.as_str() {
                Some(p) if is_plain_absolute_path(p) => flow.only_if_exists = Some(p.to_string()),
                _ => self.err(
                    loc,
                    "only_if_exists",
                    format!(
                        "{} must be a literal absolute path like /usr/bin/scontrol (no parameters, no ..)",
                        display_value(v)
                    ),
                ),
            }
        }
        if phase == Some(Phase::Escalate) {
            for k in ["when", "requires"] {
                if get(k).is_some() {
                    self.err(
                        loc,
                        k,
                        "escalation steps always run or are offered: they depend on nothing",
                    );
                }
            }
        }
        flow
    }

    fn group_name(&mut self, v: &Value, loc: &str, key: &str) -> Option<String> {
        match v.as_str() {
            Some(n) if is_step_name(n) => Some(n.to_string()),
            _ => {
                self.err(
                    loc,
                    key,
                    format!(
                        "{} must be a name: lower-case letters, digits and `-`",
                        display_value(v)
                    ),
                );
                None
            }
        }
    }

    /// Names in `requires` and `when` point only backwards, at steps or
    /// alternative groups that exist; alternative groups have two or more
    /// members of one phase and do not reuse a step's name.
    fn check_flow(&mut self, steps: &[Step], raw_names: &[String]) {
        let mut groups: BTreeMap<&str, Vec<usize>> = BTreeMap::new();
        for (i, s) in steps.iter().enumerate() {
            if let Some(g) = &s.flow.alternative {
                groups.entry(g.as_str()).or_default().push(i);
            }
        }
        let raw_pos = |name: &str| raw_names.iter().position(|n| n == name);
        let loc_of = |s: &Step| format!("steps[{}] {}", raw_pos(&s.name).unwrap_or(0), s.name);
        for (g, members) in &groups {
            let first = &steps[members[0]];
            let loc = loc_of(first);
            if raw_pos(g).is_some() {
                self.err(
                    &loc,
                    "alternative",
                    format!("group {g:?} has the name of a step: pick another"),
                );
            }
            if members.len() < 2 {
                self.err(
                    &loc,
                    "alternative",
                    format!("group {g:?} has only this step: alternatives need two or more"),
                );
            }
            if members.iter().any(|&m| steps[m].phase != first.phase) {
                self.err(
                    &loc,
                    "alternative",
                    format!("the members of group {g:?} must share one phase"),
                );
            }
        }
        for s in steps {
            let loc = loc_of(s);
            let i = raw_pos(&s.name).unwrap_or(0);
            if s.flow.previous_succeeded && i == 0 {
                self.err(
                    &loc,
                    "when",
                    "previous_succeeded on the first step: there is no step before it",
                );
            }
            for r in &s.flow.requires {
                let at: Vec<usize> = match raw_pos(r) {
                    Some(j) => vec![j],
                    None => groups
                        .get(r.as_str())
                        .map(|m| m.iter().filter_map(|&k| raw_pos(&steps[k].name)).collect())
                        .unwrap_or_default(),
                };
                if at.is_empty() {
                    self.err(
                        &loc,
                        "requires",
                        format!("unknown step {r:?} (no step or alternative group has that name)"),
                    );
                } else if at.contains(&i) {
                    self.err(
                        &loc,
                        "requires",
                        format!("{r:?} is this step itself: a cycle"),
                    );
                } else if at.iter().any(|&j| j > i) {
                    self.err(
                        &loc,
                        "requires",
                        format!(
                            "{r:?} comes later in the file: steps run in file order, so a step may require only earlier ones (move it up)"
                        ),
                    );
                }
            }
        }
    }
}

/// `/usr/bin/scontrol`: absolute, no `..`, no placeholders, plain characters.
fn is_plain_absolute_path(p: &str) -> bool {
    p.starts_with('/')
        && p.len() <= 255
        && !p.split('/').any(|c| c == "..")
        && p.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'/' | b'.' | b'_' | b'-' | b'+'))
}

fn display_value(v: &Value) -> String {
    match v {
        Value::String(s) => format!("{s:?}"),
        other => scalar_string(other).unwrap_or_else(|| value_kind(other).to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Runbook, CheckErrors> {
        parse_runbook(Path::new("t.yaml"), text)
    }

    fn check_errors(text: &str, expect: &[&str]) {
        let errs = parse(text).expect_err("should fail");
        let got: Vec<String> = errs.0.iter().map(|e| e.to_string()).collect();
        assert_eq!(got, expect, "\n{}", errs);
    }

    const GOOD: &str = r#"
id: t
title: T
triggers:
  - alertname: Gpu.*
params:
  gpu: { pattern: '[0-9]{1,2}', from_label: gpu }
  node: { pattern: '(?P<value>[a-z0-9.-]+)(:[0-9]+)?', from_label: instance }
steps:
  - name: ecc
    phase: investigate
    kind: command
    target: node
    run: [nvidia-smi, -q, -i, "{{gpu}}"]
  - name: q
    phase: investigate
    kind: promql
    query: 'up{instance=~"{{node}}.*"}'
"#;

    #[test]
    fn good_runbook_parses() {
        let rb = parse(GOOD).unwrap();
        assert_eq!(rb.steps.len(), 2);
        assert_eq!(rb.steps[0].timeout, DEFAULT_STEP_TIMEOUT);
        assert_eq!(rb.steps[1].target, Target::Bot);
        let labels: BTreeMap<String, String> = [
            ("alertname", "GpuXid"),
            ("gpu", "3"),
            ("instance", "n1:9949"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        assert!(rb.answers(&labels));
        let p = rb.resolve_params(&BTreeMap::new(), &labels).unwrap();
        assert_eq!(p.get("node"), Some("n1"));
        assert_eq!(p.get("gpu"), Some("3"));
        let mut other = labels.clone();
        other.insert("alertname".into(), "NotGpuXid".into());
        assert!(!rb.answers(&other), "triggers are anchored");
    }

    #[test]
    fn shell_string_and_unknown_param_are_reported_together() {
        check_errors(
            r#"
id: t
title: T
steps:
  - name: a
    phase: investigate
    kind: command
    target: node
    run: "nvidia-smi -q; rm -rf /"
  - name: b
    phase: fix
    kind: shell
    target: nowhere
    timeout: soon
    run: ["echo", "{{nope}}"]
"#,
            &[
                "t.yaml:9: steps[0] a: run: must be an argv array, not a shell string (write [\"nvidia-smi\", \"-q;\", \"rm\", \"-rf\", \"/\"] as separate elements)",
                "t.yaml:11: steps[1] b: phase: unknown phase \"fix\" (expected investigate, mitigate or escalate)",
                "t.yaml:12: steps[1] b: kind: unknown kind \"shell\" (expected command, http or promql)",
                "t.yaml:13: steps[1] b: target: unknown target \"nowhere\" (expected node or bot)",
                "t.yaml:14: steps[1] b: timeout: \"soon\" is not a duration like 30s or 2m: expected number at 0",
            ],
        );
    }

    #[test]
    fn errors_point_at_lines_in_block_and_flow_style() {
        check_errors(
            "id: t\ntitle: T\nsteps:\n- {name: a, phase: now, kind: command, target: bot, run: [x]}\n- name: b\n  phase: investigate\n  kind: command\n  target: bot\n  # a comment\n  run: x\n",
            &[
                "t.yaml:4: steps[0] a: phase: unknown phase \"now\" (expected investigate, mitigate or escalate)",
                "t.yaml:10: steps[1] b: run: must be an argv array, not a shell string (write [\"x\"] as separate elements)",
            ],
        );
    }

    #[test]
    fn bad_flow_fields_are_reported_together_with_file_and_step() {
        check_errors(
            r#"
id: t
title: T
steps:
  - name: a
    phase: investigate
    kind: command
    target: node
    when: previous_succeeded
    run: [uptime]
  - name: b
    phase: mitigate
    kind: command
    target: node
    requires: [nope, b, c]
    when: sometimes
    run: [uptime]
  - name: c
    phase: mitigate
    kind: command
    target: node
    alternative: solo
    only_if_exists: "/usr/bin/{{x}}"
    run: [uptime]
  - name: d
    phase: escalate
    kind: command
    target: bot
    requires: [a]
    state_on_success: done
    run: [echo]
"#,
            &[
                "t.yaml:9: steps[0] a: when: previous_succeeded on the first step: there is no step before it",
                "t.yaml:16: steps[1] b: when: unknown condition \"sometimes\" (expected previous_succeeded)",
                "t.yaml:23: steps[2] c: only_if_exists: \"/usr/bin/{{x}}\" must be a literal absolute path like /usr/bin/scontrol (no parameters, no ..)",
                "t.yaml:29: steps[3] d: requires: escalation steps always run or are offered: they depend on nothing",
                "t.yaml:30: steps[3] d: state_on_success: only mitigations change the node's state",
            ],
        );
        check_errors(
            r#"
id: t
title: T
steps:
  - name: a
    phase: investigate
    kind: command
    target: node
    when: previous_succeeded
    run: [uptime]
  - name: b
    phase: mitigate
    kind: command
    target: node
    requires: [nope, b, c]
    run: [uptime]
  - name: c
    phase: mitigate
    kind: command
    target: node
    alternative: solo
    run: [uptime]
"#,
            &[
                "t.yaml:9: steps[0] a: when: previous_succeeded on the first step: there is no step before it",
                "t.yaml:15: steps[1] b: requires: unknown step \"nope\" (no step or alternative group has that name)",
                "t.yaml:15: steps[1] b: requires: \"b\" is this step itself: a cycle",
                "t.yaml:15: steps[1] b: requires: \"c\" comes later in the file: steps run in file order, so a step may require only earlier ones (move it up)",
                "t.yaml:21: steps[2] c: alternative: group \"solo\" has only this step: alternatives need two or more",
            ],
        );
    }

    #[test]
    fn template_rejects_malformed_placeholders() {
        assert!(Template::parse("{{gpu").is_err());
        assert!(Template::parse("{{GPU}}").is_err());
        assert!(Template::parse("a}}b").is_err());
        let t = Template::parse("x={{ gpu }}!").unwrap();
        assert_eq!(t.source(), "x={{gpu}}!");
    }

    #[test]
    fn escapes() {
        let p = Params(
            [("v".to_string(), "a\"b\\c/d e&f".to_string())]
                .into_iter()
                .collect(),
        );
        let t = Template::parse("{{v}}").unwrap();
        assert_eq!(t.render(&p, Escape::None).unwrap(), "a\"b\\c/d e&f");
        assert_eq!(t.render(&p, Escape::Url).unwrap(), "a%22b%5Cc%2Fd%20e%26f");
        assert_eq!(t.render(&p, Escape::Promql).unwrap(), "a\\\"b\\\\c/d e&f");
        assert_eq!(t.render(&p, Escape::Json).unwrap(), "a\\\"b\\\\c/d e&f");
    }
}
