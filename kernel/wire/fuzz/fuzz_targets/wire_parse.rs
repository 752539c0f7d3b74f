//! The ZeroMQ multipart parser on hostile frames: it must never panic, and whatever it accepts
//! must be what was signed.
#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use sandgate_wire::{DELIMITER, Signer, parse, parse_raw, serialize_raw};

/// Splits the input into frames at each 0xFF byte, so the fuzzer controls the frame layout.
fn frames(data: &[u8]) -> Vec<Bytes> {
    data.split(|b| *b == 0xFF).map(Bytes::copy_from_slice).collect()
}

fuzz_target!(|data: &[u8]| {
    let signer = Signer::new(b"fuzz-key");
    let _ = parse(frames(data), &signer);
    if let Ok(raw) = parse_raw(frames(data), &Signer::new(b"")) {
        // Unsigned mode accepted it; re-signing and parsing with a key must round-trip.
        let signed = serialize_raw(&raw, &signer);
        let back = parse_raw(signed, &signer).expect("a message the signer signed parses");
        assert_eq!(back.content, raw.content);
        assert_eq!(back.header, raw.header);
    }
    // A delimiter followed by junk is refused, never accepted unsigned.
    let mut with_delim = vec![Bytes::from_static(DELIMITER)];
    with_delim.extend(frames(data));
    let _ = parse_raw(with_delim, &signer);
});
