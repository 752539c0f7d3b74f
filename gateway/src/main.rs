//! `sandgate`: reads the command line, environment and configuration file, prepares the sandbox
//! image, and serves the gateway. The only place that reads any of those.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand};
use sandgate::config::{Config, LogFormat};
use sandgate::workspace::keys::{MasterSource, Secret};

/// A Jupyter-compatible kernel gateway: every kernel runs in its own wasmtime sandbox (no
/// network, no host files but its workspace, capped memory, time and output).
///
/// Point JupyterLab at it:
///   jupyter lab --gateway-url=http://127.0.0.1:8888 --GatewayClient.auth_token=TOKEN
///
/// Settings come from the config file (TOML), then environment variables, then these flags;
/// the README lists every key and its default.
#[derive(Parser, Debug)]
#[command(version, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Option<Cmd>,

    #[command(flatten)]
    serve: ServeArgs,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Serve the gateway (the default).
    Serve(ServeArgs),
    /// Make a new access token, print it once, and keep only its hash in DATA_DIR/token.sha256.
    Token {
        /// The data folder.
        #[arg(long, env = "SANDGATE_HOME")]
        data_dir: Option<PathBuf>,
    },
    /// Re-encrypt every workspace under a new data key (run with the gateway stopped; an
    /// interrupted rotation resumes when run again). The key is opened as the gateway opens it:
    /// SANDGATE_MASTER_KEY, workspace.master_key_file, SANDGATE_PASSPHRASE or SANDGATE_TOKEN.
    RotateKey(ServeArgs),
    /// Store a model provider's API key for `%%ask`, sealed under the workspace master key
    /// (read from stdin, so it stays out of shell history). The key is opened as the gateway
    /// opens it: SANDGATE_MASTER_KEY, workspace.master_key_file, SANDGATE_PASSPHRASE or
    /// SANDGATE_TOKEN.
    SetKey {
        /// The provider's name (as in `[[ask.providers]]`).
        provider: String,
        #[command(flatten)]
        args: ServeArgs,
    },
    /// Serve MCP over stdio (for Claude Desktop and Claude Code), proxying to a running
    /// gateway's /mcp endpoint: sandboxes and sessions live in the gateway. Only protocol goes
    /// to stdout; messages go to stderr. The token comes from SANDGATE_TOKEN or --token-file.
    Mcp {
        /// The gateway's MCP endpoint (a bare gateway URL gets /mcp).
        #[arg(
            long,
            env = "SANDGATE_MCP_URL",
            default_value = "http://127.0.0.1:8888/mcp"
        )]
        url: String,
        /// A file holding the access token (else SANDGATE_TOKEN is used).
        #[arg(long)]
        token_file: Option<PathBuf>,
    },
    /// Fetch, verify and compile the sandbox image, then exit.
    Prepare {
        /// The data folder.
        #[arg(long, env = "SANDGATE_HOME")]
        data_dir: Option<PathBuf>,
    },
}

#[derive(Args, Debug, Clone, Default)]
struct ServeArgs {
    /// Configuration file (TOML). Default: DATA_DIR/sandgate.toml if it exists.
    #[arg(long, env = "SANDGATE_CONFIG")]
    config: Option<PathBuf>,
    /// Address to listen on [default: 127.0.0.1].
    #[arg(long, env = "SANDGATE_IP")]
    ip: Option<IpAddr>,
    /// Port to listen on; 0 picks a free one [default: 8888].
    #[arg(long, env = "SANDGATE_PORT")]
    port: Option<u16>,
    /// Data folder: image, cache, workspace, runtime files
    /// [default: $XDG_DATA_HOME/sandgate or ~/.local/share/sandgate].
    #[arg(long, env = "SANDGATE_HOME")]
    data_dir: Option<PathBuf>,
    /// The access token. Prefer the environment variable: flags show up in `ps`.
    #[arg(long, env = "SANDGATE_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Ready kernels kept warm [default: 2].
    #[arg(long, env = "SANDGATE_POOL_SIZE")]
    pool_size: Option<usize>,
    /// Most kernels at once [default: 32].
    #[arg(long, env = "SANDGATE_MAX_KERNELS")]
    max_kernels: Option<usize>,
    /// Shut down kernels idle this many seconds; 0 never [default: 0].
    #[arg(long, env = "SANDGATE_CULL_IDLE_TIMEOUT")]
    cull_idle_timeout: Option<u64>,
    /// Seconds between culling passes [default: 60].
    #[arg(long, env = "SANDGATE_CULL_INTERVAL")]
    cull_interval: Option<u64>,
    /// An origin allowed to open WebSockets (repeatable; exact scheme://host[:port]).
    #[arg(long = "allow-origin")]
    allow_origins: Vec<String>,
    /// Log format.
    #[arg(long, env = "SANDGATE_LOG_FORMAT", value_enum)]
    log_format: Option<LogFormat>,
    /// Also serve E2B's debug ports 49983 and 49999 on 127.0.0.1 (for `E2B_DEBUG=true`).
    #[arg(long, env = "SANDGATE_E2B_DEBUG_PORTS")]
    e2b_debug_ports: bool,
    /// Where `%pip install` fetches packages: a PEP 503/691 simple index URL, or a folder of
    /// wheels [default: https://pypi.org/simple/].
    #[arg(long, env = "SANDGATE_PACKAGE_INDEX")]
    package_index: Option<String>,
    /// The sandgate-kernel binary [default: next to this one].
    #[arg(long, env = "SANDGATE_KERNEL")]
    kernel_binary: Option<PathBuf>,
}

fn default_data_dir() -> Result<PathBuf> {
    if let Some(xdg) = std::env::var_os("XDG_DATA_HOME").filter(|h| !h.is_empty()) {
        return Ok(PathBuf::from(xdg).join("sandgate"));
    }
    let home = std::env::var_os("HOME").context("neither SANDGATE_HOME nor HOME is set")?;
    Ok(PathBuf::from(home).join(".local/share/sandgate"))
}

fn resolve_data_dir(flag: Option<&Path>) -> Result<PathBuf> {
    let dir = match flag {
        Some(d) if !d.as_os_str().is_empty() => d.to_owned(),
        _ => default_data_dir()?,
    };
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    Ok(dir.canonicalize()?)
}

fn load_config(args: &ServeArgs, data_dir: &Path) -> Result<Config> {
    let path = args
        .config
        .clone()
        .or_else(|| Some(data_dir.join("sandgate.toml")).filter(|p| p.exists()));
    let mut config = match &path {
        Some(p) => {
            let text = std::fs::read_to_string(p)
                .with_context(|| format!("cannot read the configuration file {}", p.display()))?;
            Config::from_toml(p, &text)?
        }
        None => Config::default(),
    };
    if let Some(ip) = args.ip {
        config.ip = ip;
    }
    if let Some(port) = args.port {
        config.port = port;
    }
    if args.e2b_debug_ports {
        config.e2b.debug_ports = true;
    }
    if let Some(index) = &args.package_index {
        config.packages.index = index.clone();
    }
    if let Some(n) = args.pool_size {
        config.kernels.pool_size = n;
    }
    if let Some(n) = args.max_kernels {
        config.kernels.max_kernels = n;
    }
    if let Some(n) = args.cull_idle_timeout {
        config.kernels.cull_idle_timeout_s = n;
    }
    if let Some(n) = args.cull_interval {
        config.kernels.cull_interval_s = n;
    }
    config
        .auth
        .allow_origins
        .extend(args.allow_origins.iter().cloned());
    if let Some(f) = args.log_format {
        config.log_format = f;
    }
    if let Some(k) = &args.kernel_binary {
        config.kernel_binary = k.clone();
    }
    config.data_dir = data_dir.to_owned();
    config.validate()?;
    Ok(config)
}

fn kernel_binary(config: &Config) -> Result<PathBuf> {
    if !config.kernel_binary.as_os_str().is_empty() {
        return Ok(config.kernel_binary.clone());
    }
    let exe = std::env::current_exe()?;
    let sibling = exe.with_file_name("sandgate-kernel");
    if !sibling.exists() {
        bail!(
            "cannot find sandgate-kernel next to {}; build it (`cargo build --release`) or set \
             kernel_binary",
            exe.display()
        );
    }
    Ok(sibling)
}

/// Fetches, verifies and compiles the image with the kernel binary (its progress shows on stderr).
fn prepare_image(kernel: &Path, data_dir: &Path) -> Result<()> {
    let status = Command::new(kernel)
        .arg("prepare")
        .arg("--home")
        .arg(data_dir)
        .stdout(std::process::Stdio::null())
        .status()
        .with_context(|| format!("cannot run {}", kernel.display()))?;
    if !status.success() {
        bail!("preparing the sandbox image failed ({status}); see the messages above");
    }
    Ok(())
}

const TOKEN_FILE: &str = "token.sha256";

/// The workspace key source for an offline command: explicit, else the token.
fn key_source_or_token(config: &Config, args: &ServeArgs) -> Result<MasterSource> {
    if let Some(s) = explicit_key_source(config)? {
        return Ok(s);
    }
    let token = args.token.clone().filter(|t| !t.is_empty()).context(
        "give the key: SANDGATE_MASTER_KEY, workspace.master_key_file, SANDGATE_PASSPHRASE or \
         SANDGATE_TOKEN",
    )?;
    Ok(MasterSource::Token(token))
}

/// Model providers' keys from the environment variables their configuration names.
fn provider_keys(config: &Config) -> std::collections::HashMap<String, String> {
    config
        .ask
        .providers
        .iter()
        .filter_map(|p| {
            let var = p.key_env.as_deref()?;
            let key = std::env::var(var).ok().filter(|k| !k.is_empty())?;
            Some((p.name.clone(), key))
        })
        .collect()
}

/// What opens the workspace key, from the environment and configuration (the token is the
/// fallback, handled by the caller).
fn explicit_key_source(config: &Config) -> Result<Option<MasterSource>> {
    if let Some(hex) = std::env::var("SANDGATE_MASTER_KEY")
        .ok()
        .filter(|v| !v.is_empty())
    {
        let key = Secret::from_hex(&hex).context("SANDGATE_MASTER_KEY must be 64 hex digits")?;
        return Ok(Some(MasterSource::Key(key)));
    }
    if let Some(path) = &config.workspace.master_key_file {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read workspace.master_key_file {}", path.display()))?;
        let key = Secret::from_hex(&text)
            .with_context(|| format!("{} must hold 64 hex digits", path.display()))?;
        return Ok(Some(MasterSource::Key(key)));
    }
    if let Some(p) = std::env::var("SANDGATE_PASSPHRASE")
        .ok()
        .filter(|v| !v.is_empty())
    {
        return Ok(Some(MasterSource::Passphrase(p)));
    }
    Ok(None)
}

fn write_token_hash(data_dir: &Path, token: &str) -> Result<()> {
    let path = data_dir.join(TOKEN_FILE);
    let tmp = data_dir.join(format!("{TOKEN_FILE}.tmp"));
    std::fs::write(&tmp, hex::encode(sandgate::auth::hash_token(token)))?;
    std::fs::rename(&tmp, &path)?;
    Ok(())
}

/// The token hash to check against, and a token to print if one was just made.
fn token_hash(
    args: &ServeArgs,
    config: &Config,
    data_dir: &Path,
) -> Result<(Option<[u8; 32]>, Option<String>)> {
    if let Some(t) = args.token.as_deref().filter(|t| !t.is_empty()) {
        return Ok((Some(sandgate::auth::hash_token(t)), None));
    }
    if let Some(h) = &config.auth.token_sha256 {
        let mut out = [0u8; 32];
        out.copy_from_slice(&hex::decode(h)?);
        return Ok((Some(out), None));
    }
    if config.auth.disable {
        tracing::warn!("authentication is OFF: anyone who can reach this port can run code");
        return Ok((None, None));
    }
    let file = data_dir.join(TOKEN_FILE);
    if let Ok(text) = std::fs::read_to_string(&file) {
        let bytes = hex::decode(text.trim()).ok().filter(|b| b.len() == 32);
        let Some(bytes) = bytes else {
            bail!(
                "{} is not a SHA-256 in hex; run `sandgate token` to make a new token",
                file.display()
            );
        };
        let mut out = [0u8; 32];
        out.copy_from_slice(&bytes);
        return Ok((Some(out), None));
    }
    let token = sandgate::auth::new_token();
    write_token_hash(data_dir, &token)?;
    Ok((Some(sandgate::auth::hash_token(&token)), Some(token)))
}

fn init_logs(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("SANDGATE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,zeromq=warn"));
    let builder = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(filter);
    match format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
}

async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("a SIGTERM handler installs");
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    tracing::info!("signal received; stopping");
}

/// Raises the soft limit on open files to the hard one. Each kernel holds about 8 of the
/// gateway's descriptors (its five sockets, its stdout and stderr, the process), so the usual
/// soft limit of 1024 would stop the gateway at about 120 kernels, well below what the machine
/// can hold; the hard limit is the operator's.
fn raise_open_files_limit() {
    use rustix::process::{Resource, getrlimit, setrlimit};
    let limit = getrlimit(Resource::Nofile);
    if limit.current == limit.maximum {
        return;
    }
    let raised = rustix::process::Rlimit {
        current: limit.maximum,
        maximum: limit.maximum,
    };
    match setrlimit(Resource::Nofile, raised) {
        Ok(()) => {
            tracing::debug!(from = ?limit.current, to = ?limit.maximum, "raised the open files limit")
        }
        Err(e) => tracing::warn!(limit = ?limit.current, error = %e,
                                 "cannot raise the open files limit; kernels may be refused early"),
    }
}

/// `sandgate mcp`: MCP over stdio, proxied to a gateway's `/mcp`.
fn mcp_stdio(url: &str, token_file: Option<&Path>) -> Result<()> {
    // stdout carries the protocol only: every message of this process goes to stderr.
    let filter = tracing_subscriber::EnvFilter::try_from_env("SANDGATE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(filter)
        .init();
    let endpoint = sandgate::mcp::stdio::endpoint(url)?;
    let token = match token_file {
        Some(f) => {
            let t = std::fs::read_to_string(f)
                .with_context(|| format!("cannot read the token file {}", f.display()))?;
            Some(t.trim().to_owned())
                .filter(|t| !t.is_empty())
                .with_context(|| format!("the token file {} is empty", f.display()))?
        }
        None => match std::env::var("SANDGATE_TOKEN")
            .ok()
            .filter(|t| !t.is_empty())
        {
            Some(t) => t,
            None => bail!(
                "no access token: set SANDGATE_TOKEN or pass --token-file (the gateway's token, \
                 as for its other APIs)"
            ),
        },
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(sandgate::mcp::stdio::run(
        endpoint,
        Some(token),
        tokio::io::BufReader::new(tokio::io::stdin()),
        tokio::io::stdout(),
    ))?;
    Ok(())
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let args = match cli.command {
        Some(Cmd::Token { data_dir }) => {
            let dir = resolve_data_dir(data_dir.as_deref())?;
            let token = sandgate::auth::new_token();
            let keys = dir.join("keys.json");
            if sandgate::workspace::keys::slot_kinds(&keys)
                .iter()
                .any(|k| k == "token")
            {
                // The old token opens the workspace key; the new one must too.
                let old = std::env::var("SANDGATE_TOKEN").ok().filter(|t| !t.is_empty()).context(
                    "the workspace key is opened by the access token: set SANDGATE_TOKEN to the \
                     current token so the new one can be given the same access",
                )?;
                let mut ring = sandgate::workspace::keys::Keyring::open_or_create(
                    &keys,
                    &MasterSource::Token(old),
                )?;
                ring.set_slot(&MasterSource::Token(token.clone()))?;
            }
            write_token_hash(&dir, &token)?;
            println!("{token}");
            eprintln!(
                "sandgate: a new token; only its hash is kept, in {}. Restart the gateway to use it.",
                dir.join(TOKEN_FILE).display()
            );
            return Ok(());
        }
        Some(Cmd::Mcp { url, token_file }) => return mcp_stdio(&url, token_file.as_deref()),
        Some(Cmd::Prepare { data_dir }) => {
            let dir = resolve_data_dir(data_dir.as_deref())?;
            let config = Config {
                data_dir: dir.clone(),
                ..Config::default()
            };
            return prepare_image(&kernel_binary(&config)?, &dir);
        }
        Some(Cmd::SetKey { provider, args }) => {
            let data_dir = resolve_data_dir(args.data_dir.as_deref())?;
            let config = load_config(&args, &data_dir)?;
            if !config.ask.providers.iter().any(|p| p.name == provider) {
                bail!("no provider {provider:?} in ask.providers");
            }
            let source = key_source_or_token(&config, &args)?;
            let mut key = String::new();
            std::io::stdin().read_line(&mut key)?;
            let key = key.trim().to_owned();
            if key.is_empty() {
                bail!("no key on stdin; pipe it in: `sandgate set-key {provider} < keyfile`");
            }
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            return runtime.block_on(async move {
                let workspaces = sandgate::open_workspaces(&config, &data_dir)?;
                workspaces.unlock(source).await?;
                workspaces.set_secret(&format!("provider:{provider}"), &key)?;
                println!(
                    "sandgate: stored the key for {provider}, sealed under the workspace master key"
                );
                anyhow::Ok(())
            });
        }
        Some(Cmd::RotateKey(args)) => {
            let data_dir = resolve_data_dir(args.data_dir.as_deref())?;
            let config = load_config(&args, &data_dir)?;
            let source = key_source_or_token(&config, &args)?;
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            return runtime.block_on(async move {
                let workspaces = sandgate::open_workspaces(&config, &data_dir)?;
                workspaces.unlock(source).await?;
                let r = tokio::task::spawn_blocking(move || workspaces.rotate()).await??;
                println!(
                    "sandgate: re-encrypted {} files under a new data key",
                    r.resealed
                );
                if !r.retired {
                    for dir in &r.damaged_workspaces {
                        eprintln!(
                            "sandgate: the index of {} cannot be read; that workspace was left as it was",
                            dir.display()
                        );
                    }
                    bail!(
                        "the rotation is not finished: {} damaged files and {} workspaces whose \
                         index cannot be read were left under the old data key, which is kept so a \
                         backup of them can still be read. Delete or replace the damaged files (or \
                         restore them from a backup), then run rotate-key again",
                        r.damaged_files,
                        r.damaged_workspaces.len()
                    );
                }
                anyhow::Ok(())
            });
        }
        Some(Cmd::Serve(args)) => args,
        None => cli.serve,
    };
    let data_dir = resolve_data_dir(args.data_dir.as_deref())?;
    let config = load_config(&args, &data_dir)?;
    init_logs(config.log_format);
    raise_open_files_limit();
    let kernel = kernel_binary(&config)?;
    prepare_image(&kernel, &data_dir)?;
    let (hash, new_token) = token_hash(&args, &config, &data_dir)?;
    if let Some(token) = &new_token {
        // Shown at once, so it is not lost if anything later fails.
        println!("sandgate: a new access token was made (shown once; only its hash is kept):");
        println!("    {token}");
    }
    let key_source = match explicit_key_source(&config)? {
        Some(s) => Some(s),
        None if !config.auth.users.is_empty() => bail!(
            "with auth.users, each user's token cannot open the shared workspace key: set \
             SANDGATE_MASTER_KEY, workspace.master_key_file or SANDGATE_PASSPHRASE"
        ),
        None if config.auth.disable => bail!(
            "with auth.disable there is no token to open the workspace key: set \
             SANDGATE_MASTER_KEY, workspace.master_key_file or SANDGATE_PASSPHRASE"
        ),
        // The token opens it: now if it is known, else when the first request brings it.
        None => args
            .token
            .clone()
            .filter(|t| !t.is_empty())
            .or_else(|| new_token.clone())
            .map(MasterSource::Token),
    };

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let rt = sandgate::Runtime {
            token_hash: hash,
            kernel_binary: kernel,
            data_dir: data_dir.clone(),
            key_source,
            provider_keys: provider_keys(&config),
            users: config
                .auth
                .users
                .iter()
                .map(|u| {
                    let mut h = [0u8; 32];
                    h.copy_from_slice(&hex::decode(&u.token_sha256).expect("validated"));
                    (h, u.name.clone())
                })
                .collect(),
        };
        let (ip, port) = (config.ip, config.port);
        let gateway = sandgate::Gateway::start(config, rt).await?;
        let listener = tokio::net::TcpListener::bind((ip, port))
            .await
            .with_context(|| format!("cannot listen on {ip}:{port}"))?;
        let addr = listener.local_addr()?;
        let host = if addr.ip().is_loopback() { "127.0.0.1".to_owned() } else { addr.ip().to_string() };
        let url = format!("http://{host}:{}", addr.port());
        match &new_token {
            Some(token) => {
                println!(
                    "sandgate: connect JupyterLab with\n    jupyter lab --gateway-url={url} --GatewayClient.auth_token={token}"
                );
            }
            None if hash.is_some() => println!(
                "sandgate: token authentication on (SANDGATE_TOKEN, auth.token_sha256 or {}); `sandgate token` makes a new one",
                data_dir.join(TOKEN_FILE).display()
            ),
            None => {}
        }
        // Tests and scripts wait for this line to learn the port.
        println!("sandgate: listening on {url}");
        use std::io::Write;
        std::io::stdout().flush()?;
        gateway.serve(listener, shutdown_signal()).await;
        anyhow::Ok(())
    })
}
