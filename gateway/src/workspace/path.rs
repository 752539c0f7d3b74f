//! Workspace paths: relative, `/`-separated, normalised, and checked once at the edge. Anything
//! that could name a place outside the workspace (`..`, an absolute path, a backslash, NUL, a
//! control character) is refused, whatever encoding it arrived in: callers decode first, then
//! parse.

/// Why a path was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    /// A `..` segment.
    #[error("path {0:?} leaves the workspace (`..` is not allowed)")]
    Parent(String),
    /// A path with a forbidden character.
    #[error("path {0:?} contains a forbidden character (backslash, NUL or a control character)")]
    Character(String),
    /// Too long.
    #[error("path is longer than {MAX_PATH} bytes")]
    TooLong,
    /// A segment that is too long.
    #[error("a path segment is longer than {MAX_SEGMENT} bytes")]
    SegmentTooLong,
    /// Too deep.
    #[error("path is deeper than {MAX_DEPTH} folders")]
    TooDeep,
}

/// Longest path, bytes.
pub const MAX_PATH: usize = 1024;
/// Longest segment, bytes.
pub const MAX_SEGMENT: usize = 255;
/// Deepest path.
pub const MAX_DEPTH: usize = 32;

/// A checked workspace path; `""` is the root.
#[derive(
    Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
#[serde(try_from = "String", into = "String")]
pub struct WsPath(String);

impl TryFrom<String> for WsPath {
    type Error = PathError;
    fn try_from(s: String) -> Result<Self, PathError> {
        WsPath::parse(&s)
    }
}

impl From<WsPath> for String {
    fn from(p: WsPath) -> String {
        p.0
    }
}

impl std::fmt::Display for WsPath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl WsPath {
    /// The root folder.
    pub fn root() -> WsPath {
        WsPath(String::new())
    }

    /// Parses an already-decoded path. Leading and trailing `/`, empty and `.` segments are
    /// dropped (so `/a//./b/` is `a/b`); `..` is refused, not resolved.
    pub fn parse(s: &str) -> Result<WsPath, PathError> {
        if s.len() > MAX_PATH {
            return Err(PathError::TooLong);
        }
        if s.chars().any(|c| c == '\\' || c == '\0' || c.is_control()) {
            return Err(PathError::Character(s.to_owned()));
        }
        let mut parts = Vec::new();
        for seg in s.split('/') {
            match seg {
                "" | "." => {}
                ".." => return Err(PathError::Parent(s.to_owned())),
                seg if seg.len() > MAX_SEGMENT => return Err(PathError::SegmentTooLong),
                seg => parts.push(seg),
            }
        }
        if parts.len() > MAX_DEPTH {
            return Err(PathError::TooDeep);
        }
        Ok(WsPath(parts.join("/")))
    }

    /// The path as a string (`""` for the root).
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Whether this is the root.
    pub fn is_root(&self) -> bool {
        self.0.is_empty()
    }

    /// The last segment (`""` for the root).
    pub fn name(&self) -> &str {
        self.0.rsplit('/').next().unwrap_or("")
    }

    /// The parent folder (the root's parent is the root).
    pub fn parent(&self) -> WsPath {
        match self.0.rsplit_once('/') {
            Some((p, _)) => WsPath(p.to_owned()),
            None => WsPath::root(),
        }
    }

    /// `self/name`; `name` must be one valid segment.
    pub fn join(&self, name: &str) -> Result<WsPath, PathError> {
        if name.contains('/') {
            return Err(PathError::Character(name.to_owned()));
        }
        if self.is_root() {
            WsPath::parse(name)
        } else {
            WsPath::parse(&format!("{}/{name}", self.0))
        }
    }

    /// Whether `self` is `other` or inside it.
    pub fn starts_with(&self, other: &WsPath) -> bool {
        other.is_root() || self.0 == other.0 || self.0.starts_with(&format!("{}/", other.0))
    }

    /// Every ancestor folder, from the top (the root excluded).
    pub fn ancestors(&self) -> Vec<WsPath> {
        let mut out = Vec::new();
        let mut at = String::new();
        let segs: Vec<&str> = self.0.split('/').filter(|s| !s.is_empty()).collect();
        for seg in segs.iter().take(segs.len().saturating_sub(1)) {
            if !at.is_empty() {
                at.push('/');
            }
            at.push_str(seg);
            out.push(WsPath(at.clone()));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalises_and_refuses_traversal() {
        assert_eq!(WsPath::parse("/a//./b/").unwrap().as_str(), "a/b");
        assert_eq!(WsPath::parse("").unwrap(), WsPath::root());
        for bad in [
            "..",
            "a/../b",
            "../etc/passwd",
            "a/..",
            "a\\b",
            "a\0b",
            "a\nb",
        ] {
            assert!(WsPath::parse(bad).is_err(), "{bad:?}");
        }
        assert!(WsPath::parse(&"a/".repeat(40)).is_err());
        assert!(WsPath::parse(&"x".repeat(300)).is_err());
        // Dots inside a name are fine.
        assert_eq!(
            WsPath::parse("..data/.hidden/a..b").unwrap().as_str(),
            "..data/.hidden/a..b"
        );
    }

    #[test]
    fn parents_names_and_ancestors() {
        let p = WsPath::parse("a/b/c.txt").unwrap();
        assert_eq!(p.name(), "c.txt");
        assert_eq!(p.parent().as_str(), "a/b");
        assert_eq!(
            p.ancestors().iter().map(WsPath::as_str).collect::<Vec<_>>(),
            ["a", "a/b"]
        );
        assert!(p.starts_with(&WsPath::parse("a").unwrap()));
        assert!(
            !WsPath::parse("ab/c")
                .unwrap()
                .starts_with(&WsPath::parse("a").unwrap())
        );
        assert!(p.parent().join("../x").is_err());
    }
}
