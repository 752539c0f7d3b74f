//! The sandbox: one CPython-on-WASI interpreter in wasmtime, kept alive across cells. This is
//! the only module of the workspace that imports wasmtime.
//!
//! What the guest gets, and nothing else (deny by default):
//! - read-only: the image's standard library zip at `/usr/local/lib` and matplotlib's data;
//! - read-write: a private root `/` (holding `/tmp`, and `$HOME` unless a home folder is given)
//!   that is removed when the kernel ends, the kernel's working directory at `/workspace`, and,
//!   when its launcher gives one ([`SandboxConfig::home`]), a home folder at [`GUEST_HOME`]
//!   (then `$HOME`);
//! - an environment of its own (see [`GUEST_ENV`]); no host variables;
//! - no sockets (WASI preview 1 can only use sockets handed to it, and none are), stdin closed;
//! - the limits in [`Limits`];
//! - one host function, `host.call` (the "door"), through which the kernel's driver replies,
//!   publishes rich output and asks for `input()`. Everything arriving through it is parsed as
//!   hostile (size-capped JSON, checked fields).
//!
//! A cell runs as one `turn` of the guest, whose text carries the request (see `SERVE`). In the
//! kernel the turns run on the kernel thread, between its tasks ([`seat`]); elsewhere (the
//! interrupt check) on a thread of their own ([`Sandbox::start`]). Either thread has
//! [`GUEST_THREAD_STACK`] of stack, more than the wasm stack limit, so deep recursion is a
//! trap, never a host crash. The kernel talks to the guest through [`Sandbox`].

mod door;
pub mod interrupt;
mod limits;
mod output;
mod packages;
pub mod seat;
mod tempdir;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, mpsc};
use std::time::Duration;

use serde_json::{Value, json};
use wasmtime::{
    Config, Engine, InstancePre, Linker, Memory, Module, Store, StoreLimits, StoreLimitsBuilder,
    TypedFunc, UpdateDeadline,
};
use wasmtime_wasi::WasiCtxBuilder;
use wasmtime_wasi::p1::WasiP1Ctx;

pub use interrupt::InterruptFlags;
pub use limits::Limits;
use output::{GuestOutput, OutputBudget};
pub use tempdir::remove_private_roots;

use crate::image::Image;

/// Stack of the thread that runs the guest: more than any `Limits::wasm_stack_bytes` we allow.
pub const GUEST_THREAD_STACK: usize = 64 << 20;
/// The epoch ticker's period: how often a running guest checks for interrupts and deadlines.
const TICK: Duration = Duration::from_millis(10);
/// How long the epoch ticker goes on after the last turn before it sleeps (see [`Ticker`]).
/// Requests a few ms apart (kernels taking turns) find it awake; after a longer pause the first
/// request wakes it, which costs that request one futex wake.
const TICKER_LINGER: Duration = Duration::from_millis(200);
/// Most events waiting between the guest and the kernel before the guest blocks on output.
pub const EVENT_QUEUE: usize = 1024;
/// argv[0] the image was built to expect.
const ARGV0: &str = "/usr/local/bin/python.wasm";
/// Where the workspace's installed packages appear in the guest, read-only, when the gateway
/// gives a site folder ([`SandboxConfig::packages`]).
pub const GUEST_SITE: &str = "/usr/local/lib/python3.15/site-packages";
/// Where a home folder given by the launcher appears in the guest (E2B's `/home/user`).
pub const GUEST_HOME: &str = "/home/user";
/// The guest's whole environment (without a home folder of its own; with one, `HOME` is
/// [`GUEST_HOME`]: see [`guest_env`]). `MPLBACKEND` selects the kernel's inline backend, which
/// shows figures as PNG at the end of each cell.
pub const GUEST_ENV: &[(&str, &str)] = &[
    ("HOME", "/tmp/home"),
    ("TMPDIR", "/tmp"),
    ("MPLCONFIGDIR", "/tmp/home/.matplotlib"),
    ("MPLBACKEND", "module://_sandgate_inline"),
    ("PYTHONTZPATH", ""),
    ("PYTHONUNBUFFERED", "1"),
    ("LANG", "C.UTF-8"),
];
/// The guest's environment: [`GUEST_ENV`], with `HOME` at [`GUEST_HOME`] when the kernel was
/// given a home folder. The driver sets it again at boot (the door's `env` op), because the
/// snapshot's `os.environ` is the one the image was taken with.
pub fn guest_env(has_home: bool) -> Vec<(&'static str, &'static str)> {
    GUEST_ENV
        .iter()
        .map(|&(k, v)| match k {
            "HOME" if has_home => (k, GUEST_HOME),
            _ => (k, v),
        })
        .collect()
}

/// The kernel's guest-side driver: formats results, catches errors, runs matplotlib's inline
/// backend. It is sent through the door when an interpreter starts.
const DRIVER: &str = include_str!("driver.py");
/// Parts of the driver sent only when a cell first needs them (most kernels never do, and
/// compiling them at every start would slow every start), by name (the door's `source` op):
/// - `magics`: IPython's magics (`%config`, `%autoreload`, `%%capture`, ...);
/// - `ipython`: the shell `get_ipython()` returns;
/// - `shell`: the shell commands `!cmd` runs inside the sandbox (`ls`, `head`, `wc`, ...);
/// - `debugging`: `%xmode`, `%prun`, `%debug` and `%pdb`;
/// - `charts`: E2B's `e2b/chart` and `e2b/data` entries, for requests that ask for them;
/// - `packages`: `%pip`, `!pip` and `micropip` (resolution here, fetching by the gateway);
/// - `comms`: Jupyter comms (the comm manager and `Comm`, ipywidgets' channel), loaded by the
///   first comm message from a frontend, `import comm`, or `get_ipython().kernel.comm_manager`.
const GUEST_MODULES: &[(&str, &str)] = &[
    ("magics", include_str!("magics.py")),
    ("ipython", include_str!("ipython.py")),
    ("shell", include_str!("shell.py")),
    ("debugging", include_str!("debugging.py")),
    ("charts", include_str!("charts.py")),
    ("packages", include_str!("packages.py")),
    ("comms", include_str!("comms.py")),
];

/// The source of the guest module `name` (see [`GUEST_MODULES`]).
fn guest_module(name: &str) -> Option<&'static str> {
    GUEST_MODULES
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, source)| *source)
}

/// A short hash of the driver and the turns that boot it: the interrupt flags are probed with
/// it booted, so a new driver is probed anew.
pub fn driver_tag() -> String {
    let mut d = ring::digest::Context::new(&ring::digest::SHA256);
    for part in [DRIVER, BOOT, SERVE] {
        d.update(part.as_bytes());
        d.update(&[0]);
    }
    hex::encode(&d.finish().as_ref()[..4])
}
/// How every turn after the first starts: ask the driver to serve the kernel's request, whose
/// JSON follows on the comment line. A macro, so [`BOOT`] can hand the same text to the driver.
macro_rules! serve_turn {
    () => {
        "__sandgate_serve()\n#"
    };
}
/// The first turn of every interpreter: fetch the driver through the door and run it, telling
/// it how request turns start (`_SERVE_TURN`: it serves them without compiling them, taking the
/// request from the text), and name its `serve` in the turns' namespace (not the user's, which
/// is the driver's own), so a request turn also works as plain Python should the shortcut be
/// missing (`serve` then fetches the request through the door).
const BOOT: &str = concat!(
    "exec(compile(__import__('_host').call(b'{\"op\":\"driver\"}'), '<sandgate-driver>', \
     'exec'), {'__name__': '_sandgate', '_SERVE_TURN': '''",
    serve_turn!(),
    "'''})\n__sandgate_serve = __import__('sys').modules['_sandgate'].serve"
);
/// The start of every later turn; the request's JSON (one line) follows.
const SERVE: &str = serve_turn!();

/// Errors of the sandbox.
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    /// The compiled image could not be loaded or linked.
    #[error("cannot load the sandbox image {path}: {reason}")]
    Load {
        /// The compiled module's path.
        path: PathBuf,
        /// What wasmtime said.
        reason: String,
    },
    /// The interpreter could not be started.
    #[error("cannot start the interpreter: {0}")]
    Start(String),
    /// The sandbox thread is gone (the kernel is shutting down).
    #[error("the sandbox has stopped")]
    Stopped,
    /// The probe for interrupt flags failed.
    #[error("cannot locate the interpreter's interrupt flags: {0}")]
    Probe(String),
}

/// Which output stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamName {
    /// `sys.stdout`.
    Stdout,
    /// `sys.stderr`.
    Stderr,
}

impl StreamName {
    /// The name Jupyter's `stream` message uses.
    pub fn as_str(self) -> &'static str {
        match self {
            StreamName::Stdout => "stdout",
            StreamName::Stderr => "stderr",
        }
    }
}

/// Something the guest produced while serving a request, in the order it produced it.
#[derive(Debug)]
pub enum Event {
    /// Text written to stdout or stderr.
    Stream {
        /// Which stream.
        name: StreamName,
        /// The text, decoded as UTF-8.
        text: String,
    },
    /// A message for iopub: `display_data`, `update_display_data`, `execute_result`,
    /// `clear_output`, `error`, or a comm's `comm_open`, `comm_msg` or `comm_close`. `content`
    /// is a JSON object the door has checked.
    Iopub {
        /// The message type.
        msg_type: &'static str,
        /// Its content.
        content: Value,
        /// The message's metadata (a JSON object; only comm messages carry any).
        metadata: Value,
        /// Its binary buffers (only comm messages carry any).
        buffers: Vec<bytes::Bytes>,
    },
    /// The request is finished; nothing more comes for it. Sent on the same queue as its
    /// output, so it never overtakes any of it.
    Done(Outcome),
    /// The guest called `input()`; answer with [`Sandbox::input_reply`].
    InputRequest {
        /// The prompt.
        prompt: String,
        /// Whether the input should be hidden (`getpass`).
        password: bool,
    },
}

/// The guest-to-kernel event queue, bounded: a guest that floods output waits for the kernel.
///
/// The guest thread puts events straight on the kernel's tokio channel (no thread in between,
/// so an event costs one wake-up). While the queue has room that is a `try_send`; when it is
/// full the guest thread parks until the kernel takes some. It parks with `park_on`, not
/// `blocking_send`: WASI's stream writes run inside wasmtime-wasi's tokio context, where
/// `blocking_send` refuses to block.
#[derive(Clone)]
pub struct EventSink {
    events: tokio::sync::mpsc::Sender<Event>,
    handover: seat::Handover,
}

impl EventSink {
    fn new(events: tokio::sync::mpsc::Sender<Event>, handover: seat::Handover) -> EventSink {
        EventSink { events, handover }
    }

    fn send(&self, event: Event) {
        use tokio::sync::mpsc::error::TrySendError;
        match self.events.try_send(event) {
            // The receiver is gone only while the kernel shuts down; output is then moot.
            Ok(()) | Err(TrySendError::Closed(_)) => {}
            Err(TrySendError::Full(event)) => {
                // The kernel's tasks must run to take some: not on this thread, which waits.
                self.handover.now();
                let _ = park_on(self.events.send(event));
            }
        }
    }

    /// Called before the guest's thread waits or runs long: see [`seat`].
    fn handover(&self) {
        self.handover.now();
    }
}

/// Runs `future` to completion on this thread, parking it while the future waits.
fn park_on<F: std::future::Future>(future: F) -> F::Output {
    struct Unpark(std::thread::Thread);
    impl std::task::Wake for Unpark {
        fn wake(self: Arc<Self>) {
            self.0.unpark();
        }
    }
    let mut future = std::pin::pin!(future);
    let waker = std::task::Waker::from(Arc::new(Unpark(std::thread::current())));
    let mut cx = std::task::Context::from_waker(&waker);
    loop {
        if let std::task::Poll::Ready(out) = future.as_mut().poll(&mut cx) {
            return out;
        }
        std::thread::park();
    }
}

/// How a request ended.
#[derive(Debug)]
pub enum Outcome {
    /// The driver answered with this JSON object.
    Reply(Value),
    /// The interpreter was lost (a hard stop, a trap, `os._exit`) and a fresh one started
    /// from the image; everything defined before is gone. `reason` says why.
    Restarted {
        /// Why the interpreter ended, in words for the user.
        reason: String,
    },
}

/// The message a request answers (an `execute_request`), kept for the guest to ask for while
/// the request is served (the door's `parent` op, behind `get_ipython().kernel.get_parent()`):
/// handed over whole, shared, so a request that never asks costs nothing more.
pub type Origin = Arc<sandgate_wire::Message>;

/// A request for the guest, waiting for its turn.
pub struct Command {
    request: Value,
    is_cell: bool,
    origin: Option<Origin>,
}

/// Shared between the kernel's threads and the guest's: what the kernel asks of a running cell.
#[derive(Debug, Default)]
struct Control {
    interrupt: AtomicBool,
    /// Serial of the cell now running, 0 when none.
    running: AtomicU64,
    /// Cells submitted and not yet started: an interrupt that arrives before its cell's turn
    /// begins (the client saw `execute_input` and interrupted at once) still counts.
    queued: AtomicU64,
}

/// What the server needs to start sandboxes: the image and the limits.
#[derive(Debug, Clone)]
pub struct SandboxConfig {
    /// The verified, compiled image.
    pub image: Image,
    /// The host directory the guest sees at `/workspace`.
    pub workspace: PathBuf,
    /// A host directory the guest sees, writable, at [`GUEST_HOME`] (and as `$HOME`); counted
    /// in the disk limits like its other writable folders. `None`: `$HOME` stays in the private
    /// root.
    pub home: Option<PathBuf>,
    /// The gateway's package service for this kernel, if it was started by one.
    pub packages: Option<PackagesConfig>,
    /// The limits.
    pub limits: Limits,
}

/// Where the guest's packages come from (see `packages`).
#[derive(Debug, Clone)]
pub struct PackagesConfig {
    /// The workspace's site folder, which the guest sees read-only at [`GUEST_SITE`]; only
    /// the gateway writes it.
    pub site: PathBuf,
    /// The gateway's socket for this kernel process.
    pub socket: PathBuf,
}

/// A handle on the running interpreter. Dropping it ends the guest's turns (and its thread,
/// if it has one).
pub struct Sandbox {
    commands: tokio::sync::mpsc::UnboundedSender<Command>,
    control: Arc<Control>,
    input: mpsc::Sender<Option<String>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// The interpreter itself, and the requests waiting for it: whoever holds it runs the turns
/// (a thread of its own, [`Sandbox::start`], or the kernel's thread, [`seat`]).
pub struct Interpreter {
    host: Host,
    commands: tokio::sync::mpsc::UnboundedReceiver<Command>,
}

impl Interpreter {
    /// The next request; `None` once the [`Sandbox`] is gone.
    pub async fn next(&mut self) -> Option<Command> {
        self.commands.recv().await
    }

    /// Runs one request's turn on this thread; its output and then its [`Event::Done`] go to
    /// the event queue.
    pub fn serve(&mut self, command: Command) {
        let outcome = self.host.serve(command);
        self.host.sink.send(Event::Done(outcome));
    }
}

impl Sandbox {
    /// Starts the first interpreter and a thread of its own that runs its turns. Events go to
    /// `events`.
    pub fn start(
        config: SandboxConfig,
        events: tokio::sync::mpsc::Sender<Event>,
    ) -> Result<Sandbox, SandboxError> {
        let (ready_tx, ready_rx) = mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("sandbox-guest".into())
            .stack_size(GUEST_THREAD_STACK)
            .spawn(
                move || match Sandbox::start_guest(config, events, seat::Handover::default()) {
                    Ok((sandbox, mut guest)) => {
                        let _ = ready_tx.send(Ok(sandbox));
                        while let Some(command) = guest.commands.blocking_recv() {
                            guest.serve(command);
                        }
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                    }
                },
            )
            .map_err(|e| SandboxError::Start(e.to_string()))?;
        let mut sandbox = ready_rx.recv().map_err(|_| SandboxError::Stopped)??;
        sandbox.thread = Some(thread);
        Ok(sandbox)
    }

    /// Starts the first interpreter on this thread and returns it as an [`Interpreter`] for the
    /// caller to run (see [`seat`]); `handover` is how a long or waiting turn gives the
    /// kernel's thread back to its tasks.
    pub fn start_guest(
        config: SandboxConfig,
        events: tokio::sync::mpsc::Sender<Event>,
        handover: seat::Handover,
    ) -> Result<(Sandbox, Interpreter), SandboxError> {
        let sink = EventSink::new(events, handover);
        let control = Arc::new(Control::default());
        let (cmd_tx, cmd_rx) = tokio::sync::mpsc::unbounded_channel();
        let (input_tx, input_rx) = mpsc::channel();
        let host = Host::new(config, sink, control.clone(), input_rx)?;
        let sandbox = Sandbox {
            commands: cmd_tx,
            control,
            input: input_tx,
            thread: None,
        };
        Ok((
            sandbox,
            Interpreter {
                host,
                commands: cmd_rx,
            },
        ))
    }

    /// Sends a request to the driver. Its output, then its [`Event::Done`], arrive on the
    /// event queue. `is_cell` requests run under the cell limits (timeout, output cap) and can
    /// be interrupted.
    pub fn submit(&self, request: Value, is_cell: bool) -> Result<(), SandboxError> {
        self.submit_from(request, is_cell, None)
    }

    /// [`Sandbox::submit`], for a request that answers the message `origin` (see [`Origin`]).
    pub fn submit_from(
        &self,
        request: Value,
        is_cell: bool,
        origin: Option<Origin>,
    ) -> Result<(), SandboxError> {
        if is_cell {
            self.control.queued.fetch_add(1, Ordering::SeqCst);
        }
        self.commands
            .send(Command {
                request,
                is_cell,
                origin,
            })
            .map_err(|_| SandboxError::Stopped)
    }

    /// Asks the running cell to stop with `KeyboardInterrupt`. A second interrupt more than a
    /// second after the first, while the same cell still runs, stops it hard.
    pub fn interrupt(&self) {
        if self.control.running.load(Ordering::SeqCst) != 0
            || self.control.queued.load(Ordering::SeqCst) != 0
        {
            self.control.interrupt.store(true, Ordering::SeqCst);
        }
    }

    /// Answers the guest's pending `input()`; `None` means it was refused.
    pub fn input_reply(&self, value: Option<String>) {
        let _ = self.input.send(value);
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        // Closing the command channel ends the guest thread after its current request; a
        // running cell is interrupted first.
        self.control.interrupt.store(true, Ordering::SeqCst);
        let (tx, _) = tokio::sync::mpsc::unbounded_channel();
        self.commands = tx;
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// The process's one engine. Epoch interruption drives interrupts and timeouts; the exception
/// proposal is needed by the image.
pub fn engine(limits: &Limits) -> Result<Engine, SandboxError> {
    engine_and_ticker(limits).map(|(engine, _)| engine)
}

/// The engine and its epoch ticker, made once per process.
fn engine_and_ticker(limits: &Limits) -> Result<(Engine, &'static Ticker), SandboxError> {
    static ENGINE: OnceLock<Result<(Engine, &'static Ticker), String>> = OnceLock::new();
    let made = ENGINE.get_or_init(|| {
        let mut config = Config::new();
        config
            .epoch_interruption(true)
            .wasm_exceptions(true)
            .max_wasm_stack(limits.wasm_stack_bytes)
            .async_stack_size(limits.wasm_stack_bytes + (1 << 20))
            .memory_init_cow(true);
        let engine = Engine::new(&config).map_err(|e| e.to_string())?;
        let ticker = Ticker::start(&engine).map_err(|e| e.to_string())?;
        Ok((engine, ticker))
    });
    made.clone().map_err(SandboxError::Start)
}

/// The epoch ticker: one thread per process that advances the engine's epoch every [`TICK`]
/// while a guest turn runs, so that a running guest checks for interrupts and its deadline (the
/// epoch callback in [`Host::boot`]). Once no turn has begun for [`TICKER_LINGER`] it parks with
/// no timer at all, so an idle kernel wakes no thread; the next turn to begin unparks it, and
/// the first tick of that turn comes a full [`TICK`] after it began.
struct Ticker {
    /// Turns begun and turns ended, over the process's life: their difference runs now.
    begun: AtomicU64,
    ended: AtomicU64,
    /// Set by the ticker before it parks; whoever swaps it back to false unparks it.
    asleep: AtomicBool,
    thread: OnceLock<std::thread::Thread>,
}

/// A guest turn in progress, for the [`Ticker`]: it ticks until every one is dropped.
struct Ticking(&'static Ticker);

impl Drop for Ticking {
    fn drop(&mut self) {
        self.0.ended.fetch_add(1, Ordering::SeqCst);
    }
}

impl Ticker {
    /// Starts the ticker's thread, asleep until the first turn.
    fn start(engine: &Engine) -> std::io::Result<&'static Ticker> {
        let ticker: &'static Ticker = Box::leak(Box::new(Ticker {
            begun: AtomicU64::new(0),
            ended: AtomicU64::new(0),
            asleep: AtomicBool::new(true),
            thread: OnceLock::new(),
        }));
        let weak = engine.weak();
        let thread = std::thread::Builder::new()
            .name("epoch-ticker".into())
            .spawn(move || ticker.run(weak))?;
        let _ = ticker.thread.set(thread.thread().clone());
        Ok(ticker)
    }

    /// A turn begins: the ticker ticks until the returned guard is dropped.
    fn turn(&'static self) -> Ticking {
        self.begun.fetch_add(1, Ordering::SeqCst);
        if self.asleep.swap(false, Ordering::SeqCst)
            && let Some(thread) = self.thread.get()
        {
            thread.unpark();
        }
        Ticking(self)
    }

    fn run(&self, engine: wasmtime::EngineWeak) {
        let linger = TICKER_LINGER.as_millis() / TICK.as_millis();
        loop {
            // Asleep: parked, with no timer, until a turn begins.
            while self.asleep.load(Ordering::SeqCst) {
                std::thread::park();
            }
            let mut seen = self.begun.load(Ordering::SeqCst);
            let mut quiet = 0;
            while quiet < linger {
                std::thread::sleep(TICK);
                let Some(engine) = engine.upgrade() else {
                    return;
                };
                engine.increment_epoch();
                let begun = self.begun.load(Ordering::SeqCst);
                if begun != seen || begun != self.ended.load(Ordering::SeqCst) {
                    quiet = 0;
                } else {
                    quiet += 1;
                }
                seen = begun;
            }
            // Asleep from here, unless a turn began meanwhile: a turn that begins after this
            // store finds `asleep` set and unparks the ticker; one that began before it is
            // counted in `begun`, which is read after the store.
            self.asleep.store(true, Ordering::SeqCst);
            if self.begun.load(Ordering::SeqCst) != seen {
                self.asleep.store(false, Ordering::SeqCst);
            }
        }
    }
}

/// Compiles the image's wasm to native code and writes it to `out` (the slow step, about a
/// minute on two cores; run in its own process so the compiler's memory goes with it).
pub fn compile(limits: &Limits, wasm: &Path, out: &Path) -> Result<(), SandboxError> {
    let engine = engine(limits)?;
    let load = |reason: String| SandboxError::Load {
        path: wasm.to_owned(),
        reason,
    };
    let bytes = std::fs::read(wasm).map_err(|e| load(e.to_string()))?;
    let compiled = engine
        .precompile_module(&bytes)
        .map_err(|e| load(e.to_string()))?;
    let tmp = out.with_extension("tmp");
    std::fs::write(&tmp, &compiled).map_err(|e| load(e.to_string()))?;
    std::fs::rename(&tmp, out).map_err(|e| load(e.to_string()))?;
    Ok(())
}

/// The key under which compiled modules are cached: changes with wasmtime and its settings.
pub fn compile_key(limits: &Limits) -> Result<String, SandboxError> {
    use std::hash::{Hash, Hasher};
    let engine = engine(limits)?;
    let mut h = std::collections::hash_map::DefaultHasher::new();
    engine.precompile_compatibility_hash().hash(&mut h);
    Ok(format!("{:016x}", h.finish()))
}

fn load_module(engine: &Engine, cwasm: &Path) -> Result<Module, SandboxError> {
    // SAFETY: `deserialize_file` trusts the file to be wasmtime's own output. `cwasm` is
    // written only by `compile` above (to a temporary name, then renamed, so it is never seen
    // half-written), into the cache folder of the Sandgate home, under a name keyed by the
    // image's SHA-256 and the engine's compatibility hash; wasmtime itself refuses a file made
    // by another version or with other settings. The folder belongs to the operator: whoever can
    // write there can already run code as this user. Mapping the file is what lets instances
    // share its memory image.
    #[allow(unsafe_code)]
    let module = unsafe { Module::deserialize_file(engine, cwasm) };
    module.map_err(|e| SandboxError::Load {
        path: cwasm.to_owned(),
        reason: e.to_string(),
    })
}

/// The state the guest's store carries.
pub(crate) struct Guest {
    wasi: WasiP1Ctx,
    limits: StoreLimits,
    door: door::DoorState,
    memory: Option<Memory>,
    /// Original WASI functions that the shadowing host functions forward to.
    forward: door::Forwards,
    clock: door::GuestClock,
}

/// `host_alloc(len) -> ptr` and `turn(ptr, len) -> status`.
type Exports = (TypedFunc<i32, i32>, TypedFunc<(i32, i32), i32>);

/// Everything the guest thread owns.
struct Host {
    config: SandboxConfig,
    engine: Engine,
    ticker: &'static Ticker,
    pre: InstancePre<Guest>,
    wasi_only: door::WasiOnly,
    sink: EventSink,
    control: Arc<Control>,
    input: Arc<Mutex<mpsc::Receiver<Option<String>>>>,
    budget: Arc<OutputBudget>,
    root: tempdir::TempRoot,
    store: Option<Store<Guest>>,
    /// The instance's `host_alloc` and `turn` exports.
    turn: Option<Exports>,
    clock: door::GuestClock,
    serial: u64,
}

impl Host {
    fn new(
        config: SandboxConfig,
        sink: EventSink,
        control: Arc<Control>,
        input: mpsc::Receiver<Option<String>>,
    ) -> Result<Host, SandboxError> {
        let (engine, ticker) = engine_and_ticker(&config.limits)?;
        let module = load_module(&engine, &config.image.cwasm)?;
        let mut linker: Linker<Guest> = Linker::new(&engine);
        door::define(&mut linker).map_err(|e| SandboxError::Load {
            path: config.image.cwasm.clone(),
            reason: format!("{e:#}"),
        })?;
        let pre = linker
            .instantiate_pre(&module)
            .map_err(|e| SandboxError::Load {
                path: config.image.cwasm.clone(),
                reason: format!("{e:#}"),
            })?;
        let wasi_only = door::WasiOnly::new(&engine).map_err(|e| SandboxError::Load {
            path: config.image.cwasm.clone(),
            reason: format!("{e:#}"),
        })?;
        let budget = Arc::new(OutputBudget::new(config.limits.output_bytes));
        let root = tempdir::TempRoot::new().map_err(|e| SandboxError::Start(e.to_string()))?;
        if config.home.is_some() {
            // The mount point, so `/home` lists `user`.
            let point = root.path().join(GUEST_HOME.trim_start_matches('/'));
            std::fs::create_dir_all(&point).map_err(|e| SandboxError::Start(e.to_string()))?;
        }
        let mut host = Host {
            config,
            engine,
            ticker,
            pre,
            wasi_only,
            sink,
            control,
            input: Arc::new(Mutex::new(input)),
            budget,
            root,
            store: None,
            turn: None,
            clock: door::GuestClock::new(),
            serial: 0,
        };
        host.boot()?;
        Ok(host)
    }

    /// A fresh instance from the image, with the driver loaded.
    fn boot(&mut self) -> Result<(), SandboxError> {
        self.store = None;
        self.turn = None;
        let start = |e: wasmtime::Error| SandboxError::Start(format!("{e:#}"));
        let limits = &self.config.limits;
        let env = guest_env(self.config.home.is_some());
        let mut wasi = WasiCtxBuilder::new();
        wasi.arg(ARGV0)
            .envs(&env)
            .stdout(GuestOutput::new(
                StreamName::Stdout,
                self.sink.clone(),
                self.budget.clone(),
            ))
            .stderr(GuestOutput::new(
                StreamName::Stderr,
                self.sink.clone(),
                self.budget.clone(),
            ))
            .monotonic_clock(self.clock.clone())
            .allow_blocking_current_thread(true);
        // The order of the first three matches the layout the image's snapshot was taken with.
        let ro = wasmtime_wasi::FsPerms::ReadOnly;
        let rw = wasmtime_wasi::FsPerms::ReadWrite;
        let image = &self.config.image;
        wasi.preopened_dir(&image.lib_dir, "/usr/local/lib", ro)
            .map_err(start)?;
        wasi.preopened_dir(&image.mpl_data_dir, image.mpl_data_guest(), ro)
            .map_err(start)?;
        wasi.preopened_dir(self.root.path(), "/", rw)
            .map_err(start)?;
        wasi.preopened_dir(&self.config.workspace, "/workspace", rw)
            .map_err(start)?;
        let mut writable = vec![self.root.path().to_owned(), self.config.workspace.clone()];
        if let Some(home) = &self.config.home {
            wasi.preopened_dir(home, GUEST_HOME, rw).map_err(start)?;
            writable.push(home.clone());
        }
        if let Some(packages) = &self.config.packages {
            wasi.preopened_dir(&packages.site, GUEST_SITE, ro)
                .map_err(start)?;
        }
        let guest = Guest {
            wasi: wasi.build_p1(),
            limits: StoreLimitsBuilder::new()
                .memory_size(limits.memory_bytes.min(usize::MAX as u64) as usize)
                .trap_on_grow_failure(false)
                .instances(2)
                .memories(2)
                .tables(8)
                .build(),
            door: door::DoorState::new(
                self.sink.clone(),
                self.budget.clone(),
                self.input.clone(),
                self.control.clone(),
                limits.cell_timeout,
                limits.hard_stop_grace,
                limits.open_files,
                self.config.image.interrupt.clone(),
                door::DiskBudget::new(writable, limits.disk_bytes, limits.disk_files),
                env,
                packages::Link::new(self.config.packages.as_ref().map(|p| p.socket.clone())),
            ),
            memory: None,
            forward: door::Forwards::default(),
            clock: self.clock.clone(),
        };
        let mut store = Store::new(&self.engine, guest);
        store.limiter(|g| &mut g.limits);
        store.set_epoch_deadline(1);
        store.epoch_deadline_callback(|mut ctx| {
            // A turn that lasts a tick is a long one: the kernel's tasks go on elsewhere.
            ctx.data().door.handover();
            match door::check(&mut ctx) {
                Ok(_) => Ok(UpdateDeadline::Continue(1)),
                Err(stop) => Err(wasmtime::Error::new(stop)),
            }
        });
        let instance = self.pre.instantiate(&mut store).map_err(start)?;
        let memory = instance
            .get_memory(&mut store, "memory")
            .ok_or_else(|| SandboxError::Start("the image exports no memory".into()))?;
        store.data_mut().memory = Some(memory);
        self.wasi_only.bind(&mut store, memory).map_err(start)?;
        let alloc = instance
            .get_typed_func::<i32, i32>(&mut store, "host_alloc")
            .map_err(start)?;
        let turn = instance
            .get_typed_func::<(i32, i32), i32>(&mut store, "turn")
            .map_err(start)?;
        self.store = Some(store);
        self.turn = Some((alloc, turn));
        self.run_turn(BOOT, None).map_err(SandboxError::Start)?;
        Ok(())
    }

    /// Runs one turn. `Err` means the instance is gone, with the reason in words.
    fn run_turn(&mut self, code: &str, command: Option<Command>) -> Result<(), String> {
        let (Some(store), Some((alloc, turn))) = (self.store.as_mut(), self.turn.as_ref()) else {
            return Err("the interpreter is not running".into());
        };
        store.data_mut().door.begin(command, DRIVER);
        // The next check is at the next tick of this turn, not at once for a tick that passed
        // while the guest waited between turns (which would also hand the kernel's tasks over
        // at the start of every turn; see `seat`).
        store.set_epoch_deadline(1);
        let ticking = self.ticker.turn();
        let result = (|| {
            let len = i32::try_from(code.len()).map_err(|_| "turn too long".to_string())?;
            let p = alloc.call(&mut *store, len).map_err(|e| stop_reason(&e))?;
            let memory = store.data().memory.ok_or("no memory")?;
            memory
                .write(&mut *store, p as u32 as usize, code.as_bytes())
                .map_err(|e| e.to_string())?;
            turn.call(&mut *store, (p, len))
                .map_err(|e| stop_reason(&e))
        })();
        drop(ticking);
        door::settle(store);
        store.data_mut().door.end();
        result.map(|_| ())
    }

    fn serve(&mut self, command: Command) -> Outcome {
        let is_cell = command.is_cell;
        self.serial += 1;
        if is_cell {
            self.budget.reset();
            // An interrupt that came while this cell waited to start is kept: it stops the
            // cell at its first check.
            self.control.running.store(self.serial, Ordering::SeqCst);
            let _ = self
                .control
                .queued
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |q| q.checked_sub(1));
        }
        let turn = format!("{SERVE}{}", command.request);
        let result = self.run_turn(&turn, Some(command));
        self.control.running.store(0, Ordering::SeqCst);
        if is_cell {
            // Whatever was not taken is withdrawn, so it does not hit the next cell.
            self.control.interrupt.store(false, Ordering::SeqCst);
        }
        match result {
            Ok(()) => {
                let (reply, held) = self
                    .store
                    .as_mut()
                    .map(|s| s.data_mut().door.take_reply())
                    .unwrap_or_default();
                for event in held {
                    self.sink.send(event);
                }
                Outcome::Reply(reply.unwrap_or_else(|| {
                    json!({"status": "error", "ename": "KernelError",
                           "evalue": "the driver gave no reply", "traceback": []})
                }))
            }
            Err(reason) => {
                tracing::warn!(%reason, "interpreter lost; starting a fresh one");
                match self.boot() {
                    Ok(()) => Outcome::Restarted { reason },
                    Err(e) => Outcome::Restarted {
                        reason: format!("{reason}; restart failed: {e}"),
                    },
                }
            }
        }
    }
}

/// A trap, in words for the user.
fn stop_reason(e: &wasmtime::Error) -> String {
    if let Some(stop) = e.downcast_ref::<door::HardStop>() {
        return stop.to_string();
    }
    if let Some(exit) = e.downcast_ref::<wasmtime_wasi::I32Exit>() {
        return format!("the interpreter exited with status {}", exit.0);
    }
    if let Some(trap) = e.downcast_ref::<wasmtime::Trap>() {
        return match trap {
            wasmtime::Trap::StackOverflow => {
                "the interpreter ran out of stack (too deep recursion in native code)".into()
            }
            wasmtime::Trap::Interrupt => "the interpreter was stopped".into(),
            other => format!("the interpreter crashed ({other})"),
        };
    }
    format!("the interpreter failed: {e:#}")
}

/// Finds the image's interrupt flags (see [`interrupt`]) and checks that setting them really
/// interrupts a busy loop. Run once per image, when it is compiled.
pub fn probe_interrupt(config: SandboxConfig, wasm: &Path) -> Result<InterruptFlags, SandboxError> {
    let bytes = std::fs::read(wasm).map_err(|e| SandboxError::Probe(e.to_string()))?;
    let stack_top = interrupt::stack_top(&bytes)
        .ok_or_else(|| SandboxError::Probe("cannot find the C stack's top in the image".into()))?;
    drop(bytes);
    let mut config = config;
    config.image.interrupt = None;
    let (events_tx, mut events_rx) = tokio::sync::mpsc::channel(EVENT_QUEUE);
    std::thread::spawn(move || while events_rx.blocking_recv().is_some() {});
    let (_input_tx, input_rx) = mpsc::channel();
    let config2 = config.clone();
    let handle = std::thread::Builder::new()
        .stack_size(GUEST_THREAD_STACK)
        .spawn(move || -> Result<InterruptFlags, SandboxError> {
            let sink = EventSink::new(events_tx, seat::Handover::default());
            let mut host = Host::new(config2, sink, Arc::default(), input_rx)?;
            let mut run = |trigger: &str| -> Result<Vec<interrupt::FlagWord>, SandboxError> {
                host.run_turn(&interrupt::probe_code(trigger), None)
                    .map_err(SandboxError::Probe)?;
                let store = host.store.as_mut().ok_or(SandboxError::Stopped)?;
                store
                    .data_mut()
                    .door
                    .take_probe()
                    .ok_or_else(|| SandboxError::Probe("the probe did not report".into()))
            };
            let mut runs = Vec::new();
            let mut controls = Vec::new();
            for _ in 0..3 {
                runs.push(run("_thread.interrupt_main")?);
                controls.push(run("int")?);
            }
            let words = interrupt::stable_words(&runs, &controls, stack_top);
            if words.is_empty() || words.len() > interrupt::MAX_WORDS {
                return Err(SandboxError::Probe(format!(
                    "{} candidate words",
                    words.len()
                )));
            }
            Ok(InterruptFlags { words })
        })
        .map_err(|e| SandboxError::Start(e.to_string()))?;
    let flags = handle
        .join()
        .map_err(|_| SandboxError::Probe("probe thread panicked".into()))??;
    verify_interrupt(config, flags.clone())?;
    Ok(flags)
}

/// Runs a busy loop in a fresh interpreter, interrupts it through `flags`, and checks that the
/// loop ended in `KeyboardInterrupt` with the interpreter still alive.
fn verify_interrupt(mut config: SandboxConfig, flags: InterruptFlags) -> Result<(), SandboxError> {
    config.image.interrupt = Some(flags);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build();
    let rt = rt.map_err(|e| SandboxError::Start(e.to_string()))?;
    rt.block_on(async move {
        let (tx, mut rx) = tokio::sync::mpsc::channel(EVENT_QUEUE);
        let sandbox = Sandbox::start(config, tx)?;
        let busy = json!({"kind": "execute",
                          "code": "print('looping', flush=True)\nn = 0\nwhile True:\n    n += 1",
                          "silent": false, "store_history": false, "user_expressions": {},
                          "execution_count": 1});
        sandbox.submit(busy, true)?;
        let mut outcome = None;
        while let Some(ev) = rx.recv().await {
            match ev {
                Event::Stream { text, .. } if text.contains("looping") => sandbox.interrupt(),
                Event::Done(o) => {
                    outcome = Some(o);
                    break;
                }
                _ => {}
            }
        }
        match outcome.ok_or(SandboxError::Stopped)? {
            Outcome::Reply(r) if r["ename"] == "KeyboardInterrupt" => Ok(()),
            other => Err(SandboxError::Probe(format!(
                "interrupt check failed: {other:?}"
            ))),
        }
    })
}
