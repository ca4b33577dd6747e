//! Logging and self-observability shared by both roles.
//!
//! One tracing layer writes either text or JSON lines with `timestamp`,
//! `level`, `service`, `instance_id`, `trace_id`, `message` and `context`
//! (every other field). Every value passes through [`redact`] first, so a
//! token or webhook URL that reaches a log call by mistake is masked.
//! This module must not read configuration files or touch the network.

use std::fmt::Write as _;
use std::io::Write as _;
use std::sync::OnceLock;

use serde_json::{Map, Value};
use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::layer::{Context, SubscriberExt};
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

/// Where log lines go; stderr in production, a buffer in tests.
pub type LogWriter = Box<dyn Fn(&str) + Send + Sync>;

/// Installs the global subscriber. `service` is `gpuops-agent` or `gpuops-bot`.
/// Safe to call twice (the second call does nothing).
pub fn init(service: &'static str, json: bool, level: &str) {
    let filter = EnvFilter::try_from_env("GPUOPS_LOG")
        .or_else(|_| EnvFilter::try_new(level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let layer = LogLayer::new(
        service,
        json,
        Box::new(|line: &str| {
            let mut err = std::io::stderr().lock();
            let _ = err.write_all(line.as_bytes());
        }),
    );
    let _ = tracing_subscriber::registry()
        .with(filter)
        .with(layer)
        .try_init();
}

/// A stable id for this process's logs: the host name and pid.
pub fn instance_id() -> &'static str {
    static ID: OnceLock<String> = OnceLock::new();
    ID.get_or_init(|| {
        let host = sysinfo::System::host_name().unwrap_or_else(|_| String::from("unknown"));
        format!("{host}:{}", std::process::id())
    })
}

/// The layer behind [`init`]; public so tests can capture its output.
pub struct LogLayer {
    service: &'static str,
    json: bool,
    write: LogWriter,
}

impl LogLayer {
    pub fn new(service: &'static str, json: bool, write: LogWriter) -> LogLayer {
        LogLayer {
            service,
            json,
            write,
        }
    }
}

#[derive(Default)]
struct Fields {
    message: String,
    trace_id: Option<String>,
    context: Map<String, Value>,
}

impl Visit for Fields {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.put(field.name(), Value::String(redact(value)));
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.put(field.name(), Value::from(value));
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.put(field.name(), Value::from(value));
    }

    fn record_f64(&mut self, field: &Field, value: f64) {
        self.put(field.name(), Value::from(value));
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.put(field.name(), Value::from(value));
    }

    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.put(field.name(), Value::String(redact(&format!("{value:?}"))));
    }
}

impl Fields {
    fn put(&mut self, name: &str, value: Value) {
        match name {
            "message" => {
                self.message = match value {
                    Value::String(s) => s,
                    v => v.to_string(),
                }
            }
            "trace_id" => {
                self.trace_id = Some(match value {
                    Value::String(s) => s,
                    v => v.to_string(),
                })
            }
            _ => {
                self.context.insert(name.to_string(), value);
            }
        }
    }
}

/// Span fields are kept so `trace_id` set on a request span reaches its events.
struct SpanFields(Fields);

impl<S> Layer<S> for LogLayer
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    fn on_new_span(
        &self,
        attrs: &tracing::span::Attributes<'_>,
        id: &tracing::span::Id,
        ctx: Context<'_, S>,
    ) {
        let mut fields = Fields::default();
        attrs.record(&mut fields);
        if let Some(span) = ctx.span(id) {
            span.extensions_mut().insert(SpanFields(fields));
        }
    }

    fn on_event(&self, event: &Event<'_>, ctx: Context<'_, S>) {
        let mut fields = Fields::default();
        event.record(&mut fields);
        if let Some(scope) = ctx.event_scope(event) {
            for span in scope.from_root() {
                if let Some(SpanFields(sf)) = span.extensions().get::<SpanFields>() {
                    if fields.trace_id.is_none() {
                        fields.trace_id.clone_from(&sf.trace_id);
                    }
                    for (k, v) in &sf.context {
                        fields.context.entry(k.clone()).or_insert_with(|| v.clone());
                    }
                }
            }
        }
        let meta = event.metadata();
        let timestamp = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
        let line = if self.json {
            let mut obj = Map::new();
            obj.insert("timestamp".into(), Value::String(timestamp));
            obj.insert(
                "level".into(),
                Value::String(level_name(meta.level()).into()),
            );
            obj.insert("service".into(), Value::String(self.service.into()));
            obj.insert("instance_id".into(), Value::String(instance_id().into()));
            obj.insert(
                "trace_id".into(),
                fields.trace_id.map(Value::String).unwrap_or(Value::Null),
            );
            obj.insert("message".into(), Value::String(fields.message));
            obj.insert("target".into(), Value::String(meta.target().into()));
            obj.insert("context".into(), Value::Object(fields.context));
            let mut s = Value::Object(obj).to_string();
            s.push('\n');
            s
        } else {
            let mut s = format!(
                "{timestamp} {:>5} {}",
                level_name(meta.level()),
                fields.message
            );
            if let Some(t) = &fields.trace_id {
                let _ = write!(s, " trace_id={t}");
            }
            for (k, v) in &fields.context {
                match v {
                    Value::String(v) => {
                        let _ = write!(s, " {k}={v:?}");
                    }
                    v => {
                        let _ = write!(s, " {k}={v}");
                    }
                }
            }
            s.push('\n');
            s
        };
        (self.write)(&line);
    }
}

fn level_name(l: &Level) -> &'static str {
    match *l {
        Level::ERROR => "error",
        Level::WARN => "warn",
        Level::INFO => "info",
        Level::DEBUG => "debug",
        Level::TRACE => "trace",
    }
}

/// Masks secrets that may appear in free text: Slack tokens, bearer tokens,
/// webhook URLs (Slack, Discord, any URL with a query string or userinfo).
pub fn redact(text: &str) -> String {
    static PATTERNS: OnceLock<Vec<(regex::Regex, &'static str)>> = OnceLock::new();
    let patterns = PATTERNS.get_or_init(|| {
        [
            (r"xox[abposer]-[A-Za-z0-9-]+", "xox?-<redacted>"),
            (r"xapp-[A-Za-z0-9-]+", "xapp-<redacted>"),
            (
                r"(?i)(bearer|bot)\s+[A-Za-z0-9._~+/=-]{8,}",
                "$1 <redacted>",
            ),
            (
                r"https?://hooks\.slack\.com/\S+",
                "https://hooks.slack.com/<redacted>",
            ),
            (
                r"https?://(?:[a-z]+\.)?discord(?:app)?\.com/api/(?:v\d+/)?webhooks/\S+",
                "https://discord.com/api/webhooks/<redacted>",
            ),
            (r"(https?://)[^/\s:@]+:[^/\s@]+@", "$1<redacted>@"),
            (
                r"(?i)((?:token|secret|signature|key|sig)=)[^&\s]+",
                "$1<redacted>",
            ),
        ]
        .into_iter()
        .filter_map(|(p, r)| regex::Regex::new(p).ok().map(|re| (re, r)))
        .collect()
    });
    let mut out = std::borrow::Cow::Borrowed(text);
    for (re, rep) in patterns {
        if re.is_match(&out) {
            out = std::borrow::Cow::Owned(re.replace_all(&out, *rep).into_owned());
        }
    }
    out.into_owned()
}

/// `gpuops_build_info{version, role, gpu_backend} 1`, in text format.
pub fn build_info(role: &str, gpu_backend: &str) -> String {
    // Escaped as the text format wants label values (as `collector::Sink` does).
    let label = |v: &str| {
        v.replace('\\', "\\\\")
            .replace('\n', "\\n")
            .replace('"', "\\\"")
    };
    format!(
        "# HELP gpuops_build_info Build and run-time facts; gpu_backend=\"fake\" means GPU data is replayed from a fixture, not read from hardware.\n\
         # TYPE gpuops_build_info gauge\n\
         gpuops_build_info{{version=\"{}\",role=\"{}\",gpu_backend=\"{}\"}} 1\n",
        label(env!("CARGO_PKG_VERSION")),
        label(role),
        label(gpu_backend),
    )
}

/// Process metrics (`process_resident_memory_bytes`, CPU seconds, fds...)
/// in text format, with the names and help of the `prometheus` crate's
/// process collector (and the Go client's), written straight from one read
/// of `/proc/self/stat` (kept open), the `/proc/self/fd` count (its size,
/// without listing it, on Linux 6.2 and later) and `getrlimit` (read
/// through [`crate::host`]; `btime` of `/proc/stat` once): the
/// crate's collector also reads `/proc/self/limits` and builds protobuf
/// families for the text encoder to walk, about 50 µs a scrape. A value that
/// cannot be read is left out.
pub fn process_text(out: &mut String) {
    let roots = crate::host::HostRoots::default();
    let stat = roots
        .read_kept(std::path::Path::new("/proc/self/stat"))
        .ok()
        .and_then(|t| SelfStat::parse(&t));
    let open_fds = roots.open_fd_count().ok();
    let max_fds = rustix::process::getrlimit(rustix::process::Resource::Nofile).current;
    let tick = procfs::ticks_per_second().max(1) as f64;
    let mut family = |name: &str, help: &str, kind: &str, v: Option<f64>| {
        if let Some(v) = v {
            let _ = write!(
                out,
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}\n"
            );
        }
    };
    family(
        "process_cpu_seconds_total",
        "Total user and system CPU time spent in seconds.",
        "counter",
        stat.as_ref().map(|s| (s.utime + s.stime) as f64 / tick),
    );
    family(
        "process_open_fds",
        "Number of open file descriptors.",
        "gauge",
        open_fds.map(|n| n as f64),
    );
    family(
        "process_max_fds",
        "Maximum number of open file descriptors.",
        "gauge",
        max_fds.map(|n| n as f64),
    );
    family(
        "process_virtual_memory_bytes",
        "Virtual memory size in bytes.",
        "gauge",
        stat.as_ref().map(|s| s.vsize as f64),
    );
    family(
        "process_resident_memory_bytes",
        "Resident memory size in bytes.",
        "gauge",
        stat.as_ref()
            .map(|s| (s.rss_pages * procfs::page_size()) as f64),
    );
    family(
        "process_start_time_seconds",
        "Start time of the process since unix epoch in seconds.",
        "gauge",
        stat.as_ref().and_then(|s| {
            static BOOT: OnceLock<Option<u64>> = OnceLock::new();
            let boot = (*BOOT.get_or_init(|| {
                let stat = roots.read_text(std::path::Path::new("/proc/stat")).ok()?;
                stat.lines()
                    .find_map(|l| l.strip_prefix("btime "))
                    .and_then(|v| v.trim().parse().ok())
            }))?;
            Some(boot as f64 + s.start_ticks as f64 / tick)
        }),
    );
    family(
        "process_threads",
        "Number of OS threads in the process.",
        "gauge",
        stat.as_ref().map(|s| s.threads as f64),
    );
}

/// Process metrics as the `prometheus` crate's process collector gathers
/// them (the bot renders them with its registry; the agent uses
/// [`process_text`]).
pub fn process_families() -> Vec<prometheus::proto::MetricFamily> {
    use prometheus::core::Collector as _;
    static PC: OnceLock<prometheus::process_collector::ProcessCollector> = OnceLock::new();
    PC.get_or_init(prometheus::process_collector::ProcessCollector::for_self)
        .collect()
}

/// The fields of `/proc/self/stat` the process metrics use.
struct SelfStat {
    utime: u64,
    stime: u64,
    threads: u64,
    start_ticks: u64,
    vsize: u64,
    rss_pages: u64,
}

impl SelfStat {
    /// Parses the fields after the command name (which may hold spaces
    /// and parentheses: it ends at the last `)`).
    fn parse(text: &str) -> Option<SelfStat> {
        let (_, rest) = text.rsplit_once(')')?;
        let f: Vec<&str> = rest.split_ascii_whitespace().collect();
        // Fields after the command: state is 0, utime 11, stime 12,
        // num_threads 17, starttime 19, vsize 20, rss 21.
        let n = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok());
        Some(SelfStat {
            utime: n(11)?,
            stime: n(12)?,
            threads: n(17)?,
            start_ticks: n(19)?,
            vsize: n(20)?,
            rss_pages: n(21)?,
        })
    }
}

/// RED metrics for an HTTP server (both roles): `api_requests_total`,
/// `api_request_duration_seconds`, `api_request_size_bytes`,
/// `api_response_size_bytes`, `api_errors_total`; and the connection
/// metrics of `src/web`.
pub struct HttpMetrics {
    registry: prometheus::Registry,
    requests: prometheus::IntCounterVec,
    duration: prometheus::HistogramVec,
    request_size: prometheus::HistogramVec,
    response_size: prometheus::HistogramVec,
    errors: prometheus::IntCounterVec,
    /// `gpuops_http_connections_open`.
    pub connections_open: prometheus::IntGauge,
    /// `gpuops_http_connections_refused_total`: accepted and closed at once
    /// because `max_connections` were open.
    pub connections_refused: prometheus::IntCounter,
    /// `gpuops_http_connections_evicted_total`: idle connections closed to
    /// admit a new one (the server was full, or their peer at its share).
    pub connections_evicted: prometheus::IntCounter,
    /// `gpuops_http_timeouts_total{timeout}`: `header`, `body` or `idle`.
    pub timeouts: prometheus::IntCounterVec,
    /// `gpuops_http_accept_errors_total` (e.g. out of file descriptors).
    pub accept_errors: prometheus::IntCounter,
}

/// The `method` label: one of the standard methods, else `other`, so that
/// made-up methods cannot add series.
pub fn method_label(method: &axum::http::Method) -> &'static str {
    use axum::http::Method;
    match *method {
        Method::GET => "GET",
        Method::HEAD => "HEAD",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        Method::PATCH => "PATCH",
        Method::OPTIONS => "OPTIONS",
        Method::CONNECT => "CONNECT",
        Method::TRACE => "TRACE",
        _ => "other",
    }
}

/// The `endpoint` label: the matched route template (a closed set, fixed
/// when the router is built), else `unmatched`; never the raw path.
pub fn endpoint_label(req: &axum::extract::Request) -> String {
    req.extensions()
        .get::<axum::extract::MatchedPath>()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "unmatched".to_string())
}

/// Buckets of `api_request_duration_seconds`.
pub const DURATION_BUCKETS: &[f64] = &[0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];
const SIZE_BUCKETS: &[f64] = &[100.0, 1e3, 1e4, 1e5, 1e6, 1e7];

impl HttpMetrics {
    pub fn new() -> HttpMetrics {
        use prometheus::{HistogramOpts, IntCounterVec, Opts};
        let registry = prometheus::Registry::new();
        let labels = &["endpoint", "method", "status_code"];
        let requests = IntCounterVec::new(
            Opts::new(
                "api_requests_total",
                "HTTP requests served, by route, method and status.",
            ),
            labels,
        )
        .unwrap_or_else(|e| unreachable!("static metric definition: {e}"));
        let errors = IntCounterVec::new(
            Opts::new(
                "api_errors_total",
                "HTTP requests answered with a 4xx or 5xx status.",
            ),
            labels,
        )
        .unwrap_or_else(|e| unreachable!("static metric definition: {e}"));
        let histogram = |name: &str, help: &str, buckets: &[f64]| {
            prometheus::HistogramVec::new(
                HistogramOpts::new(name, help).buckets(buckets.to_vec()),
                &["endpoint", "method"],
            )
            .unwrap_or_else(|e| unreachable!("static metric definition: {e}"))
        };
        let duration = histogram(
            "api_request_duration_seconds",
            "Time from request received to response headers sent.",
            DURATION_BUCKETS,
        );
        let request_size = histogram(
            "api_request_size_bytes",
            "HTTP request body sizes.",
            SIZE_BUCKETS,
        );
        let response_size = histogram(
            "api_response_size_bytes",
            "HTTP response body sizes (when known).",
            SIZE_BUCKETS,
        );
        let connections_open = prometheus::IntGauge::new(
            "gpuops_http_connections_open",
            "HTTP connections open now (TLS handshakes included).",
        )
        .unwrap_or_else(|e| unreachable!("static metric definition: {e}"));
        let connections_refused = prometheus::IntCounter::new(
            "gpuops_http_connections_refused_total",
            "Connections accepted and closed at once because max_connections were open.",
        )
        .unwrap_or_else(|e| unreachable!("static metric definition: {e}"));
        let connections_evicted = prometheus::IntCounter::new(
            "gpuops_http_connections_evicted_total",
            "Idle connections closed to admit a new one, because max_connections were open or their peer held its share.",
        )
        .unwrap_or_else(|e| unreachable!("static metric definition: {e}"));
        let timeouts = IntCounterVec::new(
            Opts::new(
                "gpuops_http_timeouts_total",
                "Connections closed (header, idle) or requests answered 408 (body) because a peer was too slow, by timeout.",
            ),
            &["timeout"],
        )
        .unwrap_or_else(|e| unreachable!("static metric definition: {e}"));
        for t in ["header", "body", "idle"] {
            timeouts.with_label_values(&[t]);
        }
        let accept_errors = prometheus::IntCounter::new(
            "gpuops_http_accept_errors_total",
            "Failed accept calls on the listening socket (e.g. out of file descriptors); each is followed by a short pause.",
        )
        .unwrap_or_else(|e| unreachable!("static metric definition: {e}"));
        for c in [
            Box::new(requests.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(errors.clone()),
            Box::new(duration.clone()),
            Box::new(request_size.clone()),
            Box::new(response_size.clone()),
            Box::new(connections_open.clone()),
            Box::new(connections_refused.clone()),
            Box::new(connections_evicted.clone()),
            Box::new(timeouts.clone()),
            Box::new(accept_errors.clone()),
        ] {
            let _ = registry.register(c);
        }
        HttpMetrics {
            registry,
            requests,
            duration,
            request_size,
            response_size,
            errors,
            connections_open,
            connections_refused,
            connections_evicted,
            timeouts,
            accept_errors,
        }
    }

    /// The families, for rendering beside the role's own.
    pub fn gather(&self) -> Vec<prometheus::proto::MetricFamily> {
        self.registry.gather()
    }

    /// Records one request.
    pub fn observe(
        &self,
        endpoint: &str,
        method: &str,
        status: u16,
        seconds: f64,
        request_bytes: Option<u64>,
        response_bytes: Option<u64>,
    ) {
        // The standard codes' text without an allocation.
        let known = axum::http::StatusCode::from_u16(status).ok();
        let owned;
        let code = match &known {
            Some(s) => s.as_str(),
            None => {
                owned = status.to_string();
                owned.as_str()
            }
        };
        self.requests
            .with_label_values(&[endpoint, method, code])
            .inc();
        if status >= 400 {
            self.errors
                .with_label_values(&[endpoint, method, code])
                .inc();
        }
        self.duration
            .with_label_values(&[endpoint, method])
            .observe(seconds);
        if let Some(n) = request_bytes {
            self.request_size
                .with_label_values(&[endpoint, method])
                .observe(n as f64);
        }
        if let Some(n) = response_bytes {
            self.response_size
                .with_label_values(&[endpoint, method])
                .observe(n as f64);
        }
    }
}

impl Default for HttpMetrics {
    fn default() -> Self {
        HttpMetrics::new()
    }
}

/// Axum middleware recording [`HttpMetrics`] for every request; both labels
/// come from closed sets ([`endpoint_label`], [`method_label`]), so no request
/// can add series.
pub async fn track_http(
    axum::extract::State(metrics): axum::extract::State<std::sync::Arc<HttpMetrics>>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    use http_body::Body as _;
    // The matched route (an `Arc<str>` inside: no copy), else `unmatched`.
    let matched = req
        .extensions()
        .get::<axum::extract::MatchedPath>()
        .cloned();
    let method = method_label(req.method());
    let request_bytes = req
        .headers()
        .get(axum::http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse().ok());
    let started = std::time::Instant::now();
    let resp = next.run(req).await;
    let response_bytes = resp.body().size_hint().exact();
    let endpoint = matched.as_ref().map_or("unmatched", |p| p.as_str());
    metrics.observe(
        endpoint,
        method,
        resp.status().as_u16(),
        started.elapsed().as_secs_f64(),
        request_bytes,
        response_bytes,
    );
    resp
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[test]
    fn build_info_is_what_the_collector_sink_writes() {
        for (role, backend) in [("bot", "none"), ("agent", "fake"), ("a\"b", "x\\y\nz")] {
            let mut sink = crate::collector::Sink::new();
            sink.gauge(
                "gpuops_build_info",
                "Build and run-time facts; gpu_backend=\"fake\" means GPU data is replayed from a fixture, not read from hardware.",
                &[
                    ("version", env!("CARGO_PKG_VERSION")),
                    ("role", role),
                    ("gpu_backend", backend),
                ],
                1.0,
            );
            assert_eq!(build_info(role, backend), sink.into_text());
        }
    }

    #[test]
    fn process_text_has_the_process_collectors_families_and_values() {
        let mut text = String::new();
        process_text(&mut text);
        let names: Vec<&str> = text
            .lines()
            .filter_map(|l| l.strip_prefix("# TYPE "))
            .collect();
        assert_eq!(
            names,
            [
                "process_cpu_seconds_total counter",
                "process_open_fds gauge",
                "process_max_fds gauge",
                "process_virtual_memory_bytes gauge",
                "process_resident_memory_bytes gauge",
                "process_start_time_seconds gauge",
                "process_threads gauge",
            ]
        );
        let value = |name: &str| -> f64 {
            text.lines()
                .find_map(|l| l.strip_prefix(&format!("{name} ")))
                .and_then(|v| v.parse().ok())
                .unwrap()
        };
        assert!(value("process_resident_memory_bytes") > 1e6);
        assert!(value("process_threads") >= 1.0);
        assert!(value("process_start_time_seconds") > 1.6e9);
        let stat = SelfStat::parse(
            "42 (a (b) c) S 1 2 3 4 5 6 7 8 9 10 110 120 13 14 15 16 7 18 190 2000 300 ",
        )
        .unwrap();
        assert_eq!((stat.utime, stat.stime, stat.threads), (110, 120, 7));
        assert_eq!(
            (stat.start_ticks, stat.vsize, stat.rss_pages),
            (190, 2000, 300)
        );
    }

    #[test]
    fn redacts_tokens_and_webhook_urls() {
        let s = redact("posting with xoxb-123-456-abcDEF to https://hooks.slack.com/services/T0/B0/XyZ and https://discord.com/api/webhooks/1/abc, Authorization: Bearer abcdefghijklmnop");
        assert!(!s.contains("abcDEF"), "{s}");
        assert!(!s.contains("XyZ"), "{s}");
        assert!(!s.contains("/1/abc"), "{s}");
        assert!(!s.contains("abcdefghijklmnop"), "{s}");
    }

    #[test]
    fn json_lines_have_the_documented_fields_and_no_secrets() {
        let buf = Arc::new(Mutex::new(String::new()));
        let b = buf.clone();
        let layer = LogLayer::new(
            "gpuops-test",
            true,
            Box::new(move |l: &str| b.lock().unwrap().push_str(l)),
        );
        let sub = tracing_subscriber::registry().with(layer);
        tracing::subscriber::with_default(sub, || {
            let span = tracing::info_span!("req", trace_id = "abc123");
            let _g = span.enter();
            tracing::warn!(
                url = "https://hooks.slack.com/services/T/B/secretpart",
                "delivery failed"
            );
        });
        let out = buf.lock().unwrap().clone();
        let v: Value = serde_json::from_str(out.trim()).unwrap();
        for k in [
            "timestamp",
            "level",
            "service",
            "instance_id",
            "trace_id",
            "message",
            "context",
        ] {
            assert!(v.get(k).is_some(), "missing {k} in {out}");
        }
        assert_eq!(v["trace_id"], "abc123");
        assert_eq!(v["message"], "delivery failed");
        assert!(!out.contains("secretpart"), "{out}");
    }
}
