//! Keys of the encrypted workspace, in layers (as LUKS does it):
//!
//! - a **master key** `M` that never sits on disk in plaintext. It comes from, in order:
//!   `$SANDGATE_MASTER_KEY` (64 hex digits), the file named by `workspace.master_key_file` (a
//!   secret the operator mounts), or a key slot in `DATA_DIR/keys.json` that wraps `M` under a
//!   key stretched with PBKDF2-HMAC-SHA256 from a passphrase (`$SANDGATE_PASSPHRASE`) or, by
//!   default, from the access token (which is itself only stored as a hash);
//! - **data keys** `D_v`, random, numbered by version, stored in `keys.json` sealed under `M`.
//!   Rotation adds `D_{v+1}`, re-encrypts every file, then drops `D_v`;
//! - **workspace keys** `HKDF-SHA256(D_v, workspace id)`, one per workspace, which encrypt its
//!   files with AES-256-GCM.
//!
//! `keys.json` holds only sealed material, a check value that tells a wrong master key from a
//! damaged file, public parameters (salts, iteration counts), and a SHA-256 of the rest, so a
//! changed byte anywhere (bit rot, a bad copy) is reported as damage rather than as a wrong
//! key. The checksum guards against accidents, not attackers (who could recompute it); what
//! guards the keys is that they are sealed.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use ring::aead::{self, Aad, LessSafeKey, Nonce, UnboundKey};
use ring::rand::{SecureRandom, SystemRandom};
use serde::{Deserialize, Serialize};
use zeroize::Zeroize;

/// PBKDF2 iterations for new key slots (OWASP's 2023 figure for PBKDF2-HMAC-SHA256).
pub const PBKDF2_ITERATIONS: u32 = 600_000;
const NONCE_LEN: usize = 12;
const CHECK_PLAINTEXT: &[u8] = b"sandgate keys check";

/// A 256-bit key, wiped from memory when dropped.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(pub [u8; 32]);

impl Drop for Secret {
    fn drop(&mut self) {
        self.0.zeroize();
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(..)")
    }
}

impl Secret {
    /// A fresh random key.
    pub fn random() -> Secret {
        let mut k = [0u8; 32];
        SystemRandom::new()
            .fill(&mut k)
            .expect("the system random source works");
        Secret(k)
    }

    /// Parses 64 hex digits.
    pub fn from_hex(text: &str) -> Option<Secret> {
        let mut bytes = hex::decode(text.trim()).ok()?;
        if bytes.len() != 32 {
            bytes.zeroize();
            return None;
        }
        let mut k = [0u8; 32];
        k.copy_from_slice(&bytes);
        bytes.zeroize();
        Some(Secret(k))
    }
}

/// Errors about keys.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// No way to get the master key.
    #[error(
        "the workspace is locked: give its master key ($SANDGATE_MASTER_KEY or \
         workspace.master_key_file), its passphrase ($SANDGATE_PASSPHRASE), or the access token"
    )]
    Locked,
    /// The secret given does not open the key file.
    #[error("{0} does not open {1}: wrong key, passphrase or token")]
    Wrong(&'static str, PathBuf),
    /// The key file is damaged.
    #[error("the key file {path} is damaged: {reason}")]
    Damaged {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// Reading or writing it failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// Seals `plaintext` with AES-256-GCM under `key`: `nonce || ciphertext || tag`, with a fresh
/// random nonce.
pub fn seal(key: &Secret, aad: &[u8], plaintext: &[u8]) -> Vec<u8> {
    let mut nonce = [0u8; NONCE_LEN];
    SystemRandom::new()
        .fill(&mut nonce)
        .expect("the system random source works");
    let key = LessSafeKey::new(UnboundKey::new(&aead::AES_256_GCM, &key.0).expect("32-byte key"));
    let mut out = Vec::with_capacity(NONCE_LEN + plaintext.len() + aead::AES_256_GCM.tag_len());
    out.extend_from_slice(&nonce);
    out.extend_from_slice(plaintext);
    let tag = key
        .seal_in_place_separate_tag(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(aad),
            &mut out[NONCE_LEN..],
        )
        .expect("AES-GCM seals any length we use");
    out.extend_from_slice(tag.as_ref());
    out
}

/// Seals `plaintext` after `prefix` in one buffer: `prefix || nonce || ciphertext || tag`.
pub fn seal_with_prefix(key: &Secret, aad: &[u8], prefix: &[u8], plaintext: &[u8]) -> Vec<u8> {
    let mut nonce = [0u8; NONCE_LEN];
    SystemRandom::new()
        .fill(&mut nonce)
        .expect("the system random source works");
    let key = LessSafeKey::new(UnboundKey::new(&aead::AES_256_GCM, &key.0).expect("32-byte key"));
    let start = prefix.len() + NONCE_LEN;
    let mut out = Vec::with_capacity(start + plaintext.len() + aead::AES_256_GCM.tag_len());
    out.extend_from_slice(prefix);
    out.extend_from_slice(&nonce);
    out.extend_from_slice(plaintext);
    let tag = key
        .seal_in_place_separate_tag(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(aad),
            &mut out[start..],
        )
        .expect("AES-GCM seals any length we use");
    out.extend_from_slice(tag.as_ref());
    out
}

/// Opens, in place, what [`seal_with_prefix`] made with a prefix of `skip` bytes, and returns
/// the plaintext in the same buffer (no copy of the content).
pub fn open_owned(key: &Secret, aad: &[u8], mut sealed: Vec<u8>, skip: usize) -> Option<Vec<u8>> {
    let start = skip.checked_add(NONCE_LEN)?;
    if sealed.len() < start + aead::AES_256_GCM.tag_len() {
        return None;
    }
    let key = LessSafeKey::new(UnboundKey::new(&aead::AES_256_GCM, &key.0).expect("32-byte key"));
    let mut nonce = [0u8; NONCE_LEN];
    nonce.copy_from_slice(&sealed[skip..start]);
    let len = key
        .open_in_place(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(aad),
            &mut sealed[start..],
        )
        .ok()?
        .len();
    sealed.truncate(start + len);
    sealed.drain(..start);
    Some(sealed)
}

/// Opens what [`seal`] made; `None` if it was changed, truncated or sealed under another key
/// or associated data.
pub fn open(key: &Secret, aad: &[u8], sealed: &[u8]) -> Option<Vec<u8>> {
    if sealed.len() < NONCE_LEN + aead::AES_256_GCM.tag_len() {
        return None;
    }
    let key = LessSafeKey::new(UnboundKey::new(&aead::AES_256_GCM, &key.0).expect("32-byte key"));
    let mut nonce = [0u8; NONCE_LEN];
    nonce.copy_from_slice(&sealed[..NONCE_LEN]);
    let mut buf = sealed[NONCE_LEN..].to_vec();
    let len = key
        .open_in_place(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(aad),
            &mut buf,
        )
        .ok()?
        .len();
    buf.truncate(len);
    Some(buf)
}

/// HKDF-SHA256 of `key` for `info`.
pub fn derive(key: &Secret, salt: &[u8], info: &[u8]) -> Secret {
    let prk = ring::hkdf::Salt::new(ring::hkdf::HKDF_SHA256, salt).extract(&key.0);
    let info = [info];
    let okm = prk
        .expand(&info, ring::hkdf::HKDF_SHA256)
        .expect("32 bytes is a valid HKDF length");
    let mut out = [0u8; 32];
    okm.fill(&mut out).expect("32 bytes fit");
    Secret(out)
}

fn stretch(secret: &str, salt: &[u8], iterations: u32) -> Secret {
    let mut out = [0u8; 32];
    let iterations = std::num::NonZeroU32::new(iterations.max(1)).expect("not zero");
    ring::pbkdf2::derive(
        ring::pbkdf2::PBKDF2_HMAC_SHA256,
        iterations,
        salt,
        secret.as_bytes(),
        &mut out,
    );
    Secret(out)
}

/// Where the master key comes from.
#[derive(Clone)]
pub enum MasterSource {
    /// The key itself (environment or an operator's key file).
    Key(Secret),
    /// A passphrase that opens the `passphrase` slot.
    Passphrase(String),
    /// The access token, which opens the `token` slot.
    Token(String),
}

impl Drop for MasterSource {
    fn drop(&mut self) {
        match self {
            MasterSource::Key(_) => {}
            MasterSource::Passphrase(s) | MasterSource::Token(s) => s.zeroize(),
        }
    }
}

impl MasterSource {
    fn kind(&self) -> &'static str {
        match self {
            MasterSource::Key(_) => "master key",
            MasterSource::Passphrase(_) => "passphrase",
            MasterSource::Token(_) => "token",
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Slot {
    kind: String,
    salt: String,
    iterations: u32,
    wrapped: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct KeyFileJson {
    format: u32,
    current: u32,
    check: String,
    data_keys: BTreeMap<u32, String>,
    #[serde(default)]
    slots: Vec<Slot>,
    /// SHA-256 (hex) of this file's JSON without this field; absent in files written before
    /// it existed (added the next time the file opens).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    digest: Option<String>,
}

impl KeyFileJson {
    /// The checksum of everything but the checksum.
    fn digest(&self) -> String {
        let body = KeyFileJson {
            digest: None,
            ..self.clone()
        };
        let json = serde_json::to_vec(&body).expect("JSON");
        hex::encode(ring::digest::digest(&ring::digest::SHA256, &json))
    }
}

/// The unlocked key file: every data key, and which one is current.
pub struct Keyring {
    path: PathBuf,
    master: Secret,
    file: KeyFileJson,
    data_keys: BTreeMap<u32, Secret>,
}

impl std::fmt::Debug for Keyring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Keyring")
            .field("path", &self.path)
            .field("current", &self.file.current)
            .field("versions", &self.data_keys.keys().collect::<Vec<_>>())
            .finish()
    }
}

fn data_key_aad(version: u32) -> Vec<u8> {
    format!("sandgate-data-key:{version}").into_bytes()
}

fn slot_aad(kind: &str) -> Vec<u8> {
    format!("sandgate-slot:{kind}").into_bytes()
}

fn write_atomic(path: &Path, body: &[u8]) -> Result<(), KeyError> {
    let io = |source| KeyError::Io {
        path: path.to_owned(),
        source,
    };
    let tmp = path.with_extension("json.tmp");
    {
        use std::io::Write;
        let mut options = std::fs::OpenOptions::new();
        options.write(true).create(true).truncate(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
        let mut f = options.open(&tmp).map_err(io)?;
        f.write_all(body).map_err(io)?;
        f.sync_all().map_err(io)?;
    }
    std::fs::rename(&tmp, path).map_err(io)?;
    if let Some(dir) = path.parent()
        && let Ok(d) = std::fs::File::open(dir)
    {
        let _ = d.sync_all();
    }
    Ok(())
}

impl Keyring {
    /// Opens `path` with `source`, or creates it (new master and data keys, and a slot for a
    /// passphrase or token source) if it does not exist yet.
    pub fn open_or_create(path: &Path, source: &MasterSource) -> Result<Keyring, KeyError> {
        match std::fs::read(path) {
            Ok(bytes) => Self::open(path, &bytes, source),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Self::create(path, source),
            Err(source) => Err(KeyError::Io {
                path: path.to_owned(),
                source,
            }),
        }
    }

    fn create(path: &Path, source: &MasterSource) -> Result<Keyring, KeyError> {
        let master = match source {
            MasterSource::Key(k) => k.clone(),
            _ => Secret::random(),
        };
        let d1 = Secret::random();
        let mut file = KeyFileJson {
            format: 1,
            current: 1,
            check: hex::encode(seal(&master, b"sandgate-keys-check", CHECK_PLAINTEXT)),
            data_keys: BTreeMap::from([(1, hex::encode(seal(&master, &data_key_aad(1), &d1.0)))]),
            slots: Vec::new(),
            digest: None,
        };
        if let MasterSource::Passphrase(s) | MasterSource::Token(s) = source {
            file.slots.push(Self::make_slot(source.kind(), s, &master));
        }
        let mut ring = Keyring {
            path: path.to_owned(),
            master,
            data_keys: BTreeMap::from([(1, d1)]),
            file,
        };
        ring.save()?;
        Ok(ring)
    }

    fn make_slot(kind: &str, secret: &str, master: &Secret) -> Slot {
        let mut salt = [0u8; 16];
        SystemRandom::new()
            .fill(&mut salt)
            .expect("the system random source works");
        let kek = stretch(secret, &salt, PBKDF2_ITERATIONS);
        Slot {
            kind: kind.to_owned(),
            salt: hex::encode(salt),
            iterations: PBKDF2_ITERATIONS,
            wrapped: hex::encode(seal(&kek, &slot_aad(kind), &master.0)),
        }
    }

    fn open(path: &Path, bytes: &[u8], source: &MasterSource) -> Result<Keyring, KeyError> {
        let damaged = |reason: String| KeyError::Damaged {
            path: path.to_owned(),
            reason,
        };
        let file: KeyFileJson = serde_json::from_slice(bytes)
            .map_err(|e| damaged(format!("it is not a key file: {e}")))?;
        if file.format != 1 {
            return Err(damaged(format!("unknown format {}", file.format)));
        }
        if let Some(digest) = &file.digest
            && *digest != file.digest()
        {
            return Err(damaged(
                "its checksum does not match its content (it was changed on disk)".into(),
            ));
        }
        let master = match source {
            MasterSource::Key(k) => k.clone(),
            MasterSource::Passphrase(s) | MasterSource::Token(s) => {
                let slot = file
                    .slots
                    .iter()
                    .find(|sl| sl.kind == source.kind())
                    .ok_or(KeyError::Locked)?;
                let salt = hex::decode(&slot.salt).map_err(|e| damaged(e.to_string()))?;
                let kek = stretch(s, &salt, slot.iterations);
                let wrapped = hex::decode(&slot.wrapped).map_err(|e| damaged(e.to_string()))?;
                let m = open(&kek, &slot_aad(&slot.kind), &wrapped)
                    .ok_or_else(|| KeyError::Wrong(source.kind(), path.to_owned()))?;
                let mut k = [0u8; 32];
                if m.len() != 32 {
                    return Err(damaged("a slot holds a key of the wrong size".into()));
                }
                k.copy_from_slice(&m);
                Secret(k)
            }
        };
        let check = hex::decode(&file.check).map_err(|e| damaged(e.to_string()))?;
        match open(&master, b"sandgate-keys-check", &check) {
            Some(p) if p == CHECK_PLAINTEXT => {}
            _ => return Err(KeyError::Wrong(source.kind(), path.to_owned())),
        }
        let mut data_keys = BTreeMap::new();
        for (v, sealed) in &file.data_keys {
            let sealed = hex::decode(sealed).map_err(|e| damaged(e.to_string()))?;
            let d = open(&master, &data_key_aad(*v), &sealed)
                .filter(|d| d.len() == 32)
                .ok_or_else(|| damaged(format!("data key {v} fails its integrity check")))?;
            let mut k = [0u8; 32];
            k.copy_from_slice(&d);
            data_keys.insert(*v, Secret(k));
        }
        if !data_keys.contains_key(&file.current) {
            return Err(damaged(format!(
                "the current data key {} is missing",
                file.current
            )));
        }
        let mut ring = Keyring {
            path: path.to_owned(),
            master,
            file,
            data_keys,
        };
        if ring.file.digest.is_none() {
            // A file from before the checksum: add it now that the file is known good. A key
            // file the gateway may not write (a read-only mount) stays as it is.
            if let Err(e) = ring.save() {
                tracing::debug!(error = %e, "the key file's checksum could not be added");
                ring.file.digest = None;
            }
        }
        Ok(ring)
    }

    fn save(&mut self) -> Result<(), KeyError> {
        self.file.digest = Some(self.file.digest());
        let body = serde_json::to_vec_pretty(&self.file).expect("JSON");
        write_atomic(&self.path, &body)
    }

    /// The current data-key version.
    pub fn current(&self) -> u32 {
        self.file.current
    }

    /// The versions present (more than one while a rotation is unfinished).
    pub fn versions(&self) -> Vec<u32> {
        self.data_keys.keys().copied().collect()
    }

    /// The key of workspace `id` under data-key `version`.
    pub fn workspace_key(&self, version: u32, id: &str) -> Option<Secret> {
        let d = self.data_keys.get(&version)?;
        Some(derive(d, b"sandgate-workspace-v1", id.as_bytes()))
    }

    /// Starts a rotation: adds a new data key and makes it current (the old ones stay until
    /// [`Keyring::retire`]). Resuming an unfinished rotation adds nothing.
    pub fn begin_rotation(&mut self) -> Result<u32, KeyError> {
        if self.data_keys.len() > 1 {
            return Ok(self.file.current);
        }
        let v = self.file.current + 1;
        let d = Secret::random();
        self.file
            .data_keys
            .insert(v, hex::encode(seal(&self.master, &data_key_aad(v), &d.0)));
        self.data_keys.insert(v, d);
        self.file.current = v;
        self.save()?;
        Ok(v)
    }

    /// Drops every data key but the current one (after every file was re-encrypted).
    pub fn retire(&mut self) -> Result<(), KeyError> {
        let current = self.file.current;
        self.file.data_keys.retain(|v, _| *v == current);
        self.data_keys.retain(|v, _| *v == current);
        self.save()
    }

    /// Adds or replaces the slot of `source` (a passphrase or token), so it opens this file.
    pub fn set_slot(&mut self, source: &MasterSource) -> Result<(), KeyError> {
        let (MasterSource::Passphrase(s) | MasterSource::Token(s)) = source else {
            return Ok(());
        };
        let kind = source.kind();
        self.file.slots.retain(|sl| sl.kind != kind);
        self.file.slots.push(Self::make_slot(kind, s, &self.master));
        self.save()
    }

    fn secrets_key(&self) -> Secret {
        derive(&self.master, b"sandgate-secrets-v1", b"host secrets")
    }

    /// Seals a host secret (a model provider's API key) under the master key.
    pub fn seal_secret(&self, name: &str, value: &[u8]) -> Vec<u8> {
        seal(
            &self.secrets_key(),
            format!("sandgate-secret:{name}").as_bytes(),
            value,
        )
    }

    /// Opens what [`Keyring::seal_secret`] sealed under `name`.
    pub fn open_secret(&self, name: &str, sealed: &[u8]) -> Option<Vec<u8>> {
        open(
            &self.secrets_key(),
            format!("sandgate-secret:{name}").as_bytes(),
            sealed,
        )
    }

    /// Whether a slot of this kind exists.
    pub fn has_slot(&self, kind: &str) -> bool {
        self.file.slots.iter().any(|s| s.kind == kind)
    }
}

/// Whether the key file at `path` exists.
pub fn exists(path: &Path) -> bool {
    path.exists()
}

/// The slot kinds in the key file at `path` (to choose a source); empty if there is none.
pub fn slot_kinds(path: &Path) -> Vec<String> {
    std::fs::read(path)
        .ok()
        .and_then(|b| serde_json::from_slice::<KeyFileJson>(&b).ok())
        .map(|f| f.slots.into_iter().map(|s| s.kind).collect())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A scratch folder (removed when dropped) and the keyring's path in it.
    fn tmp() -> (tempfile::TempDir, PathBuf) {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("keys.json");
        (d, path)
    }

    #[test]
    fn seal_open_round_trip_and_tamper() {
        let k = Secret::random();
        let sealed = seal(&k, b"aad", b"hello");
        assert_eq!(open(&k, b"aad", &sealed).unwrap(), b"hello");
        assert!(open(&k, b"other", &sealed).is_none());
        let mut bad = sealed.clone();
        bad[14] ^= 1;
        assert!(open(&k, b"aad", &bad).is_none());
        assert!(open(&k, b"aad", &sealed[..sealed.len() - 1]).is_none());
        assert!(open(&Secret::random(), b"aad", &sealed).is_none());
        // Fresh nonce each time.
        assert_ne!(seal(&k, b"aad", b"hello"), sealed);
    }

    #[test]
    fn token_slot_opens_and_wrong_token_is_refused() {
        let (_dir, path) = tmp();
        let ring = Keyring::open_or_create(&path, &MasterSource::Token("t0k3n".into())).unwrap();
        let key = ring.workspace_key(1, "default").unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(!text.contains("t0k3n"));
        let again = Keyring::open_or_create(&path, &MasterSource::Token("t0k3n".into())).unwrap();
        assert_eq!(again.workspace_key(1, "default").unwrap(), key);
        assert_ne!(again.workspace_key(1, "other").unwrap(), key);
        let err = Keyring::open_or_create(&path, &MasterSource::Token("nope".into())).unwrap_err();
        assert!(matches!(err, KeyError::Wrong("token", _)), "{err}");
        let err =
            Keyring::open_or_create(&path, &MasterSource::Passphrase("x".into())).unwrap_err();
        assert!(matches!(err, KeyError::Locked), "{err}");
    }

    #[test]
    fn master_key_source_and_rotation() {
        let (_dir, path) = tmp();
        let m = Secret::random();
        let mut ring = Keyring::open_or_create(&path, &MasterSource::Key(m.clone())).unwrap();
        let k1 = ring.workspace_key(1, "w").unwrap();
        assert_eq!(ring.begin_rotation().unwrap(), 2);
        // An interrupted rotation resumes with the same new key.
        let mut again = Keyring::open_or_create(&path, &MasterSource::Key(m.clone())).unwrap();
        assert_eq!(again.versions(), vec![1, 2]);
        assert_eq!(again.begin_rotation().unwrap(), 2);
        assert_eq!(again.workspace_key(1, "w").unwrap(), k1);
        again.retire().unwrap();
        let done = Keyring::open_or_create(&path, &MasterSource::Key(m)).unwrap();
        assert_eq!(done.versions(), vec![2]);
        assert!(done.workspace_key(1, "w").is_none());
        let err = Keyring::open_or_create(&path, &MasterSource::Key(Secret::random())).unwrap_err();
        assert!(matches!(err, KeyError::Wrong(..)));
    }

    #[test]
    fn a_damaged_key_file_says_so() {
        let (_dir, path) = tmp();
        Keyring::open_or_create(&path, &MasterSource::Passphrase("pw".into())).unwrap();
        let mut v: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        let d = v["data_keys"]["1"].as_str().unwrap().to_owned();
        let mut b = hex::decode(d).unwrap();
        b[20] ^= 0xff;
        v["data_keys"]["1"] = hex::encode(b).into();
        std::fs::write(&path, v.to_string()).unwrap();
        let err =
            Keyring::open_or_create(&path, &MasterSource::Passphrase("pw".into())).unwrap_err();
        assert!(matches!(err, KeyError::Damaged { .. }), "{err}");
    }

    #[test]
    fn any_changed_byte_is_damage_not_a_wrong_key() {
        let (_dir, path) = tmp();
        let source = MasterSource::Passphrase("pw".into());
        Keyring::open_or_create(&path, &source).unwrap();
        let good = std::fs::read(&path).unwrap();
        // Every byte of the file, flipped in turn: each is reported as damage (a wrong key
        // would stop the gateway; damage is served as an error with the way out).
        for i in 0..good.len() {
            let mut bad = good.clone();
            bad[i] ^= 0x01;
            std::fs::write(&path, &bad).unwrap();
            match Keyring::open_or_create(&path, &source) {
                Err(KeyError::Damaged { .. }) => {}
                Err(e) => panic!("byte {i}: {e}"),
                Ok(_) => panic!("byte {i}: a changed key file opened"),
            }
        }
        // Truncated, or emptied: damage too.
        for cut in [good.len() / 2, 0] {
            std::fs::write(&path, &good[..cut]).unwrap();
            let err = Keyring::open_or_create(&path, &source).unwrap_err();
            assert!(matches!(err, KeyError::Damaged { .. }), "{err}");
        }
        // Put back, it opens; a wrong passphrase is still told apart.
        std::fs::write(&path, &good).unwrap();
        Keyring::open_or_create(&path, &source).unwrap();
        let err =
            Keyring::open_or_create(&path, &MasterSource::Passphrase("no".into())).unwrap_err();
        assert!(matches!(err, KeyError::Wrong(..)), "{err}");
    }

    #[test]
    fn a_key_file_from_before_the_checksum_opens_and_gets_one() {
        let (_dir, path) = tmp();
        let m = Secret::random();
        let ring = Keyring::open_or_create(&path, &MasterSource::Key(m.clone())).unwrap();
        let key = ring.workspace_key(1, "w").unwrap();
        let mut v: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        v.as_object_mut().unwrap().remove("digest").unwrap();
        std::fs::write(&path, v.to_string()).unwrap();
        let again = Keyring::open_or_create(&path, &MasterSource::Key(m.clone())).unwrap();
        assert_eq!(again.workspace_key(1, "w").unwrap(), key);
        let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        assert!(v["digest"].is_string(), "{v}");
        Keyring::open_or_create(&path, &MasterSource::Key(m)).unwrap();
    }
}
