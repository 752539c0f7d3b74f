//! Kernels' home folders: each kernel process is launched with a fresh folder of its own that
//! its guest sees at `/home/user` (its `$HOME`, and the working directory of E2B contexts).
//!
//! A [`Home`] is removed when its last holder lets go: the kernel process it was made for, or,
//! for an E2B sandbox, the sandbox (whose contexts all share its default context's home, so one
//! context ending removes nothing).
//!
//! Homes live under `DATA_DIR/homes/<run>/` (0700), one `<run>` folder per gateway run with a
//! lock file beside it, `flock`ed for the run's life. A gateway that was killed cannot clean
//! up: the next one to start finds that run's lock free and removes what it left.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// The suffix of a run's lock file (beside its folder).
const LOCK_SUFFIX: &str = ".lock";

/// Where this gateway run makes home folders.
#[derive(Debug)]
pub struct Homes {
    dir: PathBuf,
    /// Held (locked) for the run's life; see the module's text.
    _lock: File,
}

/// One kernel's (or one sandbox's) home folder, removed when dropped.
#[derive(Debug)]
pub struct Home {
    path: PathBuf,
}

fn private(path: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(path)?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o700))?;
    }
    Ok(())
}

impl Homes {
    /// This run's folder under `base` (made 0700), after removing what runs that ended without
    /// cleaning up left there.
    pub fn open(base: &Path) -> std::io::Result<Homes> {
        private(base)?;
        sweep(base);
        for _ in 0..16 {
            let dir = base.join(uuid::Uuid::new_v4().simple().to_string());
            let lock = match File::options()
                .write(true)
                .create_new(true)
                .open(lock_path(&dir))
            {
                Ok(lock) => lock,
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(e),
            };
            // Another gateway's sweep can take the lock in the instant between its making and
            // its locking (it then removes the file): start again under another name.
            if lock.try_lock().is_err() {
                continue;
            }
            private(&dir)?;
            return Ok(Homes { dir, _lock: lock });
        }
        Err(std::io::Error::other(
            "cannot make a folder for home folders",
        ))
    }

    /// A fresh, empty home folder (0700).
    pub fn create(&self) -> std::io::Result<Arc<Home>> {
        let path = self.dir.join(uuid::Uuid::new_v4().simple().to_string());
        std::fs::create_dir(&path)?;
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o700))?;
        }
        Ok(Arc::new(Home { path }))
    }

    /// This run's folder.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

impl Drop for Homes {
    fn drop(&mut self) {
        // Every home is gone by now unless something still holds one (then it goes with the
        // folder: the run is over).
        let _ = std::fs::remove_dir_all(&self.dir);
        let _ = std::fs::remove_file(lock_path(&self.dir));
    }
}

impl Home {
    /// The folder on the host.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for Home {
    fn drop(&mut self) {
        // Off the async threads when there are some: a home can hold many files.
        let path = std::mem::take(&mut self.path);
        let remove = move || {
            if let Err(e) = std::fs::remove_dir_all(&path)
                && e.kind() != std::io::ErrorKind::NotFound
            {
                tracing::warn!(error = %e, "cannot remove a home folder");
            }
        };
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => {
                rt.spawn_blocking(remove);
            }
            Err(_) => remove(),
        }
    }
}

fn lock_path(dir: &Path) -> PathBuf {
    let mut name = dir.as_os_str().to_owned();
    name.push(LOCK_SUFFIX);
    PathBuf::from(name)
}

/// Removes the folders of runs whose lock is free (their gateway is gone).
fn sweep(base: &Path) {
    let Ok(entries) = std::fs::read_dir(base) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        let Some(run) = name.strip_suffix(LOCK_SUFFIX) else {
            continue;
        };
        let Ok(lock) = File::options().write(true).open(&path) else {
            continue;
        };
        if lock.try_lock().is_err() {
            continue; // A live gateway's.
        }
        let dir = base.join(run);
        match std::fs::remove_dir_all(&dir) {
            Ok(()) => tracing::info!("removed home folders a previous run left"),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                tracing::warn!(error = %e, "cannot remove home folders a previous run left");
                continue;
            }
        }
        let _ = std::fs::remove_file(&path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn homes_are_private_and_removed_with_their_last_holder() {
        let base = tempfile::tempdir().unwrap();
        let homes = Homes::open(base.path()).unwrap();
        let home = homes.create().unwrap();
        let path = home.path().to_owned();
        std::fs::write(path.join("a.txt"), b"x").unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o700);
        }
        let second = home.clone();
        drop(home);
        assert!(path.exists(), "a holder is left");
        drop(second);
        assert!(!path.exists());
    }

    #[test]
    fn a_dead_runs_homes_are_swept_and_a_live_ones_kept() {
        let base = tempfile::tempdir().unwrap();
        let live = Homes::open(base.path()).unwrap();
        let kept = live.create().unwrap();
        // A run that was killed: its folder and a lock file nobody holds.
        let dead = base.path().join("deadrun");
        std::fs::create_dir_all(dead.join("h1")).unwrap();
        std::fs::write(dead.join("h1/secret"), b"x").unwrap();
        std::fs::write(base.path().join("deadrun.lock"), b"").unwrap();
        let next = Homes::open(base.path()).unwrap();
        assert!(!dead.exists());
        assert!(!base.path().join("deadrun.lock").exists());
        assert!(kept.path().exists(), "the live run's home is kept");
        drop(next);
        drop(kept);
        drop(live);
        assert_eq!(std::fs::read_dir(base.path()).unwrap().count(), 0);
    }
}
