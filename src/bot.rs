//! The bot role's wiring (to be written).

use std::process::ExitCode;

use crate::cli::{AuditArgs, BotArgs};

pub fn run(_args: BotArgs) -> anyhow::Result<ExitCode> {
    anyhow::bail!("the bot role is not written yet")
}

pub fn audit(_args: AuditArgs) -> anyhow::Result<ExitCode> {
    anyhow::bail!("audit is not written yet")
}
