//! Reading requests (bodies with a size limit, query strings, ids in paths) and writing JSON
//! responses. Every problem is an [`ApiError`] that names it.

use std::collections::BTreeMap;

use axum::body::Body;
use axum::extract::{FromRequestParts, Path};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, StatusCode, Uri, header};
use axum::response::Response;
use http_body_util::BodyExt as _;
use ice_kernel::{EventId, RunId};
use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::error::ApiError;

/// The largest request body accepted (1 MiB); a larger one is answered 413.
pub const MAX_BODY_BYTES: usize = 1 << 20;
/// How much of a body past the limit is read (and dropped) before the 413 is sent.
const DRAIN_BYTES: usize = 8 << 20;
/// How long a body past the limit is read before the 413 is sent.
const DRAIN_TIME: std::time::Duration = std::time::Duration::from_secs(5);

/// A JSON response.
pub fn json_response(status: StatusCode, body: &Value) -> Response {
    let bytes = serde_json::to_vec(body).unwrap_or_else(|_| b"{}".to_vec());
    let mut r = Response::new(Body::from(bytes));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}

/// 200 with a JSON body.
pub fn ok(body: Value) -> Response {
    json_response(StatusCode::OK, &body)
}

/// Whether a `Content-Type` names JSON (`application/json`, `application/*+json`, any
/// parameters).
fn is_json(content_type: &str) -> bool {
    let mime = content_type
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    mime == "application/json" || (mime.starts_with("application/") && mime.ends_with("+json"))
}

/// Read a request body of at most [`MAX_BODY_BYTES`] and decode it as `T`. An empty body is
/// `None` (for operations whose body is optional); a non-empty one must be declared JSON.
pub async fn read_json<T: DeserializeOwned>(
    headers: &HeaderMap,
    body: Body,
) -> Result<Option<T>, ApiError> {
    let too_large = || {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            format!("the request body is larger than {MAX_BODY_BYTES} bytes (1 MiB)"),
        )
    };
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    let mut over = declared.is_some_and(|n| n > MAX_BODY_BYTES as u64);
    // A body past the limit is read on (and dropped) up to DRAIN_BYTES, for a few seconds, so
    // the client, still sending, gets the 413 rather than a reset connection.
    if declared.is_some_and(|n| n > DRAIN_BYTES as u64) {
        return Err(too_large());
    }
    let mut body = body;
    let mut bytes: Vec<u8> = Vec::new();
    let mut seen = 0usize;
    let drain_until = tokio::time::Instant::now() + DRAIN_TIME;
    loop {
        let frame = if over {
            match tokio::time::timeout_at(drain_until, body.frame()).await {
                Ok(f) => f,
                Err(_) => break,
            }
        } else {
            body.frame().await
        };
        let Some(frame) = frame else { break };
        let frame = match frame {
            Ok(f) => f,
            Err(_) if over => break,
            Err(e) => {
                return Err(ApiError::bad_request(
                    "bad_body",
                    format!("the request body could not be read: {e}"),
                ));
            }
        };
        let Ok(data) = frame.into_data() else {
            continue;
        };
        seen += data.len();
        if seen > MAX_BODY_BYTES {
            over = true;
            bytes = Vec::new();
        }
        if over {
            if seen > DRAIN_BYTES {
                break;
            }
        } else {
            bytes.extend_from_slice(&data);
        }
    }
    if over {
        return Err(too_large());
    }
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Ok(None);
    }
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if !is_json(content_type) {
        return Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            format!(
                "the request body must be JSON (Content-Type: application/json), not {:?}",
                if content_type.is_empty() {
                    "none"
                } else {
                    content_type
                }
            ),
        ));
    }
    decode(&bytes).map(Some)
}

/// [`read_json`] for operations whose body is required.
pub async fn require_json<T: DeserializeOwned>(
    headers: &HeaderMap,
    body: Body,
) -> Result<T, ApiError> {
    read_json(headers, body).await?.ok_or_else(|| {
        ApiError::bad_request(
            "missing_body",
            "this operation needs a JSON body (see /api/v1/openapi.json)",
        )
    })
}

/// Decode JSON bytes as `T`: malformed JSON and JSON of the wrong shape are told apart.
fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    // First: is it JSON at all?
    let value: Value = serde_json::from_slice(bytes).map_err(|e| {
        ApiError::bad_request(
            "malformed_json",
            format!("the request body is not valid JSON: {e}"),
        )
    })?;
    if !value.is_object() {
        return Err(ApiError::bad_request(
            "invalid_body",
            "the request body must be a JSON object",
        ));
    }
    // From the bytes, not the parsed value: a field given twice (`{"reason": "a", "reason":
    // "b"}`) is refused, where the value would have kept the last silently.
    serde_json::from_slice(bytes)
        .map_err(|e| ApiError::bad_request("invalid_body", format!("the request body: {e}")))
}

/// A query string as names and values, refusing unknown and repeated names.
pub struct Query(BTreeMap<String, String>);

impl Query {
    /// Parse `uri`'s query, allowing only `names`.
    pub fn parse(uri: &Uri, names: &[&str]) -> Result<Query, ApiError> {
        let mut out = BTreeMap::new();
        if let Some(q) = uri.query() {
            for (k, v) in url::form_urlencoded::parse(q.as_bytes()) {
                if !names.contains(&k.as_ref()) {
                    return Err(ApiError::bad_request(
                        "invalid_query",
                        format!(
                            "unknown query parameter {k:?}; this operation takes {}",
                            if names.is_empty() {
                                "none".to_string()
                            } else {
                                names.join(", ")
                            }
                        ),
                    ));
                }
                if out.insert(k.to_string(), v.to_string()).is_some() {
                    return Err(ApiError::bad_request(
                        "invalid_query",
                        format!("query parameter {k:?} is given more than once"),
                    ));
                }
            }
        }
        Ok(Query(out))
    }

    /// A string parameter.
    pub fn str(&self, name: &str) -> Option<&str> {
        self.0.get(name).map(String::as_str)
    }

    /// An integer parameter within `min..=max`.
    pub fn int(&self, name: &str, min: u64, max: u64) -> Result<Option<u64>, ApiError> {
        let Some(v) = self.0.get(name) else {
            return Ok(None);
        };
        let bad = || {
            ApiError::bad_request(
                "invalid_query",
                format!("query parameter {name}={v:?} must be an integer from {min} to {max}"),
            )
        };
        if v.is_empty() || !v.bytes().all(|b| b.is_ascii_digit()) {
            return Err(bad());
        }
        let n: u64 = v.parse().map_err(|_| bad())?;
        if n < min || n > max {
            return Err(bad());
        }
        Ok(Some(n))
    }

    /// A boolean parameter (`true` or `false`).
    pub fn bool(&self, name: &str) -> Result<Option<bool>, ApiError> {
        match self.0.get(name).map(String::as_str) {
            None => Ok(None),
            Some("true") => Ok(Some(true)),
            Some("false") => Ok(Some(false)),
            Some(v) => Err(ApiError::bad_request(
                "invalid_query",
                format!("query parameter {name}={v:?} must be true or false"),
            )),
        }
    }
}

/// The single `{…}` parameter of a path, as text (a path that cannot be decoded is a 400).
pub struct PathParam(pub String);

impl<S: Send + Sync> FromRequestParts<S> for PathParam {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        match Path::<String>::from_request_parts(parts, state).await {
            Ok(Path(p)) => Ok(PathParam(p)),
            Err(e) => Err(ApiError::bad_request("invalid_path", e.body_text())),
        }
    }
}

/// A run id from a path or body (`A-Z a-z 0-9 . _ -`, 1 to 128 characters).
pub fn run_id(s: &str) -> Result<RunId, ApiError> {
    RunId::new(s).map_err(|e| ApiError::bad_request("invalid_id", e))
}

/// An event id (`RUN_ID:RUN_SEQ`) from a path or body.
pub fn event_id(s: &str, what: &str) -> Result<EventId, ApiError> {
    s.parse::<EventId>().map_err(|e| {
        ApiError::bad_request(
            "invalid_id",
            format!("{what} {s:?} is not an event id (RUN_ID:RUN_SEQ): {e}"),
        )
    })
}

/// A JSON number that is a whole number from 0 to 2^53 - 1 (JSON Schema's `integer`: `3` and
/// `3.0` alike), as `u64`.
pub fn whole(v: &Value) -> Option<u64> {
    const MAX: u64 = (1 << 53) - 1;
    if let Some(n) = v.as_u64() {
        return (n <= MAX).then_some(n);
    }
    let f = v.as_f64()?;
    (f.fract() == 0.0 && (0.0..=MAX as f64).contains(&f)).then_some(f as u64)
}

/// Deserialize an optional whole number (see [`whole`]).
pub fn opt_whole<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    use serde::Deserialize as _;
    match Option::<Value>::deserialize(d)? {
        None | Some(Value::Null) => Ok(None),
        Some(v) => whole(&v).map(Some).ok_or_else(|| {
            serde::de::Error::custom(format!("{v} is not a whole number from 0 to 2^53 - 1"))
        }),
    }
}
