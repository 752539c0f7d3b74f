//! What ran, kept: every kernel's executed cells and their outputs are appended to a history
//! notebook in its owner's workspace (`history/<kernel id>.ipynb`), and every image a cell
//! displays is also saved as a file (`outputs/<kernel id>/<execution count>-<n>.png`, or `.jpg`
//! or `.svg` for a chart in those formats). Agents that drive kernels over the plain API get a
//! notebook of what they ran; charts survive the kernel.
//!
//! The recorder watches the kernel's messages as the gateway relays them (it never talks to the
//! kernel), and writes after each cell; it also triggers the sync of the live folder, so files a
//! cell wrote are stored as soon as the cell ends.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use base64::Engine;
use serde_json::{Value, json};

use super::Workspaces;
use super::path::WsPath;
use crate::envelope::{Channel, ExecState, KernelMessage, MsgType};
use crate::session::{Before, Kernel, Observer};

/// Cells a history notebook keeps (the oldest are dropped past it).
pub const HISTORY_CELLS: usize = 500;
/// Output bytes one recorded cell keeps (the rest is noted as cut).
pub const CELL_OUTPUT_BYTES: usize = 4 << 20;
/// The least time between two writes of one kernel's history notebook (see `spawn_append`).
pub const HISTORY_WRITE_PAUSE: std::time::Duration = std::time::Duration::from_millis(200);

#[derive(Default)]
struct Cell {
    code: String,
    count: Option<u64>,
    outputs: Vec<Value>,
    bytes: usize,
    cut: bool,
    images: u32,
}

#[derive(Default)]
struct Recorder {
    cells: HashMap<String, Cell>,
}

/// Records outputs and history into workspaces; plugged into the session layer.
pub struct HistoryObserver {
    workspaces: Arc<Workspaces>,
    recorders: Mutex<HashMap<uuid::Uuid, Recorder>>,
    /// Writes in flight, awaited by [`HistoryObserver::flush`] at shutdown.
    tasks: Mutex<tokio::task::JoinSet<()>>,
    /// The last cells of each kernel, as text (code, outputs), for `%%ask`'s context.
    recent: Mutex<HashMap<uuid::Uuid, std::collections::VecDeque<(String, String)>>>,
    /// Cells waiting to be appended to each kernel's history notebook, and whether a writer runs.
    pending: Arc<Mutex<HashMap<uuid::Uuid, Pending>>>,
}

/// A kernel's cells waiting for its history notebook, and whether a writer is running.
type Pending = (Vec<Value>, bool);

/// Cells of each kernel kept as text for `%%ask`'s context.
pub const RECENT_CELLS: usize = 10;
/// Characters of one cell's outputs kept for context.
pub const RECENT_OUTPUT_CHARS: usize = 1500;

/// An nbformat output as plain text, for a model to read.
fn output_text(o: &Value) -> String {
    match o["output_type"].as_str() {
        Some("stream") => o["text"].as_str().unwrap_or_default().to_owned(),
        Some("error") => format!(
            "{}: {}",
            o["ename"].as_str().unwrap_or_default(),
            o["evalue"].as_str().unwrap_or_default()
        ),
        _ => o["data"]["text/plain"]
            .as_str()
            .unwrap_or_default()
            .to_owned(),
    }
}

impl HistoryObserver {
    /// A recorder writing into `workspaces`.
    pub fn new(workspaces: Arc<Workspaces>) -> HistoryObserver {
        HistoryObserver {
            workspaces,
            recorders: Mutex::default(),
            tasks: Mutex::default(),
            recent: Mutex::default(),
            pending: Arc::default(),
        }
    }

    fn spawn(&self, task: impl std::future::Future<Output = ()> + Send + 'static) {
        let mut tasks = self.tasks.lock().unwrap_or_else(|e| e.into_inner());
        while tasks.try_join_next().is_some() {}
        tasks.spawn(task);
    }

    /// Waits for every write in flight (at shutdown, before the workspaces close).
    pub async fn flush(&self) {
        let mut tasks = std::mem::take(&mut *self.tasks.lock().unwrap_or_else(|e| e.into_inner()));
        while tasks.join_next().await.is_some() {}
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<uuid::Uuid, Recorder>> {
        self.recorders.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn spawn_save_image(&self, kernel: &Kernel, count: Option<u64>, n: u32, image: Image) {
        let workspaces = self.workspaces.clone();
        let owner = kernel.owner.clone();
        let name = format!(
            "outputs/{}/{}-{n}.{}",
            kernel.id,
            count.map_or_else(|| "x".to_owned(), |c| c.to_string()),
            image.extension
        );
        self.spawn(async move {
            let bytes = if image.base64 {
                let Ok(bytes) = base64::engine::general_purpose::STANDARD.decode(image.data.trim())
                else {
                    return;
                };
                bytes
            } else {
                image.data.into_bytes()
            };
            let (Ok(space), Ok(path)) = (workspaces.space(&owner).await, WsPath::parse(&name))
            else {
                return;
            };
            if let Err(e) = space.write_stored(path, bytes).await {
                tracing::warn!(error = %e, file = %name, "cannot save a displayed image");
            }
        });
    }

    /// The last cells `kernel` ran, oldest first, as (code, outputs) text.
    pub fn recent(&self, kernel: uuid::Uuid) -> Vec<(String, String)> {
        self.recent
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&kernel)
            .map(|d| d.iter().cloned().collect())
            .unwrap_or_default()
    }

    fn spawn_append(&self, kernel: &Kernel, cell: Cell) {
        {
            let mut text: String = cell
                .outputs
                .iter()
                .map(output_text)
                .collect::<Vec<_>>()
                .join("\n");
            if text.len() > RECENT_OUTPUT_CHARS {
                let mut cut = RECENT_OUTPUT_CHARS;
                while !text.is_char_boundary(cut) {
                    cut -= 1;
                }
                text.truncate(cut);
                text.push_str(" …");
            }
            let mut recent = self.recent.lock().unwrap_or_else(|e| e.into_inner());
            let cells = recent.entry(kernel.id).or_default();
            cells.push_back((cell.code.clone(), text));
            while cells.len() > RECENT_CELLS {
                cells.pop_front();
            }
        }
        let mut source = cell.code;
        if cell.cut {
            source.push_str("\n# [sandgate] this cell's recorded output was cut at 4 MiB");
        }
        let record = json!({
            "cell_type": "code",
            "execution_count": cell.count,
            "metadata": {"sandgate": {"recorded": crate::session::kernel::timestamp(chrono::Utc::now())}},
            "outputs": cell.outputs,
            "source": source,
        });
        // Cells that end while the notebook is being written join the next write: one writer
        // per kernel at a time, however fast cells come.
        {
            let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
            let (cells, writing) = pending.entry(kernel.id).or_default();
            cells.push(record);
            if *writing {
                return;
            }
            *writing = true;
        }
        let pending = self.pending_handle();
        let workspaces = self.workspaces.clone();
        let owner = kernel.owner.clone();
        let id = kernel.id;
        let name = format!("history/{id}.ipynb");
        self.spawn(async move {
            loop {
                let batch: Vec<Value> = {
                    let mut p = pending.lock().unwrap_or_else(|e| e.into_inner());
                    let Some((cells, writing)) = p.get_mut(&id) else {
                        return;
                    };
                    if cells.is_empty() {
                        *writing = false;
                        return;
                    }
                    std::mem::take(cells)
                };
                let (Ok(space), Ok(path)) = (workspaces.space(&owner).await, WsPath::parse(&name))
                else {
                    continue;
                };
                // The notebook is read, extended and serialised on a blocking thread: a long
                // history is milliseconds of JSON, which must not hold up a runtime worker (the
                // relay's tasks run there).
                let p = path.clone();
                let body = space
                    .read(move |s| {
                        let existing = if s.exists(&p) {
                            s.read(&p).ok().map(|(_, d)| d)
                        } else {
                            None
                        };
                        let mut nb = existing
                            .and_then(|bytes| serde_json::from_slice::<Value>(&bytes).ok())
                            .unwrap_or_else(empty_notebook);
                        if let Some(cells) = nb["cells"].as_array_mut() {
                            cells.extend(batch);
                            let extra = cells.len().saturating_sub(HISTORY_CELLS);
                            cells.drain(..extra);
                        }
                        Ok(serde_json::to_vec_pretty(&nb).expect("JSON"))
                    })
                    .await;
                let written = match body {
                    Ok(body) => space.write_stored(path, body).await.map(|_| ()),
                    Err(e) => Err(e),
                };
                if let Err(e) = written {
                    tracing::warn!(error = %e, file = %name, "cannot append to a history notebook");
                }
                // Each write rewrites the whole notebook: cells that end during it or during
                // this pause join the next one, so cells run in a row (a notebook's Run All, an
                // agent's loop) cost one write per pause, not one each. A lone cell is written
                // at once.
                tokio::time::sleep(HISTORY_WRITE_PAUSE).await;
            }
        });
    }

    fn pending_handle(&self) -> Arc<Mutex<HashMap<uuid::Uuid, Pending>>> {
        self.pending.clone()
    }

    /// Saves the files a cell wrote; what could not be saved is told to the user under the
    /// cell (`parent` is the cell's request header), before its reply is relayed.
    fn sync_before_reply(&self, kernel: &Arc<Kernel>, parent: bytes::Bytes) -> Before {
        let workspaces = self.workspaces.clone();
        let kernel = kernel.clone();
        Box::pin(async move {
            let Ok(space) = workspaces.space(&kernel.owner).await else {
                return;
            };
            let report = space.sync().await;
            if report.refused.is_empty() {
                return;
            }
            let mut text = String::from("[sandgate] some files in /workspace were not saved:\n");
            for (path, why) in report.refused.iter().take(20) {
                text.push_str(&format!("  {path}: {why}\n"));
            }
            if report.refused.len() > 20 {
                text.push_str(&format!("  ... and {} more\n", report.refused.len() - 20));
            }
            kernel.publish_stream(parent, "stderr", &text).await;
        })
    }

    fn spawn_sync(&self, kernel: &Kernel) {
        let workspaces = self.workspaces.clone();
        let owner = kernel.owner.clone();
        self.spawn(async move {
            if let Ok(space) = workspaces.space(&owner).await {
                space.sync().await;
            }
        });
    }
}

fn empty_notebook() -> Value {
    json!({
        "cells": [],
        "metadata": {
            "kernelspec": {"name": crate::kernelspec::NAME, "display_name": crate::kernelspec::DISPLAY_NAME, "language": "python"},
            "language_info": {"name": "python"},
        },
        "nbformat": 4,
        "nbformat_minor": 5,
    })
}

/// The image a displayed output carries, as the file it is saved as: the first of PNG, JPEG
/// and SVG in the bundle (the inline backend's `figure_format` picks which a chart has).
struct Image {
    extension: &'static str,
    data: String,
    /// PNG and JPEG travel base64-encoded; SVG is text.
    base64: bool,
}

impl Image {
    fn of(data: &Value) -> Option<Self> {
        [
            ("image/png", "png", true),
            ("image/jpeg", "jpg", true),
            ("image/svg+xml", "svg", false),
        ]
        .into_iter()
        .find_map(|(mime, extension, base64)| {
            data[mime].as_str().map(|text| Image {
                extension,
                data: text.to_owned(),
                base64,
            })
        })
    }
}

/// An iopub message as an nbformat output, if it is one.
fn as_output(msg_type: &str, content: &Value) -> Option<Value> {
    Some(match msg_type {
        "stream" => {
            json!({"output_type": "stream", "name": content["name"], "text": content["text"]})
        }
        "display_data" => {
            json!({"output_type": "display_data", "data": content["data"], "metadata": content.get("metadata").cloned().unwrap_or(json!({}))})
        }
        "execute_result" => {
            json!({"output_type": "execute_result", "data": content["data"], "metadata": content.get("metadata").cloned().unwrap_or(json!({})), "execution_count": content["execution_count"]})
        }
        "error" => {
            json!({"output_type": "error", "ename": content["ename"], "evalue": content["evalue"], "traceback": content["traceback"]})
        }
        _ => return None,
    })
}

impl Observer for HistoryObserver {
    fn message(&self, kernel: &Arc<Kernel>, message: &KernelMessage) -> Option<Before> {
        match (message.channel, &message.envelope.msg_type) {
            (Channel::Shell, MsgType::ExecuteReply) => {
                Some(self.sync_before_reply(kernel, message.raw.parent_header.clone()))
            }
            (Channel::Iopub, _) => {
                self.record(kernel, message);
                None
            }
            _ => None,
        }
    }

    fn kernel_ended(&self, kernel: &Arc<Kernel>) {
        self.lock().remove(&kernel.id);
        self.recent
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&kernel.id);
        self.spawn_sync(kernel);
    }
}

impl HistoryObserver {
    /// Adds an iopub message to the cell it belongs to; a cell is written out when it ends.
    /// Its envelope says which cell and what it is: only an output of a recorded cell (or the
    /// input that starts one) has its content read.
    fn record(&self, kernel: &Arc<Kernel>, message: &KernelMessage) {
        let envelope = &message.envelope;
        let Some(parent) = envelope.parent.msg_id.as_deref() else {
            return;
        };
        let content = || serde_json::from_slice::<Value>(&message.raw.content).ok();
        match &envelope.msg_type {
            MsgType::Status => {
                if envelope.state != Some(ExecState::Idle) {
                    return;
                }
                let cell = self
                    .lock()
                    .get_mut(&kernel.id)
                    .and_then(|r| r.cells.remove(parent));
                if let Some(cell) = cell {
                    self.spawn_append(kernel, cell);
                }
            }
            MsgType::ExecuteInput => {
                let Some(content) = content() else {
                    return;
                };
                self.lock().entry(kernel.id).or_default().cells.insert(
                    parent.to_owned(),
                    Cell {
                        code: content["code"].as_str().unwrap_or_default().to_owned(),
                        count: content["execution_count"].as_u64(),
                        ..Cell::default()
                    },
                );
            }
            MsgType::ClearOutput => {
                let mut recorders = self.lock();
                if let Some(cell) = recorders
                    .get_mut(&kernel.id)
                    .and_then(|r| r.cells.get_mut(parent))
                {
                    cell.outputs.clear();
                    cell.bytes = 0;
                }
            }
            MsgType::Stream | MsgType::DisplayData | MsgType::ExecuteResult | MsgType::Error => {
                let recorded = self
                    .lock()
                    .get(&kernel.id)
                    .is_some_and(|r| r.cells.contains_key(parent));
                if !recorded {
                    return;
                }
                // Read outside the lock (a display can be megabytes).
                let Some(content) = content() else {
                    return;
                };
                let other = envelope.msg_type.as_str();
                let mut recorders = self.lock();
                let Some(cell) = recorders
                    .get_mut(&kernel.id)
                    .and_then(|r| r.cells.get_mut(parent))
                else {
                    return;
                };
                let image = Image::of(&content["data"]);
                let (count, n) = (cell.count, cell.images);
                if image.is_some() {
                    cell.images += 1;
                }
                if let Some(output) = as_output(other, &content) {
                    let size = message.raw.content.len();
                    if cell.bytes + size > CELL_OUTPUT_BYTES {
                        cell.cut = true;
                    } else if other == "stream"
                        && let Some(last) = cell.outputs.last_mut()
                        && last["output_type"] == "stream"
                        && last["name"] == output["name"]
                    {
                        let text = format!(
                            "{}{}",
                            last["text"].as_str().unwrap_or_default(),
                            output["text"].as_str().unwrap_or_default()
                        );
                        last["text"] = Value::String(text);
                        cell.bytes += size;
                    } else {
                        cell.outputs.push(output);
                        cell.bytes += size;
                    }
                }
                drop(recorders);
                if let Some(image) = image {
                    self.spawn_save_image(kernel, count, n + 1, image);
                }
            }
            _ => {}
        }
    }
}
