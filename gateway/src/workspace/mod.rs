//! The encrypted workspace: every user's notebooks, data and outputs, encrypted at rest, and
//! the plaintext copy kernels see at `/workspace`, kept only in memory.
//!
//! - [`keys`]: master key sources, sealed data keys, per-workspace keys (HKDF), rotation.
//! - [`path`]: workspace paths, checked once (no traversal in any encoding).
//! - [`store`]: one workspace's encrypted, atomic, tamper-evident store with quotas.
//! - [`live`]: the live folder (tmpfs) and its sync with the store.
//! - [`history`]: outputs and executed cells saved as they happen.
//!
//! Until the key is unlocked (at start with an explicit key source or `SANDGATE_TOKEN`, else by
//! the first request that carries the access token), stores cannot be opened; kernels already
//! started see an empty `/workspace` that is filled the moment the key is unlocked.
//!
//! Damage on disk costs what is damaged and nothing more, and never stops the gateway: a
//! damaged file is left out of `/workspace` and answers an error naming it (see [`store`]); a
//! damaged index makes its workspace answer [`WorkspaceError::IndexDamaged`] while the others
//! work; a damaged key file makes every workspace answer [`keys::KeyError::Damaged`] while
//! kernels still run. Each is logged once, with the operator's way out.

pub mod history;
pub mod keys;
pub mod live;
pub mod path;
pub mod store;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::time::Duration;

use keys::{KeyError, Keyring, MasterSource};
use path::WsPath;
use store::{Quota, Store, StoreError};

/// Settings of the workspaces.
#[derive(Debug, Clone)]
pub struct WorkspaceConfig {
    /// Where encrypted stores live (`DATA_DIR/workspaces`).
    pub root: PathBuf,
    /// The key file (`DATA_DIR/keys.json`).
    pub keys: PathBuf,
    /// Where live folders live: a memory-backed folder (default `/dev/shm/sandgate-…`).
    pub live_root: PathBuf,
    /// Per-workspace caps.
    pub quota: Quota,
    /// How often live folders are synced while kernels run (besides after each cell).
    pub sync_interval: Duration,
}

/// Errors of the workspaces.
#[derive(Debug, thiserror::Error)]
pub enum WorkspaceError {
    /// The key is not unlocked yet.
    #[error(transparent)]
    Key(#[from] KeyError),
    /// A store error.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A workspace's index cannot be read: that workspace is unavailable, the others work.
    #[error(
        "the workspace of user {user:?} ({}) cannot be opened: {reason}. None of its files can be \
         found without its index; other workspaces are not affected. The way out: stop the \
         gateway, then put back that folder (index.sgw with its objects/) from a backup, or move \
         it out of the workspaces folder to start this workspace empty, and start the gateway \
         again",
        dir.display()
    )]
    IndexDamaged {
        /// The user.
        user: String,
        /// The workspace id (its folder's name).
        id: String,
        /// Its folder.
        dir: PathBuf,
        /// What is wrong with the index.
        reason: String,
    },
    /// The live folder failed.
    #[error("live workspace folder {path}: {source}")]
    Live {
        /// The folder.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// One user's workspace: the store, the live folder, and what the last sync saw.
pub struct Space {
    /// The user.
    pub user: String,
    /// The encrypted store.
    pub store: Arc<Store>,
    live_path: PathBuf,
    live: cap_std::fs::Dir,
    /// What the last sync saw. Shared with the scan in flight rather than copied for it (a
    /// copy per cell costs as much as the workspace has files); changed in place otherwise.
    snapshot: tokio::sync::Mutex<Arc<live::Snapshot>>,
}

impl std::fmt::Debug for Space {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Space").field("user", &self.user).finish()
    }
}

impl Space {
    /// Syncs the live folder into the store (serialised per workspace).
    pub async fn sync(self: &Arc<Self>) -> live::SyncReport {
        let mut snapshot = self.snapshot.lock().await;
        // A small folder that nothing changed (a cell that wrote no file) is told here, by a
        // scan of a few entries: the reply it comes before waits for no thread hop.
        if let Some(refused) = live::unchanged_since(&self.live, &snapshot) {
            for (_, why) in &refused {
                tracing::warn!(user = %self.user, %why, "a workspace file was not saved");
            }
            return live::SyncReport {
                refused,
                ..live::SyncReport::default()
            };
        }
        let me = self.clone();
        let previous = Arc::clone(&snapshot);
        let done = tokio::task::spawn_blocking(move || {
            live::sync_to_store(&me.live, &me.store, &previous)
        })
        .await;
        match done {
            Ok((next, report)) => {
                *snapshot = Arc::new(next);
                if !report.saved.is_empty() || !report.removed.is_empty() {
                    tracing::debug!(user = %self.user, saved = report.saved.len(), removed = report.removed.len(), "workspace synced");
                }
                // File names are the user's data: the log gets the reasons, not the names.
                for (_, why) in &report.refused {
                    tracing::warn!(user = %self.user, %why, "a workspace file was not saved");
                }
                report
            }
            Err(e) => {
                tracing::error!(error = %e, "workspace sync failed");
                live::SyncReport::default()
            }
        }
    }

    /// Writes a file into the store and the live folder.
    pub async fn write(
        self: &Arc<Self>,
        path: WsPath,
        data: Vec<u8>,
        make_parents: bool,
    ) -> Result<store::Entry, WorkspaceError> {
        let mut snapshot = self.snapshot.lock().await;
        let me = self.clone();
        let (entry, seen) = blocking(move || -> Result<_, WorkspaceError> {
            let entry = me.store.write(&path, &data, make_parents)?;
            let seen =
                live::put(&me.live, &path, &data).map_err(|source| WorkspaceError::Live {
                    path: me.live_path.clone(),
                    source,
                })?;
            Ok((entry, (path, seen)))
        })
        .await?;
        for a in seen.0.ancestors() {
            Arc::make_mut(&mut *snapshot).insert(
                a,
                live::Seen {
                    kind: store::Kind::Dir,
                    size: 0,
                    mtime: 0,
                },
            );
        }
        Arc::make_mut(&mut *snapshot).insert(seen.0, seen.1);
        Ok(entry)
    }

    /// Writes a file into the store only, not the live folder (history and saved outputs:
    /// kernels see them from their next start on, and writing them never waits for a sync).
    pub async fn write_stored(
        self: &Arc<Self>,
        path: WsPath,
        data: Vec<u8>,
    ) -> Result<store::Entry, WorkspaceError> {
        let me = self.clone();
        blocking(move || {
            me.store
                .write(&path, &data, true)
                .map_err(WorkspaceError::from)
        })
        .await
    }

    /// Makes a folder in both.
    pub async fn mkdir(self: &Arc<Self>, path: WsPath) -> Result<store::Entry, WorkspaceError> {
        let mut snapshot = self.snapshot.lock().await;
        let me = self.clone();
        let p = path.clone();
        let entry = blocking(move || -> Result<_, WorkspaceError> {
            let e = me.store.mkdir(&p, false)?;
            live::mkdir(&me.live, &p).map_err(|source| WorkspaceError::Live {
                path: me.live_path.clone(),
                source,
            })?;
            Ok(e)
        })
        .await?;
        Arc::make_mut(&mut *snapshot).insert(
            path,
            live::Seen {
                kind: store::Kind::Dir,
                size: 0,
                mtime: 0,
            },
        );
        Ok(entry)
    }

    /// Deletes from both.
    pub async fn delete(self: &Arc<Self>, path: WsPath) -> Result<(), WorkspaceError> {
        let mut snapshot = self.snapshot.lock().await;
        let me = self.clone();
        let p = path.clone();
        blocking(move || -> Result<_, WorkspaceError> {
            me.store.delete(&p)?;
            live::remove(&me.live, &p).map_err(|source| WorkspaceError::Live {
                path: me.live_path.clone(),
                source,
            })?;
            Ok(())
        })
        .await?;
        Arc::make_mut(&mut *snapshot).retain(|p, _| !p.starts_with(&path));
        Ok(())
    }

    /// Renames in both.
    pub async fn rename(
        self: &Arc<Self>,
        from: WsPath,
        to: WsPath,
    ) -> Result<store::Entry, WorkspaceError> {
        let mut snapshot = self.snapshot.lock().await;
        let me = self.clone();
        let (f, t) = (from.clone(), to.clone());
        let entry = blocking(move || -> Result<_, WorkspaceError> {
            let e = me.store.rename(&f, &t)?;
            live::rename(&me.live, &f, &t).map_err(|source| WorkspaceError::Live {
                path: me.live_path.clone(),
                source,
            })?;
            Ok(e)
        })
        .await?;
        // The next scan sees the new names as new and the old ones as gone: both already match
        // the store, so forget them and let the scan record them again.
        Arc::make_mut(&mut *snapshot).retain(|p, _| !p.starts_with(&from));
        Ok(entry)
    }

    /// Runs a read-only store call off the async threads.
    pub async fn read<T: Send + 'static>(
        self: &Arc<Self>,
        f: impl FnOnce(&Store) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, WorkspaceError> {
        let me = self.clone();
        blocking(move || f(&me.store).map_err(WorkspaceError::from)).await
    }

    /// The live folder on the host.
    pub fn live_path(&self) -> &Path {
        &self.live_path
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, WorkspaceError> + Send + 'static,
) -> Result<T, WorkspaceError> {
    match tokio::task::spawn_blocking(f).await {
        Ok(r) => r,
        Err(e) => Err(WorkspaceError::Live {
            path: PathBuf::new(),
            source: std::io::Error::other(e.to_string()),
        }),
    }
}

/// Every workspace of the gateway.
pub struct Workspaces {
    config: WorkspaceConfig,
    keyring: OnceLock<Arc<RwLock<Keyring>>>,
    /// The key file was found damaged (path, what is wrong): nothing is unlocked until the
    /// gateway restarts with a good one.
    key_damage: Mutex<Option<(PathBuf, String)>>,
    unlocking: tokio::sync::Mutex<()>,
    spaces: Mutex<HashMap<String, Arc<Space>>>,
    /// Workspaces whose index was found damaged, by user, as (id, folder, what is wrong):
    /// they answer that error until the gateway restarts (the way out is done with it
    /// stopped), without reading the index again for every request and cell.
    damaged: Mutex<HashMap<String, (String, PathBuf, String)>>,
}

/// What [`Workspaces::rotate`] did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Rotation {
    /// Objects re-sealed under the new data key.
    pub resealed: usize,
    /// Damaged files and checkpoints left under the old key.
    pub damaged_files: usize,
    /// Workspaces whose index cannot be read, left under the old key.
    pub damaged_workspaces: Vec<PathBuf>,
    /// Whether the old data key was dropped (only when nothing was left under it).
    pub retired: bool,
}

impl std::fmt::Debug for Workspaces {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Workspaces")
            .field("root", &self.config.root)
            .finish()
    }
}

/// A workspace id for a user: a hash, so folder names on disk do not name users.
pub fn workspace_id(user: &str) -> String {
    let d = ring::digest::digest(
        &ring::digest::SHA256,
        format!("sandgate-workspace:{user}").as_bytes(),
    );
    hex::encode(&d.as_ref()[..12])
}

impl Workspaces {
    /// Workspaces under `config` (nothing is opened until [`Workspaces::unlock`]).
    pub fn new(config: WorkspaceConfig) -> Result<Workspaces, WorkspaceError> {
        for dir in [&config.root, &config.live_root] {
            std::fs::create_dir_all(dir).map_err(|source| WorkspaceError::Live {
                path: dir.clone(),
                source,
            })?;
            #[cfg(unix)]
            {
                use std::os::unix::fs::PermissionsExt;
                std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(
                    |source| WorkspaceError::Live {
                        path: dir.clone(),
                        source,
                    },
                )?;
            }
        }
        Ok(Workspaces {
            config,
            keyring: OnceLock::new(),
            key_damage: Mutex::default(),
            unlocking: tokio::sync::Mutex::new(()),
            spaces: Mutex::default(),
            damaged: Mutex::default(),
        })
    }

    /// The settings.
    pub fn config(&self) -> &WorkspaceConfig {
        &self.config
    }

    /// The live folder of `user`, made if needed (kernels mount it at `/workspace`).
    pub fn live_dir(&self, user: &str) -> PathBuf {
        self.config.live_root.join(workspace_id(user))
    }

    /// Whether the key is unlocked.
    pub fn is_unlocked(&self) -> bool {
        self.keyring.get().is_some()
    }

    /// The key file's damage, if it was found damaged.
    pub fn key_damage(&self) -> Option<KeyError> {
        self.key_damage
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .map(|(path, reason)| KeyError::Damaged {
                path: path.clone(),
                reason: reason.clone(),
            })
    }

    /// Unlocks the key file with `source` (creating it on first use). Idempotent. A damaged key
    /// file is remembered and logged once, with the way out: it is not read again until the
    /// gateway restarts.
    pub async fn unlock(&self, source: MasterSource) -> Result<(), WorkspaceError> {
        if self.is_unlocked() {
            return Ok(());
        }
        let _guard = self.unlocking.lock().await;
        if self.is_unlocked() {
            return Ok(());
        }
        if let Some(e) = self.key_damage() {
            return Err(e.into());
        }
        let path = self.config.keys.clone();
        let root = self.config.root.clone();
        let ring = tokio::task::spawn_blocking(move || {
            // Without its key file a workspace cannot be read: a missing one is not made anew
            // over workspaces sealed under the lost one.
            if !path.exists() {
                let sealed = std::fs::read_dir(&root)
                    .into_iter()
                    .flatten()
                    .flatten()
                    .filter(|e| e.path().is_dir())
                    .count();
                if sealed > 0 {
                    return Err(KeyError::Damaged {
                        path,
                        reason: format!(
                            "it is missing, but {sealed} workspaces sealed under its keys are in \
                             workspaces/"
                        ),
                    });
                }
            }
            Keyring::open_or_create(&path, &source)
        })
        .await
        .map_err(|e| WorkspaceError::Live {
            path: PathBuf::new(),
            source: std::io::Error::other(e.to_string()),
        })?;
        let ring = match ring {
            Ok(ring) => ring,
            Err(KeyError::Damaged { path, reason }) => {
                tracing::error!(
                    key_file = %path.display(),
                    %reason,
                    "the workspace key file is damaged, so no workspace can be opened (kernels still \
                     run, with an empty /workspace). Its data keys exist nowhere else: the way out \
                     is to stop the gateway, put the key file back from a backup, and start it \
                     again; without a backup the workspaces cannot be read, and moving them and the \
                     key file aside starts afresh"
                );
                *self.key_damage.lock().unwrap_or_else(|e| e.into_inner()) =
                    Some((path.clone(), reason.clone()));
                return Err(KeyError::Damaged { path, reason }.into());
            }
            Err(e) => return Err(e.into()),
        };
        let _ = self.keyring.set(Arc::new(RwLock::new(ring)));
        tracing::info!("workspace key unlocked");
        Ok(())
    }

    /// The workspace of `user`: opened (and its live folder filled, after saving anything a
    /// previous run left there unsaved) on first use.
    pub async fn space(&self, user: &str) -> Result<Arc<Space>, WorkspaceError> {
        if let Some(s) = self
            .spaces
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(user)
        {
            return Ok(s.clone());
        }
        let Some(keyring) = self.keyring.get().cloned() else {
            return Err(self.key_damage().unwrap_or(KeyError::Locked).into());
        };
        let _guard = self.unlocking.lock().await;
        if let Some(s) = self
            .spaces
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(user)
        {
            return Ok(s.clone());
        }
        if let Some((id, dir, reason)) = self
            .damaged
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(user)
        {
            return Err(WorkspaceError::IndexDamaged {
                user: user.to_owned(),
                id: id.clone(),
                dir: dir.clone(),
                reason: reason.clone(),
            });
        }
        let id = workspace_id(user);
        let dir = self.config.root.join(&id);
        let live_path = self.live_dir(user);
        let quota = self.config.quota;
        let user_owned = user.to_owned();
        let opened = blocking(move || -> Result<Space, WorkspaceError> {
            let store = match Store::open(&dir, &id, keyring, quota) {
                Ok(s) => Arc::new(s),
                // Nothing was changed on disk: the live folder is not touched either, so what a
                // crashed run left there waits for the workspace to open again.
                Err(StoreError::IndexDamaged(reason)) => {
                    return Err(WorkspaceError::IndexDamaged {
                        user: user_owned,
                        id,
                        dir,
                        reason,
                    });
                }
                Err(e) => return Err(e.into()),
            };
            let live = live::open(&live_path).map_err(|source| WorkspaceError::Live {
                path: live_path.clone(),
                source,
            })?;
            // Files a crashed run's kernels wrote and never saved are saved first; then the
            // store fills in what the live folder lacks.
            let (_, recovered) = live::sync_to_store_additive(&live, &store);
            if !recovered.saved.is_empty() {
                tracing::warn!(
                    files = recovered.saved.len(),
                    "saved files an earlier run left unsaved in the live folder"
                );
            }
            let left_out = live::materialize(&live, &store).map_err(|e| WorkspaceError::Live {
                path: live_path.clone(),
                source: std::io::Error::other(e.to_string()),
            })?;
            if left_out > 0 {
                tracing::warn!(
                    user = %user_owned,
                    files = left_out,
                    "stored files that cannot be read were left out of the live folder; the rest \
                     of the workspace is there"
                );
            }
            let (snapshot, _) = live::scan(&live);
            Ok(Space {
                user: user_owned,
                store,
                live_path,
                live,
                snapshot: tokio::sync::Mutex::new(Arc::new(snapshot)),
            })
        })
        .await;
        let space = match opened {
            Ok(space) => Arc::new(space),
            Err(e) => {
                if let WorkspaceError::IndexDamaged {
                    id, dir, reason, ..
                } = &e
                {
                    tracing::error!(user, error = %e, "a workspace cannot be opened");
                    self.damaged
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .insert(user.to_owned(), (id.clone(), dir.clone(), reason.clone()));
                }
                return Err(e);
            }
        };
        self.spaces
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(user.to_owned(), space.clone());
        Ok(space)
    }

    /// Syncs every open workspace (periodically, and at shutdown).
    pub async fn sync_all(&self) {
        let spaces: Vec<Arc<Space>> = self
            .spaces
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .cloned()
            .collect();
        for s in spaces {
            s.sync().await;
        }
    }

    /// At shutdown: a last sync, then the plaintext live folders are removed.
    pub async fn close(&self) {
        self.sync_all().await;
        let spaces: Vec<Arc<Space>> = self
            .spaces
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .drain()
            .map(|(_, s)| s)
            .collect();
        for s in spaces {
            if let Err(e) = std::fs::remove_dir_all(s.live_path()) {
                tracing::warn!(error = %e, "cannot remove a live workspace folder");
            }
        }
        // Empty live folders of workspaces that did not open (locked, or damaged); one that
        // holds files keeps them for the next start to save.
        for entry in std::fs::read_dir(&self.config.live_root)
            .into_iter()
            .flatten()
            .flatten()
        {
            let _ = std::fs::remove_dir(entry.path());
        }
        // The live root too, once nothing is left in it (kernels' own folders are gone).
        let _ = std::fs::remove_dir(&self.config.live_root);
    }

    fn secrets_path(&self) -> PathBuf {
        self.config.keys.with_file_name("secrets.json")
    }

    /// Stores a host secret (a provider's API key), sealed under the master key, in
    /// `DATA_DIR/secrets.json`.
    pub fn set_secret(&self, name: &str, value: &str) -> Result<(), WorkspaceError> {
        let keyring = self.keyring.get().ok_or(KeyError::Locked)?;
        let path = self.secrets_path();
        let mut all: std::collections::BTreeMap<String, String> = std::fs::read(&path)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default();
        let sealed = keyring
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .seal_secret(name, value.as_bytes());
        all.insert(name.to_owned(), hex::encode(sealed));
        let tmp = path.with_extension("json.tmp");
        let io = |source| WorkspaceError::Live {
            path: path.clone(),
            source,
        };
        std::fs::write(&tmp, serde_json::to_vec_pretty(&all).expect("JSON")).map_err(io)?;
        std::fs::rename(&tmp, &path).map_err(|source| WorkspaceError::Live {
            path: path.clone(),
            source,
        })?;
        Ok(())
    }

    /// A host secret stored with [`Workspaces::set_secret`], if the key is unlocked and it exists.
    pub fn secret(&self, name: &str) -> Option<String> {
        let keyring = self.keyring.get()?;
        let all: std::collections::BTreeMap<String, String> =
            serde_json::from_slice(&std::fs::read(self.secrets_path()).ok()?).ok()?;
        let sealed = hex::decode(all.get(name)?).ok()?;
        let plain = keyring
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .open_secret(name, &sealed)?;
        String::from_utf8(plain).ok()
    }

    /// Re-encrypts every workspace under a new data key, resuming an interrupted rotation.
    /// Run with the gateway stopped (`sandgate rotate-key`). Damaged files and workspaces whose
    /// index cannot be read are left as they are, and then the old data key is kept (so a
    /// backup of them can still be read); run it again once they are dealt with.
    pub fn rotate(&self) -> Result<Rotation, WorkspaceError> {
        let keyring = self.keyring.get().ok_or(KeyError::Locked)?.clone();
        keyring
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .begin_rotation()?;
        let mut report = Rotation::default();
        for entry in
            std::fs::read_dir(&self.config.root).map_err(|source| WorkspaceError::Live {
                path: self.config.root.clone(),
                source,
            })?
        {
            let Ok(entry) = entry else { continue };
            let dir = entry.path();
            if !dir.join("index.sgw").exists() && !dir.join("objects").is_dir() {
                continue;
            }
            let id = entry.file_name().to_string_lossy().into_owned();
            let store = match Store::open(
                &entry.path(),
                &id,
                keyring.clone(),
                Quota {
                    max_bytes: u64::MAX,
                    max_files: usize::MAX,
                },
            ) {
                Ok(store) => store,
                Err(StoreError::IndexDamaged(reason)) => {
                    tracing::error!(workspace = %entry.path().display(), %reason, "a workspace's index cannot be read; it is left under the old key");
                    report.damaged_workspaces.push(entry.path());
                    continue;
                }
                Err(e) => return Err(e.into()),
            };
            let done = store.reencrypt()?;
            report.resealed += done.resealed;
            report.damaged_files += done.damaged;
        }
        if report.damaged_files == 0 && report.damaged_workspaces.is_empty() {
            keyring
                .write()
                .unwrap_or_else(|e| e.into_inner())
                .retire()?;
            report.retired = true;
        }
        Ok(report)
    }
}

/// Whether `path` is on a memory-backed file system (tmpfs or ramfs), per `/proc/mounts`.
pub fn is_memory_backed(path: &Path) -> bool {
    let Ok(mounts) = std::fs::read_to_string("/proc/mounts") else {
        return false;
    };
    let path = path.canonicalize().unwrap_or_else(|_| path.to_owned());
    let mut best: Option<(usize, bool)> = None;
    for line in mounts.lines() {
        let mut f = line.split_whitespace();
        let (Some(_), Some(mount), Some(fstype)) = (f.next(), f.next(), f.next()) else {
            continue;
        };
        if path.starts_with(mount) && best.is_none_or(|(len, _)| mount.len() >= len) {
            best = Some((mount.len(), matches!(fstype, "tmpfs" | "ramfs")));
        }
    }
    best.is_some_and(|(_, mem)| mem)
}
