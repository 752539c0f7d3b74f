//! The sandbox's limits and their defaults. Every default is written here, next to its value,
//! and repeated in the README's configuration table.

use std::time::Duration;

/// Caps on what one interpreter may use. `Limits::default()` is what a kernel gets unless its
/// operator passes flags (`sandgate-kernel --help`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// The guest's linear memory, in bytes. Default 2 GiB. Past it an allocation fails inside
    /// the guest and Python raises `MemoryError`; the interpreter and its state survive.
    pub memory_bytes: u64,
    /// Wall-clock time one cell may run. Default 600 s. When it passes, the cell gets a
    /// `KeyboardInterrupt`-style stop reported as `CellTimeoutError`; if the guest does not
    /// stop within [`Limits::hard_stop_grace`] the interpreter is restarted.
    pub cell_timeout: Option<Duration>,
    /// Bytes of output (streams plus rich displays) one cell may publish. Default 8 MiB. Past it
    /// further output of that cell is dropped and a single notice says so; the cell runs on.
    pub output_bytes: u64,
    /// Files the guest may hold open at once. Default 256. Past it `open()` fails with
    /// `OSError(EMFILE)`.
    pub open_files: u32,
    /// The deepest wasm call stack, in bytes. Default 8 MiB. Past it the guest traps (stack
    /// overflow) and the interpreter is restarted; Python's own recursion limit usually comes
    /// first and raises `RecursionError`. The host thread running the guest gets more stack
    /// than this (see `sandbox::GUEST_THREAD_STACK`).
    pub wasm_stack_bytes: usize,
    /// How long a soft stop (interrupt or timeout) may take before the interpreter is stopped
    /// hard and restarted. Default 5 s.
    pub hard_stop_grace: Duration,
    /// Bytes the guest may keep in its writable folders (its `/tmp` and home, and
    /// `/workspace`). Default 2 GiB. Past it a write fails with `OSError(ENOSPC)`.
    pub disk_bytes: u64,
    /// Files and folders the guest may keep there. Default 20000. Past it creating one fails
    /// with `OSError(ENOSPC)`.
    pub disk_files: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            memory_bytes: 2 << 30,
            cell_timeout: Some(Duration::from_secs(600)),
            output_bytes: 8 << 20,
            open_files: 256,
            wasm_stack_bytes: 8 << 20,
            hard_stop_grace: Duration::from_secs(5),
            disk_bytes: 2 << 30,
            disk_files: 20_000,
        }
    }
}
