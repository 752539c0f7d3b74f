//! The MCP tools: their JSON schemas (what a model reads to use them) and their calls.
//!
//! - `run_code`: Python in a sandbox of the E2B registry (`app.e2b`): the one named, or the MCP
//!   session's own (made on first use, kept across calls, ended with the session).
//! - `create_sandbox`, `list_sandboxes`, `kill_sandbox`: the same registry as the E2B API, so a
//!   sandbox made here is one `Sandbox.connect` can reach, and the reverse.
//! - `read_file`, `write_file`, `list_files`: the user's encrypted workspace (`/workspace` in
//!   every sandbox), so files outlive sandboxes and sessions.
//!
//! A call's failure the model can act on (an exception in its code, a wrong path, a sandbox
//! that is gone, a language Sandgate lacks) is a tool result with `isError: true` naming what
//! went wrong, as the MCP spec (2025-11-25) asks for input and execution errors; only an
//! unknown tool is a JSON-RPC error.
//!
//! Binary files: `read_file` returns a PNG, JPEG, GIF or WebP image as MCP image content (so a
//! model sees it) and any other file that is not UTF-8 as an embedded resource with a base64
//! `blob` and its MIME type. `write_file` takes `encoding: "base64"` for binary content.

use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use serde_json::{Map, Value, json};

use super::Session;
use crate::e2b::interpreter::{check_language, reply_error, set_up, strip_ansi};
use crate::e2b::sandboxes::{self, NewSandbox, Sandbox, SandboxError};
use crate::exec::{Event, ExecError, Execution, Request, StreamName};
use crate::http::{ApiError, App};
use crate::session::kernel::timestamp;
use crate::workspace::path::WsPath;
use crate::workspace::store::Kind;

/// The template of the sandboxes made here.
const TEMPLATE: &str = "code-interpreter-v1";
/// How long `run_code` waits by default, seconds.
const DEFAULT_RUN_TIMEOUT_S: u64 = 300;
/// How long `create_sandbox`'s sandboxes live by default, seconds.
const DEFAULT_SANDBOX_TIMEOUT_S: u64 = 1800;
/// Text returned by one call, at most (the rest is cut with a note).
const MAX_TEXT: usize = 1 << 20;
/// The largest file `read_file` returns.
const MAX_READ: usize = 8 << 20;
/// Images `read_file` returns as image content.
const IMAGE_TYPES: &[(&str, &str)] = &[
    ("png", "image/png"),
    ("jpg", "image/jpeg"),
    ("jpeg", "image/jpeg"),
    ("gif", "image/gif"),
    ("webp", "image/webp"),
];

/// The tools, as `tools/list` returns them.
pub fn definitions() -> Value {
    let sandbox_id = json!({
        "type": "string",
        "description": "A sandbox id from create_sandbox or list_sandboxes (\"sg\" and 32 hex digits)."
    });
    let path = |what: &str| {
        json!({
            "type": "string",
            "description": format!(
                "{what}, relative to /workspace (\"data/a.csv\"); \"/workspace/data/a.csv\" is \
                 the same file. `..` is refused."
            )
        })
    };
    json!([
        {
            "name": "run_code",
            "title": "Run Python code",
            "description": "Run Python code in a Sandgate sandbox (CPython in a WebAssembly \
                sandbox: no network, memory and time limits) and return what it printed, the \
                value of its last expression, any error with its traceback, and each matplotlib \
                figure or other PNG/JPEG display as an image. Code runs as a Jupyter cell \
                (IPython syntax: `!` and `%` magics work, the last expression is shown). Without \
                sandbox_id it runs in this MCP session's own sandbox, made on first use: \
                variables, imports and open files carry over from one call to the next until \
                the session ends. The working directory is the sandbox's home, /home/user, \
                which ends with the sandbox; /workspace is the user's encrypted workspace: save \
                files there to keep them or to read them with read_file. Only Python is \
                available. Exceptions come back as an error result with the \
                traceback; fix the code and call again.",
            "inputSchema": {
                "type": "object",
                "properties": {
                    "code": {"type": "string", "description": "The Python code to run."},
                    "language": {
                        "type": "string",
                        "enum": ["python"],
                        "default": "python",
                        "description": "The language; only \"python\" is available."
                    },
                    "sandbox_id": {
                        "type": "string",
                        "description": "Run in this sandbox (from create_sandbox or \
                            list_sandboxes) instead of the session's own."
                    },
                    "timeout_s": {
                        "type": "integer",
                        "minimum": 1,
                        "maximum": 86400,
                        "default": DEFAULT_RUN_TIMEOUT_S,
                        "description": "Seconds to wait; then the code is interrupted and what \
                            it printed so far is returned. The sandbox's own cell time limit \
                            applies too."
                    }
                },
                "required": ["code"],
                "additionalProperties": false
            },
            "annotations": {"destructiveHint": false, "openWorldHint": false}
        },
        {
            "name": "create_sandbox",
            "title": "Create a sandbox",
            "description": "Create a new Python sandbox with its own interpreter state, and \
                return its sandbox_id for run_code. It ends after timeout_s seconds or at \
                kill_sandbox; it sees the same /workspace files as every other sandbox of the \
                user. Use it to keep separate states side by side; for one state, run_code \
                without sandbox_id is enough.",
            "inputSchema": {
                "type": "object",
                "properties": {
                    "timeout_s": {
                        "type": "integer",
                        "minimum": 1,
                        "maximum": sandboxes::MAX_TIMEOUT_S,
                        "default": DEFAULT_SANDBOX_TIMEOUT_S,
                        "description": "Seconds the sandbox lives."
                    }
                },
                "additionalProperties": false
            },
            "annotations": {"destructiveHint": false, "openWorldHint": false}
        },
        {
            "name": "list_sandboxes",
            "title": "List sandboxes",
            "description": "List the user's running sandboxes (also those made through the \
                E2B-compatible API): id, when each started and when it ends, and which one is \
                this session's own.",
            "inputSchema": {"type": "object", "properties": {}, "additionalProperties": false},
            "annotations": {"readOnlyHint": true, "openWorldHint": false}
        },
        {
            "name": "kill_sandbox",
            "title": "Kill a sandbox",
            "description": "End a sandbox now; its interpreter state is lost (files in \
                /workspace stay).",
            "inputSchema": {
                "type": "object",
                "properties": {"sandbox_id": sandbox_id},
                "required": ["sandbox_id"],
                "additionalProperties": false
            },
            "annotations": {"destructiveHint": true, "idempotentHint": true, "openWorldHint": false}
        },
        {
            "name": "read_file",
            "title": "Read a workspace file",
            "description": "Read a file of the user's encrypted workspace (/workspace in every \
                sandbox). Text (UTF-8) comes back as text; PNG, JPEG, GIF and WebP images as \
                images; other binary files as an embedded resource whose blob is base64.",
            "inputSchema": {
                "type": "object",
                "properties": {"path": path("The file")},
                "required": ["path"],
                "additionalProperties": false
            },
            "annotations": {"readOnlyHint": true, "openWorldHint": false}
        },
        {
            "name": "write_file",
            "title": "Write a workspace file",
            "description": "Write a file into the user's encrypted workspace (/workspace in \
                every sandbox, running ones included), making its folders; an existing file is \
                replaced.",
            "inputSchema": {
                "type": "object",
                "properties": {
                    "path": path("The file"),
                    "content": {"type": "string", "description": "The content."},
                    "encoding": {
                        "type": "string",
                        "enum": ["utf-8", "base64"],
                        "default": "utf-8",
                        "description": "\"base64\" when content is base64 of binary data."
                    }
                },
                "required": ["path", "content"],
                "additionalProperties": false
            },
            "annotations": {"destructiveHint": true, "idempotentHint": true, "openWorldHint": false}
        },
        {
            "name": "list_files",
            "title": "List workspace files",
            "description": "List a folder of the user's encrypted workspace (/workspace in \
                every sandbox): each entry's path, whether it is a file or a folder, its size \
                and when it last changed.",
            "inputSchema": {
                "type": "object",
                "properties": {"path": path("The folder (default: the workspace's top)")},
                "additionalProperties": false
            },
            "annotations": {"readOnlyHint": true, "openWorldHint": false}
        }
    ])
}

/// A call that is not a tool call at all (a JSON-RPC error, not a tool result).
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    /// No tool by that name.
    #[error("unknown tool {0:?}; tools/list names the tools")]
    UnknownTool(String),
}

/// A tool result.
fn result(content: Vec<Value>, is_error: bool) -> Value {
    json!({"content": content, "isError": is_error})
}

fn text(t: impl Into<String>) -> Value {
    json!({"type": "text", "text": t.into()})
}

/// A failed call, as a result the model reads.
fn failed(message: impl Into<String>) -> Value {
    result(vec![text(message)], true)
}

/// A result with JSON for the model (as text) and for programs (`structuredContent`).
fn structured(summary: String, value: Value) -> Value {
    let pretty = serde_json::to_string_pretty(&value).unwrap_or_default();
    json!({
        "content": [text(format!("{summary}\n{pretty}"))],
        "structuredContent": value,
        "isError": false,
    })
}

/// Reads the arguments: an object whose keys are all in `known`.
fn arguments<'a>(
    args: &'a Map<String, Value>,
    tool: &str,
    known: &[&str],
) -> Result<&'a Map<String, Value>, String> {
    if let Some(k) = args.keys().find(|k| !known.contains(&k.as_str())) {
        return Err(format!(
            "{tool} has no argument {k:?}; its arguments are {}",
            known.join(", ")
        ));
    }
    Ok(args)
}

fn string_arg(args: &Map<String, Value>, name: &str) -> Result<Option<String>, String> {
    match args.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(other) => Err(format!("{name} must be a string, not {other}")),
    }
}

fn seconds_arg(args: &Map<String, Value>, name: &str, max: u64) -> Result<Option<u64>, String> {
    match args.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => match v.as_u64().or_else(|| {
            v.as_f64()
                .filter(|f| f.fract() == 0.0 && *f >= 0.0)
                .map(|f| f as u64)
        }) {
            Some(n) if (1..=max).contains(&n) => Ok(Some(n)),
            _ => Err(format!(
                "{name} must be a whole number of seconds from 1 to {max}, not {v}"
            )),
        },
    }
}

/// Calls tool `name` for `session`'s user.
pub async fn call(
    app: &Arc<App>,
    session: &Session,
    name: &str,
    args: &Map<String, Value>,
) -> Result<Value, CallError> {
    let outcome = match name {
        "run_code" => run_code(app, session, args).await,
        "create_sandbox" => create_sandbox(app, session, args).await,
        "list_sandboxes" => list_sandboxes(app, session, args).await,
        "kill_sandbox" => kill_sandbox(app, session, args).await,
        "read_file" => read_file(app, session, args).await,
        "write_file" => write_file(app, session, args).await,
        "list_files" => list_files(app, session, args).await,
        other => return Err(CallError::UnknownTool(other.to_owned())),
    };
    Ok(outcome.unwrap_or_else(failed))
}

fn sandbox_error(e: SandboxError) -> String {
    match e {
        SandboxError::NotFound(id) => format!(
            "sandbox {id} not found: it was killed or timed out, or it is not yours \
             (list_sandboxes shows yours)"
        ),
        SandboxError::Session(crate::session::SessionError::Start(e)) => {
            tracing::error!(error = %e, "an MCP sandbox's kernel could not be started");
            "the sandbox could not be started; the gateway's log has the details".to_owned()
        }
        other => other.to_string(),
    }
}

/// A new sandbox, set up as the E2B API sets up its own (its contexts start in its home).
async fn new_sandbox(app: &App, user: &str, timeout_s: u64) -> Result<Arc<Sandbox>, String> {
    let sandbox = app
        .e2b
        .create(
            user,
            NewSandbox {
                template: TEMPLATE.into(),
                timeout_s,
                metadata: Map::new(),
                env_vars: Map::new(),
            },
        )
        .await
        .map_err(sandbox_error)?;
    if let Some(context) = sandbox.default_context()
        && let Err(e) = set_up(&sandbox, &context).await
    {
        let _ = app.e2b.kill(user, &sandbox.id).await;
        return Err(format!("the sandbox could not be set up: {e}"));
    }
    Ok(sandbox)
}

async fn run_code(
    app: &Arc<App>,
    session: &Session,
    args: &Map<String, Value>,
) -> Result<Value, String> {
    let args = arguments(
        args,
        "run_code",
        &["code", "language", "sandbox_id", "timeout_s"],
    )?;
    let code = string_arg(args, "code")?.ok_or("run_code needs `code`, the Python to run")?;
    let language = string_arg(args, "language")?;
    check_language(language.as_deref()).map_err(|e| e.to_string())?;
    let wait = seconds_arg(args, "timeout_s", 86_400)?.unwrap_or(DEFAULT_RUN_TIMEOUT_S);
    let mut notes = Vec::new();
    let sandbox = match string_arg(args, "sandbox_id")? {
        Some(id) => app.e2b.get(&session.owner, &id).map_err(sandbox_error)?,
        None => {
            let (sandbox, note) = session_sandbox(app, session, wait).await?;
            notes.extend(note);
            sandbox
        }
    };
    let context = sandbox
        .default_context()
        .ok_or("the sandbox has no interpreter")?;
    crate::e2b::interpreter::ensure_set_up(&sandbox, &context)
        .await
        .map_err(|e| format!("the sandbox's interpreter could not be set up again: {e}"))?;
    let execution = Execution::start(&context.kernel, Request::cell(code))
        .await
        .map_err(|e| format!("the code could not be started: {e}"))?;
    Ok(collect(execution, Duration::from_secs(wait), notes).await)
}

/// The session's own sandbox: made on first use (and again if it ended), its deadline pushed
/// past this run. The note says when a new one replaced an ended one.
async fn session_sandbox(
    app: &App,
    session: &Session,
    run_s: u64,
) -> Result<(Arc<Sandbox>, Option<String>), String> {
    // Held across the creation, so two first calls at once make one sandbox.
    let mut slot = session.sandbox.lock().await;
    let life = super::SESSION_IDLE.as_secs().max(run_s + 60);
    let mut note = None;
    if let Some(id) = slot.as_deref() {
        match app.e2b.get(&session.owner, id) {
            Ok(sandbox) => {
                app.e2b.set_timeout(&sandbox, life);
                return Ok((sandbox, None));
            }
            Err(_) => {
                note = Some(format!(
                    "[note] this session's sandbox {id} had ended (killed or timed out), so the \
                     code ran in a new one: variables from earlier calls are gone"
                ));
            }
        }
    }
    let sandbox = new_sandbox(app, &session.owner, life).await?;
    *slot = Some(sandbox.id.clone());
    Ok((sandbox, note))
}

/// What a run produced, as MCP content in the order the kernel sent it.
#[derive(Default)]
struct Outputs {
    content: Vec<Value>,
    /// The text block being filled, and what kind it is.
    pending: Option<(&'static str, String)>,
    text_len: usize,
    cut: bool,
}

impl Outputs {
    fn push_text(&mut self, kind: &'static str, t: &str) {
        if t.is_empty() {
            return;
        }
        let room = MAX_TEXT.saturating_sub(self.text_len);
        let t = if t.len() > room {
            self.cut = true;
            let mut end = room;
            while !t.is_char_boundary(end) {
                end -= 1;
            }
            &t[..end]
        } else {
            t
        };
        self.text_len += t.len();
        match &mut self.pending {
            Some((k, buf)) if *k == kind => buf.push_str(t),
            _ => {
                self.flush();
                let header = match kind {
                    "stderr" => "[stderr]\n",
                    "result" => "[result]\n",
                    "display" => "[display]\n",
                    "error" => "[error]\n",
                    _ => "",
                };
                self.pending = Some((kind, format!("{header}{t}")));
            }
        }
    }

    fn flush(&mut self) {
        if let Some((_, t)) = self.pending.take() {
            self.content.push(text(t));
        }
    }

    fn display(&mut self, data: &Map<String, Value>, main: bool) {
        let image = ["image/png", "image/jpeg"].iter().find_map(|mime| {
            let b64: String = match data.get(*mime)? {
                Value::String(s) => s.clone(),
                Value::Array(parts) => parts.iter().filter_map(Value::as_str).collect(),
                _ => return None,
            };
            Some((*mime, b64))
        });
        if let Some((mime, b64)) = image {
            let clean: String = b64.chars().filter(|c| !c.is_ascii_whitespace()).collect();
            self.flush();
            self.content
                .push(json!({"type": "image", "data": clean, "mimeType": mime}));
            return;
        }
        let plain = match data.get("text/plain") {
            Some(Value::String(s)) => s.clone(),
            Some(Value::Array(parts)) => parts.iter().filter_map(Value::as_str).collect(),
            _ => return,
        };
        let mut plain = strip_ansi(&plain);
        if !plain.ends_with('\n') {
            plain.push('\n');
        }
        self.push_text(if main { "result" } else { "display" }, &plain);
    }

    fn finish(mut self, is_error: bool, notes: Vec<String>) -> Value {
        if self.cut {
            self.flush();
            self.content.push(text(format!(
                "[note] the output was cut at {MAX_TEXT} bytes of text"
            )));
        }
        self.flush();
        for n in notes {
            self.content.push(text(n));
        }
        if self.content.is_empty() {
            self.content.push(text("[no output]"));
        }
        result(self.content, is_error)
    }
}

/// Runs `execution` to its end, or until `wait` passes (then the execution is dropped, which
/// interrupts the code).
async fn collect(mut execution: Execution, wait: Duration, mut notes: Vec<String>) -> Value {
    let mut out = Outputs::default();
    let mut is_error = false;
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        let next = match tokio::time::timeout_at(deadline, execution.next()).await {
            Ok(next) => next,
            Err(_) => {
                notes.push(format!(
                    "[error] the code did not finish within {} s and was interrupted; the \
                     output above is what it printed until then (pass a larger timeout_s to \
                     wait longer)",
                    wait.as_secs()
                ));
                return out.finish(true, notes);
            }
        };
        let event = match next {
            Ok(Some(event)) => event,
            Ok(None) => break,
            Err(e) => {
                let why = match e {
                    ExecError::KernelEnded => {
                        "the sandbox's Python process died or was restarted while the code ran \
                         (for example it ran out of memory); its variables are gone"
                            .to_owned()
                    }
                    other => other.to_string(),
                };
                notes.push(format!("[error] {why}"));
                return out.finish(true, notes);
            }
        };
        match event {
            Event::Stream { name, text, .. } => out.push_text(
                match name {
                    StreamName::Stdout => "stdout",
                    StreamName::Stderr => "stderr",
                },
                &text,
            ),
            Event::Display { data, main, .. } => out.display(&data, main),
            Event::ClearOutput { .. } => {
                out.pending = None;
                out.content.clear();
            }
            Event::Error(e) => {
                is_error = true;
                let tb = strip_ansi(&e.traceback.join("\n"));
                let mut t = format!("{}: {}\n", e.ename, e.evalue);
                if !tb.trim().is_empty() {
                    t.push_str(&tb);
                    t.push('\n');
                }
                out.push_text("error", &t);
            }
            Event::Reply(reply) => {
                if !is_error && let Some(line) = reply_error(&reply) {
                    is_error = true;
                    out.push_text(
                        "error",
                        &format!(
                            "{}: {}\n",
                            line["name"].as_str().unwrap_or("Error"),
                            line["value"].as_str().unwrap_or_default()
                        ),
                    );
                }
            }
            Event::Started { .. } => {}
        }
    }
    out.finish(is_error, notes)
}

fn sandbox_model(sandbox: &Sandbox, own: Option<&str>) -> Value {
    json!({
        "sandbox_id": sandbox.id,
        "template": sandbox.template,
        "started_at": timestamp(sandbox.started),
        "ends_at": timestamp(sandbox.end_at()),
        "session_sandbox": own == Some(sandbox.id.as_str()),
    })
}

async fn create_sandbox(
    app: &Arc<App>,
    session: &Session,
    args: &Map<String, Value>,
) -> Result<Value, String> {
    let args = arguments(args, "create_sandbox", &["timeout_s"])?;
    let timeout = seconds_arg(args, "timeout_s", sandboxes::MAX_TIMEOUT_S)?
        .unwrap_or(DEFAULT_SANDBOX_TIMEOUT_S);
    let sandbox = new_sandbox(app, &session.owner, timeout).await?;
    Ok(structured(
        format!(
            "Created sandbox {}; pass it as sandbox_id to run_code.",
            sandbox.id
        ),
        sandbox_model(&sandbox, None),
    ))
}

async fn list_sandboxes(
    app: &Arc<App>,
    session: &Session,
    args: &Map<String, Value>,
) -> Result<Value, String> {
    arguments(args, "list_sandboxes", &[])?;
    let own = session.sandbox.lock().await.clone();
    let list: Vec<Value> = app
        .e2b
        .list(&session.owner)
        .iter()
        .map(|s| sandbox_model(s, own.as_deref()))
        .collect();
    Ok(structured(
        format!("{} running sandbox(es).", list.len()),
        json!({"sandboxes": list}),
    ))
}

async fn kill_sandbox(
    app: &Arc<App>,
    session: &Session,
    args: &Map<String, Value>,
) -> Result<Value, String> {
    let args = arguments(args, "kill_sandbox", &["sandbox_id"])?;
    let id = string_arg(args, "sandbox_id")?.ok_or("kill_sandbox needs `sandbox_id`")?;
    app.e2b
        .kill(&session.owner, &id)
        .await
        .map_err(sandbox_error)?;
    let mut own = session.sandbox.lock().await;
    if own.as_deref() == Some(id.as_str()) {
        *own = None;
    }
    Ok(result(vec![text(format!("Killed sandbox {id}."))], false))
}

/// A workspace path from what a model wrote: relative, or absolute under `/workspace`.
fn workspace_path(raw: &str) -> Result<WsPath, String> {
    let rel = if raw == "/workspace" {
        ""
    } else if let Some(rest) = raw.strip_prefix("/workspace/") {
        rest
    } else if raw.starts_with('/') {
        return Err(format!(
            "{raw:?} is outside the workspace: paths are relative to /workspace (\"a.txt\" or \
             \"/workspace/a.txt\")"
        ));
    } else {
        raw
    };
    WsPath::parse(rel).map_err(|e| format!("invalid path {raw:?}: {e}"))
}

fn shown(path: &WsPath) -> String {
    if path.is_root() {
        "/workspace".into()
    } else {
        format!("/workspace/{path}")
    }
}

fn workspace_error(e: crate::workspace::WorkspaceError) -> String {
    match ApiError::from(e) {
        ApiError::Internal(detail) => {
            tracing::error!(%detail, "an MCP workspace call failed");
            "the workspace call failed inside the gateway; its log has the details".into()
        }
        other => other.to_string(),
    }
}

/// The user's workspace, with what running kernels wrote saved into it first.
async fn space(app: &App, user: &str) -> Result<Arc<crate::workspace::Space>, String> {
    let space = app.workspaces.space(user).await.map_err(workspace_error)?;
    space.sync().await;
    Ok(space)
}

async fn read_file(
    app: &Arc<App>,
    session: &Session,
    args: &Map<String, Value>,
) -> Result<Value, String> {
    let args = arguments(args, "read_file", &["path"])?;
    let raw = string_arg(args, "path")?.ok_or("read_file needs `path`")?;
    let path = workspace_path(&raw)?;
    let space = space(app, &session.owner).await?;
    let p = path.clone();
    let entry = space
        .read(move |s| s.stat(&p))
        .await
        .map_err(workspace_error)?;
    if entry.kind == Kind::Dir {
        return Err(format!("{} is a folder; list_files lists it", shown(&path)));
    }
    if entry.size > MAX_READ as u64 {
        return Err(format!(
            "{} is {} bytes; read_file returns files up to {MAX_READ} bytes (read parts of it \
             with run_code)",
            shown(&path),
            entry.size
        ));
    }
    let p = path.clone();
    let (_, data) = space
        .read(move |s| s.read(&p))
        .await
        .map_err(workspace_error)?;
    let ext = path
        .name()
        .rsplit_once('.')
        .map(|(_, e)| e.to_ascii_lowercase())
        .unwrap_or_default();
    let b64 = || base64::engine::general_purpose::STANDARD.encode(&data);
    if let Some((_, mime)) = IMAGE_TYPES.iter().find(|(e, _)| *e == ext) {
        return Ok(result(
            vec![json!({"type": "image", "data": b64(), "mimeType": mime})],
            false,
        ));
    }
    match std::str::from_utf8(&data) {
        Ok(t) => Ok(result(vec![text(t)], false)),
        Err(_) => Ok(result(
            vec![
                text(format!(
                    "{} is binary ({} bytes); its content is the base64 blob of the resource \
                     below",
                    shown(&path),
                    data.len()
                )),
                json!({
                    "type": "resource",
                    "resource": {
                        "uri": format!("file://{}", shown(&path).replace(' ', "%20")),
                        "mimeType": "application/octet-stream",
                        "blob": b64(),
                    }
                }),
            ],
            false,
        )),
    }
}

async fn write_file(
    app: &Arc<App>,
    session: &Session,
    args: &Map<String, Value>,
) -> Result<Value, String> {
    let args = arguments(args, "write_file", &["path", "content", "encoding"])?;
    let raw = string_arg(args, "path")?.ok_or("write_file needs `path`")?;
    let content = string_arg(args, "content")?.ok_or("write_file needs `content`")?;
    let data = match string_arg(args, "encoding")?.as_deref() {
        None | Some("utf-8") | Some("utf8") => content.into_bytes(),
        Some("base64") => base64::engine::general_purpose::STANDARD
            .decode(content.trim())
            .map_err(|e| format!("content is not valid base64: {e}"))?,
        Some(other) => {
            return Err(format!(
                "unknown encoding {other:?}: use \"utf-8\" or \"base64\""
            ));
        }
    };
    let path = workspace_path(&raw)?;
    if path.is_root() {
        return Err("write_file needs a file path, not the workspace itself".into());
    }
    let space = space(app, &session.owner).await?;
    let size = data.len();
    space
        .write(path.clone(), data, true)
        .await
        .map_err(workspace_error)?;
    Ok(result(
        vec![text(format!("Wrote {size} bytes to {}.", shown(&path)))],
        false,
    ))
}

async fn list_files(
    app: &Arc<App>,
    session: &Session,
    args: &Map<String, Value>,
) -> Result<Value, String> {
    let args = arguments(args, "list_files", &["path"])?;
    let raw = string_arg(args, "path")?.unwrap_or_default();
    let path = workspace_path(&raw)?;
    let space = space(app, &session.owner).await?;
    let p = path.clone();
    let mut children = space
        .read(move |s| s.list(&p))
        .await
        .map_err(workspace_error)?;
    children.sort_by(|a, b| a.0.cmp(&b.0));
    let entries: Vec<Value> = children
        .iter()
        .map(|(p, e)| {
            json!({
                "path": p.as_str(),
                "type": if e.kind == Kind::Dir { "directory" } else { "file" },
                "size": if e.kind == Kind::Dir { Value::Null } else { json!(e.size) },
                "modified": timestamp(e.modified),
            })
        })
        .collect();
    Ok(structured(
        format!(
            "{} entries in {} (paths relative to /workspace).",
            entries.len(),
            shown(&path)
        ),
        json!({"path": path.as_str(), "entries": entries}),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_are_relative_to_the_workspace() {
        assert_eq!(workspace_path("a/b.txt").unwrap().as_str(), "a/b.txt");
        assert_eq!(
            workspace_path("/workspace/a/b.txt").unwrap().as_str(),
            "a/b.txt"
        );
        assert!(workspace_path("/workspace").unwrap().is_root());
        assert!(workspace_path("").unwrap().is_root());
        assert!(workspace_path("/etc/passwd").is_err());
        assert!(workspace_path("/workspacex/a").is_err());
        assert!(workspace_path("../x").is_err());
        assert!(workspace_path("a/../../x").is_err());
    }

    #[test]
    fn every_tool_has_a_described_object_schema() {
        let tools = definitions();
        let tools = tools.as_array().unwrap();
        assert_eq!(tools.len(), 7);
        for t in tools {
            assert!(t["description"].as_str().unwrap().len() > 40, "{t}");
            assert_eq!(t["inputSchema"]["type"], "object", "{t}");
            for (name, p) in t["inputSchema"]["properties"].as_object().unwrap() {
                assert!(p["description"].is_string(), "{name} of {}", t["name"]);
            }
        }
    }

    #[test]
    fn arguments_are_checked() {
        let args: Map<String, Value> = serde_json::from_value(json!({"code": 1})).unwrap();
        assert!(string_arg(&args, "code").unwrap_err().contains("string"));
        assert!(arguments(&args, "run_code", &["x"]).is_err());
        let args: Map<String, Value> =
            serde_json::from_value(json!({"t": 0, "u": 5, "v": 2.5, "w": 7.0})).unwrap();
        assert!(seconds_arg(&args, "t", 10).is_err());
        assert_eq!(seconds_arg(&args, "u", 10).unwrap(), Some(5));
        assert!(seconds_arg(&args, "v", 10).is_err());
        assert_eq!(seconds_arg(&args, "w", 10).unwrap(), Some(7));
        assert_eq!(seconds_arg(&args, "missing", 10).unwrap(), None);
    }

    #[test]
    fn outputs_keep_their_order_and_images_become_image_content() {
        let mut out = Outputs::default();
        out.push_text("stdout", "a\n");
        out.push_text("stdout", "b\n");
        let mut data = Map::new();
        data.insert("image/png".into(), json!("iVBO\nRw=="));
        data.insert("text/plain".into(), json!("<Figure>"));
        out.display(&data, false);
        out.push_text("stderr", "w\n");
        let mut data = Map::new();
        data.insert("text/plain".into(), json!("42"));
        out.display(&data, true);
        let r = out.finish(false, vec![]);
        let c = r["content"].as_array().unwrap();
        assert_eq!(c[0], text("a\nb\n"));
        assert_eq!(
            c[1],
            json!({"type": "image", "data": "iVBORw==", "mimeType": "image/png"})
        );
        assert_eq!(c[2], text("[stderr]\nw\n"));
        assert_eq!(c[3], text("[result]\n42\n"));
        assert_eq!(r["isError"], false);
    }

    #[test]
    fn text_is_capped() {
        let mut out = Outputs::default();
        let big = "é".repeat(MAX_TEXT);
        out.push_text("stdout", &big);
        out.push_text("stdout", "more");
        let r = out.finish(false, vec![]);
        let c = r["content"].as_array().unwrap();
        assert!(c[0]["text"].as_str().unwrap().len() <= MAX_TEXT);
        assert!(c[1]["text"].as_str().unwrap().contains("cut"));
    }
}
