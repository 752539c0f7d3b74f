//! Wheels (zip archives) on hostile bytes: never a panic; a refused wheel leaves nothing behind,
//! and an accepted one writes exactly the plain files its manifest lists, inside the destination.
#![no_main]

use std::io::Cursor;
use std::path::Path;

use libfuzzer_sys::fuzz_target;
use sandgate::packages::index::WheelName;
use sandgate::packages::wheel::{WheelLimits, read_metadata_reader, unpack_reader};

/// Every path under `dir`, relative, with `/`; panics on anything but plain files and folders.
fn walk(dir: &Path, prefix: &str, out: &mut Vec<String>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let e = e.unwrap();
        let name = e.file_name().into_string().unwrap();
        let rel = if prefix.is_empty() { name } else { format!("{prefix}/{name}") };
        let t = e.file_type().unwrap();
        assert!(!t.is_symlink(), "a symlink was written: {rel}");
        if t.is_dir() {
            walk(&e.path(), &rel, out);
        } else {
            assert!(t.is_file(), "not a plain file: {rel}");
            out.push(rel);
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let name = WheelName::parse("demo-1.0-py3-none-any.whl").unwrap();
    let limits = WheelLimits {
        max_files: 64,
        max_unpacked_bytes: 1 << 20,
        max_ratio: 50,
        ratio_floor: 4096,
        max_metadata_bytes: 64 << 10,
    };
    let _ = read_metadata_reader(Cursor::new(data), &name, &limits);
    let scratch = std::env::temp_dir().join(format!("sandgate-fuzz-wheel-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&scratch);
    std::fs::create_dir_all(&scratch).unwrap();
    let dest = scratch.join("out");
    match unpack_reader(Cursor::new(data), &name, &dest, &limits) {
        Ok(m) => {
            let mut found = Vec::new();
            walk(&dest, "", &mut found);
            found.sort();
            let listed: Vec<&str> = m.files.iter().map(|f| f.path.as_str()).collect();
            assert_eq!(found, listed);
            for f in &m.files {
                assert_eq!(std::fs::metadata(dest.join(&f.path)).unwrap().len(), f.size);
            }
            assert!(m.total_bytes() <= limits.max_unpacked_bytes);
        }
        Err(_) => assert!(!dest.exists(), "a refused wheel left its folder"),
    }
    // Nothing beside the destination.
    let beside: Vec<_> = std::fs::read_dir(&scratch).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert!(beside.iter().all(|n| n == "out"), "{beside:?}");
    std::fs::remove_dir_all(&scratch).unwrap();
});
