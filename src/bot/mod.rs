//! The bot's shared state: [`BotState`] and [`BotMetrics`] ([`state`]), a
//! leaf every bot handler imports. It must not import the handlers; the
//! role's wiring (`gpuops bot`, `gpuops audit`, the router) is
//! the `bot_role` module, above the handlers.

pub mod state;

pub use state::{BotMetrics, BotState};
