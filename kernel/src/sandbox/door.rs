//! The host functions the guest can call: the door (`host.call`) and three WASI functions that
//! the sandbox shadows: `poll_oneoff` (so `time.sleep` can be interrupted), `path_open` and
//! `fd_close` (to cap open files). Everything read from guest memory is bounds-checked and
//! parsed as hostile.

use std::collections::HashSet;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant, SystemTime};

use serde_json::{Value, json};
use wasmtime::{Caller, Extern, Linker, Memory, Store, StoreContextMut, TypedFunc};
use wasmtime_wasi::HostMonotonicClock;

use super::interrupt::{self, InterruptFlags};
use super::output::OutputBudget;
use super::{Command, Control, Event, EventSink, Guest, Origin, TICK};

/// Largest request the guest may send through the door.
const MAX_DOOR_REQUEST: usize = 32 << 20;
/// Largest prompt `input()` may show.
const MAX_PROMPT: usize = 64 << 10;
/// WASI errno values used here.
const EINVAL: i32 = 28;
const EMFILE: i32 = 33;
const EFAULT: i32 = 21;
const ENOSPC: i32 = 51;
/// `path_open`'s `O_CREAT` bit.
const OFLAGS_CREAT: i32 = 1;
/// A door call's result codes, as the image's `_host` module reads them.
const DOOR_FAULT: i32 = -2;

/// Why the guest was stopped hard (its instance is lost).
#[derive(Debug, Clone, thiserror::Error)]
pub(crate) enum HardStop {
    /// A second interrupt came while the first was still not taken.
    #[error(
        "the cell did not respond to an interrupt (it was busy in native code); \
         the interpreter was stopped"
    )]
    Unresponsive,
    /// The cell's wall-time limit passed and the soft stop did not end it.
    #[error("the cell ran past its time limit of {0} s and was stopped")]
    Timeout(u64),
    /// This image has no soft interrupt.
    #[error("the cell was interrupted; this image cannot keep state across an interrupt")]
    NoSoftStop,
}

/// What a stop check decided.
pub(crate) enum Check {
    /// Nothing to do.
    Continue,
    /// The interrupt flags were raised just now: Python will raise `KeyboardInterrupt`.
    Interrupted,
}

/// What stopped the cell softly, for the driver's error message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SoftStop {
    Interrupt,
    Timeout,
}

/// The door's per-instance state.
pub(crate) struct DoorState {
    sink: EventSink,
    budget: Arc<OutputBudget>,
    input: Arc<Mutex<mpsc::Receiver<Option<String>>>>,
    control: Arc<Control>,
    timeout: Option<Duration>,
    grace: Duration,
    flags: Option<InterruptFlags>,
    driver: Option<&'static str>,
    request: Option<Value>,
    is_cell: bool,
    /// The message the request answers, if the kernel gave one (the `parent` op).
    origin: Option<Origin>,
    reply: Option<Value>,
    /// Output the reply carried, published once the turn is over (see the `reply` op).
    held: Vec<Event>,
    cell_started: Option<Instant>,
    soft: Option<(SoftStop, Instant)>,
    timed_out: bool,
    probe_before: Option<Vec<u8>>,
    probe: Option<Vec<interrupt::FlagWord>>,
    open_files: HashSet<u32>,
    max_open_files: u32,
    disk: DiskBudget,
    /// The guest's environment, handed to the driver at boot (the `env` op).
    env: Vec<(&'static str, &'static str)>,
    /// The link to the gateway's package service (the `packages` op).
    pub(crate) packages: super::packages::Link,
}

/// Bytes written to files between two measurements of the guest's folders.
const DISK_STEP: u64 = 16 << 20;
/// Files created between two measurements.
const FILES_STEP: u64 = 500;

/// What the guest may keep in its writable folders (its private root and `/workspace`), so a
/// cell cannot fill the host's disk or its inodes. Writes and file creations are counted as
/// they happen; every [`DISK_STEP`] bytes or [`FILES_STEP`] files (and whenever the estimate
/// crosses a limit) the folders are measured for real, so deleted files give their room back.
pub(crate) struct DiskBudget {
    dirs: Vec<std::path::PathBuf>,
    max_bytes: u64,
    max_files: u64,
    measured_bytes: u64,
    measured_files: u64,
    written_since: u64,
    created_since: u64,
}

impl DiskBudget {
    pub(crate) fn new(dirs: Vec<std::path::PathBuf>, max_bytes: u64, max_files: u64) -> Self {
        let mut b = DiskBudget {
            dirs,
            max_bytes,
            max_files,
            measured_bytes: 0,
            measured_files: 0,
            written_since: 0,
            created_since: 0,
        };
        b.measure();
        b
    }

    /// Bytes on disk (blocks) and entries in the folders; symlinks are not followed.
    fn measure(&mut self) {
        let (mut bytes, mut files) = (0u64, 0u64);
        let mut stack: Vec<std::path::PathBuf> = self.dirs.clone();
        while let Some(dir) = stack.pop() {
            let Ok(entries) = std::fs::read_dir(&dir) else {
                continue;
            };
            for entry in entries.flatten() {
                let Ok(meta) = entry.path().symlink_metadata() else {
                    continue;
                };
                files += 1;
                #[cfg(unix)]
                {
                    bytes += std::os::unix::fs::MetadataExt::blocks(&meta) * 512;
                }
                #[cfg(not(unix))]
                {
                    bytes += meta.len();
                }
                if meta.is_dir() && files <= self.max_files.saturating_mul(2) {
                    stack.push(entry.path());
                }
            }
        }
        self.measured_bytes = bytes;
        self.measured_files = files;
        self.written_since = 0;
        self.created_since = 0;
    }

    /// Whether `n` more bytes may be written.
    fn allow_write(&mut self, n: u64) -> bool {
        if self.written_since >= DISK_STEP
            || self.measured_bytes + self.written_since + n > self.max_bytes
        {
            self.measure();
        }
        if self.measured_bytes + self.written_since + n > self.max_bytes {
            return false;
        }
        self.written_since += n;
        true
    }

    /// Whether one more file may be created.
    fn allow_create(&mut self) -> bool {
        if self.created_since >= FILES_STEP
            || self.measured_files + self.created_since + 1 > self.max_files
        {
            self.measure();
        }
        if self.measured_files + self.created_since + 1 > self.max_files {
            return false;
        }
        self.created_since += 1;
        true
    }
}

impl DoorState {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        sink: EventSink,
        budget: Arc<OutputBudget>,
        input: Arc<Mutex<mpsc::Receiver<Option<String>>>>,
        control: Arc<Control>,
        timeout: Option<Duration>,
        grace: Duration,
        max_open_files: u32,
        flags: Option<InterruptFlags>,
        disk: DiskBudget,
        env: Vec<(&'static str, &'static str)>,
        packages: super::packages::Link,
    ) -> Self {
        DoorState {
            sink,
            budget,
            input,
            control,
            timeout,
            grace,
            flags,
            driver: None,
            request: None,
            is_cell: false,
            origin: None,
            reply: None,
            held: Vec::new(),
            cell_started: None,
            soft: None,
            timed_out: false,
            probe_before: None,
            probe: None,
            open_files: HashSet::new(),
            max_open_files,
            disk,
            env,
            packages,
        }
    }

    /// A turn starts, serving `command` (none: the boot turn, or the interrupt probe's).
    /// `driver` is handed out once, to the boot turn.
    pub(crate) fn begin(&mut self, command: Option<Command>, driver: &'static str) {
        self.driver = if command.is_none() {
            Some(driver)
        } else {
            None
        };
        let (request, is_cell, origin) = match command {
            Some(c) => (Some(c.request), c.is_cell, c.origin),
            None => (None, false, None),
        };
        self.request = request;
        self.is_cell = is_cell;
        self.origin = origin;
        self.reply = None;
        self.held.clear();
        self.cell_started = is_cell.then(Instant::now);
        self.soft = None;
        self.timed_out = false;
    }

    /// The turn ended.
    pub(crate) fn end(&mut self) {
        self.request = None;
        self.origin = None;
        self.is_cell = false;
        self.driver = None;
    }

    /// The turn's reply, and the output it carried, to be published before it.
    pub(crate) fn take_reply(&mut self) -> (Option<Value>, Vec<Event>) {
        (self.reply.take(), std::mem::take(&mut self.held))
    }

    pub(crate) fn take_probe(&mut self) -> Option<Vec<interrupt::FlagWord>> {
        self.probe.take()
    }

    /// Lets the kernel's tasks go on without the guest's thread (see `seat`).
    pub(crate) fn handover(&self) {
        self.sink.handover();
    }

    /// The stop check, run by the epoch callback every tick and by host calls that wait.
    fn check(&mut self, memory: &mut [u8]) -> Result<Check, HardStop> {
        if !self.is_cell {
            return Ok(Check::Continue);
        }
        let now = Instant::now();
        if let Some((SoftStop::Timeout, since)) = self.soft
            && now.duration_since(since) >= self.grace
        {
            return Err(HardStop::Timeout(self.timeout.map_or(0, |t| t.as_secs())));
        }
        if self.control.interrupt.swap(false, Ordering::SeqCst) {
            let Some(flags) = &self.flags else {
                return Err(HardStop::NoSoftStop);
            };
            if let Some((_, since)) = self.soft
                && flags.pending(memory)
            {
                // Python has not taken the last one: it is stuck in native code.
                if now.duration_since(since) >= Duration::from_secs(1) {
                    return Err(HardStop::Unresponsive);
                }
                return Ok(Check::Continue);
            }
            flags.raise(memory);
            self.soft = Some((SoftStop::Interrupt, now));
            return Ok(Check::Interrupted);
        }
        if let (Some(limit), Some(started)) = (self.timeout, self.cell_started)
            && !self.timed_out
            && now.duration_since(started) >= limit
        {
            self.timed_out = true;
            let Some(flags) = &self.flags else {
                return Err(HardStop::Timeout(limit.as_secs()));
            };
            flags.raise(memory);
            self.soft = Some((SoftStop::Timeout, now));
            return Ok(Check::Interrupted);
        }
        Ok(Check::Continue)
    }

    /// After a cell: interrupt flags Python did not take are cleared, so a late interrupt
    /// does not hit the next cell.
    fn settle(&mut self, memory: &mut [u8]) {
        if let Some(flags) = &self.flags {
            flags.clear(memory);
        }
    }
}

/// Runs the stop check on the store's memory.
pub(crate) fn check<'a>(store: impl Into<StoreContextMut<'a, Guest>>) -> Result<Check, HardStop> {
    let mut store = store.into();
    let Some(memory) = store.data().memory else {
        return Ok(Check::Continue);
    };
    let (data, guest) = memory.data_and_store_mut(&mut store);
    guest.door.check(data)
}

/// Clears untaken interrupt flags at the end of a turn.
pub(crate) fn settle(store: &mut Store<Guest>) {
    if let Some(memory) = store.data().memory {
        let (data, guest) = memory.data_and_store_mut(&mut *store);
        guest.door.settle(data);
    }
}

/// The guest's monotonic clock: nanoseconds since the kernel started it. Shared with the
/// shadowing `poll_oneoff`, which must read the same clock for absolute deadlines.
#[derive(Clone)]
pub(crate) struct GuestClock(Instant);

impl GuestClock {
    pub(crate) fn new() -> Self {
        GuestClock(Instant::now())
    }

    fn at(&self, nanos: u64) -> Instant {
        self.0 + Duration::from_nanos(nanos)
    }
}

impl HostMonotonicClock for GuestClock {
    fn resolution(&self) -> u64 {
        1
    }

    fn now(&self) -> u64 {
        u64::try_from(self.0.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }
}

/// The WASI functions the shadows forward to, bound to one store. They are called through a
/// trampoline instance (see [`TRAMPOLINE`]) because WASI's functions find the guest's memory
/// through their caller, and a host function calling another directly has no caller instance.
#[derive(Default)]
pub(crate) struct Forwards {
    path_open: Option<TypedFunc<PathOpenArgs, i32>>,
    fd_close: Option<TypedFunc<i32, i32>>,
    poll_oneoff: Option<TypedFunc<(i32, i32, i32, i32), i32>>,
    fd_write: Option<TypedFunc<(i32, i32, i32, i32), i32>>,
    fd_pwrite: Option<TypedFunc<PwriteArgs, i32>>,
}

/// `fd_pwrite(fd, iovs, iovs_len, offset, nwritten_out)`.
type PwriteArgs = (i32, i32, i32, i64, i32);

/// `path_open(fd, dirflags, path, path_len, oflags, rights, inheriting, fdflags, fd_out)`.
type PathOpenArgs = (i32, i32, i32, i32, i32, i64, i64, i32, i32);

/// Imports the guest's memory and WASI's originals, re-exports the memory, and forwards each
/// call unchanged.
const TRAMPOLINE: &str = r#"(module
  (import "env" "memory" (memory 0))
  (import "wasi_snapshot_preview1" "path_open"
    (func $path_open (param i32 i32 i32 i32 i32 i64 i64 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "fd_close" (func $fd_close (param i32) (result i32)))
  (import "wasi_snapshot_preview1" "poll_oneoff"
    (func $poll_oneoff (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "fd_write"
    (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "fd_pwrite"
    (func $fd_pwrite (param i32 i32 i32 i64 i32) (result i32)))
  (export "memory" (memory 0))
  (func (export "path_open") (param i32 i32 i32 i32 i32 i64 i64 i32 i32) (result i32)
    local.get 0 local.get 1 local.get 2 local.get 3 local.get 4
    local.get 5 local.get 6 local.get 7 local.get 8
    call $path_open)
  (func (export "fd_close") (param i32) (result i32)
    local.get 0 call $fd_close)
  (func (export "poll_oneoff") (param i32 i32 i32 i32) (result i32)
    local.get 0 local.get 1 local.get 2 local.get 3 call $poll_oneoff)
  (func (export "fd_write") (param i32 i32 i32 i32) (result i32)
    local.get 0 local.get 1 local.get 2 local.get 3 call $fd_write)
  (func (export "fd_pwrite") (param i32 i32 i32 i64 i32) (result i32)
    local.get 0 local.get 1 local.get 2 local.get 3 local.get 4 call $fd_pwrite))"#;

/// WASI alone, and the trampoline module, from which each store's forwards are made.
pub(crate) struct WasiOnly {
    linker: Linker<Guest>,
    trampoline: wasmtime::Module,
}

impl WasiOnly {
    pub(crate) fn new(engine: &wasmtime::Engine) -> wasmtime::Result<Self> {
        let mut linker = Linker::new(engine);
        wasmtime_wasi::p1::add_to_linker_sync(&mut linker, |g: &mut Guest| &mut g.wasi)?;
        let trampoline = wasmtime::Module::new(engine, TRAMPOLINE)?;
        Ok(WasiOnly { linker, trampoline })
    }

    /// Instantiates the trampoline over the guest's `memory` and stores the forwards.
    pub(crate) fn bind(&self, store: &mut Store<Guest>, memory: Memory) -> wasmtime::Result<()> {
        let mut imports: Vec<Extern> = vec![memory.into()];
        for name in [
            "path_open",
            "fd_close",
            "poll_oneoff",
            "fd_write",
            "fd_pwrite",
        ] {
            let func = self
                .linker
                .get(&mut *store, "wasi_snapshot_preview1", name)
                .ok()
                .and_then(Extern::into_func)
                .ok_or_else(|| wasmtime::Error::msg(format!("WASI has no {name}")))?;
            imports.push(func.into());
        }
        let instance = wasmtime::Instance::new(&mut *store, &self.trampoline, &imports)?;
        let forwards = Forwards {
            path_open: Some(instance.get_typed_func(&mut *store, "path_open")?),
            fd_close: Some(instance.get_typed_func(&mut *store, "fd_close")?),
            poll_oneoff: Some(instance.get_typed_func(&mut *store, "poll_oneoff")?),
            fd_write: Some(instance.get_typed_func(&mut *store, "fd_write")?),
            fd_pwrite: Some(instance.get_typed_func(&mut *store, "fd_pwrite")?),
        };
        store.data_mut().forward = forwards;
        Ok(())
    }
}

fn unbound() -> wasmtime::Error {
    wasmtime::Error::msg("a shadowed WASI function was called before it was bound")
}

/// Defines WASI, the shadows and the door in `linker`.
pub(crate) fn define(linker: &mut Linker<Guest>) -> wasmtime::Result<()> {
    wasmtime_wasi::p1::add_to_linker_sync(linker, |g: &mut Guest| &mut g.wasi)?;
    linker.allow_shadowing(true);
    linker.func_wrap("host", "call", door_call)?;
    linker.func_wrap("wasi_snapshot_preview1", "poll_oneoff", poll_oneoff)?;
    linker.func_wrap("wasi_snapshot_preview1", "path_open", path_open)?;
    linker.func_wrap("wasi_snapshot_preview1", "fd_close", fd_close)?;
    linker.func_wrap("wasi_snapshot_preview1", "fd_write", fd_write)?;
    linker.func_wrap("wasi_snapshot_preview1", "fd_pwrite", fd_pwrite)?;
    linker.allow_shadowing(false);
    Ok(())
}

fn guest_slice(memory: &[u8], ptr: i32, len: usize) -> Option<std::ops::Range<usize>> {
    let start = ptr as u32 as usize;
    let end = start.checked_add(len)?;
    (end <= memory.len()).then_some(start..end)
}

/// `host.call(ptr, len, out_ptr_ptr, out_len_ptr) -> 0 | -2`.
fn door_call(
    mut caller: Caller<'_, Guest>,
    ptr: i32,
    len: i32,
    out_ptr_ptr: i32,
    out_len_ptr: i32,
) -> wasmtime::Result<i32> {
    let Some(memory) = caller.data().memory else {
        return Ok(DOOR_FAULT);
    };
    let len = len as u32 as usize;
    let answer = if len > MAX_DOOR_REQUEST {
        error_answer(&format!(
            "door request of {len} bytes is over the {MAX_DOOR_REQUEST}-byte cap"
        ))
    } else {
        let Some(range) = guest_slice(memory.data(&caller), ptr, len) else {
            return Ok(DOOR_FAULT);
        };
        let request = memory.data(&caller)[range].to_vec();
        answer(&mut caller, &request)?
    };
    let Some(alloc) = caller.get_export("host_alloc").and_then(Extern::into_func) else {
        return Ok(DOOR_FAULT);
    };
    let alloc = alloc.typed::<i32, i32>(&caller)?;
    let Ok(answer_len) = i32::try_from(answer.len()) else {
        return Ok(DOOR_FAULT);
    };
    let p = alloc.call(&mut caller, answer_len)?;
    let data = memory.data_mut(&mut caller);
    let (Some(dst), Some(pp), Some(lp)) = (
        guest_slice(data, p, answer.len()),
        guest_slice(data, out_ptr_ptr, 4),
        guest_slice(data, out_len_ptr, 4),
    ) else {
        return Ok(DOOR_FAULT);
    };
    if p == 0 {
        return Ok(DOOR_FAULT);
    }
    data[dst].copy_from_slice(&answer);
    data[pp].copy_from_slice(&(p as u32).to_le_bytes());
    data[lp].copy_from_slice(&(answer_len as u32).to_le_bytes());
    Ok(0)
}

fn error_answer(message: &str) -> Vec<u8> {
    json!({"error": message}).to_string().into_bytes()
}

const OK: &[u8] = b"{}";

/// The iopub message types the guest may publish.
fn publishable(msg_type: &str) -> Option<&'static str> {
    Some(match msg_type {
        "display_data" => "display_data",
        "update_display_data" => "update_display_data",
        "execute_result" => "execute_result",
        "clear_output" => "clear_output",
        "error" => "error",
        "comm_open" => "comm_open",
        "comm_msg" => "comm_msg",
        "comm_close" => "comm_close",
        _ => return None,
    })
}

/// Most binary buffers one comm message from the guest may carry (as the gateway allows a
/// client's message).
const MAX_BUFFERS: usize = 64;

/// Why the guest's message cannot be published.
const PUBLISH_SHAPE: &str = "publish needs a known `msg_type` and an object `content`; a comm \
                             message (`comm_open`, `comm_msg`, `comm_close`) needs a string \
                             `content.comm_id` and may carry an object `metadata` and at most \
                             64 `buffers` in base64, which no other message may";

/// `{"msg_type": ..., "content": {...}}` as the event that publishes it, if the type is one
/// the guest may publish and the content is an object. A comm message names its comm
/// (`content.comm_id`) and may also carry `metadata` (an object) and `buffers` (base64 strings,
/// sent as the message's binary frames).
fn to_publish(item: Value) -> Option<Event> {
    use base64::Engine;
    let Value::Object(mut item) = item else {
        return None;
    };
    let msg_type = item
        .get("msg_type")
        .and_then(Value::as_str)
        .and_then(publishable)?;
    let content = match item.remove("content") {
        Some(content @ Value::Object(_)) => content,
        _ => return None,
    };
    let comm = msg_type.starts_with("comm_");
    if comm && !content.get("comm_id").is_some_and(Value::is_string) {
        return None;
    }
    let metadata = match item.remove("metadata") {
        None | Some(Value::Null) => Value::Object(serde_json::Map::new()),
        Some(metadata @ Value::Object(_)) if comm => metadata,
        Some(_) => return None,
    };
    let buffers = match item.remove("buffers") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(list)) if comm && list.len() <= MAX_BUFFERS => {
            let mut buffers = Vec::with_capacity(list.len());
            for b in list {
                let bytes = base64::engine::general_purpose::STANDARD
                    .decode(b.as_str()?)
                    .ok()?;
                buffers.push(bytes::Bytes::from(bytes));
            }
            buffers
        }
        Some(_) => return None,
    };
    Some(Event::Iopub {
        msg_type,
        content,
        metadata,
        buffers,
    })
}

fn answer(caller: &mut Caller<'_, Guest>, request: &[u8]) -> wasmtime::Result<Vec<u8>> {
    let door = &mut caller.data_mut().door;
    if request == br#"{"op":"driver"}"# {
        return Ok(match door.driver.take() {
            Some(source) => source.as_bytes().to_vec(),
            None => error_answer("the driver is handed out once, at boot"),
        });
    }
    let Ok(Value::Object(mut req)) = serde_json::from_slice::<Value>(request) else {
        return Ok(error_answer("door requests are JSON objects"));
    };
    let op = req
        .get("op")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_owned();
    Ok(match op.as_str() {
        "source" => {
            let name = req.get("name").and_then(Value::as_str).unwrap_or_default();
            match super::guest_module(name) {
                Some(source) => source.as_bytes().to_vec(),
                None => error_answer(&format!("no guest module named {name:?}")),
            }
        }
        // The guest's environment, for the driver to set at boot (the snapshot's `os.environ`
        // is the one the image was taken with).
        "env" => {
            let env: serde_json::Map<String, Value> = door
                .env
                .iter()
                .map(|(k, v)| ((*k).to_owned(), Value::from(*v)))
                .collect();
            Value::Object(env).to_string().into_bytes()
        }
        "request" => door
            .request
            .clone()
            .unwrap_or(Value::Null)
            .to_string()
            .into_bytes(),
        // The message the request answers: its header, parent header, metadata and content
        // (`{}` when the kernel gave none).
        "parent" => match &door.origin {
            Some(m) => json!({
                "header": serde_json::to_value(&m.header).unwrap_or_else(|_| json!({})),
                "parent_header": m.parent_header,
                "metadata": m.metadata,
                "content": m.content,
            })
            .to_string()
            .into_bytes(),
            None => OK.to_vec(),
        },
        // The reply may carry the turn's last output (a cell's `execute_result`) as `publish`:
        // it goes out when the turn is over, just before the reply, which saves the kernel a
        // wake-up in the middle of the turn.
        "reply" => {
            let Some(content @ Value::Object(_)) = req.remove("content") else {
                return Ok(error_answer("a reply needs an object `content`"));
            };
            let mut held = Vec::new();
            if let Some(list) = req.remove("publish") {
                let Value::Array(list) = list else {
                    return Ok(error_answer("a reply's `publish` is a list"));
                };
                for item in list {
                    match to_publish(item) {
                        Some(event) => held.push(event),
                        None => {
                            return Ok(error_answer(
                                "each of a reply's `publish` needs a known `msg_type` \
                                 and an object `content`",
                            ));
                        }
                    }
                }
            }
            if !held.is_empty() && door.budget.take(request.len(), &door.sink) {
                door.held = held;
            }
            door.reply = Some(content);
            OK.to_vec()
        }
        "publish" => match to_publish(Value::Object(req)) {
            Some(event) => {
                if door.budget.take(request.len(), &door.sink) {
                    door.sink.send(event);
                }
                OK.to_vec()
            }
            None => error_answer(PUBLISH_SHAPE),
        },
        "stop_reason" => match door.soft {
            Some((SoftStop::Timeout, _)) => {
                let limit = door.timeout.map_or(0, |t| t.as_secs());
                json!({"reason": "timeout", "limit_s": limit})
                    .to_string()
                    .into_bytes()
            }
            _ => json!({"reason": "interrupt"}).to_string().into_bytes(),
        },
        "input" => {
            let prompt = req
                .get("prompt")
                .and_then(Value::as_str)
                .unwrap_or_default();
            let password = req
                .get("password")
                .and_then(Value::as_bool)
                .unwrap_or(false);
            if prompt.len() > MAX_PROMPT {
                return Ok(error_answer("the input prompt is too long"));
            }
            return wait_input(caller, prompt.to_owned(), password);
        }
        "packages" => {
            let Some(Value::Object(call)) = req.remove("call") else {
                return Ok(error_answer("`packages` needs an object `call`"));
            };
            return packages_call(caller, call);
        }
        "probe" => {
            let phase = req
                .get("phase")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_owned();
            probe(caller, &phase);
            OK.to_vec()
        }
        _ => error_answer("unknown door op"),
    })
}

/// Relays a package call to the gateway and waits for its answer, interruptibly.
fn packages_call(
    caller: &mut Caller<'_, Guest>,
    call: serde_json::Map<String, Value>,
) -> wasmtime::Result<Vec<u8>> {
    let mut link = std::mem::replace(
        &mut caller.data_mut().door.packages,
        super::packages::Link::new(None),
    );
    caller.data().door.handover();
    let result = link.call(call, || {
        check(&mut *caller).map(|c| matches!(c, Check::Interrupted))
    });
    caller.data_mut().door.packages = link;
    Ok(match result? {
        Ok(super::packages::Waited::Answer(answer)) => answer.to_string().into_bytes(),
        Ok(super::packages::Waited::Interrupted) => {
            json!({"interrupted": true}).to_string().into_bytes()
        }
        Err(e) => error_answer(&e),
    })
}

/// Asks the kernel for a line of input and waits for it, interruptibly.
fn wait_input(
    caller: &mut Caller<'_, Guest>,
    prompt: String,
    password: bool,
) -> wasmtime::Result<Vec<u8>> {
    let door = &caller.data().door;
    let input = door.input.clone();
    // Drop answers to earlier requests that came too late.
    let receiver = input.lock().unwrap_or_else(|e| e.into_inner());
    while receiver.try_recv().is_ok() {}
    door.sink.send(Event::InputRequest { prompt, password });
    door.handover();
    loop {
        match receiver.recv_timeout(TICK) {
            Ok(Some(value)) => return Ok(json!({"value": value}).to_string().into_bytes()),
            Ok(None) => return Ok(error_answer("input was refused")),
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                return Ok(error_answer("the kernel is shutting down"));
            }
            Err(mpsc::RecvTimeoutError::Timeout) => match check(&mut *caller)? {
                Check::Continue => {}
                Check::Interrupted => {
                    return Ok(json!({"interrupted": true}).to_string().into_bytes());
                }
            },
        }
    }
}

/// The interrupt probe's two halves (see `interrupt`): copy memory, then diff against it.
fn probe(caller: &mut Caller<'_, Guest>, phase: &str) {
    let Some(memory) = caller.data().memory else {
        return;
    };
    let now = memory.data(&*caller).to_vec();
    let door = &mut caller.data_mut().door;
    match phase {
        "before" => door.probe_before = Some(now),
        "after" => {
            if let Some(before) = door.probe_before.take() {
                door.probe = Some(interrupt::words_set(&before, &now));
            }
        }
        _ => {}
    }
}

fn read_u32(data: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([data[at], data[at + 1], data[at + 2], data[at + 3]])
}

fn read_u64(data: &[u8], at: usize) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&data[at..at + 8]);
    u64::from_le_bytes(b)
}

/// Size of a WASI preview 1 `subscription` and `event`.
const SUBSCRIPTION: usize = 48;
const EVENT: usize = 32;

/// `poll_oneoff`: waits on clocks alone are served here, in slices, so an interrupt or the cell
/// timeout can end them. An interrupted wait reports its clocks as fired (wasi-libc would turn
/// an `EINTR` into `ENOTSUP`): the sleep returns early and CPython raises the pending
/// `KeyboardInterrupt` at its next check, in the user's frame. Anything else goes to WASI's own.
fn poll_oneoff(
    mut caller: Caller<'_, Guest>,
    subs_ptr: i32,
    events_ptr: i32,
    nsubs: i32,
    nevents_ptr: i32,
) -> wasmtime::Result<i32> {
    let Some(memory) = caller.data().memory else {
        return Ok(EFAULT);
    };
    let n = nsubs as u32 as usize;
    if n == 0 {
        return Ok(EINVAL);
    }
    let data = memory.data(&caller);
    let (Some(subs), Some(_), Some(_)) = (
        guest_slice(data, subs_ptr, n.saturating_mul(SUBSCRIPTION)),
        guest_slice(data, events_ptr, n.saturating_mul(EVENT)),
        guest_slice(data, nevents_ptr, 4),
    ) else {
        return Ok(EFAULT);
    };
    let subs = &data[subs];
    let clock = caller.data().clock.clone();
    let now = Instant::now();
    let mut clocks = Vec::with_capacity(n);
    for i in 0..n {
        let s = &subs[i * SUBSCRIPTION..(i + 1) * SUBSCRIPTION];
        let tag = s[8];
        let id = read_u32(s, 16);
        if tag != 0 || id > 1 {
            // An fd, or a CPU-time clock: WASI's own.
            let forward = caller
                .data()
                .forward
                .poll_oneoff
                .clone()
                .ok_or_else(unbound)?;
            return forward.call(&mut caller, (subs_ptr, events_ptr, nsubs, nevents_ptr));
        }
        let (userdata, timeout, abstime) = (read_u64(s, 0), read_u64(s, 24), s[40] & 1 == 1);
        let due = match (id, abstime) {
            (_, false) => now.checked_add(Duration::from_nanos(timeout)),
            (1, true) => Some(clock.at(timeout)),
            (_, true) => {
                let wall = SystemTime::UNIX_EPOCH + Duration::from_nanos(timeout);
                Some(now + wall.duration_since(SystemTime::now()).unwrap_or_default())
            }
        };
        clocks.push((userdata, due));
    }
    let first = clocks.iter().filter_map(|c| c.1).min();
    let mut interrupted = false;
    if first.is_none_or(|due| due > now) {
        caller.data().door.handover();
    }
    loop {
        let now = Instant::now();
        if first.is_some_and(|due| now >= due) {
            break;
        }
        if let Check::Interrupted = check(&mut caller)? {
            interrupted = true;
            break;
        }
        let slice = first.map_or(TICK, |due| due.saturating_duration_since(now).min(TICK));
        std::thread::sleep(slice);
    }
    let now = Instant::now();
    let data = memory.data_mut(&mut caller);
    let mut count = 0usize;
    for (userdata, due) in clocks {
        if interrupted || due.is_some_and(|d| now >= d) {
            let at = events_ptr as u32 as usize + count * EVENT;
            let event = &mut data[at..at + EVENT];
            event.fill(0);
            event[0..8].copy_from_slice(&userdata.to_le_bytes());
            count += 1;
        }
    }
    let at = nevents_ptr as u32 as usize;
    data[at..at + 4].copy_from_slice(&(count as u32).to_le_bytes());
    Ok(0)
}

/// `path_open`, refused with `EMFILE` once the guest holds its cap of open files.
#[allow(clippy::too_many_arguments)]
fn path_open(
    mut caller: Caller<'_, Guest>,
    fd: i32,
    dirflags: i32,
    path: i32,
    path_len: i32,
    oflags: i32,
    rights: i64,
    inheriting: i64,
    fdflags: i32,
    fd_out: i32,
) -> wasmtime::Result<i32> {
    let door = &mut caller.data_mut().door;
    if door.open_files.len() >= door.max_open_files as usize {
        return Ok(EMFILE);
    }
    if oflags & OFLAGS_CREAT != 0 && !door.disk.allow_create() {
        return Ok(ENOSPC);
    }
    let forward = caller
        .data()
        .forward
        .path_open
        .clone()
        .ok_or_else(unbound)?;
    let args = (
        fd, dirflags, path, path_len, oflags, rights, inheriting, fdflags, fd_out,
    );
    let errno = forward.call(&mut caller, args)?;
    if errno == 0
        && let Some(memory) = caller.data().memory
    {
        let data = memory.data(&caller);
        if let Some(r) = guest_slice(data, fd_out, 4) {
            let opened = read_u32(data, r.start);
            caller.data_mut().door.open_files.insert(opened);
        }
    }
    Ok(errno)
}

/// `fd_close`, which gives back an open-file slot.
fn fd_close(mut caller: Caller<'_, Guest>, fd: i32) -> wasmtime::Result<i32> {
    let forward = caller.data().forward.fd_close.clone().ok_or_else(unbound)?;
    let errno = forward.call(&mut caller, fd)?;
    if errno == 0 {
        caller.data_mut().door.open_files.remove(&(fd as u32));
    }
    Ok(errno)
}

/// The bytes an iovec list asks to write, or `None` if it lies outside guest memory.
fn iovec_bytes(data: &[u8], iovs: i32, count: i32) -> Option<u64> {
    let count = count as u32 as usize;
    let range = guest_slice(data, iovs, count.checked_mul(8)?)?;
    let list = &data[range];
    Some(
        list.chunks_exact(8)
            .map(|iov| u64::from(u32::from_le_bytes([iov[4], iov[5], iov[6], iov[7]])))
            .sum(),
    )
}

/// Counts a file write against the disk budget (stdout and stderr are not files).
fn charge_write(caller: &mut Caller<'_, Guest>, fd: i32, iovs: i32, count: i32) -> Option<i32> {
    if (0..=2).contains(&fd) {
        return None;
    }
    let memory = caller.data().memory?;
    let n = iovec_bytes(memory.data(&*caller), iovs, count)?;
    if caller.data_mut().door.disk.allow_write(n) {
        None
    } else {
        Some(ENOSPC)
    }
}

/// `fd_write`, refused with `ENOSPC` once the guest's folders hold their cap.
fn fd_write(
    mut caller: Caller<'_, Guest>,
    fd: i32,
    iovs: i32,
    count: i32,
    nwritten: i32,
) -> wasmtime::Result<i32> {
    if let Some(errno) = charge_write(&mut caller, fd, iovs, count) {
        return Ok(errno);
    }
    let forward = caller.data().forward.fd_write.clone().ok_or_else(unbound)?;
    forward.call(&mut caller, (fd, iovs, count, nwritten))
}

/// `fd_pwrite`, refused with `ENOSPC` once the guest's folders hold their cap.
fn fd_pwrite(
    mut caller: Caller<'_, Guest>,
    fd: i32,
    iovs: i32,
    count: i32,
    offset: i64,
    nwritten: i32,
) -> wasmtime::Result<i32> {
    if let Some(errno) = charge_write(&mut caller, fd, iovs, count) {
        return Ok(errno);
    }
    let forward = caller
        .data()
        .forward
        .fd_pwrite
        .clone()
        .ok_or_else(unbound)?;
    forward.call(&mut caller, (fd, iovs, count, offset, nwritten))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn published(item: Value) -> Option<(&'static str, Value, Value, Vec<Vec<u8>>)> {
        match to_publish(item)? {
            Event::Iopub {
                msg_type,
                content,
                metadata,
                buffers,
            } => Some((
                msg_type,
                content,
                metadata,
                buffers.iter().map(|b| b.to_vec()).collect(),
            )),
            _ => None,
        }
    }

    #[test]
    fn comm_messages_carry_metadata_and_buffers() {
        let (msg_type, content, metadata, buffers) = published(json!({
            "msg_type": "comm_msg", "content": {"comm_id": "c", "data": {}},
            "metadata": {"version": "2.1.0"}, "buffers": ["AAE=", ""],
        }))
        .unwrap();
        assert_eq!(msg_type, "comm_msg");
        assert_eq!(content["comm_id"], "c");
        assert_eq!(metadata, json!({"version": "2.1.0"}));
        assert_eq!(buffers, vec![vec![0u8, 1], vec![]]);
        // Without either: empty metadata, no buffers.
        let (_, _, metadata, buffers) =
            published(json!({"msg_type": "comm_open", "content": {"comm_id": "c"}})).unwrap();
        assert_eq!((metadata, buffers.len()), (json!({}), 0));
    }

    #[test]
    fn malformed_publishes_are_refused() {
        let too_many: Vec<Value> = (0..=MAX_BUFFERS).map(|_| json!("")).collect();
        for item in [
            // Buffers and metadata belong to comm messages only.
            json!({"msg_type": "display_data", "content": {}, "buffers": ["AA=="]}),
            json!({"msg_type": "display_data", "content": {}, "metadata": {"a": 1}}),
            // A comm message names its comm.
            json!({"msg_type": "comm_msg", "content": {"data": {}}}),
            json!({"msg_type": "comm_close", "content": {"comm_id": 7}}),
            // Buffers are a list of base64 strings, not too many.
            json!({"msg_type": "comm_msg", "content": {"comm_id": "c"}, "buffers": "AA=="}),
            json!({"msg_type": "comm_msg", "content": {"comm_id": "c"}, "buffers": [1]}),
            json!({"msg_type": "comm_msg", "content": {"comm_id": "c"}, "buffers": ["not base64!"]}),
            json!({"msg_type": "comm_msg", "content": {"comm_id": "c"}, "buffers": too_many}),
            json!({"msg_type": "comm_msg", "content": {"comm_id": "c"}, "metadata": []}),
            // Types the guest may not publish.
            json!({"msg_type": "comm_info_reply", "content": {"comm_id": "c"}}),
            json!({"msg_type": "status", "content": {}}),
        ] {
            assert!(to_publish(item.clone()).is_none(), "{item}");
        }
    }
}
