//! Wheels (PEP 427) as hostile archives: [`unpack`] checks a whole wheel against its name, its
//! layout and its `RECORD` before and while writing it into a fresh folder, and leaves nothing
//! there when anything is wrong; [`read_metadata`] reads its `METADATA` without unpacking.
//!
//! Nothing in a wheel is ever run. What is refused: entry names that are absolute, hold `..`,
//! `.`, empty segments, backslashes, NUL or control characters; symlinks and any entry that is
//! not a plain file or folder; the same name twice (also once merged from `.data/purelib` or
//! `.data/platlib`); a `.dist-info` folder that does not match the file name, or a second one;
//! `.data` folders of another name or unknown kinds; compiled extensions (`.so`, `.so.N`,
//! `.pyd`, `.dylib`, `.dll`), named in the error; more files, more unpacked bytes or a higher
//! compression ratio than the caps (checked on the bytes actually inflated, not only on the
//! headers); and any file whose SHA-256 or size differs from its `RECORD` line, or that `RECORD`
//! does not list with a SHA-256 (or stronger).

use std::collections::{HashMap, HashSet};
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};

use base64::Engine as _;

use super::index::WheelName;

/// Caps on one wheel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WheelLimits {
    /// Most entries in the archive (default 50,000; plotly, among the largest pure wheels, has
    /// about 17,000).
    pub max_files: usize,
    /// Most bytes written in all (default 512 MiB).
    pub max_unpacked_bytes: u64,
    /// Highest ratio of inflated to compressed bytes for an entry larger than
    /// [`WheelLimits::ratio_floor`] (default 250).
    pub max_ratio: u64,
    /// Entries up to this many inflated bytes are exempt from the ratio (default 1 MiB).
    pub ratio_floor: u64,
    /// Most bytes of `METADATA` (default 8 MiB) and of `RECORD` (twice that).
    pub max_metadata_bytes: u64,
}

impl Default for WheelLimits {
    fn default() -> Self {
        WheelLimits {
            max_files: 50_000,
            max_unpacked_bytes: 512 << 20,
            max_ratio: 250,
            ratio_floor: 1 << 20,
            max_metadata_bytes: 8 << 20,
        }
    }
}

/// Why a wheel was refused.
#[derive(Debug, thiserror::Error)]
pub enum WheelError {
    /// Not a readable zip archive.
    #[error("the wheel is not a readable zip archive: {0}")]
    Zip(String),
    /// An entry's name is unsafe or malformed.
    #[error("the wheel has an entry with an unsafe name {name:?}: {why}")]
    UnsafePath {
        /// The name (lossily decoded, cut).
        name: String,
        /// What is wrong with it.
        why: &'static str,
    },
    /// An entry is a symlink or another special file.
    #[error("the wheel has an entry {name:?} that is not a plain file or folder ({kind})")]
    SpecialEntry {
        /// The name.
        name: String,
        /// What it is (`symlink`, ...).
        kind: &'static str,
    },
    /// The same name twice.
    #[error("the wheel has {0:?} twice")]
    Duplicate(String),
    /// The zip's directory names an entry twice, or two entries share bytes (a way to build
    /// zip bombs).
    #[error("the wheel's zip directory {0}")]
    Overlap(&'static str),
    /// The layout breaks the wheel format's rules.
    #[error("the wheel's layout is not valid: {0}")]
    Layout(String),
    /// A compiled extension.
    #[error("the wheel contains a compiled extension, {file}")]
    CompiledExtension {
        /// The extension's path in the wheel.
        file: String,
    },
    /// More entries than the cap.
    #[error("the wheel has more than {cap} entries")]
    TooManyFiles {
        /// The cap.
        cap: usize,
    },
    /// More unpacked bytes than the cap.
    #[error("the wheel unpacks to more than {cap} bytes")]
    TooLarge {
        /// The cap.
        cap: u64,
    },
    /// An entry inflates out of proportion (a zip bomb) or differs from its header.
    #[error("the wheel's entry {name:?} {why}")]
    Bomb {
        /// The entry.
        name: String,
        /// What it does.
        why: String,
    },
    /// A `RECORD` problem: a file missing from it, a hash or size mismatch, a bad line.
    #[error("the wheel's RECORD {0}")]
    Record(String),
    /// `METADATA`, `WHEEL` or `RECORD` is missing or unreadable.
    #[error("the wheel's {file} {why}")]
    DistInfo {
        /// Which file.
        file: &'static str,
        /// What is wrong.
        why: String,
    },
    /// The destination could not be made or written.
    #[error("cannot unpack the wheel into {path}: {source}")]
    Io {
        /// The destination folder.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// One file written.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ManifestFile {
    /// Its path relative to the destination, with `/` separators.
    pub path: String,
    /// Its size in bytes.
    pub size: u64,
}

/// What [`unpack`] wrote.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// The project, normalised.
    pub name: String,
    /// The version, as the file name gives it.
    pub version: String,
    /// The `.dist-info` folder's name, as written in the wheel.
    pub dist_info: String,
    /// Every file written, sorted by path.
    pub files: Vec<ManifestFile>,
    /// Entries of `.data/scripts`, `.data/headers` and `.data/data`, not written (paths in the
    /// wheel).
    pub skipped: Vec<String>,
    /// The text of `METADATA`.
    pub metadata: String,
}

impl Manifest {
    /// Bytes written in all.
    pub fn total_bytes(&self) -> u64 {
        self.files.iter().map(|f| f.size).sum()
    }
}

/// One entry of the archive, checked, and where it goes.
struct Planned {
    index: usize,
    /// Its name in the archive.
    name: String,
    /// Its path in the destination; `None` for a skipped `.data` entry.
    dest: Option<String>,
    size: u64,
}

/// The checked plan of a wheel: its entries (files only), its `.dist-info` folder, the compiled
/// extensions found.
struct Plan {
    dist_info: String,
    files: Vec<Planned>,
    compiled: Option<String>,
}

fn cut(s: &str) -> String {
    s.chars().take(200).collect()
}

/// Checks an entry's name: UTF-8, relative, `/`-separated, no `..`, `.`, empty segments,
/// backslashes, NUL or control characters, bounded. Returns it without a trailing `/`.
fn check_name(raw: &[u8]) -> Result<String, WheelError> {
    let lossy = || cut(&String::from_utf8_lossy(raw));
    let bad = |why| WheelError::UnsafePath { name: lossy(), why };
    let name = std::str::from_utf8(raw).map_err(|_| bad("it is not UTF-8"))?;
    if name.len() > 1024 {
        return Err(bad("it is longer than 1024 bytes"));
    }
    if name.contains('\0') {
        return Err(bad("it contains NUL"));
    }
    if name.contains('\\') {
        return Err(bad("it contains a backslash"));
    }
    if name.chars().any(char::is_control) {
        return Err(bad("it contains a control character"));
    }
    if name.starts_with('/') {
        return Err(bad("it is absolute"));
    }
    let trimmed = name.strip_suffix('/').unwrap_or(name);
    if trimmed.is_empty() {
        return Err(bad("it is empty"));
    }
    let first = trimmed.split('/').next().unwrap_or("");
    if first.len() >= 2 && first.as_bytes()[1] == b':' {
        return Err(bad("it starts with a drive letter"));
    }
    for seg in trimmed.split('/') {
        match seg {
            "" => return Err(bad("it has an empty segment")),
            "." | ".." => return Err(bad("it has a '.' or '..' segment")),
            s if s.len() > 255 => return Err(bad("it has a segment longer than 255 bytes")),
            _ => {}
        }
    }
    Ok(trimmed.to_owned())
}

/// Whether a file name is a compiled extension: `.so`, `.so.N[.M...]`, `.pyd`, `.dylib`, `.dll`.
pub fn is_compiled_extension(path: &str) -> bool {
    let file = path.rsplit('/').next().unwrap_or(path).to_ascii_lowercase();
    if [".so", ".pyd", ".dylib", ".dll"]
        .iter()
        .any(|e| file.ends_with(e))
    {
        return true;
    }
    // `.so.N`, `.so.N.M`: a versioned shared library.
    if let Some(i) = file.rfind(".so.") {
        let rest = &file[i + 4..];
        return !rest.is_empty()
            && rest
                .split('.')
                .all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()));
    }
    false
}

/// Reads the central directory and checks every entry: names, kinds, duplicates, layout, caps,
/// declared ratios.
fn plan<R: Read + Seek>(
    zip: &mut zip::ZipArchive<R>,
    wheel: &WheelName,
    limits: &WheelLimits,
) -> Result<Plan, WheelError> {
    if zip.len() > limits.max_files {
        return Err(WheelError::TooManyFiles {
            cap: limits.max_files,
        });
    }
    // The zip reader keeps only the last of two same-named entries, so ask it whether it saw any.
    if zip.has_duplicate_names() {
        return Err(WheelError::Overlap("names the same entry twice"));
    }
    if zip
        .has_overlapping_entries()
        .map_err(|e| WheelError::Zip(e.to_string()))?
    {
        return Err(WheelError::Overlap("has entries that share bytes"));
    }
    let mut names = HashSet::new();
    let mut dirs = HashSet::new();
    let mut entries = Vec::new();
    for i in 0..zip.len() {
        let f = zip
            .by_index_raw(i)
            .map_err(|e| WheelError::Zip(e.to_string()))?;
        let name = check_name(f.name_raw())?;
        if !names.insert(name.clone()) {
            return Err(WheelError::Duplicate(name));
        }
        let mode = f.unix_mode().unwrap_or(0);
        let kind = match mode & 0o170000 {
            0o120000 => Some("symlink"),
            0o010000 => Some("FIFO"),
            0o020000 | 0o060000 => Some("device"),
            0o140000 => Some("socket"),
            _ => None,
        };
        if let Some(kind) = kind {
            return Err(WheelError::SpecialEntry { name, kind });
        }
        let is_dir = f.is_dir() || mode & 0o170000 == 0o040000;
        if is_dir {
            dirs.insert(name);
            continue;
        }
        let (size, compressed) = (f.size(), f.compressed_size());
        if size > limits.ratio_floor && size / compressed.max(1) >= limits.max_ratio {
            return Err(WheelError::Bomb {
                name,
                why: format!(
                    "inflates {size} bytes from {compressed} (more than {}:1)",
                    limits.max_ratio
                ),
            });
        }
        entries.push((i, name, size));
    }
    // The one `.dist-info` folder, named after the wheel.
    let mut dist_infos: Vec<&str> = names
        .iter()
        .map(|n| n.split('/').next().unwrap_or(""))
        .filter(|top| top.to_ascii_lowercase().ends_with(".dist-info"))
        .collect();
    dist_infos.sort_unstable();
    dist_infos.dedup();
    let dist_info = match dist_infos[..] {
        [one] if wheel.matches_dist_info(one) => one.to_owned(),
        [one] => {
            return Err(WheelError::Layout(format!(
                "its folder {one:?} does not match the file name ({}-{})",
                wheel.name, wheel.version
            )));
        }
        [] => return Err(WheelError::Layout("it has no .dist-info folder".into())),
        _ => {
            return Err(WheelError::Layout(format!(
                "it has more than one .dist-info folder ({})",
                dist_infos.join(", ")
            )));
        }
    };
    let stem = &dist_info[..dist_info.len() - ".dist-info".len()];
    let data_dir = format!("{stem}.data");
    let is_reserved = |top: &str| top.ends_with(".dist-info") || top.ends_with(".data");
    let mut files = Vec::with_capacity(entries.len());
    let mut dests = HashSet::new();
    let mut total = 0u64;
    let mut compiled = None;
    for (index, name, size) in entries {
        let (top, rest) = name.split_once('/').unwrap_or((&name, ""));
        let top_lower = top.to_ascii_lowercase();
        let dest = if top_lower.ends_with(".data") {
            if top != data_dir {
                return Err(WheelError::Layout(format!(
                    "its folder {top:?} is not {data_dir:?}"
                )));
            }
            let Some((kind, inner)) = rest.split_once('/') else {
                return Err(WheelError::Layout(format!(
                    "{name:?} is not inside one of {data_dir}/purelib, platlib, scripts, headers or data"
                )));
            };
            match kind {
                "purelib" | "platlib" => {
                    let inner_top = inner.split('/').next().unwrap_or("").to_ascii_lowercase();
                    if is_reserved(&inner_top) {
                        return Err(WheelError::Layout(format!(
                            "{name:?} would add a .dist-info or .data folder"
                        )));
                    }
                    Some(inner.to_owned())
                }
                "scripts" | "headers" | "data" => None,
                other => {
                    return Err(WheelError::Layout(format!(
                        "{data_dir}/{other} is not one of purelib, platlib, scripts, headers, data"
                    )));
                }
            }
        } else if top_lower.ends_with(".dist-info") {
            if rest.is_empty() {
                return Err(WheelError::Layout(format!(
                    "{name:?} is a file, not a folder"
                )));
            }
            Some(name.clone())
        } else {
            Some(name.clone())
        };
        if let Some(d) = &dest {
            if !dests.insert(d.clone()) {
                return Err(WheelError::Duplicate(d.clone()));
            }
            total = total.saturating_add(size);
            if total > limits.max_unpacked_bytes {
                return Err(WheelError::TooLarge {
                    cap: limits.max_unpacked_bytes,
                });
            }
            if compiled.is_none() && is_compiled_extension(d) {
                compiled = Some(name.clone());
            }
        }
        files.push(Planned {
            index,
            name,
            dest,
            size,
        });
    }
    // A file that is also a folder (`a` and `a/b`), in the wheel or once merged.
    let written: HashSet<&str> = dests.iter().map(String::as_str).collect();
    for d in dests.iter().chain(dirs.iter()) {
        let mut prefix = d.as_str();
        while let Some((parent, _)) = prefix.rsplit_once('/') {
            if written.contains(parent) {
                return Err(WheelError::Duplicate(parent.to_owned()));
            }
            prefix = parent;
        }
    }
    files.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(Plan {
        dist_info,
        files,
        compiled,
    })
}

/// Reads one entry, checking that it inflates to exactly its declared size, within `cap`.
fn read_small<R: Read + Seek>(
    zip: &mut zip::ZipArchive<R>,
    index: usize,
    file: &'static str,
    cap: u64,
) -> Result<Vec<u8>, WheelError> {
    let mut f = zip
        .by_index(index)
        .map_err(|e| WheelError::Zip(e.to_string()))?;
    let size = f.size();
    if size > cap {
        return Err(WheelError::DistInfo {
            file,
            why: format!("is larger than the cap of {cap} bytes"),
        });
    }
    let mut out = Vec::with_capacity(size as usize);
    (&mut f)
        .take(size + 1)
        .read_to_end(&mut out)
        .map_err(|e| WheelError::Zip(format!("{file}: {e}")))?;
    if out.len() as u64 != size {
        return Err(WheelError::Bomb {
            name: file.to_owned(),
            why: format!(
                "inflates to {} bytes, not the {size} its header says",
                out.len()
            ),
        });
    }
    Ok(out)
}

/// A `RECORD` line's hash: `sha256=`, `sha384=` or `sha512=` with URL-safe base64.
#[derive(Debug, Clone, PartialEq, Eq)]
struct RecordHash {
    algorithm: &'static ring::digest::Algorithm,
    digest: Vec<u8>,
}

/// Parses `RECORD` (CSV: path, hash, size; fields may be quoted) into path → (hash, size).
/// Lines without a usable hash map to `None`.
#[allow(clippy::type_complexity)]
fn parse_record(
    text: &str,
) -> Result<HashMap<String, (Option<RecordHash>, Option<u64>)>, WheelError> {
    let mut out = HashMap::new();
    for (n, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let fields = csv_fields(line)
            .ok_or_else(|| WheelError::Record(format!("line {} is not valid CSV", n + 1)))?;
        let [path, hash, size] = &fields[..] else {
            return Err(WheelError::Record(format!(
                "line {} does not have three fields",
                n + 1
            )));
        };
        let hash = hash.split_once('=').and_then(|(alg, b64)| {
            let algorithm = match alg {
                "sha256" => &ring::digest::SHA256,
                "sha384" => &ring::digest::SHA384,
                "sha512" => &ring::digest::SHA512,
                _ => return None,
            };
            let digest = base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(b64.trim_end_matches('='))
                .ok()?;
            (digest.len() == algorithm.output_len()).then_some(RecordHash { algorithm, digest })
        });
        let size = if size.is_empty() {
            None
        } else {
            Some(size.parse::<u64>().map_err(|_| {
                WheelError::Record(format!("line {} has a size that is not a number", n + 1))
            })?)
        };
        if out.insert(path.clone(), (hash, size)).is_some() {
            return Err(WheelError::Record(format!("lists {:?} twice", cut(path))));
        }
    }
    Ok(out)
}

/// Splits one CSV line (RFC 4180 quoting); `None` when a quote is left open or misplaced.
fn csv_fields(line: &str) -> Option<Vec<String>> {
    let mut fields = Vec::new();
    let mut chars = line.chars().peekable();
    loop {
        let mut field = String::new();
        if chars.peek() == Some(&'"') {
            chars.next();
            loop {
                match chars.next()? {
                    '"' if chars.peek() == Some(&'"') => {
                        chars.next();
                        field.push('"');
                    }
                    '"' => break,
                    c => field.push(c),
                }
            }
            match chars.next() {
                None => {
                    fields.push(field);
                    return Some(fields);
                }
                Some(',') => fields.push(field),
                Some(_) => return None,
            }
        } else {
            loop {
                match chars.next() {
                    None => {
                        fields.push(field);
                        return Some(fields);
                    }
                    Some(',') => break,
                    Some('"') => return None,
                    Some(c) => field.push(c),
                }
            }
            fields.push(field);
        }
    }
}

/// The dist-info files every wheel must have, read and checked: `METADATA` (UTF-8), `WHEEL`
/// (`Wheel-Version: 1.x`) and the parsed `RECORD`.
struct DistInfo {
    metadata: String,
    #[allow(clippy::type_complexity)]
    record: HashMap<String, (Option<RecordHash>, Option<u64>)>,
    record_name: String,
}

fn read_dist_info<R: Read + Seek>(
    zip: &mut zip::ZipArchive<R>,
    plan: &Plan,
    limits: &WheelLimits,
) -> Result<DistInfo, WheelError> {
    let find = |file: &'static str| {
        let path = format!("{}/{file}", plan.dist_info);
        plan.files
            .iter()
            .find(|p| p.name == path)
            .map(|p| (p.index, path))
            .ok_or(WheelError::DistInfo {
                file,
                why: format!("is missing (no {}/{file})", plan.dist_info),
            })
    };
    let (wheel_i, _) = find("WHEEL")?;
    let (meta_i, meta_name) = find("METADATA")?;
    let (record_i, record_name) = find("RECORD")?;
    let wheel_text = read_small(zip, wheel_i, "WHEEL", 64 << 10)?;
    let wheel_text = String::from_utf8_lossy(&wheel_text);
    let version = wheel_text
        .lines()
        .find_map(|l| l.strip_prefix("Wheel-Version:"))
        .map(str::trim)
        .ok_or(WheelError::DistInfo {
            file: "WHEEL",
            why: "has no Wheel-Version".into(),
        })?;
    if version.split('.').next() != Some("1") {
        return Err(WheelError::DistInfo {
            file: "WHEEL",
            why: format!(
                "is of format version {:?}; Sandgate reads 1.x",
                cut(version)
            ),
        });
    }
    let record_bytes = read_small(zip, record_i, "RECORD", limits.max_metadata_bytes * 2)?;
    let record_text = std::str::from_utf8(&record_bytes).map_err(|_| WheelError::DistInfo {
        file: "RECORD",
        why: "is not UTF-8".into(),
    })?;
    let record = parse_record(record_text)?;
    let meta_bytes = read_small(zip, meta_i, "METADATA", limits.max_metadata_bytes)?;
    check_record(&record, &meta_name, &meta_bytes)?;
    let metadata = String::from_utf8(meta_bytes).map_err(|_| WheelError::DistInfo {
        file: "METADATA",
        why: "is not UTF-8".into(),
    })?;
    Ok(DistInfo {
        metadata,
        record,
        record_name,
    })
}

/// Checks `bytes` of the entry `name` against its `RECORD` line.
#[allow(clippy::type_complexity)]
fn check_record(
    record: &HashMap<String, (Option<RecordHash>, Option<u64>)>,
    name: &str,
    bytes: &[u8],
) -> Result<(), WheelError> {
    let Some((hash, size)) = record.get(name) else {
        return Err(WheelError::Record(format!("does not list {:?}", cut(name))));
    };
    let Some(hash) = hash else {
        return Err(WheelError::Record(format!(
            "gives no sha256 for {:?}",
            cut(name)
        )));
    };
    if ring::digest::digest(hash.algorithm, bytes).as_ref() != hash.digest.as_slice() {
        return Err(WheelError::Record(format!(
            "hash of {:?} does not match its contents",
            cut(name)
        )));
    }
    if let Some(size) = size
        && *size != bytes.len() as u64
    {
        return Err(WheelError::Record(format!(
            "gives {:?} a size of {size} bytes, but it has {}",
            cut(name),
            bytes.len()
        )));
    }
    Ok(())
}

fn open(wheel: &Path) -> Result<zip::ZipArchive<std::io::BufReader<std::fs::File>>, WheelError> {
    let file = std::fs::File::open(wheel).map_err(|source| WheelError::Io {
        path: wheel.to_owned(),
        source,
    })?;
    zip::ZipArchive::new(std::io::BufReader::new(file)).map_err(|e| WheelError::Zip(e.to_string()))
}

/// Reads the wheel's `METADATA` (checked against `RECORD`) without unpacking anything.
pub fn read_metadata(
    wheel: &Path,
    name: &WheelName,
    limits: &WheelLimits,
) -> Result<String, WheelError> {
    read_metadata_from(&mut open(wheel)?, name, limits)
}

/// [`read_metadata`] on a wheel's bytes from any reader.
pub fn read_metadata_reader<R: Read + Seek>(
    reader: R,
    name: &WheelName,
    limits: &WheelLimits,
) -> Result<String, WheelError> {
    let mut zip = zip::ZipArchive::new(reader).map_err(|e| WheelError::Zip(e.to_string()))?;
    read_metadata_from(&mut zip, name, limits)
}

fn read_metadata_from<R: Read + Seek>(
    zip: &mut zip::ZipArchive<R>,
    name: &WheelName,
    limits: &WheelLimits,
) -> Result<String, WheelError> {
    let plan = plan(zip, name, limits)?;
    Ok(read_dist_info(zip, &plan, limits)?.metadata)
}

/// Removes a destination folder when dropped, unless disarmed.
struct Undo<'a>(Option<&'a Path>);

impl Drop for Undo<'_> {
    fn drop(&mut self) {
        if let Some(p) = self.0 {
            let _ = std::fs::remove_dir_all(p);
        }
    }
}

/// Unpacks the wheel at `wheel` (whose file name parsed as `name`) into `dest`, a folder that
/// must not exist yet: it is made, filled, and on any error (or panic) removed again, so the
/// caller can unpack into a temporary name and rename it into place. Every file is checked
/// before and while it is written (see the module's list); writes go through a capability
/// handle on `dest`, so nothing can land outside it.
pub fn unpack(
    wheel: &Path,
    name: &WheelName,
    dest: &Path,
    limits: &WheelLimits,
) -> Result<Manifest, WheelError> {
    unpack_from(&mut open(wheel)?, name, dest, limits)
}

/// [`unpack`] on a wheel's bytes from any reader.
pub fn unpack_reader<R: Read + Seek>(
    reader: R,
    name: &WheelName,
    dest: &Path,
    limits: &WheelLimits,
) -> Result<Manifest, WheelError> {
    let mut zip = zip::ZipArchive::new(reader).map_err(|e| WheelError::Zip(e.to_string()))?;
    unpack_from(&mut zip, name, dest, limits)
}

fn unpack_from<R: Read + Seek>(
    zip: &mut zip::ZipArchive<R>,
    name: &WheelName,
    dest: &Path,
    limits: &WheelLimits,
) -> Result<Manifest, WheelError> {
    let plan = plan(zip, name, limits)?;
    if let Some(file) = plan.compiled {
        return Err(WheelError::CompiledExtension { file });
    }
    let info = read_dist_info(zip, &plan, limits)?;
    // Every file to be written is in RECORD with a hash, before anything is written.
    let signatures = [
        info.record_name.clone(),
        format!("{}/RECORD.jws", plan.dist_info),
        format!("{}/RECORD.p7s", plan.dist_info),
    ];
    for p in plan.files.iter().filter(|p| p.dest.is_some()) {
        if signatures.contains(&p.name) {
            continue;
        }
        match info.record.get(&p.name) {
            Some((Some(_), _)) => {}
            Some((None, _)) => {
                return Err(WheelError::Record(format!(
                    "gives no sha256 for {:?}",
                    cut(&p.name)
                )));
            }
            None => {
                return Err(WheelError::Record(format!(
                    "does not list {:?}",
                    cut(&p.name)
                )));
            }
        }
    }
    let io = |source| WheelError::Io {
        path: dest.to_owned(),
        source,
    };
    std::fs::create_dir(dest).map_err(io)?;
    let mut undo = Undo(Some(dest));
    let root =
        cap_std::fs::Dir::open_ambient_dir(dest, cap_std::ambient_authority()).map_err(io)?;
    let mut files = Vec::new();
    let mut skipped = Vec::new();
    let mut written = 0u64;
    let mut buf = vec![0u8; 64 << 10];
    for p in &plan.files {
        let Some(dest_path) = &p.dest else {
            skipped.push(p.name.clone());
            continue;
        };
        if let Some((parent, _)) = dest_path.rsplit_once('/') {
            root.create_dir_all(parent).map_err(io)?;
        }
        let mut out = root.create(dest_path).map_err(io)?;
        let mut entry = zip
            .by_index(p.index)
            .map_err(|e| WheelError::Zip(e.to_string()))?;
        let compressed = entry.compressed_size();
        let record = info.record.get(&p.name);
        let mut hasher = record
            .and_then(|(h, _)| h.as_ref())
            .map(|h| (h, ring::digest::Context::new(h.algorithm)));
        let mut n = 0u64;
        loop {
            let got = entry
                .read(&mut buf)
                .map_err(|e| WheelError::Zip(format!("{}: {e}", cut(&p.name))))?;
            if got == 0 {
                break;
            }
            n += got as u64;
            // Checked on the bytes actually inflated: the header's size, the ratio, the total.
            if n > p.size {
                return Err(WheelError::Bomb {
                    name: cut(&p.name),
                    why: format!("inflates past the {} bytes its header says", p.size),
                });
            }
            if n > limits.ratio_floor && n / compressed.max(1) >= limits.max_ratio {
                return Err(WheelError::Bomb {
                    name: cut(&p.name),
                    why: format!("inflates more than {}:1", limits.max_ratio),
                });
            }
            if written + n > limits.max_unpacked_bytes {
                return Err(WheelError::TooLarge {
                    cap: limits.max_unpacked_bytes,
                });
            }
            if let Some((_, ctx)) = &mut hasher {
                ctx.update(&buf[..got]);
            }
            out.write_all(&buf[..got]).map_err(io)?;
        }
        if n != p.size {
            return Err(WheelError::Bomb {
                name: cut(&p.name),
                why: format!("inflates to {n} bytes, not the {} its header says", p.size),
            });
        }
        if let Some((h, ctx)) = hasher
            && ctx.finish().as_ref() != h.digest.as_slice()
        {
            return Err(WheelError::Record(format!(
                "hash of {:?} does not match its contents",
                cut(&p.name)
            )));
        }
        if let Some((_, Some(size))) = record
            && *size != n
        {
            return Err(WheelError::Record(format!(
                "gives {:?} a size of {size} bytes, but it has {n}",
                cut(&p.name)
            )));
        }
        out.flush().map_err(io)?;
        written += n;
        files.push(ManifestFile {
            path: dest_path.clone(),
            size: n,
        });
    }
    files.sort_by(|a, b| a.path.cmp(&b.path));
    undo.0 = None;
    Ok(Manifest {
        name: name.name.to_string(),
        version: name.version.clone(),
        dist_info: plan.dist_info,
        files,
        skipped,
        metadata: info.metadata,
    })
}

/// Builds wheels for tests (here and in `fetch`).
#[cfg(test)]
pub(crate) mod build {
    use std::io::Write;

    use base64::Engine as _;
    use zip::write::SimpleFileOptions;

    /// One entry: name, contents, unix mode (`None`: a plain file).
    pub struct Entry {
        pub name: String,
        pub data: Vec<u8>,
        pub symlink: bool,
        pub in_record: bool,
    }

    pub fn file(name: &str, data: &[u8]) -> Entry {
        Entry {
            name: name.into(),
            data: data.to_vec(),
            symlink: false,
            in_record: true,
        }
    }

    pub fn record_hash(data: &[u8]) -> String {
        let d = ring::digest::digest(&ring::digest::SHA256, data);
        format!(
            "sha256={}",
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(d.as_ref())
        )
    }

    /// A wheel of `entries` plus `{dist}/METADATA`, `WHEEL` and a `RECORD` over everything
    /// whose `in_record` is set.
    pub fn wheel(dist: &str, entries: Vec<Entry>) -> Vec<u8> {
        let (name, version) = dist.split_once('-').unwrap();
        let mut all = entries;
        all.push(file(
            &format!("{dist}.dist-info/METADATA"),
            format!("Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n").as_bytes(),
        ));
        all.push(file(
            &format!("{dist}.dist-info/WHEEL"),
            b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
        ));
        let mut record = String::new();
        for e in all.iter().filter(|e| e.in_record) {
            record.push_str(&format!(
                "{},{},{}\n",
                e.name,
                record_hash(&e.data),
                e.data.len()
            ));
        }
        record.push_str(&format!("{dist}.dist-info/RECORD,,\n"));
        all.push(file(&format!("{dist}.dist-info/RECORD"), record.as_bytes()));
        raw(all)
    }

    /// A zip of exactly `entries`.
    pub fn raw(entries: Vec<Entry>) -> Vec<u8> {
        let mut w = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
        let opts =
            SimpleFileOptions::default().compression_method(zip::CompressionMethod::Deflated);
        for e in entries {
            if e.symlink {
                w.add_symlink(&e.name, String::from_utf8(e.data).unwrap(), opts)
                    .unwrap();
            } else {
                w.start_file(&e.name, opts).unwrap();
                w.write_all(&e.data).unwrap();
            }
        }
        w.finish().unwrap().into_inner()
    }
}

#[cfg(test)]
mod tests {
    use super::build::*;
    use super::*;

    fn demo() -> WheelName {
        WheelName::parse("demo-1.0-py3-none-any.whl").unwrap()
    }

    fn unpack_bytes(bytes: Vec<u8>, dest: &Path) -> Result<Manifest, WheelError> {
        let mut zip = zip::ZipArchive::new(std::io::Cursor::new(bytes))
            .map_err(|e| WheelError::Zip(e.to_string()))?;
        unpack_from(&mut zip, &demo(), dest, &WheelLimits::default())
    }

    /// Unpacks into a fresh folder and checks that an error leaves nothing behind.
    fn refused(bytes: Vec<u8>) -> WheelError {
        let tmp = tempfile::tempdir().unwrap();
        let dest = tmp.path().join("out");
        let err = unpack_bytes(bytes, &dest).unwrap_err();
        assert!(!dest.exists(), "{err} left {dest:?} behind");
        assert_eq!(std::fs::read_dir(tmp.path()).unwrap().count(), 0);
        err
    }

    #[test]
    fn a_good_wheel_unpacks() {
        let bytes = wheel(
            "demo-1.0",
            vec![
                file("demo/__init__.py", b"X = 1\n"),
                file("demo/sub/data.txt", &b"hello ".repeat(1000)),
                file("demo-1.0.data/purelib/demo_extra.py", b"Y = 2\n"),
                file("demo-1.0.data/scripts/demo-cli", b"#!python\n"),
                file("demo-1.0.dist-info/licenses/LICENSE", b"MIT\n"),
            ],
        );
        let tmp = tempfile::tempdir().unwrap();
        let dest = tmp.path().join("out");
        let m = unpack_bytes(bytes.clone(), &dest).unwrap();
        assert_eq!(m.dist_info, "demo-1.0.dist-info");
        assert_eq!((m.name.as_str(), m.version.as_str()), ("demo", "1.0"));
        assert!(m.metadata.contains("Name: demo"));
        let paths: Vec<&str> = m.files.iter().map(|f| f.path.as_str()).collect();
        assert_eq!(
            paths,
            [
                "demo-1.0.dist-info/METADATA",
                "demo-1.0.dist-info/RECORD",
                "demo-1.0.dist-info/WHEEL",
                "demo-1.0.dist-info/licenses/LICENSE",
                "demo/__init__.py",
                "demo/sub/data.txt",
                "demo_extra.py",
            ]
        );
        assert_eq!(m.skipped, ["demo-1.0.data/scripts/demo-cli"]);
        assert_eq!(
            std::fs::read(dest.join("demo_extra.py")).unwrap(),
            b"Y = 2\n"
        );
        assert_eq!(
            std::fs::read(dest.join("demo/sub/data.txt")).unwrap().len(),
            6000
        );
        assert!(!dest.join("demo-1.0.data").exists());
        assert_eq!(m.total_bytes(), m.files.iter().map(|f| f.size).sum::<u64>());
        // A destination that exists already is refused (and left alone).
        assert!(matches!(
            unpack_bytes(bytes.clone(), &dest),
            Err(WheelError::Io { .. })
        ));
        assert!(dest.join("demo/__init__.py").exists());

        let mut zip = zip::ZipArchive::new(std::io::Cursor::new(bytes)).unwrap();
        let meta = read_metadata_from(&mut zip, &demo(), &WheelLimits::default()).unwrap();
        assert_eq!(meta, m.metadata);
    }

    #[test]
    fn unsafe_names_are_refused() {
        for name in [
            "../evil.py",
            "demo/../../evil.py",
            "/etc/evil.py",
            "demo\\..\\evil.py",
            "C:/evil.py",
            "demo/./x.py",
            "demo//x.py",
            "demo/\u{1b}x.py",
        ] {
            let err = refused(wheel("demo-1.0", vec![file(name, b"x")]));
            assert!(
                matches!(err, WheelError::UnsafePath { .. }),
                "{name:?}: {err}"
            );
        }
        let nul = raw(vec![file("demo/a\0b.py", b"x")]);
        assert!(matches!(
            refused(nul),
            WheelError::UnsafePath { .. } | WheelError::Zip(_)
        ));
    }

    #[test]
    fn symlinks_and_duplicates_are_refused() {
        let mut link = file("demo/link", b"/etc/passwd");
        link.symlink = true;
        let err = refused(wheel("demo-1.0", vec![link]));
        assert!(
            matches!(
                err,
                WheelError::SpecialEntry {
                    kind: "symlink",
                    ..
                }
            ),
            "{err}"
        );

        let err = refused(wheel(
            "demo-1.0",
            vec![
                file("demo.py", b"a"),
                file("demo-1.0.data/purelib/demo.py", b"b"),
            ],
        ));
        assert!(
            matches!(err, WheelError::Duplicate(ref d) if d == "demo.py"),
            "{err}"
        );
        let err = refused(wheel(
            "demo-1.0",
            vec![file("demo", b"a"), file("demo/x.py", b"b")],
        ));
        assert!(
            matches!(err, WheelError::Duplicate(ref d) if d == "demo"),
            "{err}"
        );
        // The zip writer refuses a repeated name, so a duplicate in the raw archive is made by
        // renaming the second entry in place.
        let mut bytes = wheel(
            "demo-1.0",
            vec![file("demo/a.py", b"a"), file("demo/b.py", b"b")],
        );
        for i in 0..bytes.len() - 8 {
            if &bytes[i..i + 8] == b"demo/b.p" {
                bytes[i + 5] = b'a';
            }
        }
        let err = refused(bytes);
        assert!(matches!(err, WheelError::Overlap(_)), "{err}");

        // Two entries over the same bytes (how non-recursive zip bombs multiply their output):
        // point the second central header at the first entry's local header.
        let mut bytes = wheel(
            "demo-1.0",
            vec![file("demo/a.py", b"a"), file("demo/b.py", b"b")],
        );
        let at = |bytes: &[u8], sig: [u8; 4], name_off: usize, name: &[u8]| {
            (0..bytes.len() - name_off - name.len())
                .find(|&i| {
                    bytes[i..i + 4] == sig
                        && &bytes[i + name_off..i + name_off + name.len()] == name
                })
                .unwrap()
        };
        let first_local = at(&bytes, [0x50, 0x4b, 0x03, 0x04], 30, b"demo/a.py") as u32;
        let second_central = at(&bytes, [0x50, 0x4b, 0x01, 0x02], 46, b"demo/b.py");
        bytes[second_central + 42..second_central + 46].copy_from_slice(&first_local.to_le_bytes());
        let err = refused(bytes);
        assert!(
            matches!(err, WheelError::Overlap(_) | WheelError::Zip(_)),
            "{err}"
        );
    }

    #[test]
    fn layout_rules_hold() {
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (wheel("other-1.0", vec![]), "does not match"),
            (wheel("demo-1.1", vec![]), "does not match"),
            (
                wheel("demo-1.0", vec![file("extra-2.0.dist-info/METADATA", b"x")]),
                "more than one",
            ),
            (
                wheel("demo-1.0", vec![file("other-1.0.data/purelib/x.py", b"x")]),
                "is not",
            ),
            (
                wheel("demo-1.0", vec![file("demo-1.0.data/weird/x.py", b"x")]),
                "not one of",
            ),
            (
                wheel("demo-1.0", vec![file("demo-1.0.data/x.py", b"x")]),
                "not inside",
            ),
            (
                wheel(
                    "demo-1.0",
                    vec![file("demo-1.0.data/purelib/x-1.dist-info/METADATA", b"x")],
                ),
                "would add",
            ),
            (raw(vec![file("demo/__init__.py", b"")]), "no .dist-info"),
        ];
        for (bytes, want) in cases {
            let err = refused(bytes);
            assert!(
                matches!(err, WheelError::Layout(_)) && err.to_string().contains(want),
                "{err} (wanted {want:?})"
            );
        }
        // METADATA, WHEEL and RECORD must be there.
        let err = refused(raw(vec![file(
            "demo-1.0.dist-info/WHEEL",
            b"Wheel-Version: 1.0\n",
        )]));
        assert!(err.to_string().contains("METADATA is missing"), "{err}");
        let err = refused(raw(vec![
            file("demo-1.0.dist-info/WHEEL", b"Wheel-Version: 2.0\n"),
            file("demo-1.0.dist-info/METADATA", b"Name: demo\n"),
            file("demo-1.0.dist-info/RECORD", b""),
        ]));
        assert!(err.to_string().contains("format version"), "{err}");
    }

    #[test]
    fn compiled_extensions_are_refused_by_name() {
        for name in [
            "demo/_speedups.cpython-315-x86_64-linux-gnu.so",
            "demo/_x.abi3.so",
            "demo.libs/libfoo.so.1.2",
            "demo/_x.pyd",
            "demo/_x.dylib",
            "demo-1.0.data/platlib/_x.DLL",
        ] {
            let err = refused(wheel("demo-1.0", vec![file(name, b"\x7fELF")]));
            assert!(
                matches!(&err, WheelError::CompiledExtension { file } if file == name),
                "{name}: {err}"
            );
        }
        for fine in [
            "demo/solver.py",
            "demo/so.txt",
            "demo/x.so.txt",
            "demo/x.so.",
        ] {
            assert!(!is_compiled_extension(fine), "{fine}");
        }
        // In skipped `.data` folders they are not installed, so not refused.
        let tmp = tempfile::tempdir().unwrap();
        let m = unpack_bytes(
            wheel(
                "demo-1.0",
                vec![file("demo-1.0.data/data/share/x.so", b"x")],
            ),
            &tmp.path().join("o"),
        )
        .unwrap();
        assert_eq!(m.skipped, ["demo-1.0.data/data/share/x.so"]);
    }

    #[test]
    fn record_is_verified() {
        // A file whose contents differ from its RECORD line.
        let evil = record_hash(b"print('evil')");
        let mut entries = vec![
            file("demo/a.py", b"print('good')"),
            file(
                "demo-1.0.dist-info/METADATA",
                b"Metadata-Version: 2.1\nName: demo\nVersion: 1.0\n",
            ),
            file("demo-1.0.dist-info/WHEEL", b"Wheel-Version: 1.0\n"),
        ];
        let mut record = String::new();
        for e in &entries {
            let h = if e.name == "demo/a.py" {
                evil.clone()
            } else {
                record_hash(&e.data)
            };
            record.push_str(&format!("{},{h},{}\n", e.name, e.data.len()));
        }
        record.push_str("demo-1.0.dist-info/RECORD,,\n");
        entries.push(file("demo-1.0.dist-info/RECORD", record.as_bytes()));
        let err = refused(raw(entries));
        assert!(
            matches!(err, WheelError::Record(_)) && err.to_string().contains("does not match"),
            "{err}"
        );

        // A file RECORD does not list.
        let mut stray = file("demo/stray.py", b"x");
        stray.in_record = false;
        let err = refused(wheel("demo-1.0", vec![stray]));
        assert!(
            err.to_string().contains("does not list \"demo/stray.py\""),
            "{err}"
        );

        // Quoted CSV with commas and quotes in paths.
        let rec = parse_record("\"a,b\"\"c.py\",sha256=AAAA,3\nx,,\n").unwrap();
        assert!(rec.contains_key("a,b\"c.py"));
        assert_eq!(rec["x"], (None, None));
        assert!(parse_record("\"open,x,1\n").is_err());
        assert!(parse_record("a,b\n").is_err());
        assert!(parse_record("a,,1\na,,1\n").is_err());
    }

    #[test]
    fn bombs_are_refused() {
        // A well-formed entry whose ratio is out of bounds: refused from its header.
        let zeros = vec![0u8; 8 << 20];
        let err = refused(wheel("demo-1.0", vec![file("demo/zeros.bin", &zeros)]));
        assert!(matches!(err, WheelError::Bomb { .. }), "{err}");
        assert!(err.to_string().contains("250:1"), "{err}");

        // A header that lies about the size: patch the inflated size in both the local and
        // the central header to 100 bytes; inflating stops at the lie.
        let mut bytes = wheel(
            "demo-1.0",
            vec![file("demo/zeros.bin", &vec![0u8; 200_000])],
        );
        let lie = 100u32.to_le_bytes();
        let mut patched = 0;
        for i in 0..bytes.len().saturating_sub(46) {
            let sig = &bytes[i..i + 4];
            let name_at = |off: usize| &bytes[i + off..i + off + 14];
            if sig == [0x50, 0x4b, 0x03, 0x04] && name_at(30) == b"demo/zeros.bin" {
                bytes[i + 22..i + 26].copy_from_slice(&lie);
                patched += 1;
            } else if sig == [0x50, 0x4b, 0x01, 0x02] && name_at(46) == b"demo/zeros.bin" {
                bytes[i + 24..i + 28].copy_from_slice(&lie);
                patched += 1;
            }
        }
        assert_eq!(patched, 2);
        let err = refused(bytes);
        assert!(
            matches!(err, WheelError::Bomb { .. } | WheelError::Zip(_)),
            "{err}"
        );

        // Caps on the total and on the count.
        let tmp = tempfile::tempdir().unwrap();
        let bytes = wheel("demo-1.0", vec![file("demo/a.bin", &[7u8; 5000])]);
        let mut zip = zip::ZipArchive::new(std::io::Cursor::new(bytes.clone())).unwrap();
        let small = WheelLimits {
            max_unpacked_bytes: 4000,
            ..WheelLimits::default()
        };
        let err = unpack_from(&mut zip, &demo(), &tmp.path().join("a"), &small).unwrap_err();
        assert!(matches!(err, WheelError::TooLarge { cap: 4000 }), "{err}");
        let few = WheelLimits {
            max_files: 3,
            ..WheelLimits::default()
        };
        let err = unpack_from(&mut zip, &demo(), &tmp.path().join("b"), &few).unwrap_err();
        assert!(matches!(err, WheelError::TooManyFiles { cap: 3 }), "{err}");
        assert_eq!(std::fs::read_dir(tmp.path()).unwrap().count(), 0);
    }

    #[test]
    fn not_a_zip_is_refused() {
        let err = refused(b"PK\x03\x04 this is not a zip".to_vec());
        assert!(matches!(err, WheelError::Zip(_)), "{err}");
    }
}
