//! Text helpers of the executors: bodies read with a cap, text cut at a
//! cap with the truncation marker, and a Prometheus answer as lines.

use std::fmt::Write as _;

pub(crate) async fn read_text_capped(mut resp: reqwest::Response, cap: usize) -> (String, bool) {
    let mut kept = Vec::new();
    let mut cut = false;
    while let Ok(Some(chunk)) = resp.chunk().await {
        let room = cap.saturating_sub(kept.len());
        if chunk.len() > room {
            cut = true;
            kept.extend_from_slice(&chunk[..room]);
            break;
        }
        kept.extend_from_slice(&chunk);
    }
    let mut s = String::from_utf8_lossy(&kept).into_owned();
    if cut {
        s.push_str(crate::runbook::exec::TRUNCATION_MARKER);
    }
    (s, cut)
}

pub(crate) fn cap_text(mut s: String, cap: usize) -> (String, bool) {
    if s.len() <= cap {
        return (s, false);
    }
    let mut end = cap;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s.truncate(end);
    s.push_str(crate::runbook::exec::TRUNCATION_MARKER);
    (s, true)
}

/// Formats a Prometheus `/api/v1/query` answer as text, one series a line.
pub fn format_promql_response(text: &str) -> (bool, String) {
    let v: serde_json::Value = match serde_json::from_str(text) {
        Ok(v) => v,
        Err(_) => return (false, format!("not a Prometheus answer: {}", text.trim())),
    };
    if v["status"] != "success" {
        return (
            false,
            format!(
                "query failed: {} {}",
                v["errorType"].as_str().unwrap_or(""),
                v["error"].as_str().unwrap_or("")
            ),
        );
    }
    let data = &v["data"];
    let mut out = String::new();
    let series_name = |m: &serde_json::Value| -> String {
        let Some(obj) = m.as_object() else {
            return "{}".into();
        };
        let name = obj.get("__name__").and_then(|n| n.as_str()).unwrap_or("");
        let labels: Vec<String> = obj
            .iter()
            .filter(|(k, _)| k.as_str() != "__name__")
            .map(|(k, v)| format!("{k}={:?}", v.as_str().unwrap_or("")))
            .collect();
        format!("{name}{{{}}}", labels.join(", "))
    };
    match data["resultType"].as_str() {
        Some("vector") => {
            let r = data["result"].as_array().cloned().unwrap_or_default();
            if r.is_empty() {
                out.push_str("(no series)\n");
            }
            for s in r {
                let _ = writeln!(
                    out,
                    "{} {}",
                    series_name(&s["metric"]),
                    s["value"][1].as_str().unwrap_or("?")
                );
            }
        }
        Some("matrix") => {
            for s in data["result"].as_array().cloned().unwrap_or_default() {
                let n = s["values"].as_array().map(|a| a.len()).unwrap_or(0);
                let last = s["values"]
                    .as_array()
                    .and_then(|a| a.last())
                    .and_then(|p| p[1].as_str())
                    .unwrap_or("?");
                let _ = writeln!(
                    out,
                    "{} last={last} ({n} samples)",
                    series_name(&s["metric"])
                );
            }
        }
        Some("scalar") | Some("string") => {
            let _ = writeln!(out, "{}", data["result"][1].as_str().unwrap_or("?"));
        }
        _ => out.push_str("(unrecognised result)\n"),
    }
    (true, out)
}
