//! The kernel's five ZeroMQ channels and the handlers behind them.
//!
//! Shell requests are handled one at a time, in order, by the executor; control requests
//! (interrupt, shutdown, kernel_info) are handled as they arrive, even while a cell runs.
//! Every request is framed by `status: busy` / `status: idle` on iopub. Messages that fail to
//! parse or authenticate are dropped and logged, never answered and never executed.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use jupyter_protocol::{ConnectionInfo, Header};
use serde_json::{Value, json};
use tokio::sync::{mpsc, watch};
use zeromq::{Socket, SocketRecv, SocketSend, ZmqMessage};

use crate::sandbox::seat::Lender;
use crate::sandbox::{Event, Origin, Outcome, Sandbox, SandboxConfig, SandboxError, StreamName};
use sandgate_wire::{self as wire, Message, Signer};

/// The protocol version spoken.
pub const PROTOCOL_VERSION: &str = "5.3";
/// Most shell requests queued while one runs; past it the reader waits (ZeroMQ then buffers).
const SHELL_QUEUE: usize = 256;
/// Outgoing messages queued per socket.
const SEND_QUEUE: usize = 1024;
/// Signatures remembered to recognise replayed messages.
const REPLAY_MEMORY: usize = 65_536;
/// How much of a cell's output text the history keeps.
const HISTORY_OUTPUT_CHARS: usize = 10_000;
/// Stream text of a running cell goes out at most this often per cell (ipykernel: 200 ms).
const STREAM_INTERVAL: std::time::Duration = std::time::Duration::from_millis(50);
/// Stream text waiting for its interval is sent anyway once it is this large.
const STREAM_BATCH: usize = 1 << 20;
/// How long an iopub send may wait for a subscriber that does not read before it is given up.
const IOPUB_STALL: std::time::Duration = std::time::Duration::from_secs(2);
/// The same, while a subscriber is known to be stalled: a send that does not go through at
/// once is dropped, so a stalled subscriber costs the kernel about this much per message.
const IOPUB_STALLED: std::time::Duration = std::time::Duration::from_millis(1);

/// Errors that stop the kernel.
#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    /// A socket could not be bound.
    #[error("cannot bind {endpoint}: {reason}")]
    Bind {
        /// The endpoint.
        endpoint: String,
        /// Why.
        reason: String,
    },
    /// The sandbox failed to start.
    #[error(transparent)]
    Sandbox(#[from] SandboxError),
}

/// What the kernel needs to run.
#[derive(Debug, Clone)]
pub struct KernelConfig {
    /// Ports, transport and key, from the connection file.
    pub connection: ConnectionInfo,
    /// The sandbox: image, workspace, limits.
    pub sandbox: SandboxConfig,
}

/// What a socket's writer task is asked to do.
enum Outgoing {
    /// Send these frames.
    Frames(Vec<Bytes>),
    /// Answer once everything queued before this has been sent.
    Flush(tokio::sync::oneshot::Sender<()>),
}

/// Sends frames on one socket from many tasks, in the order they were queued.
#[derive(Clone)]
struct Outbox(mpsc::Sender<Outgoing>);

impl Outbox {
    async fn send(&self, frames: Vec<Bytes>) {
        let _ = self.0.send(Outgoing::Frames(frames)).await;
    }

    /// Waits until everything queued so far is on the wire.
    async fn flush(&self) {
        let (tx, rx) = tokio::sync::oneshot::channel();
        if self.0.send(Outgoing::Flush(tx)).await.is_ok() {
            let _ = rx.await;
        }
    }
}

fn spawn_writer<S: SocketSend + Send + 'static>(mut socket: S, name: &'static str) -> Outbox {
    let (tx, mut rx) = mpsc::channel::<Outgoing>(SEND_QUEUE);
    tokio::spawn(async move {
        while let Some(item) = rx.recv().await {
            match item {
                Outgoing::Frames(frames) => {
                    let Ok(message) = ZmqMessage::try_from(frames) else {
                        continue;
                    };
                    if let Err(e) = socket.send(message).await {
                        tracing::debug!(socket = name, error = %e, "send failed");
                    }
                }
                Outgoing::Flush(done) => {
                    let _ = done.send(());
                }
            }
        }
    });
    Outbox(tx)
}

/// The iopub writer. iopub is an XPUB socket, as in ipykernel 7: SUB clients connect to it
/// exactly as to a PUB. zeromq's PUB socket preallocates (and touches) a 100 000-slot queue, 4 MB
/// that every idle kernel would carry; XPUB writes to each subscriber's connection directly.
///
/// XPUB learns of subscriptions only when it is read, so the same task reads it between sends.
/// A subscriber that stops reading must not stop the kernel: a send that cannot finish within
/// [`IOPUB_STALL`] is given up (the message is lost, as a PUB socket drops at its high-water
/// mark), and while sends keep stalling each waits only [`IOPUB_STALLED`], until one goes
/// through in time. zeromq's XPUB writes to its subscribers in turn, so while one is stalled
/// the others can miss messages too; under the gateway each kernel has one subscriber, the
/// gateway, which always reads.
fn spawn_publisher(mut socket: zeromq::XPubSocket) -> Outbox {
    let (tx, mut rx) = mpsc::channel::<Outgoing>(SEND_QUEUE);
    tokio::spawn(async move {
        let mut stalled = false;
        let mut dropped: u64 = 0;
        loop {
            tokio::select! {
                biased;
                item = rx.recv() => match item {
                    None => break,
                    Some(Outgoing::Frames(frames)) => {
                        let Ok(message) = ZmqMessage::try_from(frames) else {
                            continue;
                        };
                        let patience = if stalled { IOPUB_STALLED } else { IOPUB_STALL };
                        match tokio::time::timeout(patience, socket.send(message)).await {
                            Ok(Ok(())) => {
                                if stalled {
                                    tracing::warn!(dropped, "an iopub subscriber reads again");
                                    stalled = false;
                                    dropped = 0;
                                }
                            }
                            Ok(Err(e)) => tracing::debug!(error = %e, "iopub send failed"),
                            Err(_) => {
                                if !stalled {
                                    tracing::warn!("an iopub subscriber stopped reading; \
                                                    messages it cannot take are dropped");
                                }
                                stalled = true;
                                dropped += 1;
                            }
                        }
                    }
                    Some(Outgoing::Flush(done)) => {
                        let _ = done.send(());
                    }
                },
                // Subscriptions and unsubscriptions; XPUB records them as it reads them.
                read = socket.recv() => {
                    if let Err(e) = read {
                        tracing::debug!(error = %e, "iopub read failed");
                    }
                }
            }
        }
    });
    Outbox(tx)
}

/// Builds and signs the kernel's messages.
#[derive(Clone)]
struct Messenger {
    signer: Signer,
    session: String,
    /// Message ids are this (`{session}_{pid}_`) and a count, as jupyter_client's `Session`
    /// makes them: no random draw or system call per message.
    id_prefix: Arc<str>,
    /// Messages made so far.
    made: Arc<AtomicU64>,
    iopub: Outbox,
}

impl Messenger {
    fn msg_id(&self) -> String {
        let n = self.made.fetch_add(1, Ordering::Relaxed);
        format!("{}{n}", self.id_prefix)
    }

    fn make(&self, parent: &Message, msg_type: &str, content: Value) -> Message {
        Message {
            identities: Vec::new(),
            header: Header {
                msg_id: self.msg_id(),
                username: parent.header.username.clone(),
                session: self.session.clone(),
                date: chrono::Utc::now(),
                msg_type: msg_type.to_owned(),
                version: PROTOCOL_VERSION.to_owned(),
            },
            parent_header: serde_json::to_value(&parent.header).unwrap_or_else(|_| json!({})),
            metadata: json!({}),
            content,
            buffers: Vec::new(),
        }
    }

    async fn publish(&self, parent: &Message, msg_type: &str, content: Value) {
        let msg = self.make(parent, msg_type, content);
        self.send_iopub(msg).await;
    }

    /// Publishes a message with metadata and binary buffers of its own (a comm's).
    async fn publish_with(
        &self,
        parent: &Message,
        msg_type: &str,
        content: Value,
        metadata: Value,
        buffers: Vec<Bytes>,
    ) {
        let mut msg = self.make(parent, msg_type, content);
        msg.metadata = metadata;
        msg.buffers = buffers;
        self.send_iopub(msg).await;
    }

    async fn send_iopub(&self, mut msg: Message) {
        let topic = format!("kernel.{}.{}", self.session, msg.header.msg_type);
        msg.identities = vec![Bytes::from(topic)];
        self.iopub.send(wire::serialize(&msg, &self.signer)).await;
    }

    async fn status(&self, parent: &Message, state: &str) {
        self.publish(parent, "status", json!({"execution_state": state}))
            .await;
    }

    async fn reply(&self, to: &Outbox, request: &Message, msg_type: &str, content: Value) {
        let mut msg = self.make(request, msg_type, content);
        msg.identities = request.identities.clone();
        if msg_type == "execute_reply" || msg_type.ends_with("_reply") {
            msg.metadata = json!({"started": request.header.date.to_rfc3339()});
        }
        to.send(wire::serialize(&msg, &self.signer)).await;
    }
}

/// One remembered execution, for `history_request`.
struct HistoryEntry {
    line: u64,
    input: String,
    output: Option<String>,
}

/// Binds a socket of type `S` at `endpoint`.
async fn bind<S: Socket>(endpoint: String) -> Result<S, KernelError> {
    let mut socket = S::new();
    socket
        .bind(&endpoint)
        .await
        .map_err(|e| KernelError::Bind {
            endpoint: endpoint.clone(),
            reason: e.to_string(),
        })?;
    Ok(socket)
}

/// Reads, authenticates and parses messages from a ROUTER socket into `tx`.
fn spawn_reader(
    mut socket: zeromq::RouterRecvHalf,
    signer: Signer,
    name: &'static str,
    tx: mpsc::Sender<Message>,
    replays: Arc<std::sync::Mutex<wire::ReplayGuard>>,
) {
    tokio::spawn(async move {
        loop {
            let frames = match socket.recv().await {
                Ok(m) => m.into_vec(),
                Err(e) => {
                    tracing::debug!(socket = name, error = %e, "receive failed");
                    continue;
                }
            };
            let sig = wire::signature(&frames).cloned().unwrap_or_default();
            match wire::parse(frames, &signer) {
                Ok(_)
                    if !replays
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .first_time(&sig) =>
                {
                    tracing::warn!(socket = name, "dropped a replayed message");
                }
                Ok(msg) => {
                    if tx.send(msg).await.is_err() {
                        break;
                    }
                }
                Err(e) => tracing::warn!(socket = name, error = %e, "dropped a message"),
            }
        }
    });
}

/// Runs the kernel until a `shutdown_request` (or `shutdown` resolves). `ready` is called once
/// every channel is bound and the interpreter has started, so requests are served at once.
pub async fn run(
    config: KernelConfig,
    shutdown: impl std::future::Future<Output = ()>,
    ready: impl FnOnce(),
    seat: Lender,
) -> Result<(), KernelError> {
    let c = &config.connection;
    let signer = Signer::new(c.key.as_bytes());

    let (shell_send, shell_recv) = bind::<zeromq::RouterSocket>(c.shell_url()).await?.split();
    let (control_send, control_recv) = bind::<zeromq::RouterSocket>(c.control_url()).await?.split();
    let (stdin_send, stdin_recv) = bind::<zeromq::RouterSocket>(c.stdin_url()).await?.split();
    let iopub = bind::<zeromq::XPubSocket>(c.iopub_url()).await?;
    let mut heartbeat = bind::<zeromq::RepSocket>(c.hb_url()).await?;
    tokio::spawn(async move {
        while let Ok(ping) = heartbeat.recv().await {
            if heartbeat.send(ping).await.is_err() {
                break;
            }
        }
    });

    let (events_tx, events_rx) = mpsc::channel(crate::sandbox::EVENT_QUEUE);
    let sandbox_config = config.sandbox.clone();
    let handover = seat.handover();
    let (sandbox, guest) = tokio::task::spawn_blocking(move || {
        Sandbox::start_guest(sandbox_config, events_tx, handover)
    })
    .await
    .map_err(|e| SandboxError::Start(e.to_string()))??;
    // From here the guest's turns run on the kernel thread (see `sandbox::seat`).
    seat.lend(guest);
    let sandbox = Arc::new(sandbox);

    let session = uuid::Uuid::new_v4().to_string();
    let messenger = Messenger {
        signer: signer.clone(),
        id_prefix: format!("{session}_{}_", std::process::id()).into(),
        session,
        made: Arc::new(AtomicU64::new(0)),
        iopub: spawn_publisher(iopub),
    };
    let shell_out = spawn_writer(shell_send, "shell");
    let control_out = spawn_writer(control_send, "control");
    let stdin_out = spawn_writer(stdin_send, "stdin");

    // One memory of recent signatures for all channels: a message captured on one channel
    // and sent again on another is a replay too.
    let replays = Arc::new(std::sync::Mutex::new(wire::ReplayGuard::new(REPLAY_MEMORY)));
    let (shell_tx, shell_rx) = mpsc::channel(SHELL_QUEUE);
    spawn_reader(
        shell_recv,
        signer.clone(),
        "shell",
        shell_tx,
        replays.clone(),
    );
    let (control_tx, mut control_rx) = mpsc::channel(64);
    spawn_reader(
        control_recv,
        signer.clone(),
        "control",
        control_tx,
        replays.clone(),
    );
    let (stdin_tx, stdin_rx) = mpsc::channel(16);
    spawn_reader(stdin_recv, signer.clone(), "stdin", stdin_tx, replays);

    let mut events_rx = events_rx;
    let info = kernel_info(&sandbox, &mut events_rx).await;
    let (stop_tx, mut stop_rx) = watch::channel(false);

    let mut executor = Executor {
        messenger: messenger.clone(),
        shell: shell_out.clone(),
        stdin: stdin_out,
        sandbox: sandbox.clone(),
        events: events_rx,
        stdin_replies: stdin_rx,
        info: info.clone(),
        count: 0,
        history: Vec::new(),
        stop: stop_tx.clone(),
    };
    // Tell clients the kernel is up, as ipykernel does.
    let hello = Message {
        identities: vec![],
        header: Header {
            msg_id: messenger.msg_id(),
            username: "kernel".into(),
            session: messenger.session.clone(),
            date: chrono::Utc::now(),
            msg_type: "status".into(),
            version: PROTOCOL_VERSION.into(),
        },
        parent_header: json!({}),
        metadata: json!({}),
        content: json!({}),
        buffers: vec![],
    };
    messenger.status(&hello, "starting").await;
    tokio::spawn(async move { executor.run(shell_rx).await });
    ready();

    let control_flush = control_out.clone();
    let control_sandbox = sandbox.clone();
    let control_messenger = messenger.clone();
    tokio::spawn(async move {
        while let Some(msg) = control_rx.recv().await {
            let m = &control_messenger;
            m.status(&msg, "busy").await;
            match msg.header.msg_type.as_str() {
                "interrupt_request" => {
                    control_sandbox.interrupt();
                    m.reply(
                        &control_out,
                        &msg,
                        "interrupt_reply",
                        json!({"status": "ok"}),
                    )
                    .await;
                }
                "shutdown_request" => {
                    let restart = msg
                        .content
                        .get("restart")
                        .and_then(Value::as_bool)
                        .unwrap_or(false);
                    let content = json!({"status": "ok", "restart": restart});
                    m.reply(&control_out, &msg, "shutdown_reply", content.clone())
                        .await;
                    m.publish(&msg, "shutdown_reply", content).await;
                    m.status(&msg, "idle").await;
                    let _ = stop_tx.send(true);
                    continue;
                }
                "kernel_info_request" => {
                    m.reply(&control_out, &msg, "kernel_info_reply", info.clone())
                        .await;
                }
                other => tracing::info!(msg_type = other, "ignored control message"),
            }
            m.status(&msg, "idle").await;
        }
    });

    tokio::select! {
        () = shutdown => {}
        _ = stop_rx.wait_for(|stop| *stop) => {}
    }
    // The last replies (shutdown_reply, status) are on the wire before the process ends.
    for outbox in [&messenger.iopub, &shell_out, &control_flush] {
        outbox.flush().await;
    }
    Ok(())
}

async fn kernel_info(sandbox: &Sandbox, events: &mut mpsc::Receiver<Event>) -> Value {
    let mut version = "3".to_owned();
    if sandbox.submit(json!({"kind": "info"}), false).is_ok() {
        while let Some(event) = events.recv().await {
            if let Event::Done(outcome) = event {
                if let Outcome::Reply(r) = outcome {
                    version = r["python_version"].as_str().unwrap_or("3").to_owned();
                }
                break;
            }
        }
    }
    json!({
        "status": "ok",
        "protocol_version": PROTOCOL_VERSION,
        "implementation": "sandgate",
        "implementation_version": env!("CARGO_PKG_VERSION"),
        "language_info": {
            "name": "python",
            "version": version,
            "mimetype": "text/x-python",
            "file_extension": ".py",
            "pygments_lexer": "ipython3",
            "codemirror_mode": {"name": "ipython", "version": 3},
            "nbconvert_exporter": "python",
        },
        "banner": format!(
            "Sandgate: Python {version} in a wasmtime sandbox (no network, files only in /workspace)"
        ),
        "help_links": [],
        "debugger": false,
    })
}

struct Executor {
    messenger: Messenger,
    shell: Outbox,
    stdin: Outbox,
    sandbox: Arc<Sandbox>,
    events: mpsc::Receiver<Event>,
    stdin_replies: mpsc::Receiver<Message>,
    info: Value,
    count: u64,
    history: Vec<HistoryEntry>,
    stop: watch::Sender<bool>,
}

impl Executor {
    async fn run(&mut self, mut shell: mpsc::Receiver<Message>) {
        let mut pending: VecDeque<Message> = VecDeque::new();
        loop {
            let msg = match pending.pop_front() {
                Some(m) => m,
                None => match shell.recv().await {
                    Some(m) => m,
                    None => return,
                },
            };
            // Shared, so a cell's request can be handed to the guest as its parent (see
            // `sandbox::Origin`) without a copy.
            let msg = Arc::new(msg);
            let failed = self.handle(&msg).await;
            if failed
                && msg
                    .content
                    .get("stop_on_error")
                    .and_then(Value::as_bool)
                    .unwrap_or(true)
            {
                // Abort what was already queued behind the failed cell, as ipykernel does.
                while let Ok(next) = shell.try_recv() {
                    pending.push_back(next);
                }
                let mut kept = VecDeque::new();
                for queued in pending.drain(..) {
                    if queued.header.msg_type == "execute_request" {
                        self.abort(&queued).await;
                    } else {
                        kept.push_back(queued);
                    }
                }
                pending = kept;
            }
        }
    }

    async fn abort(&self, msg: &Message) {
        let m = &self.messenger;
        m.status(msg, "busy").await;
        let content = json!({"status": "aborted", "execution_count": self.count});
        m.reply(&self.shell, msg, "execute_reply", content).await;
        m.status(msg, "idle").await;
    }

    /// Handles one shell request; true if it was an execution that failed.
    async fn handle(&mut self, msg: &Arc<Message>) -> bool {
        let m = self.messenger.clone();
        m.status(msg, "busy").await;
        let mut failed = false;
        match msg.header.msg_type.as_str() {
            "kernel_info_request" => {
                m.reply(&self.shell, msg, "kernel_info_reply", self.info.clone())
                    .await;
            }
            "execute_request" => failed = self.execute(msg).await,
            "complete_request" => {
                let req = json!({"kind": "complete", "code": msg.content["code"],
                                 "cursor_pos": msg.content["cursor_pos"]});
                let reply = self.simple(req).await;
                m.reply(&self.shell, msg, "complete_reply", reply).await;
            }
            "inspect_request" => {
                let req = json!({"kind": "inspect", "code": msg.content["code"],
                                 "cursor_pos": msg.content["cursor_pos"],
                                 "detail_level": msg.content["detail_level"]});
                let reply = self.simple(req).await;
                m.reply(&self.shell, msg, "inspect_reply", reply).await;
            }
            "is_complete_request" => {
                let req = json!({"kind": "is_complete", "code": msg.content["code"]});
                let reply = self.simple(req).await;
                m.reply(&self.shell, msg, "is_complete_reply", reply).await;
            }
            "history_request" => {
                let reply = self.history_reply(&msg.content);
                m.reply(&self.shell, msg, "history_reply", reply).await;
            }
            "comm_info_request" => {
                // The guest's open comms, `{comm_id: {"target_name": ...}}`, those of one
                // target when the request names one.
                let target = msg.content.get("target_name").cloned();
                let req = json!({"kind": "comm_info", "target_name": target});
                let reply = self.simple(req).await;
                m.reply(&self.shell, msg, "comm_info_reply", reply).await;
            }
            // A frontend's comm message: the guest's comm manager runs the target's, or the
            // comm's, handler, its output a child of this message (see `Executor::comm`).
            "comm_open" | "comm_msg" | "comm_close" => self.comm(msg).await,
            "shutdown_request" => {
                let restart = msg
                    .content
                    .get("restart")
                    .and_then(Value::as_bool)
                    .unwrap_or(false);
                let content = json!({"status": "ok", "restart": restart});
                m.reply(&self.shell, msg, "shutdown_reply", content).await;
                let _ = self.stop.send(true);
            }
            other => tracing::info!(msg_type = other, "ignored shell message"),
        }
        // As ipykernel: the reply is on the wire before `idle` is published.
        self.shell.flush().await;
        m.status(msg, "idle").await;
        failed
    }

    /// A request answered by the driver alone (no output expected).
    async fn simple(&mut self, request: Value) -> Value {
        let outcome = self.run_in_sandbox(request, false, None, None).await;
        match outcome {
            Ok(Outcome::Reply(r)) => r,
            Ok(Outcome::Restarted { reason }) => {
                json!({"status": "error", "ename": "InterpreterRestarted", "evalue": reason, "traceback": []})
            }
            Err(e) => {
                json!({"status": "error", "ename": "KernelError", "evalue": e.to_string(), "traceback": []})
            }
        }
    }

    /// Sends a request to the sandbox and, while it runs, forwards its events to iopub (with
    /// `parent` as their parent) and serves its `input()` calls.
    ///
    /// Stream text is batched as ipykernel does: a write goes out at once when its stream has
    /// been quiet for [`STREAM_INTERVAL`], otherwise it waits, with what follows, until that
    /// interval has passed (or [`STREAM_BATCH`] bytes are waiting). Anything else the cell
    /// publishes, and its end, first sends what waits, so order is kept. A cell that prints a
    /// line at a time in a tight loop thus sends a few messages a second, not one per line.
    async fn run_in_sandbox(
        &mut self,
        request: Value,
        is_cell: bool,
        parent: Option<(&Message, u64)>,
        origin: Option<Origin>,
    ) -> Result<Outcome, SandboxError> {
        self.sandbox.submit_from(request, is_cell, origin)?;
        let mut output = String::new();
        let mut held: Option<(StreamName, String)> = None;
        let mut last_sent: Option<tokio::time::Instant> = None;
        loop {
            let due = held.as_ref().and(last_sent).map(|at| at + STREAM_INTERVAL);
            let event = tokio::select! {
                biased;
                event = self.events.recv() => match event {
                    None => return Err(SandboxError::Stopped),
                    Some(event) => event,
                },
                () = tokio::time::sleep_until(due.unwrap_or_else(tokio::time::Instant::now)), if due.is_some() => {
                    if let (Some(parent), Some(text)) = (parent, held.take()) {
                        self.publish_stream(parent.0, text).await;
                    }
                    last_sent = Some(tokio::time::Instant::now());
                    continue;
                }
                reply = self.stdin_replies.recv() => {
                    if let Some(reply) = reply
                        && reply.header.msg_type == "input_reply" {
                            let value = reply.content.get("value").and_then(Value::as_str).map(str::to_owned);
                            self.sandbox.input_reply(value);
                        }
                    continue;
                }
            };
            let Some((parent, count)) = parent else {
                if let Event::Done(outcome) = event {
                    return Ok(outcome);
                }
                continue;
            };
            match event {
                Event::Stream { name, text } => {
                    match &mut held {
                        Some((held_name, held_text)) if *held_name == name => {
                            held_text.push_str(&text);
                        }
                        _ => {
                            if let Some(previous) = held.replace((name, text)) {
                                self.publish_stream(parent, previous).await;
                            }
                        }
                    }
                    let quiet = last_sent.is_none_or(|at| at.elapsed() >= STREAM_INTERVAL);
                    let big = held.as_ref().is_some_and(|(_, t)| t.len() >= STREAM_BATCH);
                    if (quiet || big)
                        && let Some(text) = held.take()
                    {
                        self.publish_stream(parent, text).await;
                        last_sent = Some(tokio::time::Instant::now());
                    }
                }
                event => {
                    if let Some(text) = held.take() {
                        self.publish_stream(parent, text).await;
                    }
                    if let Event::Done(outcome) = event {
                        return Ok(self.finish(outcome, Some((parent, count)), output));
                    }
                    self.forward(parent, count, event, &mut output).await;
                }
            }
        }
    }

    async fn publish_stream(&self, parent: &Message, (name, text): (StreamName, String)) {
        self.messenger
            .publish(
                parent,
                "stream",
                json!({"name": name.as_str(), "text": text}),
            )
            .await;
    }

    /// Records a cell's text result in the history and hands back its outcome.
    fn finish(
        &mut self,
        outcome: Outcome,
        parent: Option<(&Message, u64)>,
        output: String,
    ) -> Outcome {
        if let Some((_, count)) = parent
            && !output.is_empty()
            && let Some(entry) = self.history.iter_mut().rev().find(|e| e.line == count)
        {
            entry.output = Some(output);
        }
        outcome
    }

    /// Publishes one event other than stream text (see [`Executor::run_in_sandbox`]).
    async fn forward(&mut self, parent: &Message, count: u64, event: Event, output: &mut String) {
        let m = &self.messenger;
        match event {
            Event::Iopub {
                msg_type,
                mut content,
                metadata,
                buffers,
            } => {
                if msg_type == "execute_result" {
                    content["execution_count"] = json!(count);
                    if let Some(text) = content["data"]["text/plain"].as_str() {
                        output.clear();
                        output.extend(text.chars().take(HISTORY_OUTPUT_CHARS));
                    }
                }
                m.publish_with(parent, msg_type, content, metadata, buffers)
                    .await;
            }
            // `run_in_sandbox` handles stream text and `Done` itself and never passes them here.
            Event::Stream { .. } | Event::Done(_) => {}
            Event::InputRequest { prompt, password } => {
                let allowed = parent
                    .content
                    .get("allow_stdin")
                    .and_then(Value::as_bool)
                    .unwrap_or(false);
                if !allowed {
                    self.sandbox.input_reply(None);
                    return;
                }
                let mut msg = m.make(
                    parent,
                    "input_request",
                    json!({"prompt": prompt, "password": password}),
                );
                msg.identities = parent.identities.clone();
                self.stdin.send(wire::serialize(&msg, &m.signer)).await;
            }
        }
    }

    /// Runs a cell; true if it failed.
    async fn execute(&mut self, msg: &Arc<Message>) -> bool {
        let m = self.messenger.clone();
        let code = msg
            .content
            .get("code")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned();
        let silent = msg
            .content
            .get("silent")
            .and_then(Value::as_bool)
            .unwrap_or(false);
        let store = msg
            .content
            .get("store_history")
            .and_then(Value::as_bool)
            .unwrap_or(true)
            && !silent;
        if store {
            self.count += 1;
        }
        let count = self.count.max(1);
        if !silent {
            m.publish(
                msg,
                "execute_input",
                json!({"code": code, "execution_count": count}),
            )
            .await;
        }
        if store {
            self.history.push(HistoryEntry {
                line: count,
                input: code.clone(),
                output: None,
            });
        }
        let request = json!({
            "kind": "execute",
            "code": code,
            "silent": silent,
            "store_history": store,
            "user_expressions": msg.content.get("user_expressions").cloned().unwrap_or(json!({})),
            "allow_stdin": msg.content.get("allow_stdin").and_then(Value::as_bool).unwrap_or(false),
            "execution_count": count,
            // E2B's structured results (`e2b/chart`, `e2b/data`) in this request's displays:
            // asked for in the request's metadata by the gateway's E2B-compatible API.
            "e2b": msg.metadata.get(wire::E2B_METADATA_KEY).and_then(Value::as_bool).unwrap_or(false),
        });
        let outcome = self
            .run_in_sandbox(request, true, Some((msg, count)), Some(msg.clone()))
            .await;
        let mut reply = match outcome {
            Ok(Outcome::Reply(reply)) => reply,
            Ok(Outcome::Restarted { reason }) => {
                let evalue = format!(
                    "{reason}. A fresh interpreter was started: variables and imports from earlier cells are gone."
                );
                let error = json!({"ename": "InterpreterRestarted", "evalue": evalue,
                                   "traceback": [format!("InterpreterRestarted: {evalue}")]});
                m.publish(msg, "error", error.clone()).await;
                let mut r = error;
                r["status"] = json!("error");
                r
            }
            Err(e) => {
                let error =
                    json!({"ename": "KernelError", "evalue": e.to_string(), "traceback": []});
                m.publish(msg, "error", error.clone()).await;
                let mut r = error;
                r["status"] = json!("error");
                r
            }
        };
        let failed = reply["status"] != "ok";
        reply["execution_count"] = json!(count);
        if reply.get("user_expressions").is_none() {
            reply["user_expressions"] = json!({});
        }
        if reply.get("payload").is_none() {
            reply["payload"] = json!([]);
        }
        m.reply(&self.shell, msg, "execute_reply", reply).await;
        failed
    }

    /// A frontend's `comm_open`, `comm_msg` or `comm_close`, handed whole (its binary buffers
    /// in base64) to the guest's comm manager, as ipykernel hands it to its own: a
    /// `comm_open` runs its target's function (or, for an unknown target, is answered with a
    /// `comm_close`), a `comm_msg` or `comm_close` its comm's `on_msg` or `on_close` callback.
    /// Like a cell, it may be interrupted and runs under the cell limits; what the handlers
    /// print or display, and the comm messages they send, have this message as their parent.
    /// A handler's exception is shown on stderr and the kernel carries on. There is no reply.
    async fn comm(&mut self, msg: &Message) {
        use base64::Engine;
        let buffers: Vec<String> = msg
            .buffers
            .iter()
            .map(|b| base64::engine::general_purpose::STANDARD.encode(b))
            .collect();
        let request = json!({
            "kind": "comm",
            "header": header_value(msg),
            "parent_header": msg.parent_header,
            "metadata": msg.metadata,
            "content": msg.content,
            "buffers": buffers,
        });
        let count = self.count;
        let (ename, evalue) = match self
            .run_in_sandbox(request, true, Some((msg, count)), None)
            .await
        {
            Ok(Outcome::Reply(_)) => return,
            Ok(Outcome::Restarted { reason }) => (
                "InterpreterRestarted",
                format!(
                    "{reason}. A fresh interpreter was started: variables, imports and comms \
                     from earlier cells are gone."
                ),
            ),
            Err(e) => ("KernelError", e.to_string()),
        };
        let traceback = [format!("{ename}: {evalue}")];
        let error = json!({"ename": ename, "evalue": evalue, "traceback": traceback});
        self.messenger.publish(msg, "error", error).await;
    }

    fn history_reply(&self, content: &Value) -> Value {
        let output = content
            .get("output")
            .and_then(Value::as_bool)
            .unwrap_or(false);
        let kind = content
            .get("hist_access_type")
            .and_then(Value::as_str)
            .unwrap_or("tail");
        let n = content.get("n").and_then(Value::as_u64).map(|n| n as usize);
        let entry = |e: &HistoryEntry| {
            if output {
                json!([1, e.line, [e.input, e.output]])
            } else {
                json!([1, e.line, e.input])
            }
        };
        let items: Vec<Value> = match kind {
            "range" => {
                let start = content.get("start").and_then(Value::as_u64).unwrap_or(0);
                let stop = content
                    .get("stop")
                    .and_then(Value::as_u64)
                    .unwrap_or(u64::MAX);
                self.history
                    .iter()
                    .filter(|e| e.line >= start && e.line < stop)
                    .map(entry)
                    .collect()
            }
            "search" => {
                let pattern = content
                    .get("pattern")
                    .and_then(Value::as_str)
                    .unwrap_or("*");
                let unique = content
                    .get("unique")
                    .and_then(Value::as_bool)
                    .unwrap_or(false);
                let mut seen = std::collections::HashSet::new();
                let mut hits: Vec<&HistoryEntry> = self
                    .history
                    .iter()
                    .rev()
                    .filter(|e| glob(pattern, &e.input))
                    .filter(|e| !unique || seen.insert(e.input.clone()))
                    .collect();
                if let Some(n) = n {
                    hits.truncate(n);
                }
                hits.reverse();
                hits.into_iter().map(entry).collect()
            }
            _ => {
                let n = n.unwrap_or(10);
                let skip = self.history.len().saturating_sub(n);
                self.history.iter().skip(skip).map(entry).collect()
            }
        };
        json!({"status": "ok", "history": items})
    }
}

/// A request's header as JSON (for the guest's `get_parent()`).
fn header_value(msg: &Message) -> Value {
    serde_json::to_value(&msg.header).unwrap_or_else(|_| json!({}))
}

/// Shell-style glob (`*`, `?`) over the whole string, as IPython's history search uses.
fn glob(pattern: &str, text: &str) -> bool {
    let p: Vec<char> = pattern.chars().collect();
    let t: Vec<char> = text.chars().collect();
    let (mut pi, mut ti) = (0, 0);
    let (mut star, mut mark) = (None, 0);
    while ti < t.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == t[ti]) {
            pi += 1;
            ti += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some(pi);
            mark = ti;
            pi += 1;
        } else if let Some(s) = star {
            pi = s + 1;
            mark += 1;
            ti = mark;
        } else {
            return false;
        }
    }
    while pi < p.len() && p[pi] == '*' {
        pi += 1;
    }
    pi == p.len()
}

#[cfg(test)]
mod tests {
    use super::glob;

    #[test]
    fn glob_matches_like_sqlite() {
        assert!(glob("1?2*", "1+2+3"));
        assert!(glob("*", ""));
        assert!(glob("a*c", "abbbc"));
        assert!(!glob("a*c", "abbb"));
        assert!(!glob("1?2*", "12"));
    }
}
