//! `/api/sessions`: notebook ↔ kernel associations, kept in memory as Jupyter Server keeps them
//! (it uses an in-memory SQLite). A JupyterLab started with `--gateway-url` keeps its sessions
//! on its own server; this store serves clients that talk to Sandgate directly.

use std::collections::HashMap;
use std::sync::Mutex;

use serde::Deserialize;
use serde_json::{Value, json};

use super::ApiError;
use crate::session::{Kernels, SessionError};

/// The kernel part of a session request.
#[derive(Debug, Deserialize, Default)]
pub struct KernelRef {
    /// An existing kernel to attach.
    #[serde(default)]
    pub id: Option<String>,
    /// Or the kernelspec to start one with.
    #[serde(default)]
    pub name: Option<String>,
}

/// A session as clients send it: `POST /api/sessions` (a `path` is required) and
/// `PATCH /api/sessions/{id}` (any subset of the fields).
#[derive(Debug, Deserialize)]
pub struct SessionModel {
    /// The notebook's path.
    #[serde(default)]
    pub path: Option<String>,
    /// Its name.
    #[serde(default)]
    pub name: Option<String>,
    /// `notebook`, `console` or `file`.
    #[serde(default, rename = "type")]
    pub kind: Option<String>,
    /// An existing kernel (by id) or a new one (by name).
    #[serde(default)]
    pub kernel: Option<KernelRef>,
}

#[derive(Debug, Clone)]
struct Record {
    id: String,
    owner: String,
    path: String,
    name: String,
    kind: String,
    kernel_id: String,
}

/// The sessions.
#[derive(Default)]
pub struct Sessions {
    map: Mutex<HashMap<String, Record>>,
}

impl Sessions {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Record>> {
        self.map.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The model of `r`, or `None` if its kernel is gone (the session is then dropped, as
    /// Jupyter Server drops sessions whose kernel was culled).
    fn model(&self, kernels: &Kernels, r: &Record) -> Option<Value> {
        let kernel = kernels.get(&r.owner, &r.kernel_id).ok()?;
        let mut m = json!({
            "id": r.id,
            "path": r.path,
            "name": r.name,
            "type": r.kind,
            "kernel": kernel.model(),
        });
        if r.kind == "notebook" {
            m["notebook"] = json!({"path": r.path, "name": r.name});
        }
        Some(m)
    }

    /// `GET /api/sessions`.
    pub fn list(&self, kernels: &Kernels, owner: &str) -> Value {
        let records: Vec<Record> = self
            .lock()
            .values()
            .filter(|r| r.owner == owner)
            .cloned()
            .collect();
        let mut out = Vec::new();
        for r in records {
            match self.model(kernels, &r) {
                Some(m) => out.push(m),
                None => {
                    self.lock().remove(&r.id);
                }
            }
        }
        Value::Array(out)
    }

    fn record(&self, owner: &str, id: &str) -> Result<Record, ApiError> {
        self.lock()
            .get(id)
            .filter(|r| r.owner == owner)
            .cloned()
            .ok_or_else(|| ApiError::NotFound(format!("Session not found: {id}")))
    }

    /// `GET /api/sessions/{id}`.
    pub fn get(&self, kernels: &Kernels, owner: &str, id: &str) -> Result<Value, ApiError> {
        let r = self.record(owner, id)?;
        self.model(kernels, &r).ok_or_else(|| {
            self.lock().remove(id);
            ApiError::NotFound(format!("Session not found: {id}"))
        })
    }

    async fn kernel_for(
        &self,
        kernels: &Kernels,
        owner: &str,
        k: Option<KernelRef>,
    ) -> Result<String, ApiError> {
        let k = k.unwrap_or_default();
        if let Some(id) = k.id {
            return Ok(kernels.get(owner, &id)?.id.to_string());
        }
        let name = k.name.unwrap_or_else(|| crate::kernelspec::NAME.to_owned());
        Ok(kernels.start(owner, &name).await?.id.to_string())
    }

    /// `POST /api/sessions`: reuses the session of the same path, else makes one (starting a
    /// kernel unless an existing one is named).
    pub async fn create(
        &self,
        kernels: &Kernels,
        owner: &str,
        req: SessionModel,
    ) -> Result<Value, ApiError> {
        let path = req
            .path
            .ok_or_else(|| ApiError::BadRequest("a session needs a path".into()))?;
        let existing = self
            .lock()
            .values()
            .find(|r| r.owner == owner && r.path == path)
            .cloned();
        if let Some(r) = existing
            && let Some(m) = self.model(kernels, &r)
        {
            return Ok(m);
        }
        let kernel_id = self.kernel_for(kernels, owner, req.kernel).await?;
        let record = Record {
            id: uuid::Uuid::new_v4().to_string(),
            owner: owner.to_owned(),
            name: req
                .name
                .unwrap_or_else(|| path.rsplit('/').next().unwrap_or_default().to_owned()),
            path,
            kind: req.kind.unwrap_or_else(|| "notebook".into()),
            kernel_id,
        };
        self.lock().insert(record.id.clone(), record.clone());
        self.model(kernels, &record)
            .ok_or_else(|| ApiError::Session(SessionError::NotFound(record.kernel_id.clone())))
    }

    /// `PATCH /api/sessions/{id}`.
    pub async fn update(
        &self,
        kernels: &Kernels,
        owner: &str,
        id: &str,
        patch: SessionModel,
    ) -> Result<Value, ApiError> {
        let mut r = self.record(owner, id)?;
        if let Some(p) = patch.path {
            r.path = p;
        }
        if let Some(n) = patch.name {
            r.name = n;
        }
        if let Some(t) = patch.kind {
            r.kind = t;
        }
        if let Some(k) = patch.kernel {
            let changes_kernel = k.id.as_deref() != Some(r.kernel_id.as_str());
            if changes_kernel {
                let old = r.kernel_id.clone();
                r.kernel_id = self.kernel_for(kernels, owner, Some(k)).await?;
                // As Jupyter Server: a session that moves to a new kernel shuts the old one down.
                if old != r.kernel_id {
                    let _ = kernels.shutdown(owner, &old).await;
                }
            }
        }
        self.lock().insert(r.id.clone(), r.clone());
        self.get(kernels, owner, id)
    }

    /// `DELETE /api/sessions/{id}`: removes it and shuts its kernel down.
    pub async fn delete(&self, kernels: &Kernels, owner: &str, id: &str) -> Result<(), ApiError> {
        let r = self.record(owner, id)?;
        self.lock().remove(id);
        match kernels.shutdown(owner, &r.kernel_id).await {
            Ok(()) | Err(SessionError::NotFound(_)) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// Drops sessions of a kernel that was shut down.
    pub fn forget_kernel(&self, kernel_id: &str) {
        self.lock().retain(|_, r| r.kernel_id != kernel_id);
    }
}
