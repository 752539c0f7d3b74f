//! The direct launcher: each kernel is a `sandgate-kernel` child process of the gateway, in a
//! cgroup of its own where the host allows one, with an empty environment (nothing of the
//! gateway's, model keys or tokens, reaches it).
//!
//! Its stderr goes to the gateway's log, and its last lines explain a failed start; it says
//! `ready` on stdout (`--notify-ready`) once it serves requests.

use std::ffi::OsString;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};
use tokio::process::ChildStdout;
use tokio::sync::watch;

use super::{BoxFuture, Child, LaunchRequest, Launched, Launcher};
use crate::client::ClientError;

/// Lines of stderr kept to explain a failed start.
const TAIL_LINES: usize = 20;

/// How long a child that ended is given to flush its last stderr lines into the tail.
const TAIL_FLUSH: Duration = Duration::from_secs(1);

/// Starts `sandgate-kernel` as a direct child process.
#[derive(Debug)]
pub struct ProcessLauncher {
    /// The `sandgate-kernel` binary.
    pub binary: PathBuf,
    /// Arguments before the per-launch ones (home, limits, `--no-fetch`).
    pub args: Vec<OsString>,
    /// Extra environment for the kernel process (only `SANDGATE_LOG` is passed through).
    pub env: Vec<(OsString, OsString)>,
    /// Where kernel cgroups go.
    pub cgroups: Arc<crate::cgroup::Cgroups>,
    /// The caps of each kernel's cgroup.
    pub caps: crate::cgroup::Caps,
}

/// A `sandgate-kernel` child process.
struct ProcessChild {
    child: tokio::process::Child,
    /// Its cgroup, removed when it has exited.
    placement: Option<crate::cgroup::Placement>,
}

impl Launcher for ProcessLauncher {
    fn name(&self) -> &'static str {
        super::LauncherKind::Process.as_str()
    }

    fn launch<'a>(
        &'a self,
        request: LaunchRequest<'a>,
    ) -> BoxFuture<'a, Result<Launched, ClientError>> {
        Box::pin(self.start(request))
    }
}

impl ProcessLauncher {
    fn command(&self, request: &LaunchRequest<'_>) -> tokio::process::Command {
        let mounts = &request.mounts;
        let mut command = tokio::process::Command::new(&self.binary);
        command
            .args(&self.args)
            .arg("--workspace")
            .arg(mounts.workspace)
            .arg("--home-dir")
            .arg(mounts.home)
            .arg("--notify-ready");
        if let Some(packages) = mounts.packages {
            command
                .arg("--packages-dir")
                .arg(&packages.site)
                .arg("--packages-socket")
                .arg(&packages.socket);
        }
        command
            .arg("-f")
            .arg(request.connection_file)
            .env_clear()
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        command
    }

    async fn start(&self, request: LaunchRequest<'_>) -> Result<Launched, ClientError> {
        let id = request.kernel;
        let mut child = self
            .command(&request)
            .spawn()
            .map_err(|source| ClientError::Spawn {
                binary: self.binary.clone(),
                source,
            })?;
        let pid = child.id();
        let placement = pid.and_then(|pid| {
            let name = request
                .connection_file
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default();
            match self.cgroups.place(&name, pid, self.caps) {
                Ok(p) => Some(p),
                Err(why) => {
                    tracing::debug!(kernel = %id, %why, "the kernel runs without a cgroup of its own");
                    None
                }
            }
        });
        let stdout = child.stdout.take().expect("stdout is piped");
        let stderr = child.stderr.take().expect("stderr is piped");
        let tail = spawn_stderr_reader(id, stderr);
        let mut stdout = BufReader::new(stdout);
        let timeout = request.startup_timeout;
        let is_ready = tokio::select! {
            r = tokio::time::timeout(timeout, read_ready(&mut stdout)) => r.ok(),
            status = child.wait() => return Err(early_exit(status, tail).await),
        };
        match is_ready {
            Some(true) => {}
            Some(false) => return Err(early_exit(child.wait().await, tail).await),
            None => {
                let _ = child.kill().await;
                return Err(ClientError::StartTimeout(timeout.as_secs()));
            }
        }
        drain(stdout);
        Ok(Launched {
            pid,
            child: Box::new(ProcessChild { child, placement }),
        })
    }
}

impl Child for ProcessChild {
    fn wait(self: Box<Self>, mut kill: watch::Receiver<bool>) -> BoxFuture<'static, String> {
        let ProcessChild {
            mut child,
            placement,
        } = *self;
        Box::pin(async move {
            let status = tokio::select! {
                status = child.wait() => status,
                () = crate::until_true(&mut kill) => {
                    let _ = child.start_kill();
                    child.wait().await
                }
            };
            drop(placement);
            match status {
                Ok(s) => format!("the kernel process exited ({s})"),
                Err(e) => format!("the kernel process was lost: {e}"),
            }
        })
    }
}

/// Sends the kernel's stderr to the gateway's log, keeping its last lines (see
/// [`TAIL_LINES`]) in the returned watch.
fn spawn_stderr_reader(
    id: uuid::Uuid,
    stderr: tokio::process::ChildStderr,
) -> watch::Receiver<String> {
    let (tail_tx, tail_rx) = watch::channel(String::new());
    tokio::spawn(async move {
        let mut lines = BufReader::new(stderr).lines();
        let mut tail: std::collections::VecDeque<String> = Default::default();
        while let Ok(Some(line)) = lines.next_line().await {
            tracing::info!(kernel = %id, "kernel: {line}");
            tail.push_back(line);
            if tail.len() > TAIL_LINES {
                tail.pop_front();
            }
            let _ = tail_tx.send(tail.iter().cloned().collect::<Vec<_>>().join("\n"));
        }
    });
    tail_rx
}

/// Reads stdout until the `ready` line (true) or its end (false).
async fn read_ready(stdout: &mut BufReader<ChildStdout>) -> bool {
    let mut line = String::new();
    loop {
        line.clear();
        match stdout.read_line(&mut line).await {
            Ok(0) | Err(_) => return false,
            Ok(_) if line.trim() == "ready" => return true,
            Ok(_) => {}
        }
    }
}

/// The error of a child that ended before it was ready, with the end of its stderr (once the
/// reader saw the pipe close, [`TAIL_FLUSH`] at most).
async fn early_exit(
    status: std::io::Result<std::process::ExitStatus>,
    mut tail: watch::Receiver<String>,
) -> ClientError {
    let _ = tokio::time::timeout(TAIL_FLUSH, async { while tail.changed().await.is_ok() {} }).await;
    let stderr = tail.borrow().clone();
    ClientError::EarlyExit {
        status: status
            .map(|s| s.to_string())
            .unwrap_or_else(|e| e.to_string()),
        stderr,
    }
}

/// Drains stdout so the kernel never blocks writing to it.
fn drain(mut stdout: BufReader<ChildStdout>) {
    tokio::spawn(async move {
        let mut sink = [0u8; 1024];
        while let Ok(n) = stdout.read(&mut sink).await {
            if n == 0 {
                break;
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::launch::HostMounts;

    /// A launcher whose "kernel" is `sh -c script` (the per-launch arguments become the
    /// script's positional parameters).
    fn shell(script: &str) -> ProcessLauncher {
        ProcessLauncher {
            binary: "/bin/sh".into(),
            args: vec!["-c".into(), script.into(), "sh".into()],
            env: Vec::new(),
            cgroups: Arc::new(crate::cgroup::Cgroups::Unavailable("a test".into())),
            caps: crate::cgroup::Caps {
                memory_bytes: 1 << 30,
                cpu_cores: 1.0,
            },
        }
    }

    async fn launch(
        launcher: &ProcessLauncher,
        timeout: Duration,
    ) -> Result<Launched, ClientError> {
        let dir = tempfile::tempdir().unwrap();
        launcher
            .launch(LaunchRequest {
                kernel: uuid::Uuid::new_v4(),
                connection_file: &dir.path().join("kernel.json"),
                mounts: HostMounts {
                    workspace: dir.path(),
                    home: dir.path(),
                    packages: None,
                },
                startup_timeout: timeout,
            })
            .await
    }

    #[tokio::test]
    async fn a_child_that_ends_before_ready_says_why() {
        let err = launch(
            &shell("echo 'no image here' >&2; exit 3"),
            Duration::from_secs(10),
        )
        .await
        .err()
        .unwrap();
        match err {
            ClientError::EarlyExit { status, stderr } => {
                assert!(status.contains('3'), "{status}");
                assert_eq!(stderr, "no image here");
            }
            other => panic!("{other}"),
        }
    }

    #[tokio::test]
    async fn a_ready_child_runs_until_killed_with_an_empty_environment() {
        // The environment is empty: the gateway's `HOME` would make it exit.
        let script = "test -z \"$HOME\" || exit 9; echo starting; echo ready; exec sleep 30";
        let launched = launch(&shell(script), Duration::from_secs(10))
            .await
            .unwrap();
        assert!(launched.pid.is_some());
        let (kill, killed) = watch::channel(false);
        let end = tokio::spawn(launched.child.wait(killed));
        let _ = kill.send(true);
        let words = tokio::time::timeout(Duration::from_secs(10), end)
            .await
            .unwrap()
            .unwrap();
        assert!(words.contains("signal: 9"), "{words}");
    }

    #[tokio::test]
    async fn a_child_not_ready_in_time_is_abandoned() {
        let err = launch(&shell("exec sleep 30"), Duration::from_millis(200))
            .await
            .err()
            .unwrap();
        assert!(matches!(err, ClientError::StartTimeout(_)), "{err}");
    }
}
