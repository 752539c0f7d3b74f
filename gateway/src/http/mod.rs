//! The HTTP edge: Jupyter Server's kernel, kernelspec and session REST API and the kernel
//! WebSocket, over hyper.
//!
//! - [`routes`]: path → [`routes::Route`], the only place that knows the URL layout.
//! - [`error`]: errors → status and JSON body, in one place.
//! - [`frames`]: the two WebSocket framings, decoded from hostile bytes.
//! - [`ws`]: the WebSocket upgrade and the bridge between a client and its kernel.
//! - [`sessions`]: the `/api/sessions` store.
//!
//! Every request passes, in order: the `Host` check, routing, authentication, then its handler.
//! Handlers parse the body into typed requests and call the session layer; they never touch
//! kernel processes themselves.

pub mod contents;
pub mod error;
pub mod frames;
pub mod routes;
pub mod sessions;
pub mod ws;

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use chrono::{DateTime, Utc};
use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::auth::Auth;
use crate::config::Config;
use crate::kernelspec;
use crate::session::Kernels;
pub use error::ApiError;
use routes::{NoRoute, Route};

/// The API version reported at `GET /api` (the Jupyter Server REST API this gateway follows).
pub const API_VERSION: &str = "2.21.1";

/// A response body: whole (the Jupyter API) or streamed (E2B's `/execute`).
pub type Body = http_body_util::combinators::UnsyncBoxBody<Bytes, Infallible>;

/// What every handler can reach.
pub struct App {
    /// The configuration.
    pub config: Config,
    /// The token check.
    pub auth: Auth,
    /// The kernels.
    pub kernels: Kernels,
    /// The encrypted workspaces.
    pub workspaces: Arc<crate::workspace::Workspaces>,
    /// `%%ask`.
    pub asker: Arc<crate::ask::Asker>,
    /// `/api/sessions`.
    pub sessions: sessions::Sessions,
    /// The sandboxes of the E2B-compatible API.
    pub e2b: crate::e2b::sandboxes::Sandboxes,
    /// The sessions of the MCP endpoint.
    pub mcp: crate::mcp::Sessions,
    /// When the gateway started.
    pub started: DateTime<Utc>,
    /// Whether it listens on a loopback address (the `Host` rule applies then).
    pub loopback: bool,
    /// Becomes true when the gateway shuts down; WebSockets close on it.
    pub closing: watch::Receiver<bool>,
    /// Permits for requests in flight ([`MAX_IN_FLIGHT`]).
    pub in_flight: Arc<tokio::sync::Semaphore>,
}

/// A JSON response.
pub fn json_response(status: StatusCode, body: &Value) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(
        serde_json::to_vec(body).expect("JSON serialises"),
    )));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}

pub(crate) fn empty(status: StatusCode) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::new()));
    *r.status_mut() = status;
    r
}

/// Reads a body of at most `max` bytes.
/// Requests served at once; past it, 503 with a message (WebSockets count while upgrading only).
pub const MAX_IN_FLIGHT: usize = 512;

/// Reads a body of at most `max` bytes within `limit` (a client that trickles it is cut off).
pub(crate) async fn read_body(
    body: Incoming,
    max: usize,
    limit: Duration,
) -> Result<Bytes, ApiError> {
    let collected = tokio::time::timeout(limit, Limited::new(body, max).collect()).await;
    let Ok(collected) = collected else {
        return Err(ApiError::SlowBody(limit.as_secs()));
    };
    match collected {
        Ok(c) => Ok(c.to_bytes()),
        Err(e)
            if e.downcast_ref::<http_body_util::LengthLimitError>()
                .is_some() =>
        {
            Err(ApiError::TooLarge(max))
        }
        Err(e) => Err(ApiError::BadRequest(format!(
            "cannot read the request body: {e}"
        ))),
    }
}

/// Parses a JSON body into `T`; an empty body is `{}`.
pub(crate) fn parse_json<T: for<'de> Deserialize<'de>>(bytes: &[u8]) -> Result<T, ApiError> {
    let bytes: &[u8] = if bytes.iter().all(u8::is_ascii_whitespace) {
        b"{}"
    } else {
        bytes
    };
    serde_json::from_slice(bytes)
        .map_err(|e| ApiError::BadRequest(format!("invalid JSON body: {e}")))
}

/// `POST /api/kernels`.
#[derive(Debug, Deserialize)]
struct StartKernel {
    /// The kernelspec; `null` or missing means the default.
    #[serde(default)]
    name: Option<String>,
    /// Environment for the kernel. Checked for shape, then ignored: nothing of the caller's
    /// environment enters a sandbox.
    #[serde(default)]
    env: Option<serde_json::Map<String, Value>>,
    /// The notebook's path; informational.
    #[serde(default)]
    #[allow(dead_code)]
    path: Option<String>,
}

fn cors_headers<B>(app: &App, req_headers: &http::HeaderMap, response: &mut Response<B>) {
    let Some(origin) = req_headers
        .get(header::ORIGIN)
        .and_then(|o| o.to_str().ok())
    else {
        return;
    };
    if !app.config.auth.cors_origins.iter().any(|o| o == origin) {
        return;
    }
    let h = response.headers_mut();
    if let Ok(v) = HeaderValue::from_str(origin) {
        h.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, v);
    }
    h.insert(header::VARY, HeaderValue::from_static("Origin"));
    h.insert(
        header::ACCESS_CONTROL_ALLOW_HEADERS,
        HeaderValue::from_static("Authorization, Content-Type"),
    );
    h.insert(
        header::ACCESS_CONTROL_ALLOW_METHODS,
        HeaderValue::from_static("GET, POST, PATCH, DELETE, OPTIONS"),
    );
}

/// What a listener serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Surface {
    /// Everything: Jupyter's API, the E2B-compatible API.
    Main,
    /// E2B's debug ports: one implicit sandbox's data plane, without tokens (loopback only).
    E2bDebug,
}

/// Serves one request. Never fails: errors become JSON responses.
pub async fn handle(app: Arc<App>, req: Request<Incoming>) -> Response<Body> {
    handle_on(app, Surface::Main, req).await
}

/// Serves one request that came on a listener of `surface`.
pub async fn handle_on(app: Arc<App>, surface: Surface, req: Request<Incoming>) -> Response<Body> {
    let method = req.method().clone();
    let path = req.uri().path().to_owned();
    let headers = req.headers().clone();
    let started = std::time::Instant::now();
    let permit = app.in_flight.clone().try_acquire_owned();
    let mut response = match permit {
        Err(_) => ApiError::Overloaded(MAX_IN_FLIGHT)
            .response()
            .map(|b| b.boxed_unsync()),
        Ok(_permit) => match dispatch(&app, surface, req).await {
            Ok(r) => r,
            Err(e) => e.response().map(|b| b.boxed_unsync()),
        },
    };
    cors_headers(&app, &headers, &mut response);
    if method == Method::HEAD {
        *response.body_mut() = Full::new(Bytes::new()).boxed_unsync();
    }
    // The path is logged, never the query (it may carry a token), and never a workspace path
    // (file names are the user's data: they stay encrypted, logs included).
    let path = match path.strip_prefix("/api/contents") {
        Some(rest) if !rest.is_empty() && rest != "/" => {
            format!("/api/contents/<{} bytes>", rest.len())
        }
        _ => path,
    };
    tracing::info!(
        method = %method,
        path = %path,
        status = response.status().as_u16(),
        ms = started.elapsed().as_secs_f64() * 1e3,
        "request"
    );
    response
}

async fn dispatch(
    app: &Arc<App>,
    surface: Surface,
    req: Request<Incoming>,
) -> Result<Response<Body>, ApiError> {
    let cfg = &app.config.auth;
    crate::auth::check_host(
        req.headers(),
        app.loopback,
        cfg.allow_remote_access,
        &cfg.local_hostnames,
    )?;
    if surface == Surface::E2bDebug {
        return Ok(crate::e2b::handle_debug(app, req).await);
    }
    if crate::mcp::is_mcp(req.uri().path()) {
        return Ok(crate::mcp::handle(app, req).await);
    }
    if let Some(route) = crate::e2b::route(req.uri().path(), req.headers()) {
        return Ok(crate::e2b::handle(app, route, req).await);
    }
    jupyter(app, req).await.map(|r| r.map(|b| b.boxed_unsync()))
}

/// Serves a request of Jupyter Server's API (the `Host` rule has passed).
async fn jupyter(
    app: &Arc<App>,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, ApiError> {
    let route = match routes::route(req.method(), req.uri().path()) {
        Ok(r) => r,
        Err(NoRoute::NotFound) => {
            return Err(ApiError::NotFound(format!(
                "no such endpoint: {}",
                req.uri().path()
            )));
        }
        Err(NoRoute::Method(allowed)) => return Err(ApiError::Method(allowed)),
    };
    if req.method() == Method::OPTIONS {
        // CORS preflight: answered without a token, headers added by `cors_headers`.
        return Ok(empty(StatusCode::NO_CONTENT));
    }
    if route == Route::Api {
        // As Jupyter Server: the version is public.
        return Ok(api_version());
    }
    let is_ws = matches!(route, Route::Channels(_));
    let user = app.auth.check(req.headers(), req.uri().query(), is_ws)?;
    let user = user.as_str();
    unlock_workspace(app, req.headers(), req.uri().query(), is_ws, user).await;
    let max_body = app.config.http.max_body_bytes;
    let body_timeout = Duration::from_secs(app.config.http.body_timeout_s);
    let kernels = &app.kernels;
    match route {
        Route::Api => Ok(api_version()),
        Route::Status => {
            let list = kernels.list(user);
            let connections: usize = list.iter().map(|k| k.lock().connections).sum();
            let last = list
                .iter()
                .map(|k| k.lock().last_activity)
                .max()
                .unwrap_or(app.started);
            Ok(json_response(
                StatusCode::OK,
                &json!({
                    "connections": connections,
                    "kernels": list.len(),
                    "last_activity": crate::session::kernel::timestamp(last),
                    "started": crate::session::kernel::timestamp(app.started),
                }),
            ))
        }
        Route::KernelSpecs => Ok(json_response(StatusCode::OK, &kernelspec::all())),
        Route::KernelSpec(name) => match kernelspec::model(&name) {
            Some(model) => Ok(json_response(StatusCode::OK, &model)),
            None => Err(ApiError::NotFound(format!("Kernel spec {name} not found"))),
        },
        Route::KernelSpecResource(name, file) => {
            let r = kernelspec::resource(&name, &file).ok_or_else(|| {
                ApiError::NotFound(format!("no resource {file} in kernelspec {name}"))
            })?;
            let mut response = Response::new(Full::new(Bytes::from_static(r.body)));
            response.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static(r.content_type),
            );
            response.headers_mut().insert(
                header::CACHE_CONTROL,
                HeaderValue::from_static("max-age=86400"),
            );
            Ok(response)
        }
        Route::Kernels if req.method() == Method::GET => {
            let models: Vec<Value> = kernels.list(user).iter().map(|k| k.model()).collect();
            Ok(json_response(StatusCode::OK, &Value::Array(models)))
        }
        Route::Kernels => {
            let body = read_body(req.into_body(), max_body, body_timeout).await?;
            let start: StartKernel = parse_json(&body)?;
            if let Some(env) = &start.env
                && !env.values().all(Value::is_string)
            {
                return Err(ApiError::BadRequest("env values must be strings".into()));
            }
            let name = start.name.unwrap_or_else(|| kernelspec::NAME.to_owned());
            let kernel = kernels.start(user, &name).await?;
            let mut response = json_response(StatusCode::CREATED, &kernel.model());
            if let Ok(v) = HeaderValue::from_str(&format!("/api/kernels/{}", kernel.id)) {
                response.headers_mut().insert(header::LOCATION, v);
            }
            Ok(response)
        }
        Route::Kernel(id) if req.method() == Method::DELETE => {
            kernels.shutdown(user, &id).await?;
            app.sessions.forget_kernel(&id);
            Ok(empty(StatusCode::NO_CONTENT))
        }
        Route::Kernel(id) => Ok(json_response(
            StatusCode::OK,
            &kernels.get(user, &id)?.model(),
        )),
        Route::Interrupt(id) => {
            kernels.interrupt(user, &id).await?;
            Ok(empty(StatusCode::NO_CONTENT))
        }
        Route::Restart(id) => {
            let kernel = kernels.restart(user, &id).await?;
            Ok(json_response(StatusCode::OK, &kernel.model()))
        }
        Route::Channels(id) => {
            let kernel = kernels.get(user, &id)?;
            crate::auth::check_origin(req.headers(), &app.config.auth.allow_origins)?;
            ws::upgrade(app.clone(), req, kernel)
        }
        Route::Sessions if req.method() == Method::GET => Ok(json_response(
            StatusCode::OK,
            &app.sessions.list(kernels, user),
        )),
        Route::Sessions => {
            let body = read_body(req.into_body(), max_body, body_timeout).await?;
            let request: sessions::SessionModel = parse_json(&body)?;
            let model = app.sessions.create(kernels, user, request).await?;
            Ok(json_response(StatusCode::CREATED, &model))
        }
        Route::Session(id) if req.method() == Method::GET => Ok(json_response(
            StatusCode::OK,
            &app.sessions.get(kernels, user, &id)?,
        )),
        Route::Session(id) if req.method() == Method::PATCH => {
            let body = read_body(req.into_body(), max_body, body_timeout).await?;
            let patch: sessions::SessionModel = parse_json(&body)?;
            Ok(json_response(
                StatusCode::OK,
                &app.sessions.update(kernels, user, &id, patch).await?,
            ))
        }
        Route::Session(id) => {
            app.sessions.delete(kernels, user, &id).await?;
            Ok(empty(StatusCode::NO_CONTENT))
        }
        Route::AskUsage => {
            let ids: Vec<uuid::Uuid> = kernels.list(user).iter().map(|k| k.id).collect();
            Ok(json_response(
                StatusCode::OK,
                &app.asker.usage_report(user, &ids),
            ))
        }
        route @ (Route::Contents(_) | Route::Checkpoints(_) | Route::Checkpoint(..)) => {
            let space = app.workspaces.space(user).await?;
            let method = req.method().clone();
            let query = req.uri().query().map(str::to_owned);
            let body = read_body(req.into_body(), max_body, body_timeout).await?;
            contents::handle(space, &method, route, query.as_deref(), body).await
        }
    }
}

/// Opens the workspace key with the access token a request carries, when no other key source
/// was given and the key is still closed.
pub(crate) async fn unlock_workspace(
    app: &App,
    headers: &http::HeaderMap,
    query: Option<&str>,
    is_ws: bool,
    user: &str,
) {
    if !app.workspaces.is_unlocked()
        && app.workspaces.key_damage().is_none()
        && let Some(token) = crate::auth::Auth::presented(headers, query, is_ws)
    {
        // The access token opens the workspace key (when no other key source was given).
        match app
            .workspaces
            .unlock(crate::workspace::keys::MasterSource::Token(token))
            .await
        {
            Ok(()) => match app.workspaces.space(user).await {
                // Logged once by the workspaces, with the way out.
                Ok(_) | Err(crate::workspace::WorkspaceError::IndexDamaged { .. }) => {}
                Err(e) => tracing::error!(error = %e, "cannot open the workspace"),
            },
            // Logged once by the workspaces, with the way out.
            Err(crate::workspace::WorkspaceError::Key(
                crate::workspace::keys::KeyError::Damaged { .. },
            )) => {}
            Err(e) => {
                tracing::error!(error = %e, "the access token does not open the workspace key")
            }
        }
    }
}

fn api_version() -> Response<Full<Bytes>> {
    json_response(
        StatusCode::OK,
        &json!({"version": API_VERSION, "gateway": format!("sandgate {}", env!("CARGO_PKG_VERSION"))}),
    )
}

/// Serves `listener` until `shutdown` resolves, then stops accepting, closes WebSockets and
/// lets in-flight requests finish (up to 10 s).
pub async fn serve(
    listener: TcpListener,
    app: Arc<App>,
    closing: watch::Sender<bool>,
    shutdown: impl Future<Output = ()>,
) {
    serve_surface(listener, app, Surface::Main, closing, shutdown).await
}

/// As [`serve`], for a listener of `surface`.
pub async fn serve_surface(
    listener: TcpListener,
    app: Arc<App>,
    surface: Surface,
    closing: watch::Sender<bool>,
    shutdown: impl Future<Output = ()>,
) {
    let header_timeout = Duration::from_secs(app.config.http.header_timeout_s);
    let mut connections = tokio::task::JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let _ = stream.set_nodelay(true);
        let app = app.clone();
        let mut closing_rx = closing.subscribe();
        connections.spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let app = app.clone();
                async move { Ok::<_, Infallible>(handle_on(app, surface, req).await) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(header_timeout)
                .serve_connection(TokioIo::new(stream), service)
                .with_upgrades();
            tokio::pin!(conn);
            tokio::select! {
                r = conn.as_mut() => {
                    if let Err(e) = r {
                        tracing::debug!(%peer, error = %e, "connection ended with an error");
                    }
                }
                () = crate::until_true(&mut closing_rx) => {
                    conn.as_mut().graceful_shutdown();
                    let _ = conn.await;
                }
            }
        });
        // Reap finished connection tasks so the set does not grow.
        while connections.try_join_next().is_some() {}
    }
    let _ = closing.send(true);
    let _ = tokio::time::timeout(Duration::from_secs(10), async {
        while connections.join_next().await.is_some() {}
    })
    .await;
}
