//! An MCP server (Model Context Protocol, revisions 2025-03-26, 2025-06-18 and 2025-11-25) at
//! `/mcp` on the gateway's listener, over the Streamable HTTP transport, so Claude Code, Claude
//! Desktop (through `sandgate mcp`, [`stdio`]) or any MCP client can run code in Sandgate
//! sandboxes and use the encrypted workspace ([`tools`]).
//!
//! The transport, as served here:
//! - `POST /mcp` carries one JSON-RPC message. A request is answered with `application/json`
//!   (the spec lets the server choose JSON over `text/event-stream`; no tool sends progress);
//!   a notification or a response with `202 Accepted`.
//! - `initialize` (without `Mcp-Session-Id`) makes a session and returns its id in the
//!   `Mcp-Session-Id` header; every later request carries it. A session belongs to the user
//!   whose token made it: another user's token, or an unknown or ended id, gets `404`, as the
//!   spec says for a session that is gone.
//! - `MCP-Protocol-Version`, when sent, must be a revision this server speaks (else `400`).
//! - `GET /mcp` is `405` (no server-initiated stream: this server never sends requests or
//!   notifications of its own); `DELETE /mcp` ends the session and its sandbox.
//! - Authentication is the rest of the API's: `Authorization: Bearer <token>` (or `token`).
//! - Failures are JSON-RPC error objects with the HTTP status that fits: a body that is not
//!   JSON is `-32700` (400), a message that is not JSON-RPC `-32600` (400), an unknown method
//!   `-32601`, wrong parameters `-32602`, a body over the gateway's limit `413`.
//!
//! Sessions idle for [`SESSION_IDLE`] end (with their sandbox); a user holds at most
//! [`MAX_SESSIONS_PER_USER`] (the least recently used ends first).
//!
//! Why not the `rmcp` crate (3.11, evaluated for this): it fits hyper 1 (its
//! `StreamableHttpService` is a tower service), but what this server needs from it is small
//! (five methods, JSON in, JSON out), while using it needed as much code around it: its
//! HTTP-level errors are plain text (a malformed body is a `415` "fail to deserialize"), its
//! sessions are not bound to a user (any valid token holding a session id could use or delete
//! it), it answers 2026-07-28's sessionless `server/discover` unless narrowed, and the stdio
//! mode still needs a client (its HTTP client is `reqwest`). It also adds about 25 crates
//! (schemars and darling proc-macros, a second `sha2`/`digest`/`base64`): in a release build
//! on this project's 2-core machine they took 66 s of compile time, rmcp itself 33 s.

pub mod stdio;
pub mod tools;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use serde_json::{Map, Value, json};

use crate::http::{App, Body};

/// The path of the endpoint.
pub const PATH: &str = "/mcp";
/// The session header.
pub const SESSION_HEADER: &str = "mcp-session-id";
/// The protocol version header.
pub const VERSION_HEADER: &str = "mcp-protocol-version";
/// Revisions served, newest first.
pub const VERSIONS: &[&str] = &["2025-11-25", "2025-06-18", "2025-03-26"];
/// A session unused this long ends, with its sandbox.
pub const SESSION_IDLE: Duration = Duration::from_secs(3600);
/// Sessions one user holds at once.
pub const MAX_SESSIONS_PER_USER: usize = 64;

/// JSON-RPC's error codes.
mod code {
    pub const PARSE: i64 = -32700;
    pub const INVALID_REQUEST: i64 = -32600;
    pub const METHOD_NOT_FOUND: i64 = -32601;
    pub const INVALID_PARAMS: i64 = -32602;
    /// Not authorised (an implementation-defined server error).
    pub const UNAUTHORIZED: i64 = -32001;
    /// The session is unknown or ended.
    pub const NO_SESSION: i64 = -32002;
    /// The request was cancelled by the client.
    pub const CANCELLED: i64 = -32800;
}

/// One MCP session.
pub struct Session {
    /// Its id (the `Mcp-Session-Id`).
    pub id: String,
    /// The user whose token made it.
    pub owner: String,
    /// The revision agreed at `initialize`.
    pub version: String,
    /// Its own sandbox's id, once made.
    pub sandbox: tokio::sync::Mutex<Option<String>>,
    last_used: Mutex<Instant>,
    /// Calls in flight (JSON-RPC id → cancel), so `notifications/cancelled` can stop one.
    in_flight: Mutex<HashMap<String, tokio::sync::oneshot::Sender<()>>>,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("owner", &self.owner)
            .finish()
    }
}

impl Session {
    fn touch(&self) {
        *self.last_used.lock().unwrap_or_else(|e| e.into_inner()) = Instant::now();
    }

    fn idle(&self) -> Duration {
        self.last_used
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .elapsed()
    }

    fn busy(&self) -> bool {
        !self
            .in_flight
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_empty()
    }
}

/// Every MCP session of the gateway.
#[derive(Default, Clone)]
pub struct Sessions {
    map: Arc<Mutex<HashMap<String, Arc<Session>>>>,
}

impl Sessions {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<Session>>> {
        self.map.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// `owner`'s session `id`; another user's is not found, as an unknown one.
    fn get(&self, owner: &str, id: &str) -> Option<Arc<Session>> {
        self.lock().get(id).filter(|s| s.owner == owner).cloned()
    }

    /// Removes session `id` (whoever owns it); returns it.
    fn remove(&self, id: &str) -> Option<Arc<Session>> {
        self.lock().remove(id)
    }

    /// Makes a session; ends those idle past [`SESSION_IDLE`] and, past
    /// [`MAX_SESSIONS_PER_USER`], the owner's least recently used. Returns the ended ones.
    fn create(&self, owner: &str, version: &str) -> (Arc<Session>, Vec<Arc<Session>>) {
        let session = Arc::new(Session {
            id: uuid::Uuid::new_v4().simple().to_string(),
            owner: owner.to_owned(),
            version: version.to_owned(),
            sandbox: tokio::sync::Mutex::new(None),
            last_used: Mutex::new(Instant::now()),
            in_flight: Mutex::default(),
        });
        let mut map = self.lock();
        let mut ended: Vec<Arc<Session>> = Vec::new();
        let stale: Vec<String> = map
            .values()
            .filter(|s| s.idle() > SESSION_IDLE && !s.busy())
            .map(|s| s.id.clone())
            .collect();
        ended.extend(stale.iter().filter_map(|id| map.remove(id)));
        let mut own: Vec<Arc<Session>> =
            map.values().filter(|s| s.owner == owner).cloned().collect();
        if own.len() >= MAX_SESSIONS_PER_USER {
            own.sort_by_key(|s| std::cmp::Reverse(s.idle()));
            for s in own.iter().take(own.len() + 1 - MAX_SESSIONS_PER_USER) {
                ended.extend(map.remove(&s.id));
            }
        }
        map.insert(session.id.clone(), session.clone());
        (session, ended)
    }

    /// Sessions idle past [`SESSION_IDLE`], removed.
    fn expired(&self) -> Vec<Arc<Session>> {
        let mut map = self.lock();
        let stale: Vec<String> = map
            .values()
            .filter(|s| s.idle() > SESSION_IDLE && !s.busy())
            .map(|s| s.id.clone())
            .collect();
        stale.iter().filter_map(|id| map.remove(id)).collect()
    }
}

/// Ends sessions: their own sandboxes are killed.
async fn end(app: &App, sessions: Vec<Arc<Session>>) {
    for s in sessions {
        let sandbox = s.sandbox.lock().await.take();
        if let Some(id) = sandbox
            && let Err(e) = app.e2b.kill(&s.owner, &id).await
        {
            tracing::debug!(error = %e, "an MCP session's sandbox had ended already");
        }
        tracing::info!(owner = s.owner, "MCP session ended");
    }
}

/// A JSON-RPC error object.
fn rpc_error(id: &Value, code: i64, message: impl Into<String>) -> Value {
    json!({"jsonrpc": "2.0", "id": id, "error": {"code": code, "message": message.into()}})
}

fn json_response(status: StatusCode, body: &Value) -> Response<Body> {
    crate::http::json_response(status, body).map(|b| b.boxed_unsync())
}

fn empty(status: StatusCode) -> Response<Body> {
    let mut r = Response::new(http_body_util::Empty::new().boxed_unsync());
    *r.status_mut() = status;
    r
}

/// A refusal sent before the request's body was read: the connection closes after it, so the
/// client does not send its next request on a connection the server is about to drop.
fn closing(mut r: Response<Body>) -> Response<Body> {
    r.headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
    r
}

/// A transport-level refusal: HTTP status and a JSON-RPC error without an id.
fn refuse(status: StatusCode, code: i64, message: impl Into<String>) -> Response<Body> {
    json_response(status, &rpc_error(&Value::Null, code, message))
}

fn header_str<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

/// Whether the client takes `application/json` (no `Accept` means anything).
fn accepts_json(headers: &HeaderMap) -> bool {
    let Some(accept) = header_str(headers, header::ACCEPT.as_str()) else {
        return headers.get(header::ACCEPT).is_none();
    };
    accept.split(',').any(|m| {
        let m = m.split(';').next().unwrap_or_default().trim();
        m.eq_ignore_ascii_case("application/json")
            || m.eq_ignore_ascii_case("application/*")
            || m == "*/*"
    })
}

/// Serves `/mcp` (the `Host` rule has passed).
pub async fn handle(app: &Arc<App>, req: Request<Incoming>) -> Response<Body> {
    let headers = req.headers();
    if let Err(e) = crate::auth::check_origin(headers, &app.config.auth.allow_origins) {
        return closing(refuse(
            StatusCode::FORBIDDEN,
            code::UNAUTHORIZED,
            e.to_string(),
        ));
    }
    let user = match app.auth.check(headers, None, false) {
        Ok(user) => user,
        Err(e) => {
            let message = match e {
                crate::auth::AuthError::Missing => {
                    "this endpoint needs the gateway's access token: send `Authorization: \
                     Bearer <token>`"
                        .to_owned()
                }
                other => format!("{other}: send the gateway's access token"),
            };
            let mut r = refuse(StatusCode::UNAUTHORIZED, code::UNAUTHORIZED, message);
            r.headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            return closing(r);
        }
    };
    crate::http::unlock_workspace(app, headers, None, false, &user).await;
    let expired = app.mcp.expired();
    if !expired.is_empty() {
        let app = app.clone();
        tokio::spawn(async move { end(&app, expired).await });
    }
    match *req.method() {
        Method::POST => post(app, &user, req).await,
        Method::DELETE => {
            let Some(id) = header_str(req.headers(), SESSION_HEADER) else {
                return refuse(
                    StatusCode::BAD_REQUEST,
                    code::INVALID_REQUEST,
                    "DELETE ends a session: send its Mcp-Session-Id",
                );
            };
            if app.mcp.get(&user, id).is_none() {
                return refuse(StatusCode::NOT_FOUND, code::NO_SESSION, "no such session");
            }
            let ended: Vec<_> = app.mcp.remove(id).into_iter().collect();
            end(app, ended).await;
            empty(StatusCode::NO_CONTENT)
        }
        _ => {
            // No server-initiated stream is offered (GET), as the spec allows.
            let mut r = refuse(
                StatusCode::METHOD_NOT_ALLOWED,
                code::INVALID_REQUEST,
                format!(
                    "{} is not served on {PATH}: POST JSON-RPC messages, DELETE to end a \
                     session (this server opens no GET stream)",
                    req.method()
                ),
            );
            r.headers_mut()
                .insert(header::ALLOW, HeaderValue::from_static("POST, DELETE"));
            r
        }
    }
}

/// A JSON-RPC message's kind.
enum Message {
    Request {
        id: Value,
        method: String,
        params: Option<Value>,
    },
    Notification {
        method: String,
        params: Option<Value>,
    },
    /// A response to a request of ours (none is ever sent, so it is only acknowledged).
    Response,
}

/// A message refused before it is read: its JSON-RPC error code and message (sent with 400).
#[derive(Debug)]
struct Refusal {
    code: i64,
    message: String,
}

/// Reads one JSON-RPC message.
fn parse(body: &[u8]) -> Result<Message, Refusal> {
    let value: Value = serde_json::from_slice(body).map_err(|e| Refusal {
        code: code::PARSE,
        message: format!("parse error: the body is not JSON ({e})"),
    })?;
    let invalid = |message: String| Refusal {
        code: code::INVALID_REQUEST,
        message,
    };
    let obj = match value {
        Value::Object(o) => o,
        Value::Array(_) => {
            return Err(invalid(
                "JSON-RPC batches are not accepted (MCP 2025-06-18 removed them): send one \
                 message per POST"
                    .into(),
            ));
        }
        other => {
            return Err(invalid(format!(
                "a JSON-RPC message is an object, not {}",
                kind_of(&other)
            )));
        }
    };
    if obj.get("jsonrpc").and_then(Value::as_str) != Some("2.0") {
        return Err(invalid(
            "not a JSON-RPC 2.0 message: \"jsonrpc\": \"2.0\" is missing".into(),
        ));
    }
    let params = obj.get("params").cloned();
    if params
        .as_ref()
        .is_some_and(|p| !p.is_object() && !p.is_array())
    {
        return Err(invalid("params must be an object".into()));
    }
    let id = obj.get("id").cloned();
    if let Some(id) = &id
        && !(id.is_string() || id.is_i64() || id.is_u64())
    {
        return Err(invalid(format!(
            "the id must be a string or an integer, not {}",
            kind_of(id)
        )));
    }
    match (obj.get("method"), id) {
        (Some(Value::String(method)), Some(id)) => Ok(Message::Request {
            id,
            method: method.clone(),
            params,
        }),
        (Some(Value::String(method)), None) => Ok(Message::Notification {
            method: method.clone(),
            params,
        }),
        (Some(_), _) => Err(invalid("method must be a string".into())),
        (None, Some(_)) if obj.contains_key("result") || obj.contains_key("error") => {
            Ok(Message::Response)
        }
        (None, _) => Err(invalid(
            "a JSON-RPC message needs a method (a request or notification) or a result or error \
             (a response)"
                .into(),
        )),
    }
}

fn kind_of(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

async fn post(app: &Arc<App>, user: &str, req: Request<Incoming>) -> Response<Body> {
    let headers = req.headers().clone();
    if !accepts_json(&headers) {
        return closing(refuse(
            StatusCode::NOT_ACCEPTABLE,
            code::INVALID_REQUEST,
            "this server answers with application/json: accept it (Accept: application/json, \
             text/event-stream)",
        ));
    }
    if let Some(ct) = header_str(&headers, header::CONTENT_TYPE.as_str()) {
        let essence = ct.split(';').next().unwrap_or_default().trim();
        if !essence.eq_ignore_ascii_case("application/json") {
            return closing(refuse(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                code::INVALID_REQUEST,
                format!("send JSON-RPC as application/json, not {essence}"),
            ));
        }
    }
    let body = match crate::http::read_body(
        req.into_body(),
        app.config.http.max_body_bytes,
        Duration::from_secs(app.config.http.body_timeout_s),
    )
    .await
    {
        Ok(b) => b,
        Err(e) => {
            let status = e.status();
            return closing(refuse(status, code::INVALID_REQUEST, e.to_string()));
        }
    };
    let message = match parse(&body) {
        Ok(m) => m,
        Err(r) => return refuse(StatusCode::BAD_REQUEST, r.code, r.message),
    };
    let session_id = header_str(&headers, SESSION_HEADER);
    if let Message::Request { id, method, params } = &message
        && method == "initialize"
    {
        if session_id.is_some() {
            return json_response(
                StatusCode::BAD_REQUEST,
                &rpc_error(
                    id,
                    code::INVALID_REQUEST,
                    "this session is initialized already; send initialize without \
                     Mcp-Session-Id to start a new one",
                ),
            );
        }
        return initialize(app, user, id, params.as_ref()).await;
    }
    let Some(session_id) = session_id else {
        return match message {
            Message::Request { id, method, .. } => match method.as_str() {
                "ping" => json_response(
                    StatusCode::OK,
                    &json!({"jsonrpc": "2.0", "id": id, "result": {}}),
                ),
                "tools/list" | "tools/call" => json_response(
                    StatusCode::BAD_REQUEST,
                    &rpc_error(
                        &id,
                        code::INVALID_REQUEST,
                        "no Mcp-Session-Id: send initialize first, then its session id with \
                         every request",
                    ),
                ),
                // E.g. 2026-07-28's `server/discover`: unknown here, so clients fall back to
                // `initialize`.
                other => json_response(
                    StatusCode::OK,
                    &rpc_error(
                        &id,
                        code::METHOD_NOT_FOUND,
                        format!("method not found: {other} (send initialize first)"),
                    ),
                ),
            },
            _ => empty(StatusCode::ACCEPTED),
        };
    };
    let Some(session) = app.mcp.get(user, session_id) else {
        let id = match &message {
            Message::Request { id, .. } => id.clone(),
            _ => Value::Null,
        };
        return json_response(
            StatusCode::NOT_FOUND,
            &rpc_error(
                &id,
                code::NO_SESSION,
                "no such session (it ended, expired or belongs to another token): initialize a \
                 new one",
            ),
        );
    };
    if let Some(v) = header_str(&headers, VERSION_HEADER)
        && !VERSIONS.contains(&v)
    {
        return refuse(
            StatusCode::BAD_REQUEST,
            code::INVALID_REQUEST,
            format!(
                "unsupported MCP-Protocol-Version {v:?}; this server speaks {}",
                VERSIONS.join(", ")
            ),
        );
    }
    session.touch();
    match message {
        Message::Request { id, method, params } => {
            let reply = request(app, &session, &id, &method, params).await;
            session.touch();
            json_response(StatusCode::OK, &reply)
        }
        Message::Notification { method, params } => {
            if method == "notifications/cancelled"
                && let Some(target) = params.as_ref().and_then(|p| p.get("requestId"))
            {
                let cancel = session
                    .in_flight
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .remove(&target.to_string());
                if let Some(cancel) = cancel {
                    let _ = cancel.send(());
                }
            }
            empty(StatusCode::ACCEPTED)
        }
        Message::Response => empty(StatusCode::ACCEPTED),
    }
}

async fn initialize(
    app: &Arc<App>,
    user: &str,
    id: &Value,
    params: Option<&Value>,
) -> Response<Body> {
    let Some(asked) = params
        .and_then(|p| p.get("protocolVersion"))
        .and_then(Value::as_str)
    else {
        return json_response(
            StatusCode::OK,
            &rpc_error(
                id,
                code::INVALID_PARAMS,
                "initialize needs params.protocolVersion",
            ),
        );
    };
    // The client's revision if served, else the newest (the client decides whether it can
    // speak it).
    let version = VERSIONS
        .iter()
        .find(|v| **v == asked)
        .unwrap_or(&VERSIONS[0]);
    let (session, ended) = app.mcp.create(user, version);
    if !ended.is_empty() {
        let app = app.clone();
        tokio::spawn(async move { end(&app, ended).await });
    }
    tracing::info!(owner = user, version, "MCP session started");
    let result = json!({
        "protocolVersion": version,
        "capabilities": {"tools": {"listChanged": false}},
        "serverInfo": {
            "name": "sandgate",
            "title": "Sandgate",
            "version": env!("CARGO_PKG_VERSION"),
        },
        "instructions": "Sandgate runs Python in sandboxes (CPython in WebAssembly: no network, \
            memory and time limits). run_code keeps one sandbox per session, so state carries \
            over between calls; figures come back as images. /workspace is the user's encrypted \
            workspace: read_file, write_file and list_files reach it, and files there outlive \
            sandboxes and sessions.",
    });
    let mut r = json_response(
        StatusCode::OK,
        &json!({"jsonrpc": "2.0", "id": id, "result": result}),
    );
    if let Ok(v) = HeaderValue::from_str(&session.id) {
        r.headers_mut().insert(SESSION_HEADER, v);
    }
    r
}

/// Answers one request of a session.
async fn request(
    app: &Arc<App>,
    session: &Arc<Session>,
    id: &Value,
    method: &str,
    params: Option<Value>,
) -> Value {
    let ok = |result: Value| json!({"jsonrpc": "2.0", "id": id, "result": result});
    match method {
        "ping" => ok(json!({})),
        "tools/list" => ok(json!({"tools": tools::definitions()})),
        "tools/call" => {
            let params = params.unwrap_or(Value::Null);
            let Some(name) = params.get("name").and_then(Value::as_str) else {
                return rpc_error(
                    id,
                    code::INVALID_PARAMS,
                    "tools/call needs params.name, the tool's name",
                );
            };
            let args = match params.get("arguments") {
                None | Some(Value::Null) => Map::new(),
                Some(Value::Object(a)) => a.clone(),
                Some(other) => {
                    return rpc_error(
                        id,
                        code::INVALID_PARAMS,
                        format!("params.arguments must be an object, not {}", kind_of(other)),
                    );
                }
            };
            let key = id.to_string();
            let (cancel, cancelled) = tokio::sync::oneshot::channel();
            session
                .in_flight
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(key.clone(), cancel);
            // Forgets the call however it ends, also when the client goes away and hyper drops
            // this future (the session would otherwise count as busy and never expire).
            let _in_flight = InFlight { session, key: &key };
            // Dropping the call (on cancel, or when the client goes away and hyper drops
            // this future) interrupts code it is running.
            let outcome = tokio::select! {
                r = tools::call(app, session, name, &args) => Some(r),
                _ = cancelled => None,
            };
            match outcome {
                Some(Ok(result)) => ok(result),
                Some(Err(e)) => rpc_error(id, code::INVALID_PARAMS, e.to_string()),
                None => rpc_error(id, code::CANCELLED, "the request was cancelled"),
            }
        }
        // Capabilities this server does not declare.
        "resources/list"
        | "resources/templates/list"
        | "prompts/list"
        | "logging/setLevel"
        | "completion/complete" => rpc_error(
            id,
            code::METHOD_NOT_FOUND,
            format!("method not found: {method} (this server offers tools only)"),
        ),
        other => rpc_error(
            id,
            code::METHOD_NOT_FOUND,
            format!("method not found: {other}"),
        ),
    }
}

/// Whether a path is the MCP endpoint.
pub fn is_mcp(path: &str) -> bool {
    path == PATH || path == "/mcp/"
}

/// A `tools/call` in flight: removed from its session's table when dropped.
struct InFlight<'a> {
    session: &'a Session,
    key: &'a str,
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.session
            .in_flight
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(self.key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kind(body: &str) -> Result<&'static str, i64> {
        match parse(body.as_bytes()) {
            Ok(Message::Request { .. }) => Ok("request"),
            Ok(Message::Notification { .. }) => Ok("notification"),
            Ok(Message::Response) => Ok("response"),
            Err(r) => Err(r.code),
        }
    }

    #[test]
    fn messages_are_classified_and_malformed_ones_refused() {
        assert_eq!(
            kind(r#"{"jsonrpc":"2.0","id":1,"method":"ping"}"#),
            Ok("request")
        );
        assert_eq!(
            kind(r#"{"jsonrpc":"2.0","id":"a","method":"x","params":{}}"#),
            Ok("request")
        );
        assert_eq!(
            kind(r#"{"jsonrpc":"2.0","method":"notifications/initialized"}"#),
            Ok("notification")
        );
        assert_eq!(
            kind(r#"{"jsonrpc":"2.0","id":3,"result":{}}"#),
            Ok("response")
        );
        for bad in [
            "{",
            "",
            "[]",
            "[{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"ping\"}]",
            "42",
            r#"{"id":1,"method":"ping"}"#,
            r#"{"jsonrpc":"1.0","id":1,"method":"ping"}"#,
            r#"{"jsonrpc":"2.0","id":null,"method":"ping"}"#,
            r#"{"jsonrpc":"2.0","id":1.5,"method":"ping"}"#,
            r#"{"jsonrpc":"2.0","id":{},"method":"ping"}"#,
            r#"{"jsonrpc":"2.0","id":1,"method":7}"#,
            r#"{"jsonrpc":"2.0","id":1,"method":"x","params":"s"}"#,
            r#"{"jsonrpc":"2.0","id":1}"#,
        ] {
            assert!(kind(bad).is_err(), "{bad}");
        }
        assert_eq!(kind("{"), Err(code::PARSE));
        assert_eq!(kind("[]"), Err(code::INVALID_REQUEST));
    }

    #[test]
    fn accept_must_allow_json() {
        let mut h = HeaderMap::new();
        assert!(accepts_json(&h));
        h.insert(
            header::ACCEPT,
            HeaderValue::from_static("application/json, text/event-stream"),
        );
        assert!(accepts_json(&h));
        h.insert(header::ACCEPT, HeaderValue::from_static("*/*"));
        assert!(accepts_json(&h));
        h.insert(
            header::ACCEPT,
            HeaderValue::from_static("text/event-stream"),
        );
        assert!(!accepts_json(&h));
    }

    #[test]
    fn sessions_belong_to_their_owner_and_are_bounded() {
        let sessions = Sessions::default();
        let (a, ended) = sessions.create("alice", VERSIONS[0]);
        assert!(ended.is_empty());
        assert!(sessions.get("alice", &a.id).is_some());
        assert!(sessions.get("bob", &a.id).is_none());
        let mut last = a.clone();
        let mut all_ended = Vec::new();
        for _ in 0..MAX_SESSIONS_PER_USER {
            let (s, ended) = sessions.create("alice", VERSIONS[0]);
            all_ended.extend(ended);
            last = s;
        }
        assert_eq!(all_ended.len(), 1);
        assert_eq!(all_ended[0].id, a.id, "the least recently used ends first");
        assert!(sessions.get("alice", &last.id).is_some());
        let (b, ended) = sessions.create("bob", VERSIONS[0]);
        assert!(ended.is_empty(), "another user's count is separate");
        assert_eq!(sessions.get("bob", &b.id).unwrap().owner, "bob");
    }
}
