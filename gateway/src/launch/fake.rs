//! A launcher for tests: each "child" is a scripted kernel served in-process over real ZeroMQ
//! sockets bound where the connection file says, with every message HMAC-signed
//! (`sandgate-wire`), so the gateway's common part (channels, ordering, heartbeat, exit
//! handling) and the session layer above it run exactly as with a real kernel.
//!
//! The scripted kernel answers `kernel_info_request` and `execute_request` on shell (`busy`,
//! `execute_input`, a `stream` echoing the code, the reply, `idle`), and `interrupt_request`
//! and `shutdown_request` on control. Some cells act:
//! - `sleep`: runs until interrupted, then ends with a `KeyboardInterrupt` error;
//! - `exit`: the child dies at once, without a reply.
//!
//! [`FakeLauncher::crash`] makes a child die from outside, as a killed process would;
//! [`FakeLauncher::hang`] makes it stop answering its heartbeat, as a stuck process would.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use sandgate_wire::{RawMessage, Signer};
use serde_json::{Value, json};
use tokio::sync::{Notify, mpsc, watch};
use tokio::task::JoinSet;
use zeromq::{Socket, SocketRecv, SocketSend, ZmqMessage};

use super::{BoxFuture, Child, LaunchRequest, Launched, Launcher};
use crate::client::ClientError;

/// Launches scripted in-process kernels; clones share their count and crash switches.
#[derive(Debug, Clone, Default)]
pub struct FakeLauncher {
    shared: Arc<Shared>,
}

#[derive(Debug, Default)]
struct Shared {
    /// Children launched so far.
    launches: AtomicUsize,
    /// One set of switches per launch, in order.
    children: Mutex<Vec<Switches>>,
    /// Told after each launch.
    launched: Notify,
}

impl FakeLauncher {
    /// How many children were launched.
    pub fn launches(&self) -> usize {
        self.shared.launches.load(Ordering::SeqCst)
    }

    /// Waits until `n` children were launched, `within` at most; whether they were.
    pub async fn wait_launches(&self, n: usize, within: std::time::Duration) -> bool {
        tokio::time::timeout(within, async {
            loop {
                let told = self.shared.launched.notified();
                if self.launches() >= n {
                    return;
                }
                told.await;
            }
        })
        .await
        .is_ok()
    }

    /// Makes the `n`th child launched (from 0) die, as a killed process would.
    pub fn crash(&self, n: usize) {
        let children = self
            .shared
            .children
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if let Some(child) = children.get(n) {
            let _ = child.death.send(true);
        }
    }

    /// Makes the `n`th child launched (from 0) stop answering its heartbeat.
    pub fn hang(&self, n: usize) {
        let children = self
            .shared
            .children
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if let Some(child) = children.get(n) {
            child.hung.store(true, Ordering::SeqCst);
        }
    }
}

/// What a test can do to one child.
#[derive(Debug)]
struct Switches {
    /// Set to true to make it die.
    death: watch::Sender<bool>,
    /// Set to make its heartbeat go silent.
    hung: Arc<AtomicBool>,
}

/// A scripted kernel's tasks and the switch that ends them.
struct FakeChild {
    tasks: JoinSet<()>,
    died: watch::Receiver<bool>,
}

impl Child for FakeChild {
    fn wait(self: Box<Self>, mut kill: watch::Receiver<bool>) -> BoxFuture<'static, String> {
        let FakeChild {
            mut tasks,
            mut died,
        } = *self;
        Box::pin(async move {
            let words = tokio::select! {
                () = crate::until_true(&mut died) => "the fake kernel died",
                () = crate::until_true(&mut kill) => "the fake kernel was killed",
            };
            // Dropping the sockets unbinds them, as a process's end would.
            tasks.shutdown().await;
            words.to_owned()
        })
    }
}

impl Launcher for FakeLauncher {
    fn name(&self) -> &'static str {
        "fake"
    }

    fn launch<'a>(
        &'a self,
        request: LaunchRequest<'a>,
    ) -> BoxFuture<'a, Result<Launched, ClientError>> {
        Box::pin(async move {
            let info: Value = std::fs::read(request.connection_file)
                .ok()
                .and_then(|b| serde_json::from_slice(&b).ok())
                .ok_or(ClientError::Gone)?;
            let (death, died) = watch::channel(false);
            let hung = Arc::new(AtomicBool::new(false));
            let tasks = serve(&info, death.clone(), hung.clone()).await?;
            self.shared
                .children
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(Switches { death, hung });
            self.shared.launches.fetch_add(1, Ordering::SeqCst);
            self.shared.launched.notify_waiters();
            Ok(Launched {
                pid: None,
                child: Box::new(FakeChild { tasks, died }),
            })
        })
    }
}

/// The URL of a channel's endpoint (`port` names it in the connection file).
fn url(info: &Value, port: &str) -> String {
    let ip = info["ip"].as_str().unwrap_or_default();
    let n = info[port].as_u64().unwrap_or_default();
    match info["transport"].as_str() {
        Some("ipc") => format!("ipc://{ip}-{n}"),
        _ => format!("tcp://{ip}:{n}"),
    }
}

async fn bind<S: Socket>(mut socket: S, endpoint: String) -> Result<S, ClientError> {
    socket
        .bind(&endpoint)
        .await
        .map_err(|e| ClientError::Connect {
            channel: "fake kernel",
            reason: e.to_string(),
        })?;
    Ok(socket)
}

/// Binds the five sockets and starts the kernel's tasks.
async fn serve(
    info: &Value,
    death: watch::Sender<bool>,
    hung: Arc<AtomicBool>,
) -> Result<JoinSet<()>, ClientError> {
    let signer = Signer::new(info["key"].as_str().unwrap_or_default().as_bytes());
    let shell = bind(zeromq::RouterSocket::new(), url(info, "shell_port")).await?;
    let control = bind(zeromq::RouterSocket::new(), url(info, "control_port")).await?;
    let _stdin = bind(zeromq::RouterSocket::new(), url(info, "stdin_port")).await?;
    let iopub = bind(zeromq::PubSocket::new(), url(info, "iopub_port")).await?;
    let heartbeat = bind(zeromq::RepSocket::new(), url(info, "hb_port")).await?;
    let (publish, outbox) = mpsc::channel::<RawMessage>(256);
    let interrupted = Arc::new(Notify::new());
    let kernel = Kernel {
        signer,
        publish,
        session: uuid::Uuid::new_v4().to_string(),
    };
    let mut tasks = JoinSet::new();
    tasks.spawn(publisher(iopub, outbox, kernel.signer.clone()));
    tasks.spawn(echo(heartbeat, hung));
    tasks.spawn(
        kernel
            .clone()
            .shell(shell, interrupted.clone(), death.clone()),
    );
    tasks.spawn(kernel.control(control, interrupted, death));
    // The stdin socket lives as long as the kernel (no input is ever asked for).
    tasks.spawn(async move {
        let _stdin = _stdin;
        std::future::pending::<()>().await
    });
    Ok(tasks)
}

async fn publisher(
    mut iopub: zeromq::PubSocket,
    mut outbox: mpsc::Receiver<RawMessage>,
    signer: Signer,
) {
    while let Some(message) = outbox.recv().await {
        let frames = sandgate_wire::serialize_raw(&message, &signer);
        if let Ok(m) = ZmqMessage::try_from(frames) {
            let _ = iopub.send(m).await;
        }
    }
}

async fn echo(mut heartbeat: zeromq::RepSocket, hung: Arc<AtomicBool>) {
    while let Ok(ping) = heartbeat.recv().await {
        if hung.load(Ordering::SeqCst) {
            // Never answers again (the process is stuck); the socket stays bound.
            return std::future::pending().await;
        }
        if heartbeat.send(ping).await.is_err() {
            return;
        }
    }
}

/// The scripted kernel's state shared by its shell and control tasks.
#[derive(Clone)]
struct Kernel {
    signer: Signer,
    publish: mpsc::Sender<RawMessage>,
    session: String,
}

/// A request as the kernel reads it.
struct Request {
    identities: Vec<Bytes>,
    header: Bytes,
    msg_type: String,
    content: Value,
}

impl Kernel {
    fn parse(&self, message: ZmqMessage) -> Option<Request> {
        let raw = sandgate_wire::parse_raw(message.into_vec(), &self.signer).ok()?;
        let header: Value = serde_json::from_slice(&raw.header).ok()?;
        Some(Request {
            msg_type: header["msg_type"].as_str()?.to_owned(),
            content: serde_json::from_slice(&raw.content).unwrap_or(Value::Null),
            identities: raw.identities,
            header: raw.header,
        })
    }

    /// A message of this kernel's about `parent`.
    fn message(&self, parent: &Request, msg_type: &str, content: Value) -> RawMessage {
        let header = crate::client::header(msg_type, &self.session);
        let mut m = crate::client::own_message(&header, &content);
        m.parent_header = parent.header.clone();
        m
    }

    async fn publish(&self, parent: &Request, msg_type: &str, content: Value) {
        let mut m = self.message(parent, msg_type, content);
        m.identities = vec![Bytes::from(format!("kernel.{msg_type}"))];
        let _ = self.publish.send(m).await;
    }

    async fn status(&self, parent: &Request, state: &str) {
        self.publish(parent, "status", json!({"execution_state": state}))
            .await;
    }

    fn reply(&self, parent: &Request, msg_type: &str, content: Value) -> ZmqMessage {
        let mut m = self.message(parent, msg_type, content);
        m.identities = parent.identities.clone();
        ZmqMessage::try_from(sandgate_wire::serialize_raw(&m, &self.signer))
            .expect("a message has frames")
    }

    async fn shell(
        self,
        mut socket: zeromq::RouterSocket,
        interrupted: Arc<Notify>,
        death: watch::Sender<bool>,
    ) {
        let mut count = 0u64;
        while let Ok(message) = socket.recv().await {
            let Some(request) = self.parse(message) else {
                continue;
            };
            self.status(&request, "busy").await;
            let reply = match request.msg_type.as_str() {
                "kernel_info_request" => self.reply(
                    &request,
                    "kernel_info_reply",
                    json!({"status": "ok", "protocol_version": "5.3",
                           "implementation": "fake", "language_info": {"name": "fake"}}),
                ),
                "execute_request" => {
                    count += 1;
                    let code = request.content["code"]
                        .as_str()
                        .unwrap_or_default()
                        .to_owned();
                    self.publish(
                        &request,
                        "execute_input",
                        json!({"code": code, "execution_count": count}),
                    )
                    .await;
                    let content = match code.as_str() {
                        "exit" => {
                            let _ = death.send(true);
                            return;
                        }
                        "sleep" => {
                            interrupted.notified().await;
                            let error = json!({"status": "error", "ename": "KeyboardInterrupt",
                                               "evalue": "", "traceback": [],
                                               "execution_count": count});
                            self.publish(&request, "error", error.clone()).await;
                            error
                        }
                        _ => {
                            self.publish(
                                &request,
                                "stream",
                                json!({"name": "stdout", "text": code}),
                            )
                            .await;
                            json!({"status": "ok", "execution_count": count,
                                   "user_expressions": {}, "payload": []})
                        }
                    };
                    self.reply(&request, "execute_reply", content)
                }
                other => {
                    let name = other.replace("_request", "_reply");
                    self.reply(
                        &request,
                        &name,
                        json!({"status": "error", "ename": "NotImplemented"}),
                    )
                }
            };
            if socket.send(reply).await.is_err() {
                return;
            }
            self.status(&request, "idle").await;
        }
    }

    async fn control(
        self,
        mut socket: zeromq::RouterSocket,
        interrupted: Arc<Notify>,
        death: watch::Sender<bool>,
    ) {
        while let Ok(message) = socket.recv().await {
            let Some(request) = self.parse(message) else {
                continue;
            };
            self.status(&request, "busy").await;
            let (name, content) = match request.msg_type.as_str() {
                "interrupt_request" => {
                    interrupted.notify_one();
                    ("interrupt_reply", json!({"status": "ok"}))
                }
                "shutdown_request" => (
                    "shutdown_reply",
                    json!({"status": "ok", "restart": request.content["restart"]}),
                ),
                _ => ("error_reply", json!({"status": "error"})),
            };
            let _ = socket.send(self.reply(&request, name, content)).await;
            self.status(&request, "idle").await;
            if name == "shutdown_reply" {
                let _ = death.send(true);
                return;
            }
        }
    }
}
