//! The runbook walker's steps: one step's keys ([`Walker::step`]), its
//! flow fields (`when`, `requires`, `alternative`, `only_if_exists`) and the
//! checks across steps (names, dependencies, approval groups).

use crate::runbook::parse::*;

impl Walker {
    pub(super) fn step(&mut self, i: usize, v: &Value) -> Option<Step> {
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
                _ => Some(StepTarget::Bot),
            },
            Some((_, Some("node"))) => Some(StepTarget::Node),
            Some((_, Some("bot"))) => Some(StepTarget::Bot),
            Some((v, _)) => {
                self.err(
                    &loc,
                    "target",
                    format!("unknown target {} (expected node or bot)", display_value(v)),
                );
                None
            }
        };
        if target == Some(StepTarget::Node) && matches!(kind, Some(Kind::Http) | Some(Kind::Promql))
        {
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
        let releases_gpu = match get("releases_gpu") {
            None => false,
            Some(Value::Bool(b)) => *b,
            Some(v) => {
                self.err(
                    &loc,
                    "releases_gpu",
                    format!("must be true or false, got {}", display_value(v)),
                );
                false
            }
        };
        if releases_gpu && (kind != Some(Kind::Command) || target != Some(StepTarget::Node)) {
            self.err(
                &loc,
                "releases_gpu",
                "only a command step with target: node can release the GPU (the node's agent lets go of NVML while it runs)",
            );
        }
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
                forbid(
                    self,
                    &[
                        "method",
                        "url",
                        "body",
                        "query",
                        "fail_if_any",
                        "fail_if_none",
                    ],
                    "command",
                );
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
                forbid(
                    self,
                    &["run", "query", "fail_if_any", "fail_if_none"],
                    "http",
                );
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
                    Some(v) => {
                        let mut check = |key: &str| match get(key) {
                            None => false,
                            Some(Value::Bool(b)) => *b,
                            Some(v) => {
                                self.err(
                                    &loc,
                                    key,
                                    format!("must be true or false, got {}", display_value(v)),
                                );
                                false
                            }
                        };
                        let fail_if_any = check("fail_if_any");
                        let fail_if_none = check("fail_if_none");
                        if fail_if_any && fail_if_none {
                            self.err(
                                &loc,
                                "fail_if_none",
                                "cannot be set together with fail_if_any: the step would fail whatever the query returns (keep one)",
                            );
                        }
                        template(self, v, "query").map(|query| Action::Promql {
                            query,
                            fail_if_any,
                            fail_if_none,
                        })
                    }
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
        let mut node_state = |k: &str| {
            let v = get(k)?;
            let s = v.as_str().and_then(NodeState::parse);
            if s.is_none() {
                self.err(&loc, k, format!("{} is not a node state (expected quarantined, verifying, in_service or awaiting_repair)", display_value(v)));
            }
            s
        };
        let (node_state, node_state_on_failure) = (
            node_state("node_state"),
            node_state("node_state_on_failure"),
        );
        if phase != Some(Phase::Mitigate) {
            for k in [
                "state_on_success",
                "state_on_failure",
                "node_state",
                "node_state_on_failure",
            ] {
                if get(k).is_some() {
                    self.err(&loc, k, "only mitigations change the node's state");
                }
            }
        }
        let nothing_found_exit = match get("nothing_found_exit") {
            None => None,
            Some(v) => match v.as_i64() {
                Some(n @ 1..=255) => {
                    if kind != Some(Kind::Command) {
                        self.err(
                            &loc,
                            "nothing_found_exit",
                            "only command steps have an exit status",
                        );
                    } else if phase != Some(Phase::Investigate) {
                        self.err(
                            &loc,
                            "nothing_found_exit",
                            "only investigate steps look for something: a mitigation that exits non-zero failed",
                        );
                    }
                    Some(n as i32)
                }
                _ => {
                    self.err(
                        &loc,
                        "nothing_found_exit",
                        format!(
                            "must be an exit status from 1 to 255, got {}",
                            display_value(v)
                        ),
                    );
                    None
                }
            },
        };
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
            releases_gpu,
            roles,
            action: action?,
            flow,
            approval_group,
            state_on_success,
            state_on_failure,
            node_state,
            node_state_on_failure,
            nothing_found_exit,
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
                        Some(n) if n.strip_suffix('?').is_some_and(is_step_name) => flow
                            .requires_if_available
                            .push(n.trim_end_matches('?').to_string()),
                        _ => self.err(
                            loc,
                            "requires",
                            format!(
                                "{} is not a step name (or a step name and `?`: succeeded or not available there)",
                                display_value(n)
                            ),
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
    pub(super) fn check_flow(&mut self, steps: &[Step], raw_names: &[String]) {
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
            for r in s.flow.requires.iter().chain(&s.flow.requires_if_available) {
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
    use std::path::Path;

    use crate::runbook::parse::parse_runbook;

    const RUNBOOK: &str = r#"
id: t
title: T
steps:
  - name: reset
    phase: mitigate
    kind: command
    target: node
    needs_approval: true
    releases_gpu: true
    run: [nvidia-smi, -r]
  - name: plain
    phase: investigate
    kind: command
    target: node
    run: [nvidia-smi, -q]
"#;

    const CHECKS: &str = r#"
id: t
title: T
steps:
  - name: pending
    phase: investigate
    kind: promql
    fail_if_none: true
    query: 'gpu_remapped_rows{state="pending"} > 0'
  - name: failed
    phase: investigate
    kind: promql
    fail_if_any: true
    query: 'gpu_remapped_rows{state="failure"} > 0'
  - name: plain
    phase: investigate
    kind: promql
    query: up
"#;

    /// `fail_if_none: true` (the counterpart of `fail_if_any`): a PromQL
    /// check that succeeds only when the query finds something.
    #[test]
    fn fail_if_none_is_parsed_on_promql_steps() {
        use crate::runbook::Action;
        let rb = parse_runbook(Path::new("t.yaml"), CHECKS).unwrap();
        let flags: Vec<(bool, bool)> = rb
            .steps
            .iter()
            .map(|s| match s.action {
                Action::Promql {
                    fail_if_any,
                    fail_if_none,
                    ..
                } => (fail_if_any, fail_if_none),
                _ => panic!("{}: not promql", s.name),
            })
            .collect();
        assert_eq!(flags, [(false, true), (true, false), (false, false)]);
    }

    /// Both keys on one step is an error naming file, line, step and key,
    /// reported together with the file's other errors (a non-boolean
    /// value, the key on a command step).
    #[test]
    fn fail_if_any_and_fail_if_none_together_is_an_error_naming_file_step_and_key() {
        let text = CHECKS
            .replacen(
                "    fail_if_none: true\n",
                "    fail_if_none: true\n    fail_if_any: true\n",
                1,
            )
            .replacen("    fail_if_any: true\n    query: 'gpu_remapped_rows{state=\"failure\"}", "    fail_if_none: maybe\n    query: 'gpu_remapped_rows{state=\"failure\"}", 1)
            + "  - name: cmd\n    phase: investigate\n    kind: command\n    target: node\n    fail_if_none: true\n    run: [uptime]\n";
        let errs = parse_runbook(Path::new("t.yaml"), &text).unwrap_err();
        let got: Vec<String> = errs.0.iter().map(|e| e.to_string()).collect();
        assert_eq!(
            got,
            [
                "t.yaml:8: steps[0] pending: fail_if_none: cannot be set together with fail_if_any: the step would fail whatever the query returns (keep one)",
                "t.yaml:14: steps[1] failed: fail_if_none: must be true or false, got \"maybe\"",
                "t.yaml:24: steps[3] cmd: fail_if_none: not allowed in a command step",
            ],
            "{errs}"
        );
    }

    #[test]
    fn releases_gpu_step_field_is_parsed_and_validated() {
        let rb = parse_runbook(Path::new("t.yaml"), RUNBOOK).unwrap();
        assert!(rb.steps[0].releases_gpu);
        assert!(!rb.steps[1].releases_gpu);
        let not_bool = RUNBOOK.replace("releases_gpu: true", "releases_gpu: yes please");
        let e = parse_runbook(Path::new("t.yaml"), &not_bool)
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("releases_gpu: must be true or false"), "{e}");
        let on_bot = RUNBOOK.replacen("target: node", "target: bot", 1);
        let e = parse_runbook(Path::new("t.yaml"), &on_bot)
            .err()
            .unwrap()
            .to_string();
        assert!(
            e.contains("releases_gpu: only a command step with target: node"),
            "{e}"
        );
    }

    #[test]
    fn node_state_step_field_is_parsed_and_validated() {
        use crate::runbook::NodeState;
        let with = RUNBOOK.replace(
            "releases_gpu: true",
            "releases_gpu: true\n    node_state: verifying\n    node_state_on_failure: awaiting-repair",
        );
        let rb = parse_runbook(Path::new("t.yaml"), &with).unwrap();
        assert_eq!(rb.steps[0].node_state, Some(NodeState::Verifying));
        assert_eq!(
            rb.steps[0].node_state_on_failure,
            Some(NodeState::AwaitingRepair)
        );
        assert_eq!(rb.steps[1].node_state, None);
        let bad = with.replace("node_state: verifying", "node_state: broken");
        let e = parse_runbook(Path::new("t.yaml"), &bad)
            .err()
            .unwrap()
            .to_string();
        assert!(
            e.contains("node_state: \"broken\" is not a node state"),
            "{e}"
        );
        let investigate = RUNBOOK.replace(
            "[nvidia-smi, -q]",
            "[nvidia-smi, -q]\n    node_state: quarantined",
        );
        let e = parse_runbook(Path::new("t.yaml"), &investigate)
            .err()
            .unwrap()
            .to_string();
        assert!(
            e.contains("node_state: only mitigations change the node's state"),
            "{e}"
        );
    }

    /// `nothing_found_exit: 1` on an investigate command step is read; on a
    /// mitigation, on a PromQL step or out of range it is an error naming
    /// file, line, step and key.
    #[test]
    fn nothing_found_exit_is_for_investigate_commands_only() {
        let head = "id: t\ntitle: t\nsteps:\n";
        let ok = format!("{head}  - name: log\n    phase: investigate\n    kind: command\n    target: node\n    nothing_found_exit: 1\n    run: [journalctl, -k, --grep, Xid]\n");
        let rb = parse_runbook(Path::new("t.yaml"), &ok).unwrap();
        assert_eq!(rb.steps[0].nothing_found_exit, Some(1));

        let bad = format!(
            "{head}  - name: drain\n    phase: mitigate\n    kind: command\n    target: node\n    needs_approval: true\n    nothing_found_exit: 1\n    run: [scontrol, update]\n  - name: q\n    phase: investigate\n    kind: promql\n    nothing_found_exit: 1\n    query: up\n  - name: big\n    phase: investigate\n    kind: command\n    target: node\n    nothing_found_exit: 256\n    run: [lsof]\n"
        );
        let errs = parse_runbook(Path::new("t.yaml"), &bad).unwrap_err();
        let got: Vec<String> = errs.0.iter().map(|e| e.to_string()).collect();
        assert_eq!(
            got,
            [
                "t.yaml:9: steps[0] drain: nothing_found_exit: only investigate steps look for something: a mitigation that exits non-zero failed",
                "t.yaml:14: steps[1] q: nothing_found_exit: only command steps have an exit status",
                "t.yaml:20: steps[2] big: nothing_found_exit: must be an exit status from 1 to 255, got 256",
            ],
            "{errs}"
        );
    }
}
