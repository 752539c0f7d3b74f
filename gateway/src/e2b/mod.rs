//! An E2B-compatible API, so agents written against E2B's SDK (`e2b`, `e2b-code-interpreter`)
//! run against Sandgate with `E2B_API_URL` and `E2B_SANDBOX_URL` pointing at the gateway.
//!
//! One listener serves both planes (see `../shared/E2B-PROTOCOL.md` for the wire protocol):
//! - the control plane (`/v2/sandboxes`, `/sandboxes/...`), authenticated by `X-API-Key` (a
//!   Sandgate user's token): create, list, get, kill, set the timeout, connect;
//! - the data plane of each sandbox, named by the `E2b-Sandbox-Id` header and authenticated by
//!   the sandbox's own tokens: the code interpreter ([`interpreter`]: `/execute`, `/contexts`,
//!   `E2B-Traffic-Access-Token`) and envd (`/files`, `/health` and the Connect RPCs,
//!   `X-Access-Token`).
//!
//! - [`sandboxes`]: the registry: ids, tokens, contexts, deadlines.
//! - [`interpreter`]: `/execute` as NDJSON while the code runs, and contexts.
//! - [`envd`]: a sandbox's files (`/files`, the `filesystem` RPCs) and the `process` RPCs.

pub mod envd;
pub mod interpreter;
pub mod sandboxes;

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::{Frame, Incoming};
use serde::Deserialize;
use serde_json::{Map, Value, json};
use tokio::sync::mpsc;

use crate::http::{App, Body};
use crate::session::SessionError;
use sandboxes::{NewSandbox, SandboxError};

/// The header that names the sandbox of a data-plane request.
const SANDBOX_ID: &str = "e2b-sandbox-id";
/// The header that says which of its services (envd 49983, code interpreter 49999).
const SANDBOX_PORT: &str = "e2b-sandbox-port";
/// envd's token header.
const ACCESS_TOKEN: &str = "x-access-token";
/// The code interpreter's token header.
const TRAFFIC_TOKEN: &str = "e2b-traffic-access-token";
/// The code interpreter's port.
const INTERPRETER_PORT: &str = "49999";
/// NDJSON lines buffered before a slow reader holds up the execution.
const LINES_BUFFER: usize = 256;
/// Largest page of `GET /v2/sandboxes`.
const MAX_PAGE: usize = 1000;

/// An E2B API error: `{"code": status, "message": …}`, whose message the SDK shows.
#[derive(Debug, thiserror::Error)]
pub enum E2bError {
    /// 400.
    #[error("{0}")]
    BadRequest(String),
    /// 401.
    #[error("{0}")]
    Unauthorized(String),
    /// 404.
    #[error("{0}")]
    NotFound(String),
    /// 501: a part of E2B's API Sandgate does not have.
    #[error("{0}")]
    NotImplemented(String),
    /// 503.
    #[error("{0}")]
    Unavailable(String),
    /// From the kernel layer.
    #[error(transparent)]
    Session(#[from] SessionError),
    /// From the sandbox registry.
    #[error(transparent)]
    Sandbox(#[from] SandboxError),
    /// The HTTP layer's own errors (body size, slow body).
    #[error(transparent)]
    Api(#[from] crate::http::ApiError),
}

impl E2bError {
    fn status(&self) -> StatusCode {
        match self {
            E2bError::BadRequest(_) => StatusCode::BAD_REQUEST,
            E2bError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            E2bError::NotFound(_) => StatusCode::NOT_FOUND,
            E2bError::NotImplemented(_) => StatusCode::NOT_IMPLEMENTED,
            E2bError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            E2bError::Sandbox(SandboxError::NotFound(_) | SandboxError::NoSuchContext(_)) => {
                StatusCode::NOT_FOUND
            }
            E2bError::Sandbox(SandboxError::NoSuchTemplate(_)) => StatusCode::BAD_REQUEST,
            E2bError::Sandbox(SandboxError::Session(e)) | E2bError::Session(e) => match e {
                SessionError::NotFound(_) => StatusCode::NOT_FOUND,
                SessionError::NoSuchKernelSpec(_) => StatusCode::BAD_REQUEST,
                SessionError::Limit { .. } => StatusCode::TOO_MANY_REQUESTS,
                SessionError::ShuttingDown => StatusCode::SERVICE_UNAVAILABLE,
                SessionError::Start(_) => StatusCode::INTERNAL_SERVER_ERROR,
            },
            E2bError::Api(e) => e.status(),
        }
    }

    /// The response.
    pub fn response(&self) -> Response<Body> {
        let status = self.status();
        let message = match self {
            E2bError::Sandbox(SandboxError::Session(SessionError::Start(e)))
            | E2bError::Session(SessionError::Start(e)) => {
                tracing::error!(error = %e, "a sandbox's kernel could not be started");
                "the sandbox could not be started; the gateway's log has the details".to_owned()
            }
            other => other.to_string(),
        };
        let mut response = json(
            status,
            &json!({"code": status.as_u16(), "message": message}),
        );
        if matches!(self, E2bError::Unauthorized(_)) {
            // Refused before its body was read: the connection cannot carry another request.
            response
                .headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        response
    }
}

fn json(status: StatusCode, body: &Value) -> Response<Body> {
    crate::http::json_response(status, body).map(|b| b.boxed_unsync())
}

fn empty(status: StatusCode) -> Response<Body> {
    let mut r = Response::new(http_body_util::Empty::new().boxed_unsync());
    *r.status_mut() = status;
    r
}

/// The writing end of an NDJSON response: one JSON value per line.
pub struct Lines(mpsc::Sender<Bytes>);

impl Lines {
    /// Sends one line; fails once the client is gone.
    pub async fn send(&self, value: Value) -> Result<(), ()> {
        let mut line = serde_json::to_vec(&value).map_err(|_| ())?;
        line.push(b'\n');
        self.0.send(Bytes::from(line)).await.map_err(|_| ())
    }

    /// Resolves when the client is gone.
    pub async fn closed(&self) {
        self.0.closed().await
    }
}

/// A streaming NDJSON response and the [`Lines`] that write it.
fn ndjson() -> (Lines, Response<Body>) {
    let (tx, rx) = mpsc::channel::<Bytes>(LINES_BUFFER);
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv()
            .await
            .map(|b| (Ok::<_, Infallible>(Frame::data(b)), rx))
    });
    let mut response = Response::new(StreamBody::new(stream).boxed_unsync());
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/x-ndjson"),
    );
    (Lines(tx), response)
}

/// The E2B routes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// `POST /v2/sandboxes`, `POST /sandboxes`.
    Create,
    /// `GET /v2/sandboxes`, `GET /sandboxes`.
    List,
    /// `GET` / `DELETE /sandboxes/{id}`.
    Sandbox(String),
    /// `POST /sandboxes/{id}/timeout`.
    Timeout(String),
    /// `POST /v2/sandboxes/{id}/connect`, `POST /sandboxes/{id}/connect`.
    Connect(String),
    /// `POST /sandboxes/{id}/pause` and `/resume`.
    Pause(String),
    /// Any other control-plane path under `/sandboxes`.
    OtherControl,
    /// `GET /health` of a sandbox.
    Health,
    /// `GET /health` of a sandbox's code interpreter (`E2b-Sandbox-Port: 49999`).
    InterpreterHealth,
    /// `POST /execute`.
    Execute,
    /// `GET` / `POST /contexts`.
    Contexts,
    /// `DELETE /contexts/{id}`.
    Context(String),
    /// `POST /contexts/{id}/restart`.
    RestartContext(String),
    /// envd: `/files` and the Connect RPCs (`/filesystem.Filesystem/…`, `/process.Process/…`).
    Envd,
}

/// Whether `path` is one of the E2B API's; `None` leaves it to the Jupyter API.
pub fn route(path: &str, headers: &HeaderMap) -> Option<Route> {
    let parts: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let control = match parts.as_slice() {
        ["v2", "sandboxes"] | ["sandboxes"] => Some(Route::Create),
        ["sandboxes", id] => Some(Route::Sandbox((*id).to_owned())),
        ["sandboxes", id, "timeout"] => Some(Route::Timeout((*id).to_owned())),
        ["v2", "sandboxes", id, "connect"] | ["sandboxes", id, "connect"] => {
            Some(Route::Connect((*id).to_owned()))
        }
        ["sandboxes", id, "pause" | "resume"] | ["v2", "sandboxes", id, "resume"] => {
            Some(Route::Pause((*id).to_owned()))
        }
        ["sandboxes", ..] | ["v2", "sandboxes", ..] => Some(Route::OtherControl),
        _ => None,
    };
    if control.is_some() {
        return control;
    }
    let data = match parts.as_slice() {
        ["execute"] => Route::Execute,
        ["contexts"] => Route::Contexts,
        ["contexts", id] => Route::Context((*id).to_owned()),
        ["contexts", id, "restart"] => Route::RestartContext((*id).to_owned()),
        ["files"] => Route::Envd,
        [rpc, _] if rpc.starts_with("filesystem.") || rpc.starts_with("process.") => Route::Envd,
        ["health"] if headers.contains_key(SANDBOX_ID) => Route::Health,
        _ => return None,
    };
    Some(data)
}

/// `POST /v2/sandboxes`.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct CreateBody {
    #[serde(rename = "templateID", default)]
    template_id: Option<String>,
    #[serde(default)]
    timeout: Option<u64>,
    #[serde(default)]
    metadata: Option<Map<String, Value>>,
    #[serde(default)]
    env_vars: Option<Map<String, Value>>,
    #[serde(default)]
    auto_pause: Option<bool>,
    #[serde(default)]
    volume_mounts: Option<Vec<Value>>,
    #[serde(default)]
    mcp: Option<Value>,
    #[serde(default, rename = "allow_internet_access")]
    allow_internet_access: Option<bool>,
    #[serde(default)]
    network: Option<Value>,
}

#[derive(Debug, Default, Deserialize)]
struct TimeoutBody {
    #[serde(default)]
    timeout: Option<u64>,
}

/// Serves an E2B request (the `Host` rule has passed).
pub async fn handle(app: &Arc<App>, route: Route, req: Request<Incoming>) -> Response<Body> {
    let result = match route {
        Route::Create
        | Route::List
        | Route::Sandbox(_)
        | Route::Timeout(_)
        | Route::Connect(_)
        | Route::Pause(_)
        | Route::OtherControl => control(app, route, req).await,
        _ => data(app, route, req).await,
    };
    result.unwrap_or_else(|e| e.response())
}

/// Serves a request on E2B's debug ports: the data plane of the one implicit sandbox
/// ([`sandboxes::DEBUG_ID`], the main token's user's), with no tokens, as E2B's SDKs expect
/// with `E2B_DEBUG=true`. The listener is on loopback only.
pub async fn handle_debug(app: &Arc<App>, req: Request<Incoming>) -> Response<Body> {
    let result = async {
        // No token guards these ports, so a web page must not reach them: browsers name the
        // page's origin on every cross-site request (a `no-cors` POST included); the SDKs send
        // none.
        if req.headers().contains_key(header::ORIGIN) {
            return Err(E2bError::Unauthorized(
                "the E2B debug ports refuse requests from web pages (an Origin header)".into(),
            ));
        }
        let route = route(req.uri().path(), req.headers())
            .or_else(|| (req.uri().path() == "/health").then_some(Route::Health));
        let route = match route {
            Some(
                r @ (Route::Health
                | Route::Execute
                | Route::Contexts
                | Route::Context(_)
                | Route::RestartContext(_)
                | Route::Envd),
            ) => r,
            _ => {
                return Err(E2bError::NotFound(format!(
                    "the E2B debug ports serve one sandbox's data plane; {} is not part of it",
                    req.uri().path()
                )));
            }
        };
        let sandbox = app.e2b.debug_sandbox().await?;
        data_for(app, sandbox, route, req).await
    }
    .await;
    result.unwrap_or_else(|e| e.response())
}

async fn body_json<T: for<'de> Deserialize<'de>>(
    app: &App,
    req: Request<Incoming>,
) -> Result<T, E2bError> {
    let bytes = crate::http::read_body(
        req.into_body(),
        app.config.http.max_body_bytes,
        Duration::from_secs(app.config.http.body_timeout_s),
    )
    .await?;
    // An object, not any JSON serde could map onto the struct (it takes arrays as structs).
    let value: Value = crate::http::parse_json(&bytes)?;
    if !value.is_object() {
        return Err(E2bError::BadRequest(
            "invalid JSON body: expected an object".into(),
        ));
    }
    serde_json::from_value(value)
        .map_err(|e| E2bError::BadRequest(format!("invalid JSON body: {e}")))
}

async fn control(
    app: &Arc<App>,
    route: Route,
    req: Request<Incoming>,
) -> Result<Response<Body>, E2bError> {
    let user = match app.auth.check(req.headers(), None, false) {
        Ok(user) => user,
        Err(e) => {
            return Err(E2bError::Unauthorized(format!(
                "{e}: give the Sandgate access token as the API key (E2B_API_KEY)"
            )));
        }
    };
    crate::http::unlock_workspace(app, req.headers(), None, false, &user).await;
    let sandboxes = &app.e2b;
    let limits = &app.config.sandbox;
    let (memory_mb, disk_mb) = (limits.memory_mb, limits.disk_mb);
    let method = req.method().clone();
    match route {
        Route::Create if method == Method::POST => {
            let body: CreateBody = body_json(app, req).await?;
            if body.auto_pause == Some(true) {
                return Err(E2bError::NotImplemented(
                    "autoPause is not supported: Sandgate cannot pause a sandbox; it ends at its \
                     timeout (extend it with set_timeout)"
                        .into(),
                ));
            }
            if body.volume_mounts.as_ref().is_some_and(|v| !v.is_empty()) {
                return Err(E2bError::NotImplemented(
                    "volumeMounts are not supported: every Sandgate sandbox has the user's \
                     encrypted workspace at /workspace"
                        .into(),
                ));
            }
            if body.allow_internet_access == Some(true)
                || body.network.as_ref().is_some_and(|n| !n.is_null())
            {
                return Err(E2bError::NotImplemented(
                    "a Sandgate sandbox has no network at all: allow_internet_access=True and \
                     network rules are not supported (create the sandbox without them; code \
                     that opens a socket gets an error)"
                        .into(),
                ));
            }
            if body.mcp.as_ref().is_some_and(|m| !m.is_null()) {
                return Err(E2bError::NotImplemented(
                    "MCP servers inside a sandbox are not supported".into(),
                ));
            }
            let env_vars = body.env_vars.unwrap_or_default();
            if let Some((k, _)) = env_vars.iter().find(|(_, v)| !v.is_string()) {
                return Err(E2bError::BadRequest(format!(
                    "envVars values must be strings ({k:?} is not)"
                )));
            }
            let sandbox = sandboxes
                .create(
                    &user,
                    NewSandbox {
                        template: body
                            .template_id
                            .unwrap_or_else(|| "code-interpreter-v1".into()),
                        timeout_s: body.timeout.unwrap_or(sandboxes::DEFAULT_TIMEOUT_S),
                        metadata: body.metadata.unwrap_or_default(),
                        env_vars,
                    },
                )
                .await?;
            // Its environment, and its working directory: the sandbox's home.
            if let Some(context) = sandbox.default_context()
                && let Err(e) = interpreter::set_up(&sandbox, &context).await
            {
                let _ = sandboxes.kill(&user, &sandbox.id).await;
                return Err(e);
            }
            Ok(json(StatusCode::CREATED, &sandbox.created()))
        }
        Route::Create if method == Method::GET => list(app, &user, req.uri().query()),
        Route::Create => Err(E2bError::BadRequest("use GET or POST here".into())),
        Route::List => list(app, &user, req.uri().query()),
        Route::Sandbox(id) if method == Method::DELETE => {
            sandboxes.kill(&user, &id).await?;
            Ok(empty(StatusCode::NO_CONTENT))
        }
        Route::Sandbox(id) if method == Method::GET => Ok(json(
            StatusCode::OK,
            &sandboxes.get(&user, &id)?.model(memory_mb, disk_mb),
        )),
        Route::Timeout(id) if method == Method::POST => {
            let sandbox = sandboxes.get(&user, &id)?;
            let body: TimeoutBody = body_json(app, req).await?;
            let timeout = body
                .timeout
                .ok_or_else(|| E2bError::BadRequest("timeout (seconds) is required".into()))?;
            sandboxes.set_timeout(&sandbox, timeout);
            Ok(empty(StatusCode::NO_CONTENT))
        }
        Route::Connect(id) if method == Method::POST => {
            let sandbox = sandboxes.get(&user, &id)?;
            let body: TimeoutBody = body_json(app, req).await?;
            if let Some(t) = body.timeout {
                let t = t.min(sandboxes::MAX_TIMEOUT_S);
                // As E2B: connecting never shortens a sandbox's life.
                let asked = chrono::Utc::now() + chrono::Duration::seconds(t as i64);
                if asked > sandbox.end_at() {
                    sandboxes.set_timeout(&sandbox, t);
                }
            }
            Ok(json(StatusCode::OK, &sandbox.created()))
        }
        Route::Pause(id) => {
            sandboxes.get(&user, &id)?;
            Err(E2bError::NotImplemented(
                "pause and resume are not supported: Sandgate cannot keep a sandbox's memory \
                 without its process. Extend its life with set_timeout, or keep state in files \
                 under /workspace (they survive into the next sandbox)"
                    .into(),
            ))
        }
        _ => Err(E2bError::NotImplemented(format!(
            "{method} {} is not part of Sandgate's E2B-compatible API",
            req.uri().path()
        ))),
    }
}

fn list(app: &App, user: &str, query: Option<&str>) -> Result<Response<Body>, E2bError> {
    let mut limit = 100usize;
    let mut after: Option<String> = None;
    let mut states: Option<Vec<String>> = None;
    let mut template: Option<String> = None;
    let mut metadata: Vec<(String, String)> = Vec::new();
    let mut descending = false;
    for (k, v) in crate::auth::form_pairs(query.unwrap_or_default()) {
        match k.as_str() {
            "limit" => {
                limit = v
                    .parse::<usize>()
                    .ok()
                    .filter(|n| (1..=MAX_PAGE).contains(n))
                    .ok_or_else(|| E2bError::BadRequest(format!("limit must be 1 to {MAX_PAGE}")))?
            }
            "nextToken" => after = Some(v),
            "state" => states = Some(v.split(',').map(str::to_owned).collect()),
            "template" => template = Some(v),
            "order" => descending = v == "desc",
            // `k=v&k2=v2`, each part percent-encoded once more.
            "metadata" => {
                metadata = crate::auth::form_pairs(&v)
                    .into_iter()
                    .map(|(k, v)| {
                        (
                            crate::auth::percent_decode(&k),
                            crate::auth::percent_decode(&v),
                        )
                    })
                    .collect()
            }
            _ => {}
        }
    }
    let mut all = app.e2b.list(user);
    if descending {
        all.reverse();
    }
    let matching: Vec<_> = all
        .into_iter()
        // Every Sandgate sandbox is running (none is ever paused).
        .filter(|_| {
            states
                .as_ref()
                .is_none_or(|st| st.iter().any(|x| x == "running"))
        })
        .filter(|s| template.as_ref().is_none_or(|t| &s.template == t))
        .filter(|s| {
            metadata
                .iter()
                .all(|(k, v)| s.metadata.get(k).and_then(Value::as_str) == Some(v.as_str()))
        })
        .collect();
    let start = match &after {
        Some(token) => matching
            .iter()
            .position(|s| &s.id == token)
            .map(|i| i + 1)
            .ok_or_else(|| E2bError::BadRequest("nextToken is not valid (expired?)".into()))?,
        None => 0,
    };
    let page: Vec<_> = matching.iter().skip(start).take(limit).collect();
    let limits = &app.config.sandbox;
    let body: Vec<Value> = page
        .iter()
        .map(|s| s.model(limits.memory_mb, limits.disk_mb))
        .collect();
    let mut response = json(StatusCode::OK, &Value::Array(body));
    if start + page.len() < matching.len()
        && let Some(last) = page.last()
        && let Ok(v) = HeaderValue::from_str(&last.id)
    {
        response.headers_mut().insert("x-next-token", v);
    }
    Ok(response)
}

/// Compares a presented token with the expected one in constant time.
fn token_matches(headers: &HeaderMap, name: &str, expected: &str) -> bool {
    let presented = headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    !presented.is_empty()
        && crate::auth::constant_time_eq(presented.as_bytes(), expected.as_bytes())
}

async fn data(
    app: &Arc<App>,
    route: Route,
    req: Request<Incoming>,
) -> Result<Response<Body>, E2bError> {
    let headers = req.headers();
    let Some(id) = headers.get(SANDBOX_ID).and_then(|v| v.to_str().ok()) else {
        return Err(E2bError::BadRequest(
            "this E2B data-plane request has no E2b-Sandbox-Id header".into(),
        ));
    };
    let Some(sandbox) = app.e2b.find(id) else {
        if route == Route::Health {
            // What E2B's proxy answers for a sandbox that is gone: `is_running()` is false.
            return Ok(json(
                StatusCode::BAD_GATEWAY,
                &json!({"code": 502, "message": format!("sandbox {id} is not running")}),
            ));
        }
        return Err(E2bError::NotFound(format!(
            "sandbox {id} not found (it was killed or timed out)"
        )));
    };
    let interpreter = headers
        .get(SANDBOX_PORT)
        .is_some_and(|p| p.as_bytes() == INTERPRETER_PORT.as_bytes());
    let route = match route {
        Route::Health if interpreter => Route::InterpreterHealth,
        other => other,
    };
    let authorised = match route {
        Route::Execute => {
            token_matches(headers, ACCESS_TOKEN, &sandbox.envd_token)
                && token_matches(headers, TRAFFIC_TOKEN, &sandbox.traffic_token)
        }
        Route::Contexts | Route::Context(_) | Route::RestartContext(_) => {
            token_matches(headers, TRAFFIC_TOKEN, &sandbox.traffic_token)
        }
        Route::InterpreterHealth => token_matches(headers, TRAFFIC_TOKEN, &sandbox.traffic_token),
        _ => token_matches(headers, ACCESS_TOKEN, &sandbox.envd_token),
    };
    if !authorised {
        return Err(E2bError::Unauthorized(
            "missing or wrong sandbox access token".into(),
        ));
    }
    data_for(app, sandbox, route, req).await
}

/// Serves a data-plane request of `sandbox` (authenticated).
async fn data_for(
    app: &Arc<App>,
    sandbox: Arc<sandboxes::Sandbox>,
    route: Route,
    req: Request<Incoming>,
) -> Result<Response<Body>, E2bError> {
    let method = req.method().clone();
    match route {
        Route::InterpreterHealth => Ok(json(StatusCode::OK, &json!("OK"))),
        Route::Health => Ok(empty(StatusCode::NO_CONTENT)),
        Route::Execute if method == Method::POST => {
            let body: interpreter::ExecuteBody = body_json(app, req).await?;
            let context = interpreter::context_for(&sandbox, &body)?;
            let (lines, response) = ndjson();
            tokio::spawn(interpreter::execute(
                sandbox.clone(),
                context,
                body.env_vars,
                body.code,
                lines,
            ));
            Ok(response)
        }
        Route::Contexts if method == Method::GET => {
            let list: Vec<Value> = sandbox.contexts().iter().map(|c| c.model()).collect();
            Ok(json(StatusCode::OK, &Value::Array(list)))
        }
        Route::Contexts if method == Method::POST => {
            let body: interpreter::ContextBody = body_json(app, req).await?;
            Ok(json(
                StatusCode::OK,
                &interpreter::create_context(&app.e2b, &sandbox, body).await?,
            ))
        }
        Route::Context(id) if method == Method::DELETE => {
            interpreter::remove_context(&app.e2b, &sandbox, &id).await?;
            Ok(empty(StatusCode::NO_CONTENT))
        }
        Route::RestartContext(id) if method == Method::POST => {
            interpreter::restart_context(&app.e2b, &sandbox, &id).await?;
            Ok(empty(StatusCode::NO_CONTENT))
        }
        Route::Envd => Ok(envd::handle(app, &sandbox, req).await),
        _ => Err(E2bError::BadRequest(format!(
            "{method} is not accepted on {}",
            req.uri().path()
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_split_the_two_planes() {
        let none = HeaderMap::new();
        assert_eq!(route("/v2/sandboxes", &none), Some(Route::Create));
        assert_eq!(route("/sandboxes", &none), Some(Route::Create));
        assert_eq!(
            route("/sandboxes/sgab", &none),
            Some(Route::Sandbox("sgab".into()))
        );
        assert_eq!(
            route("/v2/sandboxes/sgab/connect", &none),
            Some(Route::Connect("sgab".into()))
        );
        assert_eq!(
            route("/sandboxes/x/metrics", &none),
            Some(Route::OtherControl)
        );
        assert_eq!(route("/execute", &none), Some(Route::Execute));
        assert_eq!(
            route("/contexts/c1/restart", &none),
            Some(Route::RestartContext("c1".into()))
        );
        assert_eq!(
            route("/filesystem.Filesystem/ListDir", &none),
            Some(Route::Envd)
        );
        assert_eq!(route("/process.Process/Start", &none), Some(Route::Envd));
        // Jupyter's paths stay Jupyter's; /health only with a sandbox id.
        assert_eq!(route("/api/kernels", &none), None);
        assert_eq!(route("/health", &none), None);
        let mut h = HeaderMap::new();
        h.insert(SANDBOX_ID, HeaderValue::from_static("sgab"));
        assert_eq!(route("/health", &h), Some(Route::Health));
    }

    #[test]
    fn tokens_compare_exactly() {
        let mut h = HeaderMap::new();
        h.insert(ACCESS_TOKEN, HeaderValue::from_static("abc"));
        assert!(token_matches(&h, ACCESS_TOKEN, "abc"));
        assert!(!token_matches(&h, ACCESS_TOKEN, "abcd"));
        assert!(!token_matches(&h, TRAFFIC_TOKEN, "abc"));
        assert!(!token_matches(&HeaderMap::new(), ACCESS_TOKEN, ""));
    }
}
