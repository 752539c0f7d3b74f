//! Package indexes as data: project names (PEP 503 normalisation, validated so a name can never
//! become a path), wheel file names (PEP 427), and simple-index project pages in both forms,
//! PEP 691 JSON and PEP 503 HTML, parsed into [`IndexFile`]s.
//!
//! Everything here reads hostile text: a page is capped in bytes and in files, every URL is
//! resolved against the page and must be `http` or `https`, every file name is checked before it
//! is kept, and a file that does not belong to the project asked for is dropped (as pip does), so
//! an index cannot answer `humanize` with somebody else's wheel.

use std::collections::HashMap;

use url::Url;

/// Longest project name accepted (PyPI's longest names are well under this).
pub const MAX_NAME_LEN: usize = 128;
/// Longest file name accepted (a file name on the usual file systems).
pub const MAX_FILENAME_LEN: usize = 255;
/// Longest `requires-python` value kept; a file with a longer one is dropped.
pub const MAX_REQUIRES_PYTHON_LEN: usize = 512;
/// Longest yank reason kept (a longer one is cut).
pub const MAX_YANK_REASON_LEN: usize = 1024;
/// Longest URL kept; a file with a longer one is dropped.
pub const MAX_URL_LEN: usize = 4096;

/// Why a name or a page was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IndexError {
    /// Not a valid project name.
    #[error("{name:?} is not a valid package name: {why}")]
    BadName {
        /// The name as given (cut to a readable length).
        name: String,
        /// What is wrong with it.
        why: &'static str,
    },
    /// Not a valid wheel file name.
    #[error("{filename:?} is not a valid wheel file name: {why}")]
    BadWheelName {
        /// The file name as given (cut to a readable length).
        filename: String,
        /// What is wrong with it.
        why: &'static str,
    },
    /// The page is larger than the cap.
    #[error("the index page is larger than the cap of {cap} bytes")]
    PageTooLarge {
        /// The cap in bytes.
        cap: usize,
    },
    /// The page lists more files than the cap.
    #[error("the index page lists more than {cap} files")]
    TooManyFiles {
        /// The cap.
        cap: usize,
    },
    /// The page could not be read as a simple-index page.
    #[error("the index page could not be read: {0}")]
    BadPage(String),
    /// A PEP 691 page of an API version this reader does not know.
    #[error("the index speaks simple API version {0:?}; Sandgate reads version 1.x")]
    ApiVersion(String),
}

/// Cuts `s` to at most `n` bytes on a character boundary (for error messages and kept text).
fn cut(s: &str, n: usize) -> String {
    if s.len() <= n {
        return s.to_owned();
    }
    let mut end = n;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_owned()
}

/// A project name, validated and normalised (PEP 503: lower case, runs of `-`, `_`, `.` made one
/// `-`). Its text is only `[a-z0-9-]`, never empty, never starting or ending with `-`, so it is
/// safe as one path segment and one URL segment.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ProjectName(String);

impl ProjectName {
    /// Validates `raw` (ASCII letters, digits, `.`, `_`, `-`; starting and ending with a letter or
    /// digit; at most [`MAX_NAME_LEN`] bytes) and normalises it.
    pub fn parse(raw: &str) -> Result<ProjectName, IndexError> {
        let bad = |why| IndexError::BadName {
            name: cut(raw, 80),
            why,
        };
        if raw.is_empty() {
            return Err(bad("it is empty"));
        }
        if raw.len() > MAX_NAME_LEN {
            return Err(bad("it is longer than 128 characters"));
        }
        if !raw
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
        {
            return Err(bad(
                "only ASCII letters, digits, '.', '_' and '-' are allowed",
            ));
        }
        let (first, last) = (raw.as_bytes()[0], raw.as_bytes()[raw.len() - 1]);
        if !first.is_ascii_alphanumeric() || !last.is_ascii_alphanumeric() {
            return Err(bad("it must start and end with a letter or digit"));
        }
        let mut out = String::with_capacity(raw.len());
        let mut in_sep = false;
        for c in raw.chars() {
            if matches!(c, '.' | '_' | '-') {
                if !in_sep {
                    out.push('-');
                }
                in_sep = true;
            } else {
                out.push(c.to_ascii_lowercase());
                in_sep = false;
            }
        }
        Ok(ProjectName(out))
    }

    /// The normalised name.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for ProjectName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// A wheel file name (PEP 427): `{name}-{version}(-{build})?-{python}-{abi}-{platform}.whl`,
/// each part checked (no path separators, no characters outside its grammar).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct WheelName {
    /// The project, normalised.
    pub name: ProjectName,
    /// The version as written in the file name.
    pub version: String,
    /// The build tag, if any (starts with a digit).
    pub build: Option<String>,
    /// Python tags (`py3`, `cp315`; a compressed set such as `py2.py3` is split).
    pub python: Vec<String>,
    /// ABI tags (`none`, `abi3`, `cp315`).
    pub abi: Vec<String>,
    /// Platform tags (`any`, `manylinux_2_17_x86_64`).
    pub platform: Vec<String>,
}

fn tag_set(part: &str) -> Option<Vec<String>> {
    let tags: Vec<String> = part.split('.').map(str::to_owned).collect();
    tags.iter()
        .all(|t| !t.is_empty() && t.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_'))
        .then_some(tags)
}

impl WheelName {
    /// Parses and checks a wheel file name.
    pub fn parse(filename: &str) -> Result<WheelName, IndexError> {
        let bad = |why| IndexError::BadWheelName {
            filename: cut(filename, 120),
            why,
        };
        if filename.len() > MAX_FILENAME_LEN {
            return Err(bad("it is longer than 255 bytes"));
        }
        let Some(stem) = filename.strip_suffix(".whl") else {
            return Err(bad("it does not end in .whl"));
        };
        let parts: Vec<&str> = stem.split('-').collect();
        let (name, version, build, py, abi, plat) = match parts[..] {
            [n, v, p, a, pl] => (n, v, None, p, a, pl),
            [n, v, b, p, a, pl] => (n, v, Some(b), p, a, pl),
            _ => return Err(bad("it does not have five or six '-'-separated parts")),
        };
        let name = ProjectName::parse(name).map_err(|_| bad("its project name is not valid"))?;
        if version.is_empty()
            || version.len() > 64
            || !version.as_bytes()[0].is_ascii_alphanumeric()
            || !version
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'+' | b'!'))
        {
            return Err(bad("its version is not valid"));
        }
        if let Some(b) = build
            && (b.is_empty()
                || !b.as_bytes()[0].is_ascii_digit()
                || !b
                    .bytes()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'_')))
        {
            return Err(bad("its build tag is not valid"));
        }
        let (Some(python), Some(abi), Some(platform)) = (tag_set(py), tag_set(abi), tag_set(plat))
        else {
            return Err(bad("its tags are not valid"));
        };
        Ok(WheelName {
            name,
            version: version.to_owned(),
            build: build.map(str::to_owned),
            python,
            abi,
            platform,
        })
    }

    /// Whether this is a pure-Python wheel for Python 3: ABI `none`, platform `any`, and a Python
    /// tag `py3`, `py3N` or CPython's `cp3N` (so `py2.py3` counts). Whether it suits this exact
    /// interpreter is the resolver's question.
    pub fn is_pure(&self) -> bool {
        let py3 = |t: &str| {
            let digits = |rest: &str| rest.bytes().all(|b| b.is_ascii_digit());
            t == "py3"
                || t.strip_prefix("py3").is_some_and(digits)
                || t.strip_prefix("cp3")
                    .is_some_and(|rest| !rest.is_empty() && digits(rest))
        };
        self.abi.iter().any(|a| a == "none")
            && self.platform.iter().any(|p| p == "any")
            && self.python.iter().any(|t| py3(t))
    }

    /// The name the wheel's `.dist-info` folder must carry once normalised:
    /// `{normalised name}-{version}`, compared case-insensitively on the version.
    pub fn matches_dist_info(&self, dir: &str) -> bool {
        let Some(stem) = dir.strip_suffix(".dist-info") else {
            return false;
        };
        let Some((name, version)) = stem.split_once('-') else {
            return false;
        };
        ProjectName::parse(name).is_ok_and(|n| n == self.name)
            && version.eq_ignore_ascii_case(&self.version)
    }
}

/// What kind of file an index lists.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FileKind {
    /// A wheel, its name parsed.
    Wheel(WheelName),
    /// A source distribution (never installed; listed so the caller can say "only an sdist").
    Sdist {
        /// Its version, as the file name gives it.
        version: String,
    },
}

/// One file of a project, as its index lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IndexFile {
    /// The file name (checked: no separators, at most 255 bytes).
    pub filename: String,
    /// Wheel or sdist.
    pub kind: FileKind,
    /// Where it is: absolute, resolved against the page's URL, `http` or `https` (a `file` URL
    /// only for a local folder of wheels), without its fragment.
    pub url: Url,
    /// The SHA-256 the index gives, if any.
    pub sha256: Option<[u8; 32]>,
    /// `requires-python`, as the index gives it (the resolver parses it).
    pub requires_python: Option<String>,
    /// Whether the file is yanked (PEP 592).
    pub yanked: bool,
    /// The reason given for the yank, if any.
    pub yanked_reason: Option<String>,
    /// The size in bytes the index gives, if any.
    pub size: Option<u64>,
    /// PEP 658/714 metadata: `None` when the index has no metadata file, `Some(None)` when it
    /// has one without a SHA-256, `Some(Some(hash))` with one.
    pub core_metadata_sha256: Option<Option<[u8; 32]>>,
}

impl IndexFile {
    /// The wheel's parsed name, or `None` for an sdist.
    pub fn wheel(&self) -> Option<&WheelName> {
        match &self.kind {
            FileKind::Wheel(w) => Some(w),
            FileKind::Sdist { .. } => None,
        }
    }

    /// The version of this file.
    pub fn version(&self) -> &str {
        match &self.kind {
            FileKind::Wheel(w) => &w.version,
            FileKind::Sdist { version } => version,
        }
    }

    /// The host (and port) the file comes from, for messages; `local folder` for a `file` URL.
    pub fn host(&self) -> String {
        host_of(&self.url)
    }
}

/// A URL's host and port for messages.
pub fn host_of(url: &Url) -> String {
    match (url.host_str(), url.port()) {
        (Some(h), Some(p)) => format!("{h}:{p}"),
        (Some(h), None) => h.to_owned(),
        _ if url.scheme() == "file" => "local folder".to_owned(),
        _ => url.as_str().chars().take(60).collect(),
    }
}

/// Caps on one index page.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IndexLimits {
    /// Most bytes in one page (default 32 MiB; PyPI's largest pure-Python projects need a few).
    pub max_page_bytes: usize,
    /// Most files one page may list (default 50,000).
    pub max_files: usize,
}

impl Default for IndexLimits {
    fn default() -> Self {
        IndexLimits {
            max_page_bytes: 32 << 20,
            max_files: 50_000,
        }
    }
}

/// Whether `filename` is an sdist's name, and its stem if so.
fn sdist_stem(filename: &str) -> Option<&str> {
    const EXTS: [&str; 8] = [
        ".tar.gz", ".tar.bz2", ".tar.xz", ".zip", ".tgz", ".tbz", ".txz", ".tar",
    ];
    let lower = filename.to_ascii_lowercase();
    EXTS.iter()
        .find(|e| lower.ends_with(*e))
        .map(|e| &filename[..filename.len() - e.len()])
}

/// The version in an sdist's stem `{name}-{version}` whose name part normalises to `project`
/// (trying each `-`, since older names carry `-` themselves).
fn sdist_version(stem: &str, project: &ProjectName) -> Option<String> {
    for (i, _) in stem.match_indices('-') {
        let (name, version) = (&stem[..i], &stem[i + 1..]);
        if ProjectName::parse(name).is_ok_and(|n| &n == project)
            && !version.is_empty()
            && version.len() <= 64
            && version.as_bytes()[0].is_ascii_alphanumeric()
            && version
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'+' | b'!' | b'-'))
        {
            return Some(version.to_owned());
        }
    }
    None
}

/// Whether `filename` is safe as a file name at all: not empty, no separators, no NUL or control
/// characters, not `.` or `..`, at most [`MAX_FILENAME_LEN`] bytes.
pub fn safe_filename(filename: &str) -> bool {
    !filename.is_empty()
        && filename.len() <= MAX_FILENAME_LEN
        && filename != "."
        && filename != ".."
        && !filename
            .chars()
            .any(|c| c == '/' || c == '\\' || c.is_control())
}

/// The kind of a listed file of `project`, or `None` when it is neither a wheel nor an sdist of
/// that project (such files are dropped).
pub fn file_kind(filename: &str, project: &ProjectName) -> Option<FileKind> {
    if !safe_filename(filename) {
        return None;
    }
    if filename.ends_with(".whl") {
        let w = WheelName::parse(filename).ok()?;
        return (&w.name == project).then_some(FileKind::Wheel(w));
    }
    let stem = sdist_stem(filename)?;
    sdist_version(stem, project).map(|version| FileKind::Sdist { version })
}

/// Parses 64 hex digits.
pub fn parse_sha256(hex_text: &str) -> Option<[u8; 32]> {
    let mut out = [0u8; 32];
    (hex_text.len() == 64 && hex::decode_to_slice(hex_text, &mut out).is_ok()).then_some(out)
}

/// Resolves `href` against `base`, keeping it only if it is `http`/`https` and not too long;
/// returns the URL without its fragment and the fragment.
fn resolve(base: &Url, href: &str) -> Option<(Url, Option<String>)> {
    if href.len() > MAX_URL_LEN {
        return None;
    }
    let mut url = base.join(href.trim()).ok()?;
    if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
        return None;
    }
    let fragment = url.fragment().map(str::to_owned);
    url.set_fragment(None);
    Some((url, fragment))
}

/// A `requires-python` value kept only when it is plausible text.
fn requires_python(v: &str) -> Result<Option<String>, ()> {
    let v = v.trim();
    if v.is_empty() {
        return Ok(None);
    }
    if v.len() > MAX_REQUIRES_PYTHON_LEN || v.chars().any(char::is_control) {
        return Err(());
    }
    Ok(Some(v.to_owned()))
}

fn yank_reason(v: &str) -> Option<String> {
    let v: String = v.chars().filter(|c| !c.is_control()).collect();
    let v = v.trim();
    (!v.is_empty()).then(|| cut(v, MAX_YANK_REASON_LEN))
}

/// The file name of a URL: its last path segment, percent-decoded.
fn url_filename(url: &Url) -> Option<String> {
    let last = url.path_segments()?.next_back()?;
    let decoded = percent_decode(last)?;
    safe_filename(&decoded).then_some(decoded)
}

fn percent_decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let h = b.get(i + 1..i + 3)?;
            let mut byte = [0u8; 1];
            hex::decode_to_slice(h, &mut byte).ok()?;
            out.push(byte[0]);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// Parses a PEP 691 JSON project page (`application/vnd.pypi.simple.v1+json`) served at
/// `page_url`, keeping the wheels and sdists of `project`. Entries that cannot be read, point
/// outside `http`/`https`, or belong to another project are dropped; a page that is not JSON of
/// API version 1, or is over the caps, is an error.
pub fn parse_json(
    project: &ProjectName,
    page_url: &Url,
    body: &[u8],
    limits: &IndexLimits,
) -> Result<Vec<IndexFile>, IndexError> {
    if body.len() > limits.max_page_bytes {
        return Err(IndexError::PageTooLarge {
            cap: limits.max_page_bytes,
        });
    }
    #[derive(serde::Deserialize)]
    struct Meta {
        #[serde(rename = "api-version")]
        api_version: String,
    }
    #[derive(serde::Deserialize)]
    struct Page {
        meta: Meta,
        #[serde(default)]
        files: Vec<serde_json::Value>,
    }
    let page: Page =
        serde_json::from_slice(body).map_err(|e| IndexError::BadPage(e.to_string()))?;
    let major = page.meta.api_version.split('.').next().unwrap_or("");
    if major != "1" {
        return Err(IndexError::ApiVersion(cut(&page.meta.api_version, 20)));
    }
    if page.files.len() > limits.max_files {
        return Err(IndexError::TooManyFiles {
            cap: limits.max_files,
        });
    }
    let mut out = Vec::new();
    for f in &page.files {
        if let Some(file) = json_file(project, page_url, f) {
            out.push(file);
        }
    }
    Ok(out)
}

fn json_file(project: &ProjectName, page_url: &Url, f: &serde_json::Value) -> Option<IndexFile> {
    use serde_json::Value;
    let filename = f.get("filename")?.as_str()?;
    let kind = file_kind(filename, project)?;
    let (url, _) = resolve(page_url, f.get("url")?.as_str()?)?;
    let sha256 = match f.get("hashes").and_then(|h| h.get("sha256")) {
        Some(Value::String(h)) => parse_sha256(h),
        _ => None,
    };
    let requires_python = match f.get("requires-python") {
        Some(Value::String(v)) => requires_python(v).ok()?,
        _ => None,
    };
    let (yanked, yanked_reason) = match f.get("yanked") {
        Some(Value::Bool(b)) => (*b, None),
        Some(Value::String(s)) => (true, yank_reason(s)),
        _ => (false, None),
    };
    let size = f.get("size").and_then(Value::as_u64);
    // PEP 714: `core-metadata`, else the older `dist-info-metadata`.
    let meta = f
        .get("core-metadata")
        .or_else(|| f.get("dist-info-metadata"));
    let core_metadata_sha256 = match meta {
        Some(Value::Bool(true)) => Some(None),
        Some(Value::Object(hashes)) => Some(
            hashes
                .get("sha256")
                .and_then(Value::as_str)
                .and_then(parse_sha256),
        ),
        _ => None,
    };
    Some(IndexFile {
        filename: filename.to_owned(),
        kind,
        url,
        sha256,
        requires_python,
        yanked,
        yanked_reason,
        size,
        core_metadata_sha256,
    })
}

/// Parses a PEP 503 HTML project page served at `page_url`, keeping the wheels and sdists of
/// `project`: each `<a href>` (resolved against `page_url`, or against the page's first
/// `<base href>`), its `#sha256=` fragment, `data-requires-python`, `data-yanked`,
/// `data-core-metadata` (or the older `data-dist-info-metadata`). The file name is the URL's
/// last path segment, as pip takes it.
pub fn parse_html(
    project: &ProjectName,
    page_url: &Url,
    body: &[u8],
    limits: &IndexLimits,
) -> Result<Vec<IndexFile>, IndexError> {
    if body.len() > limits.max_page_bytes {
        return Err(IndexError::PageTooLarge {
            cap: limits.max_page_bytes,
        });
    }
    let text = std::str::from_utf8(body)
        .map_err(|_| IndexError::BadPage("the HTML page is not UTF-8".into()))?;
    let mut base = page_url.clone();
    let mut seen_base = false;
    let mut anchors = 0usize;
    let mut out = Vec::new();
    let mut tags = Tags { text, pos: 0 };
    while let Some(tag) = tags.next_tag() {
        match tag.name.as_str() {
            "base" if !seen_base => {
                seen_base = true;
                if let Some(href) = tag.attrs.get("href")
                    && let Ok(u) = page_url.join(href.trim())
                    && matches!(u.scheme(), "http" | "https")
                {
                    base = u;
                }
            }
            "a" => {
                anchors += 1;
                if anchors > limits.max_files {
                    return Err(IndexError::TooManyFiles {
                        cap: limits.max_files,
                    });
                }
                if let Some(file) = html_file(project, &base, &tag.attrs) {
                    out.push(file);
                }
            }
            _ => {}
        }
    }
    Ok(out)
}

fn html_file(
    project: &ProjectName,
    base: &Url,
    attrs: &HashMap<String, String>,
) -> Option<IndexFile> {
    let (url, fragment) = resolve(base, attrs.get("href")?)?;
    let filename = url_filename(&url)?;
    let kind = file_kind(&filename, project)?;
    let sha256 = fragment
        .as_deref()
        .and_then(|f| f.strip_prefix("sha256="))
        .and_then(parse_sha256);
    let requires_python = match attrs.get("data-requires-python") {
        Some(v) => requires_python(v).ok()?,
        None => None,
    };
    let yanked_attr = attrs.get("data-yanked");
    let meta = attrs
        .get("data-core-metadata")
        .or_else(|| attrs.get("data-dist-info-metadata"))
        .map(|v| v.trim());
    let core_metadata_sha256 = match meta {
        None | Some("false") => None,
        Some(v) => Some(v.strip_prefix("sha256=").and_then(parse_sha256)),
    };
    Some(IndexFile {
        filename,
        kind,
        url,
        sha256,
        requires_python,
        yanked: yanked_attr.is_some(),
        yanked_reason: yanked_attr.and_then(|r| yank_reason(r)),
        size: None,
        core_metadata_sha256,
    })
}

/// A start tag: its lower-cased name and attributes (first of each name wins, values
/// entity-decoded).
struct Tag {
    name: String,
    attrs: HashMap<String, String>,
}

/// A forgiving scanner of HTML start tags: enough for simple-index pages, linear in the input,
/// never failing (what it cannot read it skips).
struct Tags<'a> {
    text: &'a str,
    pos: usize,
}

impl Tags<'_> {
    fn next_tag(&mut self) -> Option<Tag> {
        let b = self.text.as_bytes();
        loop {
            let lt = self.pos + memchr::memchr(b'<', &b[self.pos..])?;
            self.pos = lt + 1;
            if self.text[self.pos..].starts_with("!--") {
                self.pos = match self.text[self.pos + 3..].find("-->") {
                    Some(i) => self.pos + 3 + i + 3,
                    None => b.len(),
                };
                continue;
            }
            let name_len = b[self.pos..]
                .iter()
                .take_while(|c| c.is_ascii_alphanumeric())
                .count();
            if name_len == 0 {
                // `</a>`, `<!DOCTYPE`, `<?xml`, a stray `<`: skip to the end of it.
                self.skip_to_gt();
                continue;
            }
            let name = self.text[self.pos..self.pos + name_len].to_ascii_lowercase();
            self.pos += name_len;
            let attrs = self.attributes();
            return Some(Tag { name, attrs });
        }
    }

    /// Moves past the next `>` outside quotes.
    fn skip_to_gt(&mut self) {
        let b = self.text.as_bytes();
        let mut quote = None;
        while self.pos < b.len() {
            let c = b[self.pos];
            self.pos += 1;
            match (quote, c) {
                (None, b'"' | b'\'') => quote = Some(c),
                (Some(q), c) if c == q => quote = None,
                (None, b'>') => return,
                _ => {}
            }
        }
    }

    /// Reads attributes up to and past the tag's `>`.
    fn attributes(&mut self) -> HashMap<String, String> {
        let b = self.text.as_bytes();
        let mut attrs = HashMap::new();
        loop {
            while self.pos < b.len() && (b[self.pos].is_ascii_whitespace() || b[self.pos] == b'/') {
                self.pos += 1;
            }
            if self.pos >= b.len() {
                return attrs;
            }
            if b[self.pos] == b'>' {
                self.pos += 1;
                return attrs;
            }
            let start = self.pos;
            while self.pos < b.len()
                && !b[self.pos].is_ascii_whitespace()
                && !matches!(b[self.pos], b'/' | b'>' | b'=')
            {
                self.pos += 1;
            }
            let name = self.text[start..self.pos].to_ascii_lowercase();
            while self.pos < b.len() && b[self.pos].is_ascii_whitespace() {
                self.pos += 1;
            }
            let mut value = String::new();
            if self.pos < b.len() && b[self.pos] == b'=' {
                self.pos += 1;
                while self.pos < b.len() && b[self.pos].is_ascii_whitespace() {
                    self.pos += 1;
                }
                if self.pos < b.len() && matches!(b[self.pos], b'"' | b'\'') {
                    let q = b[self.pos];
                    let vstart = self.pos + 1;
                    let end = memchr::memchr(q, &b[vstart..]).map_or(b.len(), |i| vstart + i);
                    value = decode_entities(&self.text[vstart..end]);
                    self.pos = (end + 1).min(b.len());
                } else {
                    let vstart = self.pos;
                    while self.pos < b.len()
                        && !b[self.pos].is_ascii_whitespace()
                        && b[self.pos] != b'>'
                    {
                        self.pos += 1;
                    }
                    value = decode_entities(&self.text[vstart..self.pos]);
                }
            }
            if !name.is_empty() {
                attrs.entry(name).or_insert(value);
            }
        }
    }
}

/// Decodes HTML character references: the five named XML ones and numeric ones. Anything else
/// stays as written.
fn decode_entities(s: &str) -> String {
    if !s.contains('&') {
        return s.to_owned();
    }
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find('&') {
        out.push_str(&rest[..i]);
        rest = &rest[i..];
        // Found among bytes, not `str` slices: a cut at 12 bytes may fall inside a character.
        let Some(semi) = memchr::memchr(b';', &rest.as_bytes()[..rest.len().min(12)]) else {
            out.push('&');
            rest = &rest[1..];
            continue;
        };
        let entity = &rest[1..semi];
        let decoded = match entity {
            "amp" => Some('&'),
            "lt" => Some('<'),
            "gt" => Some('>'),
            "quot" => Some('"'),
            "apos" => Some('\''),
            _ => entity
                .strip_prefix("#x")
                .or_else(|| entity.strip_prefix("#X"))
                .and_then(|h| u32::from_str_radix(h, 16).ok())
                .or_else(|| entity.strip_prefix('#').and_then(|d| d.parse().ok()))
                .and_then(char::from_u32),
        };
        match decoded {
            Some(c) => {
                out.push(c);
                rest = &rest[semi + 1..];
            }
            None => {
                out.push('&');
                rest = &rest[1..];
            }
        }
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> ProjectName {
        ProjectName::parse(s).unwrap()
    }

    #[test]
    fn names_normalise_and_never_become_paths() {
        assert_eq!(p("Foo.Bar__baz-_-Q").as_str(), "foo-bar-baz-q");
        assert_eq!(p("typing_extensions").as_str(), "typing-extensions");
        assert_eq!(p("A").as_str(), "a");
        for bad in [
            "", "..", ".", "-foo", "foo-", "_foo", "foo.", "a/b", "a\\b", "a b", "a\0b", "../etc",
            "ünï", "a:b", "%2e%2e",
        ] {
            assert!(ProjectName::parse(bad).is_err(), "{bad:?} was accepted");
        }
        assert!(ProjectName::parse(&"a".repeat(MAX_NAME_LEN)).is_ok());
        let err = ProjectName::parse(&"a".repeat(MAX_NAME_LEN + 1)).unwrap_err();
        assert!(err.to_string().contains("longer than 128"), "{err}");
    }

    #[test]
    fn wheel_names_parse_and_check() {
        let w = WheelName::parse("typing_extensions-4.12.2-py3-none-any.whl").unwrap();
        assert_eq!(w.name.as_str(), "typing-extensions");
        assert_eq!(w.version, "4.12.2");
        assert_eq!(w.build, None);
        assert!(w.is_pure());
        let w = WheelName::parse("six-1.16.0-1abc-py2.py3-none-any.whl").unwrap();
        assert_eq!(w.build.as_deref(), Some("1abc"));
        assert_eq!(w.python, ["py2", "py3"]);
        assert!(w.is_pure());
        assert!(
            WheelName::parse("x-1.0-cp315-none-any.whl")
                .unwrap()
                .is_pure()
        );
        assert!(
            WheelName::parse("x-1.0-py312-none-any.whl")
                .unwrap()
                .is_pure()
        );
        assert!(
            !WheelName::parse("x-1.0-py2-none-any.whl")
                .unwrap()
                .is_pure()
        );
        assert!(
            !WheelName::parse("x-1.0-cp315-cp315-manylinux_2_17_x86_64.whl")
                .unwrap()
                .is_pure()
        );
        assert!(
            !WheelName::parse("x-1.0-cp315-abi3-any.whl")
                .unwrap()
                .is_pure()
        );
        assert!(
            !WheelName::parse("x-1.0-py3-none-win_amd64.whl")
                .unwrap()
                .is_pure()
        );
        assert!(
            !WheelName::parse("x-1.0-pyx-none-any.whl")
                .unwrap()
                .is_pure()
        );
        for bad in [
            "x-1.0-py3-none-any.zip",
            "x-1.0-py3-none.whl",
            "x-1.0-1-2-py3-none-any.whl",
            "../x-1.0-py3-none-any.whl",
            "x-1.0/..-py3-none-any.whl",
            "x-1.0-py3-none-any/.whl",
            "x-1.0-py3-none-a\\y.whl",
            "x-1.0-abc-py3-none-any.whl",
            "x--py3-none-any.whl",
            "x-1.0-py3..py2-none-any.whl",
            "-1.0-py3-none-any.whl",
        ] {
            assert!(WheelName::parse(bad).is_err(), "{bad:?} was accepted");
        }
        let w = WheelName::parse("Foo_Bar-2.0-py3-none-any.whl").unwrap();
        assert!(w.matches_dist_info("foo_bar-2.0.dist-info"));
        assert!(w.matches_dist_info("Foo.Bar-2.0.dist-info"));
        assert!(!w.matches_dist_info("foo_bar-2.1.dist-info"));
        assert!(!w.matches_dist_info("other-2.0.dist-info"));
        assert!(!w.matches_dist_info("foo_bar-2.0.data"));
    }

    const SHA: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    #[test]
    fn json_pages_parse() {
        let page = Url::parse("https://pypi.example/simple/demo/").unwrap();
        let body = serde_json::json!({
            "meta": {"api-version": "1.1"},
            "name": "demo",
            "files": [
                {"filename": "demo-1.0-py3-none-any.whl", "url": "../../files/demo-1.0-py3-none-any.whl",
                 "hashes": {"sha256": SHA}, "requires-python": ">=3.8", "size": 1234,
                 "core-metadata": {"sha256": SHA}, "yanked": false},
                {"filename": "demo-0.9-py3-none-any.whl", "url": "https://files.example/demo-0.9-py3-none-any.whl",
                 "hashes": {"md5": "x"}, "yanked": "broken build", "dist-info-metadata": true},
                {"filename": "demo-0.9.tar.gz", "url": "demo-0.9.tar.gz", "hashes": {}},
                {"filename": "evil-1.0-py3-none-any.whl", "url": "evil-1.0-py3-none-any.whl", "hashes": {}},
                {"filename": "demo-1.1-py3-none-any.whl", "url": "file:///etc/passwd", "hashes": {}},
                {"filename": "demo-1.2-py3-none-any.whl", "url": "javascript:alert(1)", "hashes": {}},
                {"filename": "../demo-1.3-py3-none-any.whl", "url": "x", "hashes": {}},
                {"filename": 3, "url": "x"},
                "nonsense"
            ]
        });
        let files = parse_json(
            &p("demo"),
            &page,
            body.to_string().as_bytes(),
            &IndexLimits::default(),
        )
        .unwrap();
        assert_eq!(files.len(), 3, "{files:#?}");
        let f = &files[0];
        assert_eq!(
            f.url.as_str(),
            "https://pypi.example/files/demo-1.0-py3-none-any.whl"
        );
        assert_eq!(f.sha256, parse_sha256(SHA));
        assert_eq!(f.requires_python.as_deref(), Some(">=3.8"));
        assert_eq!(f.size, Some(1234));
        assert_eq!(f.core_metadata_sha256, Some(parse_sha256(SHA)));
        assert!(!f.yanked);
        let f = &files[1];
        assert_eq!(f.sha256, None);
        assert!(f.yanked);
        assert_eq!(f.yanked_reason.as_deref(), Some("broken build"));
        assert_eq!(f.core_metadata_sha256, Some(None));
        assert_eq!(
            files[2].kind,
            FileKind::Sdist {
                version: "0.9".into()
            }
        );
        assert_eq!(
            files[2].url.as_str(),
            "https://pypi.example/simple/demo/demo-0.9.tar.gz"
        );

        let v2 = br#"{"meta": {"api-version": "2.0"}, "files": []}"#;
        assert!(matches!(
            parse_json(&p("demo"), &page, v2, &IndexLimits::default()),
            Err(IndexError::ApiVersion(_))
        ));
        assert!(matches!(
            parse_json(&p("demo"), &page, b"<html>", &IndexLimits::default()),
            Err(IndexError::BadPage(_))
        ));
        let limits = IndexLimits {
            max_page_bytes: 1 << 20,
            max_files: 1,
        };
        assert_eq!(
            parse_json(&p("demo"), &page, body.to_string().as_bytes(), &limits),
            Err(IndexError::TooManyFiles { cap: 1 })
        );
        let limits = IndexLimits {
            max_page_bytes: 10,
            max_files: 1,
        };
        assert_eq!(
            parse_json(&p("demo"), &page, body.to_string().as_bytes(), &limits),
            Err(IndexError::PageTooLarge { cap: 10 })
        );
    }

    #[test]
    fn html_pages_parse() {
        let page = Url::parse("http://127.0.0.1:8000/simple/demo/").unwrap();
        let body = format!(
            r#"<!DOCTYPE html><html><head><title>Links for demo</title></head><body>
            <h1>Links for demo</h1>
            <!-- <a href="demo-9.9-py3-none-any.whl">commented out</a> -->
            <a href="/packages/demo-1.0-py3-none-any.whl#sha256={SHA}" data-requires-python="&gt;=3.8"
               data-core-metadata="sha256={SHA}">demo-1.0-py3-none-any.whl</a><br/>
            <A HREF='demo-0.9-py3-none-any.whl#md5=abc' data-yanked data-dist-info-metadata=true>x</A>
            <a href="demo-0.8-py3-none-any.whl" data-yanked="bad &amp; broken"
               data-dist-info-metadata="sha256=zz" data-core-metadata="false">y</a>
            <a href="demo%2D0.7-py3-none-any.whl">percent</a>
            <a href="demo-0.6.zip">sdist</a>
            <a href="file:///etc/demo-0.5-py3-none-any.whl">file</a>
            <a href="../../%2e%2e/demo-0.4-py3-none-any.whl">dots</a>
            <a href="evil-1.0-py3-none-any.whl">evil</a>
            <a href="sub/%2Fdemo-0.3-py3-none-any.whl">slash</a>
            <a>no href</a> <a href=unquoted-demo-0.1-py3-none-any.whl>bad name</a> <a href="
            </body></html>"#
        );
        let files =
            parse_html(&p("demo"), &page, body.as_bytes(), &IndexLimits::default()).unwrap();
        let names: Vec<&str> = files.iter().map(|f| f.filename.as_str()).collect();
        assert_eq!(
            names,
            [
                "demo-1.0-py3-none-any.whl",
                "demo-0.9-py3-none-any.whl",
                "demo-0.8-py3-none-any.whl",
                "demo-0.7-py3-none-any.whl",
                "demo-0.6.zip",
                "demo-0.4-py3-none-any.whl",
            ]
        );
        let f = &files[0];
        assert_eq!(
            f.url.as_str(),
            "http://127.0.0.1:8000/packages/demo-1.0-py3-none-any.whl"
        );
        assert_eq!(f.sha256, parse_sha256(SHA));
        assert_eq!(f.requires_python.as_deref(), Some(">=3.8"));
        assert_eq!(f.core_metadata_sha256, Some(parse_sha256(SHA)));
        assert!(!f.yanked);
        let f = &files[1];
        assert_eq!(f.sha256, None);
        assert!(f.yanked && f.yanked_reason.is_none());
        assert_eq!(f.core_metadata_sha256, Some(None));
        let f = &files[2];
        assert_eq!(f.yanked_reason.as_deref(), Some("bad & broken"));
        assert_eq!(
            f.core_metadata_sha256, None,
            "core-metadata=false wins over the old name"
        );
        // `..` in a URL stays inside the URL's path: it can never name a local path.
        assert_eq!(
            files[5].url.as_str(),
            "http://127.0.0.1:8000/demo-0.4-py3-none-any.whl"
        );

        let base = r#"<base href="https://mirror.example/pkgs/"><a href="demo-1.0-py3-none-any.whl">x</a>"#;
        let files =
            parse_html(&p("demo"), &page, base.as_bytes(), &IndexLimits::default()).unwrap();
        assert_eq!(
            files[0].url.as_str(),
            "https://mirror.example/pkgs/demo-1.0-py3-none-any.whl"
        );

        let many = "<a href=x>x</a>".repeat(3);
        let limits = IndexLimits {
            max_page_bytes: 1 << 20,
            max_files: 2,
        };
        assert_eq!(
            parse_html(&p("demo"), &page, many.as_bytes(), &limits),
            Err(IndexError::TooManyFiles { cap: 2 })
        );
        assert!(parse_html(&p("demo"), &page, b"\xff\xfe", &IndexLimits::default()).is_err());
    }

    #[test]
    fn entities_decode() {
        assert_eq!(decode_entities("&gt;=3.8, &lt;4"), ">=3.8, <4");
        assert_eq!(decode_entities("&#62;&#x3C;&amp;&bogus;&"), "><&&bogus;&");
        assert_eq!(decode_entities("&#xFFFFFFFFF;"), "&#xFFFFFFFFF;");
        // Found by the index_pages fuzz target: a multi-byte character within 12 bytes of `&`.
        assert_eq!(
            decode_entities("&e href=//a\u{78d}cd"),
            "&e href=//a\u{78d}cd"
        );
        assert_eq!(
            decode_entities("&&aaaaaaaaaa\u{78d};"),
            "&&aaaaaaaaaa\u{78d};"
        );
    }
}
