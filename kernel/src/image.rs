//! The sandbox image: where it lives, fetching it with the recipe in `images/python-wasi/`,
//! checking its SHA-256 pins, and the cache of its compiled module.
//!
//! Layout under the Sandgate home (`$SANDGATE_HOME`, else `$XDG_DATA_HOME/sandgate`, else
//! `~/.local/share/sandgate`):
//!
//! ```text
//! images/python-wasi-0.1.0/   the unpacked image (see images/python-wasi/fetch.py)
//!     verified.json           size/mtime stamps of the files whose SHA-256 was checked
//! cache/<image>-<sha>-<engine>.cwasm            the compiled module
//! cache/<image>-<sha>-<engine>-<driver>.interrupt.json   the interrupt flags found by the probe
//! ```
//!
//! Hashing 150 MB costs a few hundred milliseconds, so a file is re-hashed only when its stamp
//! (size, mtime, inode) differs from the one recorded when it was last verified.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde::{Deserialize, Serialize};

use crate::sandbox::{self, InterruptFlags, Limits};

/// The recipe and its pins, embedded so an installed kernel can fetch its own image.
const FETCH_PY: &str = include_str!("../../images/python-wasi/fetch.py");
const PINS_JSON: &str = include_str!("../../images/python-wasi/pins.json");

/// Errors about the image.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// The image is not there and may not be fetched.
    #[error(
        "the sandbox image is missing at {dir}. Fetch it with `sandgate-kernel prepare` \
         (or `python3 images/python-wasi/fetch.py`)"
    )]
    Missing {
        /// Where it was looked for.
        dir: PathBuf,
    },
    /// Fetching failed.
    #[error("fetching the sandbox image failed: {0}")]
    Fetch(String),
    /// A file does not match its pinned hash.
    #[error(
        "the sandbox image file {path} is corrupt: SHA-256 {got}, expected {want}. \
         Remove {dir} and run `sandgate-kernel prepare` again"
    )]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// The image folder.
        dir: PathBuf,
        /// Its hash.
        got: String,
        /// The pinned hash.
        want: String,
    },
    /// Compiling the image failed.
    #[error("compiling the sandbox image failed: {0}")]
    Compile(String),
    /// Reading or writing a file failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> ImageError + '_ {
    move |source| ImageError::Io {
        path: path.to_owned(),
        source,
    }
}

/// The pins in `images/python-wasi/pins.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Pins {
    /// Image name.
    pub name: String,
    /// PyPI package.
    pub package: String,
    /// Its version.
    pub version: String,
    /// The wheel's file name.
    pub wheel: String,
    /// The wheel's SHA-256.
    pub wheel_sha256: String,
    /// CPython's version tag (`315`).
    pub python_tag: String,
    /// Member path in the wheel → SHA-256.
    pub files: BTreeMap<String, String>,
}

impl Pins {
    /// The pins built into this kernel.
    pub fn builtin() -> Pins {
        serde_json::from_str(PINS_JSON).expect("pins.json is checked by a unit test")
    }

    fn sha_of(&self, basename: &str) -> Option<&str> {
        self.files
            .iter()
            .find(|(k, _)| k.ends_with(basename))
            .map(|(_, v)| v.as_str())
    }
}

/// A verified image, ready to run.
#[derive(Debug, Clone)]
pub struct Image {
    /// The unpacked image folder.
    pub dir: PathBuf,
    /// The compiled module.
    pub cwasm: PathBuf,
    /// The folder holding the standard library zip (the guest's `/usr/local/lib`).
    pub lib_dir: PathBuf,
    /// matplotlib's data.
    pub mpl_data_dir: PathBuf,
    /// CPython's version tag.
    pub python_tag: String,
    /// SHA-256 of the interpreter's wasm.
    pub sha256: String,
    /// Where to set bits to interrupt without losing state; `None` if the probe failed.
    pub interrupt: Option<InterruptFlags>,
}

impl Image {
    /// Where the guest sees matplotlib's data (matplotlib computes it from its own path).
    pub fn mpl_data_guest(&self) -> String {
        format!(
            "/usr/local/lib/python{}.zip/matplotlib/mpl-data",
            self.python_tag
        )
    }
}

/// The image folder under `home`.
pub fn image_dir(home: &Path, pins: &Pins) -> PathBuf {
    home.join("images")
        .join(format!("{}-{}", pins.name, pins.version))
}

/// Runs the embedded recipe to fetch the image into `dir`, showing pip's progress on stderr.
pub fn fetch(dir: &Path) -> Result<(), ImageError> {
    let work = std::env::temp_dir().join(format!("sandgate-fetch-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&work).map_err(io(&work))?;
    let script = work.join("fetch.py");
    let pins = work.join("pins.json");
    let result = (|| {
        std::fs::write(&script, FETCH_PY).map_err(io(&script))?;
        std::fs::write(&pins, PINS_JSON).map_err(io(&pins))?;
        let python = std::env::var_os("SANDGATE_PYTHON").unwrap_or_else(|| "python3".into());
        let mut command = Command::new(&python);
        command
            .arg(&script)
            .arg("--pins")
            .arg(&pins)
            .arg("--dest")
            .arg(dir)
            .stdout(std::process::Stdio::null());
        end_with_parent(&mut command);
        let status = command
            .status()
            .map_err(|e| ImageError::Fetch(format!("cannot run {python:?}: {e}")))?;
        if status.success() {
            Ok(())
        } else {
            Err(ImageError::Fetch(format!(
                "the recipe exited with {status}"
            )))
        }
    })();
    let _ = std::fs::remove_dir_all(&work);
    result
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Stamp {
    size: u64,
    mtime_ns: i128,
    inode: u64,
    sha256: String,
}

fn stamp_of(path: &Path) -> Result<(u64, i128, u64), ImageError> {
    let meta = std::fs::metadata(path).map_err(io(path))?;
    let mtime = meta.modified().map_err(io(path))?;
    let mtime_ns = match mtime.duration_since(std::time::UNIX_EPOCH) {
        Ok(d) => d.as_nanos() as i128,
        Err(e) => -(e.duration().as_nanos() as i128),
    };
    #[cfg(unix)]
    let inode = std::os::unix::fs::MetadataExt::ino(&meta);
    #[cfg(not(unix))]
    let inode = 0;
    Ok((meta.len(), mtime_ns, inode))
}

/// SHA-256 of a file, hex.
pub fn sha256_file(path: &Path) -> Result<String, ImageError> {
    let mut file = std::fs::File::open(path).map_err(io(path))?;
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf).map_err(io(path))?;
        if n == 0 {
            break;
        }
        ctx.update(&buf[..n]);
    }
    Ok(hex::encode(ctx.finish()))
}

/// Checks each file against its pin, re-hashing only files whose stamp changed.
fn verify(dir: &Path, files: &[(PathBuf, &str)]) -> Result<(), ImageError> {
    let record = dir.join("verified.json");
    let mut stamps: BTreeMap<String, Stamp> = std::fs::read(&record)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default();
    let mut changed = false;
    for (path, want) in files {
        let key = path
            .file_name()
            .unwrap_or_default()
            .to_string_lossy()
            .into_owned();
        let (size, mtime_ns, inode) = stamp_of(path)?;
        let known = stamps.get(&key).is_some_and(|s| {
            s.size == size && s.mtime_ns == mtime_ns && s.inode == inode && s.sha256 == *want
        });
        if known {
            continue;
        }
        let got = sha256_file(path)?;
        if got != *want {
            return Err(ImageError::Corrupt {
                path: path.clone(),
                dir: dir.to_owned(),
                got,
                want: want.to_string(),
            });
        }
        stamps.insert(
            key,
            Stamp {
                size,
                mtime_ns,
                inode,
                sha256: got,
            },
        );
        changed = true;
    }
    if changed {
        let tmp = record.with_extension("tmp");
        let body = serde_json::to_vec_pretty(&stamps).expect("stamps serialise");
        std::fs::write(&tmp, body).map_err(io(&tmp))?;
        std::fs::rename(&tmp, &record).map_err(io(&record))?;
    }
    Ok(())
}

/// How to get the image ready.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fetch {
    /// Fetch it if it is missing.
    IfMissing,
    /// Fail with a clear error if it is missing.
    Never,
}

/// Finds, verifies and (if needed) fetches and compiles the image under `home`.
/// `progress` hears about slow steps.
pub fn prepare(
    home: &Path,
    limits: &Limits,
    fetch_policy: Fetch,
    progress: &dyn Fn(&str),
) -> Result<Image, ImageError> {
    let pins = Pins::builtin();
    let dir = image_dir(home, &pins);
    let have: Option<serde_json::Value> = std::fs::read(dir.join("image.json"))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok());
    let current = have
        .as_ref()
        .and_then(|v| v.get("pins"))
        .and_then(|p| serde_json::from_value::<Pins>(p.clone()).ok())
        == Some(pins.clone());
    if !current {
        match fetch_policy {
            Fetch::Never => return Err(ImageError::Missing { dir }),
            Fetch::IfMissing => {
                progress(&format!(
                    "fetching the sandbox image into {} (first use only)",
                    dir.display()
                ));
                fetch(&dir)?;
            }
        }
    }
    let snapshot = dir.join("python-snapshot.wasm");
    let lib_dir = dir.join("lib");
    let zip = lib_dir.join(format!("python{}.zip", pins.python_tag));
    let snapshot_sha = pins
        .sha_of("python-snapshot.wasm")
        .unwrap_or_default()
        .to_owned();
    let zip_sha = pins.sha_of("python-stdlib.zip").unwrap_or_default();
    for path in [&snapshot, &zip] {
        if !path.exists() {
            return Err(ImageError::Missing { dir: dir.clone() });
        }
    }
    verify(
        &dir,
        &[(snapshot.clone(), snapshot_sha.as_str()), (zip, zip_sha)],
    )?;
    let key = sandbox::compile_key(limits).map_err(|e| ImageError::Compile(e.to_string()))?;
    let cache = home.join("cache");
    std::fs::create_dir_all(&cache).map_err(io(&cache))?;
    let stem = format!("{}-{}-{}", pins.name, &snapshot_sha[..16], key);
    let cwasm = cache.join(format!("{stem}.cwasm"));
    let flags_path = cache.join(format!("{stem}-{}.interrupt.json", sandbox::driver_tag()));
    let mut image = Image {
        dir: dir.clone(),
        cwasm: cwasm.clone(),
        lib_dir,
        mpl_data_dir: dir.join("mpl-data"),
        python_tag: pins.python_tag.clone(),
        sha256: snapshot_sha,
        interrupt: None,
    };
    if !cwasm.exists() || !flags_path.exists() {
        progress(if cwasm.exists() {
            "probing the interpreter for its interrupt flags (once per image and kernel version)"
        } else {
            "compiling the sandbox image to native code (first start only; about a minute)"
        });
        let exe = std::env::current_exe().map_err(|e| ImageError::Compile(e.to_string()))?;
        let mut command = Command::new(exe);
        command.arg("compile-image").arg("--home").arg(home);
        end_with_parent(&mut command);
        let status = command
            .status()
            .map_err(|e| ImageError::Compile(e.to_string()))?;
        if !status.success() {
            return Err(ImageError::Compile(format!(
                "the compiler process exited with {status}"
            )));
        }
    }
    image.interrupt = std::fs::read(&flags_path)
        .ok()
        .and_then(|b| serde_json::from_slice::<Option<InterruptFlags>>(&b).ok())
        .flatten();
    if image.interrupt.is_none() {
        tracing::warn!("no interrupt flags for this image: an interrupt restarts the interpreter");
    }
    Ok(image)
}

/// Ends `command`'s process with SIGTERM when the thread that starts it dies: the caller waits
/// for it on that thread, so a killed caller does not leave a minute of work running for nobody.
/// Set between fork and exec, so no moment exists when the caller is gone and it is not set.
fn end_with_parent(command: &mut Command) {
    use std::os::unix::process::CommandExt;
    let parent = rustix::process::getpid();
    // SAFETY: runs in the child between fork and exec, and only makes two system calls (no
    // allocation, no locks).
    #[allow(unsafe_code)]
    unsafe {
        command.pre_exec(move || {
            rustix::process::set_parent_process_death_signal(Some(rustix::process::Signal::TERM))?;
            if rustix::process::getppid() != Some(parent) {
                return Err(rustix::io::Errno::SRCH.into());
            }
            Ok(())
        });
    }
}

/// For `prepare` itself, which the gateway starts (and the gateway has no unsafe code to set
/// this between fork and exec): SIGTERM when the thread that started it dies. The gateway waits
/// for `prepare` on that thread; were the gateway killed in the moment between this process's
/// start and this call, `prepare` would run to its end, as it did before.
pub fn end_with_starter() {
    if let Err(e) =
        rustix::process::set_parent_process_death_signal(Some(rustix::process::Signal::TERM))
    {
        tracing::debug!(error = %e, "no parent-death signal; prepare outlives the gateway");
    }
}

/// The `compile-image` step, run in its own process: compile the module, then probe it for
/// its interrupt flags. Writes both files next to each other in the cache.
pub fn compile_image(home: &Path, limits: &Limits) -> Result<(), ImageError> {
    let pins = Pins::builtin();
    let dir = image_dir(home, &pins);
    let snapshot_sha = pins
        .sha_of("python-snapshot.wasm")
        .unwrap_or_default()
        .to_owned();
    let key = sandbox::compile_key(limits).map_err(|e| ImageError::Compile(e.to_string()))?;
    let stem = format!("{}-{}-{}", pins.name, &snapshot_sha[..16], key);
    let cache = home.join("cache");
    let cwasm = cache.join(format!("{stem}.cwasm"));
    let flags_path = cache.join(format!("{stem}-{}.interrupt.json", sandbox::driver_tag()));
    if !cwasm.exists() {
        let started = std::time::Instant::now();
        sandbox::compile(limits, &dir.join("python-snapshot.wasm"), &cwasm)
            .map_err(|e| ImageError::Compile(e.to_string()))?;
        tracing::info!(
            seconds = started.elapsed().as_secs_f64(),
            "compiled the sandbox image"
        );
    }
    let image = Image {
        dir: dir.clone(),
        cwasm,
        lib_dir: dir.join("lib"),
        mpl_data_dir: dir.join("mpl-data"),
        python_tag: pins.python_tag.clone(),
        sha256: snapshot_sha,
        interrupt: None,
    };
    let workspace = std::env::temp_dir().join(format!("sandgate-probe-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&workspace).map_err(io(&workspace))?;
    let config = sandbox::SandboxConfig {
        image,
        workspace: workspace.clone(),
        home: None,
        packages: None,
        limits: limits.clone(),
    };
    let flags = match sandbox::probe_interrupt(config, &dir.join("python-snapshot.wasm")) {
        Ok(flags) => Some(flags),
        Err(e) => {
            tracing::warn!(error = %e, "interrupts will restart the interpreter");
            None
        }
    };
    let _ = std::fs::remove_dir_all(&workspace);
    let tmp = flags_path.with_extension("tmp");
    std::fs::write(&tmp, serde_json::to_vec(&flags).expect("flags serialise")).map_err(io(&tmp))?;
    std::fs::rename(&tmp, &flags_path).map_err(io(&flags_path))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtin_pins_parse_and_name_both_files() {
        let pins = Pins::builtin();
        assert_eq!(pins.sha_of("python-snapshot.wasm").map(str::len), Some(64));
        assert_eq!(pins.sha_of("python-stdlib.zip").map(str::len), Some(64));
    }

    #[test]
    fn verify_detects_a_changed_file() {
        let dir = std::env::temp_dir().join(format!("sandgate-verify-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("f.bin");
        std::fs::write(&file, b"hello").unwrap();
        let good = sha256_file(&file).unwrap();
        verify(&dir, &[(file.clone(), good.as_str())]).unwrap();
        // Same size, different content, different mtime: must be re-hashed and refused.
        std::fs::write(&file, b"jello").unwrap();
        let filetime = std::time::SystemTime::now() + std::time::Duration::from_secs(5);
        std::fs::File::options()
            .write(true)
            .open(&file)
            .unwrap()
            .set_modified(filetime)
            .unwrap();
        let err = verify(&dir, &[(file.clone(), good.as_str())]).unwrap_err();
        assert!(matches!(err, ImageError::Corrupt { .. }), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
