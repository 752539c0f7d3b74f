//! Guest paths, as envd's clients name them, mapped to the only two places a sandbox's files
//! are: its home folder (`/home/user`) and the user's workspace (`/workspace`).
//!
//! As envd does, a relative path is taken from the home folder (`a.txt` is `/home/user/a.txt`,
//! `~` is the home folder), and `.` and `..` are resolved on the text (Go's `filepath.Clean`),
//! so `..` can never climb above `/`. What is left must lie in one of the two places; anything
//! else (`/etc/passwd`, `/tmp`, `/`) is refused. The part inside is a [`WsPath`]: the workspace's
//! path rules (no control characters, no backslash, bounded length and depth). What this module
//! cannot see, symlinks, is handled where the path is used: every access goes through a cap-std
//! handle on the place, which never leaves it.

use crate::workspace::path::{PathError, WsPath};

/// The home folder as the guest sees it.
pub const HOME: &str = "/home/user";
/// The workspace as the guest sees it.
pub const WORKSPACE: &str = "/workspace";
/// Longest path accepted, bytes (before resolving).
const MAX_RAW: usize = 4096;

/// Which of the sandbox's two places.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Root {
    /// `/home/user`: the sandbox's own folder, gone when it ends.
    Home,
    /// `/workspace`: the user's encrypted workspace, which outlives it.
    Workspace,
}

impl Root {
    /// Its guest path.
    pub fn guest(self) -> &'static str {
        match self {
            Root::Home => HOME,
            Root::Workspace => WORKSPACE,
        }
    }
}

/// A checked guest path: a place and a path inside it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestPath {
    /// The place.
    pub root: Root,
    /// The path inside it (`""` for the place itself).
    pub rel: WsPath,
}

/// Why a guest path was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GuestPathError {
    /// It resolves outside the sandbox's files.
    #[error(
        "{0:?} is outside this sandbox's files: Sandgate's sandboxes have files only in \
         /home/user (the sandbox's own) and /workspace (your encrypted workspace)"
    )]
    Outside(String),
    /// The part inside breaks the path rules.
    #[error("invalid path {path:?}: {reason}")]
    Invalid {
        /// The path as given.
        path: String,
        /// The rule it breaks.
        reason: PathError,
    },
    /// Too long to look at.
    #[error("the path is longer than {MAX_RAW} bytes")]
    TooLong,
}

impl GuestPathError {
    /// Whether the path is outside the sandbox's files (permission denied) rather than
    /// malformed (invalid argument).
    pub fn is_outside(&self) -> bool {
        matches!(self, GuestPathError::Outside(_))
    }
}

impl GuestPath {
    /// Parses a path as a client sent it (see the module's text).
    pub fn parse(raw: &str) -> Result<GuestPath, GuestPathError> {
        if raw.len() > MAX_RAW {
            return Err(GuestPathError::TooLong);
        }
        // A NUL or control character is refused whole, before anything is resolved.
        let invalid = |reason| GuestPathError::Invalid {
            path: raw.to_owned(),
            reason,
        };
        if raw.chars().any(|c| c == '\0' || c.is_control()) {
            return Err(invalid(PathError::Character(raw.to_owned())));
        }
        let absolute = if raw == "~" {
            HOME.to_owned()
        } else if let Some(rest) = raw.strip_prefix("~/") {
            format!("{HOME}/{rest}")
        } else if raw.starts_with('/') {
            raw.to_owned()
        } else {
            format!("{HOME}/{raw}")
        };
        let mut parts: Vec<&str> = Vec::new();
        for seg in absolute.split('/') {
            match seg {
                "" | "." => {}
                ".." => {
                    parts.pop();
                }
                seg => parts.push(seg),
            }
        }
        let (root, inside) = match parts.as_slice() {
            ["home", "user", rest @ ..] => (Root::Home, rest),
            ["workspace", rest @ ..] => (Root::Workspace, rest),
            _ => return Err(GuestPathError::Outside(format!("/{}", parts.join("/")))),
        };
        let rel = WsPath::parse(&inside.join("/")).map_err(invalid)?;
        Ok(GuestPath { root, rel })
    }

    /// The guest path (`/home/user/a/b.txt`).
    pub fn guest(&self) -> String {
        if self.rel.is_root() {
            self.root.guest().to_owned()
        } else {
            format!("{}/{}", self.root.guest(), self.rel)
        }
    }

    /// The last segment (`user` or `workspace` for a place itself).
    pub fn name(&self) -> &str {
        if self.rel.is_root() {
            self.root.guest().rsplit('/').next().unwrap_or_default()
        } else {
            self.rel.name()
        }
    }

    /// Whether this is a place itself (which cannot be removed or moved).
    pub fn is_root(&self) -> bool {
        self.rel.is_root()
    }

    /// The path for a cap-std call on the place (`.` for the place itself).
    pub fn local(&self) -> &str {
        if self.rel.is_root() {
            "."
        } else {
            self.rel.as_str()
        }
    }

    /// `self/name` (one segment).
    pub fn join(&self, name: &str) -> Result<GuestPath, GuestPathError> {
        let rel = self
            .rel
            .join(name)
            .map_err(|reason| GuestPathError::Invalid {
                path: format!("{}/{name}", self.guest()),
                reason,
            })?;
        Ok(GuestPath {
            root: self.root,
            rel,
        })
    }

    /// The folder holding it (a place's own parent is not one of the places: `None`).
    pub fn parent(&self) -> Option<GuestPath> {
        (!self.rel.is_root()).then(|| GuestPath {
            root: self.root,
            rel: self.rel.parent(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn guest(raw: &str) -> String {
        GuestPath::parse(raw).unwrap().guest()
    }

    #[test]
    fn the_two_places_and_relative_paths() {
        assert_eq!(guest("/home/user/a.txt"), "/home/user/a.txt");
        assert_eq!(guest("a.txt"), "/home/user/a.txt");
        assert_eq!(guest("./d//e/"), "/home/user/d/e");
        assert_eq!(guest("~"), "/home/user");
        assert_eq!(guest("~/x"), "/home/user/x");
        // Only `~` and `~/` are the home (as envd): `~root` is a name like any other.
        assert_eq!(guest("~root/x"), "/home/user/~root/x");
        assert_eq!(guest(""), "/home/user");
        assert_eq!(guest("/workspace"), "/workspace");
        assert_eq!(guest("/workspace/out/r.csv"), "/workspace/out/r.csv");
        let p = GuestPath::parse("/workspace/out/r.csv").unwrap();
        assert_eq!(p.root, Root::Workspace);
        assert_eq!(p.rel.as_str(), "out/r.csv");
        assert_eq!(p.name(), "r.csv");
        assert_eq!(p.local(), "out/r.csv");
        assert_eq!(p.parent().unwrap().guest(), "/workspace/out");
        let home = GuestPath::parse("/home/user").unwrap();
        assert!(home.is_root() && home.parent().is_none());
        assert_eq!(home.local(), ".");
        assert_eq!(home.name(), "user");
        assert_eq!(home.join("b").unwrap().guest(), "/home/user/b");
        assert!(home.join("../b").is_err());
    }

    #[test]
    fn dot_dot_resolves_on_the_text_and_never_leaves() {
        assert_eq!(guest("/home/user/a/../b"), "/home/user/b");
        assert_eq!(guest("/workspace/a/../../home/user/x"), "/home/user/x");
        for outside in [
            "../etc/passwd",
            "/home/user/../../etc/passwd",
            "/home/user/..",
            "/workspace/../../../../",
            "../../../../../../../../etc/shadow",
            "/etc/passwd",
            "/",
            "/tmp/x",
            "/home",
            "/home/other/x",
            "/workspaces/x",
            "/home/username",
        ] {
            let e = GuestPath::parse(outside).unwrap_err();
            assert!(e.is_outside(), "{outside:?}: {e}");
        }
        // Whatever the `..`s, the resolved path names `/` at most: never a host path.
        let e = GuestPath::parse("/home/user/../../../../../../etc").unwrap_err();
        assert_eq!(e, GuestPathError::Outside("/etc".into()));
    }

    #[test]
    fn malformed_paths_are_invalid_not_outside() {
        for bad in [
            "/home/user/a\0b",
            "/home/user/a\nb",
            "/workspace/a\\b",
            "\u{7f}",
        ] {
            let e = GuestPath::parse(bad).unwrap_err();
            assert!(!e.is_outside(), "{bad:?}");
        }
        assert_eq!(
            GuestPath::parse(&"a/".repeat(3000)),
            Err(GuestPathError::TooLong)
        );
        assert!(GuestPath::parse(&format!("/home/user/{}", "d/".repeat(40))).is_err());
        assert!(GuestPath::parse(&format!("/home/user/{}", "x".repeat(300))).is_err());
    }
}
