//! Tokens spent by `%%ask`: per call (shown after each ask), per kernel and per workspace
//! (`GET /api/ask/usage`), and the workspace budget that refuses further calls once spent.
//! Workspace totals persist in `DATA_DIR/ask-usage.json` (counts only), so a restart does not
//! reset a budget.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Mutex;

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

/// Tokens in and out, and calls.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Totals {
    /// Prompt tokens.
    pub input: u64,
    /// Completion tokens.
    pub output: u64,
    /// Model calls.
    pub calls: u64,
}

impl Totals {
    fn add(&mut self, input: u64, output: u64) {
        self.input += input;
        self.output += output;
        self.calls += 1;
    }

    fn json(&self) -> Value {
        json!({"input_tokens": self.input, "output_tokens": self.output, "calls": self.calls})
    }
}

#[derive(Default)]
struct State {
    workspaces: HashMap<String, Totals>,
    kernels: HashMap<uuid::Uuid, Totals>,
}

/// The usage ledger.
pub struct Usage {
    file: PathBuf,
    budget: u64,
    state: Mutex<State>,
}

impl Usage {
    /// Opens the ledger at `file` (missing or unreadable: start from zero, with a warning).
    pub fn open(file: PathBuf, budget: u64) -> Usage {
        let workspaces = match std::fs::read(&file) {
            Ok(b) => serde_json::from_slice(&b).unwrap_or_else(|e| {
                tracing::warn!(file = %file.display(), error = %e, "the ask usage file is unreadable; counting from zero");
                HashMap::new()
            }),
            Err(_) => HashMap::new(),
        };
        Usage {
            file,
            budget,
            state: Mutex::new(State {
                workspaces,
                kernels: HashMap::new(),
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Refuses when `owner`'s workspace has spent its budget.
    pub fn check_budget(&self, owner: &str) -> Result<(), String> {
        if self.budget == 0 {
            return Ok(());
        }
        let t = self
            .lock()
            .workspaces
            .get(owner)
            .copied()
            .unwrap_or_default();
        let spent = t.input + t.output;
        if spent >= self.budget {
            return Err(format!(
                "the %%ask budget of this workspace is spent: {spent} of {} tokens used; the \
                 operator can raise ask.budget_tokens",
                self.budget
            ));
        }
        Ok(())
    }

    /// Counts one call.
    pub fn record(&self, owner: &str, kernel: uuid::Uuid, input: u64, output: u64) {
        let snapshot = {
            let mut s = self.lock();
            s.workspaces
                .entry(owner.to_owned())
                .or_default()
                .add(input, output);
            s.kernels.entry(kernel).or_default().add(input, output);
            serde_json::to_vec_pretty(&s.workspaces).expect("JSON")
        };
        let tmp = self.file.with_extension("json.tmp");
        if let Err(e) =
            std::fs::write(&tmp, snapshot).and_then(|()| std::fs::rename(&tmp, &self.file))
        {
            tracing::warn!(error = %e, "cannot save the ask usage");
        }
    }

    /// A kernel's totals.
    pub fn kernel_totals(&self, kernel: uuid::Uuid) -> Totals {
        self.lock()
            .kernels
            .get(&kernel)
            .copied()
            .unwrap_or_default()
    }

    /// A workspace's totals.
    pub fn workspace_totals(&self, owner: &str) -> Totals {
        self.lock()
            .workspaces
            .get(owner)
            .copied()
            .unwrap_or_default()
    }

    /// `GET /api/ask/usage` for `owner`, with the kernels it can see.
    pub fn report(&self, owner: &str, kernels: &[uuid::Uuid]) -> Value {
        let s = self.lock();
        let per_kernel: serde_json::Map<String, Value> = kernels
            .iter()
            .map(|k| {
                (
                    k.to_string(),
                    s.kernels.get(k).copied().unwrap_or_default().json(),
                )
            })
            .collect();
        json!({
            "workspace": s.workspaces.get(owner).copied().unwrap_or_default().json(),
            "budget_tokens": self.budget,
            "kernels": per_kernel,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn budget_refuses_once_spent_and_survives_reopening() {
        let file =
            std::env::temp_dir().join(format!("sandgate-usage-{}.json", uuid::Uuid::new_v4()));
        let k = uuid::Uuid::new_v4();
        let u = Usage::open(file.clone(), 100);
        u.check_budget("me").unwrap();
        u.record("me", k, 60, 30);
        u.check_budget("me").unwrap();
        u.record("me", k, 10, 5);
        assert!(u.check_budget("me").unwrap_err().contains("105 of 100"));
        assert_eq!(u.kernel_totals(k).calls, 2);
        let again = Usage::open(file.clone(), 100);
        assert!(again.check_budget("me").is_err());
        assert!(again.check_budget("someone else").is_ok());
        let _ = std::fs::remove_file(file);
    }
}
