//! gpuops: one binary, two roles. The agent exports GPU and host USE metrics
//! for Prometheus and runs signed runbook steps on its node; the bot turns
//! AlertManager webhooks into Slack and Discord messages and runs runbooks.
//! See ARCHITECTURE.md for the map.
#![forbid(unsafe_code)]

pub mod agent;
pub mod alert;
pub mod alertmanager;
pub mod bot;
pub mod bot_role;
pub mod chat;
pub mod cli;
pub mod collector;
pub mod config;
pub mod deadline;
pub mod escape;
pub mod events;
pub mod exec_auth;
pub mod exporter;
pub mod gpu;
pub mod host;
pub mod inventory;
pub mod lifecycle;
pub mod message;
pub mod notify;
pub mod outbox;
pub mod paging;
pub mod rbac;
pub mod report;
pub mod routing;
pub mod runbook;
pub mod secret;
pub mod signing;
pub mod store;
pub mod store_cmd;
pub mod telemetry;
pub mod web;
