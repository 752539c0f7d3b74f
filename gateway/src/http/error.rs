//! The one mapping from errors to HTTP responses. Clients get the status Jupyter Server would
//! send and a JSON body `{"reason": <HTTP phrase>, "message": <what went wrong>}`; details that
//! could help an attacker (paths, internal errors) go to the log, not the response.

use bytes::Bytes;
use http::{Response, StatusCode};
use http_body_util::Full;

use crate::auth::AuthError;
use crate::session::SessionError;

/// Everything a request can fail with.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// No such path or object.
    #[error("{0}")]
    NotFound(String),
    /// The path exists, the method does not.
    #[error("method not allowed; this path accepts {0}")]
    Method(&'static str),
    /// Authentication or origin rules refused the request.
    #[error(transparent)]
    Auth(#[from] AuthError),
    /// The request is malformed.
    #[error("{0}")]
    BadRequest(String),
    /// The target exists, or the change conflicts with what is stored.
    #[error("{0}")]
    Conflict(String),
    /// A workspace quota would be exceeded.
    #[error("{0}")]
    Quota(String),
    /// A stored file failed its integrity check.
    #[error("{0}")]
    Integrity(String),
    /// The workspace key is not unlocked.
    #[error("{0}")]
    Locked(String),
    /// The client did not finish sending its body in time.
    #[error("the request body did not arrive within {0} s")]
    SlowBody(u64),
    /// Too many requests at once.
    #[error("the gateway is serving {0} requests already; retry in a moment")]
    Overloaded(usize),
    /// The body is over the cap.
    #[error("the request body is over the {0}-byte limit")]
    TooLarge(usize),
    /// A lifecycle error.
    #[error(transparent)]
    Session(#[from] SessionError),
    /// Something failed inside the gateway; the message is logged, not sent.
    #[error("internal error")]
    Internal(String),
}

impl ApiError {
    /// The status code: chosen here and nowhere else.
    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::Method(_) => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::Auth(AuthError::Missing | AuthError::Invalid) => StatusCode::UNAUTHORIZED,
            ApiError::Auth(AuthError::Host(_) | AuthError::Origin(_)) => StatusCode::FORBIDDEN,
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::SlowBody(_) => StatusCode::REQUEST_TIMEOUT,
            ApiError::Overloaded(_) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Conflict(_) => StatusCode::CONFLICT,
            ApiError::Quota(_) => StatusCode::INSUFFICIENT_STORAGE,
            ApiError::Integrity(_) => StatusCode::INTERNAL_SERVER_ERROR,
            ApiError::Locked(_) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::Session(e) => match e {
                SessionError::NotFound(_) | SessionError::NoSuchKernelSpec(_) => {
                    StatusCode::NOT_FOUND
                }
                // Kernel Gateway answers its kernel limit with 403 too.
                SessionError::Limit { .. } => StatusCode::FORBIDDEN,
                SessionError::ShuttingDown => StatusCode::SERVICE_UNAVAILABLE,
                SessionError::Start(_) => StatusCode::INTERNAL_SERVER_ERROR,
            },
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The JSON response.
    pub fn response(&self) -> Response<Full<Bytes>> {
        let status = self.status();
        let message = match self {
            ApiError::Internal(detail) => {
                tracing::error!(%detail, "internal error");
                "internal error; the gateway's log has the details".to_owned()
            }
            ApiError::Session(SessionError::Start(e)) => {
                tracing::error!(error = %e, "a kernel could not be started");
                "the kernel could not be started; the gateway's log has the details".to_owned()
            }
            ApiError::Session(SessionError::NotFound(id)) => format!("Kernel does not exist: {id}"),
            other => other.to_string(),
        };
        let body = serde_json::json!({
            "reason": status.canonical_reason().unwrap_or("Error"),
            "message": message,
        });
        let mut response = super::json_response(status, &body);
        if let ApiError::Method(allowed) = self
            && let Ok(v) = http::HeaderValue::from_str(allowed)
        {
            response.headers_mut().insert(http::header::ALLOW, v);
        }
        if matches!(
            self,
            ApiError::Auth(AuthError::Missing | AuthError::Invalid)
        ) {
            response.headers_mut().insert(
                http::header::WWW_AUTHENTICATE,
                http::HeaderValue::from_static("token"),
            );
        }
        response
    }
}
