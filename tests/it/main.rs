//! The integration tests: one test binary, a module per area (the layout
//! cargo and rust-analyzer use for one test crate), sharing one copy of the
//! support code. Run one area with `cargo test --test it chat_flow::`.

#![allow(clippy::disallowed_methods)] // integration tests spawn the real binary and external tools

#[macro_use]
mod support;
#[macro_use]
mod chat_support;
mod ops_support;
mod paging_support;
mod report_support;

mod agent_build;
mod agent_exec;
mod agent_exec_binary;
mod agent_golden;
mod agent_gzip;
mod agent_http;
mod agent_idle;
mod bot_alertmanager;
mod bot_binary;
mod bot_delivery;
mod bot_webhook;
mod chat_binary;
mod chat_e2e;
mod chat_flow;
mod chat_router;
mod discord_register;
mod exec_trust;
mod found_state;
mod gpu_agent;
mod gpu_check;
mod gpu_docs;
mod gpu_golden;
mod gpu_slow;
mod gpu_xid;
mod incident_walkthrough;
mod inventory_prometheus;
mod kubelet;
mod kubernetes;
mod layers;
mod lifecycle;
mod lifecycle_loop;
mod metric_reference;
mod ops_config;
mod ops_dashboard;
mod ops_e2e;
mod ops_package;
mod ops_systemd;
mod paging;
mod report;
mod report_delivery;
mod report_oom;
mod runbook_check;
mod runbook_flow_cli;
mod runbook_injection;
mod runbook_roles;
mod runbook_shipped;
mod runbook_xid;
mod store_postgres;
mod web_load;
mod web_server;
mod web_tls;
