//! The session layer over [`crate::launch::fake::FakeLauncher`]: start, restart, automatic
//! restart and its limit, culling, reply routing and the warm pool, each through the same
//! channels, ordering and heartbeat a real kernel gets. Every wait has a deadline.

use std::sync::Arc;
use std::time::Duration;

use serde_json::{Value, json};

use super::*;
use crate::client::Transport;
use crate::envelope::MsgType;
use crate::launch::fake::FakeLauncher;

/// How long any one wait may take.
const DEADLINE: Duration = Duration::from_secs(10);

struct Setup {
    kernels: Kernels,
    fake: FakeLauncher,
    _dir: tempfile::TempDir,
}

fn config() -> LifecycleConfig {
    LifecycleConfig {
        max_kernels: 8,
        pool_size: 0,
        cull_idle_timeout: None,
        cull_interval: Duration::from_secs(60),
        cull_connected: false,
        cull_busy: false,
        shutdown_grace: Duration::from_secs(2),
        restart_limit: 5,
        restart_window: Duration::from_secs(60),
        iopub_rate: RateLimit {
            messages_per_s: 1000,
            bytes_per_s: 10_000_000,
            window: Duration::from_secs(3),
        },
    }
}

impl Setup {
    /// Starts a kernel for `owner` and expects it to start.
    async fn start(&self, owner: &str) -> Arc<Kernel> {
        self.kernels
            .start(owner, crate::kernelspec::NAME)
            .await
            .expect("the kernel starts")
    }
}

fn setup(config: LifecycleConfig) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let runtime_dir = dir.path().join("rt");
    let live = dir.path().join("live");
    std::fs::create_dir(&runtime_dir).unwrap();
    std::fs::create_dir(&live).unwrap();
    let homes = crate::home::Homes::open(&dir.path().join("homes")).unwrap();
    let fake = FakeLauncher::default();
    let spec = LaunchSpec {
        launcher: Arc::new(fake.clone()),
        runtime_dir,
        homes: Arc::new(homes),
        startup_timeout: DEADLINE,
        heartbeat_interval: Duration::from_millis(200),
        heartbeat_misses: 3,
        transport: Transport::Ipc,
        packages: None,
    };
    let live_dir: LiveDir = Arc::new(move |_| live.clone());
    let kernels = Kernels::new(config, spec, live_dir, Arc::new(NoObserver), None);
    Setup {
        kernels,
        fake,
        _dir: dir,
    }
}

/// A client attached to a kernel under a session of its own.
struct Client {
    kernel: Arc<Kernel>,
    attachment: Attachment,
}

impl Client {
    fn new(kernel: &Arc<Kernel>, session: &str) -> Client {
        Client {
            kernel: kernel.clone(),
            attachment: kernel.attach(Some(session)),
        }
    }

    /// Sends `code` to run; returns the request's `msg_id`.
    async fn execute(&self, code: &str) -> String {
        let session = &self.attachment.session;
        // As the WebSocket relay does: the socket that sends is its session's primary.
        self.kernel.spoke(&self.attachment);
        let header = crate::client::header("execute_request", session);
        let id = header["msg_id"].as_str().unwrap().to_owned();
        let content = json!({"code": code, "silent": false, "store_history": true,
                             "user_expressions": {}, "allow_stdin": false});
        self.kernel
            .send_from_client(
                session,
                Channel::Shell,
                crate::client::own_message(&header, &content),
                Some(id.clone()),
                MsgType::ExecuteRequest,
                DEADLINE,
            )
            .await
            .unwrap();
        id
    }

    /// What this client receives until `done` says the last message ends the wait.
    async fn until(&self, mut done: impl FnMut(&KernelMessage) -> bool) -> Vec<Outgoing> {
        let mut seen = Vec::new();
        tokio::time::timeout(DEADLINE, async {
            loop {
                let mut batch = self.kernel.next_batch(&self.attachment).await.into_iter();
                while let Some(m) = batch.next() {
                    let end = done(&m);
                    seen.push(m);
                    if end {
                        // The rest is for the next wait.
                        self.kernel.give_back(&self.attachment, batch.collect());
                        return;
                    }
                }
            }
        })
        .await
        .unwrap_or_else(|_| panic!("timed out; received {:?}", types(&seen)));
        seen
    }

    /// What this client receives until the request `id` has its reply and its `idle`.
    async fn until_done(&self, id: &str) -> Vec<Outgoing> {
        let (mut replied, mut idle) = (false, false);
        self.until(|m| {
            if m.envelope.parent.msg_id.as_deref() == Some(id) {
                replied |= m.envelope.msg_type == MsgType::ExecuteReply;
                idle |= status(m).as_deref() == Some("idle");
            }
            replied && idle
        })
        .await
    }

    /// What this client receives until a `status` of `state`.
    async fn until_status(&self, state: &str) -> Vec<Outgoing> {
        self.until(|m| status(m).as_deref() == Some(state)).await
    }
}

fn content(m: &KernelMessage) -> Value {
    serde_json::from_slice(&m.raw.content).unwrap_or(Value::Null)
}

fn status(m: &KernelMessage) -> Option<String> {
    (m.envelope.msg_type == MsgType::Status)
        .then(|| content(m)["execution_state"].as_str().map(str::to_owned))
        .flatten()
}

fn types(seen: &[Outgoing]) -> Vec<String> {
    seen.iter()
        .map(|m| format!("{}:{}", m.channel.as_str(), m.envelope.msg_type.as_str()))
        .collect()
}

fn reply_to<'a>(seen: &'a [Outgoing], id: &str) -> Option<&'a Outgoing> {
    seen.iter().find(|m| {
        m.envelope.msg_type == MsgType::ExecuteReply
            && m.envelope.parent.msg_id.as_deref() == Some(id)
    })
}

/// Waits until `check` holds, looking again whenever a tick passes; `DEADLINE` at most.
async fn eventually(mut check: impl AsyncFnMut() -> bool) -> bool {
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while tokio::time::Instant::now() < deadline {
        if check().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    check().await
}

#[tokio::test]
async fn a_started_kernel_runs_code_in_order() {
    let s = setup(config());
    let kernel = s.start("alice").await;
    assert_eq!(kernel.execution_state(), ExecutionState::Idle);
    assert_eq!(s.fake.launches(), 1);
    let client = Client::new(&kernel, "one");
    let id = client.execute("hello").await;
    let seen = client.until_done(&id).await;
    let order: Vec<String> = seen
        .iter()
        .filter(|m| m.envelope.parent.msg_id.as_deref() == Some(id.as_str()))
        .map(|m| status(m).unwrap_or_else(|| m.envelope.msg_type.as_str().to_owned()))
        .collect();
    assert_eq!(
        order,
        ["busy", "execute_input", "stream", "execute_reply", "idle"],
        "{:?}",
        types(&seen)
    );
    s.kernels
        .shutdown("alice", &kernel.id.to_string())
        .await
        .unwrap();
    assert!(s.kernels.list("alice").is_empty());
}

#[tokio::test]
async fn replies_go_to_the_client_that_asked() {
    let s = setup(config());
    let kernel = s.start("alice").await;
    let (a, b) = (Client::new(&kernel, "a"), Client::new(&kernel, "b"));
    let id_a = a.execute("from a").await;
    let id_b = b.execute("from b").await;
    let seen_a = a.until_done(&id_a).await;
    let seen_b = b.until_done(&id_b).await;
    assert!(reply_to(&seen_a, &id_a).is_some());
    assert!(reply_to(&seen_a, &id_b).is_none(), "{:?}", types(&seen_a));
    assert!(reply_to(&seen_b, &id_b).is_some());
    assert!(reply_to(&seen_b, &id_a).is_none(), "{:?}", types(&seen_b));
    // Output is for everyone: a saw b's cell run too (it ran after a's).
    let b_output = |m: &&Outgoing| {
        m.envelope.msg_type == MsgType::Stream
            && m.envelope.parent.msg_id.as_deref() == Some(id_b.as_str())
    };
    let more = a
        .until(|m| {
            status(m).as_deref() == Some("idle")
                && m.envelope.parent.msg_id.as_deref() == Some(id_b.as_str())
        })
        .await;
    assert!(seen_a.iter().chain(&more).any(|m| b_output(&m)));
    s.kernels.shutdown_all().await;
}

#[tokio::test]
async fn a_restart_puts_a_new_process_behind_the_same_kernel() {
    let s = setup(config());
    let kernel = s.start("alice").await;
    let first = kernel.process().unwrap();
    let client = Client::new(&kernel, "one");
    let id = client.execute("x").await;
    client.until_done(&id).await;
    let again = s
        .kernels
        .restart("alice", &kernel.id.to_string())
        .await
        .unwrap();
    assert_eq!(again.id, kernel.id);
    assert_eq!(s.fake.launches(), 2);
    // The old one was asked to shut down and is gone; the new one counts from 1.
    assert!(first.has_exited());
    let second = kernel.process().unwrap();
    assert!(!Arc::ptr_eq(&first, &second));
    assert_eq!(second.id, kernel.id);
    let id = client.execute("y").await;
    let seen = client.until_done(&id).await;
    assert_eq!(content(reply_to(&seen, &id).unwrap())["execution_count"], 1);
    s.kernels.shutdown_all().await;
}

#[tokio::test]
async fn a_dead_child_is_restarted_until_the_limit() {
    let s = setup(LifecycleConfig {
        restart_limit: 1,
        ..config()
    });
    let kernel = s.start("alice").await;
    let client = Client::new(&kernel, "one");
    s.fake.crash(0);
    let seen = client.until_status("restarting").await;
    assert!(seen.iter().all(|m| status(m).as_deref() != Some("dead")));
    client.until_status("idle").await;
    assert_eq!(s.fake.launches(), 2);
    assert_eq!(kernel.execution_state(), ExecutionState::Idle);
    let id = client.execute("still here").await;
    client.until_done(&id).await;
    // A second death within the window is one too many: the kernel is dead, and stays listed.
    let id = client.execute("exit").await;
    let seen = client.until_status("dead").await;
    assert!(reply_to(&seen, &id).is_none());
    assert_eq!(kernel.execution_state(), ExecutionState::Dead);
    assert!(kernel.process().is_none());
    assert_eq!(s.fake.launches(), 2);
    assert_eq!(s.kernels.list("alice").len(), 1);
    s.kernels.shutdown_all().await;
}

#[tokio::test]
async fn a_child_that_stops_answering_its_heartbeat_is_replaced() {
    let s = setup(config());
    let kernel = s.start("alice").await;
    let first = kernel.process().unwrap();
    let client = Client::new(&kernel, "one");
    s.fake.hang(0);
    client.until_status("restarting").await;
    client.until_status("idle").await;
    // The silent one was killed; a new process serves the same kernel.
    assert!(first.has_exited());
    assert_eq!(s.fake.launches(), 2);
    let id = client.execute("after").await;
    client.until_done(&id).await;
    s.kernels.shutdown_all().await;
}

#[tokio::test]
async fn culling_takes_idle_kernels_but_not_busy_or_managed_ones() {
    let s = setup(LifecycleConfig {
        cull_idle_timeout: Some(Duration::ZERO),
        cull_connected: true,
        ..config()
    });
    let start = || s.kernels.start("alice", crate::kernelspec::NAME);
    let (idle, busy, managed) = (
        start().await.unwrap(),
        start().await.unwrap(),
        start().await.unwrap(),
    );
    managed.set_managed();
    let client = Client::new(&busy, "one");
    let id = client.execute("sleep").await;
    assert!(eventually(async || busy.execution_state() == ExecutionState::Busy).await);
    s.kernels.cull_once().await;
    let left: Vec<uuid::Uuid> = s.kernels.list("alice").iter().map(|k| k.id).collect();
    assert!(!left.contains(&idle.id), "the idle kernel was culled");
    assert!(
        left.contains(&busy.id) && left.contains(&managed.id),
        "{left:?}"
    );
    assert_eq!(idle.execution_state(), ExecutionState::Dead);
    // Interrupted, the busy one finishes its cell and is idle: then it goes too.
    s.kernels
        .interrupt("alice", &busy.id.to_string())
        .await
        .unwrap();
    let seen = client.until_done(&id).await;
    assert_eq!(
        content(reply_to(&seen, &id).unwrap())["ename"],
        "KeyboardInterrupt"
    );
    s.kernels.cull_once().await;
    let left: Vec<uuid::Uuid> = s.kernels.list("alice").iter().map(|k| k.id).collect();
    assert_eq!(left, [managed.id]);
    s.kernels.shutdown_all().await;
}

#[tokio::test]
async fn the_warm_pool_fills_and_refills() {
    let s = setup(LifecycleConfig {
        pool_size: 2,
        ..config()
    });
    s.kernels.spawn_background();
    assert!(eventually(async || s.kernels.pooled().await == 2).await);
    assert_eq!(s.fake.launches(), 2);
    // A start takes a pooled process (the default user's); the pool launches a third.
    let kernel = s
        .kernels
        .start(crate::auth::DEFAULT_USER, crate::kernelspec::NAME)
        .await
        .unwrap();
    assert!(s.fake.wait_launches(3, DEADLINE).await);
    assert!(eventually(async || s.kernels.pooled().await == 2).await);
    let client = Client::new(&kernel, "one");
    let id = client.execute("pooled").await;
    client.until_done(&id).await;
    // Another user's kernel sees their own workspace: never from the pool.
    s.kernels
        .start("alice", crate::kernelspec::NAME)
        .await
        .unwrap();
    assert_eq!(s.fake.launches(), 4);
    assert_eq!(s.kernels.pooled().await, 2);
    s.kernels.shutdown_all().await;
    assert_eq!(s.kernels.pooled().await, 0);
}
