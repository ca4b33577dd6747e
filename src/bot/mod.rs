//! The bot role: [`state`] (the shared [`BotState`] and [`BotMetrics`], a
//! leaf the handlers import) and [`run`] (the role's wiring: `gpuops bot`,
//! `gpuops audit`, the router). Handlers import `bot::state`, never `bot::run`.

pub mod run;
pub mod state;

pub use run::{audit, build_notifiers, router, router_with, serve};
pub use state::{BotMetrics, BotState};

/// `gpuops bot`.
pub fn run(args: crate::cli::BotArgs) -> anyhow::Result<std::process::ExitCode> {
    run::run(args)
}
