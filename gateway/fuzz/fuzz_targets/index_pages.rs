//! Simple-index project pages (PEP 691 JSON and PEP 503 HTML) on hostile bytes: never a panic,
//! and every file kept belongs to the project asked for, has a plain file name, an absolute
//! http(s) URL without a fragment, and bounded text.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sandgate::packages::index::{
    FileKind, IndexLimits, MAX_REQUIRES_PYTHON_LEN, MAX_YANK_REASON_LEN, ProjectName, parse_html,
    parse_json, safe_filename,
};

fuzz_target!(|data: &[u8]| {
    let project = ProjectName::parse("demo").unwrap();
    let page = url::Url::parse("https://index.example/simple/demo/").unwrap();
    let limits = IndexLimits { max_page_bytes: 1 << 20, max_files: 200 };
    for parsed in [
        parse_json(&project, &page, data, &limits),
        parse_html(&project, &page, data, &limits),
    ] {
        let Ok(files) = parsed else { continue };
        assert!(files.len() <= limits.max_files);
        for f in files {
            assert!(safe_filename(&f.filename), "{:?}", f.filename);
            assert!(matches!(f.url.scheme(), "http" | "https"), "{}", f.url);
            assert!(f.url.host_str().is_some() && f.url.fragment().is_none(), "{}", f.url);
            match &f.kind {
                FileKind::Wheel(w) => assert_eq!(w.name, project),
                FileKind::Sdist { version } => assert!(!version.is_empty()),
            }
            if let Some(r) = &f.requires_python {
                assert!(r.len() <= MAX_REQUIRES_PYTHON_LEN && !r.chars().any(char::is_control));
            }
            if let Some(r) = &f.yanked_reason {
                assert!(f.yanked && r.len() <= MAX_YANK_REASON_LEN);
            }
        }
    }
});
