//! Sealed session folders copied to an S3-compatible object store (`recording.storage`), and
//! checked there: every object's SHA-256 against the manifest, after the upload, before the
//! copy counts as stored. The local folder is never touched (it stays sealed); the session
//! database records where and when each run was stored.
//!
//! Uploads run on their own task from a bounded queue: a slow or unreachable store never
//! slows a session; a run that cannot be uploaded is retried with backoff, counted and
//! logged, and runs sealed while the node was down (or whose upload never finished) are
//! queued again at start from the database.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use object_store::aws::AmazonS3Builder;
use object_store::buffered::BufWriter;
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, ObjectStoreExt};
use serde::Deserialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;

use super::seal::{Manifest, MANIFEST, SIGNATURE};

/// `[recording.storage]`: where sealed folders are copied.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StorageSection {
    /// The S3 endpoint (`https://s3.ap-south-1.amazonaws.com`, or a compatible server's URL).
    pub endpoint: String,
    pub bucket: String,
    #[serde(default = "default_region")]
    pub region: String,
    /// Objects go under `<prefix>/<session>/<run>/`.
    #[serde(default)]
    pub prefix: String,
    pub access_key_id: String,
    /// A file holding the secret access key (never the key itself in the config).
    pub secret_access_key_file: PathBuf,
    /// Allow a plain-HTTP endpoint (a local test server); off, only HTTPS.
    #[serde(default)]
    pub allow_http: bool,
}

fn default_region() -> String {
    "us-east-1".into()
}

#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("cannot read the storage secret key {path}: {source}")]
    Secret {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("object store: {0}")]
    Store(#[from] object_store::Error),
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the sealed folder {0} has no readable manifest")]
    NoManifest(PathBuf),
    #[error("{key} in the store does not match the manifest (SHA-256 {found}, sealed {sealed})")]
    Mismatch {
        key: String,
        found: String,
        sealed: String,
    },
}

/// Counters for `/metrics`.
#[derive(Debug, Default)]
pub struct StorageStats {
    pub uploaded: AtomicU64,
    pub failures: AtomicU64,
    pub pending: AtomicU64,
    pub bytes: AtomicU64,
}

/// One sealed run to copy.
#[derive(Debug, Clone)]
pub struct UploadJob {
    pub folder: PathBuf,
    pub session: String,
    pub run: String,
}

#[derive(Clone)]
pub struct Store {
    store: Arc<dyn ObjectStore>,
    prefix: String,
    bucket: String,
}

/// Runs waiting for the upload task, at most.
pub const UPLOAD_QUEUE: usize = 256;
/// Bytes read from a file per write to the store.
const CHUNK: usize = 1 << 20;

impl Store {
    pub fn new(cfg: &StorageSection) -> Result<Store, StorageError> {
        // reqwest's TLS takes the process's rustls provider: ring, as everywhere else here.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let secret = std::fs::read_to_string(&cfg.secret_access_key_file).map_err(|source| {
            StorageError::Secret {
                path: cfg.secret_access_key_file.clone(),
                source,
            }
        })?;
        let store = AmazonS3Builder::new()
            .with_endpoint(&cfg.endpoint)
            .with_bucket_name(&cfg.bucket)
            .with_region(&cfg.region)
            .with_access_key_id(&cfg.access_key_id)
            .with_secret_access_key(secret.trim())
            .with_allow_http(cfg.allow_http)
            .build()?;
        Ok(Store {
            store: Arc::new(store),
            prefix: cfg.prefix.trim_matches('/').to_owned(),
            bucket: cfg.bucket.clone(),
        })
    }

    /// The key prefix of a run: `<prefix>/<session>/<run>`.
    pub fn run_key(&self, session: &str, run: &str) -> String {
        if self.prefix.is_empty() {
            format!("{session}/{run}")
        } else {
            format!("{}/{session}/{run}", self.prefix)
        }
    }

    /// Where a run is, as the database records it.
    pub fn run_url(&self, session: &str, run: &str) -> String {
        format!("s3://{}/{}/", self.bucket, self.run_key(session, run))
    }

    /// Copies every file of a sealed folder (the manifest and its signature last), then reads
    /// each back and checks its SHA-256 against the manifest.
    pub async fn upload(&self, job: &UploadJob) -> Result<u64, StorageError> {
        let manifest = read_manifest(&job.folder)?;
        let key = self.run_key(&job.session, &job.run);
        let mut bytes = 0;
        let mut names: Vec<String> = manifest.files.iter().map(|f| f.path.clone()).collect();
        names.push(MANIFEST.into());
        names.push(SIGNATURE.into());
        for name in &names {
            bytes += self
                .put_file(&job.folder.join(name), &format!("{key}/{name}"))
                .await?;
        }
        for f in &manifest.files {
            let at = format!("{key}/{}", f.path);
            let found = self.sha256(&at).await?;
            if found != f.sha256 {
                return Err(StorageError::Mismatch {
                    key: at,
                    found,
                    sealed: f.sha256.clone(),
                });
            }
        }
        Ok(bytes)
    }

    async fn put_file(&self, path: &Path, key: &str) -> Result<u64, StorageError> {
        let read = |source| StorageError::Read {
            path: path.to_path_buf(),
            source,
        };
        let mut file = tokio::fs::File::open(path).await.map_err(read)?;
        let mut w = BufWriter::new(self.store.clone(), ObjectPath::from(key));
        let mut buf = vec![0u8; CHUNK];
        let mut total = 0u64;
        loop {
            let n = file.read(&mut buf).await.map_err(read)?;
            if n == 0 {
                break;
            }
            w.write_all(&buf[..n]).await.map_err(|e| {
                StorageError::Store(object_store::Error::Generic {
                    store: "S3",
                    source: Box::new(e),
                })
            })?;
            total += n as u64;
        }
        w.shutdown().await.map_err(|e| {
            StorageError::Store(object_store::Error::Generic {
                store: "S3",
                source: Box::new(e),
            })
        })?;
        Ok(total)
    }

    /// SHA-256 of an object, read as a stream.
    async fn sha256(&self, key: &str) -> Result<String, StorageError> {
        let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
        let mut stream = self.store.get(&ObjectPath::from(key)).await?.into_stream();
        while let Some(chunk) = stream.next().await {
            ctx.update(&chunk?);
        }
        Ok(super::hex(ctx.finish().as_ref()))
    }

    /// Downloads a stored run (every object under its key) into `into`, for `meridian verify`.
    pub async fn fetch(
        &self,
        session: &str,
        run: &str,
        into: &Path,
    ) -> Result<usize, StorageError> {
        let key = self.run_key(session, run);
        let prefix = ObjectPath::from(key.as_str());
        let mut list = self.store.list(Some(&prefix));
        let mut n = 0;
        while let Some(meta) = list.next().await {
            let meta = meta?;
            let rel = meta
                .location
                .as_ref()
                .strip_prefix(key.as_str())
                .unwrap_or(meta.location.as_ref())
                .trim_start_matches('/')
                .to_owned();
            // Keys come from the store: never write outside `into`.
            if rel.is_empty() || rel.split('/').any(|c| c == ".." || c.is_empty()) {
                continue;
            }
            let dest = into.join(&rel);
            if let Some(parent) = dest.parent() {
                tokio::fs::create_dir_all(parent)
                    .await
                    .map_err(|source| StorageError::Read {
                        path: parent.to_path_buf(),
                        source,
                    })?;
            }
            let body = self.store.get(&meta.location).await?.bytes().await?;
            tokio::fs::write(&dest, &body)
                .await
                .map_err(|source| StorageError::Read {
                    path: dest.clone(),
                    source,
                })?;
            n += 1;
        }
        Ok(n)
    }
}

fn read_manifest(folder: &Path) -> Result<Manifest, StorageError> {
    std::fs::read(folder.join(MANIFEST))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .ok_or_else(|| StorageError::NoManifest(folder.to_path_buf()))
}

/// The upload task's end of the queue.
#[derive(Clone)]
pub struct Uploads {
    tx: mpsc::Sender<UploadJob>,
    pub stats: Arc<StorageStats>,
}

impl Uploads {
    /// Queues a sealed run; `false` (counted, logged) when the queue is full: the run stays
    /// unstored in the database and is queued again at the next start.
    pub fn queue(&self, job: UploadJob) -> bool {
        match self.tx.try_send(job) {
            Ok(()) => {
                self.stats.pending.fetch_add(1, Relaxed);
                true
            }
            Err(e) => {
                self.stats.failures.fetch_add(1, Relaxed);
                tracing::error!(error = %e, "upload queue full: the run is stored at the next start");
                false
            }
        }
    }
}

/// Longest wait between two attempts at one run.
const MAX_BACKOFF: Duration = Duration::from_secs(300);

/// Starts the upload task; `stored` is told each run stored and checked (with its URL).
pub fn start(store: Store, stored: impl Fn(&UploadJob, String) + Send + 'static) -> Uploads {
    let (tx, mut rx) = mpsc::channel::<UploadJob>(UPLOAD_QUEUE);
    let stats = Arc::new(StorageStats::default());
    let s = stats.clone();
    tokio::spawn(async move {
        while let Some(job) = rx.recv().await {
            let mut wait = Duration::from_secs(1);
            loop {
                match store.upload(&job).await {
                    Ok(bytes) => {
                        s.uploaded.fetch_add(1, Relaxed);
                        s.bytes.fetch_add(bytes, Relaxed);
                        tracing::info!(session = %job.session, run = %job.run, bytes, "session stored and checked");
                        stored(&job, store.run_url(&job.session, &job.run));
                        break;
                    }
                    Err(e) => {
                        s.failures.fetch_add(1, Relaxed);
                        tracing::error!(session = %job.session, run = %job.run, error = %e, retry_in = ?wait, "session not stored yet");
                        tokio::time::sleep(wait).await;
                        wait = (wait * 2).min(MAX_BACKOFF);
                    }
                }
            }
            s.pending.fetch_sub(1, Relaxed);
        }
    });
    Uploads { tx, stats }
}
