//! Thin entry point: parse the command line, dispatch a role, map the result
//! to an exit code.
#![forbid(unsafe_code)]

use std::process::ExitCode;

use clap::Parser;
use gpuops::cli::{Cli, Command};

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        #[cfg(feature = "agent")]
        Command::Agent(args) => gpuops::agent::run(args),
        #[cfg(feature = "agent")]
        Command::Collect(args) => gpuops::agent::collect_once(args),
        Command::CheckConfig(args) => gpuops::agent::check_config(args),
        #[cfg(feature = "bot")]
        Command::Bot(args) => gpuops::bot_role::run(args),
        Command::Runbook(cmd) => gpuops::runbook::cli(cmd),
        #[cfg(feature = "bot")]
        Command::Audit(args) => gpuops::bot_role::audit(args),
        #[cfg(feature = "bot")]
        Command::Status(args) => gpuops::bot_role::status(args),
        #[cfg(feature = "bot")]
        Command::Nodes(args) => gpuops::bot_role::nodes(args),
        #[cfg(feature = "bot")]
        Command::Keygen(args) => gpuops::exec_auth::keygen(args),
        #[cfg(feature = "bot")]
        Command::Store(cmd) => gpuops::store_cmd::run(cmd),
        #[cfg(feature = "bot")]
        Command::Discord(cmd) => gpuops::bot_role::discord(cmd),
        #[cfg(feature = "bot")]
        Command::Report(cmd) => gpuops::bot_role::report(cmd),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("gpuops: {e:#}");
            ExitCode::FAILURE
        }
    }
}
