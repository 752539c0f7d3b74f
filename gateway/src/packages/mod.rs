//! Packages for the sandboxes: `%pip install` without giving a sandbox a network.
//!
//! The gateway is the only process with a network. A kernel's guest resolves requirements
//! itself (with the image's `packaging`, against what the image has) and asks this service,
//! over a Unix socket made for its kernel process, three things: a project's files on the
//! configured index ([`index`]), a wheel's metadata, and to fetch a wheel ([`fetch`]: hash-checked,
//! size-capped, unpacked by [`wheel`] with every path checked and compiled extensions refused,
//! cached on the host by content hash). The guest names files only as the index listed them; no
//! URL ever comes from it, and no package code ever runs on the host.
//!
//! Installing puts the fetched wheels' files into the workspace's **site folder** (hard links to
//! the cache), which every kernel of that workspace sees read-only at
//! `/usr/local/lib/python3.15/site-packages`, and records them in the workspace's lock file
//! [`LOCK_PATH`] (in the encrypted store, like any workspace file). A workspace's first kernel in a
//! gateway run rebuilds its site folder from that file, from the cache: no fetch unless the
//! cache lost a wheel. Site folders live under `DATA_DIR/packages/sites/<run>/`, removed when
//! the run ends (or by the next run, if it was killed).
//!
//! Limits: a workspace holds at most [`PackagesConfig::max_packages`] packages and
//! [`PackagesConfig::max_workspace_mb`] of unpacked files; an install that would pass either is
//! refused whole, before anything changes.

pub mod fetch;
pub mod index;
pub mod wheel;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};

use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

pub use crate::config::PackagesConfig;
use crate::workspace::Workspaces;
use crate::workspace::path::WsPath;
use crate::workspace::store::StoreError;

/// The workspace file that records what `%pip` installed there.
pub const LOCK_PATH: &str = ".sandgate/packages.lock";
/// The lock file's format version.
const LOCK_VERSION: u64 = 1;
/// Longest request line a kernel may send.
const MAX_REQUEST: usize = 1 << 20;
/// Most packages one install may name.
const MAX_PER_INSTALL: usize = 500;

/// Errors of the package service, as the guest shows them.
#[derive(Debug, thiserror::Error)]
pub enum PackagesError {
    /// The index, a download or a wheel failed.
    #[error(transparent)]
    Fetch(#[from] fetch::FetchError),
    /// The request was malformed.
    #[error("{0}")]
    Request(String),
    /// A workspace cap would be passed.
    #[error("{0}")]
    Cap(String),
    /// The site folder or the lock file failed.
    #[error("the workspace's packages: {0}")]
    Site(String),
}

/// One installed distribution, as the lock file records it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Locked {
    /// Its name, as its metadata spells it.
    pub name: String,
    /// Its version.
    pub version: String,
    /// The wheel's file name on the index.
    pub filename: String,
    /// The wheel's SHA-256, hex.
    pub sha256: String,
    /// Bytes of its unpacked files.
    pub bytes: u64,
    /// Whether the user asked for it (else it came as a dependency).
    pub requested: bool,
}

#[derive(Debug, Serialize, Deserialize)]
struct LockFile {
    sandgate_packages: u64,
    #[serde(default)]
    packages: Vec<Locked>,
}

/// One workspace's installed packages: its site folder and what is in it.
#[derive(Debug)]
pub struct Site {
    owner: String,
    /// The folder, removed when the run ends.
    home: Arc<crate::home::Home>,
    state: tokio::sync::Mutex<SiteState>,
}

#[derive(Debug, Default)]
struct SiteState {
    /// Whether the lock file was read into the folder.
    restored: bool,
    /// Canonical name → the installed distribution and the files it put in the folder.
    installed: BTreeMap<String, (Locked, Arc<fetch::Unpacked>)>,
    /// Lock entries that could not be restored, and why (shown by `%pip list`).
    problems: Vec<String>,
}

impl Site {
    /// The folder the guest sees read-only.
    pub fn dir(&self) -> &Path {
        self.home.path()
    }
}

/// The package service of the gateway.
pub struct Packages {
    config: PackagesConfig,
    fetcher: fetch::Fetcher,
    sites_dir: crate::home::Homes,
    workspaces: Arc<Workspaces>,
    sites: Mutex<HashMap<String, Arc<Site>>>,
}

impl std::fmt::Debug for Packages {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Packages")
            .field("index", &self.config.index)
            .finish()
    }
}

/// PEP 503's normal form of a project name (`Foo_Bar` → `foo-bar`).
fn canonical(name: &str) -> String {
    // A name the index grammar refuses cannot match an installed one: kept as given, lowercased.
    index::ProjectName::parse(name)
        .map(|p| p.as_str().to_owned())
        .unwrap_or_else(|_| name.to_ascii_lowercase())
}

impl Packages {
    /// The service, with its cache under `data_dir/packages/cache` and site folders under
    /// `data_dir/packages/sites`.
    pub fn new(
        config: PackagesConfig,
        data_dir: &Path,
        workspaces: Arc<Workspaces>,
    ) -> Result<Packages, PackagesError> {
        let root = data_dir.join("packages");
        let index = if config.index.starts_with("http://") || config.index.starts_with("https://") {
            let url = url::Url::parse(&config.index).map_err(|e| {
                PackagesError::Request(format!("[packages] index {:?}: {e}", config.index))
            })?;
            fetch::Index::Url(url)
        } else {
            fetch::Index::Folder(PathBuf::from(&config.index))
        };
        let limits = fetch::FetchLimits {
            max_wheel_bytes: config.max_wheel_mb << 20,
            download_timeout: std::time::Duration::from_secs(config.fetch_timeout_s),
            ..fetch::FetchLimits::default()
        };
        let fetcher = fetch::Fetcher::new(index, root.join("cache"), http_client(), limits)?;
        let sites_dir = crate::home::Homes::open(&root.join("sites"))
            .map_err(|e| PackagesError::Site(format!("{}: {e}", root.display())))?;
        Ok(Packages {
            config,
            fetcher,
            sites_dir,
            workspaces,
            sites: Mutex::default(),
        })
    }

    /// The settings.
    pub fn config(&self) -> &PackagesConfig {
        &self.config
    }

    /// `owner`'s site folder, made on first use in this run and filled from the workspace's lock
    /// file (from the cache; a wheel the cache lost is fetched again and checked against the
    /// recorded hash). A lock file that cannot be read, or an entry that cannot be restored, is
    /// logged and shown by `%pip list`; the kernel starts anyway.
    pub async fn site(&self, owner: &str) -> Result<Arc<Site>, PackagesError> {
        let site = {
            let mut sites = self.sites.lock().unwrap_or_else(|e| e.into_inner());
            match sites.get(owner) {
                Some(s) => s.clone(),
                None => {
                    let home = self
                        .sites_dir
                        .create()
                        .map_err(|e| PackagesError::Site(e.to_string()))?;
                    let site = Arc::new(Site {
                        owner: owner.to_owned(),
                        home,
                        state: tokio::sync::Mutex::default(),
                    });
                    sites.insert(owner.to_owned(), site.clone());
                    site
                }
            }
        };
        let mut state = site.state.lock().await;
        if !state.restored {
            self.restore(&site, &mut state).await;
        }
        drop(state);
        Ok(site)
    }

    async fn restore(&self, site: &Site, state: &mut SiteState) {
        let locked = match self.read_lock(&site.owner).await {
            Ok(Some(l)) => l,
            Ok(None) => {
                state.restored = true;
                return;
            }
            // A locked workspace (no key yet): try again at the next launch.
            Err(LockRead::Unavailable(why)) => {
                tracing::debug!(%why, "the workspace's packages are not restored yet");
                return;
            }
            Err(LockRead::Damaged(why)) => {
                tracing::warn!(user = %site.owner, %why, "the workspace's package lock file cannot be read");
                state.problems.push(why);
                state.restored = true;
                return;
            }
        };
        state.restored = true;
        for entry in locked {
            match self.restore_one(site, &entry).await {
                Ok(unpacked) => {
                    state
                        .installed
                        .insert(canonical(&entry.name), (entry, unpacked));
                }
                Err(e) => {
                    let why = format!("{} {} was not restored: {e}", entry.name, entry.version);
                    tracing::warn!(user = %site.owner, "{why}");
                    state.problems.push(why);
                }
            }
        }
    }

    async fn restore_one(
        &self,
        site: &Site,
        entry: &Locked,
    ) -> Result<Arc<fetch::Unpacked>, PackagesError> {
        let sha = parse_sha(&entry.sha256)
            .ok_or_else(|| PackagesError::Request(format!("bad sha256 {:?}", entry.sha256)))?;
        let unpacked = match self.fetcher.cached(&sha).await? {
            Some(u) => u,
            None => {
                let project =
                    index::ProjectName::parse(&entry.name).map_err(fetch::FetchError::from)?;
                let file = self.fetcher.find(&project, &entry.filename).await?;
                if file.sha256 != Some(sha) {
                    return Err(PackagesError::Request(format!(
                        "the index now gives {} another hash than the one recorded",
                        entry.filename
                    )));
                }
                self.fetcher.wheel(&file).await?
            }
        };
        link(site.dir(), &unpacked).await?;
        Ok(unpacked)
    }

    async fn read_lock(&self, owner: &str) -> Result<Option<Vec<Locked>>, LockRead> {
        let space = self
            .workspaces
            .space(owner)
            .await
            .map_err(|e| LockRead::Unavailable(e.to_string()))?;
        let path = WsPath::parse(LOCK_PATH).expect("a valid path");
        let read = space.read(move |store| store.read(&path)).await;
        let data = match read {
            Ok((_, data)) => data,
            Err(crate::workspace::WorkspaceError::Store(StoreError::NotFound(_))) => {
                return Ok(None);
            }
            Err(e) => return Err(LockRead::Damaged(format!("{LOCK_PATH}: {e}"))),
        };
        let lock: LockFile = serde_json::from_slice(&data)
            .map_err(|e| LockRead::Damaged(format!("{LOCK_PATH} is not a package lock: {e}")))?;
        if lock.sandgate_packages != LOCK_VERSION {
            return Err(LockRead::Damaged(format!(
                "{LOCK_PATH} has format {}, this gateway reads {LOCK_VERSION}",
                lock.sandgate_packages
            )));
        }
        Ok(Some(lock.packages))
    }

    async fn write_lock(&self, owner: &str, state: &SiteState) -> Result<(), PackagesError> {
        let lock = LockFile {
            sandgate_packages: LOCK_VERSION,
            packages: state.installed.values().map(|(l, _)| l.clone()).collect(),
        };
        let mut text = serde_json::to_vec_pretty(&lock).expect("JSON");
        text.push(b'\n');
        let space = self
            .workspaces
            .space(owner)
            .await
            .map_err(|e| PackagesError::Site(e.to_string()))?;
        let path = WsPath::parse(LOCK_PATH).expect("a valid path");
        space
            .write(path, text, true)
            .await
            .map_err(|e| PackagesError::Site(format!("{LOCK_PATH} was not saved: {e}")))?;
        Ok(())
    }

    /// Serves one kernel process's connection until it closes.
    pub async fn serve(self: Arc<Self>, site: Arc<Site>, stream: UnixStream) {
        let (read, mut write) = stream.into_split();
        let (lines_tx, mut lines) = tokio::sync::mpsc::channel::<Value>(16);
        // Lines are read while a call runs, so a `cancel` reaches it.
        tokio::spawn(async move {
            let mut reader = BufReader::new(read);
            let mut buf = Vec::new();
            loop {
                buf.clear();
                let mut limited = (&mut reader).take(MAX_REQUEST as u64 + 1);
                match limited.read_until(b'\n', &mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) if buf.len() > MAX_REQUEST => return,
                    Ok(_) => {}
                }
                let Ok(value) = serde_json::from_slice::<Value>(&buf) else {
                    return;
                };
                if lines_tx.send(value).await.is_err() {
                    return;
                }
            }
        });
        let mut session = Session::default();
        while let Some(request) = lines.recv().await {
            let Some(id) = request.get("id").and_then(Value::as_u64) else {
                continue; // a cancel for a call already answered
            };
            let call = self.call(&site, &mut session, &request);
            tokio::pin!(call);
            let answer = loop {
                tokio::select! {
                    answer = &mut call => break answer,
                    next = lines.recv() => match next {
                        Some(v) if v.get("cancel").and_then(Value::as_u64) == Some(id) => {
                            if request.get("op").and_then(Value::as_str) == Some("install")
                                || request.get("op").and_then(Value::as_str) == Some("uninstall")
                            {
                                // Changes to the folder complete: the guest learns the outcome.
                                continue;
                            }
                            break Err(PackagesError::Request("interrupted".into()));
                        }
                        Some(_) => continue,
                        None => return,
                    },
                }
            };
            let mut line = match answer {
                Ok(mut value) => {
                    value["id"] = json!(id);
                    value
                }
                Err(e) => json!({"id": id, "error": e.to_string()}),
            }
            .to_string();
            line.push('\n');
            if write.write_all(line.as_bytes()).await.is_err() {
                return;
            }
        }
    }

    async fn call(
        &self,
        site: &Site,
        session: &mut Session,
        request: &Value,
    ) -> Result<Value, PackagesError> {
        let op = request.get("op").and_then(Value::as_str).unwrap_or("");
        let text = |key: &str| -> Result<String, PackagesError> {
            request
                .get(key)
                .and_then(Value::as_str)
                .map(str::to_owned)
                .ok_or_else(|| PackagesError::Request(format!("`{op}` needs a string `{key}`")))
        };
        if !self.config.enabled && matches!(op, "project" | "metadata" | "fetch" | "install") {
            return Err(PackagesError::Request(
                "installing packages is turned off on this gateway ([packages] enabled = false)"
                    .into(),
            ));
        }
        match op {
            "project" => {
                let project = project_name(&text("name")?)?;
                let files = self.fetcher.project(&project).await?;
                let files: Vec<Value> = files
                    .iter()
                    .map(|f| {
                        json!({
                            "filename": f.filename,
                            "size": f.size,
                            "requires_python": f.requires_python,
                            "yanked": f.yanked,
                        })
                    })
                    .collect();
                Ok(json!({ "files": files }))
            }
            "metadata" => {
                let project = project_name(&text("name")?)?;
                let file = self.fetcher.find(&project, &text("filename")?).await?;
                let metadata = self.fetcher.metadata(&file).await?;
                let name = metadata_name(&metadata);
                Ok(json!({ "metadata": metadata, "name": name }))
            }
            "fetch" => {
                let project = project_name(&text("name")?)?;
                let file = self.fetcher.find(&project, &text("filename")?).await?;
                // Whether the wheel was in the cache already: the guest then says so under its
                // "Downloading" line.
                let cached = match &file.sha256 {
                    Some(sha) => self.fetcher.cached(sha).await?.is_some(),
                    None => false,
                };
                let unpacked = self.fetcher.wheel(&file).await?;
                session
                    .fetched
                    .insert(file.filename.clone(), (file, unpacked));
                Ok(json!({ "ok": true, "cached": cached }))
            }
            "install" => self.install(site, session, request).await,
            "uninstall" => self.uninstall(site, request).await,
            "list" => {
                let state = site.state.lock().await;
                let packages: Vec<&Locked> = state.installed.values().map(|(l, _)| l).collect();
                Ok(json!({ "packages": packages, "problems": state.problems }))
            }
            other => Err(PackagesError::Request(format!(
                "unknown package op {other:?}"
            ))),
        }
    }

    async fn install(
        &self,
        site: &Site,
        session: &mut Session,
        request: &Value,
    ) -> Result<Value, PackagesError> {
        let Some(items) = request.get("packages").and_then(Value::as_array) else {
            return Err(PackagesError::Request("`install` needs `packages`".into()));
        };
        if items.len() > MAX_PER_INSTALL {
            return Err(PackagesError::Cap(format!(
                "one install may name at most {MAX_PER_INSTALL} packages"
            )));
        }
        let requested: Vec<String> = request
            .get("requested")
            .and_then(Value::as_array)
            .map(|a| a.iter().filter_map(Value::as_str).map(canonical).collect())
            .unwrap_or_default();
        let mut adding = Vec::new();
        for item in items {
            let filename = item.get("filename").and_then(Value::as_str).unwrap_or("");
            let Some((file, unpacked)) = session.fetched.get(filename) else {
                return Err(PackagesError::Request(format!(
                    "{filename:?} was not fetched on this connection"
                )));
            };
            let sha = file
                .sha256
                .ok_or_else(|| PackagesError::Request(format!("{filename} has no hash")))?;
            let manifest = &unpacked.manifest;
            let name = metadata_name(&manifest.metadata)
                .unwrap_or(&manifest.name)
                .to_owned();
            adding.push((
                Locked {
                    requested: requested.contains(&canonical(&name)),
                    name,
                    version: manifest.version.clone(),
                    filename: file.filename.clone(),
                    sha256: hex::encode(sha),
                    bytes: manifest.total_bytes(),
                },
                unpacked.clone(),
            ));
        }
        let mut state = site.state.lock().await;
        // The caps, on the set as it would be.
        let mut after: BTreeMap<String, u64> = state
            .installed
            .iter()
            .map(|(k, (l, _))| (k.clone(), l.bytes))
            .collect();
        for (l, _) in &adding {
            after.insert(canonical(&l.name), l.bytes);
        }
        if after.len() > self.config.max_packages {
            return Err(PackagesError::Cap(format!(
                "the workspace would hold {} packages, more than its cap of {} \
                 ([packages] max_packages); nothing was installed",
                after.len(),
                self.config.max_packages
            )));
        }
        let total: u64 = after.values().sum();
        if total > self.config.max_workspace_mb << 20 {
            return Err(PackagesError::Cap(format!(
                "the workspace's packages would take {} MiB, more than its cap of {} MiB \
                 ([packages] max_workspace_mb); nothing was installed",
                total.div_ceil(1 << 20),
                self.config.max_workspace_mb
            )));
        }
        let mut replaced = Vec::new();
        let mut installed = Vec::new();
        for (mut locked, unpacked) in adding {
            let key = canonical(&locked.name);
            if let Some((old, old_files)) = state.installed.remove(&key) {
                unlink(site.dir(), &old_files).await?;
                locked.requested |= old.requested;
                replaced.push(json!({"name": old.name, "version": old.version}));
            }
            link(site.dir(), &unpacked).await?;
            installed.push(json!({"name": locked.name, "version": locked.version}));
            state.installed.insert(key, (locked, unpacked));
        }
        self.write_lock(&site.owner, &state).await?;
        Ok(json!({ "installed": installed, "replaced": replaced }))
    }

    async fn uninstall(&self, site: &Site, request: &Value) -> Result<Value, PackagesError> {
        let Some(names) = request.get("names").and_then(Value::as_array) else {
            return Err(PackagesError::Request("`uninstall` needs `names`".into()));
        };
        let mut state = site.state.lock().await;
        let mut removed = Vec::new();
        let mut missing = Vec::new();
        for name in names.iter().filter_map(Value::as_str) {
            match state.installed.remove(&canonical(name)) {
                Some((locked, files)) => {
                    unlink(site.dir(), &files).await?;
                    removed.push(json!({"name": locked.name, "version": locked.version}));
                }
                None => missing.push(name.to_owned()),
            }
        }
        if !removed.is_empty() {
            self.write_lock(&site.owner, &state).await?;
        }
        Ok(json!({ "removed": removed, "not_installed": missing }))
    }
}

/// What one connection has asked of the index and fetched.
#[derive(Default)]
struct Session {
    fetched: HashMap<String, (index::IndexFile, Arc<fetch::Unpacked>)>,
}

enum LockRead {
    Unavailable(String),
    Damaged(String),
}

fn project_name(name: &str) -> Result<index::ProjectName, PackagesError> {
    index::ProjectName::parse(name).map_err(|e| PackagesError::Fetch(e.into()))
}

fn parse_sha(text: &str) -> Option<[u8; 32]> {
    let bytes = hex::decode(text).ok()?;
    bytes.try_into().ok()
}

/// The `Name:` of a METADATA text.
fn metadata_name(metadata: &str) -> Option<&str> {
    metadata
        .lines()
        .take_while(|l| !l.is_empty())
        .find_map(|l| l.strip_prefix("Name:"))
        .map(str::trim)
}

/// The package fetcher's HTTP client: TLS verified against the host's certificate store (where
/// an operator adds the root of a proxy or a private index) and the bundled Mozilla roots.
fn http_client() -> crate::ask::provider::HttpsClient {
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    let native = rustls_native_certs::load_native_certs();
    for e in &native.errors {
        tracing::warn!(error = %e, "a certificate of the host's store cannot be read");
    }
    let (added, ignored) = roots.add_parsable_certificates(native.certs);
    tracing::debug!(
        added,
        ignored,
        "the package fetcher trusts the host's certificates"
    );
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("ring supports rustls's default protocol versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    let mut http = hyper_util::client::legacy::connect::HttpConnector::new();
    http.enforce_http(false);
    http.set_connect_timeout(Some(std::time::Duration::from_secs(10)));
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1()
        .wrap_connector(http);
    hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new()).build(https)
}

/// Puts `unpacked`'s files into `site` (hard links to the cache; copies where the cache is on
/// another file system).
async fn link(site: &Path, unpacked: &Arc<fetch::Unpacked>) -> Result<(), PackagesError> {
    let site = site.to_owned();
    let unpacked = unpacked.clone();
    tokio::task::spawn_blocking(move || -> Result<(), PackagesError> {
        let err = |e: std::io::Error| PackagesError::Site(e.to_string());
        for file in &unpacked.manifest.files {
            let from = unpacked.root.join(&file.path);
            let to = site.join(&file.path);
            if let Some(parent) = to.parent() {
                std::fs::create_dir_all(parent).map_err(err)?;
            }
            let _ = std::fs::remove_file(&to);
            if std::fs::hard_link(&from, &to).is_err() {
                std::fs::copy(&from, &to).map_err(err)?;
            }
        }
        Ok(())
    })
    .await
    .map_err(|e| PackagesError::Site(e.to_string()))?
}

/// Takes `unpacked`'s files out of `site`, and the folders that leaves empty.
async fn unlink(site: &Path, unpacked: &Arc<fetch::Unpacked>) -> Result<(), PackagesError> {
    let site = site.to_owned();
    let unpacked = unpacked.clone();
    tokio::task::spawn_blocking(move || {
        let mut dirs = std::collections::BTreeSet::new();
        for file in &unpacked.manifest.files {
            let _ = std::fs::remove_file(site.join(&file.path));
            let mut p = Path::new(&file.path).parent();
            while let Some(d) = p.filter(|d| !d.as_os_str().is_empty()) {
                dirs.insert(d.to_owned());
                p = d.parent();
            }
        }
        // Deepest first; a folder another package still uses is not empty and stays.
        for d in dirs.iter().rev() {
            let _ = std::fs::remove_dir(site.join(d));
        }
    })
    .await
    .map_err(|e| PackagesError::Site(e.to_string()))
}

/// One kernel process's way to the service: its site folder and a socket made for it alone,
/// which takes one connection (the kernel's) and is then removed.
pub struct PackageLink {
    service: Arc<Packages>,
    site: Arc<Site>,
    listener: tokio::net::UnixListener,
    path: PathBuf,
}

impl PackageLink {
    /// Prepares `owner`'s site folder and a socket in `runtime_dir`.
    pub async fn open(
        service: &Arc<Packages>,
        owner: &str,
        runtime_dir: &Path,
    ) -> std::io::Result<PackageLink> {
        let site = service.site(owner).await.map_err(std::io::Error::other)?;
        let name = format!("{}-pkg", &uuid::Uuid::new_v4().simple().to_string()[..12]);
        let path = runtime_dir.join(name);
        // A Unix socket path has at most 107 bytes (as the kernels' own sockets, see `client`).
        if path.as_os_str().len() > 107 {
            return Err(std::io::Error::other(format!(
                "the runtime folder {} is too long for Unix socket paths; use a shorter data \
                 folder",
                runtime_dir.display()
            )));
        }
        let _ = std::fs::remove_file(&path);
        let listener = tokio::net::UnixListener::bind(&path)?;
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
        }
        Ok(PackageLink {
            service: service.clone(),
            site,
            listener,
            path,
        })
    }

    /// The site folder and the socket, as a launcher mounts them for the kernel.
    pub fn mount(&self) -> crate::launch::PackageMount {
        crate::launch::PackageMount {
            site: self.site.dir().to_owned(),
            socket: self.path.clone(),
        }
    }

    /// Serves the kernel's connection until it closes or the process ends (`exited`).
    pub fn serve(self, mut exited: tokio::sync::watch::Receiver<bool>) {
        tokio::spawn(async move {
            let accepted = tokio::select! {
                a = self.listener.accept() => a,
                () = crate::until_true(&mut exited) => return,
            };
            let _ = std::fs::remove_file(&self.path);
            let Ok((stream, _)) = accepted else { return };
            let service = self.service.clone();
            let site = self.site.clone();
            tokio::select! {
                () = service.serve(site, stream) => {}
                () = crate::until_true(&mut exited) => {}
            }
        });
    }
}

impl Drop for PackageLink {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_compare_in_pep_503_form() {
        assert_eq!(canonical("Foo_Bar.baz"), "foo-bar-baz");
        assert_eq!(canonical("typing--extensions"), "typing-extensions");
        assert_eq!(
            canonical("jupyterlab_widgets"),
            canonical("JupyterLab-Widgets")
        );
    }

    #[test]
    fn the_metadata_name_is_read_from_the_headers_only() {
        let text = "Metadata-Version: 2.1\nName:  Rich \nVersion: 1\n\nName: not-this\n";
        assert_eq!(metadata_name(text), Some("Rich"));
        assert_eq!(metadata_name("\nName: body-only\n"), None);
    }

    fn unpacked(root: &Path, files: &[&str]) -> Arc<fetch::Unpacked> {
        for f in files {
            let p = root.join(f);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(&p, f.as_bytes()).unwrap();
        }
        Arc::new(fetch::Unpacked {
            sha256: [0; 32],
            filename: "x-1-py3-none-any.whl".into(),
            root: root.to_owned(),
            manifest: wheel::Manifest {
                name: "x".into(),
                version: "1".into(),
                dist_info: "x-1.dist-info".into(),
                files: files
                    .iter()
                    .map(|f| wheel::ManifestFile {
                        path: (*f).to_owned(),
                        size: f.len() as u64,
                    })
                    .collect(),
                skipped: Vec::new(),
                metadata: String::new(),
            },
        })
    }

    #[tokio::test]
    async fn unlinking_a_package_keeps_what_another_shares() {
        let dir = tempfile::tempdir().unwrap();
        let site = dir.path().join("site");
        std::fs::create_dir(&site).unwrap();
        let a = unpacked(
            &dir.path().join("a"),
            &["ns/a/__init__.py", "a-1.dist-info/RECORD"],
        );
        let b = unpacked(
            &dir.path().join("b"),
            &["ns/b/__init__.py", "b-1.dist-info/RECORD"],
        );
        link(&site, &a).await.unwrap();
        link(&site, &b).await.unwrap();
        // Hard links: the site's files are the cache's.
        assert_eq!(
            std::fs::read(site.join("ns/a/__init__.py")).unwrap(),
            b"ns/a/__init__.py"
        );
        unlink(&site, &a).await.unwrap();
        assert!(!site.join("ns/a").exists() && !site.join("a-1.dist-info").exists());
        assert!(
            site.join("ns/b/__init__.py").exists(),
            "the shared folder stays"
        );
        // The cache keeps its copy.
        assert!(dir.path().join("a/ns/a/__init__.py").exists());
        unlink(&site, &b).await.unwrap();
        assert_eq!(std::fs::read_dir(&site).unwrap().count(), 0);
    }

    #[test]
    fn a_lock_file_round_trips_and_refuses_other_shapes() {
        let lock = LockFile {
            sandgate_packages: LOCK_VERSION,
            packages: vec![Locked {
                name: "tinydep".into(),
                version: "2.0".into(),
                filename: "tinydep-2.0-py3-none-any.whl".into(),
                sha256: "ab".repeat(32),
                bytes: 10,
                requested: true,
            }],
        };
        let text = serde_json::to_vec(&lock).unwrap();
        let back: LockFile = serde_json::from_slice(&text).unwrap();
        assert_eq!(back.packages, lock.packages);
        assert!(serde_json::from_slice::<LockFile>(b"[]").is_err());
        assert!(serde_json::from_slice::<LockFile>(b"{\"packages\": []}").is_err());
        assert_eq!(parse_sha(&"ab".repeat(32)), Some([0xab; 32]));
        assert_eq!(parse_sha("abc"), None);
        assert_eq!(parse_sha(&"zz".repeat(32)), None);
    }
}
