//! Codified runbooks (to be written).

use std::process::ExitCode;

use crate::cli::RunbookCommand;

pub fn cli(_cmd: RunbookCommand) -> anyhow::Result<ExitCode> {
    anyhow::bail!("runbooks are not written yet")
}
