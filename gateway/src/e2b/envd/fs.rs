//! File operations on one of a sandbox's places, through a cap-std handle on it: every path is
//! resolved inside the place, and a symlink the guest planted that points out of it (`x ->
//! /etc/passwd`, `d -> ../..`) makes the call fail instead of leaving. Everything here blocks:
//! callers run it off the async threads.

use std::io::Write;
use std::time::SystemTime;

use cap_std::fs::{Dir, Metadata, MetadataExt, OpenOptions};
use serde_json::{Map, Value, json};

use super::connect::{Code, ConnectError};
use super::paths::GuestPath;
use crate::workspace::live::TEMP_SUFFIX;

/// Why a file operation failed, in words for the user.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FsError {
    /// Nothing there.
    #[error("{0}")]
    NotFound(String),
    /// Something is there already.
    #[error("{0}")]
    AlreadyExists(String),
    /// A folder was needed.
    #[error("{0}")]
    NotADirectory(String),
    /// A file was needed.
    #[error("{0}")]
    IsADirectory(String),
    /// Outside the sandbox's files, or not to be touched.
    #[error("{0}")]
    Denied(String),
    /// The request does not make sense.
    #[error("{0}")]
    Invalid(String),
    /// The disk quota is full.
    #[error("{0}")]
    NoSpace(String),
    /// The request body is over the upload cap.
    #[error("{0}")]
    TooLarge(String),
    /// Not available now.
    #[error("{0}")]
    Unavailable(String),
    /// The file system failed.
    #[error("{0}")]
    Io(String),
}

impl FsError {
    /// The Connect error of it.
    pub fn connect(&self) -> ConnectError {
        let code = match self {
            FsError::NotFound(_) => Code::NotFound,
            FsError::AlreadyExists(_) => Code::AlreadyExists,
            FsError::NotADirectory(_) | FsError::IsADirectory(_) | FsError::Invalid(_) => {
                Code::InvalidArgument
            }
            FsError::Denied(_) => Code::PermissionDenied,
            FsError::NoSpace(_) | FsError::TooLarge(_) => Code::ResourceExhausted,
            FsError::Unavailable(_) => Code::Unavailable,
            FsError::Io(_) => Code::Internal,
        };
        ConnectError::new(code, self.to_string())
    }

    /// The HTTP status of it (`/files`).
    pub fn status(&self) -> http::StatusCode {
        use http::StatusCode as S;
        match self {
            FsError::NotFound(_) => S::NOT_FOUND,
            FsError::AlreadyExists(_) => S::CONFLICT,
            FsError::NotADirectory(_) | FsError::IsADirectory(_) | FsError::Invalid(_) => {
                S::BAD_REQUEST
            }
            FsError::Denied(_) => S::FORBIDDEN,
            FsError::NoSpace(_) => S::INSUFFICIENT_STORAGE,
            FsError::TooLarge(_) => S::PAYLOAD_TOO_LARGE,
            FsError::Unavailable(_) => S::SERVICE_UNAVAILABLE,
            FsError::Io(_) => S::INTERNAL_SERVER_ERROR,
        }
    }

    /// An I/O error on `path`, as envd would say it.
    pub fn io(e: &std::io::Error, path: &GuestPath) -> FsError {
        use std::io::ErrorKind as K;
        let p = path.guest();
        match e.kind() {
            K::NotFound => FsError::NotFound(format!("no such file or folder: {p}")),
            K::AlreadyExists => FsError::AlreadyExists(format!("{p} exists already")),
            K::NotADirectory => {
                FsError::NotADirectory(format!("{p}: a part of the path is a file, not a folder"))
            }
            K::IsADirectory => FsError::IsADirectory(format!("{p} is a folder")),
            K::DirectoryNotEmpty => FsError::Invalid(format!("the folder {p} is not empty")),
            K::PermissionDenied => FsError::Denied(format!(
                "permission denied: {p} (a symbolic link that leads outside this sandbox's \
                 files is not followed)"
            )),
            K::StorageFull | K::QuotaExceeded | K::FileTooLarge => {
                FsError::NoSpace(format!("no space left for {p}"))
            }
            K::InvalidInput | K::InvalidFilename => {
                FsError::Invalid(format!("{p} is not a valid path here"))
            }
            _ => FsError::Io(format!("{p}: {e}")),
        }
    }
}

/// What a file or folder is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A regular file.
    File,
    /// A folder.
    Dir,
    /// A symbolic link whose target is not inside the place (or is missing).
    Symlink,
}

impl Kind {
    fn of(meta: &Metadata) -> Option<Kind> {
        if meta.is_dir() {
            Some(Kind::Dir)
        } else if meta.is_file() {
            Some(Kind::File)
        } else if meta.is_symlink() {
            Some(Kind::Symlink)
        } else {
            None
        }
    }

    /// The proto3 JSON name of `filesystem.FileType`.
    fn proto(self) -> &'static str {
        match self {
            Kind::File => "FILE_TYPE_FILE",
            Kind::Dir => "FILE_TYPE_DIRECTORY",
            Kind::Symlink => "FILE_TYPE_SYMLINK",
        }
    }
}

/// One file or folder, as envd's `filesystem.EntryInfo`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// Its guest path.
    pub path: GuestPath,
    /// What it is (a symlink's target's kind, when the target is inside the place).
    pub kind: Kind,
    /// Whether the entry itself is a symlink.
    pub is_symlink: bool,
    /// What a symlink says.
    pub symlink_target: Option<String>,
    /// Bytes.
    pub size: u64,
    /// Permission bits.
    pub mode: u32,
    /// Last modified.
    pub modified: Option<SystemTime>,
}

impl Entry {
    /// The proto3 JSON of `filesystem.EntryInfo` (camelCase names, int64 as a string).
    pub fn to_json(&self) -> Value {
        let mut m = Map::new();
        m.insert("name".into(), self.path.name().into());
        m.insert("type".into(), self.kind.proto().into());
        m.insert("path".into(), self.path.guest().into());
        m.insert("size".into(), self.size.to_string().into());
        m.insert("mode".into(), self.mode.into());
        m.insert("permissions".into(), self.permissions().into());
        m.insert("owner".into(), "user".into());
        m.insert("group".into(), "user".into());
        if let Some(t) = self.modified {
            let t: chrono::DateTime<chrono::Utc> = t.into();
            m.insert(
                "modifiedTime".into(),
                t.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true)
                    .into(),
            );
        }
        if let Some(target) = &self.symlink_target {
            m.insert("symlinkTarget".into(), target.clone().into());
        }
        if self.is_symlink {
            m.insert("isSymlink".into(), true.into());
        }
        Value::Object(m)
    }

    /// `-rw-r--r--`, `drwxr-xr-x`, `Lrwxrwxrwx`, as Go's `FileMode.String` (envd's).
    fn permissions(&self) -> String {
        let mut s = String::with_capacity(10);
        s.push(if self.is_symlink {
            'L'
        } else if self.kind == Kind::Dir {
            'd'
        } else {
            '-'
        });
        for shift in [6, 3, 0] {
            let bits = (self.mode >> shift) & 7;
            s.push(if bits & 4 != 0 { 'r' } else { '-' });
            s.push(if bits & 2 != 0 { 'w' } else { '-' });
            s.push(if bits & 1 != 0 { 'x' } else { '-' });
        }
        s
    }
}

/// The entry at `path` (a symlink is described, and its target's kind given when the target
/// is inside the place; it is never followed out).
pub fn stat(dir: &Dir, path: &GuestPath) -> Result<Entry, FsError> {
    let meta = dir
        .symlink_metadata(path.local())
        .map_err(|e| FsError::io(&e, path))?;
    entry(dir, path, &meta)
}

fn entry(dir: &Dir, path: &GuestPath, meta: &Metadata) -> Result<Entry, FsError> {
    let Some(kind) = Kind::of(meta) else {
        return Err(FsError::Invalid(format!(
            "{} is not a file, a folder or a symbolic link",
            path.guest()
        )));
    };
    let mut e = Entry {
        path: path.clone(),
        kind,
        is_symlink: false,
        symlink_target: None,
        size: meta.len(),
        mode: meta.mode() & 0o7777,
        modified: meta.modified().ok().map(|t| t.into_std()),
    };
    if kind == Kind::Symlink {
        e.is_symlink = true;
        e.symlink_target = dir
            .read_link_contents(path.local())
            .ok()
            .map(|t| t.to_string_lossy().into_owned());
        // Followed inside the place only: a target outside stays a plain symlink.
        if let Ok(target) = dir.metadata(path.local())
            && let Some(k @ (Kind::File | Kind::Dir)) = Kind::of(&target)
        {
            e.kind = k;
        }
    }
    Ok(e)
}

/// The entries under folder `path`, `depth` levels down (1: its children), in a walk's order
/// (each folder before what it holds, names sorted). Symlinked folders are not walked into.
/// More than `max` entries is an error.
pub fn list(dir: &Dir, path: &GuestPath, depth: u32, max: usize) -> Result<Vec<Entry>, FsError> {
    let top = stat(dir, path)?;
    if top.kind != Kind::Dir {
        return Err(FsError::NotADirectory(format!(
            "{} is not a folder",
            path.guest()
        )));
    }
    let handle = if path.is_root() {
        dir.try_clone().map_err(|e| FsError::io(&e, path))?
    } else {
        dir.open_dir(path.local())
            .map_err(|e| FsError::io(&e, path))?
    };
    let mut out = Vec::new();
    walk(&handle, path, depth.max(1), max, &mut out)?;
    Ok(out)
}

fn walk(
    handle: &Dir,
    at: &GuestPath,
    depth: u32,
    max: usize,
    out: &mut Vec<Entry>,
) -> Result<(), FsError> {
    let mut names: Vec<String> = handle
        .entries()
        .map_err(|e| FsError::io(&e, at))?
        .flatten()
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| !n.ends_with(TEMP_SUFFIX))
        .collect();
    names.sort();
    for name in names {
        let Ok(path) = at.join(&name) else {
            continue; // A name the path rules refuse (a control character): not shown.
        };
        let Ok(meta) = handle.symlink_metadata(&name) else {
            continue; // Gone meanwhile.
        };
        let Ok(e) = entry(handle, &path, &meta) else {
            continue; // A socket or a device: not a file envd shows.
        };
        if out.len() >= max {
            return Err(FsError::Invalid(format!(
                "{} holds more than {max} entries at this depth; list a folder further down \
                 or with a smaller depth",
                at.guest()
            )));
        }
        let walk_into = depth > 1 && e.kind == Kind::Dir && !e.is_symlink;
        let child = e.path.clone();
        out.push(e);
        if walk_into && let Ok(sub) = handle.open_dir(&name) {
            walk(&sub, &child, depth - 1, max, out)?;
        }
    }
    Ok(())
}

/// Makes folder `path` and its parents. An existing folder is `AlreadyExists` (as envd).
pub fn make_dir(dir: &Dir, path: &GuestPath) -> Result<Entry, FsError> {
    match dir.symlink_metadata(path.local()) {
        Ok(m) if m.is_dir() => {
            return Err(FsError::AlreadyExists(format!(
                "the folder {} exists already",
                path.guest()
            )));
        }
        Ok(_) => {
            return Err(FsError::AlreadyExists(format!(
                "{} exists already and is not a folder",
                path.guest()
            )));
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(FsError::io(&e, path)),
    }
    dir.create_dir_all(path.local())
        .map_err(|e| FsError::io(&e, path))?;
    stat(dir, path)
}

/// Removes `path`: a file or a symlink (never what it points to), or a folder with all it holds.
pub fn remove(dir: &Dir, path: &GuestPath) -> Result<(), FsError> {
    if path.is_root() {
        return Err(FsError::Denied(format!(
            "{} itself cannot be removed (what it holds can)",
            path.guest()
        )));
    }
    let meta = dir
        .symlink_metadata(path.local())
        .map_err(|e| FsError::io(&e, path))?;
    let done = if meta.is_dir() {
        dir.remove_dir_all(path.local())
    } else {
        dir.remove_file(path.local())
    };
    done.map_err(|e| FsError::io(&e, path))
}

/// Moves `from` to `to` (same place; `to`'s folders are made). A file at `to` is replaced.
pub fn rename(dir: &Dir, from: &GuestPath, to: &GuestPath) -> Result<Entry, FsError> {
    if from.is_root() || to.is_root() {
        return Err(FsError::Denied(format!(
            "{} cannot be moved or replaced",
            if from.is_root() { from } else { to }.guest()
        )));
    }
    if to.rel.starts_with(&from.rel) && to.rel != from.rel {
        return Err(FsError::Invalid(format!(
            "{} cannot be moved into itself",
            from.guest()
        )));
    }
    dir.symlink_metadata(from.local())
        .map_err(|e| FsError::io(&e, from))?;
    if let Some(parent) = to.parent()
        && !parent.is_root()
    {
        dir.create_dir_all(parent.local())
            .map_err(|e| FsError::io(&e, &parent))?;
    }
    dir.rename(from.local(), dir, to.local())
        .map_err(|e| FsError::io(&e, to))?;
    stat(dir, to)
}

/// Opens file `path` for reading; returns it and its size.
pub fn open_read(dir: &Dir, path: &GuestPath) -> Result<(std::fs::File, u64), FsError> {
    let file = dir.open(path.local()).map_err(|e| FsError::io(&e, path))?;
    let meta = file.metadata().map_err(|e| FsError::io(&e, path))?;
    if meta.is_dir() {
        return Err(FsError::IsADirectory(format!(
            "{} is a folder, not a file",
            path.guest()
        )));
    }
    if !meta.is_file() {
        return Err(FsError::Invalid(format!(
            "{} is not a regular file",
            path.guest()
        )));
    }
    Ok((file.into_std(), meta.len()))
}

/// Bytes (blocks on disk) and entries under the place, symlinks not followed; counting stops
/// past `max_files` entries.
pub fn usage(dir: &Dir, max_files: u64) -> (u64, u64) {
    let (mut bytes, mut files) = (0u64, 0u64);
    let mut stack: Vec<Dir> = dir.try_clone().into_iter().collect();
    while let Some(d) = stack.pop() {
        let Ok(entries) = d.entries() else {
            continue;
        };
        for e in entries.flatten() {
            let Ok(meta) = e.metadata() else {
                continue;
            };
            files += 1;
            bytes += meta.blocks() * 512;
            if files > max_files {
                return (bytes, files);
            }
            if meta.is_dir()
                && let Ok(sub) = e.open_dir()
            {
                stack.push(sub);
            }
        }
    }
    (bytes, files)
}

/// A file being uploaded: written beside its target under a temporary name (which listings
/// and the workspace sync skip), then renamed into place, so nobody sees half of it.
pub struct Upload {
    dir: Dir,
    tmp: String,
    target: GuestPath,
    file: Option<std::fs::File>,
    /// Bytes written so far.
    pub written: u64,
}

impl Upload {
    /// Starts writing `target` (its folders are made; a folder there is an error).
    pub fn begin(dir: &Dir, target: &GuestPath) -> Result<Upload, FsError> {
        if target.is_root() {
            return Err(FsError::IsADirectory(format!(
                "{} is a folder, not a file",
                target.guest()
            )));
        }
        match dir.symlink_metadata(target.local()) {
            Ok(m) if m.is_dir() => {
                return Err(FsError::IsADirectory(format!(
                    "{} is a folder, not a file",
                    target.guest()
                )));
            }
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(FsError::io(&e, target)),
        }
        let parent = target.parent().unwrap_or_else(|| target.clone());
        if !parent.is_root() {
            dir.create_dir_all(parent.local())
                .map_err(|e| FsError::io(&e, &parent))?;
        }
        let tag = &uuid::Uuid::new_v4().simple().to_string()[..12];
        let tmp_name = format!(".upload-{tag}{TEMP_SUFFIX}");
        let tmp = if parent.is_root() {
            tmp_name
        } else {
            format!("{}/{tmp_name}", parent.local())
        };
        let file = dir
            .open_with(&tmp, OpenOptions::new().write(true).create_new(true))
            .map_err(|e| FsError::io(&e, target))?
            .into_std();
        Ok(Upload {
            dir: dir.try_clone().map_err(|e| FsError::io(&e, target))?,
            tmp,
            target: target.clone(),
            file: Some(file),
            written: 0,
        })
    }

    /// The file's guest path.
    pub fn target(&self) -> &GuestPath {
        &self.target
    }

    /// Appends `data`.
    pub fn write(&mut self, data: &[u8]) -> Result<(), FsError> {
        let Some(file) = self.file.as_mut() else {
            return Err(FsError::Io("the upload was already finished".into()));
        };
        file.write_all(data)
            .map_err(|e| FsError::io(&e, &self.target))?;
        self.written += data.len() as u64;
        Ok(())
    }

    /// Puts the file in place (replacing a file or a symlink there, never writing through it).
    pub fn commit(mut self) -> Result<(), FsError> {
        let Some(file) = self.file.take() else {
            return Err(FsError::Io("the upload was already finished".into()));
        };
        drop(file);
        self.dir
            .rename(&self.tmp, &self.dir, self.target.local())
            .map_err(|e| FsError::io(&e, &self.target))
    }
}

impl Drop for Upload {
    fn drop(&mut self) {
        // Not committed: the partial file goes.
        if self.file.take().is_some() {
            let _ = self.dir.remove_file(&self.tmp);
        }
    }
}

/// `{"name", "type", "path"}` of an uploaded file, as envd's `/files` answers.
pub fn written_json(path: &GuestPath) -> Value {
    json!({"name": path.name(), "type": "file", "path": path.guest()})
}

#[cfg(test)]
mod tests {
    use super::*;
    use cap_std::ambient_authority;

    fn place() -> (tempfile::TempDir, Dir) {
        let t = tempfile::tempdir().unwrap();
        let d = Dir::open_ambient_dir(t.path(), ambient_authority()).unwrap();
        (t, d)
    }

    fn p(s: &str) -> GuestPath {
        GuestPath::parse(s).unwrap()
    }

    #[test]
    fn write_stat_list_move_remove() {
        let (_t, d) = place();
        let mut up = Upload::begin(&d, &p("a/b/c.txt")).unwrap();
        up.write(b"hello").unwrap();
        // Not there until committed, and the partial file is not listed.
        assert!(matches!(
            stat(&d, &p("a/b/c.txt")),
            Err(FsError::NotFound(_))
        ));
        assert!(list(&d, &p("a/b"), 1, 100).unwrap().is_empty());
        up.commit().unwrap();
        let e = stat(&d, &p("a/b/c.txt")).unwrap();
        assert_eq!((e.kind, e.size), (Kind::File, 5));
        let j = e.to_json();
        assert_eq!(j["type"], "FILE_TYPE_FILE");
        assert_eq!(j["path"], "/home/user/a/b/c.txt");
        assert_eq!(j["size"], "5");
        assert!(j["permissions"].as_str().unwrap().starts_with("-rw"));
        assert!(j["modifiedTime"].as_str().unwrap().ends_with('Z'));
        let all: Vec<String> = list(&d, &p("~"), 3, 100)
            .unwrap()
            .iter()
            .map(|e| e.path.guest())
            .collect();
        assert_eq!(
            all,
            ["/home/user/a", "/home/user/a/b", "/home/user/a/b/c.txt"]
        );
        assert_eq!(list(&d, &p("~"), 1, 100).unwrap().len(), 1);
        assert!(matches!(list(&d, &p("~"), 3, 2), Err(FsError::Invalid(_))));
        assert!(matches!(
            list(&d, &p("a/b/c.txt"), 1, 10),
            Err(FsError::NotADirectory(_))
        ));
        assert!(matches!(
            make_dir(&d, &p("a")),
            Err(FsError::AlreadyExists(_))
        ));
        assert_eq!(make_dir(&d, &p("x/y")).unwrap().kind, Kind::Dir);
        let moved = rename(&d, &p("a/b/c.txt"), &p("z/c2.txt")).unwrap();
        assert_eq!(moved.path.guest(), "/home/user/z/c2.txt");
        assert!(matches!(
            rename(&d, &p("a"), &p("a/inner")),
            Err(FsError::Invalid(_))
        ));
        remove(&d, &p("a")).unwrap();
        assert!(matches!(remove(&d, &p("a")), Err(FsError::NotFound(_))));
        assert!(matches!(remove(&d, &p("~")), Err(FsError::Denied(_))));
        let (bytes, files) = usage(&d, 100);
        assert!(bytes > 0 && files == 4, "{bytes} {files}");
    }

    #[test]
    fn an_upload_that_is_not_committed_leaves_nothing() {
        let (t, d) = place();
        let mut up = Upload::begin(&d, &p("f.bin")).unwrap();
        up.write(&[1; 100]).unwrap();
        drop(up);
        assert_eq!(std::fs::read_dir(t.path()).unwrap().count(), 0);
        // A folder in the way is refused before anything is written.
        make_dir(&d, &p("dir")).unwrap();
        assert!(matches!(
            Upload::begin(&d, &p("dir")),
            Err(FsError::IsADirectory(_))
        ));
    }

    #[test]
    fn symlinks_out_of_the_place_are_never_followed() {
        let (t, d) = place();
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(outside.path().join("secret"), b"host secret").unwrap();
        std::os::unix::fs::symlink(outside.path().join("secret"), t.path().join("abs")).unwrap();
        std::os::unix::fs::symlink("../../../../../../etc/passwd", t.path().join("rel")).unwrap();
        std::os::unix::fs::symlink(outside.path(), t.path().join("dirlink")).unwrap();
        std::fs::write(t.path().join("inside.txt"), b"ok").unwrap();
        std::os::unix::fs::symlink("inside.txt", t.path().join("good")).unwrap();
        for bad in ["abs", "rel", "dirlink/secret"] {
            let e = open_read(&d, &p(bad)).unwrap_err();
            assert!(matches!(e, FsError::Denied(_)), "{bad}: {e:?}");
        }
        // Writing through a folder symlink is refused; nothing lands outside.
        let e = Upload::begin(&d, &p("dirlink/new.txt"))
            .map(|_| ())
            .unwrap_err();
        assert!(matches!(e, FsError::Denied(_)), "{e:?}");
        assert!(!outside.path().join("new.txt").exists());
        assert!(matches!(
            make_dir(&d, &p("dirlink/sub")),
            Err(FsError::AlreadyExists(_) | FsError::Denied(_))
        ));
        assert!(matches!(
            list(&d, &p("dirlink"), 1, 10),
            Err(FsError::NotADirectory(_) | FsError::Denied(_))
        ));
        // A symlink inside is followed; escaping ones are listed as symlinks, not followed.
        let (mut f, n) = open_read(&d, &p("good")).unwrap();
        let mut s = String::new();
        std::io::Read::read_to_string(&mut f, &mut s).unwrap();
        assert_eq!((s.as_str(), n), ("ok", 2));
        let abs = stat(&d, &p("abs")).unwrap();
        assert!(abs.is_symlink && abs.kind == Kind::Symlink);
        assert_eq!(stat(&d, &p("good")).unwrap().kind, Kind::File);
        // Writing over a symlink replaces the link; its target is untouched.
        let mut up = Upload::begin(&d, &p("abs")).unwrap();
        up.write(b"mine").unwrap();
        up.commit().unwrap();
        assert_eq!(
            std::fs::read(outside.path().join("secret")).unwrap(),
            b"host secret"
        );
        assert_eq!(std::fs::read(t.path().join("abs")).unwrap(), b"mine");
        // Removing a symlink to a folder removes the link only.
        remove(&d, &p("dirlink")).unwrap();
        assert!(outside.path().join("secret").exists());
    }
}
