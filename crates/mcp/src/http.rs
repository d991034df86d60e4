//! What `serve_connections` adds around every request it serves, whatever the route: a deadline
//! for the request body, and error answers that carry the JSON error shape the operator API
//! uses (`{"error": {"code", "message"}}`) where the router or hyper would answer with an empty
//! or plain-text body.

use std::future::Future as _;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::http::{HeaderValue, Method, Response, StatusCode, Uri, header};
use hyper::body::{Body as HttpBody, Frame, Incoming, SizeHint};
use serde_json::json;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// A JSON error response: `{"error": {"code", "message"}}`.
pub(crate) fn json_error(status: StatusCode, code: &str, message: &str) -> Response<Body> {
    let body = json!({"error": {"code": code, "message": message}});
    let mut r = Response::new(Body::from(body.to_string()));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}

/// A request body that must arrive in full by a deadline (from the moment its header was read):
/// past it, reading yields an error (`TimedOut`) and `expired` is set, so the response is
/// replaced by a 408 (see [`finish`]). A body that is complete, or absent, never times out.
pub(crate) struct DeadlineBody {
    inner: Incoming,
    deadline: tokio::time::Instant,
    /// Made at the first read that has to wait.
    sleep: Option<Pin<Box<tokio::time::Sleep>>>,
    limit: Duration,
    expired: Arc<AtomicBool>,
}

impl DeadlineBody {
    /// `inner`, which must arrive in full within `limit` from now; `expired` is set if it does
    /// not.
    pub(crate) fn new(inner: Incoming, limit: Duration, expired: Arc<AtomicBool>) -> DeadlineBody {
        DeadlineBody {
            inner,
            deadline: tokio::time::Instant::now() + limit,
            sleep: None,
            limit,
            expired,
        }
    }
}

impl HttpBody for DeadlineBody {
    type Data = Bytes;
    type Error = axum::BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = self.get_mut();
        if this.expired.load(Ordering::Relaxed) {
            return Poll::Ready(None);
        }
        if let Poll::Ready(frame) = Pin::new(&mut this.inner).poll_frame(cx) {
            return Poll::Ready(frame.map(|f| f.map_err(Into::into)));
        }
        let deadline = this.deadline;
        let sleep = this
            .sleep
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
        if sleep.as_mut().poll(cx).is_pending() {
            return Poll::Pending;
        }
        this.expired.store(true, Ordering::Relaxed);
        Poll::Ready(Some(Err(io::Error::new(
            io::ErrorKind::TimedOut,
            body_timeout_message(this.limit),
        )
        .into())))
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

fn body_timeout_message(limit: Duration) -> String {
    format!(
        "the request body did not arrive in full within {} s of the request header (fewer bytes came than its Content-Length or chunks promised); the connection is closed",
        limit.as_secs_f64()
    )
}

/// What a request was, for the answer to it.
pub(crate) struct Asked {
    pub(crate) method: Method,
    pub(crate) uri: Uri,
    pub(crate) body_expired: Arc<AtomicBool>,
    pub(crate) body_limit: Duration,
}

/// The response the router gave `asked`, as it goes on the wire:
/// - a request whose body did not arrive by its deadline gets 408 (and the connection closes),
///   whatever the handler made of the failed read;
/// - a 405 without a JSON body (axum's empty one, rmcp's text) gets the JSON error shape naming
///   the method, the path and what `Allow`s;
/// - a 400, 414 or 431 with an empty body gets one naming the status, so an empty-bodied one on
///   the wire is always hyper's own answer to a request it could not parse (which
///   [`ParseErrorBodies`] then fills in).
pub(crate) fn finish(response: Response<Body>, asked: &Asked) -> Response<Body> {
    if asked.body_expired.load(Ordering::Relaxed) {
        let mut r = json_error(
            StatusCode::REQUEST_TIMEOUT,
            "request_timeout",
            &body_timeout_message(asked.body_limit),
        );
        r.headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
        return r;
    }
    let status = response.status();
    let is_json = response
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if status == StatusCode::METHOD_NOT_ALLOWED && !is_json {
        let allow = response.headers().get(header::ALLOW).cloned();
        let takes = allow
            .as_ref()
            .and_then(|v| v.to_str().ok())
            .filter(|v| !v.is_empty())
            .map_or_else(|| "no method".to_string(), list_methods);
        let mut r = json_error(
            status,
            "method_not_allowed",
            &format!(
                "{} is not allowed on {}; it takes {takes}",
                asked.method,
                asked.uri.path()
            ),
        );
        if let Some(allow) = allow {
            r.headers_mut().insert(header::ALLOW, allow);
        }
        return r;
    }
    if matches!(status.as_u16(), 400 | 414 | 431) && response.body().is_end_stream() {
        let (mut parts, _) = response.into_parts();
        let fresh = json_error(
            status,
            "bad_request",
            &format!(
                "{} {} was refused: {}",
                asked.method,
                asked.uri.path(),
                status.canonical_reason().unwrap_or("bad request")
            ),
        );
        let (fresh_parts, body) = fresh.into_parts();
        parts.headers.remove(header::CONTENT_LENGTH);
        parts.headers.insert(
            header::CONTENT_TYPE,
            fresh_parts.headers[header::CONTENT_TYPE].clone(),
        );
        return Response::from_parts(parts, body);
    }
    response
}

/// An `Allow` header's methods as a message lists them: `GET, POST, DELETE` (whether the header
/// separates them with `,` or `, `).
pub(crate) fn list_methods(allow: &str) -> String {
    allow
        .split(',')
        .map(str::trim)
        .filter(|m| !m.is_empty())
        .collect::<Vec<_>>()
        .join(", ")
}

/// How rmcp's 415 for a body it could not decode as a JSON-RPC message begins.
const UNDECODABLE: &str = "fail to deserialize request body";

/// The most of a plain-text error body [`json_refusal`] reads (rmcp's are one short line).
const PLAIN_ERROR_MAX: usize = 16 * 1024;

/// An error answer from MCP's transport (rmcp writes its refusals as text, such as 400
/// "Bad Request: Session ID is required" to a `GET /mcp` without a session), in the JSON error
/// shape every other refusal has: the code from the status, the message its text. A 405 is left
/// to [`finish`] (which names the method and what `Allow`s); success, JSON and streamed answers
/// pass as they are.
pub(crate) async fn json_refusal(response: Response<Body>) -> Response<Body> {
    let status = response.status();
    // rmcp's refusals are text, some without a `Content-Type`.
    let plain = response
        .headers()
        .get(header::CONTENT_TYPE)
        .is_none_or(|v| v.to_str().is_ok_and(|v| v.starts_with("text/plain")));
    if !(status.is_client_error() || status.is_server_error())
        || status == StatusCode::METHOD_NOT_ALLOWED
        || !plain
    {
        return response;
    }
    let (parts, body) = response.into_parts();
    let reason = status.canonical_reason().unwrap_or("error");
    let text = axum::body::to_bytes(body, PLAIN_ERROR_MAX)
        .await
        .ok()
        .map(|b| String::from_utf8_lossy(&b).trim().to_string())
        .filter(|t| !t.is_empty())
        .unwrap_or_else(|| reason.to_string());
    // rmcp answers a body of JSON that is not one JSON-RPC message it takes (or not JSON at
    // all) with 415, as if its media type were wrong; it is a bad request (MCP's transport
    // says 400), and the message says what a message must be.
    let (status, code, text) = match text.strip_prefix(UNDECODABLE) {
        Some(why) if status == StatusCode::UNSUPPORTED_MEDIA_TYPE => (
            StatusCode::BAD_REQUEST,
            "invalid_message".to_string(),
            format!(
                "the body is not one JSON-RPC 2.0 message (a request, a notification or a response, with \"jsonrpc\": \"2.0\"; batches are not taken): {}",
                why.trim()
            ),
        ),
        _ => (
            status,
            reason.to_ascii_lowercase().replace([' ', '-'], "_"),
            text,
        ),
    };
    let fresh = json_error(status, &code, &text);
    let (fresh_parts, body) = fresh.into_parts();
    let mut parts = parts;
    parts.status = status;
    parts.headers.remove(header::CONTENT_LENGTH);
    parts.headers.insert(
        header::CONTENT_TYPE,
        fresh_parts.headers[header::CONTENT_TYPE].clone(),
    );
    Response::from_parts(parts, body)
}

/// The largest head hyper's own error answers have (status line, `content-length: 0`, `date`).
const AUTOMATIC_HEAD_MAX: usize = 512;

/// The JSON body for hyper's own answer with `status` to a request it could not parse, or
/// `None` if hyper does not answer with it.
fn parse_error_body(status: u16) -> Option<(&'static str, &'static str)> {
    match status {
        400 => Some((
            "malformed_request",
            "the request could not be read as HTTP/1.1: its request line or a header field is malformed",
        )),
        414 => Some((
            "uri_too_long",
            "the request's URI (path and query) is longer than this server reads (65534 bytes)",
        )),
        431 => Some((
            "headers_too_large",
            "the request's header is larger than this server reads: more than 100 header fields, or more than about 400 KiB in all",
        )),
        _ => None,
    }
}

/// If `head` is, whole, one of hyper's automatic answers to a request it could not parse (a
/// response head with status 400, 414 or 431, `content-length: 0` and nothing after it),
/// the same answer with a JSON body naming what was wrong.
fn with_json_body(head: &[u8]) -> Option<Vec<u8>> {
    if head.len() > AUTOMATIC_HEAD_MAX || !head.ends_with(b"\r\n\r\n") {
        return None;
    }
    let text = std::str::from_utf8(head).ok()?;
    let lines: Vec<&str> = text[..text.len() - 4].split("\r\n").collect();
    let (status_line, fields) = lines.split_first()?;
    let rest = status_line.strip_prefix("HTTP/1.1 ")?;
    let (code, body) = parse_error_body(rest.get(..3)?.parse().ok()?)?;
    if !rest[3..].is_empty() && !rest[3..].starts_with(' ') {
        return None;
    }
    if fields.iter().any(|f| f.is_empty() || !f.contains(':')) {
        return None;
    }
    let length_zero = |f: &&str| {
        f.split_once(':').is_some_and(|(k, v)| {
            k.trim().eq_ignore_ascii_case("content-length") && v.trim() == "0"
        })
    };
    if !fields.iter().any(length_zero) {
        return None;
    }
    let json = json!({"error": {"code": code, "message": body}}).to_string();
    let mut out = format!("{status_line}\r\n");
    for f in fields {
        let name = f.split_once(':').map_or("", |(k, _)| k.trim());
        if !["content-length", "content-type", "connection"]
            .iter()
            .any(|n| name.eq_ignore_ascii_case(n))
        {
            out.push_str(f);
            out.push_str("\r\n");
        }
    }
    out.push_str(&format!(
        "content-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{json}",
        json.len()
    ));
    Some(out.into_bytes())
}

/// A connection's socket as hyper sees it: hyper answers a request it cannot parse (a header
/// too large, a URI too long, a malformed line) itself, with an empty body, before any route
/// sees it, and offers no hook to change that answer. This wrapper gives those answers the
/// JSON error body every other error has, by recognising them whole as they are written: a
/// response head with status 400, 414 or 431 and `content-length: 0`, in one write. The routes
/// never write such a head ([`finish`] gives theirs a body), so nothing else is touched.
pub(crate) struct ParseErrorBodies<T> {
    inner: T,
    /// A replacement being written: its bytes, how many are written, and the length of what
    /// hyper asked to write (reported once all of it is out).
    replacing: Option<(Vec<u8>, usize, usize)>,
}

impl<T> ParseErrorBodies<T> {
    pub(crate) fn new(inner: T) -> Self {
        ParseErrorBodies {
            inner,
            replacing: None,
        }
    }
}

impl<T: AsyncWrite + Unpin> ParseErrorBodies<T> {
    /// Write the replacement under way; `Ready(Ok(n))` with the length hyper asked to write
    /// once it is all out.
    fn drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        while let Some((bytes, done, _)) = &mut self.replacing {
            if *done == bytes.len() {
                break;
            }
            match Pin::new(&mut self.inner).poll_write(cx, &bytes[*done..]) {
                Poll::Ready(Ok(0)) => {
                    self.replacing = None;
                    return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
                }
                Poll::Ready(Ok(n)) => *done += n,
                Poll::Ready(Err(e)) => {
                    self.replacing = None;
                    return Poll::Ready(Err(e));
                }
                Poll::Pending => return Poll::Pending,
            }
        }
        let asked = self.replacing.take().map_or(0, |(_, _, asked)| asked);
        Poll::Ready(Ok(asked))
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for ParseErrorBodies<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for ParseErrorBodies<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.replacing.is_none() {
            match with_json_body(buf) {
                Some(bytes) => this.replacing = Some((bytes, 0, buf.len())),
                None => return Pin::new(&mut this.inner).poll_write(cx, buf),
            }
        }
        this.drain(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.replacing.is_none() {
            let total: usize = bufs.iter().map(|b| b.len()).sum();
            let starts_as_error = bufs
                .iter()
                .find(|b| !b.is_empty())
                .is_some_and(|b| b.starts_with(b"HTTP/1.1 4"));
            let replacement = if starts_as_error && total <= AUTOMATIC_HEAD_MAX {
                with_json_body(
                    &bufs
                        .iter()
                        .flat_map(|b| b.iter().copied())
                        .collect::<Vec<u8>>(),
                )
            } else {
                None
            };
            match replacement {
                Some(bytes) => this.replacing = Some((bytes, 0, total)),
                None => return Pin::new(&mut this.inner).poll_write_vectored(cx, bufs),
            }
        }
        this.drain(cx)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.replacing.is_some() {
            std::task::ready!(this.drain(cx))?;
        }
        Pin::new(&mut this.inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.replacing.is_some() {
            std::task::ready!(this.drain(cx))?;
        }
        Pin::new(&mut this.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::with_json_body;

    #[test]
    fn only_hypers_automatic_answers_are_given_a_body() {
        let head = b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-length: 0\r\ndate: Tue, 01 Jan 2030 00:00:00 GMT\r\n\r\n";
        let out = String::from_utf8(with_json_body(head).unwrap()).unwrap();
        let (h, body) = out.split_once("\r\n\r\n").unwrap();
        assert!(h.starts_with("HTTP/1.1 431 "), "{out}");
        assert!(h.contains("date: Tue"), "{out}");
        assert!(
            h.contains(&format!("content-length: {}", body.len())),
            "{out}"
        );
        let v: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(v["error"]["code"], "headers_too_large");
        // A response with a body, another status, or more than a head is left alone.
        for other in [
            &b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-length: 2\r\n\r\n"[..],
            b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n",
            b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\nHTTP/1.1 200 OK\r\n\r\n",
            b"HTTP/1.1 414 URI Too Long\r\ntransfer-encoding: chunked\r\n\r\n",
            b"HTTP/1.1 4",
        ] {
            assert_eq!(
                with_json_body(other),
                None,
                "{}",
                String::from_utf8_lossy(other)
            );
        }
    }
}
