//! `%%ask`: a cell magic served by the gateway that turns a prompt into code, shows the code as
//! it streams in, runs it in the kernel's sandbox, and offers it as a new cell.
//!
//! - [`provider`]: the OpenAI-compatible and Anthropic clients (streaming, retries, timeouts).
//! - [`prompt`]: the magic's syntax, and the prompt with its context (recent cells, variables,
//!   files, packages), size-capped and without secrets.
//! - [`usage`]: tokens per call, per kernel and per workspace, and the budget.
//!
//! The model's API key stays in the gateway: it is read from the gateway's environment or from
//! `DATA_DIR/secrets.json` (sealed under the workspace master key), sent only in the request's
//! auth header, masked in any error text, and never enters a kernel process or its sandbox.
//! The generated code runs like any cell: in the sandbox, under its limits, interruptible.

pub mod prompt;
pub mod provider;
pub mod usage;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use serde_json::{Value, json};

use crate::config::AskConfig;
use crate::session::{ClientRequest, Kernel, ShellHook};
use crate::workspace::Workspaces;
use crate::workspace::history::HistoryObserver;
use prompt::{Command, Options};
use provider::{Chat, Provider, ProviderError, Turn};

/// How long the kernel may take to describe its variables.
const DESCRIBE_TIMEOUT: Duration = Duration::from_secs(30);

/// Serves `%%ask` cells.
pub struct Asker {
    config: AskConfig,
    providers: HashMap<String, Provider>,
    models: HashMap<String, Vec<String>>,
    client: provider::HttpsClient,
    usage: usage::Usage,
    workspaces: Arc<Workspaces>,
    history: Arc<HistoryObserver>,
    /// How long generated code may run (the sandbox's cell limit plus a margin).
    run_timeout: Duration,
}

impl std::fmt::Debug for Asker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Asker")
            .field("providers", &self.providers.keys())
            .finish()
    }
}

/// How an ask ended, for the reply.
enum Ending {
    Ok {
        code: Option<String>,
    },
    Error {
        ename: String,
        evalue: String,
        code: Option<String>,
        /// The kernel already published this error (it came from running the code).
        shown: bool,
    },
}

impl Asker {
    /// An asker with these providers; `env_keys` are the keys read from the environment by
    /// `main.rs`, by provider name.
    pub fn new(
        config: AskConfig,
        env_keys: HashMap<String, String>,
        usage_file: std::path::PathBuf,
        workspaces: Arc<Workspaces>,
        history: Arc<HistoryObserver>,
        cell_timeout: Option<Duration>,
    ) -> Asker {
        let mut providers = HashMap::new();
        let mut models = HashMap::new();
        for p in &config.providers {
            providers.insert(
                p.name.clone(),
                Provider {
                    name: p.name.clone(),
                    kind: p.kind,
                    base_url: p.base_url.clone(),
                    key: env_keys.get(&p.name).cloned(),
                    needs_key: p.needs_key,
                    timeout: Duration::from_secs(config.timeout_s),
                    idle_timeout: Duration::from_secs(config.idle_timeout_s),
                    attempts: config.attempts.max(1),
                },
            );
            models.insert(p.name.clone(), p.models.clone());
        }
        Asker {
            usage: usage::Usage::open(usage_file, config.budget_tokens),
            config,
            providers,
            models,
            client: provider::http_client(),
            workspaces,
            history,
            run_timeout: cell_timeout.map_or(Duration::from_secs(24 * 3600), |t| {
                t + Duration::from_secs(60)
            }),
        }
    }

    /// The usage numbers (`GET /api/ask/usage`).
    pub fn usage_report(&self, owner: &str, kernels: &[uuid::Uuid]) -> Value {
        self.usage.report(owner, kernels)
    }

    /// The provider for a cell, with its key: the environment's, else the sealed one.
    fn provider(&self, name: &str) -> Result<Provider, String> {
        let mut p = self.providers.get(name).cloned().ok_or_else(|| {
            let mut names: Vec<&String> = self.providers.keys().collect();
            names.sort();
            format!("no provider {name:?}; configured: {names:?}")
        })?;
        if p.key.is_none() {
            p.key = self.workspaces.secret(&format!("provider:{name}"));
        }
        Ok(p)
    }

    fn models_text(&self) -> String {
        let mut names: Vec<&String> = self.models.keys().collect();
        names.sort();
        let mut out = String::from("Models for %%ask (--provider NAME --model MODEL):\n");
        for name in names {
            let default = if *name == self.config.default_provider {
                " (default)"
            } else {
                ""
            };
            out.push_str(&format!(
                "  {name}{default}: {}\n",
                self.models[name].join(", ")
            ));
        }
        out
    }

    async fn serve_request(&self, kernel: Arc<Kernel>, request: ClientRequest) -> bool {
        let parent = request.header.clone();
        let code = request.content["code"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        let silent = request.content["silent"].as_bool().unwrap_or(false);
        kernel
            .publish(&parent, "status", json!({"execution_state": "busy"}))
            .await;
        if !silent {
            let count = kernel.last_execution_count() + 1;
            kernel
                .publish(
                    &parent,
                    "execute_input",
                    json!({"code": code, "execution_count": count}),
                )
                .await;
        }
        let ending = match prompt::parse(&code) {
            Err(usage_error) => Ending::Error {
                ename: "UsageError".into(),
                evalue: usage_error,
                code: None,
                shown: false,
            },
            Ok(Command::Help) => {
                stream(&kernel, &parent, "stdout", prompt::USAGE).await;
                Ending::Ok { code: None }
            }
            Ok(Command::Models) => {
                stream(&kernel, &parent, "stdout", &self.models_text()).await;
                Ending::Ok { code: None }
            }
            Ok(Command::Ask(options)) => self.ask(&kernel, &parent, options).await,
        };
        let failed = matches!(ending, Ending::Error { .. });
        let mut reply = json!({
            "execution_count": kernel.last_execution_count(),
            "user_expressions": {},
            "payload": [],
        });
        let generated = match ending {
            Ending::Ok { code } => {
                reply["status"] = json!("ok");
                code
            }
            Ending::Error {
                ename,
                evalue,
                code,
                shown,
            } => {
                let error = json!({"ename": ename, "evalue": evalue, "traceback": [format!("{ename}: {evalue}")]});
                if !shown {
                    kernel.publish(&parent, "error", error.clone()).await;
                }
                reply["status"] = json!("error");
                reply["ename"] = error["ename"].clone();
                reply["evalue"] = error["evalue"].clone();
                reply["traceback"] = error["traceback"].clone();
                code
            }
        };
        if let Some(code) = generated {
            // JupyterLab offers this as a new cell below.
            reply["payload"] =
                json!([{"source": "set_next_input", "text": code, "replace": false}]);
        }
        kernel
            .reply(&request.session, &parent, "execute_reply", reply)
            .await;
        kernel
            .publish(&parent, "status", json!({"execution_state": "idle"}))
            .await;
        failed
    }

    async fn ask(&self, kernel: &Arc<Kernel>, parent: &Bytes, options: Options) -> Ending {
        let provider_name = options
            .provider
            .clone()
            .unwrap_or_else(|| self.config.default_provider.clone());
        let provider = match self.provider(&provider_name) {
            Ok(p) => p,
            Err(e) => return ask_error(e, None),
        };
        let model = options
            .model
            .clone()
            .or_else(|| {
                (!self.config.default_model.is_empty()
                    && provider_name == self.config.default_provider)
                    .then(|| self.config.default_model.clone())
            })
            .or_else(|| {
                self.models
                    .get(&provider_name)
                    .and_then(|m| m.first().cloned())
            });
        let Some(model) = model else {
            return ask_error(
                format!("provider {provider_name:?} lists no models; pass --model NAME"),
                None,
            );
        };
        if provider.key.is_none() && provider.needs_key {
            return ask_error(ProviderError::NoKey(provider_name).to_string(), None);
        }
        if let Err(e) = self.usage.check_budget(&kernel.owner) {
            return ask_error(e, None);
        }
        let context = self.context(kernel).await;
        let mut chat = Chat {
            model: model.clone(),
            system: prompt::system(&context.packages, options.explain),
            turns: vec![Turn {
                role: "user",
                text: prompt::user(&options.prompt, &context, self.config.context_chars),
            }],
            max_tokens: self.config.max_tokens,
        };
        let mut interrupts = kernel.interrupts();
        interrupts.borrow_and_update();
        let mut code = None;
        for attempt in 0..=self.config.max_repairs {
            if attempt > 0 {
                stream(
                    kernel,
                    parent,
                    "stderr",
                    &format!(
                        "[ask] attempt {}: asking {model} to fix the error\n",
                        attempt + 1
                    ),
                )
                .await;
            }
            let completion = match self
                .stream_completion(kernel, parent, &provider, &chat, &mut interrupts)
                .await
            {
                Ok(c) => c,
                Err(Some(e)) => return ask_error(e.to_string(), code),
                Err(None) => {
                    return Ending::Error {
                        ename: "KeyboardInterrupt".into(),
                        evalue: "interrupted while the model was writing".into(),
                        code,
                        shown: false,
                    };
                }
            };
            self.usage.record(
                &kernel.owner,
                kernel.id,
                completion.input_tokens,
                completion.output_tokens,
            );
            let generated = prompt::extract_code(&completion.text);
            if options.explain
                && let Some(explanation) = prompt::explanation(&completion.text)
            {
                display_markdown(kernel, parent, &explanation).await;
            }
            code = Some(generated.clone());
            self.show_usage(kernel, parent, &provider_name, &model, &completion)
                .await;
            if options.no_run {
                return Ending::Ok { code };
            }
            let run = crate::exec::Request {
                show_under: Some(parent.clone()),
                stop_on_error: true,
                ..crate::exec::Request::cell(generated.clone())
            };
            let reply = run_to_end(kernel, run, self.run_timeout).await;
            let Some(reply) = reply else {
                return ask_error(
                    "the kernel did not answer while running the generated code".into(),
                    code,
                );
            };
            if reply["status"] == "ok" {
                return Ending::Ok { code };
            }
            let ename = reply["ename"].as_str().unwrap_or("Error").to_owned();
            let evalue = reply["evalue"].as_str().unwrap_or_default().to_owned();
            if ename == "KeyboardInterrupt"
                || ename == "TimeoutError"
                || attempt == self.config.max_repairs
            {
                // The kernel already showed the error under the cell.
                return Ending::Error {
                    ename,
                    evalue,
                    code,
                    shown: true,
                };
            }
            let traceback: Vec<String> = reply["traceback"]
                .as_array()
                .map(|t| {
                    t.iter()
                        .filter_map(|l| l.as_str())
                        .map(prompt::strip_ansi)
                        .collect()
                })
                .unwrap_or_default();
            chat.turns.push(Turn {
                role: "assistant",
                text: completion.text,
            });
            chat.turns.push(Turn {
                role: "user",
                text: prompt::repair(&ename, &evalue, &traceback),
            });
        }
        Ending::Ok { code }
    }

    /// Streams one completion, showing the text as it arrives; `Err(None)` if interrupted.
    async fn stream_completion(
        &self,
        kernel: &Arc<Kernel>,
        parent: &Bytes,
        provider: &Provider,
        chat: &Chat,
        interrupts: &mut tokio::sync::watch::Receiver<u64>,
    ) -> Result<provider::Completion, Option<ProviderError>> {
        let display_id = uuid::Uuid::new_v4().simple().to_string();
        let (text_tx, mut text_rx) = tokio::sync::watch::channel(String::new());
        let shown = {
            let kernel = kernel.clone();
            let parent = parent.clone();
            let display_id = display_id.clone();
            async move {
                let mut first = true;
                while text_rx.changed().await.is_ok() {
                    let text = text_rx.borrow_and_update().clone();
                    let msg_type = if first {
                        "display_data"
                    } else {
                        "update_display_data"
                    };
                    first = false;
                    let content = json!({"data": {"text/markdown": text, "text/plain": text},
                                         "metadata": {}, "transient": {"display_id": display_id}});
                    kernel.publish(&parent, msg_type, content).await;
                }
            }
        };
        let call = async {
            let mut so_far = String::new();
            let r = provider
                .complete(&self.client, chat, |piece| {
                    so_far.push_str(piece);
                    let _ = text_tx.send(so_far.clone());
                })
                .await;
            drop(text_tx);
            r
        };
        let interrupted = async {
            let _ = interrupts.changed().await;
        };
        let (result, ()) = tokio::join!(
            async {
                tokio::select! {
                    r = call => Some(r),
                    () = interrupted => None,
                }
            },
            shown
        );
        match result {
            Some(Ok(c)) => Ok(c),
            Some(Err(e)) => Err(Some(e)),
            None => Err(None),
        }
    }

    async fn show_usage(
        &self,
        kernel: &Arc<Kernel>,
        parent: &Bytes,
        provider: &str,
        model: &str,
        c: &provider::Completion,
    ) {
        let totals = self.usage.kernel_totals(kernel.id);
        let workspace = self.usage.workspace_totals(&kernel.owner);
        let budget = if self.config.budget_tokens > 0 {
            format!(" of a budget of {}", self.config.budget_tokens)
        } else {
            String::new()
        };
        let line = format!(
            "*ask: {provider}/{model} · {} tokens in, {} out · this kernel {} · this workspace {}{budget}*",
            c.input_tokens,
            c.output_tokens,
            totals.input + totals.output,
            workspace.input + workspace.output,
        );
        display_markdown(kernel, parent, &line).await;
    }

    async fn context(&self, kernel: &Arc<Kernel>) -> prompt::Context {
        let mut context = prompt::Context {
            cells: self.history.recent(kernel.id),
            ..prompt::Context::default()
        };
        let mut expressions = serde_json::Map::new();
        expressions.insert(
            "ns".into(),
            "__import__('sys').modules['_sandgate'].describe()".into(),
        );
        let describe = crate::exec::Request {
            code: String::new(),
            silent: true,
            store_history: false,
            user_expressions: expressions,
            stop_on_error: false,
            metadata: serde_json::Map::new(),
            show_under: None,
        };
        if let Some(reply) = run_to_end(kernel, describe, DESCRIBE_TIMEOUT).await {
            let ns = &reply["user_expressions"]["ns"]["data"]["application/json"];
            context.variables = ns["variables"].as_array().cloned().unwrap_or_default();
            context.packages = ns["packages"]
                .as_array()
                .map(|p| {
                    p.iter()
                        .filter_map(|v| v.as_str().map(str::to_owned))
                        .collect()
                })
                .unwrap_or_default();
        }
        if let Ok(space) = self.workspaces.space(&kernel.owner).await
            && let Ok(entries) = space.read(|s| Ok(s.walk())).await
        {
            context.files = entries
                .into_iter()
                .filter(|(p, e)| {
                    e.kind == crate::workspace::store::Kind::File
                        && !p.as_str().starts_with("history/")
                        && !p.as_str().starts_with("outputs/")
                })
                .map(|(p, e)| (p.to_string(), e.size))
                .take(200)
                .collect();
        }
        context
    }
}

fn ask_error(evalue: String, code: Option<String>) -> Ending {
    Ending::Error {
        ename: "AskError".into(),
        evalue,
        code,
        shown: false,
    }
}

async fn stream(kernel: &Arc<Kernel>, parent: &Bytes, name: &str, text: &str) {
    kernel
        .publish(parent, "stream", json!({"name": name, "text": text}))
        .await;
}

async fn display_markdown(kernel: &Arc<Kernel>, parent: &Bytes, text: &str) {
    let content = json!({"data": {"text/markdown": text, "text/plain": text}, "metadata": {}, "transient": {}});
    kernel.publish(parent, "display_data", content).await;
}

impl ShellHook for Asker {
    fn claims(&self, content: &[u8]) -> bool {
        #[derive(serde::Deserialize)]
        struct Code<'a> {
            #[serde(borrow, default)]
            code: std::borrow::Cow<'a, str>,
        }
        serde_json::from_slice::<Code>(content).is_ok_and(|c| prompt::is_ask(&c.code))
    }

    fn serve(
        self: Arc<Self>,
        kernel: Arc<Kernel>,
        request: ClientRequest,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = bool> + Send>> {
        Box::pin(async move { self.serve_request(kernel, request).await })
    }
}

/// Runs `request` on `kernel` and waits up to `timeout` for its reply; `None` if the kernel
/// did not answer in time (the code is then interrupted) or went away.
async fn run_to_end(
    kernel: &Arc<Kernel>,
    request: crate::exec::Request,
    timeout: std::time::Duration,
) -> Option<Value> {
    let execution = crate::exec::Execution::start(kernel, request).await.ok()?;
    tokio::time::timeout(timeout, execution.reply())
        .await
        .ok()?
        .ok()
        .flatten()
}
