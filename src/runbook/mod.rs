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
mod parse;

pub use parse::parse_runbook;
use parse::{is_invisible_format_char, is_param_name, locate};

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use regex::Regex;

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

/// Where a step runs (its `target:` key); not to be confused with
/// `routing::Target`, a place messages go.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum StepTarget {
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
    pub target: StepTarget,
    pub timeout: Duration,
    pub needs_approval: bool,
    /// `releases_gpu: true`: the node's agent releases NVML while the step
    /// runs (closes its handles, `nvmlShutdown`, GPU collector paused) and
    /// initialises it again afterwards, so the driver can reset a GPU.
    pub releases_gpu: bool,
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
    /// `node_state` / `node_state_on_failure`: the node's tracked state
    /// (`lifecycle`) once this mitigation succeeded / failed.
    pub node_state: Option<NodeState>,
    pub node_state_on_failure: Option<NodeState>,
    /// `nothing_found_exit: N` (investigate command steps):
    /// the exit status with which the command says it found nothing
    /// (`journalctl --grep`, `lsof`, `fuser`, `grep`: 1). That is an answer,
    /// not a failure: the step succeeds and its output says "nothing found".
    pub nothing_found_exit: Option<i32>,
}

/// Where a node stands between a fault and its return (`src/lifecycle.rs`
/// tracks it in the store; a runbook step's `node_state` sets it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum NodeState {
    InService,
    /// Drained or cordoned: no new work lands on it.
    Quarantined,
    /// Hardware must be replaced (a remap failure, a repeated XID 79, an RMA).
    AwaitingRepair,
    /// Repaired or rebooted, being checked before it returns.
    Verifying,
}

impl NodeState {
    pub const ALL: [NodeState; 4] = [
        NodeState::InService,
        NodeState::Quarantined,
        NodeState::AwaitingRepair,
        NodeState::Verifying,
    ];

    /// The stored and exported name (`in_service`, `awaiting_repair`, …).
    pub fn as_str(self) -> &'static str {
        match self {
            NodeState::InService => "in_service",
            NodeState::Quarantined => "quarantined",
            NodeState::AwaitingRepair => "awaiting_repair",
            NodeState::Verifying => "verifying",
        }
    }

    /// In words, for people.
    pub fn words(self) -> &'static str {
        match self {
            NodeState::InService => "in service",
            NodeState::Quarantined => "quarantined",
            NodeState::AwaitingRepair => "awaiting repair",
            NodeState::Verifying => "verifying",
        }
    }

    /// `in_service`, `in-service` or `in service` (any case).
    pub fn parse(s: &str) -> Option<NodeState> {
        let k = s.trim().to_ascii_lowercase().replace(['-', ' '], "_");
        NodeState::ALL.into_iter().find(|n| n.as_str() == k)
    }
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
    /// `requires: [verify-dcgm?]`: the named earlier step (or group)
    /// succeeded or was not available where it would run (its binary is not
    /// installed): a check that may be missing holds the step back only
    /// when it ran and did not pass (failed, timed out, denied, skipped…).
    pub requires_if_available: Vec<String>,
    /// `when` or `requires` was given: only they decide. A mitigation
    /// without either is held back by any earlier mitigation of the run
    /// that failed, timed out, was denied, expired or was skipped; a
    /// privileged step (`needs_approval`, any phase) without either by any
    /// earlier privileged step that was denied or expired and any earlier
    /// mitigation that failed or timed out.
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
        /// `fail_if_any: true`: the step fails when the query returns any
        /// series (a check such as "no row remap failure on this GPU" that
        /// the steps after it can `require`).
        fail_if_any: bool,
        /// `fail_if_none: true`: the step fails when the query returns no
        /// series, so it succeeds only when it finds something (a check such
        /// as "a row remap is pending on this GPU" that gates a reset).
        /// Never together with `fail_if_any` (the parser refuses both).
        fail_if_none: bool,
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

impl StepTarget {
    pub fn as_str(self) -> &'static str {
        match self {
            StepTarget::Node => "node",
            StepTarget::Bot => "bot",
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
            Action::Promql { query, .. } => vec![query],
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
        assert_eq!(rb.steps[1].target, StepTarget::Bot);
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
