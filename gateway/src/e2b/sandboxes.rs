//! The sandboxes of the E2B-compatible API: each is one or more Sandgate kernels (its code
//! contexts, the first one the default) of one user, with the tokens its data plane requires,
//! the caller's metadata and environment, and a deadline after which it is killed.
//!
//! A sandbox's files are its home folder, `/home/user` in every one of its contexts (the
//! default context's, shared by the others, and removed when the sandbox ends), and the user's
//! encrypted workspace at `/workspace`, which outlives it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde_json::{Map, Value, json};
use tokio::sync::watch;

use crate::home::Home;
use crate::session::{Kernel, Kernels, SessionError};

/// The version of E2B's in-sandbox daemon (envd) this API speaks. The SDK gates features on
/// it: 0.5.7 gives multipart and octet-stream uploads and no `X-Metadata-*` upload headers.
pub const ENVD_VERSION: &str = "0.5.7";
/// What `clientID` says.
pub const CLIENT_ID: &str = "sandgate";
/// E2B's default lifetime of a sandbox, seconds.
pub const DEFAULT_TIMEOUT_S: u64 = 300;
/// The working directory of contexts, unless the caller names another: the sandbox's home.
pub const DEFAULT_CWD: &str = "/home/user";
/// The longest lifetime one call may ask for, seconds (E2B's limit for its paid tier).
pub const MAX_TIMEOUT_S: u64 = 24 * 3600;

/// The id of the one sandbox of E2B's debug ports (what the SDK uses with `E2B_DEBUG=true`).
pub const DEBUG_ID: &str = "debug_sandbox_id";

/// E2B template names and the kernelspec each runs.
pub const TEMPLATES: &[(&str, &str)] = &[
    ("code-interpreter-v1", crate::kernelspec::NAME),
    ("base", crate::kernelspec::NAME),
    (crate::kernelspec::NAME, crate::kernelspec::NAME),
    ("python3", "python3"),
];

/// The kernelspec of template `name`, if offered.
pub fn kernelspec_of(template: &str) -> Option<&'static str> {
    TEMPLATES
        .iter()
        .find(|(t, _)| *t == template)
        .map(|(_, k)| *k)
}

/// The template names offered, for error messages.
pub fn template_names() -> String {
    TEMPLATES
        .iter()
        .map(|(t, _)| *t)
        .collect::<Vec<_>>()
        .join(", ")
}

/// A code context: one interpreter (kernel) in a sandbox.
#[derive(Debug, Clone)]
pub struct Context {
    /// Its id (the kernel's id).
    pub id: String,
    /// Its language.
    pub language: String,
    /// Its working directory.
    pub cwd: String,
    /// The kernel.
    pub kernel: Arc<Kernel>,
    /// The kernel process the context was last set up in (its environment and working
    /// directory); a restart (asked for, or after a crash) gives a new one to set up again.
    pub set_up_in: Arc<std::sync::atomic::AtomicUsize>,
    /// Held by a run with its own environment from setting it to putting it back, so two such
    /// runs cannot interleave (one's save would capture the other's variables).
    pub env_turn: Arc<tokio::sync::Mutex<()>>,
}

impl Context {
    /// A context on `kernel`, not set up yet.
    pub fn new(kernel: Arc<Kernel>, cwd: String) -> Context {
        Context {
            id: kernel.id.to_string(),
            language: "python".into(),
            cwd,
            kernel,
            set_up_in: Arc::default(),
            env_turn: Arc::default(),
        }
    }

    /// An identity of the kernel's current process (0: none).
    pub fn process_id(&self) -> usize {
        self.kernel
            .process()
            .map_or(0, |p| Arc::as_ptr(&p) as usize)
    }
}

impl Context {
    /// The JSON the SDK reads.
    pub fn model(&self) -> Value {
        json!({"id": self.id, "language": self.language, "cwd": self.cwd})
    }
}

/// One sandbox.
#[derive(Debug)]
pub struct Sandbox {
    /// `sg` and 32 hex digits (128 random bits).
    pub id: String,
    /// The user it belongs to.
    pub owner: String,
    /// The template it was made from.
    pub template: String,
    /// The kernelspec its contexts run.
    pub kernelspec: String,
    /// Required on envd calls (`X-Access-Token`) and on `/execute`.
    pub envd_token: String,
    /// Required on every code-interpreter call (`E2B-Traffic-Access-Token`).
    pub traffic_token: String,
    /// The caller's metadata.
    pub metadata: Map<String, Value>,
    /// The guest environment of every context (never the host's).
    pub env_vars: Map<String, Value>,
    /// When it was made.
    pub started: DateTime<Utc>,
    /// Its home folder (`/home/user` of every context), removed when the sandbox is dropped.
    pub home: Arc<Home>,
    /// When it will be killed unless extended.
    end: watch::Sender<DateTime<Utc>>,
    /// Its contexts, the default first.
    contexts: Mutex<Vec<Context>>,
    /// Set (under the `contexts` lock) when the sandbox ends: no context may join it after.
    ended: std::sync::atomic::AtomicBool,
}

impl Sandbox {
    /// When it ends.
    pub fn end_at(&self) -> DateTime<Utc> {
        *self.end.borrow()
    }

    /// Its contexts, the default first.
    pub fn contexts(&self) -> Vec<Context> {
        self.contexts
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The default context.
    pub fn default_context(&self) -> Option<Context> {
        self.contexts().into_iter().next()
    }

    /// The context `id`.
    pub fn context(&self, id: &str) -> Option<Context> {
        self.contexts().into_iter().find(|c| c.id == id)
    }

    /// Adds a context.
    /// Adds a context; gives it back if the sandbox has ended meanwhile (its kernel is then
    /// the caller's to shut down).
    pub fn add_context(&self, context: Context) -> Result<(), Context> {
        let mut contexts = self.contexts.lock().unwrap_or_else(|e| e.into_inner());
        if self.ended.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(context);
        }
        contexts.push(context);
        Ok(())
    }

    /// Removes context `id`; returns it.
    pub fn remove_context(&self, id: &str) -> Option<Context> {
        let mut contexts = self.contexts.lock().unwrap_or_else(|e| e.into_inner());
        let at = contexts.iter().position(|c| c.id == id)?;
        Some(contexts.remove(at))
    }

    /// The control plane's model (`GET /sandboxes/{id}`, list entries).
    pub fn model(&self, memory_mb: u64, disk_mb: u64) -> Value {
        json!({
            "templateID": self.template,
            "sandboxID": self.id,
            "clientID": CLIENT_ID,
            "alias": self.template,
            "startedAt": crate::session::kernel::timestamp(self.started),
            "endAt": crate::session::kernel::timestamp(self.end_at()),
            "envdVersion": ENVD_VERSION,
            "cpuCount": 1,
            "memoryMB": memory_mb,
            "diskSizeMB": disk_mb,
            "metadata": self.metadata,
            "state": "running",
        })
    }

    /// The create and connect reply: the model plus the tokens.
    pub fn created(&self) -> Value {
        json!({
            "templateID": self.template,
            "sandboxID": self.id,
            "clientID": CLIENT_ID,
            "alias": self.template,
            "envdVersion": ENVD_VERSION,
            "envdAccessToken": self.envd_token,
            "trafficAccessToken": self.traffic_token,
            "domain": Value::Null,
        })
    }
}

/// What a new sandbox is made with.
#[derive(Debug, Clone)]
pub struct NewSandbox {
    /// Its template.
    pub template: String,
    /// Seconds to live.
    pub timeout_s: u64,
    /// The caller's metadata.
    pub metadata: Map<String, Value>,
    /// The guest environment.
    pub env_vars: Map<String, Value>,
}

/// Every sandbox of the gateway.
#[derive(Clone)]
pub struct Sandboxes {
    map: Arc<Mutex<HashMap<String, Arc<Sandbox>>>>,
    kernels: Kernels,
    /// Serialises the making of the debug ports' sandbox.
    debug: Arc<tokio::sync::Mutex<()>>,
}

/// Why a sandbox call failed.
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    /// No such sandbox (or another user's).
    #[error("sandbox {0} not found")]
    NotFound(String),
    /// No such template.
    #[error("no template named {0:?}; this gateway offers {offered}", offered = template_names())]
    NoSuchTemplate(String),
    /// No such context in the sandbox.
    #[error("context {0} not found")]
    NoSuchContext(String),
    /// The kernel layer refused or failed.
    #[error(transparent)]
    Session(#[from] SessionError),
}

fn random_hex(bytes: usize) -> String {
    let mut b = vec![0u8; bytes];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut b)
        .expect("the system's random source works");
    hex::encode(b)
}

impl Sandboxes {
    /// An empty registry over `kernels`.
    pub fn new(kernels: Kernels) -> Sandboxes {
        Sandboxes {
            map: Arc::default(),
            kernels,
            debug: Arc::default(),
        }
    }

    /// The kernels.
    pub fn kernels(&self) -> &Kernels {
        &self.kernels
    }

    /// Makes a sandbox for `owner`: its default context's kernel (from the warm pool when one
    /// is ready), its tokens, and the timer that kills it at its deadline.
    pub async fn create(&self, owner: &str, new: NewSandbox) -> Result<Arc<Sandbox>, SandboxError> {
        self.create_as(format!("sg{}", random_hex(16)), owner, new)
            .await
    }

    /// The sandbox of E2B's debug ports, made on first use (and again after it timed out); each
    /// use keeps it alive for [`MAX_TIMEOUT_S`] more.
    pub async fn debug_sandbox(&self) -> Result<Arc<Sandbox>, SandboxError> {
        let _one_at_a_time = self.debug.lock().await;
        if let Some(sandbox) = self.find(DEBUG_ID) {
            self.set_timeout(&sandbox, MAX_TIMEOUT_S);
            return Ok(sandbox);
        }
        let new = NewSandbox {
            template: "code-interpreter-v1".into(),
            timeout_s: MAX_TIMEOUT_S,
            metadata: Map::new(),
            env_vars: Map::new(),
        };
        let sandbox = self
            .create_as(DEBUG_ID.to_owned(), crate::auth::DEFAULT_USER, new)
            .await?;
        // As a created one: its contexts start in its home.
        if let Some(context) = sandbox.default_context()
            && let Err(e) = super::interpreter::set_up(&sandbox, &context).await
        {
            tracing::warn!(error = %e, "the debug sandbox's set-up failed; its default context \
                           starts in /workspace");
        }
        Ok(sandbox)
    }

    async fn create_as(
        &self,
        id: String,
        owner: &str,
        new: NewSandbox,
    ) -> Result<Arc<Sandbox>, SandboxError> {
        let kernelspec = kernelspec_of(&new.template)
            .ok_or_else(|| SandboxError::NoSuchTemplate(new.template.clone()))?;
        let kernel = self.kernels.start(owner, kernelspec).await?;
        kernel.set_managed();
        // Its home is the sandbox's: kept across restarts, shared with later contexts.
        let Some(home) = self.kernels.pin_home(&kernel) else {
            let _ = self.kernels.shutdown(owner, &kernel.id.to_string()).await;
            return Err(SandboxError::Session(SessionError::NotFound(
                kernel.id.to_string(),
            )));
        };
        let now = Utc::now();
        let (end, _) = watch::channel(now + timeout(new.timeout_s));
        let sandbox = Arc::new(Sandbox {
            id,
            owner: owner.to_owned(),
            template: new.template,
            kernelspec: kernelspec.to_owned(),
            envd_token: random_hex(32),
            traffic_token: random_hex(32),
            metadata: new.metadata,
            env_vars: new.env_vars,
            started: now,
            home,
            end,
            contexts: Mutex::new(vec![Context::new(kernel, DEFAULT_CWD.into())]),
            ended: std::sync::atomic::AtomicBool::new(false),
        });
        self.map
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(sandbox.id.clone(), sandbox.clone());
        self.spawn_timer(&sandbox);
        tracing::info!(owner, "sandbox created");
        Ok(sandbox)
    }

    /// `owner`'s sandbox `id`; another user's is not found, as a missing one.
    pub fn get(&self, owner: &str, id: &str) -> Result<Arc<Sandbox>, SandboxError> {
        self.map
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(id)
            .filter(|s| s.owner == owner)
            .cloned()
            .ok_or_else(|| SandboxError::NotFound(id.to_owned()))
    }

    /// Sandbox `id` whoever owns it (the data plane, which authenticates by the sandbox's own
    /// tokens).
    pub fn find(&self, id: &str) -> Option<Arc<Sandbox>> {
        self.map
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(id)
            .cloned()
    }

    /// `owner`'s sandboxes, oldest first.
    pub fn list(&self, owner: &str) -> Vec<Arc<Sandbox>> {
        let mut v: Vec<Arc<Sandbox>> = self
            .map
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .filter(|s| s.owner == owner)
            .cloned()
            .collect();
        v.sort_by(|a, b| a.started.cmp(&b.started).then_with(|| a.id.cmp(&b.id)));
        v
    }

    /// Sets the sandbox to end `timeout_s` from now.
    pub fn set_timeout(&self, sandbox: &Sandbox, timeout_s: u64) {
        sandbox.end.send_replace(Utc::now() + timeout(timeout_s));
    }

    /// Kills `owner`'s sandbox `id`: every context's kernel is shut down.
    pub async fn kill(&self, owner: &str, id: &str) -> Result<(), SandboxError> {
        let sandbox = self.get(owner, id)?;
        self.end(&sandbox).await;
        Ok(())
    }

    async fn end(&self, sandbox: &Arc<Sandbox>) {
        let removed = self
            .map
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&sandbox.id);
        if removed.is_none() {
            return; // Ended already (the timer and a kill can meet).
        }
        // Wakes the timer, which then finds the sandbox gone.
        sandbox.end.send_replace(Utc::now());
        let contexts = {
            let contexts = sandbox.contexts.lock().unwrap_or_else(|e| e.into_inner());
            sandbox
                .ended
                .store(true, std::sync::atomic::Ordering::SeqCst);
            contexts.clone()
        };
        for context in contexts {
            if let Err(e) = self
                .kernels
                .shutdown(&sandbox.owner, &context.kernel.id.to_string())
                .await
            {
                tracing::debug!(error = %e, "a sandbox's kernel was gone already");
            }
        }
        tracing::info!(owner = sandbox.owner, "sandbox ended");
    }

    /// Kills the sandbox when its deadline passes; a new deadline restarts the wait.
    fn spawn_timer(&self, sandbox: &Arc<Sandbox>) {
        let me = self.clone();
        let weak = Arc::downgrade(sandbox);
        let mut end = sandbox.end.subscribe();
        tokio::spawn(async move {
            loop {
                let deadline = *end.borrow_and_update();
                let left = (deadline - Utc::now()).to_std().unwrap_or(Duration::ZERO);
                tokio::select! {
                    () = tokio::time::sleep(left) => {}
                    changed = end.changed() => {
                        if changed.is_err() {
                            return;
                        }
                        continue;
                    }
                }
                let Some(sandbox) = weak.upgrade() else {
                    return;
                };
                if me.find(&sandbox.id).is_none() {
                    return;
                }
                if Utc::now() >= sandbox.end_at() {
                    tracing::info!(owner = sandbox.owner, "sandbox timed out");
                    me.end(&sandbox).await;
                    return;
                }
            }
        });
    }

    /// Ends every sandbox (the gateway is stopping; the kernels go with it anyway).
    pub fn forget_all(&self) {
        self.map.lock().unwrap_or_else(|e| e.into_inner()).clear();
    }
}

fn timeout(seconds: u64) -> chrono::Duration {
    chrono::Duration::seconds(seconds.min(MAX_TIMEOUT_S) as i64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn templates_name_kernelspecs() {
        assert_eq!(
            kernelspec_of("code-interpreter-v1"),
            Some(crate::kernelspec::NAME)
        );
        assert_eq!(kernelspec_of("python3"), Some("python3"));
        assert_eq!(kernelspec_of("nope"), None);
        let e = SandboxError::NoSuchTemplate("nope".into()).to_string();
        assert!(
            e.contains("code-interpreter-v1") && e.contains("base"),
            "{e}"
        );
    }

    #[test]
    fn ids_and_tokens_are_random_and_long() {
        let a = random_hex(16);
        assert_eq!(a.len(), 32);
        assert_ne!(a, random_hex(16));
    }
}
