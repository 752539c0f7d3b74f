//! The Connect protocol (connectrpc.com/docs/protocol), as much of it as envd's clients use:
//! unary calls with the JSON codec, server-streaming calls framed in envelopes, and errors.
//!
//! A unary call is `POST /<service>/<method>` with `Content-Type: application/json`; its answer
//! is the JSON message (200) or an error `{"code": "not_found", "message": …}` with the HTTP
//! status of its code. A streaming call's body and answer are envelopes: one flags byte, a
//! four-byte big-endian length, then that many bytes of message. The answer's last envelope
//! has flag `0x02` (end of stream) and carries `{"error": …}` if the call failed, with HTTP 200.
//!
//! Request bodies come from the network: [`parse_envelopes`] checks every length against what
//! arrived and against a cap before it reads anything.

use bytes::{BufMut, Bytes, BytesMut};
use http::{HeaderValue, Response, StatusCode, header};
use http_body_util::BodyExt;
use serde_json::{Value, json};

use crate::http::Body;

/// The envelope flag of a compressed message.
const FLAG_COMPRESSED: u8 = 0x01;
/// The envelope flag of the end-of-stream message.
pub const FLAG_END_STREAM: u8 = 0x02;
/// Bytes before an envelope's message: flags and length.
const ENVELOPE_HEADER: usize = 5;

/// A Connect error code (the JSON names are the protocol's).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Code {
    /// The request is malformed or names something invalid.
    InvalidArgument,
    /// The named file or folder does not exist.
    NotFound,
    /// It exists already.
    AlreadyExists,
    /// The caller may not do this (a path outside the sandbox's files).
    PermissionDenied,
    /// A limit was hit.
    ResourceExhausted,
    /// The state does not allow it.
    FailedPrecondition,
    /// Past a range (too many entries).
    OutOfRange,
    /// Not part of this server.
    Unimplemented,
    /// A fault of the server.
    Internal,
    /// Not available now (the workspace is locked).
    Unavailable,
}

impl Code {
    /// The code's name on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            Code::InvalidArgument => "invalid_argument",
            Code::NotFound => "not_found",
            Code::AlreadyExists => "already_exists",
            Code::PermissionDenied => "permission_denied",
            Code::ResourceExhausted => "resource_exhausted",
            Code::FailedPrecondition => "failed_precondition",
            Code::OutOfRange => "out_of_range",
            Code::Unimplemented => "unimplemented",
            Code::Internal => "internal",
            Code::Unavailable => "unavailable",
        }
    }

    /// The HTTP status a unary error with this code carries (the protocol's table).
    pub fn status(self) -> StatusCode {
        match self {
            Code::InvalidArgument | Code::FailedPrecondition | Code::OutOfRange => {
                StatusCode::BAD_REQUEST
            }
            Code::NotFound => StatusCode::NOT_FOUND,
            Code::AlreadyExists => StatusCode::CONFLICT,
            Code::PermissionDenied => StatusCode::FORBIDDEN,
            Code::ResourceExhausted => StatusCode::TOO_MANY_REQUESTS,
            Code::Unimplemented => StatusCode::NOT_IMPLEMENTED,
            Code::Internal => StatusCode::INTERNAL_SERVER_ERROR,
            Code::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        }
    }
}

/// A Connect error: a code and a message for the user.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}: {message}", code.as_str())]
pub struct ConnectError {
    /// The code.
    pub code: Code,
    /// What went wrong.
    pub message: String,
}

impl ConnectError {
    /// An error with `code`.
    pub fn new(code: Code, message: impl Into<String>) -> ConnectError {
        ConnectError {
            code,
            message: message.into(),
        }
    }

    /// The protocol's JSON for it.
    pub fn to_json(&self) -> Value {
        json!({"code": self.code.as_str(), "message": self.message})
    }

    /// The answer to a unary call (or a streaming call refused before it began).
    pub fn response(&self) -> Response<Body> {
        let mut r = crate::http::json_response(self.code.status(), &self.to_json())
            .map(|b| b.boxed_unsync());
        r.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        r
    }
}

/// A unary call's answer.
pub fn unary_ok(message: &Value) -> Response<Body> {
    crate::http::json_response(StatusCode::OK, message).map(|b| b.boxed_unsync())
}

/// One envelope of a stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Envelope {
    /// Its flags.
    pub flags: u8,
    /// Its message.
    pub data: Bytes,
}

/// Why a streaming request body was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EnvelopeError {
    /// Fewer than five bytes where an envelope's header should be.
    #[error("the request ends inside an envelope's header ({0} bytes of 5)")]
    TruncatedHeader(usize),
    /// The length says more than arrived.
    #[error("an envelope says its message has {said} bytes, but only {left} follow")]
    Truncated {
        /// The length in the header.
        said: u32,
        /// Bytes left in the body.
        left: usize,
    },
    /// The length is over the cap.
    #[error("an envelope's message of {0} bytes is over the {1}-byte limit")]
    TooLarge(u32, usize),
    /// A compressed message, though no compression was agreed.
    #[error("an envelope is compressed, but this server accepts no compression")]
    Compressed,
    /// Flags this server does not know (or end-of-stream, which only servers send).
    #[error("an envelope has flags {0:#04x}, which requests may not carry")]
    Flags(u8),
}

/// Splits a streaming request body into its envelopes. Each message is at most `max` bytes;
/// every length is checked against what is left before anything is read.
pub fn parse_envelopes(mut body: &[u8], max: usize) -> Result<Vec<Envelope>, EnvelopeError> {
    let mut out = Vec::new();
    while !body.is_empty() {
        if body.len() < ENVELOPE_HEADER {
            return Err(EnvelopeError::TruncatedHeader(body.len()));
        }
        let flags = body[0];
        let said = u32::from_be_bytes([body[1], body[2], body[3], body[4]]);
        if flags & FLAG_COMPRESSED != 0 {
            return Err(EnvelopeError::Compressed);
        }
        if flags != 0 {
            return Err(EnvelopeError::Flags(flags));
        }
        let len = said as usize;
        if len > max {
            return Err(EnvelopeError::TooLarge(said, max));
        }
        let rest = &body[ENVELOPE_HEADER..];
        if rest.len() < len {
            return Err(EnvelopeError::Truncated {
                said,
                left: rest.len(),
            });
        }
        out.push(Envelope {
            flags,
            data: Bytes::copy_from_slice(&rest[..len]),
        });
        body = &rest[len..];
    }
    Ok(out)
}

/// One envelope's bytes.
pub fn envelope(flags: u8, data: &[u8]) -> Bytes {
    let mut b = BytesMut::with_capacity(ENVELOPE_HEADER + data.len());
    b.put_u8(flags);
    b.put_u32(u32::try_from(data.len()).unwrap_or(u32::MAX));
    b.put_slice(data);
    b.freeze()
}

/// A whole streaming answer: `messages`, then the end of the stream, with `error` if the call
/// failed (HTTP 200 either way, as the protocol has it).
pub fn stream_response(messages: &[Value], error: Option<&ConnectError>) -> Response<Body> {
    let mut body = BytesMut::new();
    for m in messages {
        body.put_slice(&envelope(0, m.to_string().as_bytes()));
    }
    let end = match error {
        Some(e) => json!({"error": e.to_json()}),
        None => json!({}),
    };
    body.put_slice(&envelope(FLAG_END_STREAM, end.to_string().as_bytes()));
    let mut r = Response::new(http_body_util::Full::new(body.freeze()).boxed_unsync());
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/connect+json"),
    );
    r
}

/// Whether `content_type` is Connect's JSON codec, unary (`application/json`) or streaming
/// (`application/connect+json`); parameters such as `charset` are ignored.
pub fn is_json(content_type: Option<&HeaderValue>, streaming: bool) -> bool {
    let Some(ct) = content_type.and_then(|v| v.to_str().ok()) else {
        return false;
    };
    let essence = ct.split(';').next().unwrap_or_default().trim();
    let want = if streaming {
        "application/connect+json"
    } else {
        "application/json"
    };
    essence.eq_ignore_ascii_case(want)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(flags: u8, len: u32, data: &[u8]) -> Vec<u8> {
        let mut v = vec![flags];
        v.extend_from_slice(&len.to_be_bytes());
        v.extend_from_slice(data);
        v
    }

    #[test]
    fn envelopes_round_trip() {
        let mut body = envelope(0, br#"{"a":1}"#).to_vec();
        body.extend_from_slice(&envelope(0, b"{}"));
        let got = parse_envelopes(&body, 1024).unwrap();
        assert_eq!(got.len(), 2);
        assert_eq!(&got[0].data[..], br#"{"a":1}"#);
        assert_eq!(&got[1].data[..], b"{}");
        assert_eq!(parse_envelopes(b"", 10).unwrap(), vec![]);
        // An empty message is a message.
        assert_eq!(parse_envelopes(&frame(0, 0, b""), 10).unwrap().len(), 1);
    }

    #[test]
    fn lying_truncated_and_oversized_envelopes_are_refused() {
        // A length that says more than arrived.
        assert_eq!(
            parse_envelopes(&frame(0, 100, b"{}"), 1 << 20),
            Err(EnvelopeError::Truncated { said: 100, left: 2 })
        );
        // A length near u32::MAX is refused by the cap before anything is read.
        assert_eq!(
            parse_envelopes(&frame(0, u32::MAX, b"{}"), 1 << 20),
            Err(EnvelopeError::TooLarge(u32::MAX, 1 << 20))
        );
        // A header cut short, alone or after a good envelope.
        assert_eq!(
            parse_envelopes(&[0, 0, 0], 10),
            Err(EnvelopeError::TruncatedHeader(3))
        );
        let mut body = frame(0, 2, b"{}");
        body.extend_from_slice(&[0, 0]);
        assert_eq!(
            parse_envelopes(&body, 10),
            Err(EnvelopeError::TruncatedHeader(2))
        );
        // Compression was never agreed; end-of-stream and unknown flags are the server's.
        assert_eq!(
            parse_envelopes(&frame(1, 2, b"{}"), 10),
            Err(EnvelopeError::Compressed)
        );
        assert_eq!(
            parse_envelopes(&frame(2, 2, b"{}"), 10),
            Err(EnvelopeError::Flags(2))
        );
        assert_eq!(
            parse_envelopes(&frame(0x80, 2, b"{}"), 10),
            Err(EnvelopeError::Flags(0x80))
        );
    }

    #[test]
    fn codes_have_the_protocols_names_and_statuses() {
        let e = ConnectError::new(Code::NotFound, "gone");
        assert_eq!(e.to_json(), json!({"code": "not_found", "message": "gone"}));
        assert_eq!(Code::NotFound.status(), StatusCode::NOT_FOUND);
        assert_eq!(Code::AlreadyExists.status(), StatusCode::CONFLICT);
        assert_eq!(Code::InvalidArgument.status(), StatusCode::BAD_REQUEST);
        assert_eq!(Code::PermissionDenied.status(), StatusCode::FORBIDDEN);
        assert_eq!(Code::Unimplemented.status(), StatusCode::NOT_IMPLEMENTED);
    }

    #[test]
    fn content_types_are_matched_without_parameters() {
        let v = HeaderValue::from_static("application/json; charset=utf-8");
        assert!(is_json(Some(&v), false));
        assert!(!is_json(Some(&v), true));
        let v = HeaderValue::from_static("Application/Connect+JSON");
        assert!(is_json(Some(&v), true));
        let v = HeaderValue::from_static("application/proto");
        assert!(!is_json(Some(&v), false));
        assert!(!is_json(None, false));
    }
}
