//! A kernel message's envelope: the few fields the gateway routes and acts by (ids, types, the
//! parent's id, a status's state, a reply's execution count), parsed once when the message
//! arrives and carried beside its frames, which are relayed as they came (zero-copy).
//!
//! Every step of the relay (the receiver's reordering, the executions' taps, the history
//! recorder, reply routing, the rate limiter, the WebSocket encoder) reads the envelope; none
//! parses the frames again. A message's content is parsed here only for the two fields above;
//! whoever needs more of it (the recorder, an execution) parses it where it is needed.
//!
//! The frames come from an untrusted kernel: a frame that is not JSON, a field that is missing
//! or of another type, any size, all give an envelope without that field, never a panic. Only
//! the fields kept are allocated; the rest of a frame is skipped as it is read.

use std::fmt;

use bytes::Bytes;
use sandgate_wire::RawMessage;
use serde::Deserialize;
use serde::de::{self, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde_json::Value;

/// The kernel's channels that carry messages (the heartbeat is the client's own business).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Channel {
    /// Requests and replies.
    Shell,
    /// Interrupt, shutdown and other requests that must not wait behind a cell.
    Control,
    /// `input_request` / `input_reply`.
    Stdin,
    /// Broadcast output and status.
    Iopub,
}

impl Channel {
    /// The name Jupyter's WebSocket protocols use.
    pub fn as_str(self) -> &'static str {
        match self {
            Channel::Shell => "shell",
            Channel::Control => "control",
            Channel::Stdin => "stdin",
            Channel::Iopub => "iopub",
        }
    }

    /// Parses a channel name; `None` for anything else.
    pub fn parse(name: &str) -> Option<Channel> {
        Some(match name {
            "shell" => Channel::Shell,
            "control" => Channel::Control,
            "stdin" => Channel::Stdin,
            "iopub" => Channel::Iopub,
            _ => return None,
        })
    }
}

/// A message type: the ones the gateway acts on, and any other by name.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum MsgType {
    /// `status`.
    Status,
    /// `execute_request`.
    ExecuteRequest,
    /// `execute_input`.
    ExecuteInput,
    /// `execute_result`.
    ExecuteResult,
    /// `execute_reply`.
    ExecuteReply,
    /// `stream`.
    Stream,
    /// `display_data`.
    DisplayData,
    /// `update_display_data`.
    UpdateDisplayData,
    /// `error`.
    Error,
    /// `clear_output`.
    ClearOutput,
    /// `shutdown_request`.
    ShutdownRequest,
    /// `interrupt_request`.
    InterruptRequest,
    /// Any other type, as named.
    Other(String),
    /// No type at all (the header is not JSON, or has no string `msg_type`).
    #[default]
    Missing,
}

impl MsgType {
    /// The type named `name` (an empty name is `Other("")`, as the header says).
    pub fn parse(name: &str) -> MsgType {
        match name {
            "status" => MsgType::Status,
            "execute_request" => MsgType::ExecuteRequest,
            "execute_input" => MsgType::ExecuteInput,
            "execute_result" => MsgType::ExecuteResult,
            "execute_reply" => MsgType::ExecuteReply,
            "stream" => MsgType::Stream,
            "display_data" => MsgType::DisplayData,
            "update_display_data" => MsgType::UpdateDisplayData,
            "error" => MsgType::Error,
            "clear_output" => MsgType::ClearOutput,
            "shutdown_request" => MsgType::ShutdownRequest,
            "interrupt_request" => MsgType::InterruptRequest,
            other => MsgType::Other(other.to_owned()),
        }
    }

    /// The type's name (empty when missing).
    pub fn as_str(&self) -> &str {
        match self {
            MsgType::Status => "status",
            MsgType::ExecuteRequest => "execute_request",
            MsgType::ExecuteInput => "execute_input",
            MsgType::ExecuteResult => "execute_result",
            MsgType::ExecuteReply => "execute_reply",
            MsgType::Stream => "stream",
            MsgType::DisplayData => "display_data",
            MsgType::UpdateDisplayData => "update_display_data",
            MsgType::Error => "error",
            MsgType::ClearOutput => "clear_output",
            MsgType::ShutdownRequest => "shutdown_request",
            MsgType::InterruptRequest => "interrupt_request",
            MsgType::Other(name) => name,
            MsgType::Missing => "",
        }
    }

    /// A reply (`*_reply`): it ends its request.
    pub fn is_reply(&self) -> bool {
        self.as_str().ends_with("_reply")
    }

    /// A request (`*_request`).
    pub fn is_request(&self) -> bool {
        self.as_str().ends_with("_request")
    }

    /// An output the iopub rate limit counts: streams, displays and results.
    pub fn is_rated_output(&self) -> bool {
        matches!(
            self,
            MsgType::Stream
                | MsgType::DisplayData
                | MsgType::UpdateDisplayData
                | MsgType::ExecuteResult
        )
    }
}

impl fmt::Display for MsgType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A `status` message's `execution_state`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExecState {
    /// `starting`.
    Starting,
    /// `busy`.
    Busy,
    /// `idle`.
    Idle,
    /// Any other value.
    Other,
}

/// What a message says about its parent: the request it answers or was caused by.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Parent {
    /// `parent_header.msg_id`.
    pub msg_id: Option<String>,
    /// `parent_header.msg_type`.
    pub msg_type: MsgType,
}

impl Parent {
    /// Parses a parent header frame (or a request's header, which becomes its children's
    /// parent header).
    pub fn parse(frame: &[u8]) -> Parent {
        // The parent of a message that answers nothing: no need to run the parser.
        if frame == b"{}" {
            return Parent::default();
        }
        let ids = read::<Ids>(frame).unwrap_or_default();
        Parent {
            msg_id: ids.msg_id,
            msg_type: ids
                .msg_type
                .as_deref()
                .map_or(MsgType::Missing, MsgType::parse),
        }
    }
}

/// The fields of a message the gateway acts on, parsed once (see the module's notes).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Envelope {
    /// `header.msg_id`.
    pub msg_id: Option<String>,
    /// `header.msg_type`.
    pub msg_type: MsgType,
    /// The parent's id and type.
    pub parent: Parent,
    /// For a `status` message: `content.execution_state`.
    pub state: Option<ExecState>,
    /// For an `execute_reply`: `content.execution_count`.
    pub execution_count: Option<u64>,
}

impl Envelope {
    /// Reads the envelope of `m`: its header and parent header, and its content only for a
    /// status's state or an execute reply's count.
    pub fn parse(m: &RawMessage) -> Envelope {
        let ids = read::<Ids>(&m.header).unwrap_or_default();
        let msg_type = ids
            .msg_type
            .as_deref()
            .map_or(MsgType::Missing, MsgType::parse);
        let mut envelope = Envelope {
            msg_id: ids.msg_id,
            parent: Parent::parse(&m.parent_header),
            state: None,
            execution_count: None,
            msg_type,
        };
        match envelope.msg_type {
            MsgType::Status => {
                let status = read::<StatusContent>(&m.content);
                envelope.state = status
                    .and_then(|s| s.execution_state)
                    .map(|s| match s.as_str() {
                        "starting" => ExecState::Starting,
                        "busy" => ExecState::Busy,
                        "idle" => ExecState::Idle,
                        _ => ExecState::Other,
                    });
            }
            MsgType::ExecuteReply => {
                envelope.execution_count =
                    read::<ReplyContent>(&m.content).and_then(|c| c.execution_count);
            }
            _ => {}
        }
        envelope
    }

    /// For a `status` about a request that gets a reply (its parent is a `*_request`): the
    /// state and the request's id. The receiver pairs replies with these.
    pub fn request_status(&self) -> Option<(ExecState, &str)> {
        if self.msg_type != MsgType::Status || !self.parent.msg_type.is_request() {
            return None;
        }
        Some((self.state?, self.parent.msg_id.as_deref()?))
    }
}

/// A kernel message on its way through the gateway: where it came from, its envelope, and its
/// frames as the kernel sent them.
#[derive(Debug, Clone)]
pub struct KernelMessage {
    /// The channel it came on.
    pub channel: Channel,
    /// What the gateway acts on, parsed once.
    pub envelope: Envelope,
    /// The frames, relayed as they came.
    pub raw: RawMessage,
}

impl KernelMessage {
    /// A message that arrived on `channel` (after its signature was checked), with its
    /// envelope read.
    pub fn parse(channel: Channel, raw: RawMessage) -> KernelMessage {
        KernelMessage {
            channel,
            envelope: Envelope::parse(&raw),
            raw,
        }
    }

    /// A message the gateway makes itself (a `status` on restart, a notice, `%%ask`'s
    /// outputs and replies), as a child of the request whose header is `parent_header`. Its
    /// envelope comes from what it is made of; only the parent header is read.
    pub fn made(
        channel: Channel,
        header: &Value,
        content: &Value,
        parent_header: Bytes,
    ) -> KernelMessage {
        let mut raw = crate::client::own_message(header, content);
        let parent = Parent::parse(&parent_header);
        raw.parent_header = parent_header;
        let msg_type = header["msg_type"]
            .as_str()
            .map_or(MsgType::Missing, MsgType::parse);
        let state = match msg_type {
            MsgType::Status => match content["execution_state"].as_str() {
                Some("starting") => Some(ExecState::Starting),
                Some("busy") => Some(ExecState::Busy),
                Some("idle") => Some(ExecState::Idle),
                Some(_) => Some(ExecState::Other),
                None => None,
            },
            _ => None,
        };
        let execution_count = match msg_type {
            MsgType::ExecuteReply => content["execution_count"].as_u64(),
            _ => None,
        };
        KernelMessage {
            channel,
            envelope: Envelope {
                msg_id: header["msg_id"].as_str().map(str::to_owned),
                msg_type,
                parent,
                state,
                execution_count,
            },
            raw,
        }
    }

    /// Makes it a child of another request: `header` is that request's header, `parent` what
    /// it says (parsed once by whoever holds it).
    pub fn reparent(&mut self, header: &Bytes, parent: &Parent) {
        self.raw.parent_header = header.clone();
        self.envelope.parent = parent.clone();
    }

    /// Its size in bytes, for the mailboxes' bounds.
    pub fn size(&self) -> usize {
        let m = &self.raw;
        m.header.len()
            + m.parent_header.len()
            + m.metadata.len()
            + m.content.len()
            + m.buffers.iter().map(|b| b.len()).sum::<usize>()
    }
}

/// Reads the fields of `T` from a frame that holds a JSON object (a derived `Deserialize`
/// would also take an array, by position); `None` for anything else.
fn read<'a, T: Deserialize<'a>>(frame: &'a [u8]) -> Option<T> {
    let first = frame.iter().find(|b| !b.is_ascii_whitespace());
    if first != Some(&b'{') {
        return None;
    }
    serde_json::from_slice(frame).ok()
}

/// The id and type of a header (or parent header).
#[derive(Default, Deserialize)]
struct Ids {
    #[serde(default, deserialize_with = "string_or_none")]
    msg_id: Option<String>,
    #[serde(default, deserialize_with = "string_or_none")]
    msg_type: Option<String>,
}

#[derive(Deserialize)]
struct StatusContent {
    #[serde(default, deserialize_with = "string_or_none")]
    execution_state: Option<String>,
}

#[derive(Deserialize)]
struct ReplyContent {
    #[serde(default, deserialize_with = "u64_or_none")]
    execution_count: Option<u64>,
}

/// A field that is kept only if it is a string: any other value (a number, an object however
/// large) is skipped as it is read, without failing the rest of the frame.
fn string_or_none<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    struct V;
    impl<'de> Visitor<'de> for V {
        type Value = Option<String>;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("any JSON value")
        }
        fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
            Ok(Some(v.to_owned()))
        }
        fn visit_string<E: de::Error>(self, v: String) -> Result<Self::Value, E> {
            Ok(Some(v))
        }
        fn visit_bool<E: de::Error>(self, _: bool) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_i64<E: de::Error>(self, _: i64) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_u64<E: de::Error>(self, _: u64) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_f64<E: de::Error>(self, _: f64) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
            while seq.next_element::<IgnoredAny>()?.is_some() {}
            Ok(None)
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
            while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
            Ok(None)
        }
    }
    d.deserialize_any(V)
}

/// A field that is kept only if it is a non-negative integer (see [`string_or_none`]).
fn u64_or_none<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    struct V;
    impl<'de> Visitor<'de> for V {
        type Value = Option<u64>;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("any JSON value")
        }
        fn visit_u64<E: de::Error>(self, v: u64) -> Result<Self::Value, E> {
            Ok(Some(v))
        }
        fn visit_i64<E: de::Error>(self, _: i64) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_f64<E: de::Error>(self, _: f64) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_bool<E: de::Error>(self, _: bool) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_str<E: de::Error>(self, _: &str) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
            while seq.next_element::<IgnoredAny>()?.is_some() {}
            Ok(None)
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
            while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
            Ok(None)
        }
    }
    d.deserialize_any(V)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn raw(header: &[u8], parent: &[u8], content: &[u8]) -> RawMessage {
        RawMessage {
            identities: Vec::new(),
            header: Bytes::copy_from_slice(header),
            parent_header: Bytes::copy_from_slice(parent),
            metadata: Bytes::from_static(b"{}"),
            content: Bytes::copy_from_slice(content),
            buffers: Vec::new(),
        }
    }

    #[test]
    fn a_reply_and_a_status_are_read_once_for_every_step() {
        let reply = Envelope::parse(&raw(
            br#"{"msg_id":"k1","msg_type":"execute_reply","session":"s","username":"u","date":"d","version":"5.3"}"#,
            br#"{"msg_id":"c1","msg_type":"execute_request","session":"cs"}"#,
            br#"{"status":"ok","execution_count":7,"user_expressions":{"x":{"data":[1,2,3]}}}"#,
        ));
        assert_eq!(reply.msg_id.as_deref(), Some("k1"));
        assert_eq!(reply.msg_type, MsgType::ExecuteReply);
        assert!(reply.msg_type.is_reply() && !reply.msg_type.is_request());
        assert_eq!(reply.parent.msg_id.as_deref(), Some("c1"));
        assert_eq!(reply.parent.msg_type, MsgType::ExecuteRequest);
        assert_eq!((reply.execution_count, reply.state), (Some(7), None));
        assert_eq!(reply.request_status(), None);

        let busy = Envelope::parse(&raw(
            br#"{"msg_id":"k2","msg_type":"status"}"#,
            br#"{"msg_id":"c1","msg_type":"kernel_info_request"}"#,
            br#"{"execution_state":"busy"}"#,
        ));
        assert_eq!(busy.request_status(), Some((ExecState::Busy, "c1")));
        // A status about something that is not a request (or about nothing) pairs with no reply.
        let starting = Envelope::parse(&raw(
            br#"{"msg_id":"k3","msg_type":"status"}"#,
            b"{}",
            br#"{"execution_state":"starting"}"#,
        ));
        assert_eq!(starting.state, Some(ExecState::Starting));
        assert_eq!(starting.parent, Parent::default());
        assert_eq!(starting.request_status(), None);
        let unknown_type = MsgType::parse("comm_msg");
        assert_eq!(unknown_type.as_str(), "comm_msg");
        assert!(MsgType::Stream.is_rated_output() && !MsgType::Error.is_rated_output());
    }

    #[test]
    fn hostile_frames_give_missing_fields_and_never_panic() {
        let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
        let nested_id = format!(r#"{{"msg_id":{deep},"msg_type":"stream"}}"#);
        let cases: Vec<(Vec<u8>, Option<&str>, MsgType)> = vec![
            (b"not json".to_vec(), None, MsgType::Missing),
            (Vec::new(), None, MsgType::Missing),
            (b"\xff\xfe{".to_vec(), None, MsgType::Missing),
            (br#"{"msg_id":"a""#.to_vec(), None, MsgType::Missing),
            // An array is not a header, even with the right values in the right places.
            (br#"["a","execute_reply"]"#.to_vec(), None, MsgType::Missing),
            (b"null".to_vec(), None, MsgType::Missing),
            // A field of another type is missing; the other field is still read.
            (
                br#"{"msg_id":5,"msg_type":"stream"}"#.to_vec(),
                None,
                MsgType::Stream,
            ),
            (
                br#"{"msg_id":"a","msg_type":{"nested":[1,{"x":null}]}}"#.to_vec(),
                Some("a"),
                MsgType::Missing,
            ),
            (
                br#"{"msg_id":null,"msg_type":null}"#.to_vec(),
                None,
                MsgType::Missing,
            ),
            (br#"{"other":"x"}"#.to_vec(), None, MsgType::Missing),
            // Escapes are decoded.
            (
                br#"{"msg_id":"\u0061","msg_type":"exec\u0075te_reply"}"#.to_vec(),
                Some("a"),
                MsgType::ExecuteReply,
            ),
            // Nested 100 000 deep: skipped without recursing (no stack overflow), the rest read.
            (nested_id.into_bytes(), None, MsgType::Stream),
        ];
        for (header, id, msg_type) in cases {
            let e = Envelope::parse(&raw(&header, &header, &header));
            let shown = String::from_utf8_lossy(&header[..header.len().min(60)]).into_owned();
            assert_eq!(e.msg_id.as_deref(), id, "{shown}");
            assert_eq!(e.msg_type, msg_type, "{shown}");
            assert_eq!(e.parent.msg_id.as_deref(), id, "{shown}");
        }
        // Huge frames are read through; only the fields kept are allocated.
        let pad = "x".repeat(8 << 20);
        let huge =
            format!(r#"{{"pad":"{pad}","list":[{pad:?}],"msg_id":"big","msg_type":"status"}}"#);
        let e = Envelope::parse(&raw(
            huge.as_bytes(),
            b"{}",
            format!(r#"{{"junk":"{pad}","execution_state":"idle"}}"#).as_bytes(),
        ));
        assert_eq!(e.msg_id.as_deref(), Some("big"));
        assert_eq!(e.state, Some(ExecState::Idle));
        // Content the envelope reads, malformed: the field is missing, nothing fails.
        for content in [
            &b"{not json"[..],
            br#"{"execution_count":"7"}"#,
            br#"{"execution_count":-1}"#,
            br#"{"execution_count":1.5}"#,
            br#"[7]"#,
        ] {
            let e = Envelope::parse(&raw(br#"{"msg_type":"execute_reply"}"#, b"{}", content));
            assert_eq!(
                e.execution_count,
                None,
                "{}",
                String::from_utf8_lossy(content)
            );
        }
        let e = Envelope::parse(&raw(
            br#"{"msg_type":"execute_reply"}"#,
            b"{}",
            br#"{"execution_count":18446744073709551615}"#,
        ));
        assert_eq!(e.execution_count, Some(u64::MAX));
        let e = Envelope::parse(&raw(
            br#"{"msg_type":"status"}"#,
            b"{}",
            br#"{"execution_state":"zombie"}"#,
        ));
        assert_eq!(e.state, Some(ExecState::Other));
    }

    #[test]
    fn a_message_the_gateway_makes_has_the_envelope_its_frames_would_give() {
        let parent = Bytes::from_static(br#"{"msg_id":"c9","msg_type":"execute_request"}"#);
        for (channel, msg_type, content) in [
            (Channel::Iopub, "status", json!({"execution_state": "idle"})),
            (
                Channel::Iopub,
                "stream",
                json!({"name": "stderr", "text": "x"}),
            ),
            (
                Channel::Shell,
                "execute_reply",
                json!({"status": "aborted", "execution_count": 3}),
            ),
        ] {
            let header = crate::client::header(msg_type, "session");
            let made = KernelMessage::made(channel, &header, &content, parent.clone());
            let parsed = KernelMessage::parse(channel, made.raw.clone());
            assert_eq!(made.envelope, parsed.envelope, "{msg_type}");
            assert_eq!(made.envelope.parent.msg_id.as_deref(), Some("c9"));
        }
        let mut m = KernelMessage::parse(
            Channel::Iopub,
            raw(
                br#"{"msg_id":"k","msg_type":"stream"}"#,
                br#"{"msg_id":"x"}"#,
                b"{}",
            ),
        );
        m.reparent(&parent, &Parent::parse(&parent));
        assert_eq!(m.envelope, Envelope::parse(&m.raw));
    }
}
