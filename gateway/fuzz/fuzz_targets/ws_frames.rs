//! The WebSocket decoders (legacy JSON text, legacy binary, v1 binary) on hostile bytes: never
//! a panic, and an accepted message always has a channel it may go to and a usable header.
#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use sandgate::client::Channel;
use sandgate::http::frames::{Frame, Protocol, decode};

fuzz_target!(|data: &[u8]| {
    let binary = Frame::Binary(Bytes::copy_from_slice(data));
    let text = Frame::Text(String::from_utf8_lossy(data).into_owned());
    for protocol in [Protocol::Legacy, Protocol::V1] {
        for frame in [&binary, &text] {
            if let Ok(m) = decode(protocol, frame) {
                assert_ne!(m.channel, Channel::Iopub, "clients never send on iopub");
                assert!(!m.msg_id.is_empty() && !m.msg_type.as_str().is_empty());
                let header: serde_json::Value = serde_json::from_slice(&m.message.header).expect("a valid header");
                for key in ["msg_id", "msg_type", "username", "session", "date", "version"] {
                    assert!(header[key].is_string(), "{key}");
                }
            }
        }
    }
});
