//! The gateway's one typed configuration. Every default is written here, next to its field, and
//! repeated in the README's configuration table.
//!
//! Sources, later ones winning: these defaults, the TOML file (`--config`, `$SANDGATE_CONFIG`, or
//! `DATA_DIR/sandgate.toml` if it exists), environment variables, then command-line flags (both
//! read by `main.rs`, which is the only place that reads them). Unknown keys in the file are an
//! error, not a silent typo.

use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

/// Errors in the configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read the configuration file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The file is not valid TOML for this configuration (unknown keys included).
    #[error("invalid configuration file {path}: {reason}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The parser's words (line and column included).
        reason: String,
    },
    /// A value is out of range.
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

/// Everything the gateway can be told.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Address to listen on. Default `127.0.0.1`: only this machine can connect.
    pub ip: IpAddr,
    /// Port to listen on. Default 8888 (0 picks a free port, printed at start).
    pub port: u16,
    /// Data folder: image, compiled-module cache, workspace, runtime files. Default
    /// `$SANDGATE_HOME`, else `$XDG_DATA_HOME/sandgate`, else `~/.local/share/sandgate`
    /// (resolved by `main.rs`; empty here means "not set").
    pub data_dir: PathBuf,
    /// The `sandgate-kernel` binary. Default: the one next to the `sandgate` binary.
    pub kernel_binary: PathBuf,
    /// Log format: `text` (default) or `json`.
    pub log_format: LogFormat,
    /// Authentication and origin rules.
    pub auth: AuthConfig,
    /// Kernel lifecycle.
    pub kernels: KernelsConfig,
    /// Limits of each kernel's sandbox.
    pub sandbox: SandboxConfig,
    /// HTTP limits.
    pub http: HttpConfig,
    /// The encrypted workspace.
    pub workspace: WorkspaceSettings,
    /// The `%%ask` magic and its model providers.
    pub ask: AskConfig,
    /// The E2B-compatible API.
    pub e2b: E2bConfig,
    /// Packages (`%pip install`).
    pub packages: PackagesConfig,
}

/// `%pip install` in the sandboxes: where the gateway fetches packages, and the caps.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct PackagesConfig {
    /// Whether `%pip install` is served at all.
    pub enabled: bool,
    /// The package index: a PEP 503/691 "simple" URL, or a local folder of wheels (for hosts
    /// without a network; its files are trusted as the operator's).
    pub index: String,
    /// Largest wheel a fetch downloads, MiB.
    pub max_wheel_mb: u64,
    /// Most unpacked bytes of packages one workspace holds, MiB.
    pub max_workspace_mb: u64,
    /// Most packages one workspace holds.
    pub max_packages: usize,
    /// Longest one download may take, seconds.
    pub fetch_timeout_s: u64,
}

impl Default for PackagesConfig {
    fn default() -> Self {
        PackagesConfig {
            enabled: true,
            index: "https://pypi.org/simple/".into(),
            max_wheel_mb: 64,
            max_workspace_mb: 512,
            max_packages: 200,
            fetch_timeout_s: 300,
        }
    }
}

/// The E2B-compatible API (always served on the main listener).
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct E2bConfig {
    /// Also serve E2B's debug ports, 127.0.0.1:49983 (envd) and 127.0.0.1:49999 (code
    /// interpreter), as one implicit sandbox with no tokens, for SDKs run with
    /// `E2B_DEBUG=true` (every SDK version, including 1.x). Loopback only; the main token's
    /// user owns the sandbox. Default false.
    pub debug_ports: bool,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            ip: IpAddr::from([127, 0, 0, 1]),
            port: 8888,
            data_dir: PathBuf::new(),
            kernel_binary: PathBuf::new(),
            log_format: LogFormat::Text,
            auth: AuthConfig::default(),
            kernels: KernelsConfig::default(),
            sandbox: SandboxConfig::default(),
            http: HttpConfig::default(),
            workspace: WorkspaceSettings::default(),
            ask: AskConfig::default(),
            e2b: E2bConfig::default(),
            packages: PackagesConfig::default(),
        }
    }
}

/// The `%%ask` magic.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct AskConfig {
    /// The provider used when a cell names none. Default `openai`.
    pub default_provider: String,
    /// The model used when a cell names none. Default: the provider's first model.
    pub default_model: String,
    /// Attempts the model gets to fix code that raised. Default 2.
    pub max_repairs: u32,
    /// Tokens (in + out) one workspace may spend; 0 for no budget. Default 0.
    pub budget_tokens: u64,
    /// Seconds one model call may take. Default 120.
    pub timeout_s: u64,
    /// Seconds a streaming reply may stall. Default 30.
    pub idle_timeout_s: u64,
    /// Attempts per call on 429 and 5xx, with backoff. Default 3.
    pub attempts: u32,
    /// Most tokens a reply may have. Default 4096.
    pub max_tokens: u32,
    /// Characters of context (cells, variables, files) sent with a prompt. Default 12000.
    pub context_chars: usize,
    /// The providers. Default: `openai` (api.openai.com, key in `$OPENAI_API_KEY`) and
    /// `anthropic` (api.anthropic.com, key in `$ANTHROPIC_API_KEY`).
    pub providers: Vec<ProviderConfig>,
}

/// One model provider.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ProviderConfig {
    /// Its name (`%%ask --provider NAME`).
    pub name: String,
    /// `openai` (any Chat Completions server: OpenAI, OpenRouter, Ollama, vLLM, llama.cpp,
    /// DeepSeek...) or `anthropic`.
    pub kind: crate::ask::provider::Kind,
    /// Base URL.
    pub base_url: String,
    /// Environment variable that holds the API key (read at start; never passed on).
    #[serde(default)]
    pub key_env: Option<String>,
    /// Whether a key is required. Default true.
    #[serde(default = "yes")]
    pub needs_key: bool,
    /// Models offered (the first is the default).
    #[serde(default)]
    pub models: Vec<String>,
}

fn yes() -> bool {
    true
}

impl Default for AskConfig {
    fn default() -> Self {
        AskConfig {
            default_provider: "openai".into(),
            default_model: String::new(),
            max_repairs: 2,
            budget_tokens: 0,
            timeout_s: 120,
            idle_timeout_s: 30,
            attempts: 3,
            max_tokens: 4096,
            context_chars: 12_000,
            providers: vec![
                ProviderConfig {
                    name: "openai".into(),
                    kind: crate::ask::provider::Kind::Openai,
                    base_url: "https://api.openai.com/v1".into(),
                    key_env: Some("OPENAI_API_KEY".into()),
                    needs_key: true,
                    models: vec!["gpt-4.1-mini".into(), "gpt-4.1".into()],
                },
                ProviderConfig {
                    name: "anthropic".into(),
                    kind: crate::ask::provider::Kind::Anthropic,
                    base_url: "https://api.anthropic.com".into(),
                    key_env: Some("ANTHROPIC_API_KEY".into()),
                    needs_key: true,
                    models: vec!["claude-sonnet-4-5".into(), "claude-haiku-4-5".into()],
                },
            ],
        }
    }
}

/// The encrypted workspace.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct WorkspaceSettings {
    /// A file holding the master key (64 hex digits), e.g. a mounted secret. Default none: the
    /// key comes from `$SANDGATE_MASTER_KEY`, else a passphrase (`$SANDGATE_PASSPHRASE`), else
    /// the access token opens it.
    pub master_key_file: Option<PathBuf>,
    /// Memory-backed folder for the plaintext copies kernels see at `/workspace`. Default
    /// `/dev/shm` (tmpfs); a folder on disk is refused unless `allow_disk_live_dir`.
    pub live_dir: PathBuf,
    /// Accept a `live_dir` that is not memory-backed. Default false.
    pub allow_disk_live_dir: bool,
    /// Bytes of files one workspace may hold. Default 1 GiB.
    pub max_bytes: u64,
    /// Files and folders one workspace may hold. Default 10000.
    pub max_files: usize,
    /// Seconds between syncs of running kernels' files (they are also synced after each cell).
    /// Default 10.
    pub sync_interval_s: u64,
}

impl Default for WorkspaceSettings {
    fn default() -> Self {
        WorkspaceSettings {
            master_key_file: None,
            live_dir: PathBuf::from("/dev/shm"),
            allow_disk_live_dir: false,
            max_bytes: 1 << 30,
            max_files: 10_000,
            sync_interval_s: 10,
        }
    }
}

/// How log lines look.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines with key=value fields.
    Text,
    /// One JSON object per line.
    Json,
}

/// Who may use the gateway.
#[derive(Debug, Clone, Deserialize, PartialEq, Default)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// Hex SHA-256 of the access token. The token itself is never stored: give it through
    /// `$SANDGATE_TOKEN` / `--token`, or let the gateway generate one on first start (printed
    /// once; its hash is kept in `DATA_DIR/token.sha256`). Default: none.
    pub token_sha256: Option<String>,
    /// Turn authentication off. Default false. Refused unless the gateway listens on a loopback
    /// address.
    pub disable: bool,
    /// Origins (exact `scheme://host[:port]`) allowed to open WebSockets besides the gateway's
    /// own. Default none: browsers on other origins are refused.
    pub allow_origins: Vec<String>,
    /// Origins allowed cross-origin REST calls (CORS). Default none: CORS is off.
    pub cors_origins: Vec<String>,
    /// Accept any `Host` header. Default false: when listening on loopback, only requests whose
    /// `Host` is a local name are served (a defence against DNS rebinding).
    pub allow_remote_access: bool,
    /// Extra host names accepted as local. Default none (`localhost`, `127.0.0.1` and `::1`
    /// always are).
    pub local_hostnames: Vec<String>,
    /// More users, each with their own token, kernels and workspace. Default none (one user,
    /// `default`, with the main token). With users, the workspace key must come from
    /// `$SANDGATE_MASTER_KEY`, `workspace.master_key_file` or `$SANDGATE_PASSPHRASE`.
    pub users: Vec<UserConfig>,
}

/// One more user.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct UserConfig {
    /// Their name (letters, digits, `-`, `_`).
    pub name: String,
    /// Hex SHA-256 of their token.
    pub token_sha256: String,
}

/// Kernel lifecycle settings.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct KernelsConfig {
    /// Most kernels running at once. Default 32. Past it, starting one is refused with 503.
    pub max_kernels: usize,
    /// Ready kernels kept warm so a start returns at once. Default 2; 0 turns the pool off.
    pub pool_size: usize,
    /// Shut down kernels idle this many seconds. Default 0: never.
    pub cull_idle_timeout_s: u64,
    /// Seconds between culling passes. Default 60.
    pub cull_interval_s: u64,
    /// Cull idle kernels even with clients connected. Default false.
    pub cull_connected: bool,
    /// Cull kernels that are busy. Default false.
    pub cull_busy: bool,
    /// Seconds a kernel may take to start. Default 60 (a first start compiles the image).
    pub startup_timeout_s: u64,
    /// Seconds a kernel has to exit after `shutdown_request` before it is killed. Default 5.
    pub shutdown_grace_s: u64,
    /// Seconds between heartbeats. Default 3.
    pub heartbeat_interval_s: u64,
    /// Heartbeats missed in a row before a kernel counts as dead. Default 3.
    pub heartbeat_misses: u32,
    /// Automatic restarts of a crashed kernel allowed per `restart_window_s`. Default 5.
    pub restart_limit: usize,
    /// The window of `restart_limit`, seconds. Default 60.
    pub restart_window_s: u64,
    /// How the gateway talks to its kernels: `ipc` (Unix sockets, default; lets each kernel
    /// process run without any network) or `tcp` (127.0.0.1).
    pub transport: crate::client::Transport,
    /// What starts each kernel child: `process` (default and, for now, the only one: a direct
    /// `sandgate-kernel` child process in a cgroup of its own).
    pub launcher: crate::launch::LauncherKind,
    /// Output messages per second one kernel may send to clients (as Jupyter Server's
    /// `iopub_msg_rate_limit`). Default 1000.
    pub iopub_msg_rate_limit: u64,
    /// Output bytes per second one kernel may send to clients. Default 10000000.
    pub iopub_data_rate_limit: u64,
    /// Seconds the two rates are averaged over. Default 3.
    pub rate_limit_window_s: u64,
}

impl Default for KernelsConfig {
    fn default() -> Self {
        KernelsConfig {
            max_kernels: 32,
            pool_size: 2,
            cull_idle_timeout_s: 0,
            cull_interval_s: 60,
            cull_connected: false,
            cull_busy: false,
            startup_timeout_s: 60,
            shutdown_grace_s: 5,
            heartbeat_interval_s: 3,
            heartbeat_misses: 3,
            restart_limit: 5,
            restart_window_s: 60,
            transport: crate::client::Transport::Ipc,
            launcher: crate::launch::LauncherKind::Process,
            iopub_msg_rate_limit: 1000,
            iopub_data_rate_limit: 10_000_000,
            rate_limit_window_s: 3,
        }
    }
}

/// What each kernel's sandbox may use (passed to `sandgate-kernel`).
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct SandboxConfig {
    /// The guest's memory, MiB. Default 2048; past it Python raises `MemoryError`.
    pub memory_mb: u64,
    /// Wall-clock seconds one cell may run. Default 600; 0 for no limit.
    pub cell_timeout_s: u64,
    /// Bytes of output one cell may publish. Default 8 MiB; the rest is dropped with a notice.
    pub output_bytes: u64,
    /// Files the guest may hold open. Default 256.
    pub open_files: u32,
    /// MiB the guest may keep in its /tmp, home and /workspace. Default 2048; past it writes
    /// fail with `OSError(ENOSPC)`.
    pub disk_mb: u64,
    /// Files and folders the guest may keep there. Default 20000.
    pub disk_files: u64,
    /// CPU one kernel process may use, in cores (its cgroup's quota). Default 1.0.
    pub cpu_cores: f64,
    /// MiB the kernel process may use beyond the guest's memory (its cgroup's memory cap is
    /// `memory_mb + process_overhead_mb`). Default 1024.
    pub process_overhead_mb: u64,
}

impl Default for SandboxConfig {
    fn default() -> Self {
        SandboxConfig {
            memory_mb: 2048,
            cell_timeout_s: 600,
            output_bytes: 8 << 20,
            open_files: 256,
            disk_mb: 2048,
            disk_files: 20_000,
            cpu_cores: 1.0,
            process_overhead_mb: 1024,
        }
    }
}

/// HTTP limits.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    /// Largest request body, bytes. Default 16 MiB.
    pub max_body_bytes: usize,
    /// Largest WebSocket message from a client, bytes. Default 64 MiB.
    pub max_ws_message_bytes: usize,
    /// Seconds a client has to send its request headers (slow clients are cut off). Default 15.
    pub header_timeout_s: u64,
    /// Seconds between WebSocket pings; a client that misses two pongs is closed. Default 30.
    pub ws_ping_interval_s: u64,
    /// Seconds a client has to send a request body (408 past it). Default 60.
    pub body_timeout_s: u64,
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            max_body_bytes: 16 << 20,
            max_ws_message_bytes: 64 << 20,
            header_timeout_s: 15,
            ws_ping_interval_s: 30,
            body_timeout_s: 60,
        }
    }
}

impl Config {
    /// Parses a TOML file's text.
    pub fn from_toml(path: &std::path::Path, text: &str) -> Result<Config, ConfigError> {
        toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_owned(),
            reason: e.to_string(),
        })
    }

    /// Checks values that types alone cannot.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let k = &self.kernels;
        if k.max_kernels == 0 {
            return Err(ConfigError::Invalid(
                "kernels.max_kernels must be at least 1".into(),
            ));
        }
        if k.cull_interval_s == 0 || k.heartbeat_interval_s == 0 || k.startup_timeout_s == 0 {
            return Err(ConfigError::Invalid(
                "kernels.cull_interval_s, heartbeat_interval_s and startup_timeout_s must be \
                 at least 1"
                    .into(),
            ));
        }
        if k.heartbeat_misses == 0 {
            return Err(ConfigError::Invalid(
                "kernels.heartbeat_misses must be at least 1".into(),
            ));
        }
        if self.workspace.sync_interval_s == 0 || self.workspace.max_files == 0 {
            return Err(ConfigError::Invalid(
                "workspace.sync_interval_s and workspace.max_files must be at least 1".into(),
            ));
        }
        let names: std::collections::HashSet<&str> =
            self.ask.providers.iter().map(|p| p.name.as_str()).collect();
        if names.len() != self.ask.providers.len() {
            return Err(ConfigError::Invalid(
                "ask.providers have duplicate names".into(),
            ));
        }
        if !names.is_empty() && !names.contains(self.ask.default_provider.as_str()) {
            return Err(ConfigError::Invalid(format!(
                "ask.default_provider {:?} is not one of ask.providers",
                self.ask.default_provider
            )));
        }
        for p in &self.ask.providers {
            if !(p.base_url.starts_with("http://") || p.base_url.starts_with("https://")) {
                return Err(ConfigError::Invalid(format!(
                    "ask provider {:?}: base_url must start with http:// or https://",
                    p.name
                )));
            }
        }
        let pk = &self.packages;
        if !(pk.index.starts_with("http://")
            || pk.index.starts_with("https://")
            || pk.index.starts_with('/'))
        {
            return Err(ConfigError::Invalid(format!(
                "packages.index {:?} must be an http:// or https:// simple-index URL, or an \
                 absolute folder of wheels",
                pk.index
            )));
        }
        if pk.max_wheel_mb == 0 || pk.fetch_timeout_s == 0 {
            return Err(ConfigError::Invalid(
                "packages.max_wheel_mb and packages.fetch_timeout_s must be at least 1".into(),
            ));
        }
        if !(self.sandbox.cpu_cores > 0.0 && self.sandbox.cpu_cores <= 1024.0) {
            return Err(ConfigError::Invalid(
                "sandbox.cpu_cores must be above 0".into(),
            ));
        }
        if self.sandbox.memory_mb < 64 {
            return Err(ConfigError::Invalid(
                "sandbox.memory_mb must be at least 64 (the interpreter needs it to start)".into(),
            ));
        }
        if self.auth.disable && !self.ip.is_loopback() {
            return Err(ConfigError::Invalid(format!(
                "auth.disable is only allowed when listening on a loopback address, not {}",
                self.ip
            )));
        }
        let mut names = std::collections::HashSet::new();
        for u in &self.auth.users {
            let ok_name = !u.name.is_empty()
                && u.name.len() <= 64
                && u.name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
            if !ok_name || u.name == crate::auth::DEFAULT_USER || !names.insert(u.name.as_str()) {
                return Err(ConfigError::Invalid(format!(
                    "auth.users: {:?} is not a valid, unique user name (letters, digits, - and _; \
                     not \"default\")",
                    u.name
                )));
            }
            if u.token_sha256.len() != 64 || hex::decode(&u.token_sha256).is_err() {
                return Err(ConfigError::Invalid(format!(
                    "auth.users: the token_sha256 of {:?} must be 64 hex digits",
                    u.name
                )));
            }
        }
        if let Some(h) = &self.auth.token_sha256
            && (h.len() != 64 || hex::decode(h).is_err())
        {
            return Err(ConfigError::Invalid(
                "auth.token_sha256 must be 64 hex digits (the SHA-256 of the token)".into(),
            ));
        }
        for origin in self
            .auth
            .allow_origins
            .iter()
            .chain(&self.auth.cors_origins)
        {
            if !(origin.starts_with("http://") || origin.starts_with("https://"))
                || origin.ends_with('/')
            {
                return Err(ConfigError::Invalid(format!(
                    "origin {origin:?} must look like scheme://host[:port], without a path"
                )));
            }
        }
        Ok(())
    }

    /// The lifecycle part, as the session layer takes it.
    pub fn lifecycle(&self) -> crate::session::LifecycleConfig {
        let k = &self.kernels;
        crate::session::LifecycleConfig {
            max_kernels: k.max_kernels,
            pool_size: k.pool_size,
            cull_idle_timeout: (k.cull_idle_timeout_s > 0)
                .then(|| Duration::from_secs(k.cull_idle_timeout_s)),
            cull_interval: Duration::from_secs(k.cull_interval_s),
            cull_connected: k.cull_connected,
            cull_busy: k.cull_busy,
            shutdown_grace: Duration::from_secs(k.shutdown_grace_s),
            restart_limit: k.restart_limit,
            restart_window: Duration::from_secs(k.restart_window_s),
            iopub_rate: crate::session::RateLimit {
                messages_per_s: k.iopub_msg_rate_limit.max(1),
                bytes_per_s: k.iopub_data_rate_limit.max(1),
                window: Duration::from_secs(k.rate_limit_window_s.max(1)),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_file_is_the_defaults() {
        let c = Config::from_toml("x.toml".as_ref(), "").unwrap();
        assert_eq!(c, Config::default());
        c.validate().unwrap();
    }

    #[test]
    fn unknown_keys_are_refused_with_their_name() {
        let err = Config::from_toml("x.toml".as_ref(), "[kernels]\npool_sise = 3\n").unwrap_err();
        assert!(err.to_string().contains("pool_sise"), "{err}");
        let err = Config::from_toml("x.toml".as_ref(), "colour = 'red'\n").unwrap_err();
        assert!(err.to_string().contains("colour"), "{err}");
    }

    #[test]
    fn an_unknown_launcher_is_refused_with_the_ones_there_are() {
        let c =
            Config::from_toml("x.toml".as_ref(), "[kernels]\nlauncher = \"process\"\n").unwrap();
        assert_eq!(c.kernels.launcher, crate::launch::LauncherKind::Process);
        let err = Config::from_toml("x.toml".as_ref(), "[kernels]\nlauncher = \"gvisor\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("gvisor") && err.contains("process"), "{err}");
    }

    #[test]
    fn values_are_read_and_checked() {
        let c = Config::from_toml(
            "x.toml".as_ref(),
            "port = 9000\n[kernels]\npool_size = 0\ncull_idle_timeout_s = 600\n",
        )
        .unwrap();
        assert_eq!(c.port, 9000);
        assert_eq!(c.kernels.pool_size, 0);
        assert_eq!(
            c.lifecycle().cull_idle_timeout,
            Some(Duration::from_secs(600))
        );
        let mut bad = c.clone();
        bad.kernels.max_kernels = 0;
        assert!(bad.validate().is_err());
        let mut bad = c.clone();
        bad.auth.disable = true;
        bad.ip = IpAddr::from([0, 0, 0, 0]);
        assert!(bad.validate().is_err());
        let mut bad = c;
        bad.auth.allow_origins = vec!["https://a.example/".into()];
        assert!(bad.validate().is_err());
    }
}
