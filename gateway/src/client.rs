//! One kernel process: launching it (through the configured [`crate::launch::Launcher`]) with a
//! fresh connection file and key, and the gateway's ZeroMQ client for its five channels.
//!
//! The gateway holds one set of sockets per kernel process and relays every WebSocket client
//! through them (the session layer routes replies back by `parent_header.msg_id`). The shell and
//! stdin sockets share one ZeroMQ identity, because the kernel sends `input_request` on stdin to
//! the identity that sent the `execute_request` on shell.
//!
//! Every message from the kernel is checked against the kernel's key before anything reads it;
//! one that fails is dropped and logged. What the launcher does (the child, its isolation, its
//! ready signal) is the launcher's; the channels, the order of what they carry, the heartbeat
//! and the exit handling are common to every launcher and live here.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;
use sandgate_wire::{RawMessage, Signer};
use serde_json::{Value, json};
use tokio::sync::{mpsc, watch};
use zeromq::{Socket, SocketRecv, SocketSend, ZmqMessage};

use crate::envelope::{ExecState, KernelMessage};
use crate::launch::{HostMounts, LaunchRequest};

pub use crate::envelope::Channel;

/// Errors of launching or talking to a kernel process.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The process could not be started.
    #[error("cannot start the kernel process {binary}: {source}")]
    Spawn {
        /// The kernel binary.
        binary: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The process ended before it was ready.
    #[error("the kernel process exited during start-up ({status}): {stderr}")]
    EarlyExit {
        /// Its exit status.
        status: String,
        /// The end of what it printed on stderr.
        stderr: String,
    },
    /// It was not ready in time.
    #[error("the kernel did not start within {0} s")]
    StartTimeout(u64),
    /// A socket could not connect.
    #[error("cannot connect to the kernel's {channel} channel: {reason}")]
    Connect {
        /// Which channel.
        channel: &'static str,
        /// Why.
        reason: String,
    },
    /// Writing the connection file failed.
    #[error("cannot write the connection file {path}: {source}")]
    ConnectionFile {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Its home folder could not be made.
    #[error("cannot make a home folder for the kernel in {path}: {source}")]
    Home {
        /// Where homes are made.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The process is gone.
    #[error("the kernel process is gone")]
    Gone,
}

impl LaunchSpec {
    /// A fresh home folder for a launch.
    pub fn new_home(&self) -> Result<std::sync::Arc<crate::home::Home>, ClientError> {
        self.homes.create().map_err(|source| ClientError::Home {
            path: self.homes.dir().to_owned(),
            source,
        })
    }
}

/// How to start kernel processes.
#[derive(Debug, Clone)]
pub struct LaunchSpec {
    /// What starts each kernel child (`kernels.launcher`).
    pub launcher: std::sync::Arc<dyn crate::launch::Launcher>,
    /// Where connection files are written (mode 0600; they hold the key).
    pub runtime_dir: PathBuf,
    /// Where kernels' home folders are made (each launch is given one, see [`Process::launch`]).
    pub homes: std::sync::Arc<crate::home::Homes>,
    /// How long a start may take before it is abandoned.
    pub startup_timeout: Duration,
    /// Interval between heartbeats.
    pub heartbeat_interval: Duration,
    /// Heartbeats missed in a row before the kernel counts as dead.
    pub heartbeat_misses: u32,
    /// How the gateway and the kernel talk.
    pub transport: Transport,
    /// The package service `%pip` reaches through (`None`: the kernel says it needs the
    /// gateway's).
    pub packages: Option<std::sync::Arc<crate::packages::Packages>>,
}

/// Something the kernel process sent or did.
#[derive(Debug)]
// Nearly every value is a message: boxing it would cost an allocation per message to save
// space only in the rare `Died`.
#[allow(clippy::large_enum_variant)]
pub enum Incoming {
    /// A message, authenticated, with its envelope read.
    Message(KernelMessage),
    /// The process ended (exit status in words), or stopped answering heartbeats.
    Died(String),
}

/// A running, ready kernel process.
pub struct Process {
    /// The kernel id this process was launched for.
    pub id: uuid::Uuid,
    /// Its process id.
    pub pid: Option<u32>,
    signer: Signer,
    shell: mpsc::Sender<Vec<Bytes>>,
    control: mpsc::Sender<Vec<Bytes>>,
    stdin: mpsc::Sender<Vec<Bytes>>,
    /// Set to true to kill the process (the watcher task owns the `Child`).
    kill: watch::Sender<bool>,
    /// Becomes true when the process has exited.
    exited: watch::Receiver<bool>,
    conn_file: PathBuf,
    /// The session id the gateway's own requests (kernel_info, interrupt) carry.
    session: String,
    /// Its home folder (`/home/user` in the guest), kept while the process lives.
    home: std::sync::Arc<crate::home::Home>,
}

impl std::fmt::Debug for Process {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Process")
            .field("id", &self.id)
            .field("pid", &self.pid)
            .finish()
    }
}

/// A fresh random key for signing, 32 bytes as hex.
fn new_key() -> String {
    use ring::rand::SecureRandom;
    let mut key = [0u8; 32];
    ring::rand::SystemRandom::new()
        .fill(&mut key)
        .expect("the system random source works");
    hex::encode(key)
}

/// How the gateway and its kernels talk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Transport {
    /// Unix sockets in the runtime folder (mode 0700): no port races, no other local user can
    /// connect, and the kernel process can live in a network namespace with no network at all.
    Ipc,
    /// TCP on 127.0.0.1.
    Tcp,
}

/// Where one kernel process's five channels are.
#[derive(Debug, Clone)]
enum Endpoints {
    Tcp([u16; 5]),
    /// `{base}-1` … `{base}-5`, Jupyter's naming for IPC.
    Ipc(PathBuf),
}

/// Channel order in [`Endpoints`]: shell, iopub, stdin, control, heartbeat.
const SHELL: usize = 0;
const IOPUB: usize = 1;
const STDIN: usize = 2;
const CONTROL: usize = 3;
const HEARTBEAT: usize = 4;

/// Longest Unix socket path Linux accepts (`sun_path`), less the terminating NUL.
const MAX_SOCKET_PATH: usize = 107;

impl Endpoints {
    fn new(transport: Transport, runtime_dir: &Path) -> std::io::Result<Endpoints> {
        match transport {
            Transport::Tcp => free_ports().map(Endpoints::Tcp),
            Transport::Ipc => {
                let base = runtime_dir.join(&uuid::Uuid::new_v4().simple().to_string()[..12]);
                if base.as_os_str().len() + 2 > MAX_SOCKET_PATH {
                    return Err(std::io::Error::other(format!(
                        "the runtime folder {} is too long for Unix socket paths; use a shorter \
                         data folder or kernels.transport = \"tcp\"",
                        runtime_dir.display()
                    )));
                }
                Ok(Endpoints::Ipc(base))
            }
        }
    }

    fn url(&self, channel: usize) -> String {
        match self {
            Endpoints::Tcp(ports) => format!("tcp://127.0.0.1:{}", ports[channel]),
            Endpoints::Ipc(base) => format!("ipc://{}-{}", base.display(), channel + 1),
        }
    }

    /// The connection-file fields for these endpoints.
    fn info(&self) -> Value {
        let (transport, ip, ports) = match self {
            Endpoints::Tcp(p) => ("tcp", "127.0.0.1".to_owned(), *p),
            Endpoints::Ipc(base) => ("ipc", base.display().to_string(), [1, 2, 3, 4, 5]),
        };
        json!({
            "transport": transport,
            "ip": ip,
            "shell_port": ports[SHELL],
            "iopub_port": ports[IOPUB],
            "stdin_port": ports[STDIN],
            "control_port": ports[CONTROL],
            "hb_port": ports[HEARTBEAT],
        })
    }

    /// Removes IPC socket files (a killed kernel leaves them behind).
    fn remove(&self) {
        if let Endpoints::Ipc(base) = self {
            for n in 1..=5 {
                let _ = std::fs::remove_file(format!("{}-{n}", base.display()));
            }
        }
    }
}

/// Five free TCP ports on 127.0.0.1 (bound and released, as jupyter_client does).
fn free_ports() -> std::io::Result<[u16; 5]> {
    let listeners: Vec<std::net::TcpListener> = (0..5)
        .map(|_| std::net::TcpListener::bind(("127.0.0.1", 0)))
        .collect::<Result<_, _>>()?;
    let mut ports = [0u16; 5];
    for (p, l) in ports.iter_mut().zip(&listeners) {
        *p = l.local_addr()?.port();
    }
    Ok(ports)
}

fn write_private(path: &Path, body: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options.open(path)?;
    file.write_all(body)?;
    file.sync_all()
}

/// A header for a message the gateway itself sends.
pub fn header(msg_type: &str, session: &str) -> Value {
    json!({
        "msg_id": uuid::Uuid::new_v4().to_string(),
        "msg_type": msg_type,
        "username": "sandgate",
        "session": session,
        "date": chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
        "version": "5.3",
    })
}

/// Serialises a message the gateway itself makes.
pub fn own_message(header: &Value, content: &Value) -> RawMessage {
    RawMessage {
        identities: Vec::new(),
        header: serde_json::to_vec(header).expect("JSON").into(),
        parent_header: Bytes::from_static(b"{}"),
        metadata: Bytes::from_static(b"{}"),
        content: serde_json::to_vec(content).expect("JSON").into(),
        buffers: Vec::new(),
    }
}

async fn connect<S: Socket>(
    mut socket: S,
    endpoint: &str,
    channel: &'static str,
) -> Result<S, ClientError> {
    socket
        .connect(endpoint)
        .await
        .map_err(|e| ClientError::Connect {
            channel,
            reason: e.to_string(),
        })?;
    Ok(socket)
}

fn spawn_sender<S: SocketSend + Send + 'static>(mut socket: S) -> mpsc::Sender<Vec<Bytes>> {
    let (tx, mut rx) = mpsc::channel::<Vec<Bytes>>(256);
    tokio::spawn(async move {
        while let Some(frames) = rx.recv().await {
            let Ok(message) = ZmqMessage::try_from(frames) else {
                continue;
            };
            if let Err(e) = socket.send(message).await {
                tracing::debug!(error = %e, "send to kernel failed");
            }
        }
    });
    tx
}

/// One of the kernel's reply channels (shell, control, stdin) as [`spawn_receiver`] reads it.
struct ReplyChannel {
    socket: Box<dyn SocketRecv + Send>,
    channel: Channel,
    /// False once the socket failed (its peer is gone).
    open: bool,
}

/// How long a reply waits for its request's `idle` once the request's `busy` has passed (the
/// kernel publishes `idle` right after the reply; this bounds a kernel that does not).
const PAIR_WAIT: Duration = Duration::from_secs(1);
/// How long a message waits for one the kernel sent before it on another connection (a reply
/// read before its `busy`, an `idle` read before its reply): that one is already on its way,
/// so this only covers the reader's lag. An `idle` for a request the kernel does not answer
/// (an unknown message type) is late by this much.
const CATCH_UP: Duration = Duration::from_millis(20);
/// How many requests [`spawn_receiver`] follows between their `busy` and their `idle`, and how
/// many replies it remembers that went ahead alone.
const FOLLOWED: usize = 1024;

/// A reply or an `idle` status waiting for the other (see [`spawn_receiver`]).
struct Held {
    parent: String,
    msg: KernelMessage,
    until: tokio::time::Instant,
}

/// Pushes `id` on a bounded queue of request ids.
fn remember(queue: &mut VecDeque<String>, id: String) {
    if queue.len() == FOLLOWED {
        queue.pop_front();
    }
    queue.push_back(id);
}

/// Reads the kernel's four message channels in one task until the process exits, so that what
/// the kernel sent about a request reaches the session layer in the order it was sent: its
/// `busy`, its output, its reply, its `idle`. The channels are separate connections, so that
/// order is rebuilt from what the kernel promises (as ipykernel does): output is published
/// before the reply is sent, and the reply before `idle` is published.
/// - A reply to a request whose `busy` passed is held until the request's `idle` arrives on
///   iopub (after all of the request's output, on the same connection), and goes just before
///   it ([`PAIR_WAIT`] at most). A reply read before its `busy` waits [`CATCH_UP`] for it.
/// - An `idle` read before its reply is held, and iopub is not read, until the reply arrives
///   ([`CATCH_UP`] at most).
///
/// Messages that fail the signature check are dropped and logged. A socket whose peer is gone
/// is no longer read (it would otherwise keep trying to reconnect).
fn spawn_receiver(
    mut iopub: Box<dyn SocketRecv + Send>,
    others: [(Box<dyn SocketRecv + Send>, Channel); 3],
    signer: Signer,
    kernel: uuid::Uuid,
    tx: mpsc::Sender<Incoming>,
    mut exited: watch::Receiver<bool>,
) {
    let mut replies = others.map(|(socket, channel)| ReplyChannel {
        socket,
        channel,
        open: true,
    });
    tokio::spawn(async move {
        let mut iopub_open = true;
        // Requests whose `busy` passed and whose `idle` has not.
        let mut busy: VecDeque<String> = VecDeque::new();
        // Requests whose reply went ahead alone (its `idle` must not wait for it).
        let mut alone: VecDeque<String> = VecDeque::new();
        let mut held_replies: Vec<Held> = Vec::new();
        let mut held_idle: Option<Held> = None;
        loop {
            let next_due = held_replies
                .iter()
                .chain(held_idle.as_ref())
                .map(|h| h.until)
                .min();
            let [a, b, c] = &mut replies;
            let (channel, received) = tokio::select! {
                // What already arrived is read before the exit is noticed.
                biased;
                r = iopub.recv(), if iopub_open && held_idle.is_none() => (Channel::Iopub, r),
                r = a.socket.recv(), if a.open => (a.channel, r),
                r = b.socket.recv(), if b.open => (b.channel, r),
                r = c.socket.recv(), if c.open => (c.channel, r),
                () = tokio::time::sleep_until(next_due.unwrap_or_else(tokio::time::Instant::now)),
                    if next_due.is_some() =>
                {
                    let now = tokio::time::Instant::now();
                    // Replies keep their order: one that is due takes those before it along.
                    let through = held_replies.iter().rposition(|h| h.until <= now);
                    let mut due: Vec<Held> = through
                        .map(|i| held_replies.drain(..=i).collect())
                        .unwrap_or_default();
                    for h in &due {
                        remember(&mut alone, h.parent.clone());
                    }
                    if held_idle.as_ref().is_some_and(|h| h.until <= now) {
                        due.extend(held_idle.take());
                    }
                    for h in due {
                        tracing::debug!(%kernel, parent = %h.parent, channel = h.msg.channel.as_str(),
                                        "a reply or idle went without the other");
                        if tx.send(Incoming::Message(h.msg)).await.is_err() {
                            return;
                        }
                    }
                    continue;
                }
                () = crate::until_true(&mut exited) => {
                    for h in held_replies.into_iter().chain(held_idle) {
                        let _ = tx.send(Incoming::Message(h.msg)).await;
                    }
                    return;
                }
            };
            let msg = match received {
                Ok(m) => match sandgate_wire::parse_raw(m.into_vec(), &signer) {
                    // The envelope is read here, once; every later step uses it.
                    Ok(raw) => KernelMessage::parse(channel, raw),
                    Err(e) => {
                        tracing::warn!(%kernel, channel = channel.as_str(), error = %e,
                                       "dropped a message from the kernel");
                        continue;
                    }
                },
                Err(e) => {
                    tracing::debug!(%kernel, channel = channel.as_str(), error = %e, "receive ended");
                    match replies.iter_mut().find(|r| r.channel == channel) {
                        Some(r) => r.open = false,
                        None => iopub_open = false,
                    }
                    continue;
                }
            };
            let now = tokio::time::Instant::now();
            // What goes out now, in order.
            let mut out: Vec<KernelMessage> = Vec::with_capacity(2);
            if channel != Channel::Iopub {
                let envelope = &msg.envelope;
                match envelope
                    .parent
                    .msg_id
                    .clone()
                    .filter(|_| envelope.msg_type.is_reply())
                {
                    Some(parent) if held_idle.as_ref().is_some_and(|h| h.parent == parent) => {
                        out.extend(held_replies.drain(..).map(|h| h.msg));
                        out.push(msg);
                        out.extend(held_idle.take().map(|h| h.msg));
                    }
                    Some(parent) => {
                        let wait = if busy.contains(&parent) {
                            PAIR_WAIT
                        } else {
                            CATCH_UP
                        };
                        held_replies.push(Held {
                            parent,
                            msg,
                            until: now + wait,
                        });
                    }
                    None => out.push(msg),
                }
            } else {
                match msg.envelope.request_status() {
                    Some((ExecState::Busy, parent)) => {
                        // A reply that came first now waits for the idle.
                        for h in held_replies.iter_mut().filter(|h| h.parent == parent) {
                            h.until = now + PAIR_WAIT;
                        }
                        remember(&mut busy, parent.to_owned());
                        out.push(msg);
                    }
                    Some((ExecState::Idle, parent)) => {
                        let parent = parent.to_owned();
                        let followed = busy.iter().position(|p| *p == parent);
                        if let Some(i) = followed {
                            busy.remove(i);
                        }
                        if let Some(i) = held_replies.iter().position(|h| h.parent == parent) {
                            // Replies held before this one answer earlier requests: they go first.
                            out.extend(held_replies.drain(..=i).map(|h| h.msg));
                            out.push(msg);
                        } else if followed.is_some() && !alone.contains(&parent) {
                            held_idle = Some(Held {
                                parent,
                                msg,
                                until: now + CATCH_UP,
                            });
                        } else {
                            out.push(msg);
                        }
                    }
                    _ => out.push(msg),
                }
            }
            for msg in out {
                if tx.send(Incoming::Message(msg)).await.is_err() {
                    return;
                }
            }
        }
    });
}

impl Process {
    /// Its home folder.
    pub fn home(&self) -> &std::sync::Arc<crate::home::Home> {
        &self.home
    }

    /// Starts a kernel process for kernel `id` with `workspace` at `/workspace` and `home` at
    /// `/home/user`, waits until it serves requests, and returns it with the stream of what it
    /// sends.
    pub async fn launch(
        spec: &LaunchSpec,
        id: uuid::Uuid,
        owner: &str,
        workspace: &Path,
        home: std::sync::Arc<crate::home::Home>,
    ) -> Result<(Process, mpsc::Receiver<Incoming>), ClientError> {
        let started = std::time::Instant::now();
        let key = new_key();
        let endpoints = Endpoints::new(spec.transport, &spec.runtime_dir).map_err(|source| {
            ClientError::ConnectionFile {
                path: spec.runtime_dir.clone(),
                source,
            }
        })?;
        let mut info = endpoints.info();
        info["key"] = json!(key);
        info["signature_scheme"] = json!("hmac-sha256");
        info["kernel_name"] = json!(crate::kernelspec::NAME);
        let suffix = &uuid::Uuid::new_v4().simple().to_string()[..8];
        let conn_file = spec.runtime_dir.join(format!("kernel-{id}-{suffix}.json"));
        write_private(&conn_file, &serde_json::to_vec_pretty(&info).expect("JSON")).map_err(
            |source| ClientError::ConnectionFile {
                path: conn_file.clone(),
                source,
            },
        )?;
        let result = Self::start(
            spec,
            id,
            owner,
            key,
            endpoints.clone(),
            &conn_file,
            workspace,
            home,
        )
        .await;
        match &result {
            Ok(_) => tracing::info!(
                kernel = %id,
                ms = started.elapsed().as_millis() as u64,
                "kernel process ready"
            ),
            Err(_) => {
                let _ = std::fs::remove_file(&conn_file);
                endpoints.remove();
            }
        }
        result
    }

    /// The launch proper: the package link, the launcher's child, then the common part
    /// (channels, reader, exit watcher, heartbeat) and the first `kernel_info` round trip.
    #[allow(clippy::too_many_arguments)]
    async fn start(
        spec: &LaunchSpec,
        id: uuid::Uuid,
        owner: &str,
        key: String,
        endpoints: Endpoints,
        conn_file: &Path,
        workspace: &Path,
        home: std::sync::Arc<crate::home::Home>,
    ) -> Result<(Process, mpsc::Receiver<Incoming>), ClientError> {
        let packages = open_packages(spec, owner).await?;
        let mount = packages.as_ref().map(crate::packages::PackageLink::mount);
        let launched = spec
            .launcher
            .launch(LaunchRequest {
                kernel: id,
                connection_file: conn_file,
                mounts: HostMounts {
                    workspace,
                    home: home.path(),
                    packages: mount.as_ref(),
                },
                startup_timeout: spec.startup_timeout,
            })
            .await?;
        // Dropping `launched` on an error below kills the child.
        let channels = Channels::connect(&endpoints).await?;
        let signer = Signer::new(key.as_bytes());
        let (tx, rx) = mpsc::channel(1024);
        let (kill_tx, kill_rx) = watch::channel(false);
        let (exited_tx, exited_rx) = watch::channel(false);
        let senders = channels.serve(spec, signer.clone(), id, tx.clone(), exited_rx.clone());
        spawn_watcher(
            launched.child,
            kill_rx,
            exited_tx,
            conn_file.to_owned(),
            endpoints,
            tx,
        );
        if let Some(link) = packages {
            link.serve(exited_rx.clone());
        }
        let process = Process {
            id,
            pid: launched.pid,
            signer,
            shell: senders.shell,
            control: senders.control,
            stdin: senders.stdin,
            kill: kill_tx,
            exited: exited_rx,
            conn_file: conn_file.to_owned(),
            session: uuid::Uuid::new_v4().to_string(),
            home,
        };
        let mut rx = rx;
        process.nudge(&mut rx, spec.startup_timeout).await?;
        Ok((process, rx))
    }

    /// Sends `kernel_info_request` until both its reply and an iopub message about it arrive,
    /// so the iopub subscription is known to be live before any client's request is relayed
    /// (a subscription takes effect a moment after it is sent; messages published before that
    /// are lost).
    async fn nudge(
        &self,
        rx: &mut mpsc::Receiver<Incoming>,
        limit: Duration,
    ) -> Result<(), ClientError> {
        let deadline = tokio::time::Instant::now() + limit;
        let mut wait = Duration::from_millis(250);
        loop {
            let id = self
                .request(Channel::Shell, "kernel_info_request", json!({}))
                .await?;
            let (mut replied, mut published) = (false, false);
            let round = tokio::time::Instant::now() + wait;
            while !(replied && published) {
                let until = round.min(deadline);
                match tokio::time::timeout_at(until, rx.recv()).await {
                    Ok(Some(Incoming::Message(m))) => {
                        if m.envelope.parent.msg_id.as_deref() == Some(id.as_str()) {
                            match m.channel {
                                Channel::Iopub => published = true,
                                _ => replied = true,
                            }
                        }
                    }
                    Ok(Some(Incoming::Died(reason))) => {
                        return Err(ClientError::EarlyExit {
                            status: reason,
                            stderr: String::new(),
                        });
                    }
                    Ok(None) => return Err(ClientError::Gone),
                    Err(_) if tokio::time::Instant::now() >= deadline => {
                        self.kill().await;
                        return Err(ClientError::StartTimeout(limit.as_secs()));
                    }
                    Err(_) => break,
                }
            }
            if replied && published {
                return Ok(());
            }
            wait = (wait * 2).min(Duration::from_secs(2));
        }
    }

    /// Signs and sends a message on `channel` (iopub is receive-only and is refused).
    pub async fn send(&self, channel: Channel, message: &RawMessage) -> Result<(), ClientError> {
        let outbox = match channel {
            Channel::Shell => &self.shell,
            Channel::Control => &self.control,
            Channel::Stdin => &self.stdin,
            Channel::Iopub => return Ok(()),
        };
        let frames = sandgate_wire::serialize_raw(message, &self.signer);
        outbox.send(frames).await.map_err(|_| ClientError::Gone)
    }

    /// Sends a request the gateway makes itself; returns its `msg_id`.
    pub async fn request(
        &self,
        channel: Channel,
        msg_type: &str,
        content: Value,
    ) -> Result<String, ClientError> {
        let header = header(msg_type, &self.session);
        let id = header["msg_id"].as_str().unwrap_or_default().to_owned();
        self.send(channel, &own_message(&header, &content)).await?;
        Ok(id)
    }

    /// Whether the process has exited.
    pub fn has_exited(&self) -> bool {
        *self.exited.borrow()
    }

    /// Waits until the process has exited.
    pub async fn wait_exit(&self) {
        let mut exited = self.exited.clone();
        let _ = exited.wait_for(|e| *e).await;
    }

    /// Kills the process (SIGKILL) and waits for it to end.
    pub async fn kill(&self) {
        let _ = self.kill.send(true);
        self.wait_exit().await;
    }

    /// Asks the kernel to shut down, waits up to `grace` for it to exit, then kills it.
    pub async fn shutdown(&self, grace: Duration) {
        if self.has_exited() {
            return;
        }
        let _ = self
            .request(
                Channel::Control,
                "shutdown_request",
                json!({"restart": false}),
            )
            .await;
        if tokio::time::timeout(grace, self.wait_exit()).await.is_err() {
            tracing::warn!(kernel = %self.id, "kernel did not exit after shutdown_request; killing it");
            self.kill().await;
        }
    }

    /// The connection file (removed when the process ends).
    pub fn connection_file(&self) -> &Path {
        &self.conn_file
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.kill.send(true);
    }
}

/// `owner`'s package link, if the gateway serves packages.
async fn open_packages(
    spec: &LaunchSpec,
    owner: &str,
) -> Result<Option<crate::packages::PackageLink>, ClientError> {
    let Some(service) = &spec.packages else {
        return Ok(None);
    };
    crate::packages::PackageLink::open(service, owner, &spec.runtime_dir)
        .await
        .map(Some)
        .map_err(|source| ClientError::ConnectionFile {
            path: spec.runtime_dir.clone(),
            source,
        })
}

/// The gateway's sockets to one kernel's five channels, connected.
struct Channels {
    shell: zeromq::DealerSocket,
    stdin: zeromq::DealerSocket,
    control: zeromq::DealerSocket,
    iopub: zeromq::SubSocket,
    heartbeat: zeromq::ReqSocket,
    hb_endpoint: String,
}

/// The sending halves of the shell, control and stdin sockets.
struct Senders {
    shell: mpsc::Sender<Vec<Bytes>>,
    control: mpsc::Sender<Vec<Bytes>>,
    stdin: mpsc::Sender<Vec<Bytes>>,
}

impl Channels {
    /// Connects to `endpoints`. Shell and stdin share one identity (the kernel sends
    /// `input_request` on stdin to the identity that sent the request on shell); iopub
    /// subscribes to everything.
    async fn connect(endpoints: &Endpoints) -> Result<Channels, ClientError> {
        let identity = zeromq::util::PeerIdentity::try_from(
            format!("sandgate-{}", uuid::Uuid::new_v4().simple()).into_bytes(),
        )
        .expect("a short identity is valid");
        let mut options = zeromq::SocketOptions::default();
        options.peer_identity(identity.clone());
        let shell = connect(
            zeromq::DealerSocket::with_options(options),
            &endpoints.url(SHELL),
            "shell",
        )
        .await?;
        let mut options = zeromq::SocketOptions::default();
        options.peer_identity(identity);
        let stdin = connect(
            zeromq::DealerSocket::with_options(options),
            &endpoints.url(STDIN),
            "stdin",
        )
        .await?;
        let control = connect(
            zeromq::DealerSocket::new(),
            &endpoints.url(CONTROL),
            "control",
        )
        .await?;
        let mut iopub = connect(zeromq::SubSocket::new(), &endpoints.url(IOPUB), "iopub").await?;
        iopub
            .subscribe("")
            .await
            .map_err(|e| ClientError::Connect {
                channel: "iopub",
                reason: e.to_string(),
            })?;
        let hb_endpoint = endpoints.url(HEARTBEAT);
        let heartbeat = connect(zeromq::ReqSocket::new(), &hb_endpoint, "heartbeat").await?;
        Ok(Channels {
            shell,
            stdin,
            control,
            iopub,
            heartbeat,
            hb_endpoint,
        })
    }

    /// Starts the reader (see [`spawn_receiver`]), the heartbeat and the three senders; what
    /// the kernel sends, and its death, go to `tx`.
    fn serve(
        self,
        spec: &LaunchSpec,
        signer: Signer,
        kernel: uuid::Uuid,
        tx: mpsc::Sender<Incoming>,
        exited: watch::Receiver<bool>,
    ) -> Senders {
        let (shell_send, shell_recv) = self.shell.split();
        let (stdin_send, stdin_recv) = self.stdin.split();
        let (control_send, control_recv) = self.control.split();
        spawn_receiver(
            Box::new(self.iopub),
            [
                (Box::new(shell_recv), Channel::Shell),
                (Box::new(control_recv), Channel::Control),
                (Box::new(stdin_recv), Channel::Stdin),
            ],
            signer,
            kernel,
            tx.clone(),
            exited.clone(),
        );
        spawn_heartbeat(
            self.hb_endpoint,
            self.heartbeat,
            spec.heartbeat_interval,
            spec.heartbeat_misses,
            tx,
            exited,
        );
        Senders {
            shell: spawn_sender(shell_send),
            control: spawn_sender(control_send),
            stdin: spawn_sender(stdin_send),
        }
    }
}

/// Waits for the child's end (killing it when `kill` says so), then removes its connection
/// file and sockets, marks the process exited and reports its death on `died`.
fn spawn_watcher(
    child: Box<dyn crate::launch::Child>,
    kill: watch::Receiver<bool>,
    exited: watch::Sender<bool>,
    conn_file: PathBuf,
    endpoints: Endpoints,
    died: mpsc::Sender<Incoming>,
) {
    tokio::spawn(async move {
        let words = child.wait(kill).await;
        let _ = std::fs::remove_file(&conn_file);
        endpoints.remove();
        let _ = exited.send(true);
        let _ = died.send(Incoming::Died(words)).await;
    });
}

/// Pings the kernel's heartbeat; after `misses` unanswered intervals in a row, reports it dead.
fn spawn_heartbeat(
    endpoint: String,
    mut socket: zeromq::ReqSocket,
    interval: Duration,
    misses: u32,
    tx: mpsc::Sender<Incoming>,
    mut exited: watch::Receiver<bool>,
) {
    tokio::spawn(async move {
        let mut missed = 0u32;
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        loop {
            tokio::select! {
                () = crate::until_true(&mut exited) => return,
                _ = tick.tick() => {}
            }
            let ping = ZmqMessage::from(Bytes::from_static(b"ping"));
            let answered = tokio::time::timeout(interval, async {
                socket.send(ping).await.ok()?;
                socket.recv().await.ok()
            })
            .await;
            if let Ok(Some(_)) = answered {
                missed = 0;
                continue;
            }
            missed += 1;
            if missed >= misses {
                let _ = tx
                    .send(Incoming::Died(format!(
                        "the kernel stopped answering its heartbeat ({missed} missed)"
                    )))
                    .await;
                return;
            }
            // A REQ socket that lost its reply cannot send again: start a fresh one.
            socket = match connect(zeromq::ReqSocket::new(), &endpoint, "heartbeat").await {
                Ok(s) => s,
                Err(_) => continue,
            };
        }
    });
}
