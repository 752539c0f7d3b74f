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

use std::collections::{BTreeMap, HashSet};
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
    /// A stored file failed its integrity check.
    #[error(
        "the stored copy of {0} failed its integrity check (it was changed or truncated on disk); \
         it was not read"
    )]
    Tampered(String),
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
        };
        let index_path = store.index_path();
        match std::fs::read(&index_path) {
            Ok(bytes) => {
                let plain = store.unseal(bytes, &store.index_aad(), "the workspace index")?;
                let index: Index = serde_json::from_slice(&plain)
                    .map_err(|_| StoreError::Tampered("the workspace index".into()))?;
                *store.lock() = index;
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => store.commit(&Index::default())?,
            Err(e) => return Err(io(&index_path)(e)),
        }
        store.collect_garbage();
        Ok(store)
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
    fn unseal(&self, bytes: Vec<u8>, aad: &[u8], what: &str) -> Result<Vec<u8>, StoreError> {
        let tampered = || StoreError::Tampered(what.to_owned());
        if bytes.len() < 8 || &bytes[..4] != MAGIC {
            return Err(tampered());
        }
        let version = u32::from_le_bytes([bytes[4], bytes[5], bytes[6], bytes[7]]);
        let key = self.key(version)?;
        let mut aad_v = aad.to_vec();
        aad_v.extend_from_slice(&version.to_le_bytes());
        keys::open_owned(&key, &aad_v, bytes, 8).ok_or_else(tampered)
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

    fn read_object(&self, path: &str, object: &str) -> Result<Vec<u8>, StoreError> {
        let file = self.object_path(object);
        let bytes = match std::fs::read(&file) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(StoreError::Tampered(path.to_owned()));
            }
            Err(e) => return Err(io(&file)(e)),
        };
        self.unseal(bytes, &self.object_aad(path, object), path)
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

    /// Reads a file.
    pub fn read(&self, path: &WsPath) -> Result<(Entry, Vec<u8>), StoreError> {
        let entry = self.stat(path)?;
        let Some(object) = &entry.object else {
            return Err(StoreError::IsADirectory(path.clone()));
        };
        let data = self.read_object(path.as_str(), object)?;
        if data.len() as u64 != entry.size {
            return Err(StoreError::Tampered(path.to_string()));
        }
        Ok((entry, data))
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
                let data = match self.read_object(old.as_str(), object) {
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
        let aad = self.object_aad(&format!("{}\0checkpoint\0{id}", path.as_str()), &object);
        let sealed = self.seal(kv, &aad, &data)?;
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
        let file = self.object_path(&cp.object);
        let bytes = std::fs::read(&file).map_err(io(&file))?;
        let aad = self.object_aad(&format!("{}\0checkpoint\0{id}", path.as_str()), &cp.object);
        self.unseal(bytes, &aad, &format!("{path} (checkpoint)"))
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

    /// Re-seals every object and the index under the current key version; returns how many
    /// objects were re-sealed. Safe to interrupt and run again: each file is committed on its
    /// own, and a file already under the current key is skipped.
    pub fn reencrypt(&self) -> Result<usize, StoreError> {
        let current = self.current_version();
        let stale: Vec<(WsPath, Entry)> = self
            .lock()
            .entries
            .iter()
            .filter(|(_, e)| e.object.is_some() && e.kv != current)
            .map(|(p, e)| (p.clone(), e.clone()))
            .collect();
        let mut done = 0;
        for (path, entry) in stale {
            let object = entry.object.clone().expect("filtered on files");
            let data = self.read_object(path.as_str(), &object)?;
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
            done += 1;
        }
        // Checkpoints are re-taken from the current content under the new key.
        let with_checkpoints: Vec<(WsPath, Vec<Checkpoint>)> = self
            .lock()
            .checkpoints
            .iter()
            .filter(|(_, cps)| cps.iter().any(|c| c.kv != current))
            .map(|(p, c)| (p.clone(), c.clone()))
            .collect();
        for (path, cps) in with_checkpoints {
            for cp in cps {
                let file = self.object_path(&cp.object);
                let bytes = std::fs::read(&file).map_err(io(&file))?;
                let aad = self.object_aad(
                    &format!("{}\0checkpoint\0{}", path.as_str(), cp.id),
                    &cp.object,
                );
                let data = self.unseal(bytes, &aad, &format!("{path} (checkpoint)"))?;
                let object = random_id();
                let aad = self.object_aad(
                    &format!("{}\0checkpoint\0{}", path.as_str(), cp.id),
                    &object,
                );
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
                done += 1;
            }
        }
        // The index itself, under the current key.
        let index = self.lock();
        self.commit(&index)?;
        Ok(done)
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
        assert_eq!(s.reencrypt().unwrap(), 2);
        ring.write().unwrap().retire().unwrap();
        drop(s);
        let (s, _) = store_in(&dir, BIG);
        assert_eq!(s.read(&p("nb.ipynb")).unwrap().1, b"v1");
        s.restore_checkpoint(&p("nb.ipynb"), "checkpoint").unwrap();
        s.delete_checkpoint(&p("nb.ipynb"), "checkpoint").unwrap();
        assert!(s.checkpoints(&p("nb.ipynb")).unwrap().is_empty());
    }
}
