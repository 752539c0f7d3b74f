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
    next_conn: AtomicU64,
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
    pub(crate) fn new(id: uuid::Uuid, name: String, owner: String) -> Kernel {
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
            next_conn: AtomicU64::new(1),
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
        self.touch();
        let process = match self.process() {
            Some(p) => p,
            None => self
                .wait_process(timeout)
                .await
                .ok_or(client::ClientError::Gone)?,
        };
        process.send(channel, &message).await
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
            self.deliver_all(Outgoing {
                channel,
                message: Arc::new(message),
            })
            .await;
            return;
        }
        self.touch();
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
