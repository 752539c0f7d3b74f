//! Which host folder the standalone kernel hands its guest, writable, as `/workspace`.
//!
//! Jupyter (JupyterLab, nbclient, papermill) starts a kernel in the notebook's folder, and
//! notebooks read their data relative to it (`pd.read_csv("data/births.csv")`), so by default
//! the kernel's working directory is the workspace. Whatever folder that is, the code the kernel
//! runs can read, change and delete everything in it, so some folders are refused as a default:
//!
//! - `/`, and any folder that holds the user's home (`$HOME`), the home itself included;
//! - any folder that holds the temporary folder (`$TMPDIR`, else `/tmp`) where kernels keep
//!   their private roots, that folder itself included: other kernels' files are there;
//! - a system folder or anything in one: `/bin`, `/boot`, `/dev`, `/etc`, `/lib*`, `/proc`,
//!   `/run`, `/sbin`, `/snap`, `/sys`, `/usr`, `/var` (but folders inside `/var/tmp` are
//!   fine), and on macOS `/System`, `/Library`, `/Applications`, `/private` (but folders inside
//!   `/private/tmp` and `/private/var/folders` are fine);
//! - the folders that hold many people's or programs' files, themselves (folders inside them
//!   are fine): `/home`, `/Users`, `/root`, `/opt`, `/srv`, `/mnt`, `/media`, `/Volumes`,
//!   `/var/tmp`.
//!
//! Paths are compared after resolving symlinks. A refused folder is an error that names the
//! settings that choose another: `--workspace DIR` or `SANDGATE_WORKSPACE=DIR`.
//!
//! A folder chosen with those settings is used as given (the gateway passes each kernel its
//! own), with one rule that always holds: the workspace never overlaps Sandgate's image or its
//! compiled-module cache (the kernel maps that module as native code, so a guest that could
//! write it would escape).

use std::path::{Path, PathBuf};

/// The environment variable that names the workspace (as `--workspace` does).
pub const ENV: &str = "SANDGATE_WORKSPACE";

/// System trees: refused, with everything inside them (but see [`ALLOWED_INSIDE`]).
const SYSTEM_TREES: &[&str] = &[
    "/bin",
    "/boot",
    "/dev",
    "/etc",
    "/lib",
    "/lib32",
    "/lib64",
    "/libx32",
    "/proc",
    "/run",
    "/sbin",
    "/snap",
    "/sys",
    "/usr",
    "/var",
    "/System",
    "/Library",
    "/Applications",
    "/private",
];
/// Folders inside a system tree whose subfolders are ordinary places for files.
const ALLOWED_INSIDE: &[&str] = &["/var/tmp", "/private/tmp", "/private/var/folders"];
/// Folders refused themselves (they hold many people's or programs' files); their subfolders
/// are fine.
const SHARED_PARENTS: &[&str] = &[
    "/home", "/Users", "/root", "/opt", "/srv", "/mnt", "/media", "/Volumes", "/var/tmp",
];

/// Why a folder cannot be the workspace.
#[derive(Debug, thiserror::Error)]
pub enum WorkspaceError {
    /// The default (the working directory) is a folder the rule refuses.
    #[error(
        "refusing to use {dir} as the sandbox's /workspace: it is {why}, and the code this \
         kernel runs could read, change and delete everything in it. The kernel uses the folder \
         it was started in (Jupyter starts it in the notebook's folder): start it from a project \
         folder, or choose the folder with --workspace DIR or the environment variable \
         SANDGATE_WORKSPACE=DIR (for instance in the kernelspec's \"env\")"
    )]
    Refused {
        /// The folder.
        dir: PathBuf,
        /// What it is, in words.
        why: &'static str,
    },
    /// A chosen folder overlaps the image or the compiled-module cache.
    #[error(
        "refusing to use {dir} as the sandbox's /workspace: it overlaps {what} ({other}), which \
         the kernel runs; choose a folder outside Sandgate's data folder with --workspace DIR or \
         SANDGATE_WORKSPACE=DIR"
    )]
    Overlaps {
        /// The folder.
        dir: PathBuf,
        /// What it overlaps, in words.
        what: &'static str,
        /// That folder.
        other: PathBuf,
    },
    /// The working directory or the chosen folder cannot be used.
    #[error("cannot use {dir} as the sandbox's /workspace: {source}")]
    Io {
        /// The folder.
        dir: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// What the rule protects, resolved from the process's environment (see [`Protected::from_env`]).
#[derive(Debug, Clone)]
pub struct Protected {
    /// The user's home (`$HOME`), if set.
    pub home: Option<PathBuf>,
    /// The temporary folder holding the kernels' private roots.
    pub tmp: PathBuf,
    /// Folders the workspace may never overlap: the image and the compiled-module cache.
    pub runtime: Vec<(&'static str, PathBuf)>,
}

impl Protected {
    /// From `$HOME`, the temporary folder, and Sandgate's data folder `data_dir`.
    pub fn from_env(data_dir: &Path) -> Protected {
        Protected {
            home: std::env::var_os("HOME")
                .filter(|h| !h.is_empty())
                .map(|h| resolve(Path::new(&h))),
            tmp: resolve(&std::env::temp_dir()),
            runtime: vec![
                ("Sandgate's images", resolve(&data_dir.join("images"))),
                (
                    "Sandgate's compiled-module cache",
                    resolve(&data_dir.join("cache")),
                ),
            ],
        }
    }
}

/// `path` with symlinks resolved where it exists (else as given).
fn resolve(path: &Path) -> PathBuf {
    std::fs::canonicalize(path).unwrap_or_else(|_| path.to_owned())
}

/// The workspace: `chosen` (from `--workspace` or [`ENV`]), created if missing, else the
/// working directory `cwd` if the rule allows it. Returns the resolved path.
pub fn choose(
    chosen: Option<&Path>,
    cwd: &Path,
    protected: &Protected,
) -> Result<PathBuf, WorkspaceError> {
    let dir = match chosen {
        Some(dir) => {
            std::fs::create_dir_all(dir).map_err(|source| WorkspaceError::Io {
                dir: dir.to_owned(),
                source,
            })?;
            let dir = std::fs::canonicalize(dir).map_err(|source| WorkspaceError::Io {
                dir: dir.to_owned(),
                source,
            })?;
            check_runtime(&dir, protected)?;
            return Ok(dir);
        }
        None => std::fs::canonicalize(cwd).map_err(|source| WorkspaceError::Io {
            dir: cwd.to_owned(),
            source,
        })?,
    };
    if let Some(why) = refusal(&dir, protected) {
        return Err(WorkspaceError::Refused { dir, why });
    }
    check_runtime(&dir, protected)?;
    Ok(dir)
}

fn check_runtime(dir: &Path, protected: &Protected) -> Result<(), WorkspaceError> {
    for (what, other) in &protected.runtime {
        if dir.starts_with(other) || other.starts_with(dir) {
            return Err(WorkspaceError::Overlaps {
                dir: dir.to_owned(),
                what,
                other: other.clone(),
            });
        }
    }
    Ok(())
}

/// Why the resolved folder `dir` may not be the default workspace, if it may not.
pub fn refusal(dir: &Path, protected: &Protected) -> Option<&'static str> {
    if dir == Path::new("/") {
        return Some("the root of the file system");
    }
    if let Some(home) = &protected.home {
        if dir == home {
            return Some("your home folder ($HOME)");
        }
        if home.starts_with(dir) {
            return Some("a folder that holds your home folder ($HOME)");
        }
    }
    if protected.tmp.starts_with(dir) {
        return Some("the temporary folder where kernels keep their private files (or holds it)");
    }
    if SHARED_PARENTS.iter().any(|p| dir == Path::new(p)) {
        return Some("a folder that holds other people's or programs' files");
    }
    let allowed = ALLOWED_INSIDE
        .iter()
        .any(|a| dir.starts_with(a) && dir != Path::new(a));
    if !allowed && SYSTEM_TREES.iter().any(|s| dir.starts_with(s)) {
        return Some("a system folder");
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn protected() -> Protected {
        Protected {
            home: Some("/home/ada".into()),
            tmp: "/tmp".into(),
            runtime: vec![
                ("images", "/home/ada/.local/share/sandgate/images".into()),
                ("cache", "/home/ada/.local/share/sandgate/cache".into()),
            ],
        }
    }

    #[test]
    fn project_folders_are_allowed() {
        for ok in [
            "/home/ada/notebooks",
            "/home/ada/work/2026/analysis",
            "/tmp/pytest-of-ada/test0",
            "/var/tmp/scratch",
            "/opt/projects/x",
            "/srv/notebooks/team",
            "/mnt/data/study",
            "/private/tmp/x",
            "/home/ada/.local/share/sandgate/workspace",
        ] {
            assert_eq!(refusal(Path::new(ok), &protected()), None, "{ok}");
        }
    }

    #[test]
    fn home_root_system_and_shared_folders_are_refused() {
        for (bad, why) in [
            ("/", "root"),
            ("/home/ada", "home"),
            ("/home", "holds your home"),
            ("/tmp", "temporary"),
            ("/etc", "system"),
            ("/etc/ssh", "system"),
            ("/usr/local/share", "system"),
            ("/var/lib/docker", "system"),
            ("/run/user/1000", "system"),
            ("/proc/self", "system"),
            ("/lib64", "system"),
            ("/var/tmp", "other people"),
            ("/opt", "other people"),
            ("/root", "other people"),
            ("/mnt", "other people"),
        ] {
            let got = refusal(Path::new(bad), &protected());
            assert!(got.is_some_and(|g| g.contains(why)), "{bad}: {got:?}");
        }
    }

    #[test]
    fn the_refusal_names_the_settings_that_choose_another_folder() {
        let text = WorkspaceError::Refused {
            dir: "/home/ada".into(),
            why: "your home folder ($HOME)",
        }
        .to_string();
        assert!(text.contains("--workspace DIR"), "{text}");
        assert!(text.contains("SANDGATE_WORKSPACE=DIR"), "{text}");
    }

    #[test]
    fn a_chosen_folder_never_overlaps_the_image_or_the_cache() {
        let p = protected();
        for bad in [
            "/home/ada/.local/share/sandgate",
            "/home/ada/.local/share/sandgate/cache",
            "/home/ada/.local/share/sandgate/images/python-wasi-0.1.0",
            "/home/ada",
        ] {
            assert!(check_runtime(Path::new(bad), &p).is_err(), "{bad}");
        }
        assert!(check_runtime(Path::new("/dev/shm/sandgate-live/ws"), &p).is_ok());
    }
}
