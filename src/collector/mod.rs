//! Collectors: one file per source, registered in [`all`], run by [`Runner`].
//!
//! A collector is synchronous code that reads the host (through
//! [`crate::host`]) or a GPU backend and writes samples into a [`Sink`]. The
//! runner runs a collector that may block (the GPU's) on its own thread with a
//! deadline and single flight (see [`crate::deadline`]): a hung collector is
//! reported as failed and never blocks the scrape or the other collectors.
//! Collectors that read in-kernel /proc and /sys text in microseconds (and
//! bound their own blocking calls, as storage's statvfs) run on the scrape's
//! thread, one after the other: a thread hand-off each would cost more than
//! their reads. It emits
//! `gpuops_collector_success{collector}` and
//! `gpuops_collector_duration_seconds{collector}` for each one.
//! Collectors must not start HTTP servers, spawn processes or panic on input.

pub mod cpu;
pub mod gpu;
pub mod gpu_gpm;
pub mod gpu_workload;
pub mod kmsg;
pub mod memory;
pub mod node_state;
pub mod oom;
pub mod pod_resources;
pub mod storage;
#[cfg(test)]
mod testutil;

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use prometheus::proto::{MetricFamily, MetricType};

use crate::config::AgentConfig;
use crate::deadline::{Outcome, SingleFlight};
use crate::host::{HostRoots, ReadError};

pub use kmsg::KernelEvents;

/// What every collector can see.
pub struct Context {
    pub roots: HostRoots,
    pub config: Arc<AgentConfig>,
    pub events: Arc<KernelEvents>,
    /// False for `gpuops collect --once`: no background samplers are started.
    pub background: bool,
    /// `nvml`, `fake` or `none`; set by the GPU collector when it starts.
    pub gpu_backend: std::sync::OnceLock<&'static str>,
    /// Whether the GPU backend is released for a runbook step (the agent's
    /// `POST /v1/exec` releases it; the GPU collector pauses meanwhile).
    pub gpu_gate: Arc<crate::gpu::GpuGate>,
    /// The scheduler's latest view of this node (`node_state.rs`), written
    /// by the agent's sampler.
    pub scheduler: Arc<node_state::Latest>,
    /// Which pod holds which GPU (`[kubernetes]`), written by the agent's
    /// background reader (`crate::kubelet::spawn_refresher`).
    pub pod_resources: Arc<crate::kubelet::Latest>,
}

impl Context {
    pub fn new(config: Arc<AgentConfig>, events: Arc<KernelEvents>, background: bool) -> Context {
        let pod_resources = Arc::new(crate::kubelet::Latest::new(
            crate::kubelet::active(&config.kubernetes),
            config.kubernetes.refresh_interval,
        ));
        Context {
            roots: config.roots.clone(),
            config,
            events,
            background,
            gpu_backend: std::sync::OnceLock::new(),
            gpu_gate: Arc::new(crate::gpu::GpuGate::default()),
            scheduler: Arc::new(node_state::Latest::default()),
            pod_resources,
        }
    }
}

/// Why a collector failed as a whole.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Read(#[from] ReadError),
    #[error("{0}")]
    Unavailable(String),
    #[error("{0}")]
    Other(String),
}

/// One source of metrics.
pub trait Collector: Send + Sync {
    /// The `collector` label value, e.g. `cpu`.
    fn name(&self) -> &'static str;
    /// Reads the source and writes samples. Samples written before an error are kept.
    fn collect(&self, ctx: &Context, sink: &mut Sink) -> Result<(), Error>;
    /// Whether a run can block indefinitely (drivers). Collectors that only
    /// read in-kernel /proc and /sys text, or that bound every blocking call
    /// themselves (storage runs each statvfs with its own deadline), say
    /// `false`: they run on the scrape's thread, one after the other, with
    /// no thread hand-off (those reads never wait on a device).
    fn may_block(&self) -> bool {
        true
    }
    /// Begins, off the calling thread, what `collect` will wait for (the
    /// storage collector's statvfs batch), so that it runs while the
    /// collectors before this one run. The runner calls it at the start of
    /// a scrape for collectors that run on the scrape's thread; `collect`
    /// must work without it.
    fn prepare(&self, _ctx: &Context) {}
    /// Whether `collect`, although bounded, may wait seconds on a call it
    /// handed to a thread of its own: then a scrape runs on the blocking
    /// pool, not on one of the agent's two async workers (which also serve
    /// `/healthz` and `/v1/exec`). The storage collector says so while a
    /// mount's statvfs goes over the network or through a daemon (NFS,
    /// Lustre, FUSE...) or before it has read the mount table.
    fn may_wait(&self) -> bool {
        false
    }
}

/// The registry: every collector enabled in `ctx.config`, in exposition order.
pub fn all(ctx: &Arc<Context>) -> Vec<Arc<dyn Collector>> {
    let c = &ctx.config.collectors;
    let mut out: Vec<Arc<dyn Collector>> = Vec::new();
    if c.cpu {
        out.push(Arc::new(cpu::CpuCollector::new(ctx)));
    }
    if c.memory {
        out.push(Arc::new(memory::MemoryCollector::new(ctx)));
    }
    if c.oom {
        out.push(Arc::new(oom::OomCollector::new(ctx)));
    }
    if c.storage {
        out.push(Arc::new(storage::StorageCollector::new(ctx)));
    }
    if c.gpu {
        if let Some(g) = gpu::GpuCollector::new(ctx) {
            out.push(Arc::new(g));
        }
    }
    if ctx.config.node_state.slurm {
        out.push(Arc::new(node_state::NodeStateCollector::new(ctx)));
    }
    if ctx.pod_resources.is_on() {
        out.push(Arc::new(pod_resources::PodResourcesCollector));
    }
    out.push(Arc::new(kmsg::KmsgCollector));
    out
}

/// Collects samples, grouped into metric families by name, written straight
/// into Prometheus text format (one buffer per family, no allocation per
/// label): a scrape of eight GPUs is about a thousand series, and building the
/// `prometheus::proto` model for each cost more than reading NVML.
#[derive(Default)]
pub struct Sink {
    families: Vec<TextFamily>,
    index: HashMap<String, usize>,
    /// The family of the previous sample: consecutive samples usually share it.
    last: Option<usize>,
    failures: Vec<String>,
    /// Files read once per scrape, shared by the collectors of one scrape.
    shared: Arc<SharedReads>,
}

/// procfs files that several collectors read (`/proc/vmstat`: the memory
/// collector's allocation stalls, the oom collector's kills), read once per
/// scrape: the [`Runner`] hands one to every collector of a scrape, a
/// [`Sink::new`] has its own. One read also gives both collectors the same
/// snapshot.
#[derive(Default)]
pub struct SharedReads {
    files: Mutex<Vec<SharedFile>>,
}

/// A file of [`SharedReads`]: its path under procfs, and what reading it gave.
type SharedFile = (&'static str, Result<Arc<str>, ReadError>);

impl SharedReads {
    /// `<procfs>/<rel>`, read by the first caller of this scrape.
    fn proc_text(&self, roots: &HostRoots, rel: &'static str) -> Result<Arc<str>, ReadError> {
        let mut files = self.files.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some((_, r)) = files.iter().find(|(name, _)| *name == rel) {
            return r.as_ref().map(Arc::clone).map_err(copy_read_error);
        }
        let r = roots.read_proc_kept(rel).map(Arc::from);
        let out = r.as_ref().map(Arc::clone).map_err(copy_read_error);
        files.push((rel, r));
        out
    }
}

/// The same error again, for the second reader of a shared file.
fn copy_read_error(e: &ReadError) -> ReadError {
    match e {
        ReadError::Missing(path) => ReadError::Missing(path.clone()),
        ReadError::Io { path, source } => ReadError::Io {
            path: path.clone(),
            source: std::io::Error::new(source.kind(), source.to_string()),
        },
        ReadError::Parse { path, message } => ReadError::parse(path.clone(), message.clone()),
    }
}

/// One metric family in text format: `# HELP`/`# TYPE` come at render time.
#[derive(Debug, Clone)]
struct TextFamily {
    name: String,
    help: String,
    kind: MetricType,
    body: String,
}

impl Sink {
    pub fn new() -> Sink {
        Sink::default()
    }

    /// A sink whose shared reads are those of one scrape.
    fn for_scrape(shared: Arc<SharedReads>) -> Sink {
        Sink {
            shared,
            ..Sink::default()
        }
    }

    /// `<procfs>/<rel>` as text, read once per scrape however many
    /// collectors ask (see [`SharedReads`]).
    pub fn shared_proc_text(
        &self,
        roots: &HostRoots,
        rel: &'static str,
    ) -> Result<Arc<str>, ReadError> {
        self.shared.proc_text(roots, rel)
    }

    /// The index of family `name`, added when new.
    fn family(&mut self, name: &str, help: &str, kind: MetricType) -> usize {
        let i = match self.last {
            Some(i) if self.families[i].name == name => i,
            _ => match self.index.get(name) {
                Some(i) => *i,
                None => {
                    self.families.push(TextFamily {
                        name: name.to_string(),
                        help: help.to_string(),
                        kind,
                        body: String::new(),
                    });
                    self.index.insert(name.to_string(), self.families.len() - 1);
                    self.families.len() - 1
                }
            },
        };
        self.last = Some(i);
        i
    }

    /// Appends samples of gauge family `name` rendered earlier by a sink
    /// ([`Sink::body`] of the same family): a collector whose series change
    /// only in the background (the kubelet's pod mapping) renders them once
    /// per change, not once per scrape.
    pub fn gauge_rendered(&mut self, name: &str, help: &str, body: &str) {
        let i = self.family(name, help, MetricType::GAUGE);
        self.families[i].body.push_str(body);
    }

    /// The sample lines written so far for family `name` (empty if none).
    pub fn body(&self, name: &str) -> &str {
        self.index
            .get(name)
            .map_or("", |i| self.families[*i].body.as_str())
    }

    fn push(
        &mut self,
        name: &str,
        help: &str,
        kind: MetricType,
        labels: &[(&str, &str)],
        value: f64,
    ) {
        let i = self.family(name, help, kind);
        let body = &mut self.families[i].body;
        body.push_str(name);
        if !labels.is_empty() {
            body.push('{');
            for (j, (k, v)) in labels.iter().enumerate() {
                if j > 0 {
                    body.push(',');
                }
                body.push_str(k);
                body.push_str("=\"");
                escape_into(body, v, true);
                body.push('"');
            }
            body.push('}');
        }
        body.push(' ');
        push_value(body, value);
        body.push('\n');
    }

    /// A gauge sample. `help` names the source (file, NVML call).
    pub fn gauge(&mut self, name: &str, help: &str, labels: &[(&str, &str)], value: f64) {
        self.push(name, help, MetricType::GAUGE, labels, value);
    }

    /// A counter sample; `name` must end in `_total`.
    pub fn counter(&mut self, name: &str, help: &str, labels: &[(&str, &str)], value: f64) {
        debug_assert!(name.ends_with("_total"), "{name}");
        self.push(name, help, MetricType::COUNTER, labels, value);
    }

    /// Unwraps a host read: a missing file is logged at debug and skipped, any
    /// other error is logged as a warning and fails the collector (its other
    /// series are still exported).
    pub fn read<T>(&mut self, collector: &str, r: Result<T, ReadError>) -> Option<T> {
        match r {
            Ok(v) => Some(v),
            Err(e) if e.is_missing() => {
                tracing::debug!(collector, error = %e, "source not present, series left out");
                None
            }
            Err(e) => {
                self.fail(collector, e.to_string());
                None
            }
        }
    }

    /// Records a non-fatal failure: logged, and the collector reports success 0.
    pub fn fail(&mut self, collector: &str, message: String) {
        tracing::debug!(collector, error = %message, "collector read failed, series left out");
        self.failures.push(message);
    }

    /// The failures recorded so far.
    pub fn failures(&self) -> &[String] {
        &self.failures
    }

    /// The exposition text of everything written, families sorted by name.
    pub fn into_text(mut self) -> String {
        self.families.sort_by(|a, b| a.name.cmp(&b.name));
        let mut out = String::with_capacity(self.families.iter().map(|f| f.body.len() + 128).sum());
        for f in &self.families {
            out.push_str("# HELP ");
            out.push_str(&f.name);
            out.push(' ');
            escape_into(&mut out, &f.help, false);
            out.push_str("\n# TYPE ");
            out.push_str(&f.name);
            out.push_str(if f.kind == MetricType::COUNTER {
                " counter\n"
            } else {
                " gauge\n"
            });
            out.push_str(&f.body);
        }
        out
    }
}

/// Writes a sample value as `{value}` does: an integral value (most counters
/// and byte counts) through the integer formatter, which is cheaper than the
/// float one and prints the same digits below 2^53.
fn push_value(out: &mut String, value: f64) {
    const EXACT: f64 = 9_007_199_254_740_992.0;
    if value.fract() == 0.0 && value.abs() < EXACT && !(value == 0.0 && value.is_sign_negative()) {
        let _ = write!(out, "{}", value as i64);
    } else {
        let _ = write!(out, "{value}");
    }
}

/// Escapes per the text format: `\\` and newline always, `"` in label values.
fn escape_into(out: &mut String, s: &str, label_value: bool) {
    // A byte scan without an early exit: the compiler vectorizes it, where
    // `contains` with a char set walks char by char (help texts and label
    // values almost never need escaping).
    let special = s
        .bytes()
        .fold(false, |any, b| any | matches!(b, b'\\' | b'\n' | b'"'));
    if !special {
        out.push_str(s);
        return;
    }
    for ch in s.chars() {
        match ch {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '"' if label_value => out.push_str("\\\""),
            c => out.push(c),
        }
    }
}

/// One collector's part of a scrape.
#[derive(Clone)]
pub struct Collected {
    pub name: &'static str,
    pub success: bool,
    /// Why it failed (empty on success).
    pub errors: Arc<Vec<String>>,
    /// The source is absent (e.g. no NVML) and said so itself: no warning.
    pub unavailable: bool,
    pub duration: Duration,
    /// The collector's samples in text format, families sorted by name.
    pub text: Arc<String>,
}

/// Runs the registry with deadlines; shared by all scrapes.
pub struct Runner {
    ctx: Arc<Context>,
    collectors: Vec<Arc<dyn Collector>>,
    flight: SingleFlight<&'static str, Collected>,
    ready: AtomicBool,
    /// Last known success per collector, so failures are logged when they
    /// start and stop, not on every scrape.
    last_success: std::sync::Mutex<HashMap<&'static str, bool>>,
}

impl Runner {
    pub fn new(ctx: Arc<Context>, collectors: Vec<Arc<dyn Collector>>) -> Runner {
        Runner {
            ctx,
            collectors,
            flight: SingleFlight::new("gpuops-collect"),
            ready: AtomicBool::new(false),
            last_success: std::sync::Mutex::new(HashMap::new()),
        }
    }

    pub fn context(&self) -> &Arc<Context> {
        &self.ctx
    }

    /// Whether a scrape belongs on the blocking pool: a collector may block
    /// (and so runs on a thread of its own with a deadline) or may wait
    /// seconds for one ([`Collector::may_wait`]). Otherwise (host collectors
    /// on local filesystems) a scrape is a few hundred microseconds of /proc
    /// and /sys text, served on the async worker without a hand-off.
    pub fn may_block(&self) -> bool {
        self.collectors
            .iter()
            .any(|c| c.may_block() || c.may_wait())
    }

    /// True once a full collection has completed.
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Relaxed)
    }

    /// Runs every collector, waiting at most the configured deadline for
    /// those that may block (each on its own thread, joining a run already
    /// in flight); the others run here, on the calling thread, meanwhile.
    /// Blocks the calling thread: call it from `spawn_blocking` in async code.
    pub fn collect(&self) -> Vec<Collected> {
        let deadline = self.ctx.config.collectors.deadline;
        let started = Instant::now();
        let until = started + deadline;
        let shared = Arc::new(SharedReads::default());
        // Asked once: a collector's answer may change (the gpu collector's,
        // once NVML is known absent or due for another try).
        let blocks: Vec<bool> = self.collectors.iter().map(|c| c.may_block()).collect();
        let blocking = |want: bool| {
            self.collectors
                .iter()
                .zip(&blocks)
                .filter(move |(_, b)| **b == want)
                .map(|(c, _)| c)
        };
        // Those that may block first, so they run while the others run here.
        let pending: Vec<_> = blocking(true)
            .map(|c| {
                let ctx = self.ctx.clone();
                let col = c.clone();
                let shared = shared.clone();
                let job = move || run_one(&*col, &ctx, shared);
                (c.name(), self.flight.start(c.name(), deadline, job))
            })
            .collect();
        for c in blocking(false) {
            c.prepare(&self.ctx);
        }
        let mut inline: Vec<Collected> = blocking(false)
            .map(|c| run_one(&**c, &self.ctx, shared.clone()))
            .collect();
        let mut waited: Vec<Collected> = pending
            .into_iter()
            .map(|(name, p)| match p.wait_until(until) {
                Outcome::Done(done) => done,
                Outcome::TimedOut => failed(
                    name,
                    started.elapsed(),
                    format!("missed its deadline of {deadline:?}"),
                ),
                Outcome::StillRunning { since } => failed(
                    name,
                    Duration::ZERO,
                    format!("still stuck in a run started {since:?} ago"),
                ),
            })
            .collect();
        // Registry order, whatever ran where.
        let out: Vec<Collected> = self
            .collectors
            .iter()
            .zip(&blocks)
            .filter_map(|(c, b)| {
                let list = if *b { &mut waited } else { &mut inline };
                let i = list.iter().position(|x| x.name == c.name())?;
                Some(list.swap_remove(i))
            })
            .collect();
        self.log_transitions(&out);
        self.ready.store(true, Ordering::Relaxed);
        out
    }

    /// Logs a warning when a collector starts failing and an info line when it
    /// recovers; repeated failures are only logged at debug level.
    fn log_transitions(&self, collected: &[Collected]) {
        let mut last = self
            .last_success
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        for c in collected {
            let before = last.insert(c.name, c.success);
            match (before, c.success) {
                (Some(true) | None, false) if c.unavailable => {
                    tracing::debug!(collector = c.name, errors = ?c.errors, "collector source unavailable")
                }
                (Some(true) | None, false) => {
                    tracing::warn!(collector = c.name, errors = ?c.errors, "collector failing, its series are incomplete")
                }
                (Some(false), true) => tracing::info!(collector = c.name, "collector recovered"),
                (Some(false), false) => {
                    tracing::debug!(collector = c.name, errors = ?c.errors, "collector still failing")
                }
                _ => {}
            }
        }
    }
}

fn failed(name: &'static str, duration: Duration, error: String) -> Collected {
    Collected {
        name,
        success: false,
        errors: Arc::new(vec![error]),
        unavailable: false,
        duration,
        text: Arc::new(String::new()),
    }
}

fn run_one(c: &dyn Collector, ctx: &Context, shared: Arc<SharedReads>) -> Collected {
    let started = Instant::now();
    let mut sink = Sink::for_scrape(shared);
    let result = c.collect(ctx, &mut sink);
    let mut errors = sink.failures().to_vec();
    if let Err(e) = &result {
        errors.push(e.to_string());
    }
    let success = errors.is_empty();
    let unavailable = matches!(result, Err(Error::Unavailable(_))) && sink.failures().is_empty();
    Collected {
        name: c.name(),
        success,
        unavailable,
        errors: Arc::new(errors),
        duration: started.elapsed(),
        text: Arc::new(sink.into_text()),
    }
}

/// Renders one scrape: each collector's families, their success and duration,
/// `own_text` (already in text format, e.g. build info), then `self_families`.
pub fn render(collected: &[Collected], own_text: &str, self_families: &[MetricFamily]) -> String {
    // Room for all of it at once: the collectors' text, their two series,
    // and about 80 bytes a self-metrics sample.
    let samples: usize = self_families
        .iter()
        .map(|f| {
            f.get_metric()
                .iter()
                .map(|m| 3 + m.get_histogram().get_bucket().len())
                .sum::<usize>()
        })
        .sum();
    let capacity = collected.iter().map(|c| c.text.len() + 160).sum::<usize>()
        + own_text.len()
        + 512
        + 80 * samples;
    let mut out = String::with_capacity(capacity);
    for c in collected {
        out.push_str(&c.text);
    }
    let mut sink = Sink::new();
    for c in collected {
        sink.gauge(
            "gpuops_collector_success",
            "Whether the collector's last run read every source it found (1) or failed (0).",
            &[("collector", c.name)],
            if c.success { 1.0 } else { 0.0 },
        );
        sink.gauge(
            "gpuops_collector_duration_seconds",
            "How long the collector's last run took.",
            &[("collector", c.name)],
            c.duration.as_secs_f64(),
        );
    }
    out.push_str(&sink.into_text());
    out.push_str(own_text);
    encode_families(self_families, &mut out);
    out
}

/// Writes `families` in the text format exactly as `prometheus::TextEncoder`
/// does, without its allocation per sample (a `String` for every value and
/// escaped label): the HTTP RED metrics are a few hundred samples a scrape.
/// Counters, gauges and histograms (all the self-metrics are); any other
/// family goes through the crate's encoder.
pub fn encode_families(families: &[MetricFamily], out: &mut String) {
    for f in families {
        let kind = match f.get_field_type() {
            MetricType::COUNTER => "counter",
            MetricType::GAUGE => "gauge",
            MetricType::HISTOGRAM => "histogram",
            _ => {
                let encoder = prometheus::TextEncoder::new();
                if let Err(e) = encoder.encode_utf8(std::slice::from_ref(f), out) {
                    tracing::warn!(error = %e, "cannot encode self-metrics");
                }
                continue;
            }
        };
        let name = f.name();
        if !f.help().is_empty() {
            out.push_str("# HELP ");
            out.push_str(name);
            out.push(' ');
            escape_into(out, f.help(), false);
            out.push('\n');
        }
        out.push_str("# TYPE ");
        out.push_str(name);
        out.push(' ');
        out.push_str(kind);
        out.push('\n');
        for m in f.get_metric() {
            // `le`: a bucket's upper bound, or `None` inside for the `+Inf`
            // bucket added when the buckets have none.
            let sample = |out: &mut String, suffix: &str, le: Option<Option<f64>>, value: f64| {
                out.push_str(name);
                out.push_str(suffix);
                let labels = m.get_label();
                if !labels.is_empty() || le.is_some() {
                    let mut sep = '{';
                    for l in labels {
                        out.push(sep);
                        out.push_str(l.name());
                        out.push_str("=\"");
                        escape_into(out, l.value(), true);
                        out.push('"');
                        sep = ',';
                    }
                    if let Some(le) = le {
                        out.push(sep);
                        out.push_str("le=\"");
                        match le {
                            Some(upper) => push_value(out, upper),
                            None => out.push_str("+Inf"),
                        }
                        out.push('"');
                    }
                    out.push('}');
                }
                out.push(' ');
                push_value(out, value);
                if m.timestamp_ms() != 0 {
                    let _ = write!(out, " {}", m.timestamp_ms());
                }
                out.push('\n');
            };
            match f.get_field_type() {
                MetricType::COUNTER => sample(out, "", None, m.get_counter().get_value()),
                MetricType::GAUGE => sample(out, "", None, m.get_gauge().get_value()),
                _ => {
                    let h = m.get_histogram();
                    let mut inf_seen = false;
                    for b in h.get_bucket() {
                        let upper = b.upper_bound();
                        inf_seen |= upper == f64::INFINITY;
                        let count = b.cumulative_count() as f64;
                        sample(out, "_bucket", Some(Some(upper)), count);
                    }
                    if !inf_seen {
                        sample(out, "_bucket", Some(None), h.get_sample_count() as f64);
                    }
                    sample(out, "_sum", None, h.get_sample_sum());
                    sample(out, "_count", None, h.get_sample_count() as f64);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sink_groups_samples_by_name_and_sorts() {
        let mut s = Sink::new();
        s.gauge("b_bytes", "b", &[("x", "1")], 1.0);
        s.counter("a_total", "a", &[], 2.0);
        s.gauge("b_bytes", "b", &[("x", "2")], 3.0);
        let fams = s.into_families();
        assert_eq!(fams.len(), 2);
        assert_eq!(fams[0].name(), "a_total");
        assert_eq!(fams[1].get_metric().len(), 2);
    }

    #[test]
    fn missing_source_is_not_a_failure_but_parse_error_is() {
        let mut s = Sink::new();
        let missing: Result<u64, ReadError> = Err(ReadError::Missing("/x".into()));
        assert_eq!(s.read("t", missing), None);
        assert!(s.failures().is_empty());
        let bad: Result<u64, ReadError> = Err(ReadError::parse("/y", "nope"));
        assert_eq!(s.read("t", bad), None);
        assert_eq!(s.failures().len(), 1);
    }

    struct Probe {
        name: &'static str,
        blocks: bool,
        sleep: Duration,
    }

    impl Collector for Probe {
        fn name(&self) -> &'static str {
            self.name
        }

        fn collect(&self, _ctx: &Context, sink: &mut Sink) -> Result<(), Error> {
            std::thread::sleep(self.sleep);
            sink.gauge("probe_value", "test", &[("probe", self.name)], 1.0);
            Ok(())
        }

        fn may_block(&self) -> bool {
            self.blocks
        }
    }

    #[test]
    fn a_stuck_collector_fails_alone_and_in_registry_order() {
        let mut cfg = AgentConfig::default();
        cfg.collectors.deadline = Duration::from_millis(200);
        let ctx = Arc::new(Context::new(
            Arc::new(cfg),
            Arc::new(KernelEvents::new()),
            false,
        ));
        let probe = |name, blocks, ms| -> Arc<dyn Collector> {
            Arc::new(Probe {
                name,
                blocks,
                sleep: Duration::from_millis(ms),
            })
        };
        let runner = Runner::new(
            ctx,
            vec![
                probe("a", false, 0),
                probe("nfs", true, 3_000),
                probe("b", false, 0),
            ],
        );
        for round in 0..2 {
            let started = Instant::now();
            let out = runner.collect();
            assert!(
                started.elapsed() < Duration::from_millis(1_000),
                "round {round}"
            );
            let summary: Vec<(&str, bool)> = out.iter().map(|c| (c.name, c.success)).collect();
            assert_eq!(
                summary,
                vec![("a", true), ("nfs", false), ("b", true)],
                "round {round}"
            );
        }
    }

    /// Records the thread it ran on.
    struct WhereRun(std::sync::Mutex<Vec<std::thread::ThreadId>>);

    impl Collector for WhereRun {
        fn name(&self) -> &'static str {
            "where"
        }

        fn collect(&self, _ctx: &Context, _sink: &mut Sink) -> Result<(), Error> {
            self.0.lock().unwrap().push(std::thread::current().id());
            Ok(())
        }

        fn may_block(&self) -> bool {
            false
        }
    }

    #[test]
    fn procfs_collectors_run_on_the_scrape_thread_without_a_hand_off() {
        let ctx = Arc::new(Context::new(
            Arc::new(AgentConfig::default()),
            Arc::new(KernelEvents::new()),
            false,
        ));
        let probe = Arc::new(WhereRun(std::sync::Mutex::new(Vec::new())));
        let runner = Runner::new(ctx.clone(), vec![probe.clone()]);
        for _ in 0..3 {
            assert!(runner.collect()[0].success);
        }
        let me = std::thread::current().id();
        assert_eq!(*probe.0.lock().unwrap(), vec![me; 3]);
        // Every host collector reads /proc and /sys (storage bounds its own
        // statvfs calls): none needs a thread of its own.
        let mut cfg = AgentConfig::default();
        cfg.collectors.gpu = false;
        let ctx = Arc::new(Context::new(
            Arc::new(cfg),
            Arc::new(KernelEvents::new()),
            false,
        ));
        let blocking: Vec<_> = all(&ctx)
            .iter()
            .filter(|c| c.may_block())
            .map(|c| c.name())
            .collect();
        assert!(blocking.is_empty(), "{blocking:?}");
        assert!(!runner.may_block(), "the scrape stays on the async worker");
        // A collector that may wait seconds on its own thread (storage with
        // an NFS mount) puts the scrape on the blocking pool all the same.
        struct Waits;
        impl Collector for Waits {
            fn name(&self) -> &'static str {
                "waits"
            }
            fn collect(&self, _ctx: &Context, _sink: &mut Sink) -> Result<(), Error> {
                Ok(())
            }
            fn may_block(&self) -> bool {
                false
            }
            fn may_wait(&self) -> bool {
                true
            }
        }
        let runner = Runner::new(ctx, vec![probe, Arc::new(Waits)]);
        assert!(runner.may_block());
    }

    /// Rewrites a file when it runs (between two collectors of a scrape).
    struct Rewrite(std::path::PathBuf, &'static str);

    impl Collector for Rewrite {
        fn name(&self) -> &'static str {
            "rewrite"
        }

        fn collect(&self, _ctx: &Context, _sink: &mut Sink) -> Result<(), Error> {
            std::fs::write(&self.0, self.1).unwrap();
            Ok(())
        }

        fn may_block(&self) -> bool {
            false
        }
    }

    #[test]
    fn vmstat_is_read_once_per_scrape_and_shared_by_memory_and_oom() {
        let dir = tempfile::tempdir().unwrap();
        let vmstat = dir.path().join("vmstat");
        std::fs::write(&vmstat, "allocstall_normal 7\noom_kill 1\n").unwrap();
        let mut cfg = AgentConfig::default();
        cfg.roots.procfs = dir.path().to_path_buf();
        cfg.roots.sysfs = dir.path().join("sys");
        let ctx = Arc::new(Context::new(
            Arc::new(cfg),
            Arc::new(KernelEvents::new()),
            false,
        ));
        let runner = Runner::new(
            ctx.clone(),
            vec![
                Arc::new(memory::MemoryCollector::new(&ctx)),
                // Changes the file after the memory collector read it: the
                // oom collector of the same scrape still sees that one read.
                Arc::new(Rewrite(vmstat, "allocstall_normal 8\noom_kill 2\n")),
                Arc::new(oom::OomCollector::new(&ctx)),
            ],
        );
        let samples = |out: &[Collected]| -> Vec<String> {
            out.iter()
                .flat_map(|c| c.text.lines().map(str::to_string).collect::<Vec<_>>())
                .filter(|l| !l.starts_with('#'))
                .collect()
        };
        assert_eq!(
            samples(&runner.collect()),
            ["memory_pressure_events_total 7", "oom_kills_total 1"]
        );
        // The next scrape reads it again.
        assert_eq!(
            samples(&runner.collect()),
            ["memory_pressure_events_total 8", "oom_kills_total 2"]
        );
    }

    #[test]
    fn values_print_as_the_float_formatter_prints_them() {
        for v in [
            0.0,
            -0.0,
            1.0,
            -3.0,
            41943040000.0,
            1.5,
            0.1,
            1e15,
            9_007_199_254_740_991.0,
            9_007_199_254_740_992.0,
            1e21,
            -1e300,
            f64::NAN,
            f64::INFINITY,
            f64::NEG_INFINITY,
            f64::MIN_POSITIVE,
        ] {
            let mut out = String::new();
            push_value(&mut out, v);
            assert_eq!(out, format!("{v}"), "{v:?}");
        }
    }

    #[test]
    fn self_metrics_are_written_as_the_text_encoder_writes_them() {
        let http = crate::telemetry::HttpMetrics::new();
        for (endpoint, status, seconds) in [
            ("/metrics", 200, 0.0004),
            ("/metrics", 200, 0.02),
            ("/v1/events", 400, 3.5),
            ("un\"matched\\\n", 404, 20.0),
        ] {
            http.observe(endpoint, "GET", status, seconds, Some(0), Some(1500));
        }
        http.connections_open.set(-2);
        let mut families = http.gather();
        let mut summary = prometheus::proto::MetricFamily::default();
        summary.set_name("x_seconds".into());
        summary.set_help("".into());
        summary.set_field_type(MetricType::SUMMARY);
        summary
            .mut_metric()
            .push(prometheus::proto::Metric::default());
        families.push(summary);
        let mut ours = String::new();
        encode_families(&families, &mut ours);
        let mut theirs = String::new();
        prometheus::TextEncoder::new()
            .encode_utf8(&families, &mut theirs)
            .unwrap();
        assert_eq!(ours, theirs);
        assert!(ours.contains(r#"le="+Inf"} 2"#), "{ours}");
    }

    #[test]
    fn text_is_escaped_like_the_exposition_format_and_reads_back() {
        let mut s = Sink::new();
        s.gauge(
            "x_bytes",
            "help with \\ and\nnewline",
            &[("p", "a\"b\\c\nd"), ("q", "")],
            1.5,
        );
        s.counter("x_total", "c", &[], 3.0);
        let text = {
            let mut t = Sink::new();
            t.gauge(
                "x_bytes",
                "help with \\ and\nnewline",
                &[("p", "a\"b\\c\nd"), ("q", "")],
                1.5,
            );
            t.counter("x_total", "c", &[], 3.0);
            t.into_text()
        };
        expect_test::expect![[r#"
            # HELP x_bytes help with \\ and\nnewline
            # TYPE x_bytes gauge
            x_bytes{p="a\"b\\c\nd",q=""} 1.5
            # HELP x_total c
            # TYPE x_total counter
            x_total 3
        "#]]
        .assert_eq(&text);
        let fams = s.into_families();
        let m = &fams[0].get_metric()[0];
        assert_eq!(m.get_label()[0].value(), "a\"b\\c\nd");
        assert_eq!(m.get_label()[1].value(), "");
        assert_eq!(m.get_gauge().get_value(), 1.5);
        assert_eq!(fams[1].get_metric()[0].get_counter().get_value(), 3.0);
    }
}
