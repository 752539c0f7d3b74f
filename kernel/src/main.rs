//! `sandgate-kernel`: reads the command line and environment, then runs the kernel or one of
//! its set-up commands.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand};
use sandgate_kernel::image::{self, Fetch};
use sandgate_kernel::sandbox::{Limits, PackagesConfig, SandboxConfig};
use sandgate_kernel::{kernelspec, server, workspace};

/// A Jupyter kernel whose Python runs in a wasmtime sandbox: no network, no host files but
/// /workspace, capped memory, time and output.
///
/// Jupyter starts it as `sandgate-kernel -f CONNECTION_FILE` (see `install`).
#[derive(Parser, Debug)]
#[command(version, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,

    /// The connection file Jupyter wrote (ports, transport, signing key).
    #[arg(short = 'f', long = "connection-file")]
    connection_file: Option<PathBuf>,

    #[command(flatten)]
    run: RunArgs,
}

#[derive(Args, Debug, Clone)]
struct RunArgs {
    /// Sandgate's data folder (image, compiled-module cache).
    /// Default: $SANDGATE_HOME, else $XDG_DATA_HOME/sandgate, else ~/.local/share/sandgate.
    #[arg(long, global = true)]
    home: Option<PathBuf>,

    /// Host folder the guest sees, writable, at /workspace. Default: the folder the kernel is
    /// started in (Jupyter starts it in the notebook's folder), unless that is `/`, a folder
    /// holding your home or the temporary folder, or a system folder (then the kernel refuses
    /// to start and says why).
    #[arg(long, env = "SANDGATE_WORKSPACE")]
    workspace: Option<PathBuf>,

    /// Host folder the guest sees, writable, at /home/user, which becomes its $HOME (without
    /// it, $HOME is a folder of the private root that ends with the kernel). Counted in the disk
    /// limits like /tmp and /workspace. The launcher owns it: the kernel never removes it (the
    /// gateway gives each E2B sandbox one, shared by its contexts).
    #[arg(long)]
    home_dir: Option<PathBuf>,

    /// Host folder of the workspace's installed packages, which the guest sees read-only at
    /// /usr/local/lib/python3.15/site-packages (the gateway writes it; with --packages-socket).
    #[arg(long, requires = "packages_socket")]
    packages_dir: Option<PathBuf>,

    /// The gateway's socket through which `%pip` asks it for packages (the kernel and its
    /// sandbox have no network); without it, `%pip install` says it needs the gateway.
    #[arg(long, requires = "packages_dir")]
    packages_socket: Option<PathBuf>,

    /// The guest's memory cap, in MiB (past it: MemoryError).
    #[arg(long, default_value_t = 2048)]
    memory_mb: u64,

    /// Wall-clock seconds one cell may run; 0 for no limit.
    #[arg(long, default_value_t = 600)]
    cell_timeout_s: u64,

    /// Bytes of output one cell may publish (past it, output is dropped with a notice).
    #[arg(long, default_value_t = 8 << 20)]
    output_bytes: u64,

    /// Files the guest may hold open at once.
    #[arg(long, default_value_t = 256)]
    open_files: u32,

    /// MiB the guest may keep in its writable folders (/tmp, home, /workspace).
    #[arg(long, default_value_t = 2048)]
    disk_mb: u64,

    /// Files and folders the guest may keep there.
    #[arg(long, default_value_t = 20_000)]
    disk_files: u64,

    /// Fail with a clear error instead of fetching a missing image.
    #[arg(long, global = true)]
    no_fetch: bool,

    /// Do not apply the process-level hardening (rlimits, no_new_privs, own network namespace,
    /// seccomp). For debugging only: the wasm sandbox still applies.
    #[arg(long)]
    no_harden: bool,

    /// Print `ready` on stdout once the kernel serves requests (for launchers such as the
    /// gateway, which wait on that line instead of polling).
    #[arg(long)]
    notify_ready: bool,
}

impl RunArgs {
    fn limits(&self) -> Limits {
        Limits {
            memory_bytes: self.memory_mb << 20,
            cell_timeout: (self.cell_timeout_s > 0)
                .then(|| Duration::from_secs(self.cell_timeout_s)),
            output_bytes: self.output_bytes,
            open_files: self.open_files,
            disk_bytes: self.disk_mb << 20,
            disk_files: self.disk_files,
            ..Limits::default()
        }
    }
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Fetch, verify and compile the sandbox image, then install the `sandgate-python`
    /// kernelspec so Jupyter (console, lab, nbclient) can start this kernel.
    Install {
        /// Install into PREFIX/share/jupyter/kernels (e.g. a virtualenv's prefix) instead of
        /// the user's Jupyter data folder.
        #[arg(long)]
        prefix: Option<PathBuf>,
        /// Do not fetch and compile the image now (the first kernel start will).
        #[arg(long)]
        no_prepare: bool,
        /// The kernelspec's name: `sandgate-python`, or `python3` to run notebooks whose
        /// metadata names `python3` (written for ipykernel) in this sandbox. A `python3`
        /// kernelspec in the same or an earlier Jupyter data folder takes the place of
        /// ipykernel's there (`jupyter kernelspec remove python3` undoes it).
        #[arg(long, default_value = kernelspec::NAME,
              value_parser = [kernelspec::NAME, kernelspec::PYTHON3])]
        name: String,
    },
    /// Fetch, verify and compile the sandbox image (idempotent).
    Prepare,
    /// Internal: compile the image and probe its interrupt flags (run in its own process).
    #[command(hide = true)]
    CompileImage,
    /// Print where the image and cache live.
    Where,
}

fn sandgate_home(cli: Option<&Path>) -> Result<PathBuf> {
    if let Some(home) = cli {
        return Ok(home.to_owned());
    }
    if let Some(home) = std::env::var_os("SANDGATE_HOME").filter(|h| !h.is_empty()) {
        return Ok(home.into());
    }
    if let Some(xdg) = std::env::var_os("XDG_DATA_HOME").filter(|h| !h.is_empty()) {
        return Ok(PathBuf::from(xdg).join("sandgate"));
    }
    let home = std::env::var_os("HOME").context("neither SANDGATE_HOME nor HOME is set")?;
    Ok(PathBuf::from(home).join(".local/share/sandgate"))
}

fn jupyter_kernels_dir(prefix: Option<&Path>) -> Result<PathBuf> {
    if let Some(prefix) = prefix {
        return Ok(prefix.join("share/jupyter/kernels"));
    }
    if let Some(dir) = std::env::var_os("JUPYTER_DATA_DIR").filter(|d| !d.is_empty()) {
        return Ok(PathBuf::from(dir).join("kernels"));
    }
    let home = std::env::var_os("HOME").context("HOME is not set")?;
    Ok(PathBuf::from(home).join(".local/share/jupyter/kernels"))
}

/// Resolves when this process's parent ends (the launcher died and we were re-parented).
/// `pidfd` is a pidfd of `parent` opened at start: waiting on it wakes nobody until the parent
/// exits. Without one (a kernel older than Linux 5.3, or a container that refuses the call)
/// the parent is polled every second instead.
async fn watch_parent(parent: u32, pidfd: Option<std::os::fd::OwnedFd>) {
    if let Some(pidfd) = pidfd {
        // The parent may have ended before the pidfd was opened: we were then re-parented.
        if std::os::unix::process::parent_id() != parent {
            return;
        }
        // SAFETY: `pidfd` is an `OwnedFd`, moved into the `AsyncFd`: it stays open, and its
        // `as_raw_fd` names the same descriptor, until the `AsyncFd` is dropped.
        #[allow(unsafe_code)]
        let registered = unsafe {
            tokio::io::unix::AsyncFd::register_with_interest(pidfd, tokio::io::Interest::READABLE)
        };
        match registered {
            // A pidfd is readable once its process has exited.
            Ok(pidfd) => match pidfd.readable().await {
                Ok(_) => return,
                Err(e) => tracing::debug!(error = %e, "cannot wait on the parent's pidfd; polling"),
            },
            Err(e) => tracing::debug!(error = %e, "cannot wait on the parent's pidfd; polling"),
        }
    }
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tick.tick().await;
        if std::os::unix::process::parent_id() != parent {
            return;
        }
    }
}

/// A pidfd of process `pid`, if the system gives one.
fn open_pidfd(pid: u32) -> Option<std::os::fd::OwnedFd> {
    let pid = rustix::process::Pid::from_raw(i32::try_from(pid).ok()?)?;
    rustix::process::pidfd_open(pid, rustix::process::PidfdFlags::empty()).ok()
}

/// A folder the launcher gives (`--home-dir`, `--packages-dir`), checked: an existing folder
/// (made by the launcher, which owns it).
fn launcher_folder(dir: &Path, what: &str) -> Result<PathBuf> {
    let dir = dir
        .canonicalize()
        .with_context(|| format!("the {what} {} cannot be opened", dir.display()))?;
    if !dir.is_dir() {
        bail!("the {what} {} is not a folder", dir.display());
    }
    Ok(dir)
}

fn progress(message: &str) {
    eprintln!("sandgate-kernel: {message}");
}

/// Whether `arg` is an IPython (traitlets) option, `--Class.trait=value`. Jupyter's clients add
/// such options to the command line of any kernel named `python3`, taking it for ipykernel
/// (nbclient and papermill add `--HistoryManager.hist_file=:memory:`); ipykernel accepts them, and
/// so must a kernel installed under that name.
fn is_ipython_option(arg: &std::ffi::OsStr) -> bool {
    let Some(option) = arg.to_str().and_then(|a| a.strip_prefix("--")) else {
        return false;
    };
    let Some((name, _value)) = option.split_once('=') else {
        return false;
    };
    let Some((class, trait_name)) = name.split_once('.') else {
        return false;
    };
    let is_ident = |s: &str| {
        s.chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
            && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
    };
    class.starts_with(|c: char| c.is_ascii_uppercase()) && is_ident(class) && is_ident(trait_name)
}

fn main() -> Result<()> {
    use std::io::IsTerminal;
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("SANDGATE_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .init();
    let (args, ipython_options): (Vec<_>, Vec<_>) =
        std::env::args_os().partition(|a| !is_ipython_option(a));
    if !ipython_options.is_empty() {
        tracing::info!(
            ?ipython_options,
            "IPython's options have no meaning here; ignored"
        );
    }
    let cli = Cli::parse_from(args);
    let home = sandgate_home(cli.run.home.as_deref())?;
    let limits = cli.run.limits();
    let fetch = if cli.run.no_fetch {
        Fetch::Never
    } else {
        Fetch::IfMissing
    };
    match cli.command {
        Some(Command::CompileImage) => {
            image::compile_image(&home, &limits)?;
            Ok(())
        }
        Some(Command::Prepare) => {
            image::end_with_starter();
            let image = image::prepare(&home, &limits, fetch, &progress)?;
            println!("{}", image.dir.display());
            Ok(())
        }
        Some(Command::Where) => {
            println!("home:  {}", home.display());
            println!(
                "image: {}",
                image::image_dir(&home, &image::Pins::builtin()).display()
            );
            println!("cache: {}", home.join("cache").display());
            Ok(())
        }
        Some(Command::Install {
            prefix,
            no_prepare,
            name,
        }) => {
            if !no_prepare {
                image::prepare(&home, &limits, fetch, &progress)?;
            }
            let exe = std::env::current_exe()?.canonicalize()?;
            let mut extra = Vec::new();
            if let Some(h) = &cli.run.home {
                extra.extend(["--home".to_owned(), h.canonicalize()?.display().to_string()]);
            }
            let kernels_dir = jupyter_kernels_dir(prefix.as_deref())?;
            let dir = kernelspec::install(&kernels_dir, &name, &exe, &extra)?;
            println!("installed kernelspec {name} in {}", dir.display());
            Ok(())
        }
        None => {
            let Some(file) = cli.connection_file else {
                bail!(
                    "no connection file: Jupyter starts this kernel as `sandgate-kernel -f FILE`; \
                       run `sandgate-kernel install` to register it, or see --help"
                );
            };
            let text = std::fs::read_to_string(&file)
                .with_context(|| format!("cannot read the connection file {}", file.display()))?;
            let connection: jupyter_protocol::ConnectionInfo = serde_json::from_str(&text)
                .with_context(|| format!("{} is not a valid connection file", file.display()))?;
            // Before the image: a refused folder is said at once, not after a first compile.
            let cwd = std::env::current_dir()
                .context("cannot read the working directory (the default workspace)")?;
            let workspace = workspace::choose(
                cli.run.workspace.as_deref(),
                &cwd,
                &workspace::Protected::from_env(&home),
            )?;
            let home_dir = match &cli.run.home_dir {
                Some(dir) => Some(launcher_folder(dir, "home folder")?),
                None => None,
            };
            let image = image::prepare(&home, &limits, fetch, &progress)?;
            let config = server::KernelConfig {
                connection,
                sandbox: SandboxConfig {
                    image,
                    workspace,
                    home: home_dir,
                    packages: match (&cli.run.packages_dir, &cli.run.packages_socket) {
                        (Some(site), Some(socket)) => Some(PackagesConfig {
                            site: launcher_folder(site, "packages folder")?,
                            socket: socket.clone(),
                        }),
                        _ => None,
                    },
                    limits,
                },
            };
            // Like ipykernel: a kernel whose launcher died exits instead of lingering.
            let parent = std::os::unix::process::parent_id();
            // Opened before the seccomp filter, which does not allow `pidfd_open`.
            let parent_fd = open_pidfd(parent);
            // The second wall, while the process still has one thread (see `harden`).
            if !cli.run.no_harden {
                use jupyter_protocol::connection_info::Transport;
                let network = match config.connection.transport {
                    Transport::IPC => sandgate_kernel::harden::Network::UnixOnly,
                    Transport::TCP => sandgate_kernel::harden::Network::Tcp,
                };
                sandgate_kernel::harden::apply(network);
            }
            // One thread carries all the kernel's sockets and tasks and, between them, the
            // guest's turns: on one thread handing a message on wakes no other thread (see
            // `sandbox::seat`).
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let (lender, seat) = sandgate_kernel::sandbox::seat::Seat::new();
            let served = seat.run(runtime, async move {
                let terminate = async {
                    #[cfg(unix)]
                    {
                        let mut term = tokio::signal::unix::signal(
                            tokio::signal::unix::SignalKind::terminate(),
                        )
                        .expect("SIGTERM handler installs");
                        term.recv().await;
                    }
                    #[cfg(not(unix))]
                    std::future::pending::<()>().await;
                };
                let orphaned = watch_parent(parent, parent_fd);
                let notify = cli.run.notify_ready;
                let ready = move || {
                    if notify {
                        use std::io::Write;
                        let mut out = std::io::stdout().lock();
                        let _ = writeln!(out, "ready");
                        let _ = out.flush();
                    }
                };
                tokio::select! {
                    r = server::run(config, terminate, ready, lender) => r,
                    () = orphaned => {
                        tracing::warn!("the process that started this kernel is gone; exiting");
                        Ok(())
                    }
                }
            });
            // The process ends without waiting for the tasks (or a cell still running), so no
            // destructor runs: the guest's private root is removed here.
            sandgate_kernel::sandbox::remove_private_roots();
            served?.map_err(|e| anyhow::anyhow!("the kernel's server failed: {e}"))??;
            std::process::exit(0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::is_ipython_option;

    #[test]
    fn ipython_options_are_told_from_ours() {
        for yes in [
            "--HistoryManager.hist_file=:memory:",
            "--IPKernelApp.log_level=10",
            "--InteractiveShell.colors=",
        ] {
            assert!(is_ipython_option(yes.as_ref()), "{yes}");
        }
        for no in [
            "--workspace=/x",
            "--memory-mb=10",
            "--HistoryManager.hist_file",
            "-f",
            "--.x=1",
            "--lower.case=1",
            "conn.json",
        ] {
            assert!(!is_ipython_option(no.as_ref()), "{no}");
        }
    }
}
