//! Contents API paths: whatever the client sends (any encoding), a path the workspace accepts
//! never names anything outside it.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sandgate::http::routes::{Route, route};
use sandgate::workspace::path::WsPath;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let url = format!("/api/contents/{text}");
    let Ok(Route::Contents(raw) | Route::Checkpoints(raw) | Route::Checkpoint(raw, _)) =
        route(&http::Method::GET, &url).or_else(|_| route(&http::Method::POST, &url))
    else {
        return;
    };
    if let Ok(p) = WsPath::parse(&raw) {
        let s = p.as_str();
        assert!(!s.starts_with('/'), "absolute: {s:?}");
        assert!(s.split('/').all(|seg| seg != ".." && seg != "." ), "dot segment: {s:?}");
        assert!(!s.contains('\\') && !s.contains('\0'), "separator or NUL: {s:?}");
        assert!(s.split('/').all(|seg| !seg.is_empty()) || s.is_empty(), "empty segment: {s:?}");
    }
});
