//! Test helpers: run one collector on a fixture tree under
//! `tests/fixtures/host/<scenario>` and render what it wrote. Test-only.

use std::path::PathBuf;
use std::sync::Arc;

use crate::collector::{kmsg, Collector, Context, KernelEvents, Sink};
use crate::config::AgentConfig;

/// `tests/fixtures/host/<scenario>`.
pub fn fixture(scenario: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/host")
        .join(scenario)
}

/// A context whose roots are the fixture tree (kernel log read once, as
/// `collect --once` does); `edit` adjusts the configuration.
pub fn context(scenario: &str, edit: impl FnOnce(&mut AgentConfig)) -> Arc<Context> {
    let dir = fixture(scenario);
    let mut cfg = AgentConfig::default();
    cfg.roots.procfs = dir.join("proc");
    cfg.roots.sysfs = dir.join("sys");
    cfg.roots.rootfs = dir.join("root");
    cfg.roots.kmsg = dir.join("kmsg");
    edit(&mut cfg);
    let events = Arc::new(KernelEvents::new());
    kmsg::read_once(&cfg.roots, &events);
    Arc::new(Context::new(Arc::new(cfg), events, false))
}

/// Runs `c` once: the samples (without HELP/TYPE lines), then one line per
/// failure with the fixture directory written as `F`.
pub fn scrape(c: &dyn Collector, ctx: &Context) -> String {
    let mut sink = Sink::new();
    let result = c.collect(ctx, &mut sink);
    let failures: Vec<String> = sink.failures().to_vec();
    let fams = sink.into_families();
    let mut text = String::new();
    let _ = prometheus::TextEncoder::new().encode_utf8(&fams, &mut text);
    let mut out: String = text
        .lines()
        .filter(|l| !l.starts_with('#'))
        .map(|l| format!("{l}\n"))
        .collect();
    let root = fixture("").display().to_string();
    for f in failures {
        out.push_str(&format!("FAILED {}\n", f.replace(&root, "F/")));
    }
    if let Err(e) = result {
        out.push_str(&format!("ERROR {e}\n"));
    }
    out
}
