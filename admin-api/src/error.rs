//! The one mapping from what went wrong to an HTTP answer: a status and a JSON body with a
//! stable machine-readable code.
//!
//! ```json
//! {"error": {"code": "unknown_session", "message": "no session with client id \"c1\""}}
//! ```

pub use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Serialize;
use utoipa::ToSchema;

/// An error of the admin API: an HTTP status, a stable code and a message for people.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdminError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
}

/// The body of every error answer.
#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

/// What an error body holds.
#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorDetail {
    /// Stable, machine-readable: `bad_request`, `bad_cursor`, `bad_json`, `unauthorized`,
    /// `forbidden`, `not_found`, `unknown_session`, `unknown_node`, `unknown_retained`,
    /// `method_not_allowed`, `conflict`, `no_quorum`, `unavailable`, `internal`.
    pub code: String,
    pub message: String,
}

impl AdminError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> AdminError {
        AdminError {
            status,
            code,
            message: message.into(),
        }
    }

    pub fn bad_request(code: &'static str, message: impl Into<String>) -> AdminError {
        AdminError::new(StatusCode::BAD_REQUEST, code, message)
    }

    pub fn not_found(code: &'static str, message: impl Into<String>) -> AdminError {
        AdminError::new(StatusCode::NOT_FOUND, code, message)
    }

    pub fn conflict(message: impl Into<String>) -> AdminError {
        AdminError::new(StatusCode::CONFLICT, "conflict", message)
    }

    /// The cluster has no leader or quorum for a write (or a read that needs one).
    pub fn no_quorum(message: impl Into<String>) -> AdminError {
        AdminError::new(StatusCode::SERVICE_UNAVAILABLE, "no_quorum", message)
    }

    /// Another node needed for the answer could not be reached in time.
    pub fn unavailable(message: impl Into<String>) -> AdminError {
        AdminError::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", message)
    }

    pub fn internal(message: impl Into<String>) -> AdminError {
        AdminError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", message)
    }
}

impl std::fmt::Display for AdminError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} ({}): {}",
            self.status.as_u16(),
            self.code,
            self.message
        )
    }
}

impl std::error::Error for AdminError {}

impl IntoResponse for AdminError {
    fn into_response(self) -> Response {
        let body = ErrorBody {
            error: ErrorDetail {
                code: self.code.to_owned(),
                message: self.message,
            },
        };
        let mut resp = (self.status, Json(body)).into_response();
        if self.status == StatusCode::UNAUTHORIZED {
            resp.headers_mut().insert(
                axum::http::header::WWW_AUTHENTICATE,
                axum::http::HeaderValue::from_static("Bearer realm=\"petrel\""),
            );
        }
        resp
    }
}

pub type Result<T, E = AdminError> = std::result::Result<T, E>;
