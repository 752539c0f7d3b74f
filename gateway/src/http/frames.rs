//! The two WebSocket framings of Jupyter kernel messages, decoded from hostile bytes (every
//! length and offset is checked; nothing here panics on input) and encoded from kernel messages.
//!
//! - Legacy (no subprotocol): a text frame holding the message as JSON with a `channel` field;
//!   a message with binary buffers travels as a binary frame: `nbufs` (u32, big-endian), `nbufs`
//!   offsets (u32, big-endian) of the JSON part and each buffer, then the parts.
//! - `v1.kernel.websocket.jupyter.org`: binary frames: `n` (u64, little-endian), `n` offsets
//!   (u64, little-endian), then the channel name and the message parts (header, parent header,
//!   metadata, content, buffers…), part `i` spanning `offsets[i]..offsets[i + 1]`.

use bytes::Bytes;
use sandgate_wire::RawMessage;
use serde_json::{Map, Value};

use crate::envelope::{Channel, KernelMessage, MsgType};

/// The subprotocol name of the binary framing.
pub const V1_PROTOCOL: &str = "v1.kernel.websocket.jupyter.org";
/// Most binary buffers one client message may carry.
pub const MAX_BUFFERS: usize = 64;

/// Which framing a connection speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// JSON text frames (and the legacy binary form for buffers).
    Legacy,
    /// `v1.kernel.websocket.jupyter.org`.
    V1,
}

/// A WebSocket frame's payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// A text frame.
    Text(String),
    /// A binary frame.
    Binary(Bytes),
}

/// Why a client's frame was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// Not JSON, or not a JSON object.
    #[error("the message is not a JSON object: {0}")]
    Json(String),
    /// A binary frame whose offsets do not fit it.
    #[error("malformed binary frame: {0}")]
    Binary(&'static str),
    /// No or unknown channel.
    #[error("unknown channel {0:?}: expected shell, control or stdin")]
    Channel(String),
    /// The header lacks `msg_id` or `msg_type`.
    #[error("the header needs string fields msg_id and msg_type")]
    Header,
    /// A part that must be a JSON object is not.
    #[error("{0} must be a JSON object")]
    NotObject(&'static str),
    /// Too many buffers.
    #[error("more than {MAX_BUFFERS} binary buffers")]
    TooManyBuffers,
    /// A frame of the other protocol's kind.
    #[error("{0}")]
    WrongKind(&'static str),
}

/// A client's message, checked and re-serialised for the kernel.
#[derive(Debug, Clone)]
pub struct ClientMessage {
    /// Where it goes.
    pub channel: Channel,
    /// Its id (for routing the reply).
    pub msg_id: String,
    /// Its type.
    pub msg_type: MsgType,
    /// The message, ready to sign and send.
    pub message: RawMessage,
}

fn object_bytes(value: Option<Value>, what: &'static str) -> Result<Bytes, FrameError> {
    match value {
        None | Some(Value::Null) => Ok(Bytes::from_static(b"{}")),
        Some(v @ Value::Object(_)) => Ok(serde_json::to_vec(&v).expect("JSON").into()),
        Some(_) => Err(FrameError::NotObject(what)),
    }
}

/// Checks a header and fills what a sloppy client left out (the kernel needs all six fields).
fn header(value: Option<Value>) -> Result<(Bytes, String, MsgType), FrameError> {
    let Some(Value::Object(mut h)) = value else {
        return Err(FrameError::NotObject("header"));
    };
    let (Some(Value::String(id)), Some(Value::String(ty))) = (h.get("msg_id"), h.get("msg_type"))
    else {
        return Err(FrameError::Header);
    };
    let (id, ty) = (id.clone(), ty.clone());
    if id.is_empty() || ty.is_empty() {
        return Err(FrameError::Header);
    }
    let fill = |h: &mut Map<String, Value>, key: &str, value: Value| {
        if !h.get(key).is_some_and(Value::is_string) {
            h.insert(key.to_owned(), value);
        }
    };
    fill(&mut h, "username", Value::String(String::new()));
    fill(&mut h, "session", Value::String(String::new()));
    fill(&mut h, "version", Value::String("5.3".into()));
    fill(
        &mut h,
        "date",
        Value::String(chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, true)),
    );
    Ok((
        serde_json::to_vec(&Value::Object(h)).expect("JSON").into(),
        id,
        MsgType::parse(&ty),
    ))
}

/// A part of a v1 frame that must be a JSON object (or empty, or `null`: then `{}`), as a
/// slice of the frame once it is checked.
fn object_part(frame: &Bytes, part: &[u8], what: &'static str) -> Result<Bytes, FrameError> {
    if part.is_empty() {
        return Ok(Bytes::from_static(b"{}"));
    }
    serde_json::from_slice::<serde::de::IgnoredAny>(part)
        .map_err(|e| FrameError::Json(e.to_string()))?;
    // Valid JSON: its first byte says what it is (`n` only starts `null`).
    match part.iter().find(|c| !c.is_ascii_whitespace()) {
        Some(b'{') => Ok(frame.slice_ref(part)),
        Some(b'n') => Ok(Bytes::from_static(b"{}")),
        _ => Err(FrameError::NotObject(what)),
    }
}

fn channel(name: &str) -> Result<Channel, FrameError> {
    match Channel::parse(name) {
        Some(Channel::Iopub) | None => Err(FrameError::Channel(name.to_owned())),
        Some(c) => Ok(c),
    }
}

fn parse_object(bytes: &[u8]) -> Result<Map<String, Value>, FrameError> {
    match serde_json::from_slice::<Value>(bytes) {
        Ok(Value::Object(m)) => Ok(m),
        Ok(_) => Err(FrameError::Json("not an object".into())),
        Err(e) => Err(FrameError::Json(e.to_string())),
    }
}

fn from_json(
    mut msg: Map<String, Value>,
    buffers: Vec<Bytes>,
) -> Result<ClientMessage, FrameError> {
    // As Jupyter Server: a message without a channel goes to shell.
    let channel = match msg.get("channel") {
        Some(Value::String(c)) => channel(c)?,
        None | Some(Value::Null) => Channel::Shell,
        Some(other) => return Err(FrameError::Channel(other.to_string())),
    };
    let (header, msg_id, msg_type) = header(msg.remove("header"))?;
    Ok(ClientMessage {
        channel,
        msg_id,
        msg_type,
        message: RawMessage {
            identities: Vec::new(),
            header,
            parent_header: object_bytes(msg.remove("parent_header"), "parent_header")?,
            metadata: object_bytes(msg.remove("metadata"), "metadata")?,
            content: object_bytes(msg.remove("content"), "content")?,
            buffers,
        },
    })
}

/// Splits a legacy binary frame into its JSON part and buffers.
fn legacy_binary_parts(b: &[u8]) -> Result<Vec<&[u8]>, FrameError> {
    let n = b
        .get(..4)
        .map(|x| u32::from_be_bytes([x[0], x[1], x[2], x[3]]) as usize)
        .ok_or(FrameError::Binary("shorter than its part count"))?;
    if n == 0 {
        return Err(FrameError::Binary("no parts"));
    }
    if n > MAX_BUFFERS + 1 {
        return Err(FrameError::TooManyBuffers);
    }
    let table_end = 4 * (n + 1);
    let table = b
        .get(4..table_end)
        .ok_or(FrameError::Binary("offset table runs past the frame"))?;
    let mut offsets: Vec<usize> = table
        .chunks_exact(4)
        .map(|x| u32::from_be_bytes([x[0], x[1], x[2], x[3]]) as usize)
        .collect();
    offsets.push(b.len());
    let mut parts = Vec::with_capacity(n);
    for w in offsets.windows(2) {
        let (start, end) = (w[0], w[1]);
        if start < table_end || start > end || end > b.len() {
            return Err(FrameError::Binary("offsets out of order or out of range"));
        }
        parts.push(&b[start..end]);
    }
    Ok(parts)
}

/// Splits a v1 frame into its channel and parts.
fn v1_parts(b: &[u8]) -> Result<(&str, Vec<&[u8]>), FrameError> {
    let read = |at: usize| -> Option<u64> {
        b.get(at..at + 8)
            .map(|x| u64::from_le_bytes([x[0], x[1], x[2], x[3], x[4], x[5], x[6], x[7]]))
    };
    let n = read(0).ok_or(FrameError::Binary("shorter than its offset count"))?;
    // Channel + header, parent, metadata, content at least, and a bounded number of buffers.
    if n < 6 {
        return Err(FrameError::Binary("fewer offsets than a message needs"));
    }
    if n > (MAX_BUFFERS + 6) as u64 {
        return Err(FrameError::TooManyBuffers);
    }
    let n = n as usize;
    let table_end = 8 * (n + 1);
    let mut offsets = Vec::with_capacity(n);
    for i in 0..n {
        let o = read(8 * (i + 1)).ok_or(FrameError::Binary("offset table runs past the frame"))?;
        let o = usize::try_from(o).map_err(|_| FrameError::Binary("offset too large"))?;
        offsets.push(o);
    }
    for w in offsets.windows(2) {
        if w[0] < table_end || w[0] > w[1] || w[1] > b.len() {
            return Err(FrameError::Binary("offsets out of order or out of range"));
        }
    }
    let channel = std::str::from_utf8(&b[offsets[0]..offsets[1]])
        .map_err(|_| FrameError::Binary("channel is not UTF-8"))?;
    let parts = offsets[1..].windows(2).map(|w| &b[w[0]..w[1]]).collect();
    Ok((channel, parts))
}

/// Decodes one frame from a client.
pub fn decode(protocol: Protocol, frame: &Frame) -> Result<ClientMessage, FrameError> {
    match (protocol, frame) {
        (Protocol::Legacy, Frame::Text(text)) => {
            from_json(parse_object(text.as_bytes())?, Vec::new())
        }
        (Protocol::Legacy, Frame::Binary(b)) => {
            let parts = legacy_binary_parts(b)?;
            let json = parse_object(parts[0])?;
            // The buffers are slices of the frame: nothing is copied.
            let buffers = parts[1..].iter().map(|p| b.slice_ref(p)).collect();
            from_json(json, buffers)
        }
        (Protocol::V1, Frame::Binary(b)) => {
            let (name, parts) = v1_parts(b)?;
            let channel = channel(name)?;
            let header_json = match parts[0] {
                [] => None,
                bytes => Some(
                    serde_json::from_slice(bytes).map_err(|e| FrameError::Json(e.to_string()))?,
                ),
            };
            let (header, msg_id, msg_type) = header(header_json)?;
            if parts.len() - 4 > MAX_BUFFERS {
                return Err(FrameError::TooManyBuffers);
            }
            // The other parts are checked and relayed as the client sent them, as slices of
            // the frame (only the header is rewritten, to fill what the kernel needs).
            Ok(ClientMessage {
                channel,
                msg_id,
                msg_type,
                message: RawMessage {
                    identities: Vec::new(),
                    header,
                    parent_header: object_part(b, parts[1], "parent_header")?,
                    metadata: object_part(b, parts[2], "metadata")?,
                    content: object_part(b, parts[3], "content")?,
                    buffers: parts[4..].iter().map(|p| b.slice_ref(p)).collect(),
                },
            })
        }
        (Protocol::V1, Frame::Text(_)) => Err(FrameError::WrongKind(
            "text frames are not part of v1.kernel.websocket.jupyter.org; send binary frames",
        )),
    }
}

/// The legacy JSON object for a kernel message, spliced from its already-valid JSON parts
/// and its envelope's id and type.
fn legacy_json(m: &KernelMessage, with_buffers: bool) -> Vec<u8> {
    let raw = &m.raw;
    let msg_id = m.envelope.msg_id.as_deref().unwrap_or_default();
    let msg_type = m.envelope.msg_type.as_str();
    let mut out = Vec::with_capacity(
        raw.header.len()
            + raw.parent_header.len()
            + raw.metadata.len()
            + raw.content.len()
            + msg_id.len()
            + msg_type.len()
            + 160,
    );
    out.extend_from_slice(b"{\"header\":");
    out.extend_from_slice(&raw.header);
    out.extend_from_slice(b",\"msg_id\":");
    serde_json::to_writer(&mut out, msg_id).expect("a string serialises");
    out.extend_from_slice(b",\"msg_type\":");
    serde_json::to_writer(&mut out, msg_type).expect("a string serialises");
    out.extend_from_slice(b",\"parent_header\":");
    out.extend_from_slice(&raw.parent_header);
    out.extend_from_slice(b",\"metadata\":");
    out.extend_from_slice(&raw.metadata);
    out.extend_from_slice(b",\"content\":");
    out.extend_from_slice(&raw.content);
    if with_buffers {
        out.extend_from_slice(b",\"buffers\":[]");
    }
    out.extend_from_slice(b",\"channel\":\"");
    out.extend_from_slice(m.channel.as_str().as_bytes());
    out.extend_from_slice(b"\"}");
    out
}

/// Encodes a kernel message (whose four JSON parts are valid JSON) for a client: its frames
/// spliced as they are, its ids from its envelope.
pub fn encode(protocol: Protocol, m: &KernelMessage) -> Frame {
    let raw = &m.raw;
    match protocol {
        Protocol::Legacy => {
            if raw.buffers.is_empty() {
                let json = legacy_json(m, true);
                // The parts are valid JSON, hence valid UTF-8.
                Frame::Text(String::from_utf8(json).unwrap_or_default())
            } else {
                let json = legacy_json(m, false);
                let nbufs = 1 + raw.buffers.len();
                // Each part's start: the JSON, then every buffer.
                let mut starts = Vec::with_capacity(nbufs);
                let mut pos = 4 * (nbufs + 1);
                starts.push(pos);
                pos += json.len();
                for b in &raw.buffers {
                    starts.push(pos);
                    pos += b.len();
                }
                starts.truncate(nbufs);
                let mut out = Vec::with_capacity(pos);
                out.extend_from_slice(&(nbufs as u32).to_be_bytes());
                for s in &starts {
                    out.extend_from_slice(&(*s as u32).to_be_bytes());
                }
                out.extend_from_slice(&json);
                for b in &raw.buffers {
                    out.extend_from_slice(b);
                }
                Frame::Binary(out.into())
            }
        }
        Protocol::V1 => {
            let name = m.channel.as_str().as_bytes();
            let parts: Vec<&[u8]> = [&raw.header, &raw.parent_header, &raw.metadata, &raw.content]
                .into_iter()
                .map(|b| b.as_ref())
                .chain(raw.buffers.iter().map(|b| b.as_ref()))
                .collect();
            let n = parts.len() + 2;
            let mut offsets = Vec::with_capacity(n);
            let mut at = 8 * (n + 1);
            offsets.push(at);
            at += name.len();
            offsets.push(at);
            for p in &parts {
                at += p.len();
                offsets.push(at);
            }
            let mut out = Vec::with_capacity(at);
            out.extend_from_slice(&(n as u64).to_le_bytes());
            for o in &offsets {
                out.extend_from_slice(&(*o as u64).to_le_bytes());
            }
            out.extend_from_slice(name);
            for p in &parts {
                out.extend_from_slice(p);
            }
            Frame::Binary(out.into())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kernel_message(buffers: Vec<Bytes>) -> RawMessage {
        RawMessage {
            identities: vec![],
            header: Bytes::from_static(br#"{"msg_id":"k1","msg_type":"execute_reply","session":"s","username":"u","date":"2026-11-23T10:00:00.000000Z","version":"5.3"}"#),
            parent_header: Bytes::from_static(br#"{"msg_id":"c1"}"#),
            metadata: Bytes::from_static(b"{}"),
            content: Bytes::from_static(br#"{"status":"ok"}"#),
            buffers,
        }
    }

    #[test]
    fn legacy_text_carries_channel_and_ids() {
        let Frame::Text(t) = encode(
            Protocol::Legacy,
            &KernelMessage::parse(Channel::Shell, kernel_message(vec![])),
        ) else {
            panic!("expected text");
        };
        let v: Value = serde_json::from_str(&t).unwrap();
        assert_eq!(v["channel"], "shell");
        assert_eq!(v["msg_id"], "k1");
        assert_eq!(v["msg_type"], "execute_reply");
        assert_eq!(v["parent_header"]["msg_id"], "c1");
        assert_eq!(v["content"]["status"], "ok");
        assert_eq!(v["buffers"], serde_json::json!([]));
    }

    /// What Jupyter Server's `deserialize_binary_message` does, written independently.
    fn read_legacy_binary(b: &[u8]) -> (Value, Vec<Vec<u8>>) {
        let parts = legacy_binary_parts(b).unwrap();
        (
            serde_json::from_slice(parts[0]).unwrap(),
            parts[1..].iter().map(|p| p.to_vec()).collect(),
        )
    }

    #[test]
    fn legacy_binary_round_trip() {
        let m = kernel_message(vec![
            Bytes::from_static(b"\x00\x01\x02"),
            Bytes::from_static(b"xyz"),
        ]);
        let Frame::Binary(b) = encode(
            Protocol::Legacy,
            &KernelMessage::parse(Channel::Iopub, m.clone()),
        ) else {
            panic!("expected binary");
        };
        let (json, bufs) = read_legacy_binary(&b);
        assert_eq!(json["channel"], "iopub");
        assert!(json.get("buffers").is_none());
        assert_eq!(bufs, vec![b"\x00\x01\x02".to_vec(), b"xyz".to_vec()]);
    }

    #[test]
    fn v1_round_trip_through_decode() {
        let mut m = kernel_message(vec![Bytes::from_static(b"BUF")]);
        m.header = Bytes::from_static(br#"{"msg_id":"c2","msg_type":"comm_msg"}"#);
        let Frame::Binary(b) = encode(
            Protocol::V1,
            &KernelMessage::parse(Channel::Shell, m.clone()),
        ) else {
            panic!("expected binary");
        };
        let back = decode(Protocol::V1, &Frame::Binary(b)).unwrap();
        assert_eq!(back.channel, Channel::Shell);
        assert_eq!(back.msg_id, "c2");
        assert_eq!(back.msg_type.as_str(), "comm_msg");
        assert_eq!(back.message.buffers, vec![Bytes::from_static(b"BUF")]);
        let h: Value = serde_json::from_slice(&back.message.header).unwrap();
        assert_eq!(h["version"], "5.3");
        assert!(h["date"].is_string());
    }

    #[test]
    fn legacy_text_decodes_and_fills_the_header() {
        let text = r#"{"header":{"msg_id":"a","msg_type":"kernel_info_request"},"parent_header":{},"metadata":{},"content":{},"channel":"shell"}"#;
        let m = decode(Protocol::Legacy, &Frame::Text(text.into())).unwrap();
        assert_eq!(
            (m.channel, m.msg_type.as_str()),
            (Channel::Shell, "kernel_info_request")
        );
        let h: Value = serde_json::from_slice(&m.message.header).unwrap();
        for key in ["username", "session", "date", "version"] {
            assert!(h[key].is_string(), "{key}");
        }
    }

    #[test]
    fn bad_frames_are_refused_without_panicking() {
        let cases: Vec<Frame> = vec![
            Frame::Text("not json".into()),
            Frame::Text("[1,2]".into()),
            Frame::Text(r#"{"header":{"msg_id":"a","msg_type":"x"},"channel":"iopub"}"#.into()),
            Frame::Text(r#"{"header":{"msg_id":"a","msg_type":"x"},"channel":"nope"}"#.into()),
            Frame::Text(r#"{"header":{"msg_id":"a","msg_type":"x"},"channel":7}"#.into()),
            Frame::Text(r#"{"header":{"msg_type":"x"},"channel":"shell"}"#.into()),
            Frame::Text(
                r#"{"header":{"msg_id":"a","msg_type":"x"},"content":[],"channel":"shell"}"#.into(),
            ),
            Frame::Binary(Bytes::new()),
            Frame::Binary(Bytes::from_static(b"\x00\x00\x00\x05")),
            Frame::Binary(Bytes::from_static(b"\xff\xff\xff\xff\x00\x00\x00\x00")),
            Frame::Binary(Bytes::from_static(b"\x00\x00\x00\x01\x00\x00\x00\x00")),
        ];
        for f in &cases {
            assert!(decode(Protocol::Legacy, f).is_err(), "{f:?}");
        }
        let v1_cases: Vec<Frame> = vec![
            Frame::Text("{}".into()),
            Frame::Binary(Bytes::new()),
            Frame::Binary(Bytes::from(u64::MAX.to_le_bytes().to_vec())),
            Frame::Binary(Bytes::from(
                [6u64.to_le_bytes(), 1000u64.to_le_bytes()].concat(),
            )),
            {
                // Offsets that run backwards.
                let mut b = 6u64.to_le_bytes().to_vec();
                for o in [56u64, 61, 60, 60, 60, 60] {
                    b.extend_from_slice(&o.to_le_bytes());
                }
                b.extend_from_slice(b"shell");
                Frame::Binary(b.into())
            },
        ];
        for f in &v1_cases {
            assert!(decode(Protocol::V1, f).is_err(), "{f:?}");
        }
    }
}
