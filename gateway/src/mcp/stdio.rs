//! `sandgate mcp`: MCP over stdio (newline-delimited JSON-RPC on stdin and stdout), for
//! clients that start a local process (Claude Desktop, Claude Code's stdio servers), proxied to
//! a running gateway's `/mcp`, so the sandboxes and sessions live in the gateway.
//!
//! Each line from stdin is POSTed as it is; each JSON-RPC message of the answer (a JSON body or
//! the events of an SSE stream) is written to stdout as one line. The proxy keeps the
//! `Mcp-Session-Id` the gateway gave at `initialize` and the agreed protocol version, sends
//! both on every later message, and ends the session (`DELETE`) when stdin closes. Requests
//! run concurrently, so a `notifications/cancelled` or a `ping` reaches the gateway while a
//! long `run_code` is still running. A request the gateway cannot answer (it is down, the
//! token is refused and the body is not JSON-RPC) still gets a JSON-RPC error with its id.
//! When the gateway no longer has the session (it restarted, or the session expired), the proxy
//! starts a new one with the client's own `initialize` and answers the call that found it lost
//! with an error saying the sandbox state is gone and to run the call again.
//! Nothing but protocol goes to stdout; diagnostics go to stderr.

use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::{HeaderValue, Method, Request, StatusCode, Uri, header};
use http_body_util::{BodyExt, Full, Limited};
use serde_json::{Value, json};
use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;

use super::{SESSION_HEADER, VERSION_HEADER};

/// The longest line read from stdin.
pub const MAX_LINE: usize = 64 << 20;
/// The largest answer read from the gateway.
const MAX_ANSWER: usize = 256 << 20;
/// JSON-RPC's code for an error of this proxy (the gateway could not be asked or answered with
/// something that is not JSON-RPC).
const PROXY_ERROR: i64 = -32603;

/// Why the proxy could not start or stopped.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// The URL is not an `http` or `https` URL.
    #[error("--url {0:?} is not an http:// or https:// URL")]
    Url(String),
    /// Reading stdin or writing stdout failed.
    #[error("stdio: {0}")]
    Io(#[from] std::io::Error),
}

/// The endpoint: `url` as given, `/mcp` added when it names only the gateway.
pub fn endpoint(url: &str) -> Result<Uri, ProxyError> {
    let uri: Uri = url.parse().map_err(|_| ProxyError::Url(url.to_owned()))?;
    if !matches!(uri.scheme_str(), Some("http" | "https")) || uri.host().is_none() {
        return Err(ProxyError::Url(url.to_owned()));
    }
    if matches!(uri.path(), "" | "/") {
        let mut parts = uri.into_parts();
        parts.path_and_query = Some(http::uri::PathAndQuery::from_static(super::PATH));
        return Uri::from_parts(parts).map_err(|_| ProxyError::Url(url.to_owned()));
    }
    Ok(uri)
}

/// What later messages carry.
#[derive(Default)]
struct State {
    session: Option<String>,
    version: Option<String>,
}

struct Proxy {
    url: Uri,
    token: Option<String>,
    client: crate::ask::provider::HttpsClient,
    state: Mutex<State>,
    /// The client's `initialize`, replayed when the gateway lost the session.
    init: Mutex<Option<String>>,
    /// Held while a new session replaces a lost one.
    renewing: tokio::sync::Mutex<()>,
    out: mpsc::UnboundedSender<String>,
}

/// What one line is, as far as the proxy cares.
struct Line {
    text: String,
    /// The id, when it is a request.
    request_id: Option<Value>,
    is_initialize: bool,
}

fn classify(text: String) -> Line {
    let v: Option<Value> = serde_json::from_str(&text).ok();
    let method = v
        .as_ref()
        .and_then(|v| v.get("method"))
        .and_then(Value::as_str);
    let request_id = v
        .as_ref()
        .filter(|_| method.is_some())
        .and_then(|v| v.get("id"))
        .filter(|id| !id.is_null())
        .cloned();
    Line {
        is_initialize: method == Some("initialize") && request_id.is_some(),
        request_id,
        text,
    }
}

/// The gateway's answer to one POST.
struct Answer {
    status: StatusCode,
    /// Its `Mcp-Session-Id`.
    session: Option<String>,
    /// The JSON-RPC messages in it.
    messages: Vec<Value>,
    /// The start of the body, for errors.
    head: String,
}

impl Proxy {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn request(
        &self,
        method: Method,
        body: Option<String>,
        session: Option<&str>,
    ) -> Request<Full<Bytes>> {
        let mut b = Request::builder().method(method).uri(self.url.clone());
        let h = b.headers_mut().expect("a valid builder");
        h.insert(
            header::ACCEPT,
            HeaderValue::from_static("application/json, text/event-stream"),
        );
        if body.is_some() {
            h.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
        }
        if let Some(t) = &self.token
            && let Ok(v) = HeaderValue::from_str(&format!("Bearer {t}"))
        {
            h.insert(header::AUTHORIZATION, v);
        }
        if let Some(s) = session.and_then(|s| HeaderValue::from_str(s).ok()) {
            h.insert(SESSION_HEADER, s);
        }
        if session.is_some()
            && let Some(v) = self
                .lock()
                .version
                .as_deref()
                .and_then(|v| HeaderValue::from_str(v).ok())
        {
            h.insert(VERSION_HEADER, v);
        }
        b.body(Full::new(Bytes::from(body.unwrap_or_default())))
            .expect("a valid request")
    }

    fn emit(&self, message: &Value) {
        // One message per line: serde_json writes no raw newlines.
        let _ = self.out.send(message.to_string());
    }

    fn fail(&self, line: &Line, message: String) {
        tracing::warn!("{message}");
        if let Some(id) = &line.request_id {
            self.emit(&json!({"jsonrpc": "2.0", "id": id, "error": {"code": PROXY_ERROR, "message": message}}));
        }
    }

    /// POSTs one message.
    async fn post(&self, text: String, session: Option<&str>) -> Result<Answer, String> {
        let request = self.request(Method::POST, Some(text), session);
        let response = self
            .client
            .request(request)
            .await
            .map_err(|e| format!("cannot reach the Sandgate gateway at {}: {e}", self.url))?;
        let status = response.status();
        let session = response
            .headers()
            .get(SESSION_HEADER)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let sse = response
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|c| c.starts_with("text/event-stream"));
        let body = Limited::new(response.into_body(), MAX_ANSWER)
            .collect()
            .await
            .map_err(|e| format!("the gateway's answer could not be read: {e}"))?
            .to_bytes();
        let parsed: Vec<Value> = if sse {
            sse_data(&body)
                .iter()
                .filter_map(|d| serde_json::from_str(d).ok())
                .collect()
        } else {
            serde_json::from_slice::<Value>(&body)
                .ok()
                .into_iter()
                .collect()
        };
        Ok(Answer {
            status,
            session,
            messages: parsed
                .into_iter()
                .filter(|m| m.get("jsonrpc").is_some())
                .collect(),
            head: String::from_utf8_lossy(&body[..body.len().min(300)]).into_owned(),
        })
    }

    /// Sends one line and writes what comes back.
    async fn forward(&self, line: Line) {
        let sent_with = if line.is_initialize {
            *self.init.lock().unwrap_or_else(|e| e.into_inner()) = Some(line.text.clone());
            None
        } else {
            self.lock().session.clone()
        };
        let answer = match self.post(line.text.clone(), sent_with.as_deref()).await {
            Ok(a) => a,
            Err(message) => return self.fail(&line, message),
        };
        let status = answer.status;
        if status == StatusCode::ACCEPTED {
            return;
        }
        if status == StatusCode::NOT_FOUND
            && let Some(stale) = &sent_with
        {
            // The gateway lost the session (it restarted, or the session expired or was
            // displaced by newer ones): start a new one, and tell the client its call did
            // not run.
            let renewed = self.renew(stale).await;
            return self.fail(
                &line,
                format!(
                    "the gateway no longer had this MCP session (it restarted, or the session \
                     was idle too long), so its sandbox and variables are gone; {}",
                    if renewed {
                        "a new session was started: run the call again"
                    } else {
                        "a new session could not be started (see the proxy's messages)"
                    }
                ),
            );
        }
        if answer.messages.is_empty() {
            return self.fail(
                &line,
                format!(
                    "the gateway answered HTTP {status} without a JSON-RPC message: {}",
                    answer.head
                ),
            );
        }
        if line.is_initialize && status.is_success() {
            let mut state = self.lock();
            state.session = answer.session;
            state.version = answer
                .messages
                .iter()
                .find_map(|m| m["result"]["protocolVersion"].as_str())
                .map(str::to_owned);
        }
        for mut m in answer.messages {
            // A transport-level refusal has no id; give it the request's, so the client can
            // match it.
            if m.get("error").is_some()
                && m["id"].is_null()
                && let Some(id) = &line.request_id
            {
                m["id"] = id.clone();
            }
            self.emit(&m);
        }
    }

    /// Replaces the lost session `stale` with a new one, made with the client's own
    /// `initialize` (once, however many calls found it lost). Whether there is a session now.
    async fn renew(&self, stale: &str) -> bool {
        let _one_at_a_time = self.renewing.lock().await;
        {
            let state = self.lock();
            if state.session.as_deref() != Some(stale) {
                return state.session.is_some();
            }
        }
        let Some(init) = self.init.lock().unwrap_or_else(|e| e.into_inner()).clone() else {
            return false;
        };
        let made = match self.post(init, None).await {
            Ok(a) if a.status.is_success() && a.session.is_some() => a,
            Ok(a) => {
                tracing::warn!(status = %a.status, answer = a.head, "a new MCP session was refused");
                self.lock().session = None;
                return false;
            }
            Err(e) => {
                tracing::warn!("a new MCP session could not be made: {e}");
                self.lock().session = None;
                return false;
            }
        };
        let session = made.session.clone();
        self.lock().session = session.clone();
        let initialized = json!({"jsonrpc": "2.0", "method": "notifications/initialized"});
        if let Err(e) = self.post(initialized.to_string(), session.as_deref()).await {
            tracing::warn!("the new MCP session was not confirmed: {e}");
        }
        tracing::warn!("the gateway had lost the MCP session; a new one was started");
        true
    }

    /// Ends the session at the gateway.
    async fn close(&self) {
        let Some(session) = self.lock().session.clone() else {
            return;
        };
        let request = self.request(Method::DELETE, None, Some(&session));
        match self.client.request(request).await {
            Ok(r) if r.status().is_success() || r.status() == StatusCode::NOT_FOUND => {}
            Ok(r) => {
                tracing::warn!(status = %r.status(), "the gateway did not end the MCP session")
            }
            Err(e) => tracing::warn!(error = %e, "the MCP session could not be ended"),
        }
    }
}

/// The `data` of each event of an SSE stream.
fn sse_data(body: &[u8]) -> Vec<String> {
    let text = String::from_utf8_lossy(body);
    let mut events = Vec::new();
    let mut data: Vec<&str> = Vec::new();
    for line in text.split('\n') {
        let line = line.strip_suffix('\r').unwrap_or(line);
        if line.is_empty() {
            if !data.is_empty() {
                events.push(data.join("\n"));
                data.clear();
            }
        } else if let Some(d) = line.strip_prefix("data:") {
            data.push(d.strip_prefix(' ').unwrap_or(d));
        }
    }
    if !data.is_empty() {
        events.push(data.join("\n"));
    }
    events
}

/// Reads one line of at most [`MAX_LINE`] bytes; `Ok(None)` at the end. A longer line is read
/// to its end and returned as `Err(length)`.
async fn read_line<R: AsyncBufRead + Unpin>(
    input: &mut R,
) -> Result<Option<Result<String, usize>>, std::io::Error> {
    let mut line = Vec::new();
    let mut dropped = 0usize;
    loop {
        let buf = input.fill_buf().await?;
        if buf.is_empty() {
            if line.is_empty() && dropped == 0 {
                return Ok(None);
            }
            break;
        }
        let (chunk, done) = match buf.iter().position(|b| *b == b'\n') {
            Some(i) => (&buf[..i], Some(i + 1)),
            None => (buf, None),
        };
        if dropped > 0 || line.len() + chunk.len() > MAX_LINE {
            dropped += line.len() + chunk.len();
            line.clear();
        } else {
            line.extend_from_slice(chunk);
        }
        let used = done.unwrap_or(buf.len());
        input.consume(used);
        if done.is_some() {
            break;
        }
    }
    if dropped > 0 {
        return Ok(Some(Err(dropped)));
    }
    Ok(Some(Ok(String::from_utf8_lossy(&line).into_owned())))
}

/// Proxies `input` (JSON-RPC lines) to the MCP endpoint `url`, writing its answers to `output`,
/// until `input` ends.
pub async fn run<R, W>(
    url: Uri,
    token: Option<String>,
    mut input: R,
    mut output: W,
) -> Result<(), ProxyError>
where
    R: AsyncBufRead + Unpin,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let (out, mut lines) = mpsc::unbounded_channel::<String>();
    let writer = tokio::spawn(async move {
        while let Some(line) = lines.recv().await {
            output.write_all(line.as_bytes()).await?;
            output.write_all(b"\n").await?;
            output.flush().await?;
        }
        Ok::<_, std::io::Error>(())
    });
    let proxy = Arc::new(Proxy {
        url,
        token,
        client: crate::ask::provider::http_client(),
        state: Mutex::default(),
        init: Mutex::default(),
        renewing: tokio::sync::Mutex::new(()),
        out,
    });
    let mut tasks = tokio::task::JoinSet::new();
    while let Some(line) = read_line(&mut input).await? {
        while tasks.try_join_next().is_some() {}
        let text = match line {
            Ok(t) if t.trim().is_empty() => continue,
            Ok(t) => t,
            Err(n) => {
                tracing::warn!(
                    bytes = n,
                    "a line over the {MAX_LINE}-byte limit was dropped"
                );
                proxy.emit(&json!({"jsonrpc": "2.0", "id": null, "error": {"code": -32600,
                    "message": format!("a message of {n} bytes is over this proxy's {MAX_LINE}-byte limit")}}));
                continue;
            }
        };
        let line = classify(text);
        if line.is_initialize {
            // Later messages need the session it makes.
            proxy.forward(line).await;
        } else {
            let proxy = proxy.clone();
            tasks.spawn(async move { proxy.forward(line).await });
        }
    }
    while tasks.join_next().await.is_some() {}
    proxy.close().await;
    drop(proxy);
    match writer.await {
        Ok(r) => r?,
        Err(e) => return Err(ProxyError::Io(std::io::Error::other(e.to_string()))),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_get_the_mcp_path() {
        assert_eq!(
            endpoint("http://127.0.0.1:8888").unwrap().to_string(),
            "http://127.0.0.1:8888/mcp"
        );
        assert_eq!(
            endpoint("http://127.0.0.1:8888/").unwrap().to_string(),
            "http://127.0.0.1:8888/mcp"
        );
        assert_eq!(
            endpoint("https://h/x/mcp").unwrap().to_string(),
            "https://h/x/mcp"
        );
        assert!(endpoint("ftp://h/mcp").is_err());
        assert!(endpoint("not a url").is_err());
        assert!(endpoint("/mcp").is_err());
    }

    #[test]
    fn sse_events_are_split() {
        let body = b"event: message\r\ndata: {\"a\":1}\r\n\r\n: comment\n\ndata: x\ndata: y\n\n";
        assert_eq!(
            sse_data(body),
            vec!["{\"a\":1}".to_owned(), "x\ny".to_owned()]
        );
    }

    #[test]
    fn lines_are_classified() {
        let l = classify(r#"{"jsonrpc":"2.0","id":0,"method":"initialize","params":{}}"#.into());
        assert!(l.is_initialize && l.request_id == Some(json!(0)));
        let l = classify(r#"{"jsonrpc":"2.0","method":"notifications/initialized"}"#.into());
        assert!(!l.is_initialize && l.request_id.is_none());
        let l = classify("{oops".into());
        assert!(l.request_id.is_none());
    }

    #[tokio::test]
    async fn long_lines_are_dropped_whole() {
        let mut data = vec![b'a'; MAX_LINE + 10];
        data.extend_from_slice(b"\nok\nlast");
        let mut input = tokio::io::BufReader::new(&data[..]);
        assert_eq!(
            read_line(&mut input).await.unwrap(),
            Some(Err(MAX_LINE + 10))
        );
        assert_eq!(read_line(&mut input).await.unwrap(), Some(Ok("ok".into())));
        assert_eq!(
            read_line(&mut input).await.unwrap(),
            Some(Ok("last".into()))
        );
        assert_eq!(read_line(&mut input).await.unwrap(), None);
    }
}
