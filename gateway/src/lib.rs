//! `sandgate`: a Jupyter-compatible kernel gateway whose kernels run in sandboxes.
//!
//! # Layout
//!
//! Requests flow one way: [`http`] → [`session`] → [`client`] → the kernel's wire format
//! (`sandgate-wire`). The gateway never links wasmtime; each kernel is a `sandgate-kernel`
//! process with its own sandbox.
//!
//! - [`config`]: the typed configuration and its documented defaults.
//! - [`auth`]: the access token (stored as a hash), `Host` and `Origin` rules.
//! - [`http`]: Jupyter Server's REST API and the kernel WebSocket (routes, errors, framings).
//! - [`session`]: kernel lifecycle: warm pool, restart, automatic restart, culling, limits,
//!   and the routing of kernel messages to WebSocket clients.
//! - [`client`]: launching one kernel process and its ZeroMQ channels.
//! - [`kernelspec`]: the kernelspec served to clients and its logos.
//!
//! The binary (`main.rs`) reads the command line, environment and config file, builds a
//! [`config::Config`] and calls [`run`].

pub mod auth;
pub mod client;
pub mod config;
pub mod http;
pub mod kernelspec;
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
    let workspace = private_dir(rt.data_dir.join("workspace"))?;
    let s = &config.sandbox;
    let args: Vec<std::ffi::OsString> = vec![
        "--home".into(),
        rt.data_dir.clone().into(),
        "--workspace".into(),
        workspace.into(),
        "--no-fetch".into(),
        format!("--memory-mb={}", s.memory_mb).into(),
        format!("--cell-timeout-s={}", s.cell_timeout_s).into(),
        format!("--output-bytes={}", s.output_bytes).into(),
        format!("--open-files={}", s.open_files).into(),
    ];
    let env = std::env::var_os("SANDGATE_LOG")
        .map(|v| vec![("SANDGATE_LOG".into(), v)])
        .unwrap_or_default();
    let k = &config.kernels;
    Ok(client::LaunchSpec {
        binary: rt.kernel_binary.clone(),
        args,
        runtime_dir,
        startup_timeout: Duration::from_secs(k.startup_timeout_s),
        heartbeat_interval: Duration::from_secs(k.heartbeat_interval_s),
        heartbeat_misses: k.heartbeat_misses,
        env,
    })
}

/// Serves the gateway on `listener` until `shutdown` resolves, then closes every WebSocket and
/// shuts every kernel down.
pub async fn run(
    listener: TcpListener,
    config: config::Config,
    rt: Runtime,
    shutdown: impl Future<Output = ()>,
) -> Result<(), GatewayError> {
    let launch = launch_spec(&config, &rt)?;
    let kernels = session::Kernels::new(config.lifecycle(), launch);
    kernels.spawn_background();
    let (closing_tx, closing_rx) = tokio::sync::watch::channel(false);
    let loopback = listener
        .local_addr()
        .map(|a| a.ip().is_loopback())
        .unwrap_or(true);
    let app = Arc::new(http::App {
        auth: auth::Auth::new(rt.token_hash),
        kernels: kernels.clone(),
        sessions: http::sessions::Sessions::default(),
        started: chrono::Utc::now(),
        loopback,
        closing: closing_rx,
        config,
    });
    http::serve(listener, app, closing_tx, shutdown).await;
    tracing::info!("shutting down every kernel");
    kernels.shutdown_all().await;
    Ok(())
}
