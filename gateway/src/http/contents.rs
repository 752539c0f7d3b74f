//! The Jupyter Contents API over the encrypted workspace, as JupyterLab and `jupyter_server`'s
//! clients use it: models with `name`, `path`, `type`, `created`, `last_modified`, `content`,
//! `format`, `mimetype`, `size`, `writable`; notebooks as JSON, files as text or base64,
//! folders as listings; untitled files, copies, renames, chunked uploads and checkpoints.
//!
//! Paths are decoded by the router and checked here by [`WsPath::parse`]: `..`, backslashes and
//! control characters are refused in any encoding, with a 400 that says why.

use std::sync::Arc;

use base64::Engine;
use bytes::Bytes;
use http::{HeaderValue, Method, Response, StatusCode, header};
use http_body_util::Full;
use serde::Deserialize;
use serde_json::{Value, json};

use super::{ApiError, json_response};
use crate::session::kernel::timestamp;
use crate::workspace::path::WsPath;
use crate::workspace::store::{Entry, Kind, StoreError};
use crate::workspace::{Space, WorkspaceError};

impl From<WorkspaceError> for ApiError {
    fn from(e: WorkspaceError) -> ApiError {
        match e {
            WorkspaceError::Store(StoreError::NotFound(p)) => {
                ApiError::NotFound(format!("No such file or directory: {p}"))
            }
            WorkspaceError::Store(StoreError::NoCheckpoint(p, id)) => {
                ApiError::NotFound(format!("No checkpoint {id} for {p}"))
            }
            WorkspaceError::Store(e @ (StoreError::Exists(_) | StoreError::Busy(_))) => {
                ApiError::Conflict(e.to_string())
            }
            WorkspaceError::Store(
                e @ (StoreError::NotADirectory(_)
                | StoreError::IsADirectory(_)
                | StoreError::IntoItself(_)
                | StoreError::Root),
            ) => ApiError::BadRequest(e.to_string()),
            WorkspaceError::Store(e @ StoreError::Quota(_)) => ApiError::Quota(e.to_string()),
            WorkspaceError::Store(e @ (StoreError::Tampered(_) | StoreError::IndexDamaged(_))) => {
                ApiError::Integrity(e.to_string())
            }
            // The folder is named relative to the data folder: host paths stay in the log.
            WorkspaceError::IndexDamaged {
                user, id, reason, ..
            } => ApiError::Integrity(format!(
                "the workspace of user {user:?} (workspaces/{id} in the gateway's data folder) \
                 cannot be opened: {reason}. None of its files can be found without its index, \
                 and nothing of it was deleted. The operator's way out: stop the gateway, then put \
                 back workspaces/{id} (index.sgw with its objects/) from a backup, or move it \
                 out of workspaces/ to start this workspace empty"
            )),
            WorkspaceError::Key(crate::workspace::keys::KeyError::Damaged { reason, .. }) => {
                ApiError::Integrity(format!(
                    "the gateway's workspace key file (keys.json in its data folder) is damaged: \
                     {reason}. No workspace can be opened without it (kernels still run). The \
                     operator's way out: stop the gateway, put keys.json back from a backup, and \
                     start it again"
                ))
            }
            WorkspaceError::Key(e @ crate::workspace::keys::KeyError::Locked) => {
                ApiError::Locked(e.to_string())
            }
            other => ApiError::Internal(other.to_string()),
        }
    }
}

fn parse_path(raw: &str) -> Result<WsPath, ApiError> {
    WsPath::parse(raw).map_err(|e| ApiError::BadRequest(e.to_string()))
}

/// Query parameters of `GET`.
#[derive(Debug, Default)]
pub struct GetQuery {
    content: bool,
    kind: Option<String>,
    format: Option<String>,
    hash: bool,
}

impl GetQuery {
    /// Parses `content`, `type`, `format` and `hash`.
    pub fn parse(query: Option<&str>) -> GetQuery {
        let mut q = GetQuery {
            content: true,
            ..GetQuery::default()
        };
        for (k, v) in crate::auth::form_pairs(query.unwrap_or_default()) {
            match k.as_str() {
                "content" => q.content = v != "0",
                "type" => q.kind = Some(v),
                "format" => q.format = Some(v),
                "hash" => q.hash = v == "1",
                _ => {}
            }
        }
        q
    }
}

/// A saved model (`PUT`).
#[derive(Debug, Deserialize)]
pub struct SaveModel {
    #[serde(rename = "type")]
    kind: Option<String>,
    format: Option<String>,
    content: Option<Value>,
    chunk: Option<i64>,
}

/// `POST` to a folder: a new untitled item, or a copy.
#[derive(Debug, Deserialize, Default)]
pub struct NewModel {
    #[serde(rename = "type")]
    kind: Option<String>,
    ext: Option<String>,
    copy_from: Option<String>,
}

/// `PATCH`: a rename.
#[derive(Debug, Deserialize)]
pub struct RenameModel {
    path: String,
}

fn kind_name(path: &WsPath, entry: &Entry) -> &'static str {
    match entry.kind {
        Kind::Dir => "directory",
        Kind::File if path.as_str().ends_with(".ipynb") => "notebook",
        Kind::File => "file",
    }
}

fn mimetype(path: &WsPath, text: bool) -> &'static str {
    let ext = path
        .name()
        .rsplit_once('.')
        .map(|(_, e)| e.to_ascii_lowercase())
        .unwrap_or_default();
    match ext.as_str() {
        "png" => "image/png",
        "jpg" | "jpeg" => "image/jpeg",
        "gif" => "image/gif",
        "svg" => "image/svg+xml",
        "pdf" => "application/pdf",
        "csv" => "text/csv",
        "json" => "application/json",
        "html" | "htm" => "text/html",
        "md" => "text/markdown",
        "py" => "text/x-python",
        _ if text => "text/plain",
        _ => "application/octet-stream",
    }
}

/// A model without content. A file whose stored copy failed its integrity check carries
/// `"damaged": true` (a field Jupyter's model does not have, so clients that do not know it
/// still see a valid model, under its own name, that they can delete or save over).
fn model(path: &WsPath, entry: &Entry, damaged: bool) -> Value {
    let kind = kind_name(path, entry);
    let mut m = json!({
        "name": path.name(),
        "path": path.as_str(),
        "type": kind,
        "writable": true,
        "created": timestamp(entry.created),
        "last_modified": timestamp(entry.modified),
        "size": if entry.kind == Kind::Dir { Value::Null } else { json!(entry.size) },
        "mimetype": Value::Null,
        "content": Value::Null,
        "format": Value::Null,
        "hash": Value::Null,
        "hash_algorithm": Value::Null,
    });
    if damaged {
        m["damaged"] = json!(true);
    }
    m
}

async fn get(space: &Arc<Space>, path: WsPath, q: GetQuery) -> Result<Value, ApiError> {
    let p = path.clone();
    let (entry, damaged) = space
        .read(move |s| Ok((s.stat(&p)?, s.is_damaged(&p))))
        .await?;
    let mut m = model(&path, &entry, damaged);
    let kind = kind_name(&path, &entry);
    if let Some(want) = q.kind.as_deref() {
        let ok = match want {
            "directory" => entry.kind == Kind::Dir,
            "notebook" | "file" => entry.kind == Kind::File,
            other => return Err(ApiError::BadRequest(format!("unknown type {other:?}"))),
        };
        if !ok {
            return Err(ApiError::BadRequest(format!("{path} is not a {want}")));
        }
    }
    let as_kind = match (q.kind.as_deref(), kind) {
        (Some("file"), "notebook") => "file",
        (_, k) => k,
    };
    m["type"] = json!(as_kind);
    if entry.kind == Kind::Dir {
        if q.content {
            let p = path.clone();
            let (children, damaged) = space.read(move |s| Ok((s.list(&p)?, s.damaged()))).await?;
            m["content"] = Value::Array(
                children
                    .iter()
                    .map(|(p, e)| model(p, e, damaged.contains(p)))
                    .collect(),
            );
            m["format"] = json!("json");
        }
        return Ok(m);
    }
    if !q.content && !q.hash {
        return Ok(m);
    }
    let p = path.clone();
    let (_, data) = space.read(move |s| s.read(&p)).await?;
    if q.hash {
        let d = ring::digest::digest(&ring::digest::SHA256, &data);
        m["hash"] = json!(hex::encode(d.as_ref()));
        m["hash_algorithm"] = json!("sha256");
    }
    if !q.content {
        return Ok(m);
    }
    if as_kind == "notebook" {
        let nb: Value = serde_json::from_slice(&data)
            .map_err(|e| ApiError::BadRequest(format!("Unreadable Notebook: {path}: {e}")))?;
        m["content"] = nb;
        m["format"] = json!("json");
        return Ok(m);
    }
    let text = std::str::from_utf8(&data).ok();
    match (q.format.as_deref(), text) {
        (Some("text"), None) => {
            return Err(ApiError::BadRequest(format!(
                "{path} is not UTF-8 encoded; ask for format=base64"
            )));
        }
        (Some("base64"), _) | (None, None) => {
            m["content"] = json!(base64::engine::general_purpose::STANDARD.encode(&data));
            m["format"] = json!("base64");
            m["mimetype"] = json!(mimetype(&path, false));
        }
        (Some("text") | None, Some(t)) => {
            m["content"] = json!(t);
            m["format"] = json!("text");
            m["mimetype"] = json!(mimetype(&path, true));
        }
        (Some(other), _) => return Err(ApiError::BadRequest(format!("unknown format {other:?}"))),
    }
    Ok(m)
}

/// The bytes a saved model stands for.
fn body_of(path: &WsPath, m: &SaveModel) -> Result<Vec<u8>, ApiError> {
    let content = m
        .content
        .as_ref()
        .ok_or_else(|| ApiError::BadRequest("a saved file needs `content`".into()))?;
    match m.kind.as_deref() {
        Some("notebook") => {
            if !content.is_object() || !content.get("cells").is_some_and(Value::is_array) {
                return Err(ApiError::BadRequest(format!(
                    "{path}: a notebook's content must be a notebook (an object with `cells`)"
                )));
            }
            let mut body = serde_json::to_vec_pretty(content).expect("JSON");
            body.push(b'\n');
            Ok(body)
        }
        Some("file") => {
            let text = content
                .as_str()
                .ok_or_else(|| ApiError::BadRequest("a file's content must be a string".into()))?;
            match m.format.as_deref() {
                Some("text") | None => Ok(text.as_bytes().to_vec()),
                Some("base64") => base64::engine::general_purpose::STANDARD
                    .decode(text.trim())
                    .map_err(|e| ApiError::BadRequest(format!("content is not valid base64: {e}"))),
                Some(other) => Err(ApiError::BadRequest(format!("unknown format {other:?}"))),
            }
        }
        other => Err(ApiError::BadRequest(format!(
            "cannot save a {other:?}: type must be notebook, file or directory"
        ))),
    }
}

fn created(m: Value) -> Response<Full<Bytes>> {
    let location = format!("/api/contents/{}", m["path"].as_str().unwrap_or_default());
    let mut r = json_response(StatusCode::CREATED, &m);
    if let Ok(v) = HeaderValue::from_str(&location.replace(' ', "%20")) {
        r.headers_mut().insert(header::LOCATION, v);
    }
    r
}

async fn put(
    space: &Arc<Space>,
    path: WsPath,
    m: SaveModel,
) -> Result<Response<Full<Bytes>>, ApiError> {
    if path.is_root() {
        return Err(ApiError::BadRequest(
            "the workspace root cannot be replaced".into(),
        ));
    }
    let existed = {
        let p = path.clone();
        space.read(move |s| Ok(s.exists(&p))).await?
    };
    if m.kind.as_deref() == Some("directory") {
        let entry = space.mkdir(path.clone()).await?;
        let out = model(&path, &entry, false);
        return Ok(if existed {
            json_response(StatusCode::OK, &out)
        } else {
            created(out)
        });
    }
    let mut data = body_of(&path, &m)?;
    let chunk = m.chunk.unwrap_or(0);
    if chunk != 0 && chunk != 1 {
        // A later chunk of an upload: append to what the earlier ones wrote.
        let p = path.clone();
        let (_, mut before) = space.read(move |s| s.read(&p)).await?;
        before.append(&mut data);
        data = before;
    }
    let entry = space.write(path.clone(), data, false).await?;
    let out = model(&path, &entry, false);
    Ok(if existed && chunk != 1 {
        json_response(StatusCode::OK, &out)
    } else {
        created(out)
    })
}

/// `a-Copy3` → `a`.
fn strip_copy_suffix(stem: &str) -> &str {
    match stem.rsplit_once("-Copy") {
        Some((base, n)) if !base.is_empty() && n.chars().all(|c| c.is_ascii_digit()) => base,
        _ => stem,
    }
}

/// A free name in `dir`: `{stem}{ext}`, else `{stem}{sep}{i}{ext}` for i = 1, 2, ..., as
/// Jupyter names untitled items and copies.
async fn free_name(
    space: &Arc<Space>,
    dir: &WsPath,
    stem: &str,
    sep: &str,
    ext: &str,
) -> Result<WsPath, ApiError> {
    for i in 0..10_000u32 {
        let name = if i == 0 {
            format!("{stem}{ext}")
        } else {
            format!("{stem}{sep}{i}{ext}")
        };
        let p = dir
            .join(&name)
            .map_err(|e| ApiError::BadRequest(e.to_string()))?;
        let q = p.clone();
        if !space.read(move |s| Ok(s.exists(&q))).await? {
            return Ok(p);
        }
    }
    Err(ApiError::Conflict(format!(
        "no free name for {stem}{ext} in {dir}"
    )))
}

fn empty_notebook() -> Value {
    json!({
        "cells": [],
        "metadata": {"kernelspec": {"name": crate::kernelspec::NAME, "display_name": crate::kernelspec::DISPLAY_NAME, "language": "python"}},
        "nbformat": 4,
        "nbformat_minor": 5,
    })
}

async fn post(
    space: &Arc<Space>,
    dir: WsPath,
    m: NewModel,
) -> Result<Response<Full<Bytes>>, ApiError> {
    let d = dir.clone();
    let entry = space.read(move |s| s.stat(&d)).await?;
    if entry.kind != Kind::Dir {
        return Err(ApiError::BadRequest(format!(
            "{dir} is not a directory: POST creates items inside a directory"
        )));
    }
    if let Some(from) = m.copy_from {
        let from = parse_path(&from)?;
        let f = from.clone();
        let (_, data) = space.read(move |s| s.read(&f)).await?;
        let name = from.name();
        let (stem, ext) = match name.rsplit_once('.') {
            Some((s, e)) if !s.is_empty() => (s, format!(".{e}")),
            _ => (name, String::new()),
        };
        // As Jupyter: "a.ipynb" if free, else "a-Copy1.ipynb", "a-Copy2.ipynb", ...
        let stem = strip_copy_suffix(stem);
        let target = free_name(space, &dir, stem, "-Copy", &ext).await?;
        let entry = space.write(target.clone(), data, false).await?;
        return Ok(created(model(&target, &entry, false)));
    }
    let (target, body) = match m.kind.as_deref().unwrap_or("file") {
        "notebook" => (
            free_name(space, &dir, "Untitled", "", ".ipynb").await?,
            Some(serde_json::to_vec_pretty(&empty_notebook()).expect("JSON")),
        ),
        "directory" => (
            free_name(space, &dir, "Untitled Folder", " ", "").await?,
            None,
        ),
        "file" => {
            let ext = m.ext.unwrap_or_else(|| ".txt".into());
            let ext = if ext.is_empty() || ext.starts_with('.') {
                ext
            } else {
                format!(".{ext}")
            };
            (
                free_name(space, &dir, "untitled", "", &ext).await?,
                Some(Vec::new()),
            )
        }
        other => return Err(ApiError::BadRequest(format!("cannot create a {other:?}"))),
    };
    let entry = match body {
        Some(b) => space.write(target.clone(), b, false).await?,
        None => space.mkdir(target.clone()).await?,
    };
    Ok(created(model(&target, &entry, false)))
}

/// Serves one Contents API request for `space`.
pub async fn handle(
    space: Arc<Space>,
    method: &Method,
    route: super::routes::Route,
    query: Option<&str>,
    body: Bytes,
) -> Result<Response<Full<Bytes>>, ApiError> {
    use super::routes::Route;
    // What running kernels wrote is saved first, so every answer reflects it.
    space.sync().await;
    match route {
        Route::Contents(raw) => {
            let path = parse_path(&raw)?;
            match *method {
                Method::GET => Ok(json_response(
                    StatusCode::OK,
                    &get(&space, path, GetQuery::parse(query)).await?,
                )),
                Method::PUT => put(&space, path, super::parse_json(&body)?).await,
                Method::POST => post(&space, path, super::parse_json(&body)?).await,
                Method::PATCH => {
                    let r: RenameModel = super::parse_json(&body)?;
                    let to = parse_path(&r.path)?;
                    let entry = space.rename(path, to.clone()).await?;
                    Ok(json_response(StatusCode::OK, &model(&to, &entry, false)))
                }
                _ => {
                    space.delete(path).await?;
                    Ok(super::empty(StatusCode::NO_CONTENT))
                }
            }
        }
        Route::Checkpoints(raw) => {
            let path = parse_path(&raw)?;
            if *method == Method::GET {
                let list = space.read(move |s| s.checkpoints(&path)).await?;
                let out: Vec<Value> = list
                    .iter()
                    .map(|c| json!({"id": c.id, "last_modified": timestamp(c.modified)}))
                    .collect();
                return Ok(json_response(StatusCode::OK, &Value::Array(out)));
            }
            let p = path.clone();
            let cp = space.read(move |s| s.create_checkpoint(&p)).await?;
            let mut r = json_response(
                StatusCode::CREATED,
                &json!({"id": cp.id, "last_modified": timestamp(cp.modified)}),
            );
            if let Ok(v) = HeaderValue::from_str(
                &format!("/api/contents/{path}/checkpoints/{}", cp.id).replace(' ', "%20"),
            ) {
                r.headers_mut().insert(header::LOCATION, v);
            }
            Ok(r)
        }
        Route::Checkpoint(raw, id) => {
            let path = parse_path(&raw)?;
            if *method == Method::POST {
                let p = path.clone();
                let i = id.clone();
                let data = space.read(move |s| s.read_checkpoint(&p, &i)).await?;
                // Written through the workspace, so running kernels see it too.
                space.write(path, data, false).await?;
            } else {
                space.read(move |s| s.delete_checkpoint(&path, &id)).await?;
            }
            Ok(super::empty(StatusCode::NO_CONTENT))
        }
        _ => Err(ApiError::NotFound("not a contents route".into())),
    }
}
