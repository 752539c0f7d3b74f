//! One kernel as the gateway sees it: its id and model, the process behind it (replaced on
//! restart), the WebSocket clients attached to it, and the routing of the kernel's messages to
//! them.
//!
//! Routing: iopub goes to every client; a reply on shell, control or stdin goes only to the
//! client whose request is its parent (`parent_header.msg_id`). A client is a session: its
//! `session_id` names a mailbox, which one of the session's open sockets reads (see
//! [`Mailbox`] for which one, when a session has several). When the session has no socket
//! open, its mailbox keeps collecting (bounded, for [`DETACHED_FOR`]) so a client that
//! reconnects with the same `session_id` gets what it missed, as Jupyter Server does. A request
//! is answered to its session, whichever of the session's sockets it came on, even one being
//! closed.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use sandgate_wire::RawMessage;
use serde_json::{Value, json};
use tokio::sync::{Notify, mpsc, oneshot, watch};

use crate::client::{self, Channel, Process};
use crate::envelope::{ExecState, KernelMessage, MsgType, Parent};

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
    pub msg_type: MsgType,
    /// Its `msg_id`.
    pub msg_id: Option<String>,
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

/// Where the messages of a request the gateway made go (see [`crate::exec`]): every message
/// whose parent is the request, on any channel, is handed to `to`. Its iopub outputs are also
/// shown to the kernel's clients under `show_under` (a client request's header) when set, and
/// hidden from them otherwise; its `busy`/`idle`, `execute_input` and reply never reach clients.
pub(crate) struct Tap {
    /// The execution's receiving end.
    pub(crate) to: mpsc::UnboundedSender<Arc<KernelMessage>>,
    /// Re-parent the outputs to this header (and what it says, read once) and show them to
    /// clients.
    pub(crate) show_under: Option<(bytes::Bytes, Parent)>,
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

/// A message on its way to a client, with its envelope (shared by every mailbox it is in).
pub type Outgoing = Arc<KernelMessage>;

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

/// One open WebSocket of a client session.
struct Socket {
    conn: u64,
    /// Told when this socket, as its session's primary, has messages to take.
    wake: Arc<Notify>,
    kick: watch::Sender<Option<Kick>>,
    /// Whether the client has sent anything on it.
    spoke: bool,
    /// Copies of what it took while it had not spoken (bounded like a detached mailbox): if
    /// it goes away without ever speaking, they are given to the session's next socket.
    provisional: VecDeque<Outgoing>,
    provisional_bytes: usize,
}

/// A client session's place to receive messages: its open sockets and what waits for them.
///
/// One socket at a time, the primary, takes the session's messages. A session's only socket
/// is its primary. When a second socket of the session opens, no socket is primary (messages
/// wait) until one of them speaks or all but one close: the socket that speaks becomes the
/// primary and the session's other sockets are closed, as stale. So a socket that opened last
/// but is never used (Jupyter Server's gateway client opens one for every browser WebSocket
/// that Chromium then abandons, and may not close it) neither takes the session's messages nor
/// closes the socket in use. What a socket took before it ever spoke goes back to the session
/// when it closes, for the next socket.
struct Mailbox {
    /// Open sockets, oldest first.
    sockets: Vec<Socket>,
    primary: Option<u64>,
    queue: VecDeque<Outgoing>,
    queued_bytes: usize,
    /// Messages dropped (oldest first) while no socket took them.
    dropped: u64,
    detached_at: Option<Instant>,
    /// Told when a full queue may have room again: the primary took messages, or no socket
    /// is primary any more (then nothing waits for room).
    space: Arc<Notify>,
    /// Sockets removed before they ever spoke: what they took was queued again then, so what
    /// they could not send must not be given back a second time.
    requeued: HashSet<u64>,
}

/// Drops messages from the front of `queue` while it is over the detached limits; returns how
/// many.
fn trim_front(queue: &mut VecDeque<Outgoing>, bytes: &mut usize) -> u64 {
    let mut dropped = 0;
    while queue.len() > DETACHED_MESSAGES || *bytes > DETACHED_BYTES {
        match queue.pop_front() {
            Some(old) => {
                *bytes -= old.size();
                dropped += 1;
            }
            None => break,
        }
    }
    dropped
}

impl Mailbox {
    fn new() -> Mailbox {
        Mailbox {
            sockets: Vec::new(),
            primary: None,
            queue: VecDeque::new(),
            queued_bytes: 0,
            dropped: 0,
            detached_at: None,
            space: Arc::new(Notify::new()),
            requeued: HashSet::new(),
        }
    }

    fn socket(&self, conn: u64) -> Option<&Socket> {
        self.sockets.iter().find(|s| s.conn == conn)
    }

    /// Queues a message. With a primary, a full queue hands the message back (the caller
    /// waits for room); without one, the oldest messages are dropped past the detached limits.
    fn offer(&mut self, out: Outgoing) -> Result<(), Outgoing> {
        if let Some(primary) = self.primary {
            if self.queue.len() >= CLIENT_QUEUE {
                return Err(out);
            }
            self.queued_bytes += out.size();
            self.queue.push_back(out);
            if let Some(s) = self.socket(primary) {
                s.wake.notify_one();
            }
            return Ok(());
        }
        self.queued_bytes += out.size();
        self.queue.push_back(out);
        self.dropped += trim_front(&mut self.queue, &mut self.queued_bytes);
        Ok(())
    }

    /// Adds a newly opened socket: the primary if it is the session's only one; otherwise no
    /// socket is primary until one speaks (returns `false` then).
    fn add(&mut self, socket: Socket) -> bool {
        let conn = socket.conn;
        self.sockets.push(socket);
        self.detached_at = None;
        if self.sockets.len() == 1 {
            self.make_primary(conn);
            true
        } else {
            self.primary = None;
            // A sender waiting for the old primary's room can queue now.
            self.space.notify_waiters();
            false
        }
    }

    fn make_primary(&mut self, conn: u64) {
        self.primary = Some(conn);
        if let Some(s) = self.socket(conn) {
            s.wake.notify_one();
        }
    }

    /// The queued messages, if `conn` is the primary and there are any, and how many were
    /// dropped before it took them.
    fn take(&mut self, conn: u64) -> Option<(Vec<Outgoing>, u64)> {
        if self.primary != Some(conn) || self.queue.is_empty() {
            return None;
        }
        let batch: Vec<Outgoing> = self.queue.drain(..).collect();
        self.queued_bytes = 0;
        if let Some(s) = self.sockets.iter_mut().find(|s| s.conn == conn)
            && !s.spoke
        {
            for out in &batch {
                s.provisional_bytes += out.size();
                s.provisional.push_back(out.clone());
            }
            trim_front(&mut s.provisional, &mut s.provisional_bytes);
        }
        self.space.notify_waiters();
        Some((batch, std::mem::take(&mut self.dropped)))
    }

    /// Puts messages a socket took but could not send back in front of the queue.
    fn give_back(&mut self, conn: u64, unsent: Vec<Outgoing>) {
        // A socket that never spoke gives back all it took when it is removed (or was, already).
        if self.requeued.contains(&conn) || self.socket(conn).is_some_and(|s| !s.spoke) {
            return;
        }
        for out in unsent.into_iter().rev() {
            self.queued_bytes += out.size();
            self.queue.push_front(out);
        }
        if self.primary.is_none() {
            self.dropped += trim_front(&mut self.queue, &mut self.queued_bytes);
        } else if let Some(s) = self.primary.and_then(|p| self.socket(p)) {
            s.wake.notify_one();
        }
    }

    /// `conn` spoke: it becomes the primary, and the session's other sockets are removed
    /// (returned, to be closed).
    fn spoke(&mut self, conn: u64) -> Vec<Socket> {
        let alone = self.sockets.len() == 1 && self.primary == Some(conn);
        let Some(s) = self.sockets.iter_mut().find(|s| s.conn == conn) else {
            // A socket already removed (being closed): its requests still count, not it.
            return Vec::new();
        };
        if s.spoke && alone {
            return Vec::new();
        }
        s.spoke = true;
        s.provisional.clear();
        s.provisional_bytes = 0;
        let others: Vec<u64> = self
            .sockets
            .iter()
            .map(|s| s.conn)
            .filter(|&c| c != conn)
            .collect();
        let removed = others.into_iter().filter_map(|c| self.remove(c)).collect();
        self.make_primary(conn);
        removed
    }

    /// Removes a socket (it closed, or is being closed). One that never spoke gives back what
    /// it took, ahead of what was queued since. If one socket remains, it becomes the primary.
    fn remove(&mut self, conn: u64) -> Option<Socket> {
        let i = self.sockets.iter().position(|s| s.conn == conn)?;
        let mut socket = self.sockets.remove(i);
        if !socket.spoke {
            for out in socket.provisional.drain(..).rev() {
                self.queued_bytes += out.size();
                self.queue.push_front(out);
            }
            socket.provisional_bytes = 0;
            self.requeued.insert(conn);
        }
        if self.primary == Some(conn) {
            self.primary = None;
        }
        if self.primary.is_none()
            && let [only] = self.sockets.as_slice()
        {
            let only = only.conn;
            self.make_primary(only);
        }
        if self.primary.is_none() {
            self.dropped += trim_front(&mut self.queue, &mut self.queued_bytes);
        }
        if self.sockets.is_empty() {
            self.detached_at = Some(Instant::now());
        }
        // The queue may take more now (a new primary's, or a detached one's bounds).
        self.space.notify_waiters();
        Some(socket)
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

/// Why the gateway closes a client socket.
#[derive(Debug, Clone)]
pub struct Kick {
    /// The close frame's reason.
    pub reason: String,
    /// Whether what the client sent before it saw the close is still read and sent to the
    /// kernel (it is, unless the kernel is going away).
    pub drain: bool,
}

/// A client socket attached to a kernel: how it takes its session's messages (see
/// [`Kernel::next_batch`]) and learns it is being closed.
pub struct Attachment {
    /// Told when there may be messages for this socket.
    wake: Arc<Notify>,
    /// Becomes `Some` when the gateway closes this client.
    pub kicked: watch::Receiver<Option<Kick>>,
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
    waiters: Mutex<HashMap<String, oneshot::Sender<KernelMessage>>>,
    /// The gateway's own executions, by request id (see [`Tap`]).
    taps: Mutex<HashMap<String, Tap>>,
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
    /// A home folder its restarts keep (an E2B sandbox's); `None`: each process has its own.
    pinned_home: Mutex<Option<Arc<crate::home::Home>>>,
    /// Its life is managed elsewhere (an E2B sandbox's deadline): the idle culler leaves it.
    managed: std::sync::atomic::AtomicBool,
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
            taps: Mutex::default(),
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
            pinned_home: Mutex::new(None),
            managed: std::sync::atomic::AtomicBool::new(false),
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

    /// The home folder its restarts keep, if one was pinned.
    pub fn pinned_home(&self) -> Option<Arc<crate::home::Home>> {
        self.pinned_home
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Pins `home`: the processes that replace this one on restarts get it too.
    pub(crate) fn set_pinned_home(&self, home: Arc<crate::home::Home>) {
        *self.pinned_home.lock().unwrap_or_else(|e| e.into_inner()) = Some(home);
    }

    /// Marks the kernel's life as managed by its owner (an E2B sandbox, which ends at its own
    /// deadline): the idle culler leaves it alone.
    pub fn set_managed(&self) {
        self.managed.store(true, Ordering::Relaxed);
    }

    /// Whether [`Kernel::set_managed`] was called.
    pub fn is_managed(&self) -> bool {
        self.managed.load(Ordering::Relaxed)
    }

    /// Watches the process behind the kernel (replaced on restart, `None` when dead).
    pub(crate) fn process_watch(&self) -> watch::Receiver<Option<Arc<Process>>> {
        self.process.subscribe()
    }

    /// The session id of the messages the gateway makes for this kernel.
    pub(crate) fn own_session(&self) -> &str {
        &self.session
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

    /// Attaches a client socket under `session_id` (or a fresh key if none). A client that
    /// reconnects with the session id of a detached mailbox gets what was kept for it. A second
    /// socket of a session that has one open does not close it: see [`Mailbox`].
    pub fn attach(&self, session_id: Option<&str>) -> Attachment {
        let conn = self.next_conn.fetch_add(1, Ordering::Relaxed);
        let session = match session_id {
            Some(s) if !s.is_empty() => s.to_owned(),
            _ => format!("anonymous-{conn}-{}", uuid::Uuid::new_v4().simple()),
        };
        let wake = Arc::new(Notify::new());
        let (kick, kicked) = watch::channel(None);
        let mut boxes = self.mailboxes.lock().unwrap_or_else(|e| e.into_inner());
        let mailbox = boxes.entry(session.clone()).or_insert_with(Mailbox::new);
        let primary = mailbox.add(Socket {
            conn,
            wake: wake.clone(),
            kick,
            spoke: false,
            provisional: VecDeque::new(),
            provisional_bytes: 0,
        });
        if !primary {
            // Which socket the client uses is known when one speaks.
            tracing::debug!(kernel = %self.id, conn, sockets = mailbox.sockets.len(), "another socket of an open session; its messages wait until one speaks");
        }
        drop(boxes);
        let mut s = self.lock();
        s.connections += 1;
        s.last_activity = Utc::now();
        Attachment {
            wake,
            kicked,
            conn,
            session,
        }
    }

    /// Waits for messages for this socket: it gets them while it is its session's primary.
    /// Cancel-safe: messages are taken only when it returns.
    pub async fn next_batch(&self, attachment: &Attachment) -> Vec<Outgoing> {
        loop {
            // Created before looking, so a wake in between is not missed (it leaves a permit).
            let woken = attachment.wake.notified();
            {
                let mut boxes = self.mailboxes.lock().unwrap_or_else(|e| e.into_inner());
                if let Some(taken) = boxes
                    .get_mut(&attachment.session)
                    .and_then(|m| m.take(attachment.conn))
                {
                    let (batch, dropped) = taken;
                    if dropped > 0 {
                        tracing::warn!(kernel = %self.id, conn = attachment.conn, dropped, "a client missed messages its mailbox could not keep");
                    }
                    return batch;
                }
            }
            woken.await;
        }
    }

    /// Puts back messages a socket took from [`Kernel::next_batch`] but could not send.
    pub fn give_back(&self, attachment: &Attachment, unsent: Vec<Outgoing>) {
        let mut boxes = self.mailboxes.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(m) = boxes.get_mut(&attachment.session) {
            m.give_back(attachment.conn, unsent);
        }
    }

    /// The client sent a message on this socket: it becomes its session's primary, and the
    /// session's other sockets are closed as stale.
    pub fn spoke(&self, attachment: &Attachment) {
        let mut boxes = self.mailboxes.lock().unwrap_or_else(|e| e.into_inner());
        let Some(m) = boxes.get_mut(&attachment.session) else {
            return;
        };
        for stale in m.spoke(attachment.conn) {
            tracing::debug!(kernel = %self.id, conn = stale.conn, by = attachment.conn, "closing a stale socket of the session");
            let _ = stale.kick.send(Some(Kick {
                reason: "another connection of this session is in use".into(),
                drain: true,
            }));
        }
    }

    /// Detaches a client socket. When its session has no socket left, its mailbox keeps
    /// collecting for [`DETACHED_FOR`].
    pub fn detach(&self, attachment: &Attachment) {
        let mut boxes = self.mailboxes.lock().unwrap_or_else(|e| e.into_inner());
        let removed = boxes
            .get_mut(&attachment.session)
            .and_then(|m| m.remove(attachment.conn))
            .is_some();
        drop(boxes);
        let mut s = self.lock();
        s.connections = s.connections.saturating_sub(1);
        if !removed {
            tracing::debug!(kernel = %self.id, conn = attachment.conn, "detached a socket its session had already let go");
        }
    }

    /// Forgets detached mailboxes older than [`DETACHED_FOR`].
    pub(crate) fn expire_mailboxes(&self) {
        let mut boxes = self.mailboxes.lock().unwrap_or_else(|e| e.into_inner());
        boxes.retain(|_, m| {
            !m.sockets.is_empty() || m.detached_at.is_some_and(|t| t.elapsed() < DETACHED_FOR)
        });
    }

    /// Closes every client with `reason` (the kernel is going away).
    pub(crate) fn kick_all(&self, reason: &str) {
        let mut boxes = self.mailboxes.lock().unwrap_or_else(|e| e.into_inner());
        for mailbox in boxes.values_mut() {
            for socket in mailbox.sockets.drain(..) {
                let _ = socket.kick.send(Some(Kick {
                    reason: reason.to_owned(),
                    drain: false,
                }));
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
        msg_type: MsgType,
        timeout: Duration,
    ) -> Result<(), client::ClientError> {
        if let Some(id) = &msg_id
            && matches!(channel, Channel::Shell | Channel::Control)
        {
            self.routes
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(id.clone(), session.to_owned());
        }
        if msg_type == MsgType::ShutdownRequest {
            let restart = serde_json::from_slice::<Value>(&message.content)
                .ok()
                .and_then(|c| c.get("restart").and_then(Value::as_bool))
                .unwrap_or(false);
            self.lock().expect = Expect::Exit { restart };
        }
        if msg_type == MsgType::InterruptRequest {
            self.note_interrupt();
        }
        self.touch();
        if channel == Channel::Shell {
            let item = ShellItem {
                session: session.to_owned(),
                message,
                msg_type,
                msg_id,
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
                let claimed = item.msg_type == MsgType::ExecuteRequest
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
                            if queued.msg_type == MsgType::ExecuteRequest {
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
                    tracing::warn!(kernel = %self.id, msg_type = %item.msg_type, "no kernel process to take a request; dropped");
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

    /// A message the gateway makes, as a child of the request whose header is `parent`.
    fn made(
        &self,
        channel: Channel,
        msg_type: &str,
        content: &Value,
        parent: bytes::Bytes,
    ) -> KernelMessage {
        let header = client::header(msg_type, &self.session);
        KernelMessage::made(channel, &header, content, parent)
    }

    /// Publishes an iopub message the gateway makes, as a child of `parent` (a client request's
    /// header), to every client; the observer (history) sees it like a kernel's.
    pub async fn publish(self: &Arc<Self>, parent: &bytes::Bytes, msg_type: &str, content: Value) {
        let message = self.made(Channel::Iopub, msg_type, &content, parent.clone());
        // Gateway-made iopub never asks the observer to wait (only shell replies do).
        let _ = self.observer.message(self, &message);
        self.deliver_all(Arc::new(message)).await;
    }

    /// Sends a shell reply the gateway makes to the client of `session`.
    pub async fn reply(
        &self,
        session: &str,
        parent: &bytes::Bytes,
        msg_type: &str,
        content: Value,
    ) {
        let message = self.made(Channel::Shell, msg_type, &content, parent.clone());
        self.deliver_to(session, Arc::new(message)).await;
    }

    /// Starts handing the messages of request `id` to `tap` (before the request is sent).
    pub(crate) fn add_tap(&self, id: String, tap: Tap) {
        self.taps
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id, tap);
    }

    /// Stops handing the messages of request `id` anywhere; later ones are dropped.
    pub(crate) fn remove_tap(&self, id: &str) {
        self.taps
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(id);
    }

    /// Applies the rules of the gateway's own executions to an iopub message: a tapped
    /// request's message goes to its tap, and comes back (re-parented) only if the tap shows
    /// outputs to clients. `None` hides it.
    pub(crate) fn rewrite(&self, mut message: KernelMessage) -> Option<KernelMessage> {
        if message.channel != Channel::Iopub {
            return Some(message);
        }
        let show_under = {
            let parent = message.envelope.parent.msg_id.as_deref()?;
            let taps = self.taps.lock().unwrap_or_else(|e| e.into_inner());
            let Some(tap) = taps.get(parent) else {
                return Some(message);
            };
            // The message's parts are reference-counted: this copies no payload.
            let _ = tap.to.send(Arc::new(message.clone()));
            tap.show_under.clone()
        };
        // The gateway's own executions count too: the REST model shows the kernel busy while
        // they run, and the culler sees them as activity.
        self.note_activity(&message.envelope);
        match show_under {
            Some((header, parent))
                if !matches!(
                    message.envelope.msg_type,
                    MsgType::Status | MsgType::ExecuteInput
                ) =>
            {
                message.reparent(&header, &parent);
                Some(message)
            }
            _ => None,
        }
    }

    /// Follows the kernel's execution state and last activity from an iopub message.
    fn note_activity(&self, envelope: &crate::envelope::Envelope) {
        if envelope.msg_type != MsgType::Status {
            self.touch();
            return;
        }
        let mut s = self.lock();
        match envelope.state {
            Some(ExecState::Busy) => s.execution_state = ExecutionState::Busy,
            Some(ExecState::Idle) => s.execution_state = ExecutionState::Idle,
            Some(ExecState::Starting) => s.execution_state = ExecutionState::Starting,
            Some(ExecState::Other) | None => {}
        }
        s.last_activity = Utc::now();
    }

    /// Hands a reply (shell, control or stdin) to the tap of its request, if it has one.
    fn tapped_reply(&self, parent: &str, message: KernelMessage) -> Option<KernelMessage> {
        let taps = self.taps.lock().unwrap_or_else(|e| e.into_inner());
        match taps.get(parent) {
            Some(tap) => {
                let _ = tap.to.send(Arc::new(message));
                None
            }
            None => Some(message),
        }
    }

    /// Sends a request the gateway makes itself and waits up to `timeout` for its reply.
    pub async fn request(
        &self,
        channel: Channel,
        msg_type: &str,
        content: Value,
        timeout: Duration,
    ) -> Option<KernelMessage> {
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
        let content = json!({"execution_state": state.as_str()});
        let message = self.made(
            Channel::Iopub,
            "status",
            &content,
            bytes::Bytes::from_static(b"{}"),
        );
        self.deliver_all(Arc::new(message)).await;
    }

    /// Publishes a `stream` message the gateway makes up (a notice for the user) to every
    /// client, as a child of `parent_header` (so it shows under the cell it is about).
    pub async fn publish_stream(&self, parent_header: bytes::Bytes, name: &str, text: &str) {
        let content = json!({"name": name, "text": text});
        let message = self.made(Channel::Iopub, "stream", &content, parent_header);
        self.deliver_all(Arc::new(message)).await;
    }

    /// Handles one message from the kernel process (its envelope read when it arrived: nothing
    /// here parses it again).
    pub(crate) async fn dispatch(&self, message: KernelMessage) {
        let envelope = &message.envelope;
        if message.channel == Channel::Iopub {
            self.note_activity(envelope);
            if envelope.msg_type.is_rated_output() {
                let size = message.raw.content.len()
                    + message.raw.buffers.iter().map(|b| b.len()).sum::<usize>();
                let admitted = self
                    .rate
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .admit(size);
                match admitted {
                    Admit::Yes => {}
                    Admit::No => return,
                    Admit::NoAndTell(text) => {
                        self.publish_stream(message.raw.parent_header.clone(), "stderr", &text)
                            .await;
                        return;
                    }
                    Admit::YesAndTell(text) => {
                        self.publish_stream(message.raw.parent_header.clone(), "stderr", &text)
                            .await;
                    }
                }
            }
            self.deliver_all(Arc::new(message)).await;
            return;
        }
        self.touch();
        if message.channel == Channel::Shell
            && let Some(n) = envelope.execution_count
        {
            self.last_count.store(n, Ordering::Relaxed);
        }
        let Some(parent) = envelope.parent.msg_id.clone() else {
            tracing::debug!(kernel = %self.id, msg_type = %envelope.msg_type, "a kernel message without a parent");
            return;
        };
        let Some(message) = self.tapped_reply(&parent, message) else {
            return;
        };
        let waiter = self
            .waiters
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&parent);
        if let Some(waiter) = waiter {
            let _ = waiter.send(message);
            return;
        }
        let session = {
            let mut routes = self.routes.lock().unwrap_or_else(|e| e.into_inner());
            let session = routes.get(&parent).cloned();
            // A reply ends its request; stdin's input_request does not.
            if message.envelope.msg_type.is_reply() {
                routes.remove(&parent);
            }
            session
        };
        match session {
            Some(session) => self.deliver_to(&session, Arc::new(message)).await,
            None => {
                tracing::debug!(kernel = %self.id, msg_type = %message.envelope.msg_type, "no client waits for this reply")
            }
        }
    }

    async fn deliver_all(&self, out: Outgoing) {
        let full: Vec<String> = {
            let mut boxes = self.mailboxes.lock().unwrap_or_else(|e| e.into_inner());
            boxes
                .iter_mut()
                .filter_map(|(key, m)| m.offer(out.clone()).err().map(|_| key.clone()))
                .collect()
        };
        for session in full {
            self.deliver_to(&session, out.clone()).await;
        }
    }

    /// Queues a message for the client of `session`. If its socket's queue is full, waits up
    /// to [`SLOW_CLIENT_TIMEOUT`] for it to read; a socket that stays full that long is
    /// disconnected (its session keeps collecting as if detached), so one stuck reader cannot
    /// make the gateway grow without bound or hold up the others for long.
    async fn deliver_to(&self, session: &str, mut out: Outgoing) {
        let mut deadline = tokio::time::Instant::now() + SLOW_CLIENT_TIMEOUT;
        loop {
            let space: Arc<Notify>;
            let room;
            {
                let mut boxes = self.mailboxes.lock().unwrap_or_else(|e| e.into_inner());
                let Some(m) = boxes.get_mut(session) else {
                    return;
                };
                match m.offer(out) {
                    Ok(()) => return,
                    Err(back) => out = back,
                }
                space = m.space.clone();
                // Created under the lock: a `notify_waiters` once it is released reaches it.
                room = space.notified();
            }
            if tokio::time::timeout_at(deadline, room).await.is_ok() {
                continue;
            }
            let mut boxes = self.mailboxes.lock().unwrap_or_else(|e| e.into_inner());
            let Some(m) = boxes.get_mut(session) else {
                return;
            };
            if let Some(stuck) = m.primary.and_then(|p| m.remove(p)) {
                tracing::warn!(kernel = %self.id, conn = stuck.conn, "disconnecting a client that stopped reading");
                let _ = stuck.kick.send(Some(Kick {
                    reason: format!(
                        "the client did not read its messages for {} s",
                        SLOW_CLIENT_TIMEOUT.as_secs()
                    ),
                    drain: true,
                }));
            }
            deadline = tokio::time::Instant::now() + SLOW_CLIENT_TIMEOUT;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn out(n: u32) -> Outgoing {
        Arc::new(KernelMessage::parse(
            Channel::Iopub,
            RawMessage {
                identities: Vec::new(),
                header: bytes::Bytes::from(format!("{{\"n\":{n}}}")),
                parent_header: bytes::Bytes::from_static(b"{}"),
                metadata: bytes::Bytes::from_static(b"{}"),
                content: bytes::Bytes::from_static(b"{}"),
                buffers: Vec::new(),
            },
        ))
    }

    fn numbers(batch: &[Outgoing]) -> Vec<u32> {
        batch
            .iter()
            .map(|o| {
                serde_json::from_slice::<Value>(&o.raw.header).unwrap()["n"]
                    .as_u64()
                    .unwrap() as u32
            })
            .collect()
    }

    fn attach(m: &mut Mailbox, conn: u64) {
        m.add(Socket {
            conn,
            wake: Arc::new(Notify::new()),
            kick: watch::channel(None).0,
            spoke: false,
            provisional: VecDeque::new(),
            provisional_bytes: 0,
        });
    }

    fn take(m: &mut Mailbox, conn: u64) -> Vec<u32> {
        m.take(conn).map(|(b, _)| numbers(&b)).unwrap_or_default()
    }

    #[test]
    fn a_second_socket_holds_messages_until_one_speaks_and_the_speaker_keeps_its_place() {
        let mut m = Mailbox::new();
        attach(&mut m, 1);
        m.offer(out(1)).unwrap();
        assert_eq!(take(&mut m, 1), [1]);
        m.spoke(1);
        // The late socket (opened last, never used) neither takes messages nor closes 1.
        attach(&mut m, 2);
        m.offer(out(2)).unwrap();
        assert!(m.take(1).is_none() && m.take(2).is_none());
        let stale = m.spoke(1);
        assert_eq!(stale.iter().map(|s| s.conn).collect::<Vec<_>>(), [2]);
        assert_eq!(take(&mut m, 1), [2]);
        assert_eq!(m.sockets.len(), 1);
    }

    #[test]
    fn what_a_socket_took_before_it_ever_spoke_goes_to_the_next_one_in_order() {
        let mut m = Mailbox::new();
        attach(&mut m, 1);
        m.offer(out(1)).unwrap();
        m.offer(out(2)).unwrap();
        assert_eq!(take(&mut m, 1), [1, 2]);
        attach(&mut m, 2);
        m.offer(out(3)).unwrap();
        let stale = m.spoke(2);
        assert_eq!(stale.len(), 1);
        assert_eq!(take(&mut m, 2), [1, 2, 3]);
        // Once a socket spoke, what it took is its own.
        m.offer(out(4)).unwrap();
        assert_eq!(take(&mut m, 2), [4]);
        attach(&mut m, 3);
        m.remove(2);
        m.offer(out(5)).unwrap();
        assert_eq!(take(&mut m, 3), [5]);
    }

    #[test]
    fn a_silent_socket_removed_then_failing_to_send_gives_nothing_back_twice() {
        let mut m = Mailbox::new();
        attach(&mut m, 1);
        m.offer(out(1)).unwrap();
        m.offer(out(2)).unwrap();
        assert_eq!(take(&mut m, 1), [1, 2]);
        attach(&mut m, 2);
        m.spoke(2); // 1 is stale: what it took is queued again
        m.give_back(1, vec![out(2)]); // its send of 2 then failed
        assert_eq!(take(&mut m, 2), [1, 2]);
    }

    #[tokio::test]
    async fn a_sender_waiting_for_a_full_primary_is_woken_when_the_primary_goes() {
        let mut m = Mailbox::new();
        attach(&mut m, 1);
        m.spoke(1);
        for n in 0..CLIENT_QUEUE as u32 {
            m.offer(out(n)).unwrap();
        }
        assert!(m.offer(out(9999)).is_err());
        let space = m.space.clone();
        let room = space.notified();
        tokio::pin!(room);
        room.as_mut().enable();
        m.remove(1);
        tokio::time::timeout(std::time::Duration::from_secs(1), room)
            .await
            .expect("woken at once");
        assert!(m.offer(out(9999)).is_ok());
    }

    #[test]
    fn closing_one_of_two_silent_sockets_makes_the_other_primary() {
        let mut m = Mailbox::new();
        attach(&mut m, 1);
        attach(&mut m, 2);
        m.offer(out(1)).unwrap();
        m.remove(1);
        assert_eq!(take(&mut m, 2), [1]);
        m.remove(2);
        assert!(m.sockets.is_empty() && m.detached_at.is_some() && m.primary.is_none());
    }

    #[test]
    fn unsent_messages_go_back_in_front_and_a_mailbox_nobody_reads_stays_bounded() {
        let mut m = Mailbox::new();
        attach(&mut m, 1);
        m.spoke(1);
        m.offer(out(1)).unwrap();
        m.offer(out(2)).unwrap();
        let batch = m.take(1).unwrap().0;
        m.offer(out(3)).unwrap();
        m.give_back(1, batch);
        assert_eq!(take(&mut m, 1), [1, 2, 3]);
        m.remove(1);
        for n in 0..(DETACHED_MESSAGES as u32 + 5) {
            m.offer(out(n)).unwrap();
        }
        assert_eq!(m.queue.len(), DETACHED_MESSAGES);
        attach(&mut m, 2);
        let (batch, dropped) = m.take(2).unwrap();
        assert_eq!((batch.len(), dropped), (DETACHED_MESSAGES, 5));
        assert_eq!(numbers(&batch)[0], 5);
    }

    #[test]
    fn a_primary_with_a_full_queue_makes_the_sender_wait() {
        let mut m = Mailbox::new();
        attach(&mut m, 1);
        for n in 0..CLIENT_QUEUE as u32 {
            m.offer(out(n)).unwrap();
        }
        assert!(m.offer(out(0)).is_err());
        assert_eq!(take(&mut m, 1).len(), CLIENT_QUEUE);
        assert!(m.offer(out(0)).is_ok());
    }
}
