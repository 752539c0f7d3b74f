//! The guest's private root: a fresh host folder, removed when the kernel ends.
//!
//! The kernel usually ends with `std::process::exit` while its tasks (and the sandbox they
//! hold) are still alive, so no destructor would run: every root made is recorded here and
//! [`remove_private_roots`] removes them on the way out. A kernel that is killed outright
//! (SIGKILL) cannot clean up, so each root has a lock file beside it, `flock`ed for the whole
//! life of its kernel: the next kernel to start in the same temporary folder finds the lock
//! free and removes what was left.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// Names of the roots (folders) and of their lock files (the folder's name and this).
const PREFIX: &str = "sandgate-root-";
const LOCK_SUFFIX: &str = ".lock";

/// The roots this process has made and not yet removed.
static LIVE: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());

pub(crate) struct TempRoot {
    path: PathBuf,
    /// Held (locked) until the root is removed; see the module's text.
    _lock: File,
}

impl TempRoot {
    pub(crate) fn new() -> std::io::Result<TempRoot> {
        let base = std::env::temp_dir();
        sweep(&base);
        for _ in 0..16 {
            let path = base.join(format!("{PREFIX}{}", uuid::Uuid::new_v4().simple()));
            // The lock first: a root never exists without a held lock beside it.
            let lock = match File::options()
                .write(true)
                .create_new(true)
                .open(lock_path(&path))
            {
                Ok(lock) => lock,
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(e),
            };
            // Another kernel's sweep can take the lock in the instant between its making and
            // its locking (it then removes the file): start again under another name.
            if lock.try_lock().is_err() {
                continue;
            }
            if let Err(e) = std::fs::create_dir(&path) {
                let _ = std::fs::remove_file(lock_path(&path));
                if e.kind() == std::io::ErrorKind::AlreadyExists {
                    continue;
                }
                return Err(e);
            }
            let root = TempRoot { path, _lock: lock };
            LIVE.lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(root.path.clone());
            #[cfg(unix)]
            {
                use std::os::unix::fs::PermissionsExt;
                std::fs::set_permissions(&root.path, std::fs::Permissions::from_mode(0o700))?;
            }
            for sub in ["usr/local/lib", "tmp/home/.matplotlib", "workspace"] {
                std::fs::create_dir_all(root.path.join(sub))?;
            }
            return Ok(root);
        }
        Err(std::io::Error::other("cannot make a private root folder"))
    }

    pub(crate) fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for TempRoot {
    fn drop(&mut self) {
        LIVE.lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|p| p != &self.path);
        remove(&self.path);
    }
}

/// Removes every private root this process made (the guest may still be running; whatever
/// it writes after this fails). Call it just before the process exits.
pub fn remove_private_roots() {
    let roots = std::mem::take(&mut *LIVE.lock().unwrap_or_else(|p| p.into_inner()));
    for root in roots {
        remove(&root);
    }
}

fn lock_path(root: &Path) -> PathBuf {
    let mut name = root.as_os_str().to_owned();
    name.push(LOCK_SUFFIX);
    PathBuf::from(name)
}

/// Removes a root, then its lock file (a root is never left without its lock).
fn remove(root: &Path) {
    // A guest still writing can refill a folder between listing and removal; try again.
    for _ in 0..3 {
        match std::fs::remove_dir_all(root) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => continue,
            _ => break,
        }
    }
    if !root.exists() {
        let _ = std::fs::remove_file(lock_path(root));
    }
}

/// Removes the roots of kernels that ended without cleaning up: those whose lock file no
/// process holds. Only this user's lock files count, and a folder is removed only if it is a
/// folder (not a link) owned by this user.
fn sweep(base: &Path) {
    let Ok(entries) = std::fs::read_dir(base) else {
        return;
    };
    let mut removed = 0usize;
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        let Some(stem) = name.strip_suffix(LOCK_SUFFIX) else {
            continue;
        };
        if !stem.starts_with(PREFIX) || !owned_by_me(&entry.path(), false) {
            continue;
        }
        let Ok(lock) = File::options().write(true).open(entry.path()) else {
            continue;
        };
        // Held: its kernel is alive. Free: it is gone (locks end with their process).
        if lock.try_lock().is_err() {
            continue;
        }
        let root = base.join(stem);
        if !root.exists() || owned_by_me(&root, true) {
            remove(&root);
            removed += 1;
        }
    }
    if removed > 0 {
        tracing::info!(
            removed,
            "removed private roots left by kernels that did not end cleanly"
        );
    }
}

/// Whether `path` (not followed if a link) is this user's, and a folder when `dir`.
fn owned_by_me(path: &Path, dir: bool) -> bool {
    let Ok(meta) = std::fs::symlink_metadata(path) else {
        return false;
    };
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        if meta.uid() != rustix::process::getuid().as_raw() {
            return false;
        }
    }
    if dir { meta.is_dir() } else { meta.is_file() }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_root_left_without_its_process_is_swept_and_a_live_one_is_not() {
        let base = std::env::temp_dir().join(format!("sandgate-sweep-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&base).unwrap();
        // A dead kernel's root: lock file present, nobody holds it.
        let dead = base.join(format!("{PREFIX}dead"));
        std::fs::create_dir_all(dead.join("tmp")).unwrap();
        std::fs::write(dead.join("tmp/x"), b"left").unwrap();
        std::fs::write(lock_path(&dead), b"").unwrap();
        // A live one: its lock is held (by this test, through another open file).
        let live = base.join(format!("{PREFIX}live"));
        std::fs::create_dir_all(&live).unwrap();
        let held = File::options()
            .write(true)
            .create_new(true)
            .open(lock_path(&live))
            .unwrap();
        held.try_lock().unwrap();
        // Something else that only looks alike: kept.
        let other = base.join("sandgate-root-no-lock");
        std::fs::create_dir_all(&other).unwrap();
        sweep(&base);
        assert!(!dead.exists() && !lock_path(&dead).exists());
        assert!(live.exists() && lock_path(&live).exists());
        assert!(other.exists());
        drop(held);
        sweep(&base);
        assert!(!live.exists());
        std::fs::remove_dir_all(&base).unwrap();
    }
}
