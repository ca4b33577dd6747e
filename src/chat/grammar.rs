//! The chat command grammar: `/gpuops` command text ([`parse_command`]:
//! tokens, quoting, Slack's escapes) into a [`Command`], button values into
//! a [`ButtonAction`], and [`USAGE`]. No I/O, no dispatch.

use crate::chat::*;

/// A `/gpuops` command.
#[derive(Debug, Clone, PartialEq)]
pub enum Command {
    Help,
    Status {
        node: Option<String>,
    },
    Alerts,
    Ack {
        target: String,
    },
    Silence {
        matchers: Vec<Matcher>,
        duration: Duration,
        comment: Option<String>,
    },
    Unsilence {
        id: String,
    },
    Runbooks {
        alertname: Option<String>,
    },
    Run {
        runbook: String,
        /// Only these steps (`run gpu-xid:kernel-log,gpu-reset`); all when `None`.
        steps: Option<Vec<String>>,
        /// The alert group whose labels fill parameters and whose thread
        /// gets the output (`alert=<id>`).
        alert: Option<i64>,
        params: BTreeMap<String, String>,
    },
    Approve {
        run: String,
    },
    Deny {
        run: String,
    },
    /// `nodes`: the nodes not in service.
    Nodes,
    /// `node <name> awaiting-repair|return ["reason"]`.
    Node {
        node: String,
        state: crate::lifecycle::NodeState,
        reason: Option<String>,
    },
}

/// A button press on an alert message, or on an approval request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ButtonAction {
    Ack {
        group: i64,
    },
    Silence1h {
        group: i64,
    },
    Run {
        group: i64,
        runbook: String,
    },
    /// Approve the step run `run` waits on (same checks as `/gpuops approve`).
    /// `run` is the button's value, `<run>.<step>.<nonce>`
    /// ([`approvals::button_value`]): only the request it was posted with.
    Approve {
        run: String,
    },
    /// Deny it (same checks as `/gpuops deny`; same value).
    Deny {
        run: String,
    },
}

pub const USAGE: &str = "\
*gpuops commands*
`help` this text
`status [node]` open alert groups by tier, or the alerts of one node (its name or instance)
`alerts` open alert groups with their ids
`ack <group-id|alertname>` acknowledge (operators)
`silence <alertname|matchers> <duration> [comment]` silence in AlertManager, e.g. `silence alertname=GpuXid,instance=~\"node1.*\" 2h reboot planned` (operators)
`unsilence <silence-id>` expire a silence (operators)
`runbooks [alertname]` list runbooks, or those answering an alert
`run <runbook>[:step,step] [alert=<group-id>] [param=value ...]` run a runbook (operators; mitigations wait for a second person's approval)
`nodes` the nodes out of service: state, since, why, who acted last, GPU-hours lost
`node <node> awaiting-repair|quarantined|verifying|return [\"reason\"]` set a node's state, e.g. `node gpu-node-17 awaiting-repair \"RMA 12345\"` (operators)
`approve <run-id>` / `deny <run-id>` decide a step that waits for approval (admins; not your own request; or press Approve / Deny on the request)";

/// Parses the text after `/gpuops`. Errors are the message to show,
/// including the usage text.
pub fn parse_command(text: &str) -> Result<Command, String> {
    let text = unescape_slack(text);
    let tokens = tokenize(&text)?;
    let Some((first, rest)) = tokens.split_first() else {
        return Ok(Command::Help);
    };
    let usage = |line: &str| Err(format!("usage: `{line}`\n\n{USAGE}"));
    match first.to_ascii_lowercase().as_str() {
        "help" | "-h" | "--help" => Ok(Command::Help),
        "status" => match rest {
            [] => Ok(Command::Status { node: None }),
            [n] if is_hostish(n) => Ok(Command::Status {
                node: Some(n.clone()),
            }),
            _ => usage("status [node]"),
        },
        "alerts" if rest.is_empty() => Ok(Command::Alerts),
        "alerts" => usage("alerts"),
        "ack" => match rest {
            [t] if t.len() <= 128 && !t.chars().any(char::is_control) => {
                Ok(Command::Ack { target: t.clone() })
            }
            _ => usage("ack <group-id|alertname>"),
        },
        "silence" => {
            // The first token that reads as a duration ends the matchers (so
            // `a=b, c=d 1h` works); the rest is the comment.
            let Some(k) = rest
                .iter()
                .enumerate()
                .skip(1)
                .find(|(_, t)| humantime::parse_duration(t).is_ok())
                .map(|(i, _)| i)
            else {
                return usage("silence <alertname|matchers> <duration> [comment]");
            };
            let matchers = alertmanager::parse_matchers(&rest[..k].join(" "))
                .map_err(|e| format!("silence: {e}\n\n{USAGE}"))?;
            let duration = alertmanager::parse_silence_duration(&rest[k])
                .map_err(|e| format!("silence: {e}"))?;
            let comment = rest[k + 1..].join(" ");
            if comment.chars().count() > 500 || comment.chars().any(char::is_control) {
                return Err(
                    "silence: the comment must be one line of at most 500 characters".into(),
                );
            }
            Ok(Command::Silence {
                matchers,
                duration,
                comment: (!comment.is_empty()).then_some(comment),
            })
        }
        "unsilence" => match rest {
            [id] if alertmanager::is_silence_id(id) => Ok(Command::Unsilence { id: id.clone() }),
            [id] => Err(format!("unsilence: {id:?} is not a silence id")),
            _ => usage("unsilence <silence-id>"),
        },
        "runbooks" => match rest {
            [] => Ok(Command::Runbooks { alertname: None }),
            [a] if is_label_value(a) => Ok(Command::Runbooks {
                alertname: Some(a.clone()),
            }),
            _ => usage("runbooks [alertname]"),
        },
        "run" => {
            let Some((target, args)) = rest.split_first() else {
                return usage("run <runbook>[:step,step] [alert=<group-id>] [param=value ...]");
            };
            let (runbook, steps) = match target.split_once(':') {
                Some((r, s)) => {
                    let steps: Vec<String> = s.split(',').map(str::to_string).collect();
                    if steps.iter().any(|s| !is_step_argument(s)) {
                        return Err(format!("run: {s:?} is not a list of step names"));
                    }
                    (r.to_string(), Some(steps))
                }
                None => (target.clone(), None),
            };
            if !crate::runbook::is_runbook_id(&runbook) {
                return Err(format!("run: {runbook:?} is not a runbook id\n\n{USAGE}"));
            }
            let mut params = BTreeMap::new();
            let mut alert = None;
            for a in args {
                let Some((k, v)) = a.split_once('=') else {
                    return Err(format!(
                        "run: {a:?} is not a parameter (write name=value)\n\n{USAGE}"
                    ));
                };
                if k == "alert" {
                    alert = Some(
                        v.trim_start_matches('#')
                            .parse::<i64>()
                            .map_err(|_| format!("run: alert={v:?} is not a group id"))?,
                    );
                    continue;
                }
                if !is_param_key(k) {
                    return Err(format!("run: {k:?} is not a parameter name"));
                }
                if params.insert(k.to_string(), v.to_string()).is_some() {
                    return Err(format!("run: parameter {k} given twice"));
                }
            }
            Ok(Command::Run {
                runbook,
                steps,
                alert,
                params,
            })
        }
        "approve" => match rest {
            [r] if approvals::is_run_id(r) => Ok(Command::Approve { run: r.clone() }),
            _ => usage("approve <run-id>"),
        },
        "deny" => match rest {
            [r] if approvals::is_run_id(r) => Ok(Command::Deny { run: r.clone() }),
            _ => usage("deny <run-id>"),
        },
        "nodes" if rest.is_empty() => Ok(Command::Nodes),
        "nodes" => usage("nodes"),
        "node" => {
            let line = "node <node> awaiting-repair|quarantined|verifying|return [\"reason\"]";
            let [node, state, more @ ..] = rest else {
                return usage(line);
            };
            use crate::lifecycle::NodeState;
            let state = match state.to_ascii_lowercase().as_str() {
                "return" | "returned" => NodeState::InService,
                other => match NodeState::parse(other) {
                    Some(s) => s,
                    None => return usage(line),
                },
            };
            if !crate::exec_auth::is_node_name(node) {
                return Err(format!(
                    "node: {:?} is not a node name",
                    notify::truncate_chars(node, 64)
                ));
            }
            let reason = more.join(" ");
            let reason = reason.trim().trim_matches('"').trim();
            if reason.chars().count() > 300 {
                return Err("node: the reason must be at most 300 characters".into());
            }
            Ok(Command::Node {
                node: node.clone(),
                state,
                reason: (!reason.is_empty()).then(|| reason.to_string()),
            })
        }
        other => Err(format!(
            "unknown command {:?}\n\n{USAGE}",
            notify::truncate_chars(other, 40)
        )),
    }
}

impl Command {
    /// The audit action name.
    pub fn name(&self) -> &'static str {
        match self {
            Command::Help => "help",
            Command::Status { .. } => "status",
            Command::Alerts => "alerts",
            Command::Ack { .. } => "ack",
            Command::Silence { .. } => "silence",
            Command::Unsilence { .. } => "unsilence",
            Command::Runbooks { .. } => "runbooks",
            Command::Run { .. } => "run",
            Command::Approve { .. } => "approve",
            Command::Deny { .. } => "deny",
            Command::Nodes => "nodes",
            Command::Node { .. } => "node",
        }
    }
}

/// Slack escapes `&`, `<` and `>` in command text.
pub(super) fn unescape_slack(s: &str) -> String {
    s.replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&amp;", "&")
}

/// Splits on whitespace, keeping double-quoted spans (quotes kept, so
/// matcher values stay quoted) together. Control characters are refused.
pub(super) fn tokenize(s: &str) -> Result<Vec<String>, String> {
    if s.chars()
        .any(|c| c.is_control() && c != '\t' && c != '\n' && c != '\r')
    {
        return Err("the command contains a control character".into());
    }
    if s.len() > 4000 {
        return Err("the command is too long".into());
    }
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut quoted = false;
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\\' if quoted => {
                cur.push(c);
                if let Some(n) = chars.next() {
                    cur.push(n);
                }
            }
            '"' => {
                quoted = !quoted;
                cur.push(c);
            }
            c if c.is_whitespace() && !quoted => {
                if !cur.is_empty() {
                    out.push(std::mem::take(&mut cur));
                }
            }
            c => cur.push(c),
        }
    }
    if quoted {
        return Err("unclosed quote".into());
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    Ok(out)
}

pub(super) fn is_hostish(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 255
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_' | b':'))
}

pub(super) fn is_label_value(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 128
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b':')
}

pub(super) fn is_param_key(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.starts_with(|c: char| c.is_ascii_lowercase())
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
}

/// A step name as typed in a command (looser than a runbook's step names,
/// which `runbook::parse` checks; an unknown name is reported later).
pub(super) fn is_step_argument(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

#[cfg(test)]
mod tests {
    use expect_test::{expect, Expect};

    use crate::chat::parse_command;

    fn check(input: &str, expect: Expect) {
        let got = match parse_command(input) {
            Ok(c) => format!("{c:?}"),
            Err(e) => format!("error: {}", e.lines().next().unwrap_or("")),
        };
        expect.assert_eq(&got);
    }

    #[test]
    fn node_commands_parse() {
        check("nodes", expect!["Nodes"]);
        check("nodes all", expect!["error: usage: `nodes`"]);
        check(
            r#"node gpu-node-17 awaiting-repair "RMA 12345""#,
            expect![[
                r#"Node { node: "gpu-node-17", state: AwaitingRepair, reason: Some("RMA 12345") }"#
            ]],
        );
        check(
            "node gpu-node-17 return",
            expect![[r#"Node { node: "gpu-node-17", state: InService, reason: None }"#]],
        );
        check(
            "node gpu-node-17 quarantined drained by hand",
            expect![[
                r#"Node { node: "gpu-node-17", state: Quarantined, reason: Some("drained by hand") }"#
            ]],
        );
        check(
            "node gpu-node-17 broken",
            expect![[
                r#"error: usage: `node <node> awaiting-repair|quarantined|verifying|return ["reason"]`"#
            ]],
        );
        check(
            "node ../etc return",
            expect![[r#"error: node: "../etc" is not a node name"#]],
        );
        check(
            "node gpu-node-17",
            expect![[
                r#"error: usage: `node <node> awaiting-repair|quarantined|verifying|return ["reason"]`"#
            ]],
        );
    }
}
