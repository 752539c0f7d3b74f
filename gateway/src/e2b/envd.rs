//! envd, the in-sandbox daemon of E2B (`E2b-Sandbox-Port: 49983`): a sandbox's files, and the
//! answer to its process calls. What a sandbox has, and so what this serves:
//!
//! - its home, `/home/user`: a folder of its own on the host (every context's `$HOME` and
//!   working directory), removed when the sandbox ends;
//! - the user's encrypted workspace at `/workspace`, which outlives it. envd reads and writes
//!   the kernels' live copy of it, the way kernels do, and saves what it changed into the
//!   encrypted store before it answers, so a file it wrote is stored by the time the client
//!   hears so;
//! - nothing else: any other path is refused ([`paths`]).
//!
//! Routes:
//! - `GET /files?path=` streams a file; `POST /files?path=` writes one or more (a
//!   `multipart/form-data` body whose `file` parts are named by their full path, or one raw
//!   `application/octet-stream` body, optionally gzip-compressed), streamed to disk. One upload
//!   request may carry at most the sandbox's disk quota (`sandbox.disk_mb`, 413 past it), the
//!   home may hold at most that much (507), and a file for `/workspace` at most the workspace
//!   quota (`workspace.max_bytes`, 507). `username` is accepted and ignored (one user, `user`).
//! - Connect unary calls (JSON codec) `filesystem.Filesystem/{ListDir, Stat, MakeDir, Remove,
//!   Move}`, errors as Connect errors with the code's HTTP status.
//! - `process.Process/*`: the sandbox has no shell (Python runs in WebAssembly, with no Bash
//!   or other programs), so every call is refused with a Connect `unimplemented` error that
//!   says so; `Start` and `Connect`, which are streams, get it at the end of a stream.
//!   Anything else under `filesystem.` and `process.` is `unimplemented` too.
//!
//! Modules:
//! - [`paths`]: guest paths → (home or workspace, path inside).
//! - [`fs`]: the file operations, through cap-std handles.
//! - [`connect`]: Connect's envelopes and errors.
//! - [`multipart`]: a streaming `multipart/form-data` parser.

pub mod connect;
pub mod fs;
pub mod multipart;
pub mod paths;

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use cap_std::ambient_authority;
use cap_std::fs::Dir;
use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::{Frame, Incoming};
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::sync::mpsc;

use super::sandboxes::Sandbox;
use crate::http::{App, Body};
use crate::workspace::Space;
use connect::{Code, ConnectError};
use fs::{FsError, Upload};
use paths::{GuestPath, GuestPathError, Root};

/// Why a process call fails, for every process call.
pub const NO_SHELL: &str = "this sandbox has no shell: Sandgate runs Python in a WebAssembly \
     sandbox, without Bash or any other program, so commands cannot run here. Run Python with \
     run_code, and read and write files with sandbox.files. Commands need the Linux sandbox tier \
     with Bash, which is not in this build";
/// Most bytes of one Connect message (a request is a path or two).
const MAX_MESSAGE: usize = 1 << 20;
/// Most entries one `ListDir` returns.
const MAX_LIST: usize = 50_000;
/// Deepest `ListDir`.
const MAX_DEPTH: u32 = 32;
/// Bytes read from a file per chunk of a download.
const READ_CHUNK: usize = 256 << 10;
/// Bytes gathered before they are written to disk, in uploads.
const WRITE_BATCH: usize = 1 << 20;
/// Compressed bytes fed to the gzip decoder at a time: its output per step stays bounded
/// (deflate expands at most about 1032 times).
const GZIP_STEP: usize = 1024;
/// After a refused upload, at most this much of the rest of its body is read (and dropped)
/// so the client, still sending, hears the answer; past it the connection is closed.
const DRAIN_MAX: u64 = 64 << 20;

/// Serves an envd request for `sandbox` (authenticated by its access token already).
pub async fn handle(
    app: &Arc<App>,
    sandbox: &Arc<Sandbox>,
    req: Request<Incoming>,
) -> Response<Body> {
    let path = req.uri().path().trim_start_matches('/').to_owned();
    if path == "files" {
        let result = match *req.method() {
            Method::GET | Method::HEAD => download(app, sandbox, req).await,
            Method::POST => upload(app, sandbox, req).await,
            _ => Err((
                StatusCode::METHOD_NOT_ALLOWED,
                "use GET (read) or POST (write) on /files".to_owned(),
            )),
        };
        return result.unwrap_or_else(|(status, message)| http_error(status, &message));
    }
    let Some((service, method)) = path.split_once('/') else {
        return unimplemented(&path).response();
    };
    match service {
        "filesystem.Filesystem" => match method {
            "Stat" | "ListDir" | "MakeDir" | "Remove" | "Move" => {
                unary(app, sandbox, method, req).await
            }
            "WatchDir" | "CreateWatcher" | "GetWatcherEvents" | "RemoveWatcher" => {
                ConnectError::new(
                    Code::Unimplemented,
                    "watching folders is not available in Sandgate's E2B-compatible API; list \
                     the folder again to see what changed",
                )
                .response()
            }
            _ => unimplemented(&path).response(),
        },
        "process.Process" => match method {
            // Server streams: the error comes at the end of a stream, as the protocol has it.
            "Start" | "Connect" => process_stream(app, req).await,
            _ => ConnectError::new(Code::Unimplemented, NO_SHELL).response(),
        },
        _ => unimplemented(&path).response(),
    }
}

fn unimplemented(path: &str) -> ConnectError {
    ConnectError::new(
        Code::Unimplemented,
        format!("/{path} is not part of Sandgate's E2B-compatible API"),
    )
}

/// envd's HTTP error: `{"code": status, "message": …}`.
fn http_error(status: StatusCode, message: &str) -> Response<Body> {
    crate::http::json_response(
        status,
        &json!({"code": status.as_u16(), "message": message}),
    )
    .map(|b| b.boxed_unsync())
}

fn fs_http(e: FsError) -> (StatusCode, String) {
    (e.status(), e.to_string())
}

/// A checked guest path, or the refusal as envd would say it.
fn guest_path(raw: &str) -> Result<GuestPath, FsError> {
    GuestPath::parse(raw).map_err(|e| match e {
        e @ GuestPathError::Outside(_) => FsError::Denied(e.to_string()),
        e => FsError::Invalid(e.to_string()),
    })
}

/// One of the sandbox's places, opened.
struct Place {
    dir: Arc<Dir>,
    /// The workspace, for `/workspace` (whose changes are saved into its store).
    space: Option<Arc<Space>>,
}

async fn open_place(app: &App, sandbox: &Sandbox, root: Root) -> Result<Place, FsError> {
    let (host, space) = match root {
        Root::Home => (sandbox.home.path().to_owned(), None),
        Root::Workspace => {
            let space = app.workspaces.space(&sandbox.owner).await.map_err(|e| {
                FsError::Unavailable(format!("the workspace (/workspace) is not available: {e}"))
            })?;
            (space.live_path().to_owned(), Some(space))
        }
    };
    let dir = blocking(move || {
        Dir::open_ambient_dir(&host, ambient_authority()).map_err(|e| {
            tracing::error!(error = %e, "cannot open a sandbox's folder");
            FsError::Io(format!("{} cannot be opened", root.guest()))
        })
    })
    .await?;
    Ok(Place {
        dir: Arc::new(dir),
        space,
    })
}

impl Place {
    /// After a change under `/workspace`: saves the live copy into the store, and fails (after
    /// undoing it in the live copy, so kernels do not see what was not saved) if the store
    /// refused one of `changed`.
    async fn save(&self, changed: &[GuestPath]) -> Result<(), FsError> {
        let Some(space) = &self.space else {
            return Ok(());
        };
        let report = space.sync().await;
        let mut refused = None;
        for path in changed {
            if let Some((_, why)) = report.refused.iter().find(|(p, _)| *p == path.rel.as_str()) {
                let (dir, p) = (self.dir.clone(), path.clone());
                let _ = blocking(move || fs::remove(&dir, &p)).await;
                refused.get_or_insert_with(|| {
                    FsError::NoSpace(format!(
                        "{} was not saved in the workspace: {why}",
                        path.guest()
                    ))
                });
            }
        }
        match refused {
            Some(e) => {
                space.sync().await;
                Err(e)
            }
            None => Ok(()),
        }
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, FsError> + Send + 'static,
) -> Result<T, FsError> {
    tokio::task::spawn_blocking(f)
        .await
        .unwrap_or_else(|e| Err(FsError::Io(format!("the file operation failed: {e}"))))
}

/// The `path` and `username` of a `/files` query (`username` is accepted and ignored).
fn files_query(query: Option<&str>) -> Option<String> {
    crate::auth::form_pairs(query.unwrap_or_default())
        .into_iter()
        .find(|(k, _)| k == "path")
        .map(|(_, v)| v)
}

/// `GET /files?path=`: the file's bytes, streamed.
async fn download(
    app: &Arc<App>,
    sandbox: &Sandbox,
    req: Request<Incoming>,
) -> Result<Response<Body>, (StatusCode, String)> {
    let raw = files_query(req.uri().query()).ok_or((
        StatusCode::BAD_REQUEST,
        "give the file's path: /files?path=…".to_owned(),
    ))?;
    let path = guest_path(&raw).map_err(fs_http)?;
    let place = open_place(app, sandbox, path.root).await.map_err(fs_http)?;
    let (dir, p) = (place.dir.clone(), path.clone());
    let (file, len) = blocking(move || fs::open_read(&dir, &p))
        .await
        .map_err(fs_http)?;
    let (tx, rx) = mpsc::channel::<Bytes>(4);
    tokio::task::spawn_blocking(move || {
        use std::io::Read;
        let mut file = file.take(len);
        loop {
            let mut buf = vec![0u8; READ_CHUNK];
            match file.read(&mut buf) {
                Ok(0) => return,
                Ok(n) => {
                    buf.truncate(n);
                    if tx.blocking_send(Bytes::from(buf)).is_err() {
                        return; // The client went away.
                    }
                }
                // The body ends short of its length: the client sees a broken download.
                Err(e) => {
                    tracing::warn!(error = %e, "a download stopped");
                    return;
                }
            }
        }
    });
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv()
            .await
            .map(|b| (Ok::<_, Infallible>(Frame::data(b)), rx))
    });
    let mut response = Response::new(StreamBody::new(stream).boxed_unsync());
    let h = response.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
    Ok(response)
}

/// The request body as it arrives: decompressed if it is gzip, within the upload cap, each
/// wait for more bounded by the body timeout.
struct BodyReader {
    body: Incoming,
    gzip: Option<flate2::write::GzDecoder<Vec<u8>>>,
    /// Decoded bytes so far, and the most allowed.
    total: u64,
    cap: u64,
    idle: Duration,
    /// Raw bytes received, for the drain after a refusal.
    raw: u64,
    ended: bool,
}

impl BodyReader {
    /// The next decoded bytes; `None` at the end.
    async fn next(&mut self) -> Result<Option<Bytes>, FsError> {
        loop {
            if self.ended {
                return Ok(None);
            }
            let frame = tokio::time::timeout(self.idle, self.body.frame())
                .await
                .map_err(|_| {
                    FsError::Invalid(format!(
                        "the upload stalled: nothing arrived for {} s",
                        self.idle.as_secs()
                    ))
                })?;
            let data = match frame {
                None => {
                    self.ended = true;
                    return self.finish_gzip();
                }
                Some(Err(e)) => {
                    return Err(FsError::Invalid(format!("the upload broke off: {e}")));
                }
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(d) => d,
                    Err(_) => continue, // Trailers.
                },
            };
            self.raw += data.len() as u64;
            let (total, cap) = (self.total, self.cap);
            let out = match &mut self.gzip {
                None => data,
                Some(dec) => {
                    let mut out = Vec::new();
                    for step in data.chunks(GZIP_STEP) {
                        use std::io::Write;
                        dec.write_all(step).map_err(|_| gzip_error())?;
                        out.append(dec.get_mut());
                        over_cap(total + out.len() as u64, cap)?;
                    }
                    Bytes::from(out)
                }
            };
            self.count(out.len() as u64)?;
            self.total += out.len() as u64;
            if !out.is_empty() {
                return Ok(Some(out));
            }
        }
    }

    /// Fails if `more` bytes would take the upload past the cap.
    fn count(&self, more: u64) -> Result<(), FsError> {
        over_cap(self.total + more, self.cap)
    }

    fn finish_gzip(&mut self) -> Result<Option<Bytes>, FsError> {
        let Some(mut dec) = self.gzip.take() else {
            return Ok(None);
        };
        dec.try_finish().map_err(|_| gzip_error())?;
        let out = std::mem::take(dec.get_mut());
        self.count(out.len() as u64)?;
        self.total += out.len() as u64;
        Ok((!out.is_empty()).then(|| Bytes::from(out)))
    }

    /// Reads and drops what is left of a refused upload (bounded), so the client, which may
    /// still be sending, gets to read the answer.
    async fn drain(&mut self) {
        while !self.ended && self.raw < DRAIN_MAX {
            match tokio::time::timeout(self.idle, self.body.frame()).await {
                Ok(Some(Ok(frame))) => {
                    if let Ok(d) = frame.into_data() {
                        self.raw += d.len() as u64;
                    }
                }
                _ => return,
            }
        }
    }
}

/// An upload of `total` bytes is refused past `cap`.
fn over_cap(total: u64, cap: u64) -> Result<(), FsError> {
    if total > cap {
        return Err(FsError::TooLarge(format!(
            "the upload is over the {} MiB limit (the sandbox's disk quota, sandbox.disk_mb)",
            cap >> 20
        )));
    }
    Ok(())
}

fn gzip_error() -> FsError {
    FsError::Invalid("the upload's gzip data is corrupt or truncated".into())
}

/// Where the files of one upload request go, and what their place allows.
struct Sink {
    place: Place,
    /// For the home: bytes it may still take (the disk quota less what it holds).
    room: Option<u64>,
    /// For the workspace: the most one file may have.
    file_cap: Option<u64>,
    upload: Option<Upload>,
    batch: Vec<u8>,
    written: Vec<GuestPath>,
}

impl Sink {
    async fn open(app: &App, sandbox: &Sandbox, root: Root) -> Result<Sink, FsError> {
        let place = open_place(app, sandbox, root).await?;
        let limits = &app.config.sandbox;
        let (room, file_cap) = match root {
            Root::Home => {
                let dir = place.dir.clone();
                let max_files = limits.disk_files;
                let (bytes, files) = blocking(move || Ok(fs::usage(&dir, max_files))).await?;
                if files >= max_files {
                    return Err(FsError::NoSpace(format!(
                        "/home/user holds {files} files and folders, the sandbox's limit \
                         (sandbox.disk_files)"
                    )));
                }
                (Some((limits.disk_mb << 20).saturating_sub(bytes)), None)
            }
            Root::Workspace => (None, Some(app.workspaces.config().quota.max_bytes)),
        };
        Ok(Sink {
            place,
            room,
            file_cap,
            upload: None,
            batch: Vec::new(),
            written: Vec::new(),
        })
    }

    async fn begin(&mut self, path: &GuestPath) -> Result<(), FsError> {
        let (dir, p) = (self.place.dir.clone(), path.clone());
        self.upload = Some(blocking(move || Upload::begin(&dir, &p)).await?);
        self.batch.clear();
        Ok(())
    }

    async fn write(&mut self, data: &[u8]) -> Result<(), FsError> {
        let Some(upload) = &self.upload else {
            return Ok(());
        };
        let size = upload.written + (self.batch.len() + data.len()) as u64;
        if let Some(room) = self.room
            && size > room
        {
            return Err(FsError::NoSpace(format!(
                "no space left in the sandbox's disk quota (sandbox.disk_mb) for {}",
                upload.target().guest()
            )));
        }
        if let Some(cap) = self.file_cap
            && size > cap
        {
            return Err(FsError::NoSpace(format!(
                "{} is over the workspace quota ({cap} bytes, workspace.max_bytes)",
                upload.target().guest()
            )));
        }
        self.batch.extend_from_slice(data);
        if self.batch.len() >= WRITE_BATCH {
            self.flush().await?;
        }
        Ok(())
    }

    async fn flush(&mut self) -> Result<(), FsError> {
        let Some(mut upload) = self.upload.take() else {
            return Ok(());
        };
        let batch = std::mem::take(&mut self.batch);
        let upload = blocking(move || {
            upload.write(&batch)?;
            Ok(upload)
        })
        .await?;
        self.upload = Some(upload);
        Ok(())
    }

    async fn commit(&mut self) -> Result<(), FsError> {
        self.flush().await?;
        let Some(upload) = self.upload.take() else {
            return Ok(());
        };
        let path = upload.target().clone();
        let written = upload.written;
        blocking(move || upload.commit()).await?;
        if let Some(room) = &mut self.room {
            *room = room.saturating_sub(written);
        }
        self.written.push(path);
        Ok(())
    }
}

/// `POST /files`: multipart or a raw body, streamed to disk.
async fn upload(
    app: &Arc<App>,
    sandbox: &Sandbox,
    req: Request<Incoming>,
) -> Result<Response<Body>, (StatusCode, String)> {
    let query_path = files_query(req.uri().query());
    let headers = req.headers().clone();
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    let gzip = match headers
        .get(header::CONTENT_ENCODING)
        .and_then(|v| v.to_str().ok())
        .map(|v| v.trim().to_ascii_lowercase())
        .as_deref()
    {
        None | Some("" | "identity") => false,
        Some("gzip") => true,
        Some(other) => {
            return Err((
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                format!("Content-Encoding {other:?} is not accepted; send identity or gzip"),
            ));
        }
    };
    let essence = content_type
        .split(';')
        .next()
        .unwrap_or_default()
        .trim()
        .to_ascii_lowercase();
    let limits = &app.config.sandbox;
    let mut body = BodyReader {
        body: req.into_body(),
        gzip: gzip.then(|| flate2::write::GzDecoder::new(Vec::new())),
        total: 0,
        cap: limits.disk_mb << 20,
        idle: Duration::from_secs(app.config.http.body_timeout_s),
        raw: 0,
        ended: false,
    };
    let result = match essence.as_str() {
        "multipart/form-data" => match multipart::boundary(&content_type) {
            Ok(b) => upload_multipart(app, sandbox, &mut body, &b, query_path).await,
            Err(e) => Err(FsError::Invalid(e.to_string())),
        },
        "application/octet-stream" => match query_path {
            Some(raw) => upload_raw(app, sandbox, &mut body, &raw).await,
            None => Err(FsError::Invalid(
                "an application/octet-stream upload needs the file's path: /files?path=…".into(),
            )),
        },
        _ => {
            body.drain().await;
            return Err((
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                format!(
                    "uploads are multipart/form-data or application/octet-stream, not {:?}",
                    content_type
                ),
            ));
        }
    };
    match result {
        Ok(written) => {
            let list: Vec<Value> = written.iter().map(fs::written_json).collect();
            Ok(
                crate::http::json_response(StatusCode::OK, &Value::Array(list))
                    .map(|b| b.boxed_unsync()),
            )
        }
        Err(e) => {
            body.drain().await;
            Err(fs_http(e))
        }
    }
}

async fn upload_raw(
    app: &App,
    sandbox: &Sandbox,
    body: &mut BodyReader,
    raw: &str,
) -> Result<Vec<GuestPath>, FsError> {
    let path = guest_path(raw)?;
    let mut sink = Sink::open(app, sandbox, path.root).await?;
    sink.begin(&path).await?;
    while let Some(data) = body.next().await? {
        sink.write(&data).await?;
    }
    sink.commit().await?;
    sink.place.save(&sink.written).await?;
    Ok(sink.written)
}

async fn upload_multipart(
    app: &App,
    sandbox: &Sandbox,
    body: &mut BodyReader,
    boundary: &str,
    mut query_path: Option<String>,
) -> Result<Vec<GuestPath>, FsError> {
    // One sink per place the request writes to.
    let mut sinks: Vec<(Root, Sink)> = Vec::new();
    let parsed = parse_parts(app, sandbox, body, boundary, &mut query_path, &mut sinks).await;
    // What was written is saved even if a later part failed (it is in place already).
    let mut written = Vec::new();
    for (_, sink) in &sinks {
        sink.place.save(&sink.written).await?;
        written.extend(sink.written.iter().cloned());
    }
    parsed?;
    if written.is_empty() {
        return Err(FsError::Invalid(
            "the upload has no file: send parts named \"file\"".into(),
        ));
    }
    Ok(written)
}

/// Reads the parts of a multipart upload, writing each `file` part through its place's sink.
async fn parse_parts(
    app: &App,
    sandbox: &Sandbox,
    body: &mut BodyReader,
    boundary: &str,
    query_path: &mut Option<String>,
    sinks: &mut Vec<(Root, Sink)>,
) -> Result<(), FsError> {
    let mut parser = multipart::Multipart::new(boundary);
    let mut current: Option<Root> = None;
    let bad = |e: multipart::MultipartError| FsError::Invalid(e.to_string());
    loop {
        while let Some(event) = parser.next_event().map_err(bad)? {
            match event {
                multipart::Event::Part(h) => {
                    current = None;
                    if h.name.as_deref() != Some("file") {
                        continue; // Another field: skipped, as envd does.
                    }
                    // `?path=` names the first file; the others are named by their filename.
                    let raw = query_path.take().or(h.filename).ok_or_else(|| {
                        FsError::Invalid(
                            "a file part has no filename: give each file's full path as its \
                             filename (or ?path= for one file)"
                                .into(),
                        )
                    })?;
                    let path = guest_path(&raw)?;
                    if !sinks.iter().any(|(r, _)| *r == path.root) {
                        sinks.push((path.root, Sink::open(app, sandbox, path.root).await?));
                    }
                    let sink = sink_of(sinks, path.root);
                    sink.begin(&path).await?;
                    current = Some(path.root);
                }
                multipart::Event::Data(d) => {
                    if let Some(root) = current {
                        sink_of(sinks, root).write(&d).await?;
                    }
                }
                multipart::Event::PartEnd => {
                    if let Some(root) = current.take() {
                        sink_of(sinks, root).commit().await?;
                    }
                }
                multipart::Event::End => return Ok(()),
            }
        }
        match body.next().await? {
            Some(chunk) => parser.feed(&chunk),
            None => return parser.finish().map_err(bad),
        }
    }
}

fn sink_of(sinks: &mut [(Root, Sink)], root: Root) -> &mut Sink {
    // The sink was opened when its first part began.
    let at = sinks.iter().position(|(r, _)| *r == root).unwrap_or(0);
    &mut sinks[at].1
}

/// A path field of a request.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct PathRequest {
    path: String,
}

/// `ListDirRequest`.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct ListDirRequest {
    path: String,
    depth: Option<Value>,
}

/// `MoveRequest`.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct MoveRequest {
    source: String,
    destination: String,
}

/// A proto3 JSON `uint32`: a number, or a string holding one.
fn uint32(v: Option<&Value>) -> Result<u32, ConnectError> {
    let bad = || ConnectError::new(Code::InvalidArgument, "depth must be a whole number");
    match v {
        None | Some(Value::Null) => Ok(0),
        Some(Value::Number(n)) => n
            .as_u64()
            .and_then(|n| u32::try_from(n).ok())
            .ok_or_else(bad),
        Some(Value::String(s)) => s.parse().map_err(|_| bad()),
        Some(_) => Err(bad()),
    }
}

/// A request message: a JSON object (proto3 JSON; unknown fields are ignored).
fn parse_message<T: for<'de> Deserialize<'de>>(body: &[u8]) -> Result<T, ConnectError> {
    let bad = |why: String| {
        ConnectError::new(
            Code::InvalidArgument,
            format!("the request is not a valid JSON message: {why}"),
        )
    };
    match serde_json::from_slice::<Value>(body) {
        Ok(v @ Value::Object(_)) => serde_json::from_value(v).map_err(|e| bad(e.to_string())),
        Ok(_) => Err(bad("a message is a JSON object".into())),
        Err(e) => Err(bad(e.to_string())),
    }
}

/// The body of a Connect request (at most `max_body_bytes`; 413 past it).
async fn connect_body(app: &App, body: Incoming) -> Result<Bytes, Response<Body>> {
    crate::http::read_body(
        body,
        app.config.http.max_body_bytes,
        Duration::from_secs(app.config.http.body_timeout_s),
    )
    .await
    .map_err(|e| {
        let status = e.status();
        let code = if status == StatusCode::PAYLOAD_TOO_LARGE {
            Code::ResourceExhausted
        } else {
            Code::InvalidArgument
        };
        let mut r = ConnectError::new(code, e.to_string()).response();
        *r.status_mut() = status;
        r
    })
}

/// A unary `filesystem.Filesystem` call.
async fn unary(
    app: &Arc<App>,
    sandbox: &Sandbox,
    method: &str,
    req: Request<Incoming>,
) -> Response<Body> {
    if req.method() != Method::POST {
        let mut r = ConnectError::new(Code::InvalidArgument, "Connect calls are POST").response();
        *r.status_mut() = StatusCode::METHOD_NOT_ALLOWED;
        return r;
    }
    if !connect::is_json(req.headers().get(header::CONTENT_TYPE), false) {
        let mut r = ConnectError::new(
            Code::InvalidArgument,
            "only Connect's JSON codec is served: send Content-Type: application/json",
        )
        .response();
        *r.status_mut() = StatusCode::UNSUPPORTED_MEDIA_TYPE;
        return r;
    }
    let body = match connect_body(app, req.into_body()).await {
        Ok(b) => b,
        Err(r) => return r,
    };
    match filesystem(app, sandbox, method, &body).await {
        Ok(message) => connect::unary_ok(&message),
        Err(e) => e.response(),
    }
}

async fn filesystem(
    app: &App,
    sandbox: &Sandbox,
    method: &str,
    body: &[u8],
) -> Result<Value, ConnectError> {
    let c = |e: FsError| e.connect();
    match method {
        "Stat" => {
            let r: PathRequest = parse_message(body)?;
            let path = guest_path(&r.path).map_err(c)?;
            let place = open_place(app, sandbox, path.root).await.map_err(c)?;
            let dir = place.dir.clone();
            let entry = blocking(move || fs::stat(&dir, &path)).await.map_err(c)?;
            Ok(json!({"entry": entry.to_json()}))
        }
        "ListDir" => {
            let r: ListDirRequest = parse_message(body)?;
            let depth = uint32(r.depth.as_ref())?;
            if depth > MAX_DEPTH {
                return Err(ConnectError::new(
                    Code::InvalidArgument,
                    format!("depth is at most {MAX_DEPTH}"),
                ));
            }
            let path = guest_path(&r.path).map_err(c)?;
            let place = open_place(app, sandbox, path.root).await.map_err(c)?;
            let dir = place.dir.clone();
            let entries = blocking(move || fs::list(&dir, &path, depth.max(1), MAX_LIST))
                .await
                .map_err(c)?;
            let entries: Vec<Value> = entries.iter().map(fs::Entry::to_json).collect();
            Ok(json!({"entries": entries}))
        }
        "MakeDir" => {
            let r: PathRequest = parse_message(body)?;
            let path = guest_path(&r.path).map_err(c)?;
            let place = open_place(app, sandbox, path.root).await.map_err(c)?;
            let (dir, p) = (place.dir.clone(), path.clone());
            let entry = blocking(move || fs::make_dir(&dir, &p)).await.map_err(c)?;
            place.save(&[path]).await.map_err(c)?;
            Ok(json!({"entry": entry.to_json()}))
        }
        "Remove" => {
            let r: PathRequest = parse_message(body)?;
            let path = guest_path(&r.path).map_err(c)?;
            let place = open_place(app, sandbox, path.root).await.map_err(c)?;
            let dir = place.dir.clone();
            blocking(move || fs::remove(&dir, &path)).await.map_err(c)?;
            place.save(&[]).await.map_err(c)?;
            Ok(json!({}))
        }
        "Move" => {
            let r: MoveRequest = parse_message(body)?;
            let from = guest_path(&r.source).map_err(c)?;
            let to = guest_path(&r.destination).map_err(c)?;
            if from.root != to.root {
                return Err(ConnectError::new(
                    Code::InvalidArgument,
                    format!(
                        "{} and {} are in different places (/home/user is the sandbox's, \
                         /workspace is your encrypted workspace): read the file and write it \
                         there instead",
                        from.guest(),
                        to.guest()
                    ),
                ));
            }
            let place = open_place(app, sandbox, from.root).await.map_err(c)?;
            let (dir, f, t) = (place.dir.clone(), from.clone(), to.clone());
            let entry = blocking(move || fs::rename(&dir, &f, &t))
                .await
                .map_err(c)?;
            place.save(&[to]).await.map_err(c)?;
            Ok(json!({"entry": entry.to_json()}))
        }
        other => Err(unimplemented(&format!("filesystem.Filesystem/{other}"))),
    }
}

/// `process.Process/Start` and `Connect`: the request is checked (one JSON envelope), then
/// refused at the end of the stream with [`NO_SHELL`].
async fn process_stream(app: &Arc<App>, req: Request<Incoming>) -> Response<Body> {
    let refuse = |status: StatusCode, message: String| {
        let mut r = ConnectError::new(Code::InvalidArgument, message).response();
        *r.status_mut() = status;
        r
    };
    if req.method() != Method::POST {
        return refuse(
            StatusCode::METHOD_NOT_ALLOWED,
            "Connect calls are POST".into(),
        );
    }
    if !connect::is_json(req.headers().get(header::CONTENT_TYPE), true) {
        return refuse(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "only Connect's JSON codec is served: send Content-Type: application/connect+json"
                .into(),
        );
    }
    let body = match connect_body(app, req.into_body()).await {
        Ok(b) => b,
        Err(r) => return r,
    };
    let envelopes = match connect::parse_envelopes(&body, MAX_MESSAGE) {
        Ok(e) => e,
        Err(e) => return refuse(StatusCode::BAD_REQUEST, e.to_string()),
    };
    let [only] = envelopes.as_slice() else {
        return refuse(
            StatusCode::BAD_REQUEST,
            format!(
                "a server-streaming call carries one request message, not {}",
                envelopes.len()
            ),
        );
    };
    if !matches!(
        serde_json::from_slice::<Value>(&only.data),
        Ok(Value::Object(_))
    ) {
        return refuse(
            StatusCode::BAD_REQUEST,
            "the request message is not a JSON object".into(),
        );
    }
    connect::stream_response(&[], Some(&ConnectError::new(Code::Unimplemented, NO_SHELL)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn depth_is_a_proto3_uint32() {
        assert_eq!(uint32(None).unwrap(), 0);
        assert_eq!(uint32(Some(&json!(3))).unwrap(), 3);
        assert_eq!(uint32(Some(&json!("4"))).unwrap(), 4);
        for bad in [
            json!(-1),
            json!(1.5),
            json!("x"),
            json!([]),
            json!(1u64 << 40),
        ] {
            assert!(uint32(Some(&bad)).is_err(), "{bad}");
        }
    }

    #[test]
    fn messages_are_json_objects() {
        let r: PathRequest = parse_message(br#"{"path": "/home/user/a", "extra": 1}"#).unwrap();
        assert_eq!(r.path, "/home/user/a");
        for bad in [&b"[]"[..], b"\"x\"", b"{nope", b"", br#"{"path": 5}"#] {
            assert!(parse_message::<PathRequest>(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn paths_outside_are_denied_and_malformed_ones_invalid() {
        assert!(matches!(guest_path("/etc/passwd"), Err(FsError::Denied(_))));
        assert!(matches!(guest_path("a\0b"), Err(FsError::Invalid(_))));
        assert_eq!(guest_path("x").unwrap().guest(), "/home/user/x");
    }
}
