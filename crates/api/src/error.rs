//! The API's errors: a status and `{"error": {"code", "message"}}`, never a crash.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use ice_runtime::RuntimeError;
use ice_runtime::memory::MemoryError;
use serde_json::json;

/// An error the API answers with.
#[derive(Debug)]
pub struct ApiError {
    /// The HTTP status.
    pub status: StatusCode,
    /// A stable, machine-readable code (`not_found`, `malformed_json`, …).
    pub code: &'static str,
    /// What went wrong, for people.
    pub message: String,
}

impl ApiError {
    /// An error with this status, code and message.
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            code,
            message: message.into(),
        }
    }

    /// 400: the request is malformed.
    pub fn bad_request(code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, code, message)
    }

    /// 404: no such thing.
    pub fn not_found(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::NOT_FOUND, "not_found", message)
    }

    /// 409: the thing is not in a state that allows this.
    pub fn conflict(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::CONFLICT, "conflict", message)
    }

    /// 500: ICE failed (the log, an I/O error).
    pub fn internal(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", message)
    }

    /// 401: no valid credentials.
    pub fn unauthenticated(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::UNAUTHORIZED, "unauthenticated", message)
    }

    /// 403: valid credentials that may not do this.
    pub fn forbidden(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::FORBIDDEN, "forbidden", message)
    }

    /// 503: the server cannot check credentials now (its configuration is broken); every
    /// request is refused until an operator fixes it.
    pub fn credentials_unavailable() -> ApiError {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "credentials_unavailable",
            "the server cannot check tokens now: its installation's config.toml does not read, so every request is refused until an operator fixes it (the server's log says what is wrong)",
        )
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} {}: {}",
            self.status.as_u16(),
            self.code,
            self.message
        )
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = json!({"error": {"code": self.code, "message": self.message}});
        let mut r = crate::io::json_response(self.status, &body);
        if self.status == StatusCode::UNAUTHORIZED {
            r.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"ice\""),
            );
        }
        r
    }
}

impl From<RuntimeError> for ApiError {
    fn from(e: RuntimeError) -> ApiError {
        let message = e.to_string();
        match e {
            RuntimeError::NoRun(_) => ApiError::not_found(message),
            RuntimeError::State { .. }
            | RuntimeError::Busy(_)
            | RuntimeError::Claimed(_)
            | RuntimeError::Exists(_)
            | RuntimeError::Decided { .. }
            | RuntimeError::CommitRefused(_) => ApiError::conflict(message),
            RuntimeError::Invalid(_) | RuntimeError::Spec(_) => {
                ApiError::bad_request("bad_request", message)
            }
            RuntimeError::Policy(_) => ApiError::bad_request("invalid_policy", message),
            RuntimeError::Append(ice_log::ledger::AppendError::Log(
                ice_log::LogError::Conflict { .. },
            )) => ApiError::conflict(format!("{message}; try again")),
            // The run's record holds an event its fold refuses (say, a second answer to one
            // approval, which logs from before answers were checked can hold): not ICE failing
            // now but the record conflicting with the law the books keep, so a 409 that names
            // the event rather than a bare 500.
            RuntimeError::Fold(f) => ApiError::conflict(format!(
                "run {}: its record holds event {} that the run's fold refuses: {}; the run cannot be shown or acted on (`ice explain {}` shows the event; `ice replay {}` reports it)",
                f.event.run_id, f.event, f.problem, f.event, f.event.run_id
            )),
            RuntimeError::Log(_) | RuntimeError::Append(_) | RuntimeError::Io(_) => {
                ApiError::internal(message)
            }
        }
    }
}

impl From<MemoryError> for ApiError {
    fn from(e: MemoryError) -> ApiError {
        let message = e.to_string();
        match e {
            MemoryError::Unknown(_) | MemoryError::NoEvent(_) => ApiError::not_found(message),
            MemoryError::NotCommitted { .. }
            | MemoryError::AlreadyTransitioned { .. }
            | MemoryError::AlreadyActive { .. } => ApiError::conflict(message),
            MemoryError::NotDomain { .. } => ApiError::conflict(message),
            // The message names the field as the request body spells it (`ttl_ms`, `reason`).
            MemoryError::Field { .. } | MemoryError::Invalid(_) => {
                ApiError::bad_request("bad_request", message)
            }
            MemoryError::Fold(_) => ApiError::internal(message),
            MemoryError::Runtime(e) => e.into(),
        }
    }
}

impl From<ice_log::LogError> for ApiError {
    fn from(e: ice_log::LogError) -> ApiError {
        match e {
            ice_log::LogError::Invalid(m) => ApiError::bad_request("bad_request", m),
            other => ApiError::internal(other.to_string()),
        }
    }
}

impl From<ApiError> for Response {
    fn from(e: ApiError) -> Response {
        e.into_response()
    }
}
