//! Where the guest's turns run: on the kernel's own thread, between its tasks.
//!
//! A request is read, run and answered on one thread. Handing work from thread to thread costs
//! a wake-up each way (tens of µs on a virtual machine, where an idle CPU halts), about what a
//! short cell's whole turn costs; a `1+1` round trip would pay two.
//!
//! The kernel's tasks (sockets, signing, the executor) run on a current-thread tokio runtime.
//! Between turns the kernel thread drives it (`Runtime::block_on`) and waits there for the next
//! request; a turn runs outside it, on the same thread. While a turn runs nobody drives the
//! tasks, which is right for a short turn: its output goes out when it ends, in order. A turn
//! that lasts an epoch tick (10 ms) or is about to wait (a sleep, `input()`, a full output
//! queue) calls [`Handover::now`]: the standby thread wakes, takes the runtime (tokio lets one
//! thread at a time drive a current-thread runtime, and hands it over when one leaves
//! `block_on`) and drives the tasks, so output streams and interrupts, heartbeats and control
//! requests are served, until the turn ends and it gives the runtime back.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};

use tokio::runtime::Runtime;
use tokio::sync::{oneshot, watch};
use tokio::task::JoinError;

use super::{Command, GUEST_THREAD_STACK, Interpreter};

/// How a running turn asks for the kernel's tasks to go on without its thread. The default
/// one does nothing (a guest with a thread of its own).
#[derive(Clone, Default)]
pub struct Handover(Option<Arc<Standby>>);

impl Handover {
    /// Wakes the standby thread to drive the kernel's tasks until this turn ends (once per
    /// turn; later calls cost an atomic swap).
    pub fn now(&self) {
        if let Some(standby) = &self.0 {
            standby.ask();
        }
    }
}

/// What the kernel thread and the standby thread share.
pub struct Standby {
    /// Serial of the turn running now, or of the last one.
    turn: AtomicU64,
    /// Whether this turn has asked for the standby already.
    asked: AtomicBool,
    /// The turn the standby is asked to cover.
    wanted: Mutex<u64>,
    wake: Condvar,
    /// Serial of the last turn that ended.
    over: watch::Sender<u64>,
}

impl Standby {
    fn begin(&self) -> u64 {
        self.asked.store(false, Ordering::SeqCst);
        self.turn.fetch_add(1, Ordering::SeqCst) + 1
    }

    fn ask(&self) {
        if self.asked.swap(true, Ordering::SeqCst) {
            return;
        }
        let turn = self.turn.load(Ordering::SeqCst);
        *self.wanted.lock().unwrap_or_else(|p| p.into_inner()) = turn;
        self.wake.notify_one();
    }

    fn end(&self, turn: u64) {
        self.over.send_replace(turn);
    }

    /// The standby thread: waits to be asked, then drives the runtime until the turn it was
    /// asked for ends. If the kernel's server ends meanwhile (a shutdown while a cell runs),
    /// the process ends here, without waiting for the cell.
    fn serve(&self, runtime: &Runtime, mut stopped: watch::Receiver<bool>) {
        let mut covered = 0;
        loop {
            let turn = {
                let mut wanted = self.wanted.lock().unwrap_or_else(|p| p.into_inner());
                while *wanted <= covered {
                    wanted = self.wake.wait(wanted).unwrap_or_else(|p| p.into_inner());
                }
                *wanted
            };
            covered = turn;
            let mut over = self.over.subscribe();
            let server_ended = runtime.block_on(async {
                tokio::select! {
                    _ = over.wait_for(|done| *done >= turn) => false,
                    _ = stopped.wait_for(|stop| *stop) => true,
                }
            });
            if server_ended {
                super::remove_private_roots();
                std::process::exit(0);
            }
        }
    }
}

/// Given to the kernel's server, which starts the guest and lends it to the seat.
pub struct Lender {
    standby: Arc<Standby>,
    guest: oneshot::Sender<Interpreter>,
}

impl Lender {
    /// What the guest's turns call to hand the kernel's tasks to the standby thread.
    pub fn handover(&self) -> Handover {
        Handover(Some(self.standby.clone()))
    }

    /// Hands the guest to the kernel thread, which runs its turns from now on.
    pub fn lend(self, guest: Interpreter) {
        let _ = self.guest.send(guest);
    }
}

/// The kernel thread's seat: where the guest, once lent, runs its turns.
pub struct Seat {
    standby: Arc<Standby>,
    guest: oneshot::Receiver<Interpreter>,
}

impl Seat {
    /// A seat and the lender that fills it.
    pub fn new() -> (Lender, Seat) {
        let standby = Arc::new(Standby {
            turn: AtomicU64::new(0),
            asked: AtomicBool::new(false),
            wanted: Mutex::new(0),
            wake: Condvar::new(),
            over: watch::Sender::new(0),
        });
        let (tx, rx) = oneshot::channel();
        let lender = Lender {
            standby: standby.clone(),
            guest: tx,
        };
        (lender, Seat { standby, guest: rx })
    }

    /// Runs `server` (the kernel's tasks) on `runtime` and the guest's turns between them, on
    /// a kernel thread with the guest's stack, until `server` ends; returns what it returned.
    pub fn run<T: Send + 'static>(
        self,
        runtime: Runtime,
        server: impl Future<Output = T> + Send + 'static,
    ) -> std::io::Result<Result<T, JoinError>> {
        let runtime = Arc::new(runtime);
        let (stop_tx, stop_rx) = watch::channel(false);
        let server = runtime.spawn(async move {
            let out = server.await;
            let _ = stop_tx.send(true);
            out
        });
        let standby = self.standby.clone();
        let standby_runtime = runtime.clone();
        std::thread::Builder::new()
            .name("kernel-standby".into())
            .spawn(move || standby.serve(&standby_runtime, stop_rx))?;
        let kernel = std::thread::Builder::new()
            .name("kernel".into())
            .stack_size(GUEST_THREAD_STACK)
            .spawn(move || self.turns(&runtime, server))?;
        kernel
            .join()
            .map_err(|_| std::io::Error::other("the kernel thread panicked"))
    }

    fn turns<T: Send + 'static>(
        self,
        runtime: &Runtime,
        mut server: tokio::task::JoinHandle<T>,
    ) -> Result<T, JoinError> {
        enum Next<G, T> {
            Ended(Result<T, JoinError>),
            Ready(Option<G>),
        }
        let guest = self.guest;
        let mut guest = match runtime.block_on(async {
            tokio::select! {
                biased;
                ended = &mut server => Next::Ended(ended),
                guest = guest => Next::Ready(guest.ok()),
            }
        }) {
            Next::Ended(ended) => return ended,
            // The server failed before its guest started; it ends with the reason.
            Next::Ready(None) => return runtime.block_on(server),
            Next::Ready(Some(guest)) => guest,
        };
        loop {
            let next: Next<Command, T> = runtime.block_on(async {
                tokio::select! {
                    biased;
                    ended = &mut server => Next::Ended(ended),
                    command = guest.next() => Next::Ready(command),
                }
            });
            match next {
                Next::Ended(ended) => return ended,
                Next::Ready(None) => return runtime.block_on(server),
                Next::Ready(Some(command)) => {
                    let turn = self.standby.begin();
                    guest.serve(command);
                    self.standby.end(turn);
                }
            }
        }
    }
}
