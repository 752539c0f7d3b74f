//! Giving the memory of ended kernels back to the system.
//!
//! Each kernel costs the gateway about 0.1 MiB (its sockets' buffers, queues and tasks), taken
//! and freed on the runtime's worker threads. glibc's malloc keeps what those threads free in
//! their arenas unless it lies at an arena's top, so the gateway held on to the memory of
//! kernels long deleted: 27 MiB of RSS after 150 kernels had come and gone, 0.8 MiB of it in
//! use (`malloc_stats`), against 10.5 MiB at its start. `malloc_trim` hands every arena's free
//! pages back. [`Releaser::run`] calls it a moment after kernels end, once for a burst of them.

use std::time::Duration;

use tokio::sync::Notify;

/// How long after a kernel ends its memory is handed back: kernels that end together (a
/// client deleting many, a culling pass) are released together, and the ended kernel's tasks
/// have had the time to end and free what they held.
const AFTER: Duration = Duration::from_secs(2);

/// Hands freed memory back to the system after kernels end.
#[derive(Debug, Default)]
pub struct Releaser {
    ended: Notify,
}

impl Releaser {
    /// A kernel (or a kernel's process) has ended: its memory is released soon.
    pub fn kernel_ended(&self) {
        self.ended.notify_one();
    }

    /// Releases memory after kernels end, until the runtime stops.
    pub async fn run(&self) {
        loop {
            self.ended.notified().await;
            tokio::time::sleep(AFTER).await;
            let _ = tokio::task::spawn_blocking(trim).await;
        }
    }
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn trim() {
    // SAFETY: `malloc_trim` takes no pointer and locks each arena while it works on it, so it
    // may be called from any thread at any time.
    #[allow(unsafe_code)]
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Other C libraries (musl's malloc returns freed pages itself) have no `malloc_trim`.
#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn trim() {}
