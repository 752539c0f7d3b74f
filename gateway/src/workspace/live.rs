//! A workspace's live folder: the plaintext copy kernels see at `/workspace`, kept only in
//! memory (a tmpfs such as `/dev/shm`), and the sync between it and the encrypted store.
//!
//! The folder is shared with sandboxed code, so the gateway treats it as hostile: every access
//! goes through a capability handle (`cap-std`), which resolves paths inside the folder and
//! never follows a symlink out of it, and the scan skips symlinks and special files entirely.
//! A guest that plants `data -> /etc` cannot make the gateway read or write `/etc`.

use std::collections::HashMap;
use std::io::Read;
use std::path::Path;

use cap_std::ambient_authority;
use cap_std::fs::Dir;

use super::path::WsPath;
use super::store::{Kind, Store, StoreError};

/// The suffix of the gateway's own temporary files in a live folder (never saved).
pub const TEMP_SUFFIX: &str = ".sandgate-partial";

/// Most entries a scan looks at (a flood of files stops the scan, it does not stall it).
pub const MAX_SCAN: usize = 50_000;

/// What a scan saw of one path: enough to tell whether it changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Seen {
    /// File or folder.
    pub kind: Kind,
    /// Bytes.
    pub size: u64,
    /// Modification time, ns since the epoch.
    pub mtime: i128,
}

/// Paths → what was seen at the last sync.
pub type Snapshot = HashMap<WsPath, Seen>;

/// What one sync did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct SyncReport {
    /// Files stored.
    pub saved: Vec<WsPath>,
    /// Paths removed from the store.
    pub removed: Vec<WsPath>,
    /// Files that could not be stored, and why (quota, a name that is not a valid path).
    pub refused: Vec<(String, String)>,
}

/// Errors of the live folder.
#[derive(Debug, thiserror::Error)]
pub enum LiveError {
    /// A file-system call failed.
    #[error("live workspace folder: {0}")]
    Io(#[from] std::io::Error),
    /// The store refused.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Opens the live folder as a capability.
pub fn open(dir: &Path) -> std::io::Result<Dir> {
    std::fs::create_dir_all(dir)?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
    }
    Dir::open_ambient_dir(dir, ambient_authority())
}

fn mtime_ns(meta: &cap_std::fs::Metadata) -> i128 {
    meta.modified()
        .ok()
        .and_then(|t| t.into_std().duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_nanos() as i128)
}

/// Walks the live folder: regular files and folders only, symlinks and the rest skipped.
/// Names that are not valid workspace paths are reported, not followed.
pub fn scan(dir: &Dir) -> (Snapshot, Vec<(String, String)>) {
    let mut walked = walk(dir, MAX_SCAN, usize::MAX);
    if let Some(at) = walked.stopped_at {
        walked.skipped.push((
            at,
            format!("more than {MAX_SCAN} entries; the rest were not saved"),
        ));
    }
    (walked.seen, walked.skipped)
}

/// Most entries [`unchanged_since`] looks at. On tmpfs a look is about a microsecond, so the
/// check is cheap enough to run on a runtime worker, before a cell's reply.
pub const QUICK_SCAN: usize = 64;

/// Whether a small live folder is as `previous` saw it, told by a scan of at most
/// [`QUICK_SCAN`] entries: then a sync has nothing to do, and this is what it would report
/// (the paths it skips). `None` if something changed, or the folder is too big to tell.
pub fn unchanged_since(dir: &Dir, previous: &Snapshot) -> Option<Vec<(String, String)>> {
    if previous.len() > QUICK_SCAN {
        return None;
    }
    let walked = walk(dir, usize::MAX, QUICK_SCAN);
    (walked.stopped_at.is_none() && walked.seen == *previous).then_some(walked.skipped)
}

/// What [`walk`] saw.
struct Walked {
    seen: Snapshot,
    skipped: Vec<(String, String)>,
    /// Where it stopped, if it reached a limit.
    stopped_at: Option<String>,
}

/// Walks the folder until it has kept `max_kept` paths or looked at `max_looked` entries.
fn walk(dir: &Dir, max_kept: usize, max_looked: usize) -> Walked {
    let mut out = Walked {
        seen: Snapshot::new(),
        skipped: Vec::new(),
        stopped_at: None,
    };
    let mut looked = 0usize;
    let mut stack: Vec<(WsPath, Option<Dir>)> = vec![(WsPath::root(), dir.try_clone().ok())];
    while let Some((at, handle)) = stack.pop() {
        let Some(handle) = handle else { continue };
        let Ok(entries) = handle.entries() else {
            continue;
        };
        for entry in entries.flatten() {
            looked += 1;
            if out.seen.len() >= max_kept || looked > max_looked {
                out.stopped_at = Some(at.to_string());
                return out;
            }
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.ends_with(TEMP_SUFFIX) {
                continue;
            }
            let Ok(path) = at.join(&name) else {
                out.skipped
                    .push((format!("{at}/{name}"), "not a valid workspace path".into()));
                continue;
            };
            let Ok(meta) = handle.symlink_metadata(&name) else {
                continue;
            };
            let ft = meta.file_type();
            if ft.is_symlink() {
                out.skipped
                    .push((path.to_string(), "symbolic links are not saved".into()));
            } else if ft.is_dir() {
                out.seen.insert(
                    path.clone(),
                    Seen {
                        kind: Kind::Dir,
                        size: 0,
                        mtime: 0,
                    },
                );
                // `open_dir` resolves inside `handle` only: even if `name` became a symlink
                // since it was checked, cap-std refuses to leave the live folder.
                stack.push((path, handle.open_dir(&name).ok()));
            } else if ft.is_file() {
                out.seen.insert(
                    path,
                    Seen {
                        kind: Kind::File,
                        size: meta.len(),
                        mtime: mtime_ns(&meta),
                    },
                );
            } else {
                out.skipped
                    .push((path.to_string(), "not a regular file".into()));
            }
        }
    }
    out
}

/// Reads one file of the live folder (at most `limit` bytes; a file that grew past it is
/// refused rather than cut).
fn read_file(dir: &Dir, path: &WsPath, limit: u64) -> std::io::Result<Vec<u8>> {
    let mut f = dir.open(path.as_str())?;
    let mut data = Vec::new();
    (&mut f).take(limit + 1).read_to_end(&mut data)?;
    if data.len() as u64 > limit {
        return Err(std::io::Error::other(
            "the file is over the workspace quota",
        ));
    }
    Ok(data)
}

/// Stores what changed in the live folder since `previous`, and removes from the store what
/// disappeared from it. Returns the new snapshot and a report.
pub fn sync_to_store(dir: &Dir, store: &Store, previous: &Snapshot) -> (Snapshot, SyncReport) {
    sync(dir, store, previous, true)
}

/// Stores every file of the live folder, deleting nothing: what a crashed run left behind is
/// saved before the folder is filled from the store.
pub fn sync_to_store_additive(dir: &Dir, store: &Store) -> (Snapshot, SyncReport) {
    sync(dir, store, &Snapshot::new(), false)
}

fn sync(dir: &Dir, store: &Store, previous: &Snapshot, deletions: bool) -> (Snapshot, SyncReport) {
    let (now, skipped) = scan(dir);
    let mut report = SyncReport {
        refused: skipped,
        ..SyncReport::default()
    };
    // The quota is a setting, not the index's usage: reading it takes no lock, so a sync with
    // nothing to save never waits for a store write in progress (the history notebook's, say,
    // whose index commit holds the lock through its fsyncs).
    let quota = store.quota();
    let mut next = Snapshot::new();
    let mut paths: Vec<&WsPath> = now.keys().collect();
    // Folders before what is in them.
    paths.sort_by_key(|p| p.as_str().matches('/').count());
    for path in paths {
        let seen = now[path];
        // Unchanged since the last sync: nothing to do (and the store is not even asked, so a
        // sync with nothing to save never waits for a write in progress).
        let unchanged = previous.get(path) == Some(&seen);
        if unchanged {
            next.insert(path.clone(), seen);
            continue;
        }
        // Recovering after a crash: a file the store holds a newer version of was saved after
        // the live copy was last written; the store wins.
        if !deletions
            && seen.kind == Kind::File
            && store.stat(path).is_ok_and(|e| {
                e.modified
                    .timestamp_nanos_opt()
                    .map(i128::from)
                    .unwrap_or(i128::MAX)
                    >= seen.mtime
            })
        {
            next.insert(path.clone(), seen);
            continue;
        }
        let result = match seen.kind {
            Kind::Dir => store.mkdir(path, true).map(|_| ()),
            Kind::File => match read_file(dir, path, quota.max_bytes) {
                Ok(data) => store.write(path, &data, true).map(|_| ()),
                Err(e) => {
                    report.refused.push((path.to_string(), e.to_string()));
                    continue;
                }
            },
        };
        match result {
            Ok(()) => {
                if seen.kind == Kind::File {
                    report.saved.push(path.clone());
                }
                next.insert(path.clone(), seen);
            }
            Err(
                e @ (StoreError::Quota(_)
                | StoreError::IsADirectory(_)
                | StoreError::NotADirectory(_)),
            ) => {
                report.refused.push((path.to_string(), e.to_string()));
            }
            Err(e) => report.refused.push((path.to_string(), e.to_string())),
        }
    }
    if !deletions {
        return (next, report);
    }
    // What was there at the last sync and is gone now was deleted by the kernel.
    let mut gone: Vec<&WsPath> = previous.keys().filter(|p| !now.contains_key(*p)).collect();
    gone.sort_by_key(|p| std::cmp::Reverse(p.as_str().len()));
    for path in gone {
        if store.exists(path) && store.delete(path).is_ok() {
            report.removed.push(path.clone());
        }
    }
    (next, report)
}

/// Writes every file of the store that the live folder lacks into it (on unlock). A file the
/// store cannot read (its object failed its check, or the disk refused it) is left out, so
/// kernels never see a damaged or partial copy, and the others are written; returns how many
/// were left out. Only a failure of the live folder itself stops it.
pub fn materialize(dir: &Dir, store: &Store) -> Result<usize, LiveError> {
    let mut entries = store.walk();
    entries.sort_by_key(|(p, _)| p.as_str().matches('/').count());
    let mut left_out = 0;
    for (path, entry) in entries {
        match entry.kind {
            Kind::Dir => dir.create_dir_all(path.as_str())?,
            Kind::File => {
                if dir.symlink_metadata(path.as_str()).is_ok() {
                    continue;
                }
                let data = match store.read(&path) {
                    Ok((_, data)) => data,
                    // Damage is logged by the store, naming the object on disk.
                    Err(StoreError::Tampered(_)) => {
                        left_out += 1;
                        continue;
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "a stored file could not be read into the live folder");
                        left_out += 1;
                        continue;
                    }
                };
                if !path.parent().is_root() {
                    dir.create_dir_all(path.parent().as_str())?;
                }
                dir.write(path.as_str(), &data)?;
            }
        }
    }
    Ok(left_out)
}

/// Mirrors a store write into the live folder (so running kernels see it at once).
pub fn put(dir: &Dir, path: &WsPath, data: &[u8]) -> std::io::Result<Seen> {
    if !path.parent().is_root() {
        dir.create_dir_all(path.parent().as_str())?;
    }
    // A symlink planted where the file goes is replaced, never written through.
    if dir
        .symlink_metadata(path.as_str())
        .is_ok_and(|m| m.file_type().is_symlink())
    {
        dir.remove_file(path.as_str())?;
    }
    // Written beside and renamed into place, so a crash leaves the old file or the new one,
    // never half of one (the next start saves what it finds here).
    let tmp = format!("{}{TEMP_SUFFIX}", path.as_str());
    dir.write(&tmp, data)?;
    dir.rename(&tmp, dir, path.as_str())?;
    let meta = dir.symlink_metadata(path.as_str())?;
    Ok(Seen {
        kind: Kind::File,
        size: meta.len(),
        mtime: mtime_ns(&meta),
    })
}

/// Mirrors a new folder.
pub fn mkdir(dir: &Dir, path: &WsPath) -> std::io::Result<()> {
    dir.create_dir_all(path.as_str())
}

/// Mirrors a deletion.
pub fn remove(dir: &Dir, path: &WsPath) -> std::io::Result<()> {
    match dir.symlink_metadata(path.as_str()) {
        Ok(m) if m.is_dir() => dir.remove_dir_all(path.as_str()),
        Ok(_) => dir.remove_file(path.as_str()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

/// Mirrors a rename.
pub fn rename(dir: &Dir, from: &WsPath, to: &WsPath) -> std::io::Result<()> {
    if !to.parent().is_root() {
        dir.create_dir_all(to.parent().as_str())?;
    }
    match dir.rename(from.as_str(), dir, to.as_str()) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::workspace::keys::{Keyring, MasterSource, Secret};
    use crate::workspace::store::Quota;
    use std::sync::{Arc, RwLock};

    fn setup() -> (tempfile::TempDir, Dir, Store) {
        let base = tempfile::tempdir().unwrap();
        let ring = Keyring::open_or_create(
            &base.path().join("keys.json"),
            &MasterSource::Key(Secret([1; 32])),
        )
        .unwrap();
        let store = Store::open(
            &base.path().join("ws"),
            "u",
            Arc::new(RwLock::new(ring)),
            Quota {
                max_bytes: 1 << 20,
                max_files: 100,
            },
        )
        .unwrap();
        let live = open(&base.path().join("live")).unwrap();
        (base, live, store)
    }

    #[test]
    fn kernel_writes_and_deletes_reach_the_store() {
        let (scratch, live, store) = setup();
        let base = scratch.path();
        std::fs::create_dir_all(base.join("live/out")).unwrap();
        std::fs::write(base.join("live/out/r.csv"), b"a,b\n").unwrap();
        let (snap, report) = sync_to_store(&live, &store, &Snapshot::new());
        assert_eq!(report.saved, vec![WsPath::parse("out/r.csv").unwrap()]);
        assert_eq!(
            store.read(&WsPath::parse("out/r.csv").unwrap()).unwrap().1,
            b"a,b\n"
        );
        // Unchanged files are not stored again.
        let (snap, report) = sync_to_store(&live, &store, &snap);
        assert!(report.saved.is_empty());
        std::fs::remove_file(base.join("live/out/r.csv")).unwrap();
        let (_, report) = sync_to_store(&live, &store, &snap);
        assert_eq!(report.removed, vec![WsPath::parse("out/r.csv").unwrap()]);
    }

    #[test]
    fn a_sync_with_nothing_to_save_does_not_wait_for_a_store_write() {
        let (scratch, live, store) = setup();
        std::fs::write(scratch.path().join("live/a.txt"), b"a").unwrap();
        let (snap, _) = sync_to_store(&live, &store, &Snapshot::new());
        // A write in progress elsewhere (the history notebook's) holds the index lock through
        // its fsyncs; the sync before a cell's reply must not queue behind it.
        let held = store.hold_index();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::scope(|s| {
            s.spawn(|| {
                let _ = tx.send(sync_to_store(&live, &store, &snap).1);
            });
            let report = rx.recv_timeout(std::time::Duration::from_secs(10));
            drop(held);
            let report = report.expect("the sync finished while the store was locked");
            assert!(report.saved.is_empty() && report.refused.is_empty());
        });
    }

    #[test]
    fn the_quick_check_says_unchanged_only_when_a_sync_would_do_nothing() {
        let (scratch, live, store) = setup();
        let base = scratch.path().join("live");
        std::fs::create_dir_all(base.join("d")).unwrap();
        std::fs::write(base.join("d/a.txt"), b"a").unwrap();
        #[cfg(unix)]
        std::os::unix::fs::symlink("/etc/passwd", base.join("link")).unwrap();
        let (snap, first) = sync_to_store(&live, &store, &Snapshot::new());
        assert_eq!(first.saved.len(), 1);
        // Nothing changed: what the sync would report, without its work.
        let quick = unchanged_since(&live, &snap).expect("unchanged");
        let (snap, full) = sync_to_store(&live, &store, &snap);
        assert!(full.saved.is_empty() && full.removed.is_empty());
        assert_eq!(quick, full.refused);
        #[cfg(unix)]
        assert_eq!(
            quick.len(),
            1,
            "the symlink is reported as the sync reports it"
        );
        // Any change sends the sync to do its work.
        std::fs::write(base.join("d/a.txt"), b"ab").unwrap();
        assert!(unchanged_since(&live, &snap).is_none());
        let (snap, _) = sync_to_store(&live, &store, &snap);
        std::fs::write(base.join("d/b.txt"), b"b").unwrap();
        assert!(unchanged_since(&live, &snap).is_none());
        let (snap, _) = sync_to_store(&live, &store, &snap);
        std::fs::remove_file(base.join("d/a.txt")).unwrap();
        assert!(unchanged_since(&live, &snap).is_none());
        let (snap, _) = sync_to_store(&live, &store, &snap);
        assert!(unchanged_since(&live, &snap).is_some());
        // A folder with more entries than the quick scan looks at is left to the sync, even
        // unchanged (and so is one with as many symlinks, which the sync does not keep).
        for n in 0..QUICK_SCAN {
            std::fs::write(base.join(format!("f{n}")), b"x").unwrap();
        }
        let (snap, _) = sync_to_store(&live, &store, &snap);
        assert!(unchanged_since(&live, &snap).is_none());
        let (scratch, live, _store) = setup();
        #[cfg(unix)]
        for n in 0..=QUICK_SCAN {
            std::os::unix::fs::symlink("x", scratch.path().join(format!("live/l{n}"))).unwrap();
        }
        assert!(unchanged_since(&live, &Snapshot::new()).is_none());
    }

    #[test]
    fn symlinks_are_never_followed() {
        let (scratch, live, store) = setup();
        let base = scratch.path();
        std::os::unix::fs::symlink("/etc/passwd", base.join("live/passwd")).unwrap();
        std::os::unix::fs::symlink("/etc", base.join("live/etc")).unwrap();
        let (_, report) = sync_to_store(&live, &store, &Snapshot::new());
        assert!(report.saved.is_empty());
        assert_eq!(report.refused.len(), 2);
        // Writing through a planted folder symlink cannot leave the live folder.
        let target = WsPath::parse("etc/sandgate-escape").unwrap();
        assert!(put(&live, &target, b"x").is_err());
        assert!(!Path::new("/etc/sandgate-escape").exists());
        // A planted file symlink is replaced, not written through.
        put(&live, &WsPath::parse("passwd").unwrap(), b"mine").unwrap();
        assert!(
            std::fs::symlink_metadata(base.join("live/passwd"))
                .unwrap()
                .is_file()
        );
    }

    #[test]
    fn quota_refusals_are_reported() {
        let (scratch, live, store) = setup();
        let base = scratch.path();
        std::fs::write(base.join("live/big.bin"), vec![0u8; 2 << 20]).unwrap();
        let (_, report) = sync_to_store(&live, &store, &Snapshot::new());
        assert_eq!(report.refused.len(), 1);
        assert!(
            report.refused[0].1.contains("quota"),
            "{:?}",
            report.refused
        );
    }

    #[test]
    fn materialize_restores_the_store_into_an_empty_folder() {
        let (scratch, live, store) = setup();
        let base = scratch.path();
        store
            .write(&WsPath::parse("d/e/f.txt").unwrap(), b"deep", true)
            .unwrap();
        materialize(&live, &store).unwrap();
        assert_eq!(std::fs::read(base.join("live/d/e/f.txt")).unwrap(), b"deep");
    }

    #[test]
    fn materialize_leaves_a_damaged_file_out_and_writes_the_rest() {
        let (scratch, live, store) = setup();
        let base = scratch.path();
        let bad = WsPath::parse("d/bad.txt").unwrap();
        store
            .write(&WsPath::parse("d/good.txt").unwrap(), b"good", true)
            .unwrap();
        let before = walkdir(&base.join("ws/objects"));
        store.write(&bad, b"secret text", true).unwrap();
        // Flip a byte in the middle of bad.txt's object (the one the write added).
        let victim = walkdir(&base.join("ws/objects"))
            .into_iter()
            .find(|o| !before.contains(o))
            .unwrap();
        let victim = &victim;
        let mut bytes = std::fs::read(victim).unwrap();
        let mid = bytes.len() / 2;
        bytes[mid] ^= 1;
        std::fs::write(victim, bytes).unwrap();
        assert_eq!(materialize(&live, &store).unwrap(), 1);
        assert_eq!(
            std::fs::read(base.join("live/d/good.txt")).unwrap(),
            b"good"
        );
        assert!(!base.join("live/d/bad.txt").exists());
        assert!(store.is_damaged(&bad));
        // A sync does not take the missing live copy for a deletion.
        let (snap, _) = scan(&live);
        let (_, report) = sync_to_store(&live, &store, &snap);
        assert!(report.removed.is_empty());
        assert!(store.exists(&bad));
    }

    fn walkdir(dir: &Path) -> Vec<std::path::PathBuf> {
        let mut out = vec![];
        for e in std::fs::read_dir(dir).unwrap().flatten() {
            if e.path().is_dir() {
                out.extend(walkdir(&e.path()));
            } else {
                out.push(e.path());
            }
        }
        out
    }
}
