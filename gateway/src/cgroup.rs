//! A cgroup of its own for each kernel process, where the host lets the gateway make one: a
//! memory cap on the whole process (the guest's memory is capped by the sandbox already; this
//! bounds everything else too) and a CPU quota, so one kernel cannot starve the others.
//!
//! Both cgroup layouts are handled: v2 (a `sandgate-kernels` folder inside the gateway's own
//! cgroup, when that is delegated to it) and v1 (the same under the gateway's own `memory` and
//! `cpu` cgroups). When neither is writable, kernels run without one and the gateway says so
//! once, at start.

use std::path::{Path, PathBuf};

/// Caps for one kernel process.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Caps {
    /// Bytes of memory for the whole process.
    pub memory_bytes: u64,
    /// CPU time per period, as a fraction of one core (1.0 = one core).
    pub cpu_cores: f64,
}

/// Where kernel cgroups are made.
#[derive(Debug, Clone)]
pub enum Cgroups {
    /// cgroup v2: one folder per kernel under `base`.
    V2 {
        /// The parent folder.
        base: PathBuf,
    },
    /// cgroup v1: one folder per kernel under each controller's parent.
    V1 {
        /// Under the `memory` controller.
        memory: PathBuf,
        /// Under the `cpu` controller, if writable.
        cpu: Option<PathBuf>,
    },
    /// No cgroup can be made here.
    Unavailable(String),
}

/// A kernel's cgroup folders, removed when dropped (after its process has exited).
#[derive(Debug)]
pub struct Placement {
    dirs: Vec<PathBuf>,
}

impl Drop for Placement {
    fn drop(&mut self) {
        for d in &self.dirs {
            let _ = std::fs::remove_dir(d);
        }
    }
}

/// The gateway's own cgroup path for `controller` (v1) or the unified one (`""`, v2).
fn own(controller: &str) -> Option<String> {
    let text = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    text.lines().find_map(|line| {
        let mut parts = line.splitn(3, ':');
        let (_, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
        controllers
            .split(',')
            .any(|c| c == controller)
            .then(|| path.to_owned())
    })
}

fn writable_child(parent: &Path) -> Result<PathBuf, String> {
    let dir = parent.join("sandgate-kernels");
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    Ok(dir)
}

impl Cgroups {
    /// Finds where kernel cgroups can go.
    pub fn detect() -> Cgroups {
        let root = Path::new("/sys/fs/cgroup");
        if root.join("cgroup.controllers").exists() {
            let Some(path) = own("") else {
                return Cgroups::Unavailable("no unified cgroup in /proc/self/cgroup".into());
            };
            let parent = root.join(path.trim_start_matches('/'));
            return match writable_child(&parent) {
                Ok(base) => {
                    // Controllers must be enabled for the children.
                    let _ = std::fs::write(base.join("cgroup.subtree_control"), "+memory +cpu");
                    Cgroups::V2 { base }
                }
                Err(e) => Cgroups::Unavailable(e),
            };
        }
        let Some(memory) = own("memory") else {
            return Cgroups::Unavailable("no memory cgroup in /proc/self/cgroup".into());
        };
        let memory = match writable_child(&root.join("memory").join(memory.trim_start_matches('/')))
        {
            Ok(d) => d,
            Err(e) => return Cgroups::Unavailable(e),
        };
        let cpu = own("cpu")
            .and_then(|p| writable_child(&root.join("cpu").join(p.trim_start_matches('/'))).ok());
        Cgroups::V1 { memory, cpu }
    }

    /// Removes kernel cgroups left empty (by kernels that ended while the gateway stopped).
    /// A cgroup that still holds a process cannot be removed, so other gateways' are safe.
    pub fn sweep(&self) {
        let parents: Vec<&PathBuf> = match self {
            Cgroups::V2 { base } => vec![base],
            Cgroups::V1 { memory, cpu } => std::iter::once(memory).chain(cpu.as_ref()).collect(),
            Cgroups::Unavailable(_) => Vec::new(),
        };
        for parent in parents {
            for entry in std::fs::read_dir(parent).into_iter().flatten().flatten() {
                if entry.file_name().to_string_lossy().starts_with("kernel-") {
                    let _ = std::fs::remove_dir(entry.path());
                }
            }
        }
    }

    /// Puts process `pid` (kernel `name`) in a cgroup of its own with `caps`. `Err` says why
    /// it could not (the kernel runs on without one).
    pub fn place(&self, name: &str, pid: u32, caps: Caps) -> Result<Placement, String> {
        let write = |path: PathBuf, value: String| {
            std::fs::write(&path, value).map_err(|e| format!("{}: {e}", path.display()))
        };
        let period: u64 = 100_000;
        let quota = ((caps.cpu_cores * period as f64) as u64).max(1000);
        match self {
            Cgroups::Unavailable(why) => Err(why.clone()),
            Cgroups::V2 { base } => {
                let dir = base.join(name);
                std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
                let placement = Placement {
                    dirs: vec![dir.clone()],
                };
                write(dir.join("memory.max"), caps.memory_bytes.to_string())?;
                let _ = write(dir.join("memory.swap.max"), "0".into());
                let _ = write(dir.join("cpu.max"), format!("{quota} {period}"));
                write(dir.join("cgroup.procs"), pid.to_string())?;
                Ok(placement)
            }
            Cgroups::V1 { memory, cpu } => {
                let mem = memory.join(name);
                std::fs::create_dir_all(&mem).map_err(|e| format!("{}: {e}", mem.display()))?;
                let mut placement = Placement {
                    dirs: vec![mem.clone()],
                };
                write(
                    mem.join("memory.limit_in_bytes"),
                    caps.memory_bytes.to_string(),
                )?;
                write(mem.join("cgroup.procs"), pid.to_string())?;
                if let Some(cpu) = cpu {
                    let c = cpu.join(name);
                    if std::fs::create_dir_all(&c).is_ok() {
                        placement.dirs.push(c.clone());
                        let _ = write(c.join("cpu.cfs_period_us"), period.to_string());
                        let _ = write(c.join("cpu.cfs_quota_us"), quota.to_string());
                        let _ = write(c.join("cgroup.procs"), pid.to_string());
                    }
                }
                Ok(placement)
            }
        }
    }
}
