//! Project names and wheel file names on hostile text: never a panic; an accepted name is one
//! safe path segment (`[a-z0-9-]`, no leading or trailing `-`, no `--`), normalising is
//! idempotent, and an accepted wheel name is a plain file name whose parts hold no separator.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sandgate::packages::index::{MAX_NAME_LEN, ProjectName, WheelName, safe_filename};

fn check_name(n: &ProjectName) {
    let s = n.as_str();
    assert!(!s.is_empty() && s.len() <= MAX_NAME_LEN, "{s:?}");
    assert!(s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-'), "{s:?}");
    assert!(!s.starts_with('-') && !s.ends_with('-') && !s.contains("--"), "{s:?}");
    assert_eq!(ProjectName::parse(s).as_ref(), Ok(n), "normalising twice changed {s:?}");
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    if let Ok(n) = ProjectName::parse(text) {
        check_name(&n);
    }
    if let Ok(w) = WheelName::parse(text) {
        assert!(safe_filename(text), "{text:?}");
        check_name(&w.name);
        let parts = [&w.version]
            .into_iter()
            .chain(w.build.iter())
            .chain(w.python.iter())
            .chain(w.abi.iter())
            .chain(w.platform.iter());
        for p in parts {
            assert!(!p.is_empty(), "{text:?}");
            assert!(!p.contains(['/', '\\', '-', '\0']), "{text:?}: {p:?}");
        }
        let _ = w.is_pure();
    }
});
