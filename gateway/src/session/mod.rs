//! Kernel lifecycle: start (from the warm pool when it has one ready), restart, automatic
//! restart after a crash, shutdown, culling of idle kernels, and the kernel limit.
//!
//! - [`kernel`]: one kernel: model, process, clients and message routing.
//!
//! A [`Kernels`] owns every kernel. Each running process has one pump task that reads what the
//! process sends and dispatches it through its [`kernel::Kernel`]; when the process dies the pump
//! restarts it (unless a client asked it to exit), within the restart limit.

pub mod kernel;

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use chrono::Utc;
use serde_json::json;
use tokio::sync::{Mutex, Notify, mpsc};

use crate::client::{Channel, ClientError, Incoming, LaunchSpec, Process};
use crate::envelope::KernelMessage;
use crate::home::Home;
use kernel::Expect;
pub use kernel::{Attachment, ClientRequest, ExecutionState, Kernel, Kick, Outgoing, RateLimit};

/// Lifecycle settings (see `config::KernelsConfig` for their defaults).
#[derive(Debug, Clone)]
pub struct LifecycleConfig {
    /// Most kernels at once (pooled ones not counted).
    pub max_kernels: usize,
    /// Ready kernels kept in the warm pool.
    pub pool_size: usize,
    /// Shut down kernels idle this long; `None` never.
    pub cull_idle_timeout: Option<Duration>,
    /// How often to look for idle kernels.
    pub cull_interval: Duration,
    /// Also cull kernels with clients connected.
    pub cull_connected: bool,
    /// Also cull busy kernels.
    pub cull_busy: bool,
    /// How long a kernel has to exit after `shutdown_request` before it is killed.
    pub shutdown_grace: Duration,
    /// Automatic restarts allowed within [`LifecycleConfig::restart_window`].
    pub restart_limit: usize,
    /// The window of the restart limit.
    pub restart_window: Duration,
    /// The iopub rate limit per kernel.
    pub iopub_rate: RateLimit,
}

/// Errors of the kernel lifecycle.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    /// No such kernel (or not this user's).
    #[error("kernel {0} not found")]
    NotFound(String),
    /// No such kernelspec.
    #[error("no kernelspec named {0:?}; this gateway offers {offered}", offered = crate::kernelspec::names())]
    NoSuchKernelSpec(String),
    /// Too many kernels.
    #[error(
        "the kernel limit is reached: {running} kernels are running (max_kernels = {max}); \
         shut one down or raise the limit"
    )]
    Limit {
        /// Kernels running.
        running: usize,
        /// The limit.
        max: usize,
    },
    /// The gateway is shutting down.
    #[error("the gateway is shutting down")]
    ShuttingDown,
    /// The kernel could not be started.
    #[error(transparent)]
    Start(#[from] ClientError),
}

type Ready = (Process, mpsc::Receiver<Incoming>);

/// The live workspace folder of a user (what their kernels see at `/workspace`).
pub type LiveDir = Arc<dyn Fn(&str) -> std::path::PathBuf + Send + Sync>;

/// Work an observer wants done before a message is relayed.
pub type Before = std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>;

/// Something that watches every kernel's messages as they are relayed (the workspace's
/// history recorder). It is called on the kernel's pump and must not block; the future it may
/// return is awaited before the message goes to clients (the workspace saves a cell's files
/// before the cell's reply is relayed, so a client that has the reply can read them).
pub trait Observer: Send + Sync + 'static {
    /// A message from `kernel`'s process, after it was authenticated, with its envelope (or
    /// one the gateway made for its clients).
    fn message(&self, kernel: &Arc<Kernel>, message: &KernelMessage) -> Option<Before>;
    /// `kernel` was shut down (or culled).
    fn kernel_ended(&self, kernel: &Arc<Kernel>);
}

/// Serves some client shell requests in the gateway instead of the kernel (the `%%ask` magic).
pub trait ShellHook: Send + Sync + 'static {
    /// Whether this `execute_request` content (JSON bytes) is the hook's to serve.
    fn claims(&self, content: &[u8]) -> bool;
    /// Serves it: publishes `busy`, outputs, the reply and `idle` through `kernel`. Returns
    /// whether it failed (executions queued behind it are then aborted).
    fn serve(
        self: Arc<Self>,
        kernel: Arc<Kernel>,
        request: kernel::ClientRequest,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = bool> + Send>>;
}

/// An observer that does nothing.
pub struct NoObserver;

impl Observer for NoObserver {
    fn message(&self, _: &Arc<Kernel>, _: &KernelMessage) -> Option<Before> {
        None
    }
    fn kernel_ended(&self, _: &Arc<Kernel>) {}
}

struct Inner {
    config: LifecycleConfig,
    launch: LaunchSpec,
    kernels: RwLock<HashMap<uuid::Uuid, Arc<Kernel>>>,
    pool: Mutex<VecDeque<Ready>>,
    /// Kernels being started outside the pool, counted against the limit.
    starting: AtomicUsize,
    /// Pool starts in flight.
    filling: AtomicUsize,
    pool_changed: Notify,
    /// Told whenever a launch in flight (`starting` or `filling`) is over.
    launch_ended: Notify,
    closing: AtomicBool,
    observer: Arc<dyn Observer>,
    hook: Option<Arc<dyn ShellHook>>,
    live_dir: LiveDir,
    released: crate::memory::Releaser,
}

/// Every kernel of the gateway.
#[derive(Clone)]
pub struct Kernels(Arc<Inner>);

impl Kernels {
    /// A manager that launches processes with `launch`. Call [`Kernels::spawn_background`] to
    /// start the pool filler and the culler.
    pub fn new(
        config: LifecycleConfig,
        launch: LaunchSpec,
        live_dir: LiveDir,
        observer: Arc<dyn Observer>,
        hook: Option<Arc<dyn ShellHook>>,
    ) -> Kernels {
        Kernels(Arc::new(Inner {
            config,
            launch,
            kernels: RwLock::default(),
            pool: Mutex::default(),
            starting: AtomicUsize::new(0),
            filling: AtomicUsize::new(0),
            pool_changed: Notify::new(),
            launch_ended: Notify::new(),
            closing: AtomicBool::new(false),
            observer,
            hook,
            live_dir,
            released: crate::memory::Releaser::default(),
        }))
    }

    /// The lifecycle settings.
    pub fn config(&self) -> &LifecycleConfig {
        &self.0.config
    }

    /// Starts the warm-pool filler, the idle culler and the memory releaser.
    pub fn spawn_background(&self) {
        let me = self.clone();
        tokio::spawn(async move { me.fill_pool().await });
        let me = self.clone();
        tokio::spawn(async move { me.cull_loop().await });
        let me = self.clone();
        tokio::spawn(async move { me.0.released.run().await });
    }

    fn map(&self) -> std::sync::RwLockReadGuard<'_, HashMap<uuid::Uuid, Arc<Kernel>>> {
        self.0.kernels.read().unwrap_or_else(|e| e.into_inner())
    }

    fn map_mut(&self) -> std::sync::RwLockWriteGuard<'_, HashMap<uuid::Uuid, Arc<Kernel>>> {
        self.0.kernels.write().unwrap_or_else(|e| e.into_inner())
    }

    /// The kernels `owner` may see, oldest first.
    pub fn list(&self, owner: &str) -> Vec<Arc<Kernel>> {
        let mut v: Vec<Arc<Kernel>> = self
            .map()
            .values()
            .filter(|k| k.owner == owner)
            .cloned()
            .collect();
        v.sort_by_key(|k| k.id);
        v
    }

    /// Every kernel, for metrics.
    pub fn count(&self) -> usize {
        self.map().len()
    }

    /// Ready kernels waiting in the pool.
    pub async fn pooled(&self) -> usize {
        self.0.pool.lock().await.len()
    }

    /// The kernel `id` if `owner` may see it. An id that is not a UUID, or belongs to someone
    /// else, is simply not found (so ids do not leak).
    pub fn get(&self, owner: &str, id: &str) -> Result<Arc<Kernel>, SessionError> {
        let not_found = || SessionError::NotFound(id.to_owned());
        let uuid = uuid::Uuid::parse_str(id).map_err(|_| not_found())?;
        self.map()
            .get(&uuid)
            .filter(|k| k.owner == owner)
            .cloned()
            .ok_or_else(not_found)
    }

    /// Starts a kernel for `owner`, from the pool when one is ready. It has a home folder of
    /// its own.
    pub async fn start(&self, owner: &str, name: &str) -> Result<Arc<Kernel>, SessionError> {
        self.start_inner(owner, name, None).await
    }

    /// Starts a kernel for `owner` whose guest sees `home` at `/home/user`: a fresh launch
    /// (never from the pool, whose kernels have homes of their own), and its restarts keep
    /// that home (see [`Kernels::pin_home`]).
    pub async fn start_with_home(
        &self,
        owner: &str,
        name: &str,
        home: Arc<Home>,
    ) -> Result<Arc<Kernel>, SessionError> {
        self.start_inner(owner, name, Some(home)).await
    }

    /// Keeps `kernel`'s current home folder across its restarts (a restart otherwise gets a
    /// fresh one, with a fresh process from the pool), and returns it; `None` if the kernel
    /// has no process.
    pub fn pin_home(&self, kernel: &Kernel) -> Option<Arc<Home>> {
        let home = kernel.process()?.home().clone();
        kernel.set_pinned_home(home.clone());
        Some(home)
    }

    async fn start_inner(
        &self,
        owner: &str,
        name: &str,
        home: Option<Arc<Home>>,
    ) -> Result<Arc<Kernel>, SessionError> {
        if crate::kernelspec::display_name(name).is_none() {
            return Err(SessionError::NoSuchKernelSpec(name.to_owned()));
        }
        if self.0.closing.load(Ordering::SeqCst) {
            return Err(SessionError::ShuttingDown);
        }
        let max = self.0.config.max_kernels;
        let reserved = self.0.starting.fetch_add(1, Ordering::SeqCst);
        let running = self.count();
        if running + reserved >= max {
            self.start_ended();
            return Err(SessionError::Limit { running, max });
        }
        let result = self.take_process(owner, None, home.clone()).await;
        let (process, incoming) = match result {
            Ok(ready) => ready,
            Err(e) => {
                self.start_ended();
                return Err(e.into());
            }
        };
        if self.0.closing.load(Ordering::SeqCst) {
            // The gateway began shutting down while this kernel started: it is not kept.
            process.shutdown(self.0.config.shutdown_grace).await;
            self.start_ended();
            return Err(SessionError::ShuttingDown);
        }
        let kernel = Arc::new(Kernel::new(
            process.id,
            name.to_owned(),
            owner.to_owned(),
            self.0.observer.clone(),
            self.0.hook.clone(),
            self.0.config.iopub_rate,
        ));
        if let Some(home) = home {
            kernel.set_pinned_home(home);
        }
        kernel.start_forwarder(self.0.launch.startup_timeout);
        kernel.set_state(ExecutionState::Idle);
        let process = Arc::new(process);
        kernel.set_process(Some(process.clone()));
        self.map_mut().insert(kernel.id, kernel.clone());
        self.start_ended();
        self.spawn_pump(kernel.clone(), process, incoming);
        tracing::info!(kernel = %kernel.id, owner, "kernel started");
        Ok(kernel)
    }

    /// A start outside the pool is over (its kernel is registered, or it failed).
    fn start_ended(&self) {
        self.0.starting.fetch_sub(1, Ordering::SeqCst);
        self.0.launch_ended.notify_waiters();
    }

    /// A ready process for `owner`: with `home`, a fresh launch with that home folder;
    /// without, from the pool if it has a live one (the pool's kernels see the default user's
    /// workspace), else a fresh launch with a new home. A fresh launch has `owner`'s workspace
    /// and a new id unless `id` is given.
    async fn take_process(
        &self,
        owner: &str,
        id: Option<uuid::Uuid>,
        home: Option<Arc<Home>>,
    ) -> Result<Ready, ClientError> {
        if home.is_none() && owner == crate::auth::DEFAULT_USER {
            loop {
                let pooled = self.0.pool.lock().await.pop_front();
                self.0.pool_changed.notify_one();
                match pooled {
                    Some((p, rx)) if !p.has_exited() => return Ok((p, rx)),
                    Some(_) => continue,
                    None => break,
                }
            }
        }
        let id = id.unwrap_or_else(uuid::Uuid::new_v4);
        let home = match home {
            Some(home) => home,
            None => self.0.launch.new_home()?,
        };
        Process::launch(&self.0.launch, id, owner, &(self.0.live_dir)(owner), home).await
    }

    async fn fill_pool(&self) {
        loop {
            // Made before the checks below, so a change (or the shutdown) that comes between
            // them and the wait at the end is not missed.
            let changed = self.0.pool_changed.notified();
            let want = self.0.config.pool_size;
            let have = self.0.pool.lock().await.len() + self.0.filling.load(Ordering::SeqCst);
            if want > have && !self.0.closing.load(Ordering::SeqCst) {
                self.0.filling.fetch_add(1, Ordering::SeqCst);
                let workspace = (self.0.live_dir)(crate::auth::DEFAULT_USER);
                let launched = match self.0.launch.new_home() {
                    Ok(home) => {
                        Process::launch(
                            &self.0.launch,
                            uuid::Uuid::new_v4(),
                            crate::auth::DEFAULT_USER,
                            &workspace,
                            home,
                        )
                        .await
                    }
                    Err(e) => Err(e),
                };
                // The launch counts as in flight until its process is pooled or, if the gateway
                // began shutting down meanwhile, shut down: `shutdown_all` waits for that.
                let failed = match launched {
                    Ok(ready) if self.0.closing.load(Ordering::SeqCst) => {
                        ready.0.shutdown(self.0.config.shutdown_grace).await;
                        None
                    }
                    Ok(ready) => {
                        self.0.pool.lock().await.push_back(ready);
                        None
                    }
                    Err(e) => Some(e),
                };
                self.0.filling.fetch_sub(1, Ordering::SeqCst);
                self.0.launch_ended.notify_waiters();
                if let Some(e) = failed {
                    tracing::error!(error = %e, "cannot start a kernel for the warm pool");
                    // Do not spin on a broken set-up: wait for a kernel to be taken (or the
                    // next cull tick) before trying again.
                    tokio::select! {
                        () = self.0.pool_changed.notified() => {}
                        () = tokio::time::sleep(self.0.config.cull_interval) => {}
                    }
                }
                continue;
            }
            if self.0.closing.load(Ordering::SeqCst) {
                return;
            }
            changed.await;
        }
    }

    fn spawn_pump(
        &self,
        kernel: Arc<Kernel>,
        process: Arc<Process>,
        mut incoming: mpsc::Receiver<Incoming>,
    ) {
        let me = self.clone();
        tokio::spawn(async move {
            while let Some(event) = incoming.recv().await {
                match event {
                    Incoming::Message(message) => {
                        let Some(message) = kernel.rewrite(message) else {
                            continue;
                        };
                        if let Some(before) = me.0.observer.message(&kernel, &message) {
                            before.await;
                        }
                        kernel.dispatch(message).await
                    }
                    Incoming::Died(reason) => {
                        me.on_death(&kernel, &process, reason).await;
                        return;
                    }
                }
            }
        });
    }

    /// The process behind `kernel` died or stopped answering.
    async fn on_death(&self, kernel: &Arc<Kernel>, process: &Arc<Process>, reason: String) {
        let current = kernel.process();
        if !current.is_some_and(|c| Arc::ptr_eq(&c, process)) {
            return; // An older generation, replaced on purpose.
        }
        if !process.has_exited() {
            process.kill().await;
        }
        let expect = kernel.lock().expect;
        match expect {
            Expect::Exit { restart: false } => {
                tracing::info!(kernel = %kernel.id, "kernel exited after a shutdown request");
                self.remove(kernel, ExecutionState::Dead).await;
            }
            Expect::Exit { restart: true } => {
                if let Err(e) = self.restart_kernel(kernel, false).await {
                    tracing::error!(kernel = %kernel.id, error = %e, "restart failed");
                }
            }
            Expect::Running => {
                if self.0.closing.load(Ordering::SeqCst) {
                    return;
                }
                let allowed = {
                    let mut s = kernel.lock();
                    let window = self.0.config.restart_window;
                    while s.restarts.front().is_some_and(|t| t.elapsed() > window) {
                        s.restarts.pop_front();
                    }
                    s.restarts.len() < self.0.config.restart_limit
                };
                if !allowed {
                    tracing::error!(kernel = %kernel.id, %reason, "kernel died too often; giving up");
                    kernel.set_process(None);
                    kernel.set_state(ExecutionState::Dead);
                    kernel.publish_status(ExecutionState::Dead).await;
                    return;
                }
                tracing::warn!(kernel = %kernel.id, %reason, "kernel died; restarting it");
                kernel.lock().restarts.push_back(Instant::now());
                if let Err(e) = self.restart_kernel(kernel, false).await {
                    tracing::error!(kernel = %kernel.id, error = %e, "automatic restart failed");
                    kernel.set_state(ExecutionState::Dead);
                    kernel.publish_status(ExecutionState::Dead).await;
                }
            }
        }
    }

    /// Restarts `owner`'s kernel `id` (REST `POST /api/kernels/{id}/restart`).
    pub async fn restart(&self, owner: &str, id: &str) -> Result<Arc<Kernel>, SessionError> {
        let kernel = self.get(owner, id)?;
        self.restart_kernel(&kernel, true).await?;
        Ok(kernel)
    }

    /// Puts a fresh process (from the pool when possible) behind `kernel` and retires the old
    /// one. Clients stay connected and see `restarting`, then the new process's status.
    async fn restart_kernel(
        &self,
        kernel: &Arc<Kernel>,
        graceful: bool,
    ) -> Result<(), SessionError> {
        let _guard = kernel.lifecycle.lock().await;
        if self.0.closing.load(Ordering::SeqCst) {
            return Err(SessionError::ShuttingDown);
        }
        kernel.set_state(ExecutionState::Restarting);
        // As Jupyter Server: clients hear `restarting` only when the gateway restarts a crashed
        // kernel on its own; a client that asked for the restart reconnects by itself.
        if !graceful {
            kernel.publish_status(ExecutionState::Restarting).await;
        }
        let old = kernel.set_process(None);
        let retire = async {
            if let Some(old) = old {
                if graceful {
                    old.shutdown(self.0.config.shutdown_grace).await;
                } else {
                    old.kill().await;
                }
            }
        };
        let (retired, fresh) = tokio::join!(
            retire,
            self.take_process(&kernel.owner, Some(kernel.id), kernel.pinned_home())
        );
        let () = retired;
        self.0.released.kernel_ended();
        let (process, incoming) = match fresh {
            Ok(ready) => ready,
            Err(e) => {
                kernel.set_state(ExecutionState::Dead);
                kernel.publish_status(ExecutionState::Dead).await;
                return Err(e.into());
            }
        };
        let process = Arc::new(process);
        {
            let mut s = kernel.lock();
            s.expect = Expect::Running;
            s.execution_state = ExecutionState::Idle;
            s.last_activity = Utc::now();
        }
        kernel.set_process(Some(process.clone()));
        self.spawn_pump(kernel.clone(), process, incoming);
        if !graceful {
            // The new process's own `starting` went out before anyone listened: tell clients
            // that saw `restarting` that it is ready.
            kernel.publish_status(ExecutionState::Idle).await;
        }
        tracing::info!(kernel = %kernel.id, "kernel restarted");
        Ok(())
    }

    /// Interrupts `owner`'s kernel `id` (an `interrupt_request` on control).
    pub async fn interrupt(&self, owner: &str, id: &str) -> Result<(), SessionError> {
        let kernel = self.get(owner, id)?;
        kernel.note_interrupt();
        let process = kernel.process().ok_or(ClientError::Gone)?;
        process
            .request(Channel::Control, "interrupt_request", json!({}))
            .await?;
        Ok(())
    }

    /// Shuts down `owner`'s kernel `id` and forgets it.
    pub async fn shutdown(&self, owner: &str, id: &str) -> Result<(), SessionError> {
        let kernel = self.get(owner, id)?;
        self.remove(&kernel, ExecutionState::Dead).await;
        Ok(())
    }

    async fn remove(&self, kernel: &Arc<Kernel>, final_state: ExecutionState) {
        let _guard = kernel.lifecycle.lock().await;
        self.map_mut().remove(&kernel.id);
        kernel.set_state(final_state);
        kernel.lock().expect = Expect::Exit { restart: false };
        let process = kernel.set_process(None);
        kernel.kick_all("the kernel was shut down");
        if let Some(p) = process {
            p.shutdown(self.0.config.shutdown_grace).await;
        }
        self.0.observer.kernel_ended(kernel);
        self.0.released.kernel_ended();
        tracing::info!(kernel = %kernel.id, "kernel shut down");
    }

    async fn cull_loop(&self) {
        let mut tick = tokio::time::interval(self.0.config.cull_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            if self.0.closing.load(Ordering::SeqCst) {
                return;
            }
            self.cull_once().await;
        }
    }

    /// One culling pass: shuts down kernels idle past the timeout.
    pub async fn cull_once(&self) {
        let kernels: Vec<Arc<Kernel>> = self.map().values().cloned().collect();
        for kernel in kernels {
            kernel.expire_mailboxes();
            let Some(timeout) = self.0.config.cull_idle_timeout else {
                continue;
            };
            if kernel.is_managed() {
                continue;
            }
            let (idle_for, state, connections) = {
                let s = kernel.lock();
                let idle = (Utc::now() - s.last_activity).to_std().unwrap_or_default();
                (idle, s.execution_state, s.connections)
            };
            let state_ok = match state {
                ExecutionState::Idle | ExecutionState::Dead => true,
                ExecutionState::Busy => self.0.config.cull_busy,
                ExecutionState::Starting | ExecutionState::Restarting => false,
            };
            if idle_for >= timeout && state_ok && (connections == 0 || self.0.config.cull_connected)
            {
                tracing::info!(
                    kernel = %kernel.id,
                    idle_s = idle_for.as_secs(),
                    connections,
                    "culling an idle kernel"
                );
                self.remove(&kernel, ExecutionState::Dead).await;
            }
        }
    }

    /// Shuts down every kernel and the pool (on SIGTERM / Ctrl-C).
    pub async fn shutdown_all(&self) {
        self.0.closing.store(true, Ordering::SeqCst);
        self.0.pool_changed.notify_waiters();
        // Launches in flight (pool refills, starts) end first: each sees `closing` and shuts
        // its process down, so no kernel outlives the gateway. A launch gives up after its
        // start-up timeout.
        let patience = self.0.launch.startup_timeout + self.0.config.shutdown_grace;
        let _ = tokio::time::timeout(patience, async {
            loop {
                let ended = self.0.launch_ended.notified();
                let in_flight =
                    self.0.starting.load(Ordering::SeqCst) + self.0.filling.load(Ordering::SeqCst);
                if in_flight == 0 {
                    return;
                }
                ended.await;
            }
        })
        .await;
        let kernels: Vec<Arc<Kernel>> = self.map().values().cloned().collect();
        let pooled: Vec<Ready> = self.0.pool.lock().await.drain(..).collect();
        let grace = self.0.config.shutdown_grace;
        let mut tasks = tokio::task::JoinSet::new();
        for kernel in kernels {
            let me = self.clone();
            tasks.spawn(async move { me.remove(&kernel, ExecutionState::Dead).await });
        }
        for (process, _) in pooled {
            tasks.spawn(async move { process.shutdown(grace).await });
        }
        while tasks.join_next().await.is_some() {}
    }
}

#[cfg(test)]
mod tests;
