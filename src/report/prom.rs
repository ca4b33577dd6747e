//! A small client of Prometheus's HTTP query API (`/api/v1/query`,
//! `/api/v1/query_range`; Thanos, Mimir and VictoriaMetrics answer the
//! same), each call with a deadline, and the graph links a report puts
//! behind its numbers. Responses are outside data: nothing here unwraps
//! them, and an error says what went wrong in a line.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Deserialize;

/// One series of an instant query: its labels and value.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

impl Sample {
    /// A label's value, or `-`.
    pub fn label(&self, name: &str) -> &str {
        self.labels.get(name).map(String::as_str).unwrap_or("-")
    }
}

/// One series of a range query.
#[derive(Debug, Clone, PartialEq)]
pub struct RangeSeries {
    pub labels: BTreeMap<String, String>,
    /// `(unix seconds, value)`.
    pub points: Vec<(f64, f64)>,
}

/// The client: a base URL and a deadline per call.
#[derive(Clone)]
pub struct Prometheus {
    http: reqwest::Client,
    base: String,
    timeout: Duration,
}

#[derive(Deserialize)]
struct Envelope {
    status: String,
    #[serde(default)]
    data: Option<Data>,
    #[serde(default, rename = "errorType")]
    error_type: Option<String>,
    #[serde(default)]
    error: Option<String>,
}

#[derive(Deserialize)]
struct Data {
    #[serde(rename = "resultType")]
    result_type: String,
    result: serde_json::Value,
}

#[derive(Deserialize)]
struct VectorItem {
    #[serde(default)]
    metric: BTreeMap<String, String>,
    value: (f64, String),
}

#[derive(Deserialize)]
struct MatrixItem {
    #[serde(default)]
    metric: BTreeMap<String, String>,
    values: Vec<(f64, String)>,
}

/// Parses a sample value (`"1.5"`, `"+Inf"`, `"NaN"`).
pub fn parse_value(v: &str) -> Result<f64, String> {
    match v {
        "+Inf" | "Inf" => Ok(f64::INFINITY),
        "-Inf" => Ok(f64::NEG_INFINITY),
        "NaN" => Ok(f64::NAN),
        _ => v
            .parse::<f64>()
            .map_err(|_| format!("{v:?} is not a sample value")),
    }
}

impl Prometheus {
    /// A client of the API at `base` (`http://127.0.0.1:9090`).
    pub fn new(base: &str, timeout: Duration) -> Result<Prometheus, String> {
        let http = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout.min(Duration::from_secs(5)))
            .build()
            .map_err(|e| format!("cannot build an HTTP client: {e}"))?;
        Ok(Prometheus {
            http,
            base: base.trim_end_matches('/').to_string(),
            timeout,
        })
    }

    pub fn base(&self) -> &str {
        &self.base
    }

    async fn call(&self, path: &str, params: &[(&str, String)]) -> Result<Data, String> {
        let url = format!("{}{path}", self.base);
        let send = self.http.get(&url).query(params).send();
        let resp = match tokio::time::timeout(self.timeout, send).await {
            Err(_) => {
                return Err(format!(
                    "no answer from {} within {:?}",
                    self.base, self.timeout
                ))
            }
            Ok(Err(e)) if e.is_timeout() => {
                return Err(format!(
                    "no answer from {} within {:?}",
                    self.base, self.timeout
                ))
            }
            Ok(Err(e)) if e.is_connect() => {
                return Err(format!(
                    "Prometheus unreachable at {} ({})",
                    self.base,
                    connect_cause(&e)
                ))
            }
            Ok(Err(e)) => return Err(format!("request to {} failed: {e}", self.base)),
            Ok(Ok(r)) => r,
        };
        let status = resp.status();
        let body = match tokio::time::timeout(self.timeout, resp.bytes()).await {
            Ok(Ok(b)) => b,
            Ok(Err(e)) => return Err(format!("cannot read the answer of {}: {e}", self.base)),
            Err(_) => {
                return Err(format!(
                    "no answer from {} within {:?}",
                    self.base, self.timeout
                ))
            }
        };
        let env: Envelope = serde_json::from_slice(&body).map_err(|_| {
            format!(
                "{} answered HTTP {} with something that is not the query API's JSON",
                self.base,
                status.as_u16()
            )
        })?;
        if env.status != "success" {
            return Err(format!(
                "Prometheus said {}: {}",
                env.error_type.as_deref().unwrap_or("error"),
                env.error.as_deref().unwrap_or("(no message)")
            ));
        }
        env.data
            .ok_or_else(|| "Prometheus answered success without data".to_string())
    }

    /// `/api/v1/query` at `at` (Unix seconds). A scalar answer is one
    /// sample without labels.
    pub async fn instant(&self, promql: &str, at: f64) -> Result<Vec<Sample>, String> {
        let data = self
            .call(
                "/api/v1/query",
                &[("query", promql.to_string()), ("time", format!("{at:.3}"))],
            )
            .await?;
        match data.result_type.as_str() {
            "vector" => {
                let items: Vec<VectorItem> = serde_json::from_value(data.result)
                    .map_err(|e| format!("unexpected vector: {e}"))?;
                items
                    .into_iter()
                    .map(|i| {
                        Ok(Sample {
                            labels: i.metric,
                            value: parse_value(&i.value.1)?,
                        })
                    })
                    .collect()
            }
            "scalar" => {
                let (_, v): (f64, String) = serde_json::from_value(data.result)
                    .map_err(|e| format!("unexpected scalar: {e}"))?;
                Ok(vec![Sample {
                    labels: BTreeMap::new(),
                    value: parse_value(&v)?,
                }])
            }
            other => Err(format!(
                "the query gave a {other}, not an instant vector (use an instant expression)"
            )),
        }
    }

    /// `/api/v1/query_range` over `[start, end]` every `step` seconds.
    pub async fn range(
        &self,
        promql: &str,
        start: f64,
        end: f64,
        step: f64,
    ) -> Result<Vec<RangeSeries>, String> {
        let data = self
            .call(
                "/api/v1/query_range",
                &[
                    ("query", promql.to_string()),
                    ("start", format!("{start:.3}")),
                    ("end", format!("{end:.3}")),
                    ("step", format!("{step}")),
                ],
            )
            .await?;
        if data.result_type != "matrix" {
            return Err(format!("a range query gave a {}", data.result_type));
        }
        let items: Vec<MatrixItem> =
            serde_json::from_value(data.result).map_err(|e| format!("unexpected matrix: {e}"))?;
        items
            .into_iter()
            .map(|i| {
                Ok(RangeSeries {
                    labels: i.metric,
                    points: i
                        .values
                        .into_iter()
                        .map(|(t, v)| Ok((t, parse_value(&v)?)))
                        .collect::<Result<_, String>>()?,
                })
            })
            .collect()
    }
}

/// Why a connection failed, in a few words ("connection refused"): the
/// innermost I/O error's kind, else the innermost error's text.
fn connect_cause(e: &reqwest::Error) -> String {
    let mut cause: &dyn std::error::Error = e;
    let mut text = e.to_string();
    while let Some(next) = cause.source() {
        if let Some(io) = next.downcast_ref::<std::io::Error>() {
            return match io.kind() {
                std::io::ErrorKind::ConnectionRefused => "connection refused".to_string(),
                std::io::ErrorKind::TimedOut => "connection timed out".to_string(),
                _ => io.to_string(),
            };
        }
        text = next.to_string();
        cause = next;
    }
    text
}

/// A Prometheus duration for a number of seconds (`1d`, `6h`, `90m`, `45s`).
pub fn prom_duration(secs: u64) -> String {
    if secs > 0 && secs % 86_400 == 0 {
        format!("{}d", secs / 86_400)
    } else if secs > 0 && secs % 3600 == 0 {
        format!("{}h", secs / 3600)
    } else if secs > 0 && secs % 60 == 0 {
        format!("{}m", secs / 60)
    } else {
        format!("{secs}s")
    }
}

/// The Prometheus graph page of `promql` over the period ending at `end`
/// (Unix seconds) and lasting `secs`.
pub fn graph_link(base: &str, promql: &str, end: f64, secs: u64) -> String {
    let end_input = chrono::DateTime::from_timestamp(end as i64, 0)
        .map(|t| t.format("%Y-%m-%d %H:%M:%S").to_string())
        .unwrap_or_default();
    let mut url = format!("{}/graph?", base.trim_end_matches('/'));
    let pairs = [
        ("g0.expr", promql.to_string()),
        ("g0.tab", "0".to_string()),
        ("g0.range_input", prom_duration(secs)),
        ("g0.end_input", end_input),
    ];
    let encoded: Vec<String> = pairs
        .iter()
        .map(|(k, v)| format!("{k}={}", percent_encode(v)))
        .collect();
    url.push_str(&encoded.join("&"));
    url
}

/// Percent-encodes everything but unreserved characters (RFC 3986), so the
/// link is also safe inside Markdown's `(...)` and HTML attributes.
pub fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len() * 3);
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn graph_links_encode_the_expression_and_the_period() {
        let l = graph_link(
            "http://prom:9090/",
            r#"sum by (instance) (x{a="b"}[1d]) > 0"#,
            1_764_316_800.0,
            86_400,
        );
        assert_eq!(
            l,
            "http://prom:9090/graph?g0.expr=sum%20by%20%28instance%29%20%28x%7Ba%3D%22b%22%7D%5B1d%5D%29%20%3E%200&g0.tab=0&g0.range_input=1d&g0.end_input=2025-11-28%2008%3A00%3A00"
        );
        assert!(!l.contains(' ') && !l.contains(')') && !l.contains('"'));
    }

    #[test]
    fn durations_and_values() {
        assert_eq!(prom_duration(86_400), "1d");
        assert_eq!(prom_duration(7 * 3600), "7h");
        assert_eq!(prom_duration(90 * 60), "90m");
        assert_eq!(prom_duration(45), "45s");
        assert_eq!(parse_value("+Inf").unwrap(), f64::INFINITY);
        assert!(parse_value("NaN").unwrap().is_nan());
        assert_eq!(parse_value("2.5").unwrap(), 2.5);
        assert!(parse_value("x").is_err());
    }
}
