//! The code interpreter of a sandbox (E2B's port 49999): `/execute`, streaming NDJSON as the
//! code runs, and `/contexts`. Built on [`crate::exec`].

use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;
use serde_json::{Map, Value, json};

use super::sandboxes::{Context, Sandbox, Sandboxes};
use super::{E2bError, Lines};
use crate::exec::{Event, ExecError, Execution, Request, StreamName};

/// A line is sent at least this often while code runs (E2B's server does the same), so a
/// client that went away is noticed and its code interrupted.
pub const KEEPALIVE: Duration = Duration::from_secs(5);
/// How long the set-up code of a context (working directory, environment) may take.
const SETUP_TIMEOUT: Duration = Duration::from_secs(30);

/// Languages E2B's SDK names (and their aliases), with what Sandgate says about each.
const OTHER_LANGUAGES: &[&str] = &[
    "javascript",
    "js",
    "typescript",
    "ts",
    "r",
    "java",
    "bash",
    "deno",
];

/// `POST /execute`.
#[derive(Debug, Deserialize)]
pub struct ExecuteBody {
    /// The code.
    pub code: String,
    /// The context to run in; the default context when missing.
    #[serde(default)]
    pub context_id: Option<String>,
    /// The language; Python when missing.
    #[serde(default)]
    pub language: Option<String>,
    /// Environment for this run only.
    #[serde(default)]
    pub env_vars: Option<Map<String, Value>>,
}

/// `POST /contexts`.
#[derive(Debug, Default, Deserialize)]
pub struct ContextBody {
    /// The language; Python when missing.
    #[serde(default)]
    pub language: Option<String>,
    /// The working directory; the sandbox's home (`/home/user`) when missing.
    #[serde(default)]
    pub cwd: Option<String>,
}

/// Checks a language name: Python (or none) is served; others get a clear error.
pub fn check_language(language: Option<&str>) -> Result<(), E2bError> {
    match language.map(str::to_ascii_lowercase).as_deref() {
        None | Some("python") | Some("python3") => Ok(()),
        Some(other) if OTHER_LANGUAGES.contains(&other) => Err(E2bError::BadRequest(format!(
            "language {other:?} is not available in this sandbox: Sandgate's WebAssembly \
             sandbox runs Python only. JavaScript, TypeScript and Bash come with the Linux \
             sandbox tier (not available in this build)"
        ))),
        Some(other) => Err(E2bError::BadRequest(format!(
            "unknown language {other:?}; this sandbox runs \"python\""
        ))),
    }
}

/// The context a `/execute` runs in.
pub fn context_for(sandbox: &Sandbox, body: &ExecuteBody) -> Result<Context, E2bError> {
    if body.context_id.is_some() && body.language.is_some() {
        return Err(E2bError::BadRequest(
            "give context_id or language, not both".into(),
        ));
    }
    check_language(body.language.as_deref())?;
    match &body.context_id {
        Some(id) => sandbox
            .context(id)
            .ok_or_else(|| E2bError::NotFound(format!("context {id} not found"))),
        None => sandbox
            .default_context()
            .ok_or_else(|| E2bError::NotFound("the sandbox has no context".into())),
    }
}

/// A Python literal of a JSON string map (`{"A": "1"}`), for code the gateway runs.
fn python_dict(vars: &Map<String, Value>) -> Result<String, E2bError> {
    let mut clean = Map::new();
    for (k, v) in vars {
        let Some(v) = v.as_str() else {
            return Err(E2bError::BadRequest(format!(
                "environment variable {k:?} must be a string"
            )));
        };
        if k.is_empty() || k.contains('=') || k.contains('\0') || v.contains('\0') {
            return Err(E2bError::BadRequest(format!(
                "invalid environment variable name or value: {k:?}"
            )));
        }
        clean.insert(k.clone(), Value::String(v.to_owned()));
    }
    // JSON strings are Python string literals once `json.loads` reads them.
    Ok(format!(
        "__import__('json').loads({})",
        serde_json::to_string(&serde_json::to_string(&clean).unwrap_or_default())
            .unwrap_or_default()
    ))
}

/// Runs set-up code in a context's kernel, hidden and uncounted.
async fn run_hidden(kernel: &Arc<crate::session::Kernel>, code: String) -> Result<(), E2bError> {
    let request = Request {
        code,
        silent: true,
        store_history: false,
        user_expressions: Map::new(),
        stop_on_error: false,
        metadata: Map::new(),
        show_under: None,
    };
    let execution = Execution::start(kernel, request)
        .await
        .map_err(|e| E2bError::Unavailable(e.to_string()))?;
    let reply = tokio::time::timeout(SETUP_TIMEOUT, execution.reply())
        .await
        .map_err(|_| E2bError::Unavailable("the context's set-up did not finish".into()))?
        .map_err(|e| E2bError::Unavailable(e.to_string()))?;
    match reply {
        Some(r) if r["status"] == "ok" => Ok(()),
        Some(r) => Err(E2bError::BadRequest(format!(
            "{}: {}",
            r["ename"].as_str().unwrap_or("Error"),
            r["evalue"].as_str().unwrap_or_default()
        ))),
        None => Err(E2bError::Unavailable(
            "the kernel did not answer the context's set-up".into(),
        )),
    }
}

/// Prepares a context's interpreter: the sandbox's environment and the working directory.
pub async fn set_up(sandbox: &Sandbox, context: &Context) -> Result<(), E2bError> {
    let mut code = format!(
        "__import__('os').environ.update({})\n",
        python_dict(&sandbox.env_vars)?
    );
    code.push_str(&format!(
        "__import__('os').chdir({})\n",
        serde_json::to_string(&context.cwd).unwrap_or_default()
    ));
    let process = context.process_id();
    run_hidden(&context.kernel, code).await?;
    context
        .set_up_in
        .store(process, std::sync::atomic::Ordering::Relaxed);
    Ok(())
}

/// Sets the context up again if its kernel restarted since (after a crash, say): the new
/// interpreter gets the sandbox's environment and working directory back.
pub async fn ensure_set_up(sandbox: &Sandbox, context: &Context) -> Result<(), E2bError> {
    let current = context.process_id();
    if current == 0 || context.set_up_in.load(std::sync::atomic::Ordering::Relaxed) == current {
        return Ok(());
    }
    set_up(sandbox, context).await
}

/// `POST /contexts`: a new interpreter in the sandbox.
pub async fn create_context(
    sandboxes: &Sandboxes,
    sandbox: &Sandbox,
    body: ContextBody,
) -> Result<Value, E2bError> {
    check_language(body.language.as_deref())?;
    let cwd = body
        .cwd
        .unwrap_or_else(|| super::sandboxes::DEFAULT_CWD.into());
    // A fresh kernel that shares the sandbox's home folder.
    let kernel = sandboxes
        .kernels()
        .start_with_home(&sandbox.owner, &sandbox.kernelspec, sandbox.home.clone())
        .await?;
    kernel.set_managed();
    // Until the sandbox holds it, the kernel is this request's: shut down if the request fails,
    // is abandoned (the client went away), or the sandbox ends meanwhile.
    let mut pending = Pending {
        kernels: sandboxes.kernels().clone(),
        owner: sandbox.owner.clone(),
        id: Some(kernel.id.to_string()),
    };
    let context = Context::new(kernel, cwd);
    set_up(sandbox, &context).await?;
    let model = context.model();
    if sandbox.add_context(context).is_err() {
        return Err(E2bError::NotFound(format!(
            "sandbox {} ended while the context was made",
            sandbox.id
        )));
    }
    pending.id = None;
    Ok(model)
}

/// A context's kernel not yet handed to its sandbox: shut down when dropped.
struct Pending {
    kernels: crate::session::Kernels,
    owner: String,
    id: Option<String>,
}

impl Drop for Pending {
    fn drop(&mut self) {
        let Some(id) = self.id.take() else { return };
        let (kernels, owner) = (self.kernels.clone(), self.owner.clone());
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            handle.spawn(async move {
                let _ = kernels.shutdown(&owner, &id).await;
            });
        }
    }
}

/// `DELETE /contexts/{id}`.
pub async fn remove_context(
    sandboxes: &Sandboxes,
    sandbox: &Sandbox,
    id: &str,
) -> Result<(), E2bError> {
    let context = sandbox
        .remove_context(id)
        .ok_or_else(|| E2bError::NotFound(format!("context {id} not found")))?;
    sandboxes
        .kernels()
        .shutdown(&sandbox.owner, &context.id)
        .await?;
    Ok(())
}

/// `POST /contexts/{id}/restart`: a fresh interpreter, set up again.
pub async fn restart_context(
    sandboxes: &Sandboxes,
    sandbox: &Sandbox,
    id: &str,
) -> Result<(), E2bError> {
    let context = sandbox
        .context(id)
        .ok_or_else(|| E2bError::NotFound(format!("context {id} not found")))?;
    sandboxes
        .kernels()
        .restart(&sandbox.owner, &context.id)
        .await?;
    set_up(sandbox, &context).await
}

/// One NDJSON line for an execution event, as E2B's server writes it (`None`: no line).
pub fn line(event: &Event) -> Option<Value> {
    match event {
        Event::Started { execution_count } => Some(json!({
            "type": "number_of_executions",
            "execution_count": execution_count,
        })),
        Event::Stream {
            name,
            text,
            timestamp,
        } => Some(json!({
            "type": match name { StreamName::Stdout => "stdout", StreamName::Stderr => "stderr" },
            "text": text,
            "timestamp": timestamp,
        })),
        Event::Display { data, main, .. } => Some(result(data, *main)),
        Event::Error(e) => Some(json!({
            "type": "error",
            "name": e.ename,
            "value": e.evalue,
            "traceback": strip_ansi(&e.traceback.join("\n")),
        })),
        Event::ClearOutput { .. } | Event::Reply(_) => None,
    }
}

/// The error line of a reply that failed without an `error` message (the kernel sends both
/// normally; a reply alone, e.g. after a restart inside the cell, still ends as an error).
pub fn reply_error(reply: &Value) -> Option<Value> {
    if reply["status"] == "aborted" {
        return Some(json!({
            "type": "error",
            "name": "ExecutionAborted",
            "value": "the code was not run: a request queued before it in this context failed",
            "traceback": "",
        }));
    }
    if reply["status"] != "error" {
        return None;
    }
    let traceback: Vec<&str> = reply["traceback"]
        .as_array()
        .map(|t| t.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    Some(json!({
        "type": "error",
        "name": reply["ename"].as_str().unwrap_or("Error"),
        "value": reply["evalue"].as_str().unwrap_or_default(),
        "traceback": strip_ansi(&traceback.join("\n")),
    }))
}

/// A `result` line from a MIME bundle: known types become fields, the rest `extra`.
fn result(data: &Map<String, Value>, main: bool) -> Value {
    const FIELDS: &[(&str, &str)] = &[
        ("text/plain", "text"),
        ("text/html", "html"),
        ("text/markdown", "markdown"),
        ("image/svg+xml", "svg"),
        ("image/png", "png"),
        ("image/jpeg", "jpeg"),
        ("application/pdf", "pdf"),
        ("text/latex", "latex"),
        ("application/json", "json"),
        ("application/javascript", "javascript"),
        ("e2b/data", "data"),
        ("e2b/chart", "chart"),
    ];
    let mut line = Map::new();
    line.insert("type".into(), "result".into());
    let mut extra = Map::new();
    for (mime, value) in data {
        match FIELDS.iter().find(|(m, _)| m == mime) {
            Some((_, field)) if !value.is_null() => {
                let value = match (*field, value) {
                    // As E2B's server: one pair of surrounding single quotes is stripped.
                    ("text", Value::String(s))
                        if s.len() >= 2 && s.starts_with('\'') && s.ends_with('\'') =>
                    {
                        Value::String(s[1..s.len() - 1].to_owned())
                    }
                    // A multi-line SVG or text may arrive as a list of lines.
                    (_, Value::Array(parts)) if parts.iter().all(Value::is_string) => {
                        Value::String(parts.iter().filter_map(Value::as_str).collect())
                    }
                    _ => value.clone(),
                };
                line.insert((*field).into(), value);
            }
            Some(_) => {}
            None => {
                extra.insert(mime.clone(), value.clone());
            }
        }
    }
    line.insert("is_main_result".into(), main.into());
    line.insert("extra".into(), Value::Object(extra));
    Value::Object(line)
}

/// Removes ANSI colour sequences (E2B's server formats tracebacks without colour).
pub fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' && chars.peek() == Some(&'[') {
            chars.next();
            // Parameters and intermediates, then one final byte in '@'..='~'.
            for c in chars.by_ref() {
                if ('@'..='~').contains(&c) {
                    break;
                }
            }
            continue;
        }
        out.push(c);
    }
    out
}

/// Runs `/execute` and writes its NDJSON lines to `out` as they happen. Dropping `out`'s
/// reader (the client went away) interrupts the code.
pub async fn execute(
    sandbox: Arc<Sandbox>,
    context: Context,
    env_vars: Option<Map<String, Value>>,
    code: String,
    out: Lines,
) {
    if let Err(e) = ensure_set_up(&sandbox, &context).await {
        let _ = out
            .send(json!({"type": "error", "name": "KernelError", "value": e.to_string(), "traceback": ""}))
            .await;
        return;
    }
    let env = match env_vars.filter(|v| !v.is_empty()) {
        None => None,
        Some(vars) => match python_dict(&vars) {
            Ok(dict) => Some(dict),
            Err(e) => {
                let _ = out
                    .send(json!({"type": "error", "name": "ValueError", "value": e.to_string(), "traceback": ""}))
                    .await;
                return;
            }
        },
    };
    // One run with its own environment at a time in a context (this task runs to its end even
    // if the client goes away, so the environment is always put back).
    let env_turn = context.env_turn.clone();
    let _turn = match &env {
        Some(_) => Some(env_turn.lock().await),
        None => None,
    };
    let mut saved = true;
    if let Some(dict) = &env {
        // As E2B's server: this run's variables are set before it and put back after it.
        let save = format!(
            "__import__('builtins').__sandgate_env_saved__ = dict(__import__('os').environ)\n\
             __import__('os').environ.update({dict})\n"
        );
        if let Err(e) = run_hidden(&context.kernel, save).await {
            saved = false;
            let _ = out
                .send(json!({"type": "error", "name": "EnvironmentError", "value": e.to_string(), "traceback": ""}))
                .await;
        }
    }
    if saved {
        stream(&context, code, &out).await;
    }
    if env.is_some() {
        // Queued behind the save, so it also undoes a save that ran after its wait timed out.
        let restore = "import builtins as __b, os as __o\n\
                       if hasattr(__b, '__sandgate_env_saved__'):\n\
                       \x20   __o.environ.clear(); __o.environ.update(__b.__sandgate_env_saved__)\n\
                       \x20   del __b.__sandgate_env_saved__\n\
                       del __b, __o\n"
            .to_owned();
        if let Err(e) = run_hidden(&context.kernel, restore).await {
            tracing::warn!(error = %e, "a run's environment could not be put back");
        }
    }
    let _ = out.send(json!({"type": "end_of_execution"})).await;
}

async fn stream(context: &Context, code: String, out: &Lines) {
    let mut request = Request::cell(code);
    // E2B's result types: `e2b/chart` for figures, `e2b/data` for DataFrames.
    request
        .metadata
        .insert(sandgate_wire::E2B_METADATA_KEY.into(), Value::Bool(true));
    let mut execution = match Execution::start(&context.kernel, request).await {
        Ok(e) => e,
        Err(e) => {
            let _ = out.send(kernel_error(&e)).await;
            return;
        }
    };
    let mut saw_error = false;
    loop {
        let next = tokio::select! {
            next = execution.next() => next,
            () = out.closed() => return, // Dropping the execution interrupts the code.
            () = tokio::time::sleep(KEEPALIVE) => {
                if out.send(json!({"type": "keepalive"})).await.is_err() {
                    return;
                }
                continue;
            }
        };
        let event = match next {
            Ok(Some(event)) => event,
            Ok(None) => return,
            Err(e) => {
                let _ = out.send(kernel_error(&e)).await;
                return;
            }
        };
        let line = match &event {
            Event::Error(_) => {
                saw_error = true;
                line(&event)
            }
            Event::Reply(reply) if !saw_error => reply_error(reply),
            _ => line(&event),
        };
        if let Some(line) = line
            && out.send(line).await.is_err()
        {
            return;
        }
    }
}

fn kernel_error(e: &ExecError) -> Value {
    json!({"type": "error", "name": "KernelError", "value": e.to_string(), "traceback": ""})
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::exec::ErrorOutput;

    #[test]
    fn results_carry_every_field_the_sdk_knows() {
        let mut data = Map::new();
        for (mime, v) in [
            ("text/plain", json!("'hi'")),
            ("text/html", json!("<b>")),
            ("image/png", json!("iVBOR")),
            ("image/svg+xml", json!(["<svg>", "</svg>"])),
            ("e2b/chart", json!({"type": "line"})),
            ("e2b/data", json!({"a": [1]})),
            ("application/json", json!({"k": 1})),
            ("application/vnd.custom", json!("x")),
        ] {
            data.insert(mime.into(), v);
        }
        let line = line(&Event::Display {
            data,
            metadata: Map::new(),
            main: true,
        })
        .unwrap();
        assert_eq!(line["type"], "result");
        assert_eq!(line["text"], "hi");
        assert_eq!(line["html"], "<b>");
        assert_eq!(line["png"], "iVBOR");
        assert_eq!(line["svg"], "<svg></svg>");
        assert_eq!(line["chart"]["type"], "line");
        assert_eq!(line["data"]["a"][0], 1);
        assert_eq!(line["json"]["k"], 1);
        assert_eq!(line["extra"]["application/vnd.custom"], "x");
        assert_eq!(line["is_main_result"], true);
    }

    #[test]
    fn streams_errors_and_counts_become_lines() {
        let l = line(&Event::Stream {
            name: StreamName::Stderr,
            text: "w\n".into(),
            timestamp: "t".into(),
        })
        .unwrap();
        assert_eq!(
            l,
            json!({"type": "stderr", "text": "w\n", "timestamp": "t"})
        );
        let l = line(&Event::Error(ErrorOutput {
            ename: "ValueError".into(),
            evalue: "bad".into(),
            traceback: vec!["\u{1b}[0;31mValueError\u{1b}[0m".into(), "line 2".into()],
        }))
        .unwrap();
        assert_eq!(l["traceback"], "ValueError\nline 2");
        assert_eq!(l["name"], "ValueError");
        let l = line(&Event::Started { execution_count: 4 }).unwrap();
        assert_eq!(l["execution_count"], 4);
        assert!(line(&Event::ClearOutput { wait: false }).is_none());
        assert!(reply_error(&json!({"status": "ok"})).is_none());
        assert_eq!(
            reply_error(&json!({"status": "aborted"})).unwrap()["name"],
            "ExecutionAborted"
        );
        assert_eq!(
            reply_error(&json!({"status": "error", "ename": "E", "evalue": "v", "traceback": []}))
                .unwrap()["name"],
            "E"
        );
    }

    #[test]
    fn languages_and_environment_are_checked() {
        assert!(check_language(None).is_ok());
        assert!(check_language(Some("Python")).is_ok());
        let e = check_language(Some("js")).unwrap_err().to_string();
        assert!(e.contains("Python only"), "{e}");
        assert!(check_language(Some("cobol")).is_err());
        let mut vars = Map::new();
        vars.insert("A".into(), json!("1'\"\\\n"));
        let dict = python_dict(&vars).unwrap();
        assert!(dict.starts_with("__import__('json').loads(\""), "{dict}");
        vars.insert("B".into(), json!(1));
        assert!(python_dict(&vars).is_err());
        let mut vars = Map::new();
        vars.insert("A=B".into(), json!("x"));
        assert!(python_dict(&vars).is_err());
    }

    #[test]
    fn ansi_sequences_are_removed() {
        assert_eq!(strip_ansi("\u{1b}[1;32mok\u{1b}[0m done"), "ok done");
        assert_eq!(strip_ansi("plain \u{1b}"), "plain \u{1b}");
    }
}
