//! The execution service: run code on a kernel and get its outputs back as typed events, as
//! they happen, without a WebSocket. `%%ask`, the E2B-compatible API and MCP are its clients.
//!
//! An [`Execution`] sends one `execute_request` the gateway makes and taps every message whose
//! parent is that request (see `session::kernel::Tap`): the kernel's iopub outputs, its reply
//! and its `idle`. [`event`] turns each into an [`Event`]; the execution ends when both the
//! reply and the `idle` have arrived, when the kernel process behind it ends or is replaced,
//! or when the caller drops it (which interrupts the kernel if the code is still running).
//!
//! The folding ([`event`], [`Progress`]) is pure and unit-tested without a kernel process.

use std::sync::Arc;
use std::time::Duration;

use serde_json::{Map, Value, json};
use tokio::sync::mpsc;

use crate::client::{self, Channel};
use crate::envelope::{ExecState, KernelMessage, MsgType, Parent};
use crate::session::Kernel;
use crate::session::kernel::Tap;

/// How long an interrupt sent for an abandoned execution waits for its reply.
const INTERRUPT_TIMEOUT: Duration = Duration::from_secs(5);

/// Which stream a [`Event::Stream`] is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamName {
    /// Standard output.
    Stdout,
    /// Standard error.
    Stderr,
}

/// One thing an execution produced, in the order the kernel sent it.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// The kernel took the code (`execute_input`): its execution count.
    Started {
        /// `execution_count`.
        execution_count: u64,
    },
    /// Text on stdout or stderr.
    Stream {
        /// Which stream.
        name: StreamName,
        /// The text.
        text: String,
        /// When the kernel sent it (the message header's `date`).
        timestamp: String,
    },
    /// A MIME bundle: a display (`display_data`, `update_display_data`) or the cell's value
    /// (`execute_result`, `main` true).
    Display {
        /// MIME type → value.
        data: Map<String, Value>,
        /// The bundle's metadata.
        metadata: Map<String, Value>,
        /// Whether this is the cell's result.
        main: bool,
    },
    /// The client should clear its output (`clear_output`).
    ClearOutput {
        /// Clear when the next output arrives rather than now.
        wait: bool,
    },
    /// The code raised.
    Error(ErrorOutput),
    /// The kernel's `execute_reply` content (`status`, `execution_count`, `user_expressions`…).
    Reply(Value),
}

/// An error the code raised.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ErrorOutput {
    /// The exception's class name.
    pub ename: String,
    /// Its message.
    pub evalue: String,
    /// The formatted traceback, one entry per frame or line.
    pub traceback: Vec<String>,
}

impl ErrorOutput {
    fn from_content(c: &Value) -> ErrorOutput {
        ErrorOutput {
            ename: c["ename"].as_str().unwrap_or("Error").to_owned(),
            evalue: c["evalue"].as_str().unwrap_or_default().to_owned(),
            traceback: c["traceback"]
                .as_array()
                .map(|t| {
                    t.iter()
                        .filter_map(|l| l.as_str().map(str::to_owned))
                        .collect()
                })
                .unwrap_or_default(),
        }
    }
}

/// The event a kernel message stands for, if any (`status` and unknown types have none;
/// the end of an execution is tracked by [`Progress`]). Its envelope says which; the content
/// is read only for an event.
pub fn event(message: &KernelMessage) -> Option<Event> {
    let msg_type = &message.envelope.msg_type;
    let wanted = match message.channel {
        Channel::Shell => *msg_type == MsgType::ExecuteReply,
        Channel::Iopub => matches!(
            msg_type,
            MsgType::ExecuteInput
                | MsgType::Stream
                | MsgType::DisplayData
                | MsgType::UpdateDisplayData
                | MsgType::ExecuteResult
                | MsgType::ClearOutput
                | MsgType::Error
        ),
        Channel::Control | Channel::Stdin => false,
    };
    if !wanted {
        return None;
    }
    let content: Value = serde_json::from_slice(&message.raw.content).ok()?;
    let object = |v: &Value| v.as_object().cloned().unwrap_or_default();
    match (message.channel, msg_type) {
        (Channel::Shell, MsgType::ExecuteReply) => Some(Event::Reply(content)),
        (Channel::Iopub, MsgType::ExecuteInput) => Some(Event::Started {
            execution_count: content["execution_count"].as_u64().unwrap_or(0),
        }),
        (Channel::Iopub, MsgType::Stream) => {
            let name = match content["name"].as_str() {
                Some("stderr") => StreamName::Stderr,
                _ => StreamName::Stdout,
            };
            // The date is not in the envelope (nothing else needs it): read for streams only.
            let timestamp = serde_json::from_slice::<Value>(&message.raw.header)
                .ok()
                .and_then(|h| h["date"].as_str().map(str::to_owned))
                .unwrap_or_default();
            Some(Event::Stream {
                name,
                text: content["text"].as_str().unwrap_or_default().to_owned(),
                timestamp,
            })
        }
        (
            Channel::Iopub,
            kind @ (MsgType::DisplayData | MsgType::UpdateDisplayData | MsgType::ExecuteResult),
        ) => Some(Event::Display {
            data: object(&content["data"]),
            metadata: object(&content["metadata"]),
            main: *kind == MsgType::ExecuteResult,
        }),
        (Channel::Iopub, MsgType::ClearOutput) => Some(Event::ClearOutput {
            wait: content["wait"].as_bool().unwrap_or(false),
        }),
        (Channel::Iopub, MsgType::Error) => Some(Event::Error(ErrorOutput::from_content(&content))),
        _ => None,
    }
}

/// Where an execution is: it is over once the kernel has sent both its reply and its `idle`
/// (in either order; the reply comes on another socket than the status).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Progress {
    started: bool,
    replied: bool,
    idle: bool,
}

impl Progress {
    /// Notes one message of the execution (from its envelope).
    pub fn see(&mut self, message: &KernelMessage) {
        let envelope = &message.envelope;
        match (message.channel, &envelope.msg_type) {
            (Channel::Shell, MsgType::ExecuteReply) => self.replied = true,
            (Channel::Iopub, MsgType::Status) if envelope.state == Some(ExecState::Idle) => {
                self.idle = true;
            }
            (Channel::Iopub, MsgType::Status | MsgType::ExecuteInput) => self.started = true,
            _ => {}
        }
    }

    /// Whether the kernel is running this request's code now: it took it (`busy` or
    /// `execute_input`) and has not replied. A request still queued behind another's code is
    /// not running, and an interrupt then would stop the other's.
    pub fn running(self) -> bool {
        self.started && !self.replied
    }

    /// Whether the execution is over.
    pub fn done(self) -> bool {
        self.replied && self.idle
    }
}

/// What to run, and how.
#[derive(Debug, Clone)]
pub struct Request {
    /// The code.
    pub code: String,
    /// Run without outputs or a new execution count.
    pub silent: bool,
    /// Record it in the kernel's history (and count it).
    pub store_history: bool,
    /// Expressions evaluated after the code, returned in the reply.
    pub user_expressions: Map<String, Value>,
    /// Whether an error in this code aborts the requests queued behind it (Jupyter's
    /// `stop_on_error`). Off for independent runs: one agent's error (or an interrupt after its
    /// client went away) must not cancel another's code.
    pub stop_on_error: bool,
    /// The request's metadata (the E2B API asks for E2B's result types with
    /// [`sandgate_wire::E2B_METADATA_KEY`]).
    pub metadata: Map<String, Value>,
    /// Show the outputs to the kernel's Jupyter clients under this request header (`%%ask`
    /// shows the generated code's outputs under its cell); `None` hides them.
    pub show_under: Option<bytes::Bytes>,
}

impl Request {
    /// Code to run as a cell would: counted, in the history, outputs hidden from clients.
    pub fn cell(code: impl Into<String>) -> Request {
        Request {
            code: code.into(),
            silent: false,
            store_history: true,
            user_expressions: Map::new(),
            stop_on_error: false,
            metadata: Map::new(),
            show_under: None,
        }
    }
}

/// Why an execution could not run or did not finish.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ExecError {
    /// The kernel has no process (it is dead or restarting).
    #[error("the kernel is not running (it is dead or restarting)")]
    NotRunning,
    /// The request could not be sent.
    #[error("the request could not be sent to the kernel: {0}")]
    Send(String),
    /// The kernel process ended or was replaced while the code ran.
    #[error("the kernel died or was restarted while the code ran")]
    KernelEnded,
}

/// One execution in progress. Read its events with [`Execution::next`]; dropping it before the
/// end stops listening and interrupts the kernel.
pub struct Execution {
    kernel: Arc<Kernel>,
    id: String,
    rx: mpsc::UnboundedReceiver<Arc<KernelMessage>>,
    process: tokio::sync::watch::Receiver<Option<Arc<client::Process>>>,
    progress: Progress,
    ended: bool,
}

impl Execution {
    /// Sends `request` to `kernel` and starts listening for what it causes.
    pub async fn start(kernel: &Arc<Kernel>, request: Request) -> Result<Execution, ExecError> {
        let mut process_rx = kernel.process_watch();
        let process = process_rx
            .borrow_and_update()
            .clone()
            .ok_or(ExecError::NotRunning)?;
        let header = client::header("execute_request", kernel.own_session());
        let id = header["msg_id"].as_str().unwrap_or_default().to_owned();
        let content = json!({
            "code": request.code,
            "silent": request.silent,
            "store_history": request.store_history,
            "user_expressions": request.user_expressions,
            "allow_stdin": false,
            "stop_on_error": request.stop_on_error,
        });
        let (to, rx) = mpsc::unbounded_channel();
        // The header the outputs are shown under is read once, for all of them.
        let show_under = request.show_under.map(|header| {
            let parent = Parent::parse(&header);
            (header, parent)
        });
        kernel.add_tap(id.clone(), Tap { to, show_under });
        let execution = Execution {
            kernel: kernel.clone(),
            id,
            rx,
            process: process_rx,
            progress: Progress::default(),
            ended: false,
        };
        let mut execution = execution;
        let mut message = client::own_message(&header, &content);
        if !request.metadata.is_empty() {
            message.metadata = bytes::Bytes::from(
                serde_json::to_vec(&request.metadata).unwrap_or_else(|_| b"{}".to_vec()),
            );
        }
        if let Err(e) = process.send(Channel::Shell, &message).await {
            // Never sent: nothing of it runs, so nothing is to be interrupted.
            execution.finish();
            return Err(ExecError::Send(e.to_string()));
        }
        Ok(execution)
    }

    /// The next event; `Ok(None)` once the execution is over. An error means the kernel went
    /// away first; the execution is over then too.
    pub async fn next(&mut self) -> Result<Option<Event>, ExecError> {
        loop {
            if self.ended {
                return Ok(None);
            }
            let received = tokio::select! {
                biased;
                m = self.rx.recv() => m,
                changed = self.process.changed() => {
                    // A new or no process: this execution's messages will never come.
                    let _ = changed;
                    self.finish();
                    return Err(ExecError::KernelEnded);
                }
            };
            let Some(message) = received else {
                self.finish();
                return Err(ExecError::KernelEnded);
            };
            self.progress.see(&message);
            let event = event(&message);
            if self.progress.done() {
                self.finish();
            }
            if let Some(event) = event {
                return Ok(Some(event));
            }
        }
    }

    /// Runs to the end, collecting every event.
    pub async fn collect(mut self) -> Result<Vec<Event>, ExecError> {
        let mut events = Vec::new();
        while let Some(e) = self.next().await? {
            events.push(e);
        }
        Ok(events)
    }

    /// Runs to the end and returns the reply's content (`None` if the kernel sent none).
    pub async fn reply(self) -> Result<Option<Value>, ExecError> {
        Ok(self.collect().await?.into_iter().find_map(|e| match e {
            Event::Reply(r) => Some(r),
            _ => None,
        }))
    }

    fn finish(&mut self) {
        self.ended = true;
        self.kernel.remove_tap(&self.id);
    }
}

impl Drop for Execution {
    fn drop(&mut self) {
        if self.ended {
            return;
        }
        // Abandoned (the caller timed out or went away). What arrived unread says where it is.
        while let Ok(message) = self.rx.try_recv() {
            self.progress.see(&message);
        }
        self.finish();
        if !self.progress.running() {
            // Not started, or already answered: an interrupt now would stop someone else's code.
            return;
        }
        // Its code runs: stop it, as the kernel's own clients would with an interrupt.
        let kernel = self.kernel.clone();
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            handle.spawn(async move {
                let _ = kernel
                    .request(
                        Channel::Control,
                        "interrupt_request",
                        json!({}),
                        INTERRUPT_TIMEOUT,
                    )
                    .await;
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(msg_type: &str, content: Value) -> sandgate_wire::RawMessage {
        let header = json!({"msg_id": "m", "msg_type": msg_type, "date": "2026-12-07T00:00:00.000001Z",
                            "session": "s", "username": "u", "version": "5.3"});
        client::own_message(&header, &content)
    }

    #[test]
    fn outputs_become_typed_events() {
        let m = message("stream", json!({"name": "stderr", "text": "warn\n"}));
        assert_eq!(
            event(&KernelMessage::parse(Channel::Iopub, m.clone())),
            Some(Event::Stream {
                name: StreamName::Stderr,
                text: "warn\n".into(),
                timestamp: "2026-12-07T00:00:00.000001Z".into()
            })
        );
        let m = message(
            "execute_result",
            json!({"data": {"text/plain": "2"}, "metadata": {}, "execution_count": 3}),
        );
        let Some(Event::Display { data, main, .. }) =
            event(&KernelMessage::parse(Channel::Iopub, m.clone()))
        else {
            panic!("not a display");
        };
        assert!(main);
        assert_eq!(data["text/plain"], "2");
        let m = message(
            "display_data",
            json!({"data": {"image/png": "AA=="}, "metadata": {"image/png": {"width": 1}}}),
        );
        assert!(matches!(
            event(&KernelMessage::parse(Channel::Iopub, m.clone())),
            Some(Event::Display { main: false, .. })
        ));
        let m = message(
            "error",
            json!({"ename": "ZeroDivisionError", "evalue": "division by zero", "traceback": ["a", "b"]}),
        );
        assert_eq!(
            event(&KernelMessage::parse(Channel::Iopub, m.clone())),
            Some(Event::Error(ErrorOutput {
                ename: "ZeroDivisionError".into(),
                evalue: "division by zero".into(),
                traceback: vec!["a".into(), "b".into()],
            }))
        );
        let m = message("execute_input", json!({"code": "1", "execution_count": 7}));
        assert_eq!(
            event(&KernelMessage::parse(Channel::Iopub, m.clone())),
            Some(Event::Started { execution_count: 7 })
        );
        let m = message("clear_output", json!({"wait": true}));
        assert_eq!(
            event(&KernelMessage::parse(Channel::Iopub, m.clone())),
            Some(Event::ClearOutput { wait: true })
        );
        let m = message(
            "execute_reply",
            json!({"status": "ok", "execution_count": 7}),
        );
        assert!(
            matches!(event(&KernelMessage::parse(Channel::Shell, m.clone())), Some(Event::Reply(r)) if r["status"] == "ok")
        );
    }

    #[test]
    fn status_unknown_and_malformed_messages_are_no_events() {
        let m = message("status", json!({"execution_state": "busy"}));
        assert_eq!(
            event(&KernelMessage::parse(Channel::Iopub, m.clone())),
            None
        );
        let m = message("comm_open", json!({}));
        assert_eq!(
            event(&KernelMessage::parse(Channel::Iopub, m.clone())),
            None
        );
        let mut m = message("stream", json!({}));
        m.content = bytes::Bytes::from_static(b"{not json");
        assert_eq!(
            event(&KernelMessage::parse(Channel::Iopub, m.clone())),
            None
        );
        m.header = bytes::Bytes::from_static(b"[]");
        assert_eq!(
            event(&KernelMessage::parse(Channel::Iopub, m.clone())),
            None
        );
        // An execute_reply on iopub is not a reply.
        let m = message("execute_reply", json!({"status": "ok"}));
        assert_eq!(
            event(&KernelMessage::parse(Channel::Iopub, m.clone())),
            None
        );
    }

    #[test]
    fn an_execution_ends_on_reply_and_idle_in_either_order() {
        let reply = message("execute_reply", json!({"status": "ok"}));
        let idle = message("status", json!({"execution_state": "idle"}));
        let busy = message("status", json!({"execution_state": "busy"}));
        let mut p = Progress::default();
        p.see(&KernelMessage::parse(Channel::Iopub, busy.clone()));
        p.see(&KernelMessage::parse(Channel::Shell, reply.clone()));
        assert!(!p.done());
        p.see(&KernelMessage::parse(Channel::Iopub, idle.clone()));
        assert!(p.done());
        let mut p = Progress::default();
        p.see(&KernelMessage::parse(Channel::Iopub, idle.clone()));
        assert!(!p.done());
        p.see(&KernelMessage::parse(Channel::Shell, reply.clone()));
        assert!(p.done());
        // Queued (nothing seen), running (busy seen), answered (reply seen).
        let mut p = Progress::default();
        assert!(!p.running());
        p.see(&KernelMessage::parse(Channel::Iopub, busy));
        assert!(p.running());
        p.see(&KernelMessage::parse(Channel::Shell, reply));
        assert!(!p.running());
    }
}
