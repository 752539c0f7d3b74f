//! The package fetcher: project listings from an index (a PEP 691/503 simple index over
//! HTTP(S), or a local folder of wheels for air-gapped hosts), PEP 658 metadata, and wheels
//! downloaded once, checked against the index's SHA-256 while they stream, and unpacked once
//! into a cache shared by every kernel.
//!
//! The cache folder:
//!
//! ```text
//! tmp/                      downloads and unpacks in progress (emptied when a Fetcher opens)
//! wheels/<sha256>.whl       wheels whose bytes matched the index's SHA-256
//! metadata/<sha256>         PEP 658 metadata files, named by their own SHA-256
//! unpacked/<sha256>/        a wheel's checked tree (see `wheel::unpack`)
//! unpacked/<sha256>.json    its manifest, written last: a tree without one is a leftover
//! ```
//!
//! Everything reaches its final name by a rename from `tmp/`, after it has been checked, so a
//! crash or a dropped future never leaves a partial file under a final name. A cache hit makes
//! no request at all. Concurrent requests for the same file wait for one download. Defaults
//! (see [`FetchLimits`]): wheels up to 100 MiB, pages up to 32 MiB, metadata up to 8 MiB, 60 s
//! for a page and 10 minutes for a wheel, 30 s without a byte counts as stalled, 5 redirects,
//! each to `http`/`https` and never from `https` down to `http`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::{Request, StatusCode, header};
use http_body_util::{BodyExt, Full};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::Instant;
use url::Url;

use super::index::{
    self, FileKind, IndexError, IndexFile, IndexLimits, ProjectName, WheelName, host_of,
};
use super::wheel::{self, Manifest, WheelError, WheelLimits};
use crate::ask::provider::HttpsClient;

/// PyPI's simple index.
pub const PYPI: &str = "https://pypi.org/simple/";

/// What a project page is asked for with: PEP 691 JSON, else HTML.
pub const ACCEPT_PAGE: &str = "application/vnd.pypi.simple.v1+json, text/html;q=0.1";

/// Where packages come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Index {
    /// A simple index (PEP 503/691) at this base URL (`https://pypi.org/simple/`); a project's
    /// page is `{base}{normalised name}/`.
    Url(Url),
    /// A folder of wheels (and sdists) on this host, flat as pip's `--find-links`; hashes are
    /// computed here.
    Folder(PathBuf),
}

impl Index {
    /// PyPI.
    pub fn pypi() -> Index {
        Index::Url(Url::parse(PYPI).expect("a valid constant URL"))
    }

    /// The index for messages: its host, or the folder.
    pub fn describe(&self) -> String {
        match self {
            Index::Url(u) => host_of(u),
            Index::Folder(p) => p.display().to_string(),
        }
    }
}

/// Caps and timeouts of a [`Fetcher`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FetchLimits {
    /// Caps on an index page.
    pub index: IndexLimits,
    /// Caps on a wheel's contents.
    pub wheel: WheelLimits,
    /// Most bytes of one wheel file (default 100 MiB).
    pub max_wheel_bytes: u64,
    /// Most bytes of one PEP 658 metadata file (default 8 MiB).
    pub max_metadata_bytes: u64,
    /// Time for a whole index page or metadata file (default 60 s).
    pub page_timeout: Duration,
    /// Time for a whole wheel download (default 10 minutes).
    pub download_timeout: Duration,
    /// Time without a byte before a transfer counts as stalled (default 30 s).
    pub stall_timeout: Duration,
    /// Most redirects followed for one request (default 5).
    pub max_redirects: usize,
    /// How long a project's listing is reused from memory (default 120 s; zero: never), so that
    /// resolving and then fetching a file asks the index once.
    pub listing_ttl: Duration,
}

impl Default for FetchLimits {
    fn default() -> Self {
        FetchLimits {
            index: IndexLimits::default(),
            wheel: WheelLimits::default(),
            max_wheel_bytes: 100 << 20,
            max_metadata_bytes: 8 << 20,
            page_timeout: Duration::from_secs(60),
            download_timeout: Duration::from_secs(600),
            stall_timeout: Duration::from_secs(30),
            max_redirects: 5,
            listing_ttl: Duration::from_secs(120),
        }
    }
}

/// Why a fetch failed, in words for the user.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    /// The project name is not valid.
    #[error(transparent)]
    Name(#[from] IndexError),
    /// The index has no such project.
    #[error("the index at {host} has no project {project:?}")]
    NoSuchProject {
        /// The project.
        project: String,
        /// The index.
        host: String,
    },
    /// The project page could not be read.
    #[error("the index page of {project:?} from {host}: {source}")]
    Page {
        /// The project.
        project: String,
        /// The index.
        host: String,
        /// Why.
        #[source]
        source: IndexError,
    },
    /// An HTTP status other than success.
    #[error("{host} answered HTTP {status} for {what}")]
    Status {
        /// What was asked for.
        what: String,
        /// The server.
        host: String,
        /// The status.
        status: u16,
    },
    /// The server could not be reached or the connection broke.
    #[error("cannot fetch {what} from {host}: {message}")]
    Network {
        /// What was asked for.
        what: String,
        /// The server.
        host: String,
        /// The cause.
        message: String,
    },
    /// The whole transfer took longer than allowed.
    #[error("{host} did not send {what} within {seconds} s")]
    Timeout {
        /// What was asked for.
        what: String,
        /// The server.
        host: String,
        /// The limit.
        seconds: u64,
    },
    /// No byte came for too long.
    #[error("{host} stopped sending {what} (nothing for {seconds} s)")]
    Stalled {
        /// What was asked for.
        what: String,
        /// The server.
        host: String,
        /// The limit.
        seconds: u64,
    },
    /// More bytes than the cap.
    #[error("{what} from {host} is larger than the cap of {cap} bytes")]
    TooLarge {
        /// What was asked for.
        what: String,
        /// The server.
        host: String,
        /// The cap.
        cap: u64,
    },
    /// A redirect that is not followed.
    #[error("{host} redirected {what} {why}")]
    Redirect {
        /// What was asked for.
        what: String,
        /// The server that redirected.
        host: String,
        /// Why it is not followed.
        why: String,
    },
    /// The index gives no SHA-256 for the file.
    #[error(
        "the index gives no sha256 for {file}; Sandgate installs only hash-checked files \
         (index: {host})"
    )]
    NoHash {
        /// The file.
        file: String,
        /// The index.
        host: String,
    },
    /// The bytes do not match the index's SHA-256.
    #[error("{file} from {host} has sha256 {got}, not {expected} as the index says; refused")]
    HashMismatch {
        /// The file.
        file: String,
        /// The server.
        host: String,
        /// The SHA-256 the index gave, hex.
        expected: String,
        /// The SHA-256 of the bytes received, hex.
        got: String,
    },
    /// Asked to install something that is not a wheel.
    #[error("{file} is not a wheel; Sandgate installs wheels only, never source distributions")]
    NotAWheel {
        /// The file.
        file: String,
    },
    /// A file URL the fetcher does not fetch from.
    #[error("{file} has a URL Sandgate does not fetch from ({why})")]
    BadUrl {
        /// The file.
        file: String,
        /// Why.
        why: &'static str,
    },
    /// The project's listing has no such file.
    #[error("the index at {host} lists no file {file:?} for {project:?}")]
    NoSuchFile {
        /// The project.
        project: String,
        /// The file asked for.
        file: String,
        /// The index.
        host: String,
    },
    /// The wheel was refused.
    #[error("{file}: {source}")]
    Wheel {
        /// The file.
        file: String,
        /// Why.
        #[source]
        source: WheelError,
    },
    /// A metadata file that is not UTF-8.
    #[error("the metadata of {file} from {host} is not UTF-8 text")]
    Metadata {
        /// The file.
        file: String,
        /// The server.
        host: String,
    },
    /// The local folder of wheels could not be read.
    #[error("cannot read the wheel folder {path}: {source}")]
    Folder {
        /// The folder.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The cache could not be read or written.
    #[error("the package cache at {path}: {source}")]
    Cache {
        /// The file or folder.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The index configuration is not usable.
    #[error("the package index {0}")]
    Config(String),
}

impl FetchError {
    fn cache(path: &Path) -> impl FnOnce(std::io::Error) -> FetchError + '_ {
        move |source| FetchError::Cache {
            path: path.to_owned(),
            source,
        }
    }
}

/// A wheel unpacked in the cache: its tree (never written to again) and its manifest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unpacked {
    /// The wheel's SHA-256.
    pub sha256: [u8; 32],
    /// The wheel's file name.
    pub filename: String,
    /// The unpacked tree, `cache/unpacked/<sha256>/`: what goes into a site folder.
    pub root: PathBuf,
    /// What is in it.
    pub manifest: Manifest,
}

/// The manifest file beside a tree.
#[derive(serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Saved {
    format: u32,
    sha256: String,
    filename: String,
    manifest: Manifest,
}

/// A file or folder under `tmp/`, removed when dropped unless kept.
struct Temp(Option<PathBuf>);

impl Temp {
    fn path(&self) -> &Path {
        self.0.as_deref().expect("a live temp path")
    }

    /// Renames it to `dest`; from then on it is no longer removed.
    fn persist(mut self, dest: &Path) -> Result<(), FetchError> {
        let path = self.0.take().expect("a live temp path");
        std::fs::rename(&path, dest).map_err(|source| {
            self.0 = Some(path);
            FetchError::Cache {
                path: dest.to_owned(),
                source,
            }
        })
    }
}

impl Drop for Temp {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            if p.is_dir() {
                let _ = std::fs::remove_dir_all(&p);
            } else {
                let _ = std::fs::remove_file(&p);
            }
        }
    }
}

/// A listing remembered for [`FetchLimits::listing_ttl`].
type Listing = (std::time::Instant, Arc<Vec<IndexFile>>);

struct Inner {
    index: Index,
    client: HttpsClient,
    cache: PathBuf,
    limits: FetchLimits,
    /// One lock per wheel hash, held while that wheel is downloaded or unpacked.
    locks: Mutex<HashMap<[u8; 32], Weak<tokio::sync::Mutex<()>>>>,
    /// Unpacked wheels handed out and still held somewhere.
    live: Mutex<HashMap<[u8; 32], Weak<Unpacked>>>,
    listings: Mutex<HashMap<ProjectName, Listing>>,
    /// SHA-256 of the local folder's files by (name, length, modified), so a listing hashes a
    /// file once.
    folder_hashes: Mutex<HashMap<(String, u64, SystemTime), [u8; 32]>>,
}

/// Fetches projects' listings, metadata and wheels from one index into one cache folder.
/// Cheap to clone; clones share the cache, the locks and the client.
#[derive(Clone)]
pub struct Fetcher {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Fetcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fetcher")
            .field("index", &self.inner.index)
            .field("cache", &self.inner.cache)
            .finish()
    }
}

/// A response whose redirects have been followed.
struct Opened {
    url: Url,
    response: http::Response<hyper::body::Incoming>,
}

/// Reads a body chunk by chunk within a deadline, a stall timeout and a byte cap.
struct BodyReader<'a> {
    body: hyper::body::Incoming,
    deadline: Instant,
    stall: Duration,
    total: Duration,
    cap: u64,
    read: u64,
    what: &'a str,
    host: &'a str,
}

impl BodyReader<'_> {
    async fn chunk(&mut self) -> Result<Option<Bytes>, FetchError> {
        loop {
            let stall_at = Instant::now() + self.stall;
            let frame =
                match tokio::time::timeout_at(stall_at.min(self.deadline), self.body.frame()).await
                {
                    Ok(None) => return Ok(None),
                    Ok(Some(Ok(frame))) => frame,
                    Ok(Some(Err(e))) => {
                        return Err(FetchError::Network {
                            what: self.what.to_owned(),
                            host: self.host.to_owned(),
                            message: e.to_string(),
                        });
                    }
                    Err(_) if Instant::now() >= self.deadline => {
                        return Err(FetchError::Timeout {
                            what: self.what.to_owned(),
                            host: self.host.to_owned(),
                            seconds: self.total.as_secs(),
                        });
                    }
                    Err(_) => {
                        return Err(FetchError::Stalled {
                            what: self.what.to_owned(),
                            host: self.host.to_owned(),
                            seconds: self.stall.as_secs(),
                        });
                    }
                };
            let Ok(data) = frame.into_data() else {
                continue; // trailers
            };
            self.read += data.len() as u64;
            if self.read > self.cap {
                return Err(FetchError::TooLarge {
                    what: self.what.to_owned(),
                    host: self.host.to_owned(),
                    cap: self.cap,
                });
            }
            return Ok(Some(data));
        }
    }

    async fn read_all(mut self) -> Result<Vec<u8>, FetchError> {
        let mut out = Vec::new();
        while let Some(c) = self.chunk().await? {
            out.extend_from_slice(&c);
        }
        Ok(out)
    }
}

fn join_error(e: tokio::task::JoinError) -> FetchError {
    FetchError::Cache {
        path: PathBuf::from("(background task)"),
        source: std::io::Error::other(e.to_string()),
    }
}

impl Fetcher {
    /// A fetcher over `index` with its cache in `cache_dir` (made if missing; its `tmp/` is
    /// emptied, so one gateway uses one cache folder). An index URL must be `http` or `https`
    /// (a missing trailing `/` is added); a folder must exist.
    pub fn new(
        index: Index,
        cache_dir: impl Into<PathBuf>,
        client: HttpsClient,
        limits: FetchLimits,
    ) -> Result<Fetcher, FetchError> {
        let index = match index {
            Index::Url(mut u) => {
                if !matches!(u.scheme(), "http" | "https") || u.host_str().is_none() {
                    return Err(FetchError::Config(format!(
                        "URL {u} is not an http or https URL"
                    )));
                }
                if !u.path().ends_with('/') {
                    u.set_path(&format!("{}/", u.path()));
                }
                u.set_fragment(None);
                Index::Url(u)
            }
            Index::Folder(p) => {
                let p = std::fs::canonicalize(&p).map_err(|source| FetchError::Folder {
                    path: p.clone(),
                    source,
                })?;
                if !p.is_dir() {
                    return Err(FetchError::Config(format!(
                        "folder {} is not a folder",
                        p.display()
                    )));
                }
                Index::Folder(p)
            }
        };
        let cache = cache_dir.into();
        let tmp = cache.join("tmp");
        let _ = std::fs::remove_dir_all(&tmp);
        for sub in ["tmp", "wheels", "metadata", "unpacked"] {
            let dir = cache.join(sub);
            std::fs::create_dir_all(&dir).map_err(FetchError::cache(&dir))?;
        }
        Ok(Fetcher {
            inner: Arc::new(Inner {
                index,
                client,
                cache,
                limits,
                locks: Mutex::default(),
                live: Mutex::default(),
                listings: Mutex::default(),
                folder_hashes: Mutex::default(),
            }),
        })
    }

    /// The index this fetcher reads.
    pub fn index(&self) -> &Index {
        &self.inner.index
    }

    /// The cache folder.
    pub fn cache_dir(&self) -> &Path {
        &self.inner.cache
    }

    fn host(&self) -> String {
        self.inner.index.describe()
    }

    fn temp(&self, ext: &str) -> Temp {
        Temp(Some(
            self.inner
                .cache
                .join("tmp")
                .join(format!("{}.{ext}", uuid::Uuid::new_v4().simple())),
        ))
    }

    /// The files of `project` the index lists (wheels and sdists of that project only; see
    /// [`index::parse_json`]). A listing fetched within [`FetchLimits::listing_ttl`] is reused.
    pub async fn project(&self, project: &ProjectName) -> Result<Vec<IndexFile>, FetchError> {
        Ok(self.listing(project).await?.as_ref().clone())
    }

    async fn listing(&self, project: &ProjectName) -> Result<Arc<Vec<IndexFile>>, FetchError> {
        let ttl = self.inner.limits.listing_ttl;
        if !ttl.is_zero()
            && let Some((at, files)) = self.inner.listings.lock().expect("listings").get(project)
            && at.elapsed() < ttl
        {
            return Ok(files.clone());
        }
        let files = Arc::new(match &self.inner.index {
            Index::Url(base) => self.project_from_url(base, project).await?,
            Index::Folder(dir) => self.project_from_folder(dir, project).await?,
        });
        if !ttl.is_zero() {
            let mut listings = self.inner.listings.lock().expect("listings");
            listings.retain(|_, (at, _)| at.elapsed() < ttl);
            listings.insert(project.clone(), (std::time::Instant::now(), files.clone()));
        }
        Ok(files)
    }

    /// The file named `filename` in `project`'s listing: how a request that names a file (from
    /// a kernel) becomes an [`IndexFile`] without trusting any URL it carries.
    pub async fn find(
        &self,
        project: &ProjectName,
        filename: &str,
    ) -> Result<IndexFile, FetchError> {
        self.listing(project)
            .await?
            .iter()
            .find(|f| f.filename == filename)
            .cloned()
            .ok_or_else(|| FetchError::NoSuchFile {
                project: project.to_string(),
                file: if index::safe_filename(filename) {
                    filename.to_owned()
                } else {
                    "(an unsafe name)".into()
                },
                host: self.host(),
            })
    }

    async fn project_from_url(
        &self,
        base: &Url,
        project: &ProjectName,
    ) -> Result<Vec<IndexFile>, FetchError> {
        let url = base
            .join(&format!("{project}/"))
            .map_err(|e| FetchError::Config(format!("URL {base} cannot take a project: {e}")))?;
        let what = format!("the index page of {project}");
        let limits = &self.inner.limits;
        let deadline = Instant::now() + limits.page_timeout;
        let opened = self
            .open(url, ACCEPT_PAGE, &what, deadline, limits.page_timeout)
            .await?;
        let host = host_of(&opened.url);
        match opened.response.status() {
            StatusCode::OK => {}
            StatusCode::NOT_FOUND | StatusCode::GONE => {
                return Err(FetchError::NoSuchProject {
                    project: project.to_string(),
                    host,
                });
            }
            s => {
                return Err(FetchError::Status {
                    what,
                    host,
                    status: s.as_u16(),
                });
            }
        }
        let cap = limits.index.max_page_bytes as u64;
        check_length(&opened.response, cap, &what, &host)?;
        let content_type = opened
            .response
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .split(';')
            .next()
            .unwrap_or("")
            .trim()
            .to_ascii_lowercase();
        let body = BodyReader {
            body: opened.response.into_body(),
            deadline,
            stall: limits.stall_timeout,
            total: limits.page_timeout,
            cap,
            read: 0,
            what: &what,
            host: &host,
        }
        .read_all()
        .await?;
        let json = match content_type.as_str() {
            "application/vnd.pypi.simple.v1+json" | "application/json" => true,
            "text/html" | "application/vnd.pypi.simple.v1+html" | "application/xhtml+xml" => false,
            // A plain file server: tell by the first byte.
            _ => body.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'{'),
        };
        let (page_url, project2, index_limits) =
            (opened.url.clone(), project.clone(), limits.index);
        let parsed = tokio::task::spawn_blocking(move || {
            if json {
                index::parse_json(&project2, &page_url, &body, &index_limits)
            } else {
                index::parse_html(&project2, &page_url, &body, &index_limits)
            }
        })
        .await
        .map_err(join_error)?;
        parsed.map_err(|source| FetchError::Page {
            project: project.to_string(),
            host,
            source,
        })
    }

    async fn project_from_folder(
        &self,
        dir: &Path,
        project: &ProjectName,
    ) -> Result<Vec<IndexFile>, FetchError> {
        let inner = self.inner.clone();
        let (dir, project) = (dir.to_owned(), project.clone());
        tokio::task::spawn_blocking(move || inner.folder_listing(&dir, &project))
            .await
            .map_err(join_error)?
    }

    /// Sends a GET, following redirects (each `http`/`https`, never `https` to `http`, at most
    /// [`FetchLimits::max_redirects`]), within `deadline`.
    async fn open(
        &self,
        mut url: Url,
        accept: &str,
        what: &str,
        deadline: Instant,
        total: Duration,
    ) -> Result<Opened, FetchError> {
        let limits = &self.inner.limits;
        let mut hops = 0;
        loop {
            let host = host_of(&url);
            let req = Request::get(url.as_str())
                .header(header::ACCEPT, accept)
                .header(
                    header::USER_AGENT,
                    concat!("sandgate/", env!("CARGO_PKG_VERSION")),
                )
                .body(Full::new(Bytes::new()))
                .map_err(|e| FetchError::BadUrl {
                    file: what.to_owned(),
                    why: if e.is::<http::uri::InvalidUri>() {
                        "not a valid URI"
                    } else {
                        "not a valid request"
                    },
                })?;
            let response =
                match tokio::time::timeout_at(deadline, self.inner.client.request(req)).await {
                    Ok(Ok(r)) => r,
                    Ok(Err(e)) => {
                        let mut message = e.to_string();
                        let mut source = std::error::Error::source(&e);
                        while let Some(s) = source {
                            message = format!("{message}: {s}");
                            source = s.source();
                        }
                        return Err(FetchError::Network {
                            what: what.to_owned(),
                            host,
                            message,
                        });
                    }
                    Err(_) => {
                        return Err(FetchError::Timeout {
                            what: what.to_owned(),
                            host,
                            seconds: total.as_secs(),
                        });
                    }
                };
            if !response.status().is_redirection() || response.status() == StatusCode::NOT_MODIFIED
            {
                return Ok(Opened { url, response });
            }
            let redirect = |why: String| FetchError::Redirect {
                what: what.to_owned(),
                host: host.clone(),
                why,
            };
            if hops == limits.max_redirects {
                return Err(redirect(format!(
                    "more than {} times",
                    limits.max_redirects
                )));
            }
            let location = response
                .headers()
                .get(header::LOCATION)
                .and_then(|v| v.to_str().ok())
                .ok_or_else(|| redirect("without a readable Location".into()))?;
            let next = url
                .join(location)
                .map_err(|_| redirect("to a URL that cannot be read".into()))?;
            if !matches!(next.scheme(), "http" | "https") || next.host_str().is_none() {
                return Err(redirect(format!(
                    "to a {} URL (only http and https are followed)",
                    next.scheme()
                )));
            }
            if url.scheme() == "https" && next.scheme() == "http" {
                return Err(redirect("from https down to http".into()));
            }
            url = next;
            url.set_fragment(None);
            hops += 1;
        }
    }

    /// The wheel file and hash `file` must have to be fetched at all.
    fn checked<'a>(&self, file: &'a IndexFile) -> Result<(&'a WheelName, [u8; 32]), FetchError> {
        let FileKind::Wheel(name) = &file.kind else {
            return Err(FetchError::NotAWheel {
                file: file.filename.clone(),
            });
        };
        let Some(sha) = file.sha256 else {
            return Err(FetchError::NoHash {
                file: file.filename.clone(),
                host: self.host(),
            });
        };
        Ok((name, sha))
    }

    async fn lock(&self, sha: [u8; 32]) -> tokio::sync::OwnedMutexGuard<()> {
        let lock = {
            let mut locks = self.inner.locks.lock().expect("locks");
            if locks.len() > 256 {
                locks.retain(|_, w| w.strong_count() > 0);
            }
            match locks.get(&sha).and_then(Weak::upgrade) {
                Some(l) => l,
                None => {
                    let l = Arc::new(tokio::sync::Mutex::new(()));
                    locks.insert(sha, Arc::downgrade(&l));
                    l
                }
            }
        };
        lock.lock_owned().await
    }

    fn live(&self, sha: &[u8; 32]) -> Option<Arc<Unpacked>> {
        self.inner
            .live
            .lock()
            .expect("live")
            .get(sha)
            .and_then(Weak::upgrade)
    }

    fn remember(&self, unpacked: Unpacked) -> Arc<Unpacked> {
        self.inner.remember(unpacked)
    }

    /// A wheel already unpacked in the cache, by its SHA-256, without any request: what a new
    /// kernel's recorded packages come back from. `None` when it is not there (or its tree was
    /// damaged, which is then removed).
    pub async fn cached(&self, sha256: &[u8; 32]) -> Result<Option<Arc<Unpacked>>, FetchError> {
        if let Some(u) = self.live(sha256) {
            return Ok(Some(u));
        }
        let _guard = self.lock(*sha256).await;
        if let Some(u) = self.live(sha256) {
            return Ok(Some(u));
        }
        let inner = self.inner.clone();
        let sha = *sha256;
        let loaded = tokio::task::spawn_blocking(move || inner.load_unpacked(&sha))
            .await
            .map_err(join_error)??;
        Ok(loaded.map(|u| self.remember(u)))
    }

    /// The wheel `file`, downloaded (checked against the index's SHA-256 while it streams),
    /// unpacked and checked (see [`wheel::unpack`]), from the cache when it is there. Refused
    /// when `file` is not a wheel or the index gave no SHA-256.
    pub async fn wheel(&self, file: &IndexFile) -> Result<Arc<Unpacked>, FetchError> {
        let (name, sha) = self.checked(file)?;
        if let Some(u) = self.live(&sha) {
            return Ok(u);
        }
        let guard = self.lock(sha).await;
        if let Some(u) = self.live(&sha) {
            return Ok(u);
        }
        let inner = self.inner.clone();
        if let Some(u) = tokio::task::spawn_blocking(move || inner.load_unpacked(&sha))
            .await
            .map_err(join_error)??
        {
            return Ok(self.remember(u));
        }
        let path = self.ensure_wheel(file, &sha).await?;
        let inner = self.inner.clone();
        let (name, filename) = (name.clone(), file.filename.clone());
        // The lock goes into the blocking task: a caller that gives up does not let another
        // start unpacking the same wheel beside this one.
        tokio::task::spawn_blocking(move || {
            let _guard = guard;
            let unpacked = inner.unpack_into_cache(&path, &name, &sha, &filename)?;
            Ok(inner.remember(unpacked))
        })
        .await
        .map_err(join_error)?
    }

    /// The core metadata (`METADATA`) of the wheel `file`: from the cache, else the index's PEP
    /// 658 file when the index gives its SHA-256 (checked), else from the wheel itself
    /// (downloaded into the cache, checked, not unpacked).
    pub async fn metadata(&self, file: &IndexFile) -> Result<String, FetchError> {
        let (name, sha) = self.checked(file)?;
        if let Some(u) = self.live(&sha) {
            return Ok(u.manifest.metadata.clone());
        }
        let wheel_path = self.wheel_path(&sha);
        if !wheel_path.exists() {
            let inner = self.inner.clone();
            if let Some(u) = tokio::task::spawn_blocking(move || inner.load_unpacked(&sha))
                .await
                .map_err(join_error)??
            {
                return Ok(u.manifest.metadata);
            }
            if let (Index::Url(_), Some(Some(meta_sha))) =
                (&self.inner.index, file.core_metadata_sha256)
                && let Some(text) = self.pep658(file, &meta_sha).await?
            {
                return Ok(text);
            }
        }
        let guard = self.lock(sha).await;
        let path = self.ensure_wheel(file, &sha).await?;
        drop(guard);
        let (name, limits) = (name.clone(), self.inner.limits.wheel);
        let filename = file.filename.clone();
        tokio::task::spawn_blocking(move || {
            wheel::read_metadata(&path, &name, &limits).map_err(|source| FetchError::Wheel {
                file: filename,
                source,
            })
        })
        .await
        .map_err(join_error)?
    }

    /// The PEP 658 metadata file of `file`, from the cache or the index; `None` when the index
    /// does not serve it (the caller then reads the wheel).
    async fn pep658(
        &self,
        file: &IndexFile,
        meta_sha: &[u8; 32],
    ) -> Result<Option<String>, FetchError> {
        let cached = self
            .inner
            .cache
            .join("metadata")
            .join(hex::encode(meta_sha));
        if let Ok(bytes) = std::fs::read(&cached) {
            return Ok(String::from_utf8(bytes).ok());
        }
        let url = Url::parse(&format!("{}.metadata", file.url.as_str())).map_err(|_| {
            FetchError::BadUrl {
                file: file.filename.clone(),
                why: "its metadata URL cannot be made",
            }
        })?;
        let what = format!("the metadata of {}", file.filename);
        let limits = &self.inner.limits;
        let deadline = Instant::now() + limits.page_timeout;
        let opened = self
            .open(url, "*/*", &what, deadline, limits.page_timeout)
            .await?;
        let host = host_of(&opened.url);
        if opened.response.status() != StatusCode::OK {
            tracing::info!(file = %file.filename, status = %opened.response.status(),
                "no PEP 658 metadata file; reading the wheel instead");
            return Ok(None);
        }
        check_length(&opened.response, limits.max_metadata_bytes, &what, &host)?;
        let body = BodyReader {
            body: opened.response.into_body(),
            deadline,
            stall: limits.stall_timeout,
            total: limits.page_timeout,
            cap: limits.max_metadata_bytes,
            read: 0,
            what: &what,
            host: &host,
        }
        .read_all()
        .await?;
        let got = ring::digest::digest(&ring::digest::SHA256, &body);
        if got.as_ref() != meta_sha {
            return Err(FetchError::HashMismatch {
                file: format!("{}.metadata", file.filename),
                host,
                expected: hex::encode(meta_sha),
                got: hex::encode(got.as_ref()),
            });
        }
        let text = String::from_utf8(body).map_err(|_| FetchError::Metadata {
            file: file.filename.clone(),
            host,
        })?;
        let tmp = self.temp("metadata");
        std::fs::write(tmp.path(), text.as_bytes()).map_err(FetchError::cache(tmp.path()))?;
        tmp.persist(&cached)?;
        Ok(Some(text))
    }

    fn wheel_path(&self, sha: &[u8; 32]) -> PathBuf {
        self.inner
            .cache
            .join("wheels")
            .join(format!("{}.whl", hex::encode(sha)))
    }

    /// The checked wheel file in the cache, downloaded (or copied from the folder) if missing.
    /// The caller holds the hash's lock.
    async fn ensure_wheel(&self, file: &IndexFile, sha: &[u8; 32]) -> Result<PathBuf, FetchError> {
        let dest = self.wheel_path(sha);
        if dest.is_file() {
            return Ok(dest);
        }
        let limits = &self.inner.limits;
        let what = file.filename.clone();
        if let Some(size) = file.size
            && size > limits.max_wheel_bytes
        {
            return Err(FetchError::TooLarge {
                what,
                host: file.host(),
                cap: limits.max_wheel_bytes,
            });
        }
        let tmp = self.temp("whl");
        let mut out = tokio::fs::File::create(tmp.path())
            .await
            .map_err(FetchError::cache(tmp.path()))?;
        let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
        let host = match &self.inner.index {
            Index::Url(_) => {
                if !matches!(file.url.scheme(), "http" | "https") {
                    return Err(FetchError::BadUrl {
                        file: what,
                        why: "only http and https are fetched",
                    });
                }
                let deadline = Instant::now() + limits.download_timeout;
                let opened = self
                    .open(
                        file.url.clone(),
                        "*/*",
                        &what,
                        deadline,
                        limits.download_timeout,
                    )
                    .await?;
                let host = host_of(&opened.url);
                if opened.response.status() != StatusCode::OK {
                    return Err(FetchError::Status {
                        what,
                        host,
                        status: opened.response.status().as_u16(),
                    });
                }
                check_length(&opened.response, limits.max_wheel_bytes, &what, &host)?;
                tracing::info!(file = %what, %host, "downloading a wheel");
                let mut body = BodyReader {
                    body: opened.response.into_body(),
                    deadline,
                    stall: limits.stall_timeout,
                    total: limits.download_timeout,
                    cap: limits.max_wheel_bytes,
                    read: 0,
                    what: &what,
                    host: &host,
                };
                while let Some(chunk) = body.chunk().await? {
                    ctx.update(&chunk);
                    out.write_all(&chunk)
                        .await
                        .map_err(FetchError::cache(tmp.path()))?;
                }
                host
            }
            Index::Folder(dir) => {
                if !index::safe_filename(&file.filename) {
                    return Err(FetchError::BadUrl {
                        file: what,
                        why: "its name is not a plain file name",
                    });
                }
                let src = dir.join(&file.filename);
                let folder_err = |source| FetchError::Folder {
                    path: src.clone(),
                    source,
                };
                let mut input = tokio::fs::File::open(&src).await.map_err(folder_err)?;
                let mut buf = vec![0u8; 64 << 10];
                let mut read = 0u64;
                loop {
                    let n = input.read(&mut buf).await.map_err(folder_err)?;
                    if n == 0 {
                        break;
                    }
                    read += n as u64;
                    if read > limits.max_wheel_bytes {
                        return Err(FetchError::TooLarge {
                            what,
                            host: self.host(),
                            cap: limits.max_wheel_bytes,
                        });
                    }
                    ctx.update(&buf[..n]);
                    out.write_all(&buf[..n])
                        .await
                        .map_err(FetchError::cache(tmp.path()))?;
                }
                self.host()
            }
        };
        out.flush().await.map_err(FetchError::cache(tmp.path()))?;
        drop(out);
        let got = ctx.finish();
        if got.as_ref() != sha {
            return Err(FetchError::HashMismatch {
                file: what,
                host,
                expected: hex::encode(sha),
                got: hex::encode(got.as_ref()),
            });
        }
        tmp.persist(&dest)?;
        Ok(dest)
    }
}

/// Refuses a response whose `Content-Length` is over `cap` before reading it.
fn check_length<B>(
    response: &http::Response<B>,
    cap: u64,
    what: &str,
    host: &str,
) -> Result<(), FetchError> {
    let len = response
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    match len {
        Some(n) if n > cap => Err(FetchError::TooLarge {
            what: what.to_owned(),
            host: host.to_owned(),
            cap,
        }),
        _ => Ok(()),
    }
}

impl Inner {
    /// Hands out `unpacked`, remembered so that later callers get the same one while it is held.
    /// Called with the hash's lock held, so that a caller waiting on it finds this one.
    fn remember(&self, unpacked: Unpacked) -> Arc<Unpacked> {
        let arc = Arc::new(unpacked);
        let mut live = self.live.lock().expect("live");
        if live.len() > 256 {
            live.retain(|_, w| w.strong_count() > 0);
        }
        live.insert(arc.sha256, Arc::downgrade(&arc));
        arc
    }

    fn tree(&self, sha: &[u8; 32]) -> (PathBuf, PathBuf) {
        let hex = hex::encode(sha);
        let dir = self.cache.join("unpacked");
        (dir.join(&hex), dir.join(format!("{hex}.json")))
    }

    /// An unpacked tree whose manifest is there and whose files are all there at their sizes;
    /// anything less is removed (a leftover or damage) and `None` returned.
    fn load_unpacked(&self, sha: &[u8; 32]) -> Result<Option<Unpacked>, FetchError> {
        let (tree, manifest_path) = self.tree(sha);
        let saved = match std::fs::read(&manifest_path) {
            Ok(bytes) => serde_json::from_slice::<Saved>(&bytes).ok(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(FetchError::cache(&manifest_path)(e)),
        };
        let whole = saved.as_ref().is_some_and(|s| {
            s.format == 1
                && s.sha256 == hex::encode(sha)
                && s.manifest.files.iter().all(|f| {
                    std::fs::symlink_metadata(tree.join(&f.path))
                        .is_ok_and(|m| m.is_file() && m.len() == f.size)
                })
        });
        match saved {
            Some(s) if whole => Ok(Some(Unpacked {
                sha256: *sha,
                filename: s.filename,
                root: tree,
                manifest: s.manifest,
            })),
            _ => {
                if saved.is_some() {
                    tracing::warn!(tree = %tree.display(), "a damaged unpacked wheel in the cache; unpacking it again");
                }
                let _ = std::fs::remove_file(&manifest_path);
                if tree.exists() {
                    std::fs::remove_dir_all(&tree).map_err(FetchError::cache(&tree))?;
                }
                Ok(None)
            }
        }
    }

    /// Unpacks the checked wheel at `path` into `tmp/`, renames the tree into place, then
    /// writes its manifest beside it. A wheel that is refused is removed from the cache.
    fn unpack_into_cache(
        &self,
        path: &Path,
        name: &WheelName,
        sha: &[u8; 32],
        filename: &str,
    ) -> Result<Unpacked, FetchError> {
        let (tree, manifest_path) = self.tree(sha);
        if tree.exists() {
            std::fs::remove_dir_all(&tree).map_err(FetchError::cache(&tree))?;
        }
        let tmp_dir = self
            .cache
            .join("tmp")
            .join(uuid::Uuid::new_v4().simple().to_string());
        let manifest = match wheel::unpack(path, name, &tmp_dir, &self.limits.wheel) {
            Ok(m) => m,
            Err(source) => {
                let _ = std::fs::remove_file(path);
                return Err(FetchError::Wheel {
                    file: filename.to_owned(),
                    source,
                });
            }
        };
        Temp(Some(tmp_dir)).persist(&tree)?;
        let saved = Saved {
            format: 1,
            sha256: hex::encode(sha),
            filename: filename.to_owned(),
            manifest,
        };
        let json = serde_json::to_vec(&saved).map_err(|e| FetchError::Cache {
            path: manifest_path.clone(),
            source: std::io::Error::other(e),
        })?;
        let tmp = Temp(Some(
            self.cache
                .join("tmp")
                .join(format!("{}.json", uuid::Uuid::new_v4().simple())),
        ));
        std::fs::write(tmp.path(), json).map_err(FetchError::cache(tmp.path()))?;
        tmp.persist(&manifest_path)?;
        Ok(Unpacked {
            sha256: *sha,
            filename: filename.to_owned(),
            root: tree,
            manifest: saved.manifest,
        })
    }

    /// The files of `project` in the local folder, hashed here.
    fn folder_listing(
        &self,
        dir: &Path,
        project: &ProjectName,
    ) -> Result<Vec<IndexFile>, FetchError> {
        let folder_err = |source| FetchError::Folder {
            path: dir.to_owned(),
            source,
        };
        let mut out = Vec::new();
        for entry in std::fs::read_dir(dir).map_err(folder_err)? {
            let entry = entry.map_err(folder_err)?;
            let Ok(filename) = entry.file_name().into_string() else {
                continue;
            };
            let Some(kind) = index::file_kind(&filename, project) else {
                continue;
            };
            let path = entry.path();
            let Ok(meta) = std::fs::metadata(&path) else {
                continue;
            };
            if !meta.is_file() {
                continue;
            }
            if out.len() >= self.limits.index.max_files {
                return Err(FetchError::Page {
                    project: project.to_string(),
                    host: dir.display().to_string(),
                    source: IndexError::TooManyFiles {
                        cap: self.limits.index.max_files,
                    },
                });
            }
            let key = (
                filename.clone(),
                meta.len(),
                meta.modified().unwrap_or(SystemTime::UNIX_EPOCH),
            );
            let known = self
                .folder_hashes
                .lock()
                .expect("hashes")
                .get(&key)
                .copied();
            let sha = match known {
                Some(h) => h,
                None => {
                    let h = hash_file(&path).map_err(|source| FetchError::Folder {
                        path: path.clone(),
                        source,
                    })?;
                    self.folder_hashes.lock().expect("hashes").insert(key, h);
                    h
                }
            };
            let Ok(url) = Url::from_file_path(&path) else {
                continue;
            };
            out.push(IndexFile {
                filename,
                kind,
                url,
                sha256: Some(sha),
                requires_python: None,
                yanked: false,
                yanked_reason: None,
                size: Some(meta.len()),
                core_metadata_sha256: None,
            });
        }
        out.sort_by(|a, b| a.filename.cmp(&b.filename));
        Ok(out)
    }
}

fn hash_file(path: &Path) -> std::io::Result<[u8; 32]> {
    use std::io::Read;
    let mut f = std::fs::File::open(path)?;
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    let mut buf = vec![0u8; 64 << 10];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        ctx.update(&buf[..n]);
    }
    let mut out = [0u8; 32];
    out.copy_from_slice(ctx.finish().as_ref());
    Ok(out)
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;
    use std::net::SocketAddr;

    use futures_util::StreamExt as _;
    use http::HeaderValue;
    use http_body_util::StreamBody;
    use http_body_util::combinators::BoxBody;
    use hyper::body::Frame;
    use hyper_util::rt::TokioIo;

    use super::super::wheel::build::{file, wheel};
    use super::*;

    type Body = BoxBody<Bytes, Infallible>;
    type Route = Arc<dyn Fn(&str) -> http::Response<Body> + Send + Sync>;

    /// An HTTP server on 127.0.0.1 answering by path, counting requests per path and keeping
    /// the last `Accept` header; stopped when dropped.
    struct Server {
        addr: SocketAddr,
        hits: Arc<Mutex<HashMap<String, usize>>>,
        accept: Arc<Mutex<Option<String>>>,
        task: tokio::task::JoinHandle<()>,
    }

    impl Drop for Server {
        fn drop(&mut self) {
            self.task.abort();
        }
    }

    impl Server {
        async fn start(
            route: impl Fn(&str) -> http::Response<Body> + Send + Sync + 'static,
        ) -> Server {
            let route: Route = Arc::new(route);
            let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0))
                .await
                .unwrap();
            let addr = listener.local_addr().unwrap();
            let hits: Arc<Mutex<HashMap<String, usize>>> = Arc::default();
            let accept: Arc<Mutex<Option<String>>> = Arc::default();
            let (h, a) = (hits.clone(), accept.clone());
            let task = tokio::spawn(async move {
                let mut conns = tokio::task::JoinSet::new();
                loop {
                    let Ok((stream, _)) = listener.accept().await else {
                        return;
                    };
                    let (route, h, a) = (route.clone(), h.clone(), a.clone());
                    conns.spawn(async move {
                        let service = hyper::service::service_fn(
                            move |req: http::Request<hyper::body::Incoming>| {
                                let path = req.uri().path().to_owned();
                                *h.lock().unwrap().entry(path.clone()).or_default() += 1;
                                *a.lock().unwrap() = req
                                    .headers()
                                    .get(header::ACCEPT)
                                    .and_then(|v| v.to_str().ok())
                                    .map(str::to_owned);
                                let resp = route(&path);
                                async move { Ok::<_, Infallible>(resp) }
                            },
                        );
                        let _ = hyper::server::conn::http1::Builder::new()
                            .serve_connection(TokioIo::new(stream), service)
                            .await;
                    });
                }
            });
            Server {
                addr,
                hits,
                accept,
                task,
            }
        }

        fn url(&self, path: &str) -> String {
            format!("http://{}{path}", self.addr)
        }

        fn hits(&self, path: &str) -> usize {
            self.hits.lock().unwrap().get(path).copied().unwrap_or(0)
        }

        fn total_hits(&self) -> usize {
            self.hits.lock().unwrap().values().sum()
        }
    }

    fn full(status: u16, content_type: &str, body: impl Into<Bytes>) -> http::Response<Body> {
        let mut r = http::Response::new(http_body_util::Full::new(body.into()).boxed());
        *r.status_mut() = StatusCode::from_u16(status).unwrap();
        if !content_type.is_empty() {
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_str(content_type).unwrap(),
            );
        }
        r
    }

    fn redirect(status: u16, to: &str) -> http::Response<Body> {
        let mut r = full(status, "", Bytes::new());
        r.headers_mut()
            .insert(header::LOCATION, HeaderValue::from_str(to).unwrap());
        r
    }

    /// A chunked body that never ends.
    fn endless() -> http::Response<Body> {
        let stream = futures_util::stream::repeat_with(|| {
            Ok::<_, Infallible>(Frame::data(Bytes::from_static(&[b'x'; 16 << 10])))
        });
        http::Response::new(BodyExt::boxed(StreamBody::new(stream)))
    }

    /// `prefix`, then nothing, forever; `sent` fires once the prefix has been handed to hyper.
    fn stalled(
        prefix: Vec<u8>,
        sent: Option<tokio::sync::oneshot::Sender<()>>,
    ) -> http::Response<Body> {
        let mut sent = sent;
        let first = futures_util::stream::once(async move {
            Ok::<_, Infallible>(Frame::data(Bytes::from(prefix)))
        });
        let signal = futures_util::stream::poll_fn(move |_| {
            if let Some(s) = sent.take() {
                let _ = s.send(());
            }
            std::task::Poll::<Option<Result<Frame<Bytes>, Infallible>>>::Pending
        });
        http::Response::new(BodyExt::boxed(StreamBody::new(first.chain(signal))))
    }

    fn sha(bytes: &[u8]) -> [u8; 32] {
        let mut out = [0u8; 32];
        out.copy_from_slice(ring::digest::digest(&ring::digest::SHA256, bytes).as_ref());
        out
    }

    fn demo_wheel(version: &str) -> Vec<u8> {
        wheel(
            &format!("demo-{version}"),
            vec![file(
                "demo/__init__.py",
                format!("VERSION = {version:?}\n").as_bytes(),
            )],
        )
    }

    fn json_page(files: &[(&str, &str, Option<[u8; 32]>)]) -> String {
        let files: Vec<serde_json::Value> = files
            .iter()
            .map(|(name, url, h)| {
                let hashes = match h {
                    Some(h) => serde_json::json!({"sha256": hex::encode(h)}),
                    None => serde_json::json!({}),
                };
                serde_json::json!({"filename": name, "url": url, "hashes": hashes})
            })
            .collect();
        serde_json::json!({"meta": {"api-version": "1.1"}, "name": "demo", "files": files})
            .to_string()
    }

    const JSON: &str = "application/vnd.pypi.simple.v1+json";
    const WHL: &str = "demo-1.0-py3-none-any.whl";

    fn fetcher(server: &Server, cache: &Path) -> Fetcher {
        fetcher_with(server, cache, FetchLimits::default())
    }

    fn fetcher_with(server: &Server, cache: &Path, limits: FetchLimits) -> Fetcher {
        Fetcher::new(
            Index::Url(Url::parse(&server.url("/simple")).unwrap()),
            cache,
            crate::ask::provider::http_client(),
            limits,
        )
        .unwrap()
    }

    fn demo() -> ProjectName {
        ProjectName::parse("Demo").unwrap()
    }

    /// Files under a cache subfolder.
    fn count(cache: &Path, sub: &str) -> usize {
        std::fs::read_dir(cache.join(sub))
            .map(|d| d.count())
            .unwrap_or(0)
    }

    /// A server with a JSON page listing `demo-1.0` (hash `listed`) served with bytes `served`.
    async fn serve_demo(served: Vec<u8>, listed: Option<[u8; 32]>) -> Server {
        let page = Arc::new(std::sync::OnceLock::<String>::new());
        let p = page.clone();
        let served = Bytes::from(served);
        let server = Server::start(move |path| match path {
            "/simple/demo/" => full(200, JSON, p.get().unwrap().clone()),
            "/files/demo-1.0-py3-none-any.whl" => {
                full(200, "application/octet-stream", served.clone())
            }
            _ => full(404, "text/plain", "not found"),
        })
        .await;
        page.set(json_page(&[
            (WHL, "/files/demo-1.0-py3-none-any.whl", listed),
            ("demo-1.0.tar.gz", "/files/demo-1.0.tar.gz", listed),
        ]))
        .unwrap();
        server
    }

    #[tokio::test]
    async fn a_json_index_lists_fetches_and_caches() {
        let bytes = demo_wheel("1.0");
        let server = serve_demo(bytes.clone(), Some(sha(&bytes))).await;
        let tmp = tempfile::tempdir().unwrap();
        let f = fetcher(&server, tmp.path());
        let files = f.project(&demo()).await.unwrap();
        assert_eq!(server.accept.lock().unwrap().as_deref(), Some(ACCEPT_PAGE));
        assert_eq!(files.len(), 2);
        assert_eq!(
            files[1].kind,
            FileKind::Sdist {
                version: "1.0".into()
            }
        );
        assert!(matches!(
            f.wheel(&files[1]).await,
            Err(FetchError::NotAWheel { .. })
        ));
        let w = f.find(&demo(), WHL).await.unwrap();
        assert_eq!(server.hits("/simple/demo/"), 1, "the listing is reused");
        let u = f.wheel(&w).await.unwrap();
        assert_eq!(u.sha256, sha(&bytes));
        assert_eq!(
            u.root,
            tmp.path().join("unpacked").join(hex::encode(sha(&bytes)))
        );
        assert_eq!(
            std::fs::read_to_string(u.root.join("demo/__init__.py")).unwrap(),
            "VERSION = \"1.0\"\n"
        );
        assert!(
            u.manifest
                .files
                .iter()
                .any(|m| m.path == "demo-1.0.dist-info/METADATA")
        );
        assert!(
            tmp.path()
                .join("wheels")
                .join(format!("{}.whl", hex::encode(sha(&bytes))))
                .is_file()
        );
        assert_eq!(f.metadata(&w).await.unwrap(), u.manifest.metadata);
        assert_eq!(server.hits("/files/demo-1.0-py3-none-any.whl"), 1);
        assert_eq!(count(tmp.path(), "tmp"), 0);

        // The next gateway on the same cache: no request at all.
        drop(u);
        let before = server.total_hits();
        let f2 = fetcher(&server, tmp.path());
        let u2 = f2.wheel(&w).await.unwrap();
        assert_eq!(f2.metadata(&w).await.unwrap(), u2.manifest.metadata);
        let by_hash = f2.cached(&sha(&bytes)).await.unwrap().unwrap();
        assert!(Arc::ptr_eq(&u2, &by_hash));
        assert_eq!(f2.cached(&[0u8; 32]).await.unwrap(), None);
        assert_eq!(server.total_hits(), before, "cache hits make no request");

        // A tree without its manifest is a leftover: removed and unpacked again from the cached
        // wheel, still without a request.
        drop((u2, by_hash));
        std::fs::remove_file(
            tmp.path()
                .join("unpacked")
                .join(format!("{}.json", hex::encode(sha(&bytes)))),
        )
        .unwrap();
        let f3 = fetcher(&server, tmp.path());
        assert_eq!(f3.cached(&sha(&bytes)).await.unwrap(), None);
        assert!(
            !tmp.path()
                .join("unpacked")
                .join(hex::encode(sha(&bytes)))
                .exists()
        );
        let u3 = f3.wheel(&w).await.unwrap();
        assert!(u3.root.join("demo/__init__.py").is_file());
        assert_eq!(server.total_hits(), before);

        let err = f
            .project(&ProjectName::parse("nothere").unwrap())
            .await
            .unwrap_err();
        assert!(matches!(err, FetchError::NoSuchProject { .. }), "{err}");
        assert_eq!(
            err.to_string(),
            format!("the index at {} has no project \"nothere\"", server.addr)
        );
        let err = f
            .find(&demo(), "demo-9.9-py3-none-any.whl")
            .await
            .unwrap_err();
        assert!(matches!(err, FetchError::NoSuchFile { .. }), "{err}");
    }

    #[tokio::test]
    async fn an_html_index_works_too() {
        let bytes = demo_wheel("1.0");
        let h = hex::encode(sha(&bytes));
        let page = format!(
            "<html><body><a href=\"../../files/{WHL}#sha256={h}\" data-requires-python=\"&gt;=3.8\">{WHL}</a></body></html>"
        );
        let served = Bytes::from(bytes.clone());
        let server = Server::start(move |path| match path {
            "/simple/demo/" => full(200, "text/html; charset=utf-8", page.clone()),
            "/files/demo-1.0-py3-none-any.whl" => full(200, "", served.clone()),
            _ => full(404, "", ""),
        })
        .await;
        let tmp = tempfile::tempdir().unwrap();
        let f = fetcher(&server, tmp.path());
        let files = f.project(&demo()).await.unwrap();
        assert_eq!(files.len(), 1);
        assert_eq!(files[0].requires_python.as_deref(), Some(">=3.8"));
        assert_eq!(
            files[0].url.as_str(),
            server.url("/files/demo-1.0-py3-none-any.whl")
        );
        let u = f.wheel(&files[0]).await.unwrap();
        assert!(u.root.join("demo/__init__.py").is_file());
    }

    #[tokio::test]
    async fn a_wrong_hash_or_no_hash_is_refused_and_nothing_stays() {
        let bytes = demo_wheel("1.0");
        let server = serve_demo(bytes.clone(), Some(sha(b"something else"))).await;
        let tmp = tempfile::tempdir().unwrap();
        let f = fetcher(&server, tmp.path());
        let w = f.find(&demo(), WHL).await.unwrap();
        let err = f.wheel(&w).await.unwrap_err();
        assert!(matches!(err, FetchError::HashMismatch { .. }), "{err}");
        assert!(err.to_string().contains(&hex::encode(sha(&bytes))), "{err}");
        for sub in ["tmp", "wheels", "unpacked"] {
            assert_eq!(count(tmp.path(), sub), 0, "{sub}");
        }

        let server = serve_demo(bytes.clone(), None).await;
        let f = fetcher(&server, tmp.path());
        let w = f.find(&demo(), WHL).await.unwrap();
        let err = f.wheel(&w).await.unwrap_err();
        assert_eq!(
            err.to_string(),
            format!(
                "the index gives no sha256 for {WHL}; Sandgate installs only hash-checked files \
                 (index: {})",
                server.addr
            )
        );
        assert!(matches!(
            f.metadata(&w).await,
            Err(FetchError::NoHash { .. })
        ));
        assert_eq!(server.hits("/files/demo-1.0-py3-none-any.whl"), 0);
    }

    #[tokio::test]
    async fn oversize_and_endless_bodies_stop_at_the_cap() {
        let bytes = demo_wheel("1.0");
        let limits = FetchLimits {
            max_wheel_bytes: 200,
            index: IndexLimits {
                max_page_bytes: 100_000,
                max_files: 100,
            },
            ..FetchLimits::default()
        };
        // With a Content-Length: refused before reading.
        let server = serve_demo(bytes.clone(), Some(sha(&bytes))).await;
        let tmp = tempfile::tempdir().unwrap();
        let f = fetcher_with(&server, tmp.path(), limits);
        let w = f.find(&demo(), WHL).await.unwrap();
        let err = f.wheel(&w).await.unwrap_err();
        assert!(
            matches!(err, FetchError::TooLarge { cap: 200, .. }),
            "{err}"
        );
        assert!(
            err.to_string().contains("larger than the cap of 200 bytes"),
            "{err}"
        );

        // Endless chunked bodies, for a wheel and for a page.
        let h = sha(&bytes);
        let server = Server::start(move |path| match path {
            "/simple/demo/" => full(200, JSON, json_page(&[(WHL, "/files/w.whl", Some(h))])),
            "/simple/endless/" => endless(),
            _ => endless(),
        })
        .await;
        let f = fetcher_with(&server, tmp.path(), limits);
        let w = f.find(&demo(), WHL).await.unwrap();
        let err = f.wheel(&w).await.unwrap_err();
        assert!(
            matches!(err, FetchError::TooLarge { cap: 200, .. }),
            "{err}"
        );
        let err = f
            .project(&ProjectName::parse("endless").unwrap())
            .await
            .unwrap_err();
        assert!(
            matches!(err, FetchError::TooLarge { cap: 100_000, .. }),
            "{err}"
        );
        // A size the index announces over the cap: no request at all.
        let mut big = w.clone();
        big.size = Some(10_000);
        let before = server.total_hits();
        assert!(matches!(
            f.wheel(&big).await,
            Err(FetchError::TooLarge { .. })
        ));
        assert_eq!(server.total_hits(), before);
        for sub in ["tmp", "wheels", "unpacked"] {
            assert_eq!(count(tmp.path(), sub), 0, "{sub}");
        }
    }

    #[tokio::test]
    async fn a_stalled_body_times_out() {
        let h = sha(b"whatever");
        let server = Server::start(move |path| match path {
            "/simple/demo/" => full(200, JSON, json_page(&[(WHL, "/files/w.whl", Some(h))])),
            _ => stalled(b"PK".to_vec(), None),
        })
        .await;
        let tmp = tempfile::tempdir().unwrap();
        let limits = FetchLimits {
            stall_timeout: Duration::from_millis(200),
            ..FetchLimits::default()
        };
        let f = fetcher_with(&server, tmp.path(), limits);
        let w = f.find(&demo(), WHL).await.unwrap();
        let err = f.wheel(&w).await.unwrap_err();
        assert!(matches!(err, FetchError::Stalled { .. }), "{err}");
        // An overall timeout shorter than the stall timeout wins.
        let limits = FetchLimits {
            download_timeout: Duration::from_millis(200),
            ..FetchLimits::default()
        };
        let f = fetcher_with(&server, tmp.path(), limits);
        let err = f.wheel(&w).await.unwrap_err();
        assert!(matches!(err, FetchError::Timeout { .. }), "{err}");
        assert_eq!(count(tmp.path(), "tmp") + count(tmp.path(), "wheels"), 0);
    }

    #[tokio::test]
    async fn redirects_are_followed_within_bounds() {
        let bytes = demo_wheel("1.0");
        let h = sha(&bytes);
        let served = Bytes::from(bytes.clone());
        let server = Server::start(move |path| match path {
            "/simple/demo/" => redirect(301, "/mirror/demo/"),
            "/mirror/demo/" => full(
                200,
                JSON,
                json_page(&[
                    (WHL, "/files/moved.whl", Some(h)),
                    ("demo-2.0-py3-none-any.whl", "/files/loop", Some(h)),
                    ("demo-3.0-py3-none-any.whl", "/files/to-file", Some(h)),
                ]),
            ),
            "/files/moved.whl" => redirect(302, "real/demo-1.0-py3-none-any.whl"),
            "/files/real/demo-1.0-py3-none-any.whl" => full(200, "", served.clone()),
            "/files/loop" => redirect(307, "/files/loop"),
            "/files/to-file" => redirect(302, "file:///etc/passwd"),
            _ => full(404, "", ""),
        })
        .await;
        let tmp = tempfile::tempdir().unwrap();
        let f = fetcher(&server, tmp.path());
        let files = f.project(&demo()).await.unwrap();
        // The page's links resolve against where it was finally served from.
        assert_eq!(files[0].url.as_str(), server.url("/files/moved.whl"));
        let u = f.wheel(&files[0]).await.unwrap();
        assert!(u.root.join("demo/__init__.py").is_file());
        let mut looping = files[1].clone();
        looping.sha256 = Some([1; 32]);
        let err = f.wheel(&looping).await.unwrap_err();
        assert!(err.to_string().contains("more than 5 times"), "{err}");
        assert_eq!(server.hits("/files/loop"), 6);
        let mut to_file = files[2].clone();
        to_file.sha256 = Some([2; 32]);
        let err = f.wheel(&to_file).await.unwrap_err();
        assert!(err.to_string().contains("to a file URL"), "{err}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_requests_share_one_download() {
        let bytes = demo_wheel("1.0");
        let server = serve_demo(bytes.clone(), Some(sha(&bytes))).await;
        let tmp = tempfile::tempdir().unwrap();
        let f = fetcher(&server, tmp.path());
        let w = f.find(&demo(), WHL).await.unwrap();
        let tasks: Vec<_> = (0..8)
            .map(|_| {
                let (f, w) = (f.clone(), w.clone());
                tokio::spawn(async move { f.wheel(&w).await })
            })
            .collect();
        let mut got = Vec::new();
        for t in tasks {
            got.push(t.await.unwrap().unwrap());
        }
        assert!(got.iter().all(|u| Arc::ptr_eq(u, &got[0])));
        assert_eq!(server.hits("/files/demo-1.0-py3-none-any.whl"), 1);
    }

    #[tokio::test]
    async fn a_dropped_fetch_leaves_no_partial_file() {
        let h = sha(b"whatever");
        let (tx, rx) = tokio::sync::oneshot::channel();
        let tx = Mutex::new(Some(tx));
        let server = Server::start(move |path| match path {
            "/simple/demo/" => full(200, JSON, json_page(&[(WHL, "/files/w.whl", Some(h))])),
            _ => stalled(vec![b'P'; 5000], tx.lock().unwrap().take()),
        })
        .await;
        let tmp = tempfile::tempdir().unwrap();
        let f = fetcher(&server, tmp.path());
        let w = f.find(&demo(), WHL).await.unwrap();
        {
            let fut = f.wheel(&w);
            tokio::pin!(fut);
            tokio::select! {
                r = &mut fut => panic!("the fetch ended: {r:?}"),
                _ = rx => {}
            }
            // Give the fetch the prefix: it is waiting on the stalled body now.
            let poll = futures_util::poll!(&mut fut);
            assert!(poll.is_pending());
        }
        assert_eq!(count(tmp.path(), "tmp"), 0);
        assert_eq!(count(tmp.path(), "wheels"), 0);
        assert_eq!(count(tmp.path(), "unpacked"), 0);
    }

    #[tokio::test]
    async fn hostile_wheels_are_refused_after_download_and_removed() {
        let traversal = wheel("demo-1.0", vec![file("../escape.py", b"x")]);
        let compiled = wheel(
            "demo-2.0",
            vec![file("demo/_speedups.cpython-315-wasm32-wasi.so", b"x")],
        );
        let (h1, h2) = (sha(&traversal), sha(&compiled));
        let (t, c) = (Bytes::from(traversal), Bytes::from(compiled));
        let server = Server::start(move |path| match path {
            "/simple/demo/" => full(
                200,
                JSON,
                json_page(&[
                    (WHL, "/files/1.whl", Some(h1)),
                    ("demo-2.0-py3-none-any.whl", "/files/2.whl", Some(h2)),
                ]),
            ),
            "/files/1.whl" => full(200, "", t.clone()),
            "/files/2.whl" => full(200, "", c.clone()),
            _ => full(404, "", ""),
        })
        .await;
        let tmp = tempfile::tempdir().unwrap();
        let f = fetcher(&server, tmp.path());
        let files = f.project(&demo()).await.unwrap();
        let err = f.wheel(&files[0]).await.unwrap_err();
        assert!(
            matches!(
                &err,
                FetchError::Wheel {
                    source: WheelError::UnsafePath { .. },
                    ..
                }
            ),
            "{err}"
        );
        let err = f.wheel(&files[1]).await.unwrap_err();
        assert_eq!(
            err.to_string(),
            "demo-2.0-py3-none-any.whl: the wheel contains a compiled extension, \
             demo/_speedups.cpython-315-wasm32-wasi.so"
        );
        assert!(!tmp.path().join("escape.py").exists());
        for sub in ["tmp", "wheels", "unpacked"] {
            assert_eq!(count(tmp.path(), sub), 0, "{sub}");
        }
    }

    #[tokio::test]
    async fn pep658_metadata_is_used_and_checked() {
        let bytes = demo_wheel("1.0");
        let meta = "Metadata-Version: 2.1\nName: demo\nVersion: 1.0\nRequires-Dist: other\n";
        let (h, mh) = (sha(&bytes), sha(meta.as_bytes()));
        let page = serde_json::json!({"meta": {"api-version": "1.1"}, "files": [
            {"filename": WHL, "url": "/files/demo-1.0-py3-none-any.whl",
             "hashes": {"sha256": hex::encode(h)}, "core-metadata": {"sha256": hex::encode(mh)}},
            {"filename": "demo-2.0-py3-none-any.whl", "url": "/files/demo-2.0-py3-none-any.whl",
             "hashes": {"sha256": hex::encode(h)}, "core-metadata": {"sha256": hex::encode([3u8; 32])}},
        ]})
        .to_string();
        let server = Server::start(move |path| match path {
            "/simple/demo/" => full(200, JSON, page.clone()),
            "/files/demo-1.0-py3-none-any.whl.metadata" => full(200, "", meta),
            "/files/demo-2.0-py3-none-any.whl.metadata" => full(200, "", meta),
            _ => full(404, "", ""),
        })
        .await;
        let tmp = tempfile::tempdir().unwrap();
        let f = fetcher(&server, tmp.path());
        let files = f.project(&demo()).await.unwrap();
        assert_eq!(f.metadata(&files[0]).await.unwrap(), meta);
        assert_eq!(server.hits("/files/demo-1.0-py3-none-any.whl"), 0);
        // Cached by its hash: asked again, no request.
        let before = server.total_hits();
        assert_eq!(
            fetcher(&server, tmp.path())
                .metadata(&files[0])
                .await
                .unwrap(),
            meta
        );
        assert_eq!(server.total_hits(), before);
        let err = f.metadata(&files[1]).await.unwrap_err();
        assert!(matches!(err, FetchError::HashMismatch { .. }), "{err}");
    }

    #[tokio::test]
    async fn a_local_folder_is_an_index() {
        let folder = tempfile::tempdir().unwrap();
        let bytes = demo_wheel("1.0");
        std::fs::write(folder.path().join(WHL), &bytes).unwrap();
        std::fs::write(folder.path().join("demo-0.9.tar.gz"), b"sdist").unwrap();
        std::fs::write(folder.path().join("other-1.0-py3-none-any.whl"), b"x").unwrap();
        std::fs::write(folder.path().join("notes.txt"), b"x").unwrap();
        let tmp = tempfile::tempdir().unwrap();
        let f = Fetcher::new(
            Index::Folder(folder.path().to_owned()),
            tmp.path(),
            crate::ask::provider::http_client(),
            FetchLimits::default(),
        )
        .unwrap();
        let files = f.project(&demo()).await.unwrap();
        let names: Vec<&str> = files.iter().map(|f| f.filename.as_str()).collect();
        assert_eq!(names, ["demo-0.9.tar.gz", WHL]);
        assert_eq!(files[1].sha256, Some(sha(&bytes)));
        assert_eq!(files[1].size, Some(bytes.len() as u64));
        assert!(matches!(
            f.wheel(&files[0]).await,
            Err(FetchError::NotAWheel { .. })
        ));
        let u = f.wheel(&files[1]).await.unwrap();
        assert!(u.root.join("demo/__init__.py").is_file());
        assert!(f.metadata(&files[1]).await.unwrap().contains("Name: demo"));

        // A file changed after the listing no longer matches its hash.
        let tmp2 = tempfile::tempdir().unwrap();
        let f2 = Fetcher::new(
            Index::Folder(folder.path().to_owned()),
            tmp2.path(),
            crate::ask::provider::http_client(),
            FetchLimits::default(),
        )
        .unwrap();
        std::fs::write(folder.path().join(WHL), demo_wheel("1.0.0")).unwrap();
        let err = f2.wheel(&files[1]).await.unwrap_err();
        assert!(matches!(err, FetchError::HashMismatch { .. }), "{err}");
    }

    #[test]
    fn bad_index_configs_are_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let client = crate::ask::provider::http_client;
        let err = Fetcher::new(
            Index::Url(Url::parse("ftp://example.invalid/simple/").unwrap()),
            tmp.path(),
            client(),
            FetchLimits::default(),
        )
        .unwrap_err();
        assert!(
            err.to_string().contains("not an http or https URL"),
            "{err}"
        );
        let err = Fetcher::new(
            Index::Folder(tmp.path().join("missing")),
            tmp.path(),
            client(),
            FetchLimits::default(),
        )
        .unwrap_err();
        assert!(matches!(err, FetchError::Folder { .. }), "{err}");
    }
}
