//! One workspace's encrypted store on disk.
//!
//! ```text
//! workspaces/<id>/index.sgw              the index: every path, its kind, size, times, object
//! workspaces/<id>/objects/<ab>/<id>.sgw  one file's content
//! workspaces/<id>/tmp/                   files being written
//! ```
//!
//! Every file on disk is `SGW1 ‖ key version (u32 LE) ‖ nonce ‖ AES-256-GCM(content) ‖ tag`.
//! The associated data binds a content object to its workspace, its path and its object id,
//! and the index to its workspace, so objects cannot be swapped between paths or workspaces
//! without the swap being detected. File names on disk are random; paths, sizes and times are
//! only inside the encrypted index.
//!
//! Writes are atomic: the new content goes to a new object (temporary file, fsync, rename,
//! fsync of the folder), then the index is replaced the same way, then the old object is
//! removed. A crash at any point leaves the previous version whole; objects the index does not
//! name (left by a crash) are removed when the store opens. A file that fails its integrity
//! check is never returned: the error names it.
//!
//! Damage costs what is damaged, nothing more. A file whose object fails its check (a flipped
//! byte, a truncation, a missing object) is remembered as damaged: reads of it fail naming it,
//! listings can mark it, and deleting it or saving over it clears it; every other file works.
//! An index that fails its check (or is missing while objects are there) makes [`Store::open`]
//! fail with [`StoreError::IndexDamaged`] and touch nothing: no garbage collection runs, so
//! the objects stay for a backup of the index to find again.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::keys::{self, Keyring, Secret};
use super::path::WsPath;

const MAGIC: &[u8; 4] = b"SGW1";

/// Caps on one workspace.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Quota {
    /// Total bytes of file content.
    pub max_bytes: u64,
    /// Files and folders.
    pub max_files: usize,
}

/// Errors of the store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// No such file or folder.
    #[error("no such file or folder: {0}")]
    NotFound(WsPath),
    /// The path exists already.
    #[error("{0} already exists")]
    Exists(WsPath),
    /// A folder was expected.
    #[error("{0} is not a folder")]
    NotADirectory(WsPath),
    /// A file was expected.
    #[error("{0} is a folder")]
    IsADirectory(WsPath),
    /// Moving a folder into itself.
    #[error("cannot move {0} into itself")]
    IntoItself(WsPath),
    /// The root cannot be changed this way.
    #[error("the workspace root cannot be deleted or renamed")]
    Root,
    /// A quota would be exceeded.
    #[error("workspace quota exceeded: {0}")]
    Quota(String),
    /// A stored file failed its integrity check (or its object is missing).
    #[error(
        "the stored copy of {0} failed its integrity check (it was changed, truncated or removed \
         on disk), so none of it was read; delete it, or save a new version over it"
    )]
    Tampered(String),
    /// The file was replaced or removed by a write while it was being read.
    #[error("{0} changed while it was being read; try again")]
    Busy(WsPath),
    /// The workspace index cannot be read: nothing of the workspace can be found without it.
    #[error("the workspace index cannot be read: {0}")]
    IndexDamaged(String),
    /// A key version is missing (the key file was rolled back or damaged).
    #[error("no key for version {0}; the key file does not match this workspace")]
    NoKey(u32),
    /// No such checkpoint.
    #[error("no checkpoint {1} for {0}")]
    NoCheckpoint(WsPath, String),
    /// The disk said no.
    #[error("storage error at {path}: {source}")]
    Io {
        /// The file on disk.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> StoreError + '_ {
    move |source| StoreError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Why a sealed file did not open.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Damage {
    /// Too short, or it does not start with the magic bytes.
    NotSealed,
    /// Its header names a key version the key file does not hold.
    NoKey(u32),
    /// Its authentication tag does not match (changed, truncated, or sealed for another path).
    Auth,
    /// The file is not there.
    Missing,
    /// It opens, but its size is not the one the index holds.
    Size,
}

impl std::fmt::Display for Damage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Damage::NotSealed => f.write_str("it is too short or its header is not SGW1"),
            Damage::NoKey(v) => write!(
                f,
                "its header names key version {v}, which the key file does not hold (the file \
                 was changed on disk, or the key file is older than it)"
            ),
            Damage::Auth => f.write_str(
                "its authentication tag does not match (it was changed or truncated on disk, or \
                 swapped with another)",
            ),
            Damage::Missing => f.write_str("it is missing"),
            Damage::Size => f.write_str("its size is not the one the index holds"),
        }
    }
}

/// A file or a folder.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// A file.
    File,
    /// A folder.
    Dir,
}

/// What the index knows of one path.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Entry {
    /// File or folder.
    pub kind: Kind,
    /// Content bytes (0 for folders).
    pub size: u64,
    /// When it was made.
    pub created: DateTime<Utc>,
    /// When its content last changed.
    pub modified: DateTime<Utc>,
    /// Its object (files only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    object: Option<String>,
    /// The key version its object is sealed under.
    #[serde(default)]
    kv: u32,
}

/// What [`Store::reencrypt`] did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Reencrypted {
    /// Objects re-sealed under the current key.
    pub resealed: usize,
    /// Damaged files and checkpoints left under their old key.
    pub damaged: usize,
}

/// A saved copy of a file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Checkpoint {
    /// Its id.
    pub id: String,
    /// When it was taken.
    pub modified: DateTime<Utc>,
    object: String,
    size: u64,
    kv: u32,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Index {
    entries: BTreeMap<WsPath, Entry>,
    #[serde(default)]
    checkpoints: BTreeMap<WsPath, Vec<Checkpoint>>,
}

impl Index {
    fn usage(&self) -> (u64, usize) {
        let bytes = self.entries.values().map(|e| e.size).sum::<u64>()
            + self
                .checkpoints
                .values()
                .flatten()
                .map(|c| c.size)
                .sum::<u64>();
        (bytes, self.entries.len())
    }
}

/// One workspace's store.
pub struct Store {
    dir: PathBuf,
    id: String,
    keyring: Arc<RwLock<Keyring>>,
    quota: Quota,
    index: Mutex<Index>,
    /// Files whose object failed its check since the store opened (cleared when the file is
    /// deleted or saved over).
    damaged: Mutex<BTreeSet<WsPath>>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").field("dir", &self.dir).finish()
    }
}

fn random_id() -> String {
    use ring::rand::SecureRandom;
    let mut b = [0u8; 16];
    ring::rand::SystemRandom::new()
        .fill(&mut b)
        .expect("the system random source works");
    hex::encode(b)
}

fn sync_dir(dir: &Path) {
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
}

/// Writes `body` to `path` atomically: temporary file in `tmp`, fsync, rename, fsync folder.
fn write_atomic(tmp_dir: &Path, path: &Path, body: &[u8]) -> Result<(), StoreError> {
    use std::io::Write;
    let tmp = tmp_dir.join(format!("{}.tmp", random_id()));
    let result = (|| {
        let mut options = std::fs::OpenOptions::new();
        options.write(true).create_new(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
        let mut f = options.open(&tmp).map_err(io(&tmp))?;
        f.write_all(body).map_err(io(&tmp))?;
        f.sync_all().map_err(io(&tmp))?;
        drop(f);
        std::fs::rename(&tmp, path).map_err(io(path))?;
        if let Some(parent) = path.parent() {
            sync_dir(parent);
        }
        Ok(())
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

impl Store {
    /// Opens (or creates) the store of workspace `id` in `dir`, removing objects a crash left
    /// behind.
    pub fn open(
        dir: &Path,
        id: &str,
        keyring: Arc<RwLock<Keyring>>,
        quota: Quota,
    ) -> Result<Store, StoreError> {
        for sub in ["objects", "tmp"] {
            let d = dir.join(sub);
            std::fs::create_dir_all(&d).map_err(io(&d))?;
        }
        // The 256 shard folders exist from the start, so a write never has to make one (and
        // sync its parent) on the way.
        for shard in 0..=255u8 {
            let d = dir.join("objects").join(hex::encode([shard]));
            std::fs::create_dir_all(&d).map_err(io(&d))?;
        }
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
                .map_err(io(dir))?;
        }
        let store = Store {
            dir: dir.to_owned(),
            id: id.to_owned(),
            keyring,
            quota,
            index: Mutex::new(Index::default()),
            damaged: Mutex::default(),
        };
        // Any failure here returns before the garbage collection: an index that cannot be read
        // names no object, and collecting with it would delete every file's only copy.
        let index_path = store.index_path();
        match std::fs::read(&index_path) {
            Ok(bytes) => {
                let plain = store
                    .unseal(bytes, &store.index_aad())
                    .map_err(|d| StoreError::IndexDamaged(format!("index.sgw: {d}")))?;
                let index: Index = serde_json::from_slice(&plain).map_err(|e| {
                    StoreError::IndexDamaged(format!("index.sgw opens but is not an index: {e}"))
                })?;
                *store.lock() = index;
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                // A new workspace has no objects yet; objects without an index mean it was lost.
                let objects = store.count_objects();
                if objects > 0 {
                    return Err(StoreError::IndexDamaged(format!(
                        "index.sgw is missing, but {objects} stored objects are in objects/"
                    )));
                }
                store.commit(&Index::default())?
            }
            Err(e) => return Err(io(&index_path)(e)),
        }
        store.collect_garbage();
        Ok(store)
    }

    /// How many object files are on disk.
    fn count_objects(&self) -> usize {
        std::fs::read_dir(self.dir.join("objects"))
            .into_iter()
            .flatten()
            .flatten()
            .map(|shard| {
                std::fs::read_dir(shard.path())
                    .into_iter()
                    .flatten()
                    .flatten()
                    .count()
            })
            .sum()
    }

    fn damaged_set(&self) -> std::sync::MutexGuard<'_, BTreeSet<WsPath>> {
        self.damaged.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// `object`, which `path` named, did not open. If the index still names it for `path`, the
    /// file is damaged: remembered, and logged the first time (naming the object on disk and
    /// the workspace, not the path: file names stay out of logs). If a write replaced or
    /// removed it meanwhile, nothing is damaged: [`StoreError::Busy`].
    fn found_damaged(&self, path: &WsPath, object: &str, why: Damage) -> StoreError {
        let index = self.lock();
        if index.entries.get(path).and_then(|e| e.object.as_deref()) != Some(object) {
            return StoreError::Busy(path.clone());
        }
        // Marked under the index lock, so a write that replaces the file (and clears the mark
        // after its commit) cannot come between the check and the mark.
        let new = self.damaged_set().insert(path.clone());
        drop(index);
        if new {
            tracing::warn!(
                workspace = %self.id,
                object = %self.object_path(object).display(),
                reason = %why,
                "a stored file failed its integrity check: it is neither served nor copied to \
                 /workspace; its owner can delete it or save over it, and the rest of the \
                 workspace works"
            );
        }
        StoreError::Tampered(path.to_string())
    }

    /// Whether `path` is known to be damaged (its object failed its check since the store
    /// opened).
    pub fn is_damaged(&self, path: &WsPath) -> bool {
        self.damaged_set().contains(path)
    }

    /// Every path known to be damaged.
    pub fn damaged(&self) -> BTreeSet<WsPath> {
        self.damaged_set().clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Index> {
        self.index.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn index_path(&self) -> PathBuf {
        self.dir.join("index.sgw")
    }

    fn object_path(&self, object: &str) -> PathBuf {
        self.dir
            .join("objects")
            .join(object.get(..2).unwrap_or("00"))
            .join(format!("{object}.sgw"))
    }

    fn index_aad(&self) -> Vec<u8> {
        format!("sandgate-index-v1\0{}", self.id).into_bytes()
    }

    fn object_aad(&self, path: &str, object: &str) -> Vec<u8> {
        format!("sandgate-object-v1\0{}\0{path}\0{object}", self.id).into_bytes()
    }

    fn key(&self, version: u32) -> Result<Secret, StoreError> {
        self.keyring
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .workspace_key(version, &self.id)
            .ok_or(StoreError::NoKey(version))
    }

    fn current_version(&self) -> u32 {
        self.keyring
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .current()
    }

    fn seal(&self, version: u32, aad: &[u8], plain: &[u8]) -> Result<Vec<u8>, StoreError> {
        let key = self.key(version)?;
        let mut aad_v = aad.to_vec();
        aad_v.extend_from_slice(&version.to_le_bytes());
        let mut prefix = [0u8; 8];
        prefix[..4].copy_from_slice(MAGIC);
        prefix[4..].copy_from_slice(&version.to_le_bytes());
        Ok(keys::seal_with_prefix(&key, &aad_v, &prefix, plain))
    }

    /// Opens a sealed file's bytes in place (the content is not copied).
    fn unseal(&self, bytes: Vec<u8>, aad: &[u8]) -> Result<Vec<u8>, Damage> {
        if bytes.len() < 8 || &bytes[..4] != MAGIC {
            return Err(Damage::NotSealed);
        }
        let version = u32::from_le_bytes([bytes[4], bytes[5], bytes[6], bytes[7]]);
        let key = self.key(version).map_err(|_| Damage::NoKey(version))?;
        let mut aad_v = aad.to_vec();
        aad_v.extend_from_slice(&version.to_le_bytes());
        keys::open_owned(&key, &aad_v, bytes, 8).ok_or(Damage::Auth)
    }

    /// Reads and opens a sealed file; a missing file is damage, other I/O errors are not.
    fn read_sealed(&self, file: &Path, aad: &[u8]) -> Result<Result<Vec<u8>, Damage>, StoreError> {
        match std::fs::read(file) {
            Ok(bytes) => Ok(self.unseal(bytes, aad)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Err(Damage::Missing)),
            Err(e) => Err(io(file)(e)),
        }
    }

    /// Replaces the index on disk with `index`, sealed under the current key.
    fn commit(&self, index: &Index) -> Result<(), StoreError> {
        let plain = serde_json::to_vec(index).expect("JSON");
        let sealed = self.seal(self.current_version(), &self.index_aad(), &plain)?;
        write_atomic(&self.dir.join("tmp"), &self.index_path(), &sealed)
    }

    /// Removes objects the index does not name, and stale temporary files.
    fn collect_garbage(&self) {
        let live: HashSet<String> = {
            let index = self.lock();
            index
                .entries
                .values()
                .filter_map(|e| e.object.clone())
                .chain(
                    index
                        .checkpoints
                        .values()
                        .flatten()
                        .map(|c| c.object.clone()),
                )
                .collect()
        };
        let objects = self.dir.join("objects");
        for shard in std::fs::read_dir(&objects).into_iter().flatten().flatten() {
            for file in std::fs::read_dir(shard.path())
                .into_iter()
                .flatten()
                .flatten()
            {
                let name = file.file_name().to_string_lossy().into_owned();
                let id = name.trim_end_matches(".sgw");
                if !live.contains(id) {
                    let _ = std::fs::remove_file(file.path());
                }
            }
        }
        for file in std::fs::read_dir(self.dir.join("tmp"))
            .into_iter()
            .flatten()
            .flatten()
        {
            let _ = std::fs::remove_file(file.path());
        }
    }

    fn write_object(&self, path: &WsPath, data: &[u8]) -> Result<(String, u32), StoreError> {
        let object = random_id();
        let version = self.current_version();
        let sealed = self.seal(version, &self.object_aad(path.as_str(), &object), data)?;
        write_atomic(&self.dir.join("tmp"), &self.object_path(&object), &sealed)?;
        Ok((object, version))
    }

    fn read_object(&self, path: &WsPath, object: &str) -> Result<Vec<u8>, StoreError> {
        let file = self.object_path(object);
        self.read_sealed(&file, &self.object_aad(path.as_str(), object))?
            .map_err(|why| self.found_damaged(path, object, why))
    }

    fn checkpoint_aad(&self, path: &WsPath, id: &str, object: &str) -> Vec<u8> {
        self.object_aad(&format!("{}\0checkpoint\0{id}", path.as_str()), object)
    }

    fn read_checkpoint_object(
        &self,
        path: &WsPath,
        cp: &Checkpoint,
    ) -> Result<Vec<u8>, StoreError> {
        let file = self.object_path(&cp.object);
        self.read_sealed(&file, &self.checkpoint_aad(path, &cp.id, &cp.object))?
            .map_err(|why| {
                tracing::warn!(
                    workspace = %self.id,
                    object = %file.display(),
                    reason = %why,
                    "a stored checkpoint failed its integrity check; it is not served"
                );
                StoreError::Tampered(format!("{path} (checkpoint)"))
            })
    }

    fn remove_objects(&self, objects: impl IntoIterator<Item = String>) {
        for o in objects {
            let _ = std::fs::remove_file(self.object_path(&o));
        }
    }

    /// What the index knows of `path` (the root is a folder).
    pub fn stat(&self, path: &WsPath) -> Result<Entry, StoreError> {
        if path.is_root() {
            let now = Utc::now();
            return Ok(Entry {
                kind: Kind::Dir,
                size: 0,
                created: now,
                modified: now,
                object: None,
                kv: 0,
            });
        }
        self.lock()
            .entries
            .get(path)
            .cloned()
            .ok_or_else(|| StoreError::NotFound(path.clone()))
    }

    /// Whether `path` exists.
    pub fn exists(&self, path: &WsPath) -> bool {
        path.is_root() || self.lock().entries.contains_key(path)
    }

    /// The direct children of folder `dir`.
    pub fn list(&self, dir: &WsPath) -> Result<Vec<(WsPath, Entry)>, StoreError> {
        if self.stat(dir)?.kind != Kind::Dir {
            return Err(StoreError::NotADirectory(dir.clone()));
        }
        Ok(self
            .lock()
            .entries
            .iter()
            .filter(|(p, _)| !p.is_root() && p.parent() == *dir)
            .map(|(p, e)| (p.clone(), e.clone()))
            .collect())
    }

    /// Every path under `dir` (recursively), for syncing.
    pub fn walk(&self) -> Vec<(WsPath, Entry)> {
        self.lock()
            .entries
            .iter()
            .map(|(p, e)| (p.clone(), e.clone()))
            .collect()
    }

    /// Reads a file (again, if a write replaces it while it is read, a few times).
    pub fn read(&self, path: &WsPath) -> Result<(Entry, Vec<u8>), StoreError> {
        for _ in 0..3 {
            let entry = self.stat(path)?;
            let Some(object) = &entry.object else {
                return Err(StoreError::IsADirectory(path.clone()));
            };
            let result = self.read_object(path, object).and_then(|data| {
                if data.len() as u64 == entry.size {
                    Ok(data)
                } else {
                    Err(self.found_damaged(path, object, Damage::Size))
                }
            });
            match result {
                Ok(data) => return Ok((entry, data)),
                Err(StoreError::Busy(_)) => continue,
                Err(e) => return Err(e),
            }
        }
        Err(StoreError::Busy(path.clone()))
    }

    fn check_parent(
        index: &Index,
        path: &WsPath,
        make: bool,
        now: DateTime<Utc>,
        new: &mut Vec<WsPath>,
    ) -> Result<(), StoreError> {
        for a in path.ancestors() {
            match index.entries.get(&a) {
                Some(e) if e.kind == Kind::Dir => {}
                Some(_) => return Err(StoreError::NotADirectory(a)),
                None if make => new.push(a),
                None => return Err(StoreError::NotFound(a)),
            }
        }
        let _ = now;
        Ok(())
    }

    fn check_quota(
        &self,
        index: &Index,
        added_bytes: u64,
        removed_bytes: u64,
        added_files: usize,
    ) -> Result<(), StoreError> {
        let (bytes, files) = index.usage();
        let bytes = bytes.saturating_sub(removed_bytes) + added_bytes;
        if bytes > self.quota.max_bytes {
            return Err(StoreError::Quota(format!(
                "this would hold {bytes} bytes, over the limit of {} bytes",
                self.quota.max_bytes
            )));
        }
        if files + added_files > self.quota.max_files {
            return Err(StoreError::Quota(format!(
                "this would hold {} files and folders, over the limit of {}",
                files + added_files,
                self.quota.max_files
            )));
        }
        Ok(())
    }

    /// Writes a file (replacing it if it exists). With `make_parents`, missing folders are made.
    pub fn write(
        &self,
        path: &WsPath,
        data: &[u8],
        make_parents: bool,
    ) -> Result<Entry, StoreError> {
        if path.is_root() {
            return Err(StoreError::Root);
        }
        // Check before the (slow) object write, and again under the lock before committing.
        self.precheck_write(path, data.len() as u64, make_parents)?;
        let (object, kv) = self.write_object(path, data)?;
        let result = self.commit_write(path, data.len() as u64, object.clone(), kv, make_parents);
        if result.is_err() {
            self.remove_objects([object]);
        }
        result
    }

    fn precheck_write(
        &self,
        path: &WsPath,
        size: u64,
        make_parents: bool,
    ) -> Result<(), StoreError> {
        let index = self.lock();
        let mut new_dirs = Vec::new();
        Self::check_parent(&index, path, make_parents, Utc::now(), &mut new_dirs)?;
        let old = index.entries.get(path);
        if old.is_some_and(|e| e.kind == Kind::Dir) {
            return Err(StoreError::IsADirectory(path.clone()));
        }
        self.check_quota(
            &index,
            size,
            old.map_or(0, |e| e.size),
            new_dirs.len() + usize::from(old.is_none()),
        )
    }

    fn commit_write(
        &self,
        path: &WsPath,
        size: u64,
        object: String,
        kv: u32,
        make_parents: bool,
    ) -> Result<Entry, StoreError> {
        let mut index = self.lock();
        let now = Utc::now();
        let mut new_dirs = Vec::new();
        Self::check_parent(&index, path, make_parents, now, &mut new_dirs)?;
        let old = index.entries.get(path).cloned();
        if old.as_ref().is_some_and(|e| e.kind == Kind::Dir) {
            return Err(StoreError::IsADirectory(path.clone()));
        }
        self.check_quota(
            &index,
            size,
            old.as_ref().map_or(0, |e| e.size),
            new_dirs.len() + usize::from(old.is_none()),
        )?;
        let mut next = index.clone();
        for d in new_dirs {
            next.entries.insert(
                d,
                Entry {
                    kind: Kind::Dir,
                    size: 0,
                    created: now,
                    modified: now,
                    object: None,
                    kv: 0,
                },
            );
        }
        let entry = Entry {
            kind: Kind::File,
            size,
            created: old.as_ref().map_or(now, |e| e.created),
            modified: now,
            object: Some(object),
            kv,
        };
        next.entries.insert(path.clone(), entry.clone());
        self.commit(&next)?;
        *index = next;
        drop(index);
        self.damaged_set().remove(path);
        if let Some(old_object) = old.and_then(|e| e.object) {
            self.remove_objects([old_object]);
        }
        Ok(entry)
    }

    /// Makes a folder (and, with `make_parents`, its missing ancestors).
    pub fn mkdir(&self, path: &WsPath, make_parents: bool) -> Result<Entry, StoreError> {
        if path.is_root() {
            return self.stat(path);
        }
        let mut index = self.lock();
        let now = Utc::now();
        if let Some(e) = index.entries.get(path) {
            return if e.kind == Kind::Dir {
                Ok(e.clone())
            } else {
                Err(StoreError::Exists(path.clone()))
            };
        }
        let mut new_dirs = Vec::new();
        Self::check_parent(&index, path, make_parents, now, &mut new_dirs)?;
        self.check_quota(&index, 0, 0, new_dirs.len() + 1)?;
        let mut next = index.clone();
        let entry = Entry {
            kind: Kind::Dir,
            size: 0,
            created: now,
            modified: now,
            object: None,
            kv: 0,
        };
        for d in new_dirs {
            next.entries.insert(d, entry.clone());
        }
        next.entries.insert(path.clone(), entry.clone());
        self.commit(&next)?;
        *index = next;
        Ok(entry)
    }

    /// Deletes a file, or a folder with everything in it.
    pub fn delete(&self, path: &WsPath) -> Result<(), StoreError> {
        if path.is_root() {
            return Err(StoreError::Root);
        }
        let mut index = self.lock();
        if !index.entries.contains_key(path) {
            return Err(StoreError::NotFound(path.clone()));
        }
        let mut next = index.clone();
        let mut dead = Vec::new();
        next.entries.retain(|p, e| {
            let gone = p.starts_with(path);
            if gone && let Some(o) = &e.object {
                dead.push(o.clone());
            }
            !gone
        });
        next.checkpoints.retain(|p, cps| {
            let gone = p.starts_with(path);
            if gone {
                dead.extend(cps.iter().map(|c| c.object.clone()));
            }
            !gone
        });
        self.commit(&next)?;
        *index = next;
        drop(index);
        self.damaged_set().retain(|p| !p.starts_with(path));
        self.remove_objects(dead);
        Ok(())
    }

    /// Renames a file or folder. The target must not exist; contents are re-sealed, since a
    /// file's path is bound into its encryption.
    pub fn rename(&self, from: &WsPath, to: &WsPath) -> Result<Entry, StoreError> {
        if from.is_root() || to.is_root() {
            return Err(StoreError::Root);
        }
        if from == to {
            return self.stat(from);
        }
        if to.starts_with(from) {
            return Err(StoreError::IntoItself(from.clone()));
        }
        let moves: Vec<(WsPath, WsPath, Entry)> = {
            let index = self.lock();
            if !index.entries.contains_key(from) {
                return Err(StoreError::NotFound(from.clone()));
            }
            if index.entries.contains_key(to) {
                return Err(StoreError::Exists(to.clone()));
            }
            let mut none = Vec::new();
            Self::check_parent(&index, to, false, Utc::now(), &mut none)?;
            index
                .entries
                .iter()
                .filter(|(p, _)| p.starts_with(from))
                .map(|(p, e)| {
                    let rest = &p.as_str()[from.as_str().len()..];
                    let target = WsPath::parse(&format!("{}{rest}", to.as_str()))
                        .expect("a renamed valid path is valid");
                    (p.clone(), target, e.clone())
                })
                .collect()
        };
        // Re-seal each file under its new path, into new objects.
        let mut written = Vec::new();
        let mut renamed = Vec::new();
        for (old, new, entry) in &moves {
            let mut e = entry.clone();
            if let Some(object) = &entry.object {
                let data = match self.read_object(old, object) {
                    Ok(d) => d,
                    Err(err) => {
                        self.remove_objects(written);
                        return Err(err);
                    }
                };
                match self.write_object(new, &data) {
                    Ok((o, kv)) => {
                        written.push(o.clone());
                        e.object = Some(o);
                        e.kv = kv;
                    }
                    Err(err) => {
                        self.remove_objects(written);
                        return Err(err);
                    }
                }
            }
            renamed.push((old.clone(), new.clone(), e));
        }
        let mut index = self.lock();
        let mut next = index.clone();
        let mut dead = Vec::new();
        for (old, new, e) in renamed {
            if let Some(o) = next.entries.remove(&old).and_then(|x| x.object) {
                dead.push(o);
            }
            next.entries.insert(new, e);
        }
        // Checkpoints of moved files are dropped (their content is sealed to the old path).
        next.checkpoints.retain(|p, cps| {
            let gone = p.starts_with(from);
            if gone {
                dead.extend(cps.iter().map(|c| c.object.clone()));
            }
            !gone
        });
        if let Err(err) = self.commit(&next) {
            drop(index);
            self.remove_objects(written);
            return Err(err);
        }
        *index = next;
        let entry = index
            .entries
            .get(to)
            .cloned()
            .ok_or_else(|| StoreError::NotFound(to.clone()))?;
        drop(index);
        self.remove_objects(dead);
        Ok(entry)
    }

    /// The quota (a setting: reading it waits for nothing).
    pub fn quota(&self) -> Quota {
        self.quota
    }

    /// Holds the index lock, as a write in progress does (for tests of what must not wait).
    #[cfg(test)]
    pub(crate) fn hold_index(&self) -> impl Sized + '_ {
        self.lock()
    }

    /// Bytes and entries used, and the quota.
    pub fn usage(&self) -> (u64, usize, Quota) {
        let (b, f) = self.lock().usage();
        (b, f, self.quota)
    }

    /// Saves the current content of file `path` as a checkpoint (Jupyter keeps one per file:
    /// a new one replaces the old).
    pub fn create_checkpoint(&self, path: &WsPath) -> Result<Checkpoint, StoreError> {
        let (entry, data) = self.read(path)?;
        let id = "checkpoint".to_owned();
        let object = random_id();
        let kv = self.current_version();
        let sealed = self.seal(kv, &self.checkpoint_aad(path, &id, &object), &data)?;
        {
            let index = self.lock();
            let old = index
                .checkpoints
                .get(path)
                .map_or(0, |c| c.iter().map(|c| c.size).sum());
            self.check_quota(&index, entry.size, old, 0)?;
        }
        write_atomic(&self.dir.join("tmp"), &self.object_path(&object), &sealed)?;
        let cp = Checkpoint {
            id,
            modified: entry.modified,
            object,
            size: entry.size,
            kv,
        };
        let mut index = self.lock();
        let mut next = index.clone();
        let old = next
            .checkpoints
            .insert(path.clone(), vec![cp.clone()])
            .unwrap_or_default();
        self.commit(&next)?;
        *index = next;
        drop(index);
        self.remove_objects(old.into_iter().map(|c| c.object));
        Ok(cp)
    }

    /// The checkpoints of `path`.
    pub fn checkpoints(&self, path: &WsPath) -> Result<Vec<Checkpoint>, StoreError> {
        self.stat(path)?;
        Ok(self
            .lock()
            .checkpoints
            .get(path)
            .cloned()
            .unwrap_or_default())
    }

    /// The content saved in checkpoint `id` of `path`.
    pub fn read_checkpoint(&self, path: &WsPath, id: &str) -> Result<Vec<u8>, StoreError> {
        let cp = self
            .checkpoints(path)?
            .into_iter()
            .find(|c| c.id == id)
            .ok_or_else(|| StoreError::NoCheckpoint(path.clone(), id.to_owned()))?;
        self.read_checkpoint_object(path, &cp)
    }

    /// Puts checkpoint `id`'s content back into `path`.
    pub fn restore_checkpoint(&self, path: &WsPath, id: &str) -> Result<Entry, StoreError> {
        let data = self.read_checkpoint(path, id)?;
        self.write(path, &data, false)
    }

    /// Deletes checkpoint `id` of `path`.
    pub fn delete_checkpoint(&self, path: &WsPath, id: &str) -> Result<(), StoreError> {
        let mut index = self.lock();
        let mut next = index.clone();
        let list = next.checkpoints.entry(path.clone()).or_default();
        let Some(pos) = list.iter().position(|c| c.id == id) else {
            return Err(StoreError::NoCheckpoint(path.clone(), id.to_owned()));
        };
        let cp = list.remove(pos);
        if list.is_empty() {
            next.checkpoints.remove(path);
        }
        self.commit(&next)?;
        *index = next;
        drop(index);
        self.remove_objects([cp.object]);
        Ok(())
    }

    /// Re-seals every object and the index under the current key version. Safe to interrupt
    /// and run again: each file is committed on its own, and a file already under the current
    /// key is skipped. A damaged file or checkpoint is left as it is and counted: the caller
    /// must keep the old key while any is left, so a backup of it can still be read.
    pub fn reencrypt(&self) -> Result<Reencrypted, StoreError> {
        let current = self.current_version();
        let stale: Vec<(WsPath, Entry)> = self
            .lock()
            .entries
            .iter()
            .filter(|(_, e)| e.object.is_some() && e.kv != current)
            .map(|(p, e)| (p.clone(), e.clone()))
            .collect();
        let mut report = Reencrypted::default();
        for (path, entry) in stale {
            let object = entry.object.clone().expect("filtered on files");
            let data = match self.read_object(&path, &object) {
                Ok(d) => d,
                Err(StoreError::Tampered(_)) => {
                    report.damaged += 1;
                    continue;
                }
                // Replaced meanwhile: the new version is sealed under the current key.
                Err(StoreError::Busy(_)) => continue,
                Err(e) => return Err(e),
            };
            let (new_object, kv) = self.write_object(&path, &data)?;
            let mut index = self.lock();
            let mut next = index.clone();
            if let Some(e) = next.entries.get_mut(&path)
                && e.object.as_deref() == Some(object.as_str())
            {
                e.object = Some(new_object.clone());
                e.kv = kv;
            } else {
                drop(index);
                self.remove_objects([new_object]);
                continue;
            }
            self.commit(&next)?;
            *index = next;
            drop(index);
            self.remove_objects([object]);
            report.resealed += 1;
        }
        // Checkpoints: each one's content re-sealed under the new key.
        let with_checkpoints: Vec<(WsPath, Vec<Checkpoint>)> = self
            .lock()
            .checkpoints
            .iter()
            .filter(|(_, cps)| cps.iter().any(|c| c.kv != current))
            .map(|(p, c)| (p.clone(), c.clone()))
            .collect();
        for (path, cps) in with_checkpoints {
            for cp in cps.into_iter().filter(|c| c.kv != current) {
                let data = match self.read_checkpoint_object(&path, &cp) {
                    Ok(d) => d,
                    Err(StoreError::Tampered(_)) => {
                        report.damaged += 1;
                        continue;
                    }
                    Err(e) => return Err(e),
                };
                let object = random_id();
                let aad = self.checkpoint_aad(&path, &cp.id, &object);
                let sealed = self.seal(current, &aad, &data)?;
                write_atomic(&self.dir.join("tmp"), &self.object_path(&object), &sealed)?;
                let mut index = self.lock();
                let mut next = index.clone();
                if let Some(list) = next.checkpoints.get_mut(&path)
                    && let Some(c) = list.iter_mut().find(|c| c.id == cp.id)
                {
                    c.object = object;
                    c.kv = current;
                }
                self.commit(&next)?;
                *index = next;
                drop(index);
                self.remove_objects([cp.object]);
                report.resealed += 1;
            }
        }
        // The index itself, under the current key.
        let index = self.lock();
        self.commit(&index)?;
        Ok(report)
    }

    /// Where this store lives on disk.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::workspace::keys::MasterSource;

    fn store_in(dir: &Path, quota: Quota) -> (Store, Arc<RwLock<Keyring>>) {
        let ring =
            Keyring::open_or_create(&dir.join("keys.json"), &MasterSource::Key(Secret([7; 32])))
                .unwrap();
        let ring = Arc::new(RwLock::new(ring));
        (
            Store::open(&dir.join("ws"), "default", ring.clone(), quota).unwrap(),
            ring,
        )
    }

    /// A scratch folder, removed when dropped.
    fn tmp() -> tempfile::TempDir {
        tempfile::tempdir().unwrap()
    }

    const BIG: Quota = Quota {
        max_bytes: 1 << 30,
        max_files: 10_000,
    };

    fn p(s: &str) -> WsPath {
        WsPath::parse(s).unwrap()
    }

    #[test]
    fn round_trip_survives_reopen_and_hides_plaintext() {
        let scratch = tmp();
        let dir = scratch.path().to_path_buf();
        {
            let (s, _) = store_in(&dir, BIG);
            s.write(&p("data/sales.csv"), b"month,revenue\nJan,120\n", true)
                .unwrap();
            assert_eq!(s.stat(&p("data")).unwrap().kind, Kind::Dir);
        }
        let (s, _) = store_in(&dir, BIG);
        assert_eq!(
            s.read(&p("data/sales.csv")).unwrap().1,
            b"month,revenue\nJan,120\n"
        );
        assert_eq!(s.list(&WsPath::root()).unwrap().len(), 1);
        for f in walk(&dir) {
            let bytes = std::fs::read(&f).unwrap();
            assert!(
                !contains(&bytes, b"revenue") && !contains(&bytes, b"sales.csv"),
                "{f:?}"
            );
        }
    }

    fn walk(dir: &Path) -> Vec<PathBuf> {
        let mut out = vec![];
        for e in std::fs::read_dir(dir).unwrap().flatten() {
            if e.path().is_dir() {
                out.extend(walk(&e.path()));
            } else {
                out.push(e.path());
            }
        }
        out
    }

    fn contains(hay: &[u8], needle: &[u8]) -> bool {
        hay.windows(needle.len()).any(|w| w == needle)
    }

    #[test]
    fn a_flipped_byte_or_a_swap_is_detected() {
        let scratch = tmp();
        let dir = scratch.path().to_path_buf();
        let (s, _) = store_in(&dir, BIG);
        s.write(&p("a.txt"), b"alpha", false).unwrap();
        s.write(&p("b.txt"), b"bravo", false).unwrap();
        let obj = |name: &str| s.object_path(s.stat(&p(name)).unwrap().object.as_ref().unwrap());
        // Swap the two objects: each now fails its path binding.
        let (a, b) = (
            std::fs::read(obj("a.txt")).unwrap(),
            std::fs::read(obj("b.txt")).unwrap(),
        );
        std::fs::write(obj("a.txt"), &b).unwrap();
        std::fs::write(obj("b.txt"), &a).unwrap();
        let err = s.read(&p("a.txt")).unwrap_err();
        assert!(
            matches!(&err, StoreError::Tampered(n) if n == "a.txt"),
            "{err}"
        );
        // A flipped byte.
        let mut c = a.clone();
        let last = c.len() - 1;
        c[last] ^= 1;
        std::fs::write(obj("b.txt"), &c).unwrap();
        assert!(matches!(
            s.read(&p("b.txt")).unwrap_err(),
            StoreError::Tampered(_)
        ));
        // A truncated index.
        let index = s.index_path();
        let bytes = std::fs::read(&index).unwrap();
        std::fs::write(&index, &bytes[..bytes.len() / 2]).unwrap();
        drop(s);
        let ring =
            Keyring::open_or_create(&dir.join("keys.json"), &MasterSource::Key(Secret([7; 32])))
                .unwrap();
        let err =
            Store::open(&dir.join("ws"), "default", Arc::new(RwLock::new(ring)), BIG).unwrap_err();
        assert!(err.to_string().contains("workspace index"), "{err}");
    }

    #[test]
    fn rename_delete_and_conflicts() {
        let scratch = tmp();
        let dir = scratch.path().to_path_buf();
        let (s, _) = store_in(&dir, BIG);
        s.write(&p("d/x.txt"), b"x", true).unwrap();
        s.write(&p("y.txt"), b"y", false).unwrap();
        assert!(matches!(
            s.rename(&p("y.txt"), &p("d/x.txt")),
            Err(StoreError::Exists(_))
        ));
        assert!(matches!(
            s.rename(&p("d"), &p("d/e")),
            Err(StoreError::IntoItself(_))
        ));
        s.rename(&p("d"), &p("e")).unwrap();
        assert_eq!(s.read(&p("e/x.txt")).unwrap().1, b"x");
        assert!(!s.exists(&p("d/x.txt")));
        assert!(matches!(
            s.write(&p("nope/z.txt"), b"z", false),
            Err(StoreError::NotFound(_))
        ));
        s.delete(&p("e")).unwrap();
        assert!(!s.exists(&p("e/x.txt")));
        assert_eq!(
            walk(&dir.join("ws/objects")).len(),
            1,
            "only y.txt's object is left"
        );
    }

    #[test]
    fn quotas_give_clear_errors() {
        let scratch = tmp();
        let dir = scratch.path().to_path_buf();
        let (s, _) = store_in(
            &dir,
            Quota {
                max_bytes: 10,
                max_files: 3,
            },
        );
        s.write(&p("a"), b"12345", false).unwrap();
        let err = s.write(&p("b"), b"1234567", false).unwrap_err();
        assert!(
            err.to_string().contains("over the limit of 10 bytes"),
            "{err}"
        );
        s.write(&p("a"), b"1234567890", false).unwrap();
        s.mkdir(&p("d1"), false).unwrap();
        s.mkdir(&p("d2"), false).unwrap();
        let err = s.mkdir(&p("d3"), false).unwrap_err();
        assert!(err.to_string().contains("over the limit of 3"), "{err}");
        assert_eq!(walk(&dir.join("ws/tmp")).len(), 0);
    }

    #[test]
    fn a_crash_before_the_index_commit_keeps_the_old_version() {
        let scratch = tmp();
        let dir = scratch.path().to_path_buf();
        let (s, _) = store_in(&dir, BIG);
        s.write(&p("n.txt"), b"old", false).unwrap();
        // What a crash between the object write and the index commit leaves: a new object
        // nobody names, and a temporary file.
        s.write_object(&p("n.txt"), b"new").unwrap();
        std::fs::write(dir.join("ws/tmp/x.tmp"), b"half").unwrap();
        drop(s);
        let (s, _) = store_in(&dir, BIG);
        assert_eq!(s.read(&p("n.txt")).unwrap().1, b"old");
        assert_eq!(walk(&dir.join("ws/objects")).len(), 1);
        assert_eq!(walk(&dir.join("ws/tmp")).len(), 0);
    }

    #[test]
    fn checkpoints_and_rotation() {
        let scratch = tmp();
        let dir = scratch.path().to_path_buf();
        let (s, ring) = store_in(&dir, BIG);
        s.write(&p("nb.ipynb"), b"v1", false).unwrap();
        let cp = s.create_checkpoint(&p("nb.ipynb")).unwrap();
        s.write(&p("nb.ipynb"), b"v2", false).unwrap();
        s.restore_checkpoint(&p("nb.ipynb"), &cp.id).unwrap();
        assert_eq!(s.read(&p("nb.ipynb")).unwrap().1, b"v1");
        ring.write().unwrap().begin_rotation().unwrap();
        assert_eq!(s.reencrypt().unwrap().resealed, 2);
        ring.write().unwrap().retire().unwrap();
        drop(s);
        let (s, _) = store_in(&dir, BIG);
        assert_eq!(s.read(&p("nb.ipynb")).unwrap().1, b"v1");
        s.restore_checkpoint(&p("nb.ipynb"), "checkpoint").unwrap();
        s.delete_checkpoint(&p("nb.ipynb"), "checkpoint").unwrap();
        assert!(s.checkpoints(&p("nb.ipynb")).unwrap().is_empty());
    }

    /// Damages `file` on disk as a test asks.
    fn damage(file: &Path, how: &str) {
        let mut b = std::fs::read(file).unwrap();
        match how {
            "flip" => {
                let mid = b.len() / 2;
                b[mid] ^= 0x01;
            }
            "truncate" => b.truncate(b.len() / 2),
            "header" => b[5] ^= 0x01,
            "remove" => {
                std::fs::remove_file(file).unwrap();
                return;
            }
            _ => unreachable!(),
        }
        std::fs::write(file, b).unwrap();
    }

    #[test]
    fn a_damaged_object_costs_that_file_only() {
        let scratch = tmp();
        let dir = scratch.path().to_path_buf();
        let hows = ["flip", "truncate", "header", "remove"];
        {
            let (s, _) = store_in(&dir, BIG);
            s.write(&p("good.txt"), b"still good", false).unwrap();
            s.write(&p("d/also-good.txt"), b"also good", true).unwrap();
            for how in hows {
                s.write(&p(&format!("d/{how}.txt")), b"old text", true)
                    .unwrap();
                s.write(&p(&format!("d/{how}.txt")), b"precious text", true)
                    .unwrap();
                let object = s.stat(&p(&format!("d/{how}.txt"))).unwrap().object.unwrap();
                damage(&s.object_path(&object), how);
            }
        }
        let objects_before = walk(&dir.join("ws/objects")).len();
        // The store opens; nothing is collected; every other file reads.
        let (s, _) = store_in(&dir, BIG);
        assert_eq!(walk(&dir.join("ws/objects")).len(), objects_before);
        assert_eq!(s.read(&p("good.txt")).unwrap().1, b"still good");
        assert_eq!(s.read(&p("d/also-good.txt")).unwrap().1, b"also good");
        assert!(s.damaged().is_empty(), "nothing is known before it is read");
        for how in hows {
            let path = p(&format!("d/{how}.txt"));
            let err = s.read(&path).unwrap_err();
            assert!(
                matches!(&err, StoreError::Tampered(n) if *n == path.to_string()),
                "{how}: {err}"
            );
            assert!(err.to_string().contains("delete it"), "{err}");
            assert!(s.is_damaged(&path), "{how}");
            // Still listed, under its own name.
            assert!(s.list(&p("d")).unwrap().iter().any(|(q, _)| *q == path));
            // A rename needs the content: refused, naming the damaged file.
            let err = s.rename(&path, &p("moved.txt")).unwrap_err();
            assert!(matches!(err, StoreError::Tampered(_)), "{err}");
        }
        assert_eq!(s.damaged().len(), hows.len());
        // A read that lost a race with a save (its object replaced, or removed, meanwhile) is
        // not damage.
        s.write(&p("raced.txt"), b"v1", false).unwrap();
        let old = s.stat(&p("raced.txt")).unwrap().object.unwrap();
        s.write(&p("raced.txt"), b"v2", false).unwrap();
        let err = s.found_damaged(&p("raced.txt"), &old, Damage::Missing);
        assert!(matches!(err, StoreError::Busy(_)), "{err}");
        assert!(!s.is_damaged(&p("raced.txt")));
        assert_eq!(s.read(&p("raced.txt")).unwrap().1, b"v2");
        // Saving over a damaged file, or deleting it, clears it.
        s.write(&p("d/flip.txt"), b"new text", false).unwrap();
        assert_eq!(s.read(&p("d/flip.txt")).unwrap().1, b"new text");
        assert!(!s.is_damaged(&p("d/flip.txt")));
        s.delete(&p("d/truncate.txt")).unwrap();
        assert!(!s.exists(&p("d/truncate.txt")));
        assert!(!s.is_damaged(&p("d/truncate.txt")));
        // A folder holding damaged files is deleted whole.
        s.delete(&p("d")).unwrap();
        assert!(s.damaged().is_empty());
        assert_eq!(s.read(&p("good.txt")).unwrap().1, b"still good");
    }

    #[test]
    fn a_damaged_index_touches_nothing_and_a_backup_brings_everything_back() {
        let scratch = tmp();
        let dir = scratch.path().to_path_buf();
        {
            let (s, _) = store_in(&dir, BIG);
            s.write(&p("a.txt"), b"alpha", false).unwrap();
            s.write(&p("d/b.txt"), b"bravo", true).unwrap();
        }
        let index = dir.join("ws/index.sgw");
        let backup = std::fs::read(&index).unwrap();
        let sorted = |d: &Path| {
            let mut v = walk(d);
            v.sort();
            v
        };
        let objects = sorted(&dir.join("ws/objects"));
        assert_eq!(objects.len(), 2);
        let ring = || {
            Arc::new(RwLock::new(
                Keyring::open_or_create(
                    &dir.join("keys.json"),
                    &MasterSource::Key(Secret([7; 32])),
                )
                .unwrap(),
            ))
        };
        for how in ["flip", "truncate", "header", "remove"] {
            std::fs::write(&index, &backup).unwrap();
            damage(&index, how);
            let err = Store::open(&dir.join("ws"), "default", ring(), BIG).unwrap_err();
            assert!(matches!(err, StoreError::IndexDamaged(_)), "{how}: {err}");
            if how == "remove" {
                assert!(err.to_string().contains("missing"), "{err}");
            }
            // No garbage collection ran, and no new index was written over the damaged one.
            assert_eq!(sorted(&dir.join("ws/objects")), objects, "{how}");
            assert_eq!(index.exists(), how != "remove", "{how}");
        }
        // Another workspace's index does not open this one's either (it is bound to its id).
        std::fs::write(&index, &backup).unwrap();
        let err = Store::open(&dir.join("ws"), "other", ring(), BIG).unwrap_err();
        assert!(matches!(err, StoreError::IndexDamaged(_)), "{err}");
        assert_eq!(sorted(&dir.join("ws/objects")), objects);
        // The index put back from a backup: everything is there.
        let s = Store::open(&dir.join("ws"), "default", ring(), BIG).unwrap();
        assert_eq!(s.read(&p("d/b.txt")).unwrap().1, b"bravo");
        // A new workspace (no index, no objects) still starts empty.
        let fresh = Store::open(&dir.join("new"), "new", ring(), BIG).unwrap();
        assert!(fresh.list(&WsPath::root()).unwrap().is_empty());
    }

    #[test]
    fn a_damaged_checkpoint_is_an_error_naming_it() {
        let scratch = tmp();
        let dir = scratch.path().to_path_buf();
        let (s, _) = store_in(&dir, BIG);
        s.write(&p("nb.ipynb"), b"v1", false).unwrap();
        let cp = s.create_checkpoint(&p("nb.ipynb")).unwrap();
        damage(&s.object_path(&cp.object), "remove");
        let err = s.read_checkpoint(&p("nb.ipynb"), &cp.id).unwrap_err();
        assert!(
            matches!(&err, StoreError::Tampered(n) if n == "nb.ipynb (checkpoint)"),
            "{err}"
        );
        s.delete_checkpoint(&p("nb.ipynb"), &cp.id).unwrap();
        assert_eq!(s.read(&p("nb.ipynb")).unwrap().1, b"v1");
    }

    #[test]
    fn rotation_leaves_damaged_files_under_the_old_key() {
        let scratch = tmp();
        let dir = scratch.path().to_path_buf();
        let (s, ring) = store_in(&dir, BIG);
        s.write(&p("a.txt"), b"alpha", false).unwrap();
        s.write(&p("b.txt"), b"bravo", false).unwrap();
        let object = s.stat(&p("b.txt")).unwrap().object.unwrap();
        damage(&s.object_path(&object), "flip");
        ring.write().unwrap().begin_rotation().unwrap();
        let done = s.reencrypt().unwrap();
        assert_eq!(
            done,
            Reencrypted {
                resealed: 1,
                damaged: 1
            }
        );
        assert_eq!(s.stat(&p("b.txt")).unwrap().kv, 1);
        assert_eq!(s.stat(&p("a.txt")).unwrap().kv, 2);
        assert_eq!(s.read(&p("a.txt")).unwrap().1, b"alpha");
    }
}
