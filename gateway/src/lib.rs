//! `sandgate`: a Jupyter-compatible kernel gateway whose kernels run in sandboxes.
//!
//! # Layout
//!
//! Requests flow one way: [`http`] → [`session`] → [`client`] → [`launch`]; [`client`] speaks
//! the kernel's wire format (`sandgate-wire`). The gateway never links wasmtime; each kernel is a `sandgate-kernel`
//! process with its own sandbox.
//!
//! - [`config`]: the typed configuration and its documented defaults.
//! - [`auth`]: the access token (stored as a hash), `Host` and `Origin` rules.
//! - [`http`]: Jupyter Server's REST API and the kernel WebSocket (routes, errors, framings),
//!   the Contents API.
//! - [`session`]: kernel lifecycle: warm pool, restart, automatic restart, culling, limits,
//!   and the routing of kernel messages to WebSocket clients.
//! - [`client`]: one kernel process: its launch, ZeroMQ channels, reply order, heartbeat.
//! - [`launch`]: the launcher boundary: how a kernel child is started and isolated
//!   (`kernels.launcher`; today a direct child process).
//! - [`home`]: kernels' home folders (`/home/user` in the guest), removed with their holder.
//! - [`packages`]: `%pip install` for the sandboxes: the index, wheels checked and unpacked,
//!   the host cache, each workspace's site folder and lock file, the kernels' socket.
//! - [`envelope`]: a kernel message's ids, types and parent, parsed once when it arrives and
//!   carried beside its frames through the relay.
//! - [`workspace`]: the encrypted workspace: keys, store, the kernels' live folder, history.
//! - [`exec`]: the execution service: run code on a kernel, get typed events back (used by
//!   `%%ask`, the E2B-compatible API and MCP).
//! - [`e2b`]: an E2B-compatible API (control plane, code interpreter, envd) on the same
//!   listener, so E2B's SDKs run unchanged against Sandgate.
//! - [`mcp`]: an MCP server at `/mcp` (Streamable HTTP) and `sandgate mcp` (stdio), whose tools
//!   run code in the E2B API's sandboxes and reach the encrypted workspace.
//! - [`ask`]: the `%%ask` magic: model providers, prompts with context, usage and budget.
//! - [`kernelspec`]: the kernelspec served to clients and its logos.
//! - [`cgroup`]: a cgroup of its own for each kernel process (memory and CPU), where allowed.
//! - [`memory`]: handing the memory of ended kernels back to the system.
//!
//! The binary (`main.rs`) reads the command line, environment and config file, builds a
//! [`config::Config`] and calls [`run`].

pub mod ask;
pub mod auth;
pub mod cgroup;
pub mod client;
pub mod config;
pub mod e2b;
pub mod envelope;
pub mod exec;
pub mod home;
pub mod http;
pub mod kernelspec;
pub mod launch;
pub mod mcp;
pub mod memory;
pub mod packages;
pub mod session;
pub mod workspace;

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;

/// Resolves once a `watch<bool>` is true (or its sender is gone).
pub(crate) async fn until_true(rx: &mut tokio::sync::watch::Receiver<bool>) {
    let _ = rx.wait_for(|v| *v).await;
}

/// Everything [`run`] needs besides the configuration.
pub struct Runtime {
    /// SHA-256 of the access token; `None` only when authentication is off.
    pub token_hash: Option<[u8; 32]>,
    /// The `sandgate-kernel` binary.
    pub kernel_binary: PathBuf,
    /// The data folder (resolved).
    pub data_dir: PathBuf,
    /// What opens the workspace key at start; `None` means the access token opens it when the
    /// first request carries it.
    pub key_source: Option<workspace::keys::MasterSource>,
    /// Model providers' API keys read from the environment, by provider name.
    pub provider_keys: std::collections::HashMap<String, String>,
    /// More users: (SHA-256 of their token, name), from `auth.users`.
    pub users: Vec<([u8; 32], String)>,
}

/// E2B's debug ports on loopback, served until the main listener closes. A port that cannot be
/// bound is logged and skipped.
async fn serve_e2b_debug_ports(app: &Arc<http::App>) -> Vec<tokio::task::JoinHandle<()>> {
    let mut servers = Vec::new();
    for port in [49983u16, 49999] {
        let listener = match TcpListener::bind(("127.0.0.1", port)).await {
            Ok(l) => l,
            Err(e) => {
                tracing::error!(port, error = %e, "cannot serve an E2B debug port");
                continue;
            }
        };
        tracing::info!(
            port,
            "serving an E2B debug port on 127.0.0.1 (one implicit sandbox, no tokens)"
        );
        let app = app.clone();
        servers.push(tokio::spawn(async move {
            let mut closing = app.closing.clone();
            let (own_closing, _) = tokio::sync::watch::channel(false);
            http::serve_surface(
                listener,
                app,
                http::Surface::E2bDebug,
                own_closing,
                async move { until_true(&mut closing).await },
            )
            .await;
        }));
    }
    servers
}

/// Errors that stop the gateway.
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    /// A folder could not be made.
    #[error("cannot create {path}: {source}")]
    Folder {
        /// The folder.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The workspace could not be set up.
    #[error(transparent)]
    Workspace(#[from] workspace::WorkspaceError),
    /// The package service could not be set up (its index or cache).
    #[error("packages: {0}")]
    Packages(#[from] packages::PackagesError),
    /// The live folder is on disk.
    #[error(
        "the live workspace folder {0} is not memory-backed, so plaintext would reach the disk; \
         set workspace.live_dir to a tmpfs folder, or workspace.allow_disk_live_dir = true"
    )]
    LiveOnDisk(PathBuf),
}

fn private_dir(path: PathBuf) -> Result<PathBuf, GatewayError> {
    let err = |source| GatewayError::Folder {
        path: path.clone(),
        source,
    };
    std::fs::create_dir_all(&path).map_err(err)?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o700)).map_err(err)?;
    }
    Ok(path)
}

/// The launch settings for kernel processes under this configuration.
pub fn launch_spec(
    config: &config::Config,
    rt: &Runtime,
) -> Result<client::LaunchSpec, GatewayError> {
    let runtime_dir = private_dir(rt.data_dir.join("runtime"))?;
    let homes_dir = rt.data_dir.join("homes");
    let homes = home::Homes::open(&homes_dir).map_err(|source| GatewayError::Folder {
        path: homes_dir.clone(),
        source,
    })?;
    let s = &config.sandbox;
    let args: Vec<std::ffi::OsString> = vec![
        "--home".into(),
        rt.data_dir.clone().into(),
        "--no-fetch".into(),
        format!("--memory-mb={}", s.memory_mb).into(),
        format!("--cell-timeout-s={}", s.cell_timeout_s).into(),
        format!("--output-bytes={}", s.output_bytes).into(),
        format!("--open-files={}", s.open_files).into(),
        format!("--disk-mb={}", s.disk_mb).into(),
        format!("--disk-files={}", s.disk_files).into(),
    ];
    let env = std::env::var_os("SANDGATE_LOG")
        .map(|v| vec![("SANDGATE_LOG".into(), v)])
        .unwrap_or_default();
    let k = &config.kernels;
    let cgroups = cgroup::Cgroups::detect();
    match &cgroups {
        cgroup::Cgroups::Unavailable(why) => tracing::warn!(
            %why,
            "kernels run without cgroups of their own (no memory or CPU cap on the whole process; \
             the sandbox still caps the guest)"
        ),
        other => tracing::info!(cgroups = ?other, "each kernel gets a cgroup of its own"),
    }
    let launcher: Arc<dyn launch::Launcher> = match k.launcher {
        launch::LauncherKind::Process => Arc::new(launch::process::ProcessLauncher {
            binary: rt.kernel_binary.clone(),
            args,
            env,
            cgroups: Arc::new(cgroups),
            caps: cgroup::Caps {
                memory_bytes: (s.memory_mb + s.process_overhead_mb) << 20,
                cpu_cores: s.cpu_cores,
            },
        }),
    };
    Ok(client::LaunchSpec {
        launcher,
        runtime_dir,
        homes: Arc::new(homes),
        startup_timeout: Duration::from_secs(k.startup_timeout_s),
        heartbeat_interval: Duration::from_secs(k.heartbeat_interval_s),
        heartbeat_misses: k.heartbeat_misses,
        transport: k.transport,
        packages: None,
    })
}

/// The workspaces of this configuration: stores under `DATA_DIR/workspaces`, keys in
/// `DATA_DIR/keys.json`, live folders in a memory-backed folder named after the data folder
/// (so a restart finds what a crash left there, and saves it).
pub fn open_workspaces(
    config: &config::Config,
    data_dir: &std::path::Path,
) -> Result<workspace::Workspaces, GatewayError> {
    let w = &config.workspace;
    if !w.allow_disk_live_dir && !workspace::is_memory_backed(&w.live_dir) {
        return Err(GatewayError::LiveOnDisk(w.live_dir.clone()));
    }
    let tag = ring::digest::digest(
        &ring::digest::SHA256,
        data_dir.as_os_str().as_encoded_bytes(),
    );
    let live_root = w
        .live_dir
        .join(format!("sandgate-{}", hex::encode(&tag.as_ref()[..8])));
    Ok(workspace::Workspaces::new(workspace::WorkspaceConfig {
        root: data_dir.join("workspaces"),
        keys: data_dir.join("keys.json"),
        live_root,
        quota: workspace::store::Quota {
            max_bytes: w.max_bytes,
            max_files: w.max_files,
        },
        sync_interval: Duration::from_secs(w.sync_interval_s),
    })?)
}

/// A gateway whose workspaces are open (and unlocked, if a key source was given) and whose
/// kernel pool is filling; [`Gateway::serve`] puts it on a listener.
pub struct Gateway {
    config: config::Config,
    rt: Runtime,
    workspaces: Arc<workspace::Workspaces>,
    kernels: session::Kernels,
    observer: Arc<workspace::history::HistoryObserver>,
    asker: Arc<ask::Asker>,
}

impl Gateway {
    /// Opens the workspaces and starts the kernel pool. Errors here (a wrong key, a live folder
    /// on disk) stop the gateway before it listens. Damage on disk does not: a damaged key file
    /// or workspace index is logged with the way out, the workspaces it holds answer with that
    /// error, and everything else is served.
    pub async fn start(config: config::Config, rt: Runtime) -> Result<Gateway, GatewayError> {
        let workspaces = Arc::new(open_workspaces(&config, &rt.data_dir)?);
        if let Some(source) = rt.key_source.clone() {
            match workspaces.unlock(source).await {
                Ok(()) => match workspaces.space(auth::DEFAULT_USER).await {
                    Ok(_) | Err(workspace::WorkspaceError::IndexDamaged { .. }) => {}
                    Err(e) => return Err(e.into()),
                },
                Err(workspace::WorkspaceError::Key(workspace::keys::KeyError::Damaged {
                    ..
                })) => {}
                Err(e) => return Err(e.into()),
            }
        }
        let mut launch = launch_spec(&config, &rt)?;
        if config.packages.enabled {
            let service =
                packages::Packages::new(config.packages.clone(), &rt.data_dir, workspaces.clone())?;
            launch.packages = Some(Arc::new(service));
        }
        let live = workspaces.clone();
        let live_dir: session::LiveDir = Arc::new(move |user: &str| {
            let dir = live.live_dir(user);
            if let Err(e) = std::fs::create_dir_all(&dir) {
                tracing::error!(error = %e, "cannot make a live workspace folder");
            }
            dir
        });
        let observer = Arc::new(workspace::history::HistoryObserver::new(workspaces.clone()));
        let asker = Arc::new(ask::Asker::new(
            config.ask.clone(),
            rt.provider_keys.clone(),
            rt.data_dir.join("ask-usage.json"),
            workspaces.clone(),
            observer.clone(),
            (config.sandbox.cell_timeout_s > 0)
                .then(|| Duration::from_secs(config.sandbox.cell_timeout_s)),
        ));
        let kernels = session::Kernels::new(
            config.lifecycle(),
            launch,
            live_dir,
            observer.clone(),
            Some(asker.clone() as Arc<dyn session::ShellHook>),
        );
        kernels.spawn_background();
        Ok(Gateway {
            config,
            rt,
            workspaces,
            kernels,
            observer,
            asker,
        })
    }

    /// Serves on `listener` until `shutdown` resolves, then closes every WebSocket, shuts every
    /// kernel down, saves the workspaces and removes their plaintext live folders.
    pub async fn serve(self, listener: TcpListener, shutdown: impl Future<Output = ()>) {
        let Gateway {
            config,
            rt,
            workspaces,
            kernels,
            observer,
            asker,
        } = self;
        let syncer = {
            let workspaces = workspaces.clone();
            let every = Duration::from_secs(config.workspace.sync_interval_s);
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(every);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    tick.tick().await;
                    workspaces.sync_all().await;
                }
            })
        };
        let (closing_tx, closing_rx) = tokio::sync::watch::channel(false);
        let loopback = listener
            .local_addr()
            .map(|a| a.ip().is_loopback())
            .unwrap_or(true);
        let sandboxes = e2b::sandboxes::Sandboxes::new(kernels.clone());
        let app = Arc::new(http::App {
            auth: if rt.users.is_empty() {
                auth::Auth::new(rt.token_hash)
            } else {
                let mut users: Vec<([u8; 32], String)> = rt.users.clone();
                if let Some(h) = rt.token_hash {
                    users.push((h, auth::DEFAULT_USER.to_owned()));
                }
                auth::Auth::with_users(users)
            },
            kernels: kernels.clone(),
            workspaces: workspaces.clone(),
            asker,
            sessions: http::sessions::Sessions::default(),
            e2b: sandboxes.clone(),
            mcp: mcp::Sessions::default(),
            started: chrono::Utc::now(),
            loopback,
            closing: closing_rx,
            in_flight: Arc::new(tokio::sync::Semaphore::new(http::MAX_IN_FLIGHT)),
            config,
        });
        let debug_servers = if app.config.e2b.debug_ports {
            serve_e2b_debug_ports(&app).await
        } else {
            Vec::new()
        };
        http::serve(listener, app, closing_tx, shutdown).await;
        for server in debug_servers {
            let _ = server.await;
        }
        tracing::info!("shutting down every kernel");
        kernels.shutdown_all().await;
        // The sandboxes' home folders go with them.
        sandboxes.forget_all();
        syncer.abort();
        observer.flush().await;
        workspaces.close().await;
        cgroup::Cgroups::detect().sweep();
        // Connection files and sockets of kernels that did not get to clean up after themselves.
        if let Ok(entries) = std::fs::read_dir(rt.data_dir.join("runtime")) {
            for entry in entries.flatten() {
                let _ = std::fs::remove_file(entry.path());
            }
        }
    }
}
