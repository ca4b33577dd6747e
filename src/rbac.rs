//! Who may do what: the one place that decides. The role matrix
//! ([`authorize`]), the two-person rule ([`authorize_approval`]), a chat
//! account's role under `[rbac]` ([`role_of`]) and the person behind an
//! account (`[[rbac.people]]`, [`RbacConfig::person_of`]). Chat and the
//! runbook CLI ask here; nothing else compares roles.

use crate::config::bot::RbacConfig;
use crate::runbook::{Phase, Role, Step};

/// What someone asks to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChatAction {
    Help,
    Status,
    Alerts,
    Runbooks,
    Ack,
    Silence,
    Unsilence,
    /// Run (or, for a `needs_approval` step, request) one step.
    RunStep,
    Approve,
    Deny,
    /// Set a node's tracked state (`/gpuops node …`).
    NodeState,
}

/// A refusal, with a message fit to show the user.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Denied(pub String);

/// Someone acting in chat.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Actor {
    /// Who acts: the person (a `[[rbac.people]]` name) or, for an account
    /// not listed there, its key (`slack:U0123`). The two-person rule
    /// compares these.
    pub id: String,
    pub role: Role,
}

/// The role matrix. Viewers: help, status, alerts, runbooks. Operators: also
/// ack, silence, unsilence, run investigate and escalate steps, and request
/// mitigations (a mitigate step must have `needs_approval`, or be run by an
/// admin). Admins: everything, including approve and deny. A step's own
/// `roles` list narrows who may run it. Approval itself is checked by
/// [`authorize_approval`] (two-person rule).
pub fn authorize(role: Role, action: ChatAction, step: Option<&Step>) -> Result<(), Denied> {
    use ChatAction::*;
    match action {
        Help | Status | Alerts | Runbooks => Ok(()),
        Ack | Silence | Unsilence | NodeState => {
            if role >= Role::Operator {
                Ok(())
            } else {
                Err(Denied(format!(
                    "{} needs the operator or admin role",
                    action_name(action)
                )))
            }
        }
        Approve | Deny => {
            if role == Role::Admin {
                Ok(())
            } else {
                Err(Denied(format!(
                    "{} needs the admin role",
                    action_name(action)
                )))
            }
        }
        RunStep => {
            let Some(step) = step else {
                return Err(Denied("no step named".into()));
            };
            if role == Role::Viewer {
                return Err(Denied(format!(
                    "running step {} needs the operator or admin role",
                    step.name
                )));
            }
            if !step.roles.contains(&role) {
                return Err(Denied(format!(
                    "step {} may be run by {} only",
                    step.name,
                    step.roles
                        .iter()
                        .map(|r| r.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                )));
            }
            if role == Role::Operator && step.phase == Phase::Mitigate && !step.needs_approval {
                return Err(Denied(format!(
                    "mitigation {} does not go through approval, so only an admin may run it",
                    step.name
                )));
            }
            Ok(())
        }
    }
}

/// The two-person rule for a `needs_approval` step: the approver must be an
/// admin and not the person who requested the step.
pub fn authorize_approval(approver: &Actor, requester: &Actor, step: &Step) -> Result<(), Denied> {
    authorize(approver.role, ChatAction::Approve, Some(step))?;
    if approver.id == requester.id {
        return Err(Denied(format!(
            "step {} needs approval by someone other than the person who asked for it",
            step.name
        )));
    }
    Ok(())
}

/// The longest silence `[rbac] max_silence` lets an operator create when it
/// is not set.
pub const DEFAULT_MAX_SILENCE: std::time::Duration = std::time::Duration::from_secs(24 * 3600);

/// A silence beyond what an operator may set alone: one that matches every
/// alert (`narrowed` is false: no equality matcher with a value, e.g. only
/// `alertname=~".+"`) or that lasts longer than `[rbac] max_silence`. It
/// needs approval, which the admin role is: an admin may create it; an
/// operator is refused and told so (the caller names the admins).
pub fn authorize_silence(
    rbac: &RbacConfig,
    role: Role,
    narrowed: bool,
    duration: std::time::Duration,
) -> Result<(), Denied> {
    authorize(role, ChatAction::Silence, None)?;
    let max = rbac.max_silence.unwrap_or(DEFAULT_MAX_SILENCE);
    let mut why = Vec::new();
    if !narrowed {
        why.push(
            "it matches every alert (no equality matcher such as alertname=\"...\" narrows it)"
                .to_string(),
        );
    }
    if duration > max {
        why.push(format!(
            "it lasts {}, longer than [rbac] max_silence ({})",
            humantime::format_duration(duration),
            humantime::format_duration(max)
        ));
    }
    if why.is_empty() || role == Role::Admin {
        return Ok(());
    }
    Err(Denied(format!(
        "this silence needs approval: {}",
        why.join(" and ")
    )))
}

fn action_name(a: ChatAction) -> &'static str {
    match a {
        ChatAction::Help => "help",
        ChatAction::Status => "status",
        ChatAction::Alerts => "alerts",
        ChatAction::Runbooks => "runbooks",
        ChatAction::Ack => "ack",
        ChatAction::Silence => "silence",
        ChatAction::Unsilence => "unsilence",
        ChatAction::RunStep => "run",
        ChatAction::Approve => "approve",
        ChatAction::Deny => "deny",
        ChatAction::NodeState => "setting a node's state",
    }
}

/// A chat account's role under `[rbac]`: admin if any of its ids (the
/// platform id, e.g. `U0123`, or the prefixed key `slack:U0123`) is listed
/// in `admins`, operator if in `operators`, else viewer.
pub fn role_of(rbac: &RbacConfig, ids: &[&str]) -> Role {
    let listed = |list: &[String]| list.iter().any(|i| ids.contains(&i.as_str()));
    if listed(&rbac.admins) {
        Role::Admin
    } else if listed(&rbac.operators) {
        Role::Operator
    } else {
        Role::Viewer
    }
}

impl RbacConfig {
    /// The person behind an account key: their `[[rbac.people]]` name, or
    /// the account key itself when it is not listed.
    pub fn person_of(&self, account: &str) -> String {
        self.people
            .get(account)
            .cloned()
            .unwrap_or_else(|| account.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_from_rbac_lists() {
        let rbac = RbacConfig {
            admins: vec!["U0ADMIN".into()],
            operators: vec!["U0OPER".into(), "U0ADMIN".into()],
            ..Default::default()
        };
        assert_eq!(role_of(&rbac, &["U0ADMIN"]), Role::Admin);
        assert_eq!(role_of(&rbac, &["U0OPER"]), Role::Operator);
        assert_eq!(role_of(&rbac, &["U0SOMEONE"]), Role::Viewer);
        assert_eq!(role_of(&rbac, &[""]), Role::Viewer);
    }

    #[test]
    fn broad_or_long_silences_need_an_admin() {
        let h = |n: u64| std::time::Duration::from_secs(n * 3600);
        let mut rbac = RbacConfig::default();
        assert!(authorize_silence(&rbac, Role::Operator, true, h(24)).is_ok());
        let e = authorize_silence(&rbac, Role::Operator, true, h(25)).unwrap_err();
        assert!(e.0.contains("longer than [rbac] max_silence (1day)"), "{e}");
        let e = authorize_silence(&rbac, Role::Operator, false, h(1)).unwrap_err();
        assert!(e.0.contains("matches every alert"), "{e}");
        assert!(authorize_silence(&rbac, Role::Admin, false, h(48)).is_ok());
        assert!(authorize_silence(&rbac, Role::Viewer, true, h(1)).is_err());
        rbac.max_silence = Some(h(2));
        assert!(authorize_silence(&rbac, Role::Operator, true, h(3)).is_err());
    }
}
