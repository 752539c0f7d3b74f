//! One kernel as the gateway sees it: its id and model, the process behind it (replaced on
//! restart), the WebSocket clients attached to it, and the routing of the kernel's messages to
//! them.
//!
//! Routing: iopub goes to every client; a reply on shell, control or stdin goes only to the
//! client whose request is its parent (`parent_header.msg_id`). Each client has a mailbox keyed
//! by its `session_id`; when the client disconnects, its mailbox keeps collecting (bounded, for
//! [`DETACHED_FOR`]) so a client that reconnects with the same `session_id` gets what it missed,
//! as Jupyter Server does.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use sandgate_wire::RawMessage;
use serde_json::{Value, json};
use tokio::sync::{mpsc, oneshot, watch};

use crate::client::{self, Channel, Process};

/// Messages a client may have queued before the gateway waits for it.
pub const CLIENT_QUEUE: usize = 1024;
/// How long the gateway waits for a client whose queue is full before disconnecting it.
pub const SLOW_CLIENT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a disconnected client's mailbox keeps collecting messages.
pub const DETACHED_FOR: Duration = Duration::from_secs(60);
/// Most messages a disconnected client's mailbox keeps (oldest dropped first).
pub const DETACHED_MESSAGES: usize = 1000;
/// Most bytes a disconnected client's mailbox keeps.
pub const DETACHED_BYTES: usize = 32 << 20;
/// Most outstanding requests remembered for routing replies (oldest forgotten first).
const ROUTES: usize = 10_000;
/// Client shell requests queued in the gateway (behind a `%%ask`, say) before clients wait.
const SHELL_QUEUE: usize = 1024;

/// A client's shell request on its way to the kernel (or to the shell hook).
pub struct ShellItem {
    /// The client's session (where the reply goes).
    pub session: String,
    /// The message.
    pub message: RawMessage,
    /// Its `msg_type`.
    pub msg_type: String,
}

/// The iopub rate limit per kernel, as Jupyter Server has it: output messages (streams,
/// displays, results) beyond a rate over a sliding window are dropped, and clients are told
/// once when output stops and once when it resumes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimit {
    /// Output messages per second.
    pub messages_per_s: u64,
    /// Output bytes per second.
    pub bytes_per_s: u64,
    /// The window the rates are averaged over.
    pub window: Duration,
}

/// What the limiter decided for one message.
enum Admit {
    Yes,
    No,
    NoAndTell(String),
    YesAndTell(String),
}

struct Limiter {
    limit: RateLimit,
    seen: VecDeque<(Instant, usize)>,
    bytes: usize,
    limited: bool,
}

impl Limiter {
    fn admit(&mut self, size: usize) -> Admit {
        let now = Instant::now();
        while self
            .seen
            .front()
            .is_some_and(|(t, _)| now.duration_since(*t) > self.limit.window)
        {
            if let Some((_, b)) = self.seen.pop_front() {
                self.bytes -= b;
            }
        }
        let secs = self.limit.window.as_secs_f64().max(0.001);
        let over = (self.seen.len() + 1) as f64 / secs > self.limit.messages_per_s as f64
            || (self.bytes + size) as f64 / secs > self.limit.bytes_per_s as f64;
        if over {
            // Dropped messages do not count: the rate measures what clients get.
            if self.limited {
                return Admit::No;
            }
            self.limited = true;
            return Admit::NoAndTell(format!(
                "IOPub rate exceeded: the gateway stops sending this kernel's output to clients \
                 for a moment so they are not overwhelmed (limits: {} messages/s, {} bytes/s \
                 over {} s; see kernels.iopub_msg_rate_limit and iopub_data_rate_limit).\n",
                self.limit.messages_per_s,
                self.limit.bytes_per_s,
                self.limit.window.as_secs()
            ));
        }
        self.seen.push_back((now, size));
        self.bytes += size;
        if self.limited {
            self.limited = false;
            return Admit::YesAndTell("IOPub rate back under the limit: output resumes.\n".into());
        }
        Admit::Yes
    }
}

/// What happens to the iopub messages of a request the gateway made.
#[derive(Clone)]
struct Internal {
    /// `Some(parent)`: outputs are shown under this client request instead; `None`: hidden.
    reparent: Option<bytes::Bytes>,
    /// Told when the request's `idle` status arrives.
    idle: Arc<tokio::sync::Notify>,
}

/// A client request a [`super::ShellHook`] serves.
#[derive(Debug, Clone)]
pub struct ClientRequest {
    /// The client's session (where the reply goes).
    pub session: String,
    /// The request's header, as the client sent it (the parent of everything it causes).
    pub header: bytes::Bytes,
    /// Its content.
    pub content: Value,
}

/// A message on its way to a client.
#[derive(Debug, Clone)]
pub struct Outgoing {
    /// The channel it came on.
    pub channel: Channel,
    /// The message.
    pub message: Arc<RawMessage>,
}

impl Outgoing {
    fn size(&self) -> usize {
        let m = &self.message;
        m.header.len()
            + m.parent_header.len()
            + m.metadata.len()
            + m.content.len()
            + m.buffers.iter().map(|b| b.len()).sum::<usize>()
    }
}

/// The kernel's execution state, as the REST model reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExecutionState {
    /// Launching.
    Starting,
    /// Waiting for requests.
    Idle,
    /// Handling a request.
    Busy,
    /// Being restarted.
    Restarting,
    /// Gone and not coming back.
    Dead,
}

impl ExecutionState {
    /// The string Jupyter uses.
    pub fn as_str(self) -> &'static str {
        match self {
            ExecutionState::Starting => "starting",
            ExecutionState::Idle => "idle",
            ExecutionState::Busy => "busy",
            ExecutionState::Restarting => "restarting",
            ExecutionState::Dead => "dead",
        }
    }
}

/// What the kernel's process is expected to do next, so a deliberate exit is not mistaken for
/// a crash.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Expect {
    /// Keep running; an exit is a crash and triggers an automatic restart.
    Running,
    /// A client asked it to shut down (with `restart`).
    Exit {
        /// Whether the client asked for a restart.
        restart: bool,
    },
}

pub(crate) struct State {
    pub execution_state: ExecutionState,
    pub last_activity: DateTime<Utc>,
    pub connections: usize,
    pub expect: Expect,
    /// When automatic restarts happened, for the restart limit.
    pub restarts: VecDeque<Instant>,
}

/// A client's place to receive messages.
struct Mailbox {
    live: Option<Live>,
    buffer: VecDeque<Outgoing>,
    buffered_bytes: usize,
    dropped: u64,
    detached_at: Option<Instant>,
}

#[derive(Clone)]
struct Live {
    conn: u64,
    tx: mpsc::Sender<Outgoing>,
    kick: watch::Sender<Option<String>>,
}

impl Mailbox {
    fn push_detached(&mut self, out: Outgoing) {
        self.buffered_bytes += out.size();
        self.buffer.push_back(out);
        while self.buffer.len() > DETACHED_MESSAGES || self.buffered_bytes > DETACHED_BYTES {
            match self.buffer.pop_front() {
                Some(old) => {
                    self.buffered_bytes -= old.size();
                    self.dropped += 1;
                }
                None => break,
            }
        }
    }
}

/// Remembered requests: `msg_id` → the session whose client sent it.
#[derive(Default)]
struct Routes {
    by_id: HashMap<String, String>,
    order: VecDeque<String>,
}

impl Routes {
    fn insert(&mut self, msg_id: String, session: String) {
        if self.by_id.insert(msg_id.clone(), session).is_none() {
            self.order.push_back(msg_id);
        }
        while self.order.len() > ROUTES {
            if let Some(old) = self.order.pop_front() {
                self.by_id.remove(&old);
            }
        }
    }

    fn get(&self, msg_id: &str) -> Option<&String> {
        self.by_id.get(msg_id)
    }

    fn remove(&mut self, msg_id: &str) {
        // The order queue is trimmed lazily: stale ids in it cost a few bytes until evicted.
        self.by_id.remove(msg_id);
    }
}

/// A client attached to a kernel: what it reads, and how it learns it was disconnected.
pub struct Attachment {
    /// Messages for the client, in order.
    pub rx: mpsc::Receiver<Outgoing>,
    /// Becomes `Some(reason)` when the gateway closes this client.
    pub kicked: watch::Receiver<Option<String>>,
    /// This attachment's id.
    pub conn: u64,
    /// The session key it is attached under.
    pub session: String,
}

/// A kernel: id, model, current process and clients.
pub struct Kernel {
    /// The kernel id (a UUID, unguessable).
    pub id: uuid::Uuid,
    /// Its kernelspec name.
    pub name: String,
    /// The user it belongs to.
    pub owner: String,
    pub(crate) state: Mutex<State>,
    process: watch::Sender<Option<Arc<Process>>>,
    mailboxes: Mutex<HashMap<String, Mailbox>>,
    routes: Mutex<Routes>,
    waiters: Mutex<HashMap<String, oneshot::Sender<RawMessage>>>,
    /// The gateway's own requests whose iopub is hidden from clients or re-parented.
    internal: Mutex<HashMap<String, Internal>>,
    next_conn: AtomicU64,
    /// Client shell requests, in order, for the forwarder (see [`Kernel::start_forwarder`]).
    shell_queue: mpsc::Sender<ShellItem>,
    shell_rx: Mutex<Option<mpsc::Receiver<ShellItem>>>,
    /// Counts interrupts requested (by REST or by a client's `interrupt_request`).
    interrupts: watch::Sender<u64>,
    /// The last `execution_count` the kernel replied with.
    last_count: AtomicU64,
    observer: Arc<dyn super::Observer>,
    hook: Option<Arc<dyn super::ShellHook>>,
    rate: Mutex<Limiter>,
    /// Serialises restarts and shutdowns.
    pub(crate) lifecycle: tokio::sync::Mutex<()>,
    /// The session id of messages the gateway makes up (status on restart).
    session: String,
}

impl std::fmt::Debug for Kernel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Kernel").field("id", &self.id).finish()
    }
}

/// The timestamp format Jupyter's gateway client parses: microseconds and `Z`.
pub fn timestamp(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
}

impl Kernel {
    pub(crate) fn new(
        id: uuid::Uuid,
        name: String,
        owner: String,
        observer: Arc<dyn super::Observer>,
        hook: Option<Arc<dyn super::ShellHook>>,
        rate: RateLimit,
    ) -> Kernel {
        let (shell_queue, shell_rx) = mpsc::channel(SHELL_QUEUE);
        Kernel {
            id,
            name,
            owner,
            state: Mutex::new(State {
                execution_state: ExecutionState::Starting,
                last_activity: Utc::now(),
                connections: 0,
                expect: Expect::Running,
                restarts: VecDeque::new(),
            }),
            process: watch::channel(None).0,
            mailboxes: Mutex::default(),
            routes: Mutex::default(),
            waiters: Mutex::default(),
            internal: Mutex::default(),
            next_conn: AtomicU64::new(1),
            shell_queue,
            shell_rx: Mutex::new(Some(shell_rx)),
            interrupts: watch::channel(0).0,
            last_count: AtomicU64::new(0),
            observer,
            hook,
            rate: Mutex::new(Limiter {
                limit: rate,
                seen: VecDeque::new(),
                bytes: 0,
                limited: false,
            }),
            lifecycle: tokio::sync::Mutex::new(()),
            session: uuid::Uuid::new_v4().to_string(),
        }
    }

    pub(crate) fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The REST model: `id`, `name`, `last_activity`, `execution_state`, `connections`.
    pub fn model(&self) -> Value {
        let s = self.lock();
        json!({
            "id": self.id.to_string(),
            "name": self.name,
            "last_activity": timestamp(s.last_activity),
            "execution_state": s.execution_state.as_str(),
            "connections": s.connections,
        })
    }

    /// The current execution state.
    pub fn execution_state(&self) -> ExecutionState {
        self.lock().execution_state
    }

    pub(crate) fn touch(&self) {
        self.lock().last_activity = Utc::now();
    }

    pub(crate) fn set_state(&self, state: ExecutionState) {
        self.lock().execution_state = state;
    }

    /// The process now behind this kernel, if one is running.
    pub fn process(&self) -> Option<Arc<Process>> {
        self.process.borrow().clone()
    }

    pub(crate) fn set_process(&self, process: Option<Arc<Process>>) -> Option<Arc<Process>> {
        self.process.send_replace(process)
    }

    /// Waits up to `timeout` for a running process (one is being started or restarted).
    pub async fn wait_process(&self, timeout: Duration) -> Option<Arc<Process>> {
        let mut rx = self.process.subscribe();
        let found = tokio::time::timeout(timeout, rx.wait_for(|p| p.is_some())).await;
        match found {
            Ok(Ok(p)) => p.clone(),
            _ => None,
        }
    }

    /// Attaches a client under `session_id` (or a fresh key if none). A client that reconnects
    /// with the session id of a detached mailbox first gets what was kept for it. If another
    /// client is live on the same session id, that one is closed (the newest wins).
    pub fn attach(&self, session_id: Option<&str>) -> Attachment {
        let conn = self.next_conn.fetch_add(1, Ordering::Relaxed);
        let session = match session_id {
            Some(s) if !s.is_empty() => s.to_owned(),
            _ => format!("anonymous-{conn}-{}", uuid::Uuid::new_v4().simple()),
        };
        let (tx, rx) = mpsc::channel(CLIENT_QUEUE + DETACHED_MESSAGES);
        let (kick, kicked) = watch::channel(None);
        let mut boxes = self.mailboxes.lock().unwrap_or_else(|e| e.into_inner());
        let mailbox = boxes.entry(session.clone()).or_insert_with(|| Mailbox {
            live: None,
            buffer: VecDeque::new(),
            buffered_bytes: 0,
            dropped: 0,
            detached_at: None,
        });
        if let Some(old) = mailbox.live.take() {
            let _ = old
                .kick
                .send(Some("another connection took over this session".into()));
        }
        if mailbox.dropped > 0 {
            tracing::warn!(
                kernel = %self.id,
                dropped = mailbox.dropped,
                "a reconnecting client missed messages its mailbox could not keep"
            );
        }
        // The channel has room for the whole detached buffer, so this never blocks.
        for out in mailbox.buffer.drain(..) {
            let _ = tx.try_send(out);
        }
        mailbox.buffered_bytes = 0;
        mailbox.dropped = 0;
        mailbox.detached_at = None;
        mailbox.live = Some(Live { conn, tx, kick });
        drop(boxes);
        let mut s = self.lock();
        s.connections += 1;
        s.last_activity = Utc::now();
        Attachment {
            rx,
            kicked,
            conn,
            session,
        }
    }

    /// Detaches a client. Its mailbox keeps collecting for [`DETACHED_FOR`].
    pub fn detach(&self, attachment: &Attachment) {
        let mut boxes = self.mailboxes.lock().unwrap_or_else(|e| e.into_inner());
        let mut was_live = false;
        if let Some(mailbox) = boxes.get_mut(&attachment.session)
            && mailbox
                .live
                .as_ref()
                .is_some_and(|l| l.conn == attachment.conn)
        {
            mailbox.live = None;
            mailbox.detached_at = Some(Instant::now());
            was_live = true;
        }
        drop(boxes);
        let mut s = self.lock();
        s.connections = s.connections.saturating_sub(1);
        if !was_live {
            tracing::debug!(kernel = %self.id, conn = attachment.conn, "detached a replaced client");
        }
    }

    /// Forgets detached mailboxes older than [`DETACHED_FOR`].
    pub(crate) fn expire_mailboxes(&self) {
        let mut boxes = self.mailboxes.lock().unwrap_or_else(|e| e.into_inner());
        boxes.retain(|_, m| {
            m.live.is_some() || m.detached_at.is_some_and(|t| t.elapsed() < DETACHED_FOR)
        });
    }

    /// Closes every client with `reason` (the kernel is going away).
    pub(crate) fn kick_all(&self, reason: &str) {
        let mut boxes = self.mailboxes.lock().unwrap_or_else(|e| e.into_inner());
        for mailbox in boxes.values_mut() {
            if let Some(live) = mailbox.live.take() {
                let _ = live.kick.send(Some(reason.to_owned()));
            }
        }
        boxes.clear();
    }

    /// Sends a client's message to the kernel, remembering who asked so the reply finds them.
    /// Waits (up to `timeout`) for a process if the kernel is restarting.
    pub async fn send_from_client(
        &self,
        session: &str,
        channel: Channel,
        message: RawMessage,
        msg_id: Option<String>,
        msg_type: &str,
        timeout: Duration,
    ) -> Result<(), client::ClientError> {
        if let Some(id) = msg_id
            && matches!(channel, Channel::Shell | Channel::Control)
        {
            self.routes
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(id, session.to_owned());
        }
        if msg_type == "shutdown_request" {
            let restart = serde_json::from_slice::<Value>(&message.content)
                .ok()
                .and_then(|c| c.get("restart").and_then(Value::as_bool))
                .unwrap_or(false);
            self.lock().expect = Expect::Exit { restart };
        }
        if msg_type == "interrupt_request" {
            self.note_interrupt();
        }
        self.touch();
        if channel == Channel::Shell {
            let item = ShellItem {
                session: session.to_owned(),
                message,
                msg_type: msg_type.to_owned(),
            };
            return self
                .shell_queue
                .send(item)
                .await
                .map_err(|_| client::ClientError::Gone);
        }
        let process = match self.process() {
            Some(p) => p,
            None => self
                .wait_process(timeout)
                .await
                .ok_or(client::ClientError::Gone)?,
        };
        process.send(channel, &message).await
    }

    /// Records that an interrupt was asked for (a `%%ask` in progress stops on it).
    pub fn note_interrupt(&self) {
        self.interrupts.send_modify(|n| *n += 1);
    }

    /// Interrupt requests, counted.
    pub fn interrupts(&self) -> watch::Receiver<u64> {
        self.interrupts.subscribe()
    }

    /// The last `execution_count` the kernel replied with.
    pub fn last_execution_count(&self) -> u64 {
        self.last_count.load(Ordering::Relaxed)
    }

    /// Starts the task that hands client shell requests to the kernel in order, giving the
    /// ones the shell hook claims (`%%ask`) to it instead; the queue waits while it serves
    /// them, as a kernel's own queue waits behind a running cell.
    pub(crate) fn start_forwarder(self: &Arc<Self>, wait: Duration) {
        let Some(mut rx) = self
            .shell_rx
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
        else {
            return;
        };
        let weak = Arc::downgrade(self);
        tokio::spawn(async move {
            while let Some(item) = rx.recv().await {
                let Some(kernel) = weak.upgrade() else { return };
                let claimed = item.msg_type == "execute_request"
                    && kernel
                        .hook
                        .as_ref()
                        .is_some_and(|h| h.claims(&item.message.content));
                if claimed && let Some(hook) = kernel.hook.clone() {
                    let content =
                        serde_json::from_slice(&item.message.content).unwrap_or(Value::Null);
                    let stop_on_error = content["stop_on_error"].as_bool().unwrap_or(true);
                    let request = ClientRequest {
                        session: item.session,
                        header: item.message.header.clone(),
                        content,
                    };
                    let failed = hook.serve(kernel.clone(), request).await;
                    if failed && stop_on_error {
                        // As a kernel does after a failed cell: what was queued behind it is
                        // aborted, not run.
                        while let Ok(queued) = rx.try_recv() {
                            if queued.msg_type == "execute_request" {
                                kernel.abort(&queued).await;
                            } else {
                                kernel.forward(queued, wait).await;
                            }
                        }
                    }
                    continue;
                }
                kernel.forward(item, wait).await;
            }
        });
    }

    async fn forward(&self, item: ShellItem, wait: Duration) {
        let process = match self.process() {
            Some(p) => p,
            None => match self.wait_process(wait).await {
                Some(p) => p,
                None => {
                    tracing::warn!(kernel = %self.id, msg_type = item.msg_type, "no kernel process to take a request; dropped");
                    return;
                }
            },
        };
        if let Err(e) = process.send(Channel::Shell, &item.message).await {
            tracing::warn!(kernel = %self.id, error = %e, "a request could not be sent to the kernel");
        }
    }

    /// Answers a queued execution with `aborted`, as a kernel does after an error.
    async fn abort(self: &Arc<Self>, item: &ShellItem) {
        let content = json!({"status": "aborted", "execution_count": self.last_execution_count()});
        let parent = item.message.header.clone();
        self.publish(&parent, "status", json!({"execution_state": "busy"}))
            .await;
        self.reply(&item.session, &parent, "execute_reply", content)
            .await;
        self.publish(&parent, "status", json!({"execution_state": "idle"}))
            .await;
    }

    /// Publishes an iopub message the gateway makes, as a child of `parent` (a client request's
    /// header), to every client; the observer (history) sees it like a kernel's.
    pub async fn publish(self: &Arc<Self>, parent: &bytes::Bytes, msg_type: &str, content: Value) {
        let header = client::header(msg_type, &self.session);
        let mut message = client::own_message(&header, &content);
        message.parent_header = parent.clone();
        // Gateway-made iopub never asks the observer to wait (only shell replies do).
        let _ = self.observer.message(self, Channel::Iopub, &message);
        self.deliver_all(Outgoing {
            channel: Channel::Iopub,
            message: Arc::new(message),
        })
        .await;
    }

    /// Sends a shell reply the gateway makes to the client of `session`.
    pub async fn reply(
        &self,
        session: &str,
        parent: &bytes::Bytes,
        msg_type: &str,
        content: Value,
    ) {
        let header = client::header(msg_type, &self.session);
        let mut message = client::own_message(&header, &content);
        message.parent_header = parent.clone();
        self.deliver_to(
            session,
            Outgoing {
                channel: Channel::Shell,
                message: Arc::new(message),
            },
        )
        .await;
    }

    /// Runs `content` as an `execute_request` the gateway makes. Its outputs are shown under
    /// `reparent` (a client request's header) or hidden; its `busy`/`idle` and `execute_input`
    /// are always hidden. Waits for the reply and for the kernel's `idle`, up to `timeout`.
    pub async fn execute_internal(
        &self,
        content: Value,
        reparent: Option<bytes::Bytes>,
        timeout: Duration,
    ) -> Option<Value> {
        let process = self.process()?;
        let header = client::header("execute_request", &self.session);
        let id = header["msg_id"].as_str().unwrap_or_default().to_owned();
        let idle = Arc::new(tokio::sync::Notify::new());
        self.internal
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(
                id.clone(),
                Internal {
                    reparent,
                    idle: idle.clone(),
                },
            );
        let (tx, rx) = oneshot::channel();
        self.waiters
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id.clone(), tx);
        let idle_seen = idle.notified();
        tokio::pin!(idle_seen);
        idle_seen.as_mut().enable();
        let reply = match process
            .send(Channel::Shell, &client::own_message(&header, &content))
            .await
        {
            Ok(()) => tokio::time::timeout(timeout, async {
                let reply = rx.await.ok();
                idle_seen.await;
                reply
            })
            .await
            .ok()
            .flatten(),
            Err(_) => None,
        };
        self.waiters
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&id);
        self.internal
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&id);
        reply.and_then(|m| serde_json::from_slice(&m.content).ok())
    }

    /// Applies the rules for the gateway's own requests to a kernel message: `None` hides it.
    pub(crate) fn rewrite(&self, channel: Channel, mut message: RawMessage) -> Option<RawMessage> {
        if channel != Channel::Iopub {
            return Some(message);
        }
        let parent = client::msg_id_of(&message.parent_header)?;
        let rule = self
            .internal
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&parent)
            .cloned();
        let Some(rule) = rule else {
            return Some(message);
        };
        let msg_type = client::msg_type_of(&message.header).unwrap_or_default();
        if msg_type == "status" {
            let idle = serde_json::from_slice::<Value>(&message.content)
                .is_ok_and(|c| c["execution_state"] == "idle");
            if idle {
                rule.idle.notify_one();
            }
            return None;
        }
        match rule.reparent {
            Some(target) if msg_type != "execute_input" => {
                message.parent_header = target;
                Some(message)
            }
            _ => None,
        }
    }

    /// Sends a request the gateway makes itself and waits up to `timeout` for its reply.
    pub async fn request(
        &self,
        channel: Channel,
        msg_type: &str,
        content: Value,
        timeout: Duration,
    ) -> Option<RawMessage> {
        let process = self.process()?;
        let header = client::header(msg_type, &self.session);
        let id = header["msg_id"].as_str().unwrap_or_default().to_owned();
        let (tx, rx) = oneshot::channel();
        self.waiters
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id.clone(), tx);
        let sent = process
            .send(channel, &client::own_message(&header, &content))
            .await;
        let reply = match sent {
            Ok(()) => tokio::time::timeout(timeout, rx)
                .await
                .ok()
                .and_then(Result::ok),
            Err(_) => None,
        };
        self.waiters
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&id);
        reply
    }

    /// Publishes a status message the gateway makes up (e.g. `restarting`, `dead`) to every
    /// client, as Jupyter Server does around restarts.
    pub(crate) async fn publish_status(&self, state: ExecutionState) {
        let header = client::header("status", &self.session);
        let message = client::own_message(&header, &json!({"execution_state": state.as_str()}));
        self.deliver_all(Outgoing {
            channel: Channel::Iopub,
            message: Arc::new(message),
        })
        .await;
    }

    /// Publishes a `stream` message the gateway makes up (a notice for the user) to every
    /// client, as a child of `parent_header` (so it shows under the cell it is about).
    pub async fn publish_stream(&self, parent_header: bytes::Bytes, name: &str, text: &str) {
        let header = client::header("stream", &self.session);
        let mut message = client::own_message(&header, &json!({"name": name, "text": text}));
        message.parent_header = parent_header;
        self.deliver_all(Outgoing {
            channel: Channel::Iopub,
            message: Arc::new(message),
        })
        .await;
    }

    /// Handles one message from the kernel process.
    pub(crate) async fn dispatch(&self, channel: Channel, message: RawMessage) {
        let msg_type = client::msg_type_of(&message.header).unwrap_or_default();
        if channel == Channel::Iopub {
            if msg_type == "status" {
                let state = serde_json::from_slice::<Value>(&message.content)
                    .ok()
                    .and_then(|c| c["execution_state"].as_str().map(str::to_owned));
                let mut s = self.lock();
                match state.as_deref() {
                    Some("busy") => s.execution_state = ExecutionState::Busy,
                    Some("idle") => s.execution_state = ExecutionState::Idle,
                    Some("starting") => s.execution_state = ExecutionState::Starting,
                    _ => {}
                }
                s.last_activity = Utc::now();
            } else {
                self.touch();
            }
            if matches!(
                msg_type.as_str(),
                "stream" | "display_data" | "update_display_data" | "execute_result"
            ) {
                let size =
                    message.content.len() + message.buffers.iter().map(|b| b.len()).sum::<usize>();
                let admitted = self
                    .rate
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .admit(size);
                match admitted {
                    Admit::Yes => {}
                    Admit::No => return,
                    Admit::NoAndTell(text) => {
                        self.publish_stream(message.parent_header.clone(), "stderr", &text)
                            .await;
                        return;
                    }
                    Admit::YesAndTell(text) => {
                        self.publish_stream(message.parent_header.clone(), "stderr", &text)
                            .await;
                    }
                }
            }
            self.deliver_all(Outgoing {
                channel,
                message: Arc::new(message),
            })
            .await;
            return;
        }
        self.touch();
        if channel == Channel::Shell
            && let Some(n) = serde_json::from_slice::<Value>(&message.content)
                .ok()
                .and_then(|c| c["execution_count"].as_u64())
        {
            self.last_count.store(n, Ordering::Relaxed);
        }
        let parent = client::msg_id_of(&message.parent_header);
        if let Some(parent) = &parent {
            let waiter = self
                .waiters
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(parent);
            if let Some(waiter) = waiter {
                let _ = waiter.send(message);
                return;
            }
        }
        let Some(parent) = parent else {
            tracing::debug!(kernel = %self.id, msg_type, "a kernel message without a parent");
            return;
        };
        let session = {
            let mut routes = self.routes.lock().unwrap_or_else(|e| e.into_inner());
            let session = routes.get(&parent).cloned();
            // A reply ends its request; stdin's input_request does not.
            if msg_type.ends_with("_reply") {
                routes.remove(&parent);
            }
            session
        };
        match session {
            Some(session) => {
                self.deliver_to(
                    &session,
                    Outgoing {
                        channel,
                        message: Arc::new(message),
                    },
                )
                .await
            }
            None => tracing::debug!(kernel = %self.id, msg_type, "no client waits for this reply"),
        }
    }

    async fn deliver_all(&self, out: Outgoing) {
        let live: Vec<Live> = {
            let mut boxes = self.mailboxes.lock().unwrap_or_else(|e| e.into_inner());
            let mut live = Vec::new();
            for mailbox in boxes.values_mut() {
                match &mailbox.live {
                    Some(l) => live.push(l.clone()),
                    None => mailbox.push_detached(out.clone()),
                }
            }
            live
        };
        for l in live {
            self.deliver_live(&l, out.clone()).await;
        }
    }

    async fn deliver_to(&self, session: &str, out: Outgoing) {
        let live = {
            let mut boxes = self.mailboxes.lock().unwrap_or_else(|e| e.into_inner());
            let Some(mailbox) = boxes.get_mut(session) else {
                return;
            };
            match &mailbox.live {
                Some(l) => l.clone(),
                None => {
                    mailbox.push_detached(out);
                    return;
                }
            }
        };
        self.deliver_live(&live, out).await;
    }

    /// Hands a message to a live client, waiting up to [`SLOW_CLIENT_TIMEOUT`] if its queue is
    /// full; a client that stays full that long is disconnected, so one stuck reader cannot
    /// make the gateway grow without bound or hold up the others for long.
    async fn deliver_live(&self, live: &Live, out: Outgoing) {
        match live.tx.try_send(out) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Closed(_)) => {}
            Err(mpsc::error::TrySendError::Full(out)) => {
                if live
                    .tx
                    .send_timeout(out, SLOW_CLIENT_TIMEOUT)
                    .await
                    .is_err()
                {
                    tracing::warn!(kernel = %self.id, conn = live.conn, "disconnecting a client that stopped reading");
                    let _ = live.kick.send(Some(format!(
                        "the client did not read its messages for {} s",
                        SLOW_CLIENT_TIMEOUT.as_secs()
                    )));
                }
            }
        }
    }
}
