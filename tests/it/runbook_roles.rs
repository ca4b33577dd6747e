//! The role matrix and the two-person rule, as a table.

use std::path::Path;

use gpuops::rbac::{authorize, authorize_approval, Actor, ChatAction};
use gpuops::runbook::{parse_runbook, Role, Step};

fn steps() -> Vec<Step> {
    parse_runbook(
        Path::new("roles.yaml"),
        r#"
id: roles
title: Roles
steps:
  - { name: look, phase: investigate, kind: command, target: node, run: [uptime] }
  - { name: drain, phase: mitigate, kind: command, target: node, needs_approval: true, run: [echo, drain] }
  - { name: quick-fix, phase: mitigate, kind: command, target: node, run: [echo, fix] }
  - { name: reboot, phase: mitigate, kind: command, target: node, needs_approval: true, roles: [admin], run: [echo, reboot] }
  - { name: page, phase: escalate, kind: command, target: bot, run: [echo, page] }
"#,
    )
    .unwrap()
    .steps
}

#[test]
fn role_matrix() {
    use ChatAction::*;
    use Role::*;
    let steps = steps();
    let step = |n: &str| steps.iter().find(|s| s.name == n).unwrap();
    // (role, action, step, allowed)
    let table: &[(Role, ChatAction, Option<&str>, bool)] = &[
        (Viewer, Help, None, true),
        (Viewer, Status, None, true),
        (Viewer, Alerts, None, true),
        (Viewer, Runbooks, None, true),
        (Viewer, Ack, None, false),
        (Viewer, Silence, None, false),
        (Viewer, Unsilence, None, false),
        (Viewer, RunStep, Some("look"), false),
        (Viewer, RunStep, Some("page"), false),
        (Viewer, Approve, Some("drain"), false),
        (Viewer, Deny, Some("drain"), false),
        (Operator, Help, None, true),
        (Operator, Ack, None, true),
        (Operator, Silence, None, true),
        (Operator, Unsilence, None, true),
        (Operator, RunStep, Some("look"), true),
        (Operator, RunStep, Some("page"), true),
        // Requesting a mitigation that goes through approval: allowed.
        (Operator, RunStep, Some("drain"), true),
        // A mitigation without approval: admins only.
        (Operator, RunStep, Some("quick-fix"), false),
        // The step narrows its roles to admin.
        (Operator, RunStep, Some("reboot"), false),
        (Operator, Approve, Some("drain"), false),
        (Operator, Deny, Some("drain"), false),
        (Operator, RunStep, None, false),
        (Admin, Help, None, true),
        (Admin, Ack, None, true),
        (Admin, Silence, None, true),
        (Admin, RunStep, Some("look"), true),
        (Admin, RunStep, Some("drain"), true),
        (Admin, RunStep, Some("quick-fix"), true),
        (Admin, RunStep, Some("reboot"), true),
        (Admin, Approve, Some("drain"), true),
        (Admin, Deny, Some("drain"), true),
    ];
    let mut wrong = Vec::new();
    for (role, action, s, allowed) in table {
        let got = authorize(*role, *action, s.map(step));
        if got.is_ok() != *allowed {
            wrong.push(format!("{role:?} {action:?} {s:?}: got {got:?}"));
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

#[test]
fn refusals_say_why() {
    let steps = steps();
    let quick = steps.iter().find(|s| s.name == "quick-fix").unwrap();
    let reboot = steps.iter().find(|s| s.name == "reboot").unwrap();
    assert_eq!(
        authorize(Role::Viewer, ChatAction::Silence, None)
            .unwrap_err()
            .to_string(),
        "silence needs the operator or admin role"
    );
    assert_eq!(
        authorize(Role::Operator, ChatAction::RunStep, Some(quick))
            .unwrap_err()
            .to_string(),
        "mitigation quick-fix does not go through approval, so only an admin may run it"
    );
    assert_eq!(
        authorize(Role::Operator, ChatAction::RunStep, Some(reboot))
            .unwrap_err()
            .to_string(),
        "step reboot may be run by admin only"
    );
}

#[test]
fn two_person_rule() {
    let steps = steps();
    let drain = steps.iter().find(|s| s.name == "drain").unwrap();
    let alice_op = Actor {
        id: "U0ALICE".into(),
        role: Role::Operator,
    };
    let bob_admin = Actor {
        id: "U0BOB".into(),
        role: Role::Admin,
    };
    let carol_admin = Actor {
        id: "U0CAROL".into(),
        role: Role::Admin,
    };
    let dave_op = Actor {
        id: "U0DAVE".into(),
        role: Role::Operator,
    };
    let eve = Actor {
        id: "U0EVE".into(),
        role: Role::Viewer,
    };

    assert!(authorize_approval(&bob_admin, &alice_op, drain).is_ok());
    assert!(authorize_approval(&carol_admin, &bob_admin, drain).is_ok());
    // Self-approval, even by an admin.
    assert_eq!(
        authorize_approval(&bob_admin, &bob_admin, drain)
            .unwrap_err()
            .to_string(),
        "step drain needs approval by someone other than the person who asked for it"
    );
    // Operators and viewers cannot approve.
    assert!(authorize_approval(&dave_op, &alice_op, drain).is_err());
    assert!(authorize_approval(&eve, &alice_op, drain).is_err());
}
