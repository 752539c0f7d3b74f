//! The launcher boundary: how a kernel child is started and isolated.
//!
//! A [`Launcher`] starts one child for a kernel with its host mounts (workspace, home, the
//! package site folder and socket) and its connection file, waits for its ready signal, and
//! hands back a [`Child`]: its pid, a way to kill it, and the moment it exits. Everything after
//! that is common to every launcher and lives in [`crate::client`]: the ZeroMQ channels, the
//! reply/idle ordering, the heartbeat, the exit handling.
//!
//! - [`process`]: a direct `sandgate-kernel` child process (the only launcher today).
//! - `fake` (tests only): a scripted in-process kernel over real ZeroMQ sockets, for the
//!   session layer's tests.
//!
//! `kernels.launcher` in the configuration picks one ([`LauncherKind`]).

pub mod process;

#[cfg(test)]
pub mod fake;

use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::time::Duration;

use tokio::sync::watch;

use crate::client::ClientError;

/// A boxed, sendable future (the trait's methods return these so it stays object-safe).
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// The launchers a configuration may name (`kernels.launcher`). An unknown name is a
/// configuration error that lists these.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LauncherKind {
    /// A direct child process ([`process::ProcessLauncher`]).
    #[default]
    Process,
}

impl LauncherKind {
    /// Its name in the configuration.
    pub fn as_str(self) -> &'static str {
        match self {
            LauncherKind::Process => "process",
        }
    }
}

/// The package service's mount for one kernel (see [`crate::packages::PackageLink`]).
#[derive(Debug, Clone)]
pub struct PackageMount {
    /// The workspace's site folder (read-only in the guest).
    pub site: PathBuf,
    /// The Unix socket `%pip` reaches the gateway through.
    pub socket: PathBuf,
}

/// The host folders and sockets one kernel child is given.
#[derive(Debug, Clone, Copy)]
pub struct HostMounts<'a> {
    /// The live workspace folder (`/workspace` in the guest).
    pub workspace: &'a Path,
    /// Its home folder (`/home/user` in the guest).
    pub home: &'a Path,
    /// The package site folder and socket, if the gateway serves packages.
    pub packages: Option<&'a PackageMount>,
}

/// What a launcher is asked to start.
#[derive(Debug, Clone, Copy)]
pub struct LaunchRequest<'a> {
    /// The kernel the child is for (for logs).
    pub kernel: uuid::Uuid,
    /// The connection file (key and endpoints; mode 0600), already written.
    pub connection_file: &'a Path,
    /// Its mounts.
    pub mounts: HostMounts<'a>,
    /// How long the child may take to say it is ready.
    pub startup_timeout: Duration,
}

/// A started child that said it is ready.
pub struct Launched {
    /// Its process id, if it has one of its own.
    pub pid: Option<u32>,
    /// The handle that kills it and learns its end.
    pub child: Box<dyn Child>,
}

/// A running kernel child.
pub trait Child: Send + 'static {
    /// Runs until the child has exited, killing it first once `kill` becomes true, and
    /// releasing what the launcher holds for it (its cgroup, …). Yields its end in words.
    fn wait(self: Box<Self>, kill: watch::Receiver<bool>) -> BoxFuture<'static, String>;
}

/// Starts kernel children.
pub trait Launcher: std::fmt::Debug + Send + Sync + 'static {
    /// Its name in the configuration.
    fn name(&self) -> &'static str;

    /// Starts a child for `request` and waits (up to its start-up timeout) for its ready
    /// signal. A child that ends first is [`ClientError::EarlyExit`] with what it printed; one
    /// that is not ready in time is killed and [`ClientError::StartTimeout`].
    fn launch<'a>(
        &'a self,
        request: LaunchRequest<'a>,
    ) -> BoxFuture<'a, Result<Launched, ClientError>>;
}
