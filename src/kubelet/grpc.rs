//! A unary gRPC call over a Unix socket: HTTP/2 (hyper's client) with the
//! gRPC framing (a 5-byte prefix: compressed flag, big-endian u32 length),
//! `content-type: application/grpc`, `te: trailers`, and the status read from
//! the trailers (or from the headers of a trailers-only answer).
//!
//! Every call is bounded: the caller's deadline covers connect, handshake,
//! request and the whole body, and an answer over the byte limit is refused
//! as soon as its length prefix (or its bytes) say so. This module must not
//! decode messages or know the kubelet's types (`kubelet/mod.rs` does).

use std::convert::Infallible;
use std::path::Path;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use http_body::{Body, Frame, SizeHint};
use hyper::body::Bytes;
use hyper::HeaderMap;

/// Calls `method` (`/package.Service/Method`) on the gRPC server at
/// `socket` with the encoded `request`, and returns the encoded answer. An
/// error says what failed, in words fit for a log line and the collector's
/// failure (server text in it is cut and stripped of control characters).
pub async fn call_unary(
    socket: &Path,
    method: &str,
    request: &[u8],
    deadline: Duration,
    limit: usize,
) -> Result<Vec<u8>, String> {
    match tokio::time::timeout(deadline, call(socket, method, request, deadline, limit)).await {
        Ok(r) => r,
        Err(_) => Err(format!(
            "no answer from {} within {}s",
            socket.display(),
            deadline.as_secs_f64()
        )),
    }
}

async fn call(
    socket: &Path,
    method: &str,
    request: &[u8],
    deadline: Duration,
    limit: usize,
) -> Result<Vec<u8>, String> {
    let stream = tokio::net::UnixStream::connect(socket)
        .await
        .map_err(|e| format!("cannot connect to {}: {e}", socket.display()))?;
    let (mut sender, conn) =
        hyper::client::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
            .max_header_list_size(64 * 1024)
            .handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .map_err(|e| format!("http/2 handshake on {} failed: {e}", socket.display()))?;
    // The connection's driver ends with this call, whatever happens to it
    // (a deadline drops this future: the hung connection goes too).
    let _driver = AbortOnDrop(tokio::spawn(async move {
        let _ = conn.await;
    }));
    let req = hyper::Request::post(format!("http://localhost{method}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .header("grpc-timeout", format!("{}m", deadline.as_millis().max(1)))
        .body(OneFrame(Some(Bytes::from(encode_frame(request)))))
        .map_err(|e| format!("cannot build the request: {e}"))?;
    let resp = sender
        .send_request(req)
        .await
        .map_err(|e| format!("request to {} failed: {e}", socket.display()))?;
    let (parts, mut body) = resp.into_parts();
    if parts.status != hyper::StatusCode::OK {
        return Err(format!(
            "http status {} from {}",
            parts.status,
            socket.display()
        ));
    }
    // Trailers-only: an error answer carries its status in the headers.
    if let Some(status) = grpc_status(&parts.headers) {
        status?;
    }
    let mut data: Vec<u8> = Vec::new();
    let mut trailers = None;
    while let Some(frame) = std::future::poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).await {
        let frame = frame.map_err(|e| format!("reading the answer failed: {e}"))?;
        match frame.into_data() {
            Ok(chunk) => {
                if data.len() + chunk.len() > limit + PREFIX {
                    return Err(too_large(data.len() + chunk.len() - PREFIX, limit));
                }
                data.extend_from_slice(&chunk);
                // Refuse as soon as the prefix announces too much.
                if let Some(n) = announced_length(&data) {
                    if n > limit {
                        return Err(too_large(n, limit));
                    }
                }
            }
            Err(frame) => {
                if let Ok(t) = frame.into_trailers() {
                    trailers = Some(t);
                }
            }
        }
    }
    match trailers.as_ref().and_then(grpc_status) {
        Some(status) => status?,
        None => return Err("the answer ended without a grpc-status".into()),
    }
    decode_frame(&data, limit).map(<[u8]>::to_vec)
}

/// The gRPC frame prefix: compressed flag (1 byte) and length (u32, big endian).
pub const PREFIX: usize = 5;

/// One uncompressed gRPC message frame.
pub fn encode_frame(message: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(PREFIX + message.len());
    out.push(0);
    out.extend_from_slice(
        &u32::try_from(message.len())
            .unwrap_or(u32::MAX)
            .to_be_bytes(),
    );
    out.extend_from_slice(message);
    out
}

/// The message of a unary answer's body: exactly one uncompressed frame of
/// at most `limit` bytes.
pub fn decode_frame(body: &[u8], limit: usize) -> Result<&[u8], String> {
    if body.len() < PREFIX {
        return Err(format!(
            "truncated gRPC frame: {} bytes, less than the 5-byte prefix",
            body.len()
        ));
    }
    if body[0] != 0 {
        return Err(format!(
            "compressed gRPC message (flag {}): compression was not asked for",
            body[0]
        ));
    }
    let n = announced_length(body).unwrap_or(0);
    if n > limit {
        return Err(too_large(n, limit));
    }
    let rest = &body[PREFIX..];
    if rest.len() < n {
        return Err(format!(
            "truncated gRPC frame: {n} bytes announced, {} received",
            rest.len()
        ));
    }
    if rest.len() > n {
        return Err(format!(
            "{} bytes after the message: a unary answer holds one message",
            rest.len() - n
        ));
    }
    Ok(rest)
}

fn announced_length(body: &[u8]) -> Option<usize> {
    let len: [u8; 4] = body.get(1..PREFIX)?.try_into().ok()?;
    usize::try_from(u32::from_be_bytes(len)).ok()
}

fn too_large(n: usize, limit: usize) -> String {
    format!(
        "answer of {n} bytes is over the {} MiB limit, refused",
        limit >> 20
    )
}

/// `grpc-status` (and `grpc-message`) of a header or trailer block: `None`
/// when absent, `Ok` for status 0, else the error in words.
pub fn grpc_status(headers: &HeaderMap) -> Option<Result<(), String>> {
    let raw = headers.get("grpc-status")?;
    let code = raw.to_str().ok().and_then(|s| s.trim().parse::<u32>().ok());
    if code == Some(0) {
        return Some(Ok(()));
    }
    let message = headers
        .get("grpc-message")
        .map(|m| percent_decode(m.as_bytes()))
        .unwrap_or_default();
    let name = match code {
        Some(c) => format!("{} ({c})", status_name(c)),
        None => format!(
            "unreadable status {:?}",
            String::from_utf8_lossy(raw.as_bytes())
        ),
    };
    Some(Err(if message.is_empty() {
        format!("gRPC error {name}")
    } else {
        format!("gRPC error {name}: {}", crate::escape::line(&message))
    }))
}

fn status_name(code: u32) -> &'static str {
    match code {
        1 => "CANCELLED",
        2 => "UNKNOWN",
        3 => "INVALID_ARGUMENT",
        4 => "DEADLINE_EXCEEDED",
        5 => "NOT_FOUND",
        7 => "PERMISSION_DENIED",
        8 => "RESOURCE_EXHAUSTED",
        12 => "UNIMPLEMENTED",
        13 => "INTERNAL",
        14 => "UNAVAILABLE",
        16 => "UNAUTHENTICATED",
        _ => "status",
    }
}

/// `grpc-message` is percent-encoded (gRPC over HTTP/2, "Responses").
fn percent_decode(raw: &[u8]) -> String {
    let mut out = Vec::with_capacity(raw.len());
    let mut i = 0;
    while i < raw.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        match (
            raw[i],
            raw.get(i + 1).copied().and_then(hex),
            raw.get(i + 2).copied().and_then(hex),
        ) {
            (b'%', Some(h), Some(l)) => {
                out.push((h * 16 + l) as u8);
                i += 3;
            }
            (b, _, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A request body of one data frame.
struct OneFrame(Option<Bytes>);

impl Body for OneFrame {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        Poll::Ready(self.0.take().map(|b| Ok(Frame::data(b))))
    }

    fn is_end_stream(&self) -> bool {
        self.0.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.0.as_ref().map_or(0, |b| b.len() as u64))
    }
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_frame_round_trips_and_is_bounded() {
        let framed = encode_frame(b"hello");
        assert_eq!(&framed[..5], &[0, 0, 0, 0, 5]);
        assert_eq!(decode_frame(&framed, 16).unwrap(), b"hello");
        assert_eq!(decode_frame(&encode_frame(b""), 16).unwrap(), b"");
        // Over the limit: refused by the announced length alone.
        let e = decode_frame(&[0, 1, 0, 0, 1], 16 << 20).unwrap_err();
        assert!(e.contains("over the 16 MiB limit"), "{e}");
    }

    #[test]
    fn grpc_truncated_frame_is_an_error() {
        let e = decode_frame(&[0, 0, 0], 100).unwrap_err();
        assert!(e.contains("less than the 5-byte prefix"), "{e}");
        let e = decode_frame(&[0, 0, 0, 0, 9, 1, 2], 100).unwrap_err();
        assert!(e.contains("9 bytes announced, 2 received"), "{e}");
        let e = decode_frame(&[0, 0, 0, 0, 1, 1, 2], 100).unwrap_err();
        assert!(e.contains("one message"), "{e}");
        let e = decode_frame(&[1, 0, 0, 0, 1, 1], 100).unwrap_err();
        assert!(e.contains("compressed"), "{e}");
    }

    #[test]
    fn grpc_trailers_only_error_is_read_from_headers() {
        let mut h = HeaderMap::new();
        assert_eq!(grpc_status(&h), None);
        h.insert("grpc-status", "0".parse().unwrap());
        assert_eq!(grpc_status(&h), Some(Ok(())));
        h.insert("grpc-status", "14".parse().unwrap());
        h.insert(
            "grpc-message",
            "kubelet%20is%20restarting%0Anow".parse().unwrap(),
        );
        let e = grpc_status(&h).unwrap().unwrap_err();
        assert!(
            e.starts_with("gRPC error UNAVAILABLE (14): kubelet is restarting"),
            "{e}"
        );
        assert!(!e.contains('\n'), "{e:?}");
        h.insert("grpc-status", "x".parse().unwrap());
        assert!(grpc_status(&h).unwrap().unwrap_err().contains("unreadable"));
    }
}
