//! `[[rbac.people]]` of the bot's configuration: one name for a person's
//! Slack and Discord accounts (the two-person rule compares people). Read
//! and validated with the rest of `bot.toml` by `config::bot`; no I/O.

use std::collections::BTreeMap;

use crate::config::{Reader, Section};

/// `[[rbac.people]]`: `name` and the `accounts` that are that person; every
/// account in at most one person, every name once.
pub(crate) fn read_people<'i>(r: &mut Reader<'i>, s: &mut Section<'i>) -> BTreeMap<String, String> {
    let mut people: BTreeMap<String, String> = BTreeMap::new();
    let mut names: Vec<String> = Vec::new();
    for mut p in r.tables(s, "people") {
        let name = r.get_with(&mut p, "name", |n: String| {
            if !n.is_empty()
                && n.len() <= 64
                && n.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
            {
                Ok(n)
            } else {
                Err(format!(
                    "{n:?} is not a person's name (1 to 64 letters, digits, '.', '_' or '-')"
                ))
            }
        });
        let accounts = r.get_with(&mut p, "accounts", |v: Vec<String>| {
            if v.is_empty() {
                return Err("must list at least one account".to_string());
            }
            if let Some(bad) = v.iter().find(|a| !is_account_key(a)) {
                return Err(format!(
                    "{bad:?} is not an account: write slack:<user id> or discord:<user id>"
                ));
            }
            Ok(v)
        });
        let keys = p.keys();
        for key in ["name", "accounts"] {
            if !keys.iter().any(|k| k == key) {
                r.error(&p, "", format!("needs {key}"));
            }
        }
        if let Some(n) = &name {
            if names.contains(n) {
                r.error(&p, "name", format!("person {n:?} is listed twice"));
            }
            names.push(n.clone());
        }
        if let (Some(name), Some(accounts)) = (name, accounts) {
            for a in accounts {
                match people.get(&a) {
                    Some(other) => r.error(
                        &p,
                        "accounts",
                        format!("{a:?} already belongs to {other:?}; an account belongs to at most one person"),
                    ),
                    None => {
                        people.insert(a, name.clone());
                    }
                }
            }
        }
        r.finish(p);
    }
    people
}

/// `slack:<id>` (letters and digits) or `discord:<snowflake>`.
fn is_account_key(a: &str) -> bool {
    match a.split_once(':') {
        Some(("slack", id)) => {
            !id.is_empty() && id.len() <= 32 && id.bytes().all(|b| b.is_ascii_alphanumeric())
        }
        Some(("discord", id)) => {
            !id.is_empty() && id.len() <= 24 && id.bytes().all(|b| b.is_ascii_digit())
        }
        _ => false,
    }
}
