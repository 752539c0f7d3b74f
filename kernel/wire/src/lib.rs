//! `sandgate-wire`: Jupyter's wire format over ZeroMQ: multipart framing and HMAC-SHA256
//! signatures. Shared by the kernel (`sandgate-kernel`) and the gateway (`sandgate`), so the
//! gateway speaks to kernels without linking the sandbox.
//!
//! A message is `[identities…, "<IDS|MSG>", signature, header, parent_header, metadata,
//! content, buffers…]`. The signature is the hex HMAC of the four JSON frames. Frames come from
//! the network: every length is checked before it is used, nothing here panics on input, and a
//! message whose signature is missing or wrong is refused before any of its JSON is parsed.

use bytes::Bytes;
use jupyter_protocol::Header;
use ring::hmac;
use serde_json::Value;

/// Separates routing identities from the message proper.
pub const DELIMITER: &[u8] = b"<IDS|MSG>";
/// Largest message accepted (all frames together). Default 256 MiB.
pub const MAX_MESSAGE_BYTES: usize = 256 << 20;
/// Most frames accepted in one message (identities and buffers included).
pub const MAX_FRAMES: usize = 1024;
/// The `execute_request` metadata key (value `true`) that asks the kernel for E2B's structured
/// results: an `e2b/chart` entry (the figure's data) in each matplotlib figure's bundle and an
/// `e2b/data` entry (its columns) in each pandas DataFrame's. The gateway's E2B-compatible API
/// sets it; other requests leave it out, so Jupyter's clients never get those entries (a dict
/// under a MIME type that is not JSON's fails nbformat's validation, in nbclient and papermill).
pub const E2B_METADATA_KEY: &str = "sandgate_e2b";

/// Why a message was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum WireError {
    /// More bytes than [`MAX_MESSAGE_BYTES`].
    #[error("message of {0} bytes is over the {MAX_MESSAGE_BYTES}-byte limit")]
    TooLarge(usize),
    /// More frames than [`MAX_FRAMES`].
    #[error("message of {0} frames is over the {MAX_FRAMES}-frame limit")]
    TooManyFrames(usize),
    /// No `<IDS|MSG>` frame.
    #[error("no <IDS|MSG> delimiter")]
    NoDelimiter,
    /// Fewer than the five frames after the delimiter.
    #[error("{0} frames after the delimiter, need at least 5")]
    Truncated(usize),
    /// The signature frame is empty while a key is set.
    #[error("missing signature")]
    MissingSignature,
    /// The signature does not match.
    #[error("bad signature")]
    BadSignature,
    /// A JSON frame does not parse.
    #[error("{frame} is not valid JSON: {reason}")]
    BadJson {
        /// Which frame.
        frame: &'static str,
        /// The parser's words.
        reason: String,
    },
}

/// The connection's signing key. An empty key means messages are not signed, as Jupyter
/// allows; Sandgate always generates a key when it launches kernels.
#[derive(Clone)]
pub struct Signer(Option<hmac::Key>);

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_some() {
            "Signer(hmac-sha256)"
        } else {
            "Signer(none)"
        })
    }
}

impl Signer {
    /// A signer for `key` (the connection file's `key`, used as raw bytes).
    pub fn new(key: &[u8]) -> Signer {
        Signer((!key.is_empty()).then(|| hmac::Key::new(hmac::HMAC_SHA256, key)))
    }

    /// The hex signature of the four JSON frames.
    pub fn sign(&self, parts: [&[u8]; 4]) -> Vec<u8> {
        let Some(key) = &self.0 else {
            return Vec::new();
        };
        let mut ctx = hmac::Context::with_key(key);
        for p in parts {
            ctx.update(p);
        }
        hex::encode(ctx.sign().as_ref()).into_bytes()
    }

    /// Checks `signature` (hex) over the four frames in constant time.
    pub fn verify(&self, signature: &[u8], parts: [&[u8]; 4]) -> Result<(), WireError> {
        let Some(key) = &self.0 else { return Ok(()) };
        if signature.is_empty() {
            return Err(WireError::MissingSignature);
        }
        let tag = hex::decode(signature).map_err(|_| WireError::BadSignature)?;
        let mut msg = Vec::with_capacity(parts.iter().map(|p| p.len()).sum());
        for p in parts {
            msg.extend_from_slice(p);
        }
        hmac::verify(key, &msg, &tag).map_err(|_| WireError::BadSignature)
    }
}

/// A parsed message. `header` is typed; the rest stays JSON until a handler reads it.
#[derive(Debug, Clone)]
pub struct Message {
    /// ZeroMQ routing identities (for ROUTER sockets).
    pub identities: Vec<Bytes>,
    /// The header.
    pub header: Header,
    /// The parent's header, or `{}`.
    pub parent_header: Value,
    /// Metadata.
    pub metadata: Value,
    /// Content.
    pub content: Value,
    /// Binary buffers (not covered by the signature).
    pub buffers: Vec<Bytes>,
}

fn json(frame: &'static str, bytes: &[u8]) -> Result<Value, WireError> {
    serde_json::from_slice(bytes).map_err(|e| WireError::BadJson {
        frame,
        reason: e.to_string(),
    })
}

/// The signature frame of a message (the frame after `<IDS|MSG>`), if it has one.
pub fn signature(frames: &[Bytes]) -> Option<&Bytes> {
    let delim = frames.iter().position(|f| f.as_ref() == DELIMITER)?;
    frames.get(delim + 1)
}

/// Remembers the signatures of recent messages, so a signed message sent again (a replay of
/// captured traffic) is recognised. Bounded: the oldest are forgotten first.
#[derive(Debug)]
pub struct ReplayGuard {
    seen: std::collections::HashSet<Bytes>,
    order: std::collections::VecDeque<Bytes>,
    cap: usize,
}

impl ReplayGuard {
    /// A guard remembering up to `cap` signatures.
    pub fn new(cap: usize) -> ReplayGuard {
        ReplayGuard {
            seen: Default::default(),
            order: Default::default(),
            cap: cap.max(1),
        }
    }

    /// Records `signature`; false if it was seen before (a replay). Empty signatures (unsigned
    /// connections) are never replays.
    pub fn first_time(&mut self, signature: &Bytes) -> bool {
        if signature.is_empty() {
            return true;
        }
        if !self.seen.insert(signature.clone()) {
            return false;
        }
        self.order.push_back(signature.clone());
        while self.order.len() > self.cap {
            if let Some(old) = self.order.pop_front() {
                self.seen.remove(&old);
            }
        }
        true
    }
}

/// A message whose signature has been checked but whose JSON frames are still bytes: what a
/// relay (the gateway) needs to forward a message without parsing all of it.
#[derive(Debug, Clone)]
pub struct RawMessage {
    /// ZeroMQ routing identities (for ROUTER sockets).
    pub identities: Vec<Bytes>,
    /// The header, JSON.
    pub header: Bytes,
    /// The parent's header, JSON.
    pub parent_header: Bytes,
    /// Metadata, JSON.
    pub metadata: Bytes,
    /// Content, JSON.
    pub content: Bytes,
    /// Binary buffers (not covered by the signature).
    pub buffers: Vec<Bytes>,
}

/// Splits and authenticates one multipart message, leaving its JSON unparsed.
pub fn parse_raw(frames: Vec<Bytes>, signer: &Signer) -> Result<RawMessage, WireError> {
    if frames.len() > MAX_FRAMES {
        return Err(WireError::TooManyFrames(frames.len()));
    }
    let total: usize = frames.iter().map(Bytes::len).sum();
    if total > MAX_MESSAGE_BYTES {
        return Err(WireError::TooLarge(total));
    }
    let delim = frames
        .iter()
        .position(|f| f.as_ref() == DELIMITER)
        .ok_or(WireError::NoDelimiter)?;
    let after = frames.len() - delim - 1;
    if after < 5 {
        return Err(WireError::Truncated(after));
    }
    let mut rest = frames.into_iter();
    let identities: Vec<Bytes> = rest.by_ref().take(delim).collect();
    let _delimiter = rest.next();
    let (Some(sig), Some(header), Some(parent_header), Some(metadata), Some(content)) = (
        rest.next(),
        rest.next(),
        rest.next(),
        rest.next(),
        rest.next(),
    ) else {
        return Err(WireError::Truncated(after));
    };
    signer.verify(&sig, [&header, &parent_header, &metadata, &content])?;
    Ok(RawMessage {
        identities,
        header,
        parent_header,
        metadata,
        content,
        buffers: rest.collect(),
    })
}

/// Parses and authenticates one multipart message.
pub fn parse(frames: Vec<Bytes>, signer: &Signer) -> Result<Message, WireError> {
    let raw = parse_raw(frames, signer)?;
    let header: Header = serde_json::from_slice(&raw.header).map_err(|e| WireError::BadJson {
        frame: "header",
        reason: e.to_string(),
    })?;
    Ok(Message {
        identities: raw.identities,
        header,
        parent_header: json("parent_header", &raw.parent_header)?,
        metadata: json("metadata", &raw.metadata)?,
        content: json("content", &raw.content)?,
        buffers: raw.buffers,
    })
}

/// Frames for a message whose JSON parts are already serialised, signed.
pub fn serialize_raw(message: &RawMessage, signer: &Signer) -> Vec<Bytes> {
    let sig = signer.sign([
        &message.header,
        &message.parent_header,
        &message.metadata,
        &message.content,
    ]);
    let mut frames = Vec::with_capacity(message.identities.len() + 6 + message.buffers.len());
    frames.extend(message.identities.iter().cloned());
    frames.push(Bytes::from_static(DELIMITER));
    frames.push(sig.into());
    frames.push(message.header.clone());
    frames.push(message.parent_header.clone());
    frames.push(message.metadata.clone());
    frames.push(message.content.clone());
    frames.extend(message.buffers.iter().cloned());
    frames
}

/// Frames for `message`, signed.
pub fn serialize(message: &Message, signer: &Signer) -> Vec<Bytes> {
    let raw = RawMessage {
        identities: message.identities.clone(),
        header: serde_json::to_vec(&message.header)
            .expect("a header serialises")
            .into(),
        parent_header: serde_json::to_vec(&message.parent_header)
            .expect("JSON serialises")
            .into(),
        metadata: serde_json::to_vec(&message.metadata)
            .expect("JSON serialises")
            .into(),
        content: serde_json::to_vec(&message.content)
            .expect("JSON serialises")
            .into(),
        buffers: message.buffers.clone(),
    };
    serialize_raw(&raw, signer)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(msg_type: &str) -> Header {
        Header {
            msg_id: "m1".into(),
            username: "u".into(),
            session: "s".into(),
            date: chrono::Utc::now(),
            msg_type: msg_type.into(),
            version: "5.3".into(),
        }
    }

    fn sample() -> Message {
        Message {
            identities: vec![Bytes::from_static(b"peer")],
            header: header("execute_request"),
            parent_header: serde_json::json!({}),
            metadata: serde_json::json!({}),
            content: serde_json::json!({"code": "1+1"}),
            buffers: vec![Bytes::from_static(b"\x00\x01")],
        }
    }

    #[test]
    fn round_trip_signed() {
        let signer = Signer::new(b"secret");
        let frames = serialize(&sample(), &signer);
        let back = parse(frames, &signer).unwrap();
        assert_eq!(back.content["code"], "1+1");
        assert_eq!(back.identities, vec![Bytes::from_static(b"peer")]);
        assert_eq!(back.buffers.len(), 1);
    }

    #[test]
    fn wrong_key_and_missing_signature_are_refused() {
        let frames = serialize(&sample(), &Signer::new(b"other"));
        assert_eq!(
            parse(frames, &Signer::new(b"secret")).unwrap_err(),
            WireError::BadSignature
        );
        let mut frames = serialize(&sample(), &Signer::new(b"secret"));
        frames[2] = Bytes::new();
        assert_eq!(
            parse(frames, &Signer::new(b"secret")).unwrap_err(),
            WireError::MissingSignature
        );
    }

    #[test]
    fn tampered_content_is_refused() {
        let signer = Signer::new(b"secret");
        let mut frames = serialize(&sample(), &signer);
        frames[6] = Bytes::from_static(br#"{"code": "import os"}"#);
        assert_eq!(parse(frames, &signer).unwrap_err(), WireError::BadSignature);
    }

    #[test]
    fn malformed_frames_never_panic() {
        let signer = Signer::new(b"k");
        let cases: Vec<Vec<Bytes>> = vec![
            vec![],
            vec![Bytes::from_static(DELIMITER)],
            vec![
                Bytes::from_static(b"x"),
                Bytes::from_static(DELIMITER),
                Bytes::from_static(b"zz"),
            ],
            vec![Bytes::from_static(DELIMITER); 7],
            (0..MAX_FRAMES + 1).map(|_| Bytes::new()).collect(),
        ];
        for frames in cases {
            assert!(parse(frames, &signer).is_err());
        }
        // Validly signed but not JSON.
        let parts: [&[u8]; 4] = [b"{", b"{}", b"{}", b"{}"];
        let sig = signer.sign(parts);
        let mut frames = vec![Bytes::from_static(DELIMITER), sig.into()];
        frames.extend(parts.iter().map(|p| Bytes::copy_from_slice(p)));
        assert!(matches!(
            parse(frames, &signer),
            Err(WireError::BadJson {
                frame: "header",
                ..
            })
        ));
    }

    #[test]
    fn replays_are_recognised_and_the_guard_is_bounded() {
        let mut g = ReplayGuard::new(2);
        let (a, b, c) = (
            Bytes::from_static(b"a"),
            Bytes::from_static(b"b"),
            Bytes::from_static(b"c"),
        );
        assert!(g.first_time(&a) && g.first_time(&b));
        assert!(!g.first_time(&a));
        assert!(g.first_time(&c));
        // `a` was forgotten to make room.
        assert!(g.first_time(&a));
        assert!(g.first_time(&Bytes::new()) && g.first_time(&Bytes::new()));
        let frames = serialize(&sample(), &Signer::new(b"k"));
        assert_eq!(signature(&frames).map(|s| s.len()), Some(64));
    }

    #[test]
    fn unsigned_mode_accepts_empty_signature() {
        let signer = Signer::new(b"");
        let frames = serialize(&sample(), &signer);
        assert!(parse(frames, &signer).is_ok());
    }
}
