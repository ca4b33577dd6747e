//! gpuops: one binary, two roles. The agent exports GPU and host USE metrics
//! for Prometheus and runs signed runbook steps on its node; the bot turns
//! AlertManager webhooks into Slack and Discord messages and runs runbooks.
//! See ARCHITECTURE.md for the map.
//!
//! Cargo features choose the roles (ARCHITECTURE.md, "Features"): `bot`
//! compiles the bot's modules and crates; without it (`--no-default-features
//! --features agent`, the node build) only the agent, the runbook engine and
//! the base remain.
#![forbid(unsafe_code)]

pub mod agent;
#[cfg(feature = "bot")]
pub mod alert;
#[cfg(feature = "bot")]
pub mod alertmanager;
#[cfg(feature = "bot")]
pub mod bot;
#[cfg(feature = "bot")]
pub mod bot_role;
#[cfg(feature = "bot")]
pub mod chat;
pub mod cli;
pub mod collector;
pub mod config;
pub mod deadline;
pub mod escape;
pub mod events;
pub mod exec_auth;
pub mod exporter;
#[cfg(feature = "bot")]
pub mod found;
pub mod gpu;
pub mod host;
#[cfg(feature = "bot")]
pub mod inventory;
pub mod kubelet;
#[cfg(feature = "bot")]
pub mod lifecycle;
#[cfg(feature = "bot")]
pub mod message;
#[cfg(feature = "bot")]
pub mod notify;
#[cfg(feature = "bot")]
pub mod outbox;
#[cfg(feature = "bot")]
pub mod paging;
#[cfg(feature = "bot")]
pub mod rbac;
#[cfg(feature = "bot")]
pub mod report;
#[cfg(feature = "bot")]
pub mod routing;
pub mod runbook;
pub mod secret;
pub mod signing;
#[cfg(feature = "bot")]
pub mod store;
#[cfg(feature = "bot")]
pub mod store_cmd;
pub mod telemetry;
pub mod web;
