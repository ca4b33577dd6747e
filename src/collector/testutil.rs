//! Test helpers: run one collector on a fixture tree under
//! `tests/fixtures/host/<scenario>` and render what it wrote, and read a
//! [`Sink`]'s text back into `prometheus` protos to inspect values. Test-only:
//! the scrape path writes text and never builds protos.

use std::path::PathBuf;
use std::sync::Arc;

use prometheus::proto::{Counter, Gauge, LabelPair, Metric, MetricFamily, MetricType};

use crate::collector::{kmsg, Collector, Context, KernelEvents, Sink, TextFamily};
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

impl Sink {
    /// The families as `prometheus` protos, sorted by name (the scrape path
    /// uses [`Sink::into_text`]).
    pub fn into_families(mut self) -> Vec<MetricFamily> {
        self.families.sort_by(|a, b| a.name.cmp(&b.name));
        self.families.iter().map(to_proto).collect()
    }
}

/// Reads a family's text body back into a proto family.
fn to_proto(f: &TextFamily) -> MetricFamily {
    let mut fam = MetricFamily::default();
    fam.set_name(f.name.clone());
    fam.set_help(f.help.clone());
    fam.set_field_type(f.kind);
    for line in f.body.lines() {
        let (labels, value) = parse_sample(&line[f.name.len()..]);
        let mut m = Metric::default();
        m.set_label(
            labels
                .into_iter()
                .map(|(k, v)| {
                    let mut l = LabelPair::default();
                    l.set_name(k);
                    l.set_value(v);
                    l
                })
                .collect(),
        );
        if f.kind == MetricType::COUNTER {
            let mut c = Counter::default();
            c.set_value(value);
            m.set_counter(c);
        } else {
            let mut g = Gauge::default();
            g.set_value(value);
            m.set_gauge(g);
        }
        fam.mut_metric().push(m);
    }
    fam
}

/// `{k="v",...} value` (what [`Sink::push`] wrote) into labels and value.
fn parse_sample(rest: &str) -> (Vec<(String, String)>, f64) {
    let mut labels = Vec::new();
    let mut chars = rest.char_indices().peekable();
    let mut value_at = 0;
    if rest.starts_with('{') {
        chars.next();
        let mut key = String::new();
        while let Some((_, c)) = chars.next() {
            match c {
                '}' => break,
                ',' => {}
                '=' => {
                    chars.next(); // opening quote
                    let mut v = String::new();
                    while let Some((_, c)) = chars.next() {
                        match c {
                            '\\' => match chars.next() {
                                Some((_, 'n')) => v.push('\n'),
                                Some((_, other)) => v.push(other),
                                None => {}
                            },
                            '"' => break,
                            c => v.push(c),
                        }
                    }
                    labels.push((std::mem::take(&mut key), v));
                }
                c => key.push(c),
            }
        }
    }
    if let Some((i, _)) = chars.peek() {
        value_at = *i;
    }
    let value = rest[value_at..].trim().parse().unwrap_or(f64::NAN);
    (labels, value)
}
