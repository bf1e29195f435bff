//! The model cache on disk: `ditfleet-worker fetch-model` fills `<cache>/<version>` once from S3 or
//! HTTPS, and `ditfleet-worker verify-model` proves it before a worker starts.
//!
//! Checksums are a `sha256sum`-format list (`<hex>  <relative path>`), given by the operator (the
//! chart's ConfigMap) or shipped next to the checkpoint (`SHA256SUMS`). Hashing a Flux.1-dev
//! checkpoint (~35 GB) takes minutes, so it is done once per content: whoever hashed the files
//! records each one's sha256, size and mtime in `<version>/.ditfleet-verified`, and a later check
//! trusts a file whose entry names the expected sha256 and whose size and mtime are unchanged; any
//! other file is hashed again. The record guards against accidents (a truncated copy, a file
//! replaced or rewritten), not against someone who can write the volume and could rewrite the
//! record as well; `force` hashes everything.
//!
//! A fetch never exposes a partial checkpoint: files are downloaded, and hashed while they are
//! written, into a staging directory on the same volume; the list and the record are written and
//! the directory is renamed into place in one step. Readers (workers mount the cache read-only)
//! see either no `<version>` or a complete, verified one.

use std::collections::BTreeMap;
use std::fmt::Display;
use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use ditfleet_common::ident::{UnsafeName, join_within, segment};
use futures_util::{Stream, StreamExt, TryStreamExt};
use object_store::{ObjectStore, ObjectStoreExt};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;
use tracing::{info, warn};

/// The verification record inside a version directory.
pub const RECORD_FILE: &str = ".ditfleet-verified";
/// Downloads in progress, next to the versions (a dot name can never be a version).
const STAGING_DIR: &str = ".ditfleet-staging";
/// Staging directories older than this are left over from a killed fetch and are removed.
const STALE_STAGING: Duration = Duration::from_secs(24 * 3600);
const RECORD_FORMAT: u32 = 1;
const DOWNLOAD_ATTEMPTS: u32 = 3;

#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error(transparent)]
    UnsafeName(#[from] UnsafeName),
    #[error("checksum list {origin}, line {line}: {why}")]
    BadList {
        origin: String,
        line: usize,
        why: String,
    },
    #[error("no checksum list: {0}")]
    NoList(String),
    #[error("{} of {total} model files in {} failed verification:\n  {}", .problems.len(), .dir.display(), .problems.join("\n  "))]
    Verification {
        dir: PathBuf,
        total: usize,
        problems: Vec<String>,
    },
    #[error("{}: {source}", .path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("model source: {0}")]
    Source(String),
    #[error("downloading {what}: {why}")]
    Download {
        what: String,
        why: String,
        /// Worth another attempt (a dropped connection, a server error), unlike a refusal.
        retry: bool,
    },
    #[error("{what} is corrupt: {size} bytes with sha256 {actual}, expected {expected}")]
    Corrupt {
        what: String,
        size: u64,
        actual: String,
        expected: String,
    },
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> CacheError + '_ {
    move |source| CacheError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Relative path -> lowercase hex sha256, from a `sha256sum`-format list.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Checksums(BTreeMap<String, String>);

impl Checksums {
    /// Parses `<64 hex> <space or *><path>` lines (blank lines and `#` comments are skipped). Every
    /// path must stay inside the model directory: its `/`-separated parts are plain segments.
    pub fn parse(text: &str, origin: &str) -> Result<Self, CacheError> {
        let mut files = BTreeMap::new();
        for (i, line) in text.lines().enumerate() {
            let bad = |why: String| CacheError::BadList {
                origin: origin.to_string(),
                line: i + 1,
                why,
            };
            let line = line.trim_end_matches('\r');
            if line.trim().is_empty() || line.starts_with('#') {
                continue;
            }
            let (hash, rest) = line
                .split_at_checked(64)
                .ok_or_else(|| bad("expected `<sha256>  <path>`".into()))?;
            if !hash.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(bad("expected `<sha256>  <path>`".into()));
            }
            let path = rest
                .strip_prefix("  ")
                .or_else(|| rest.strip_prefix(" *"))
                .ok_or_else(|| bad("expected two spaces (or ` *`) between sha256 and path".into()))?;
            let path = path.strip_prefix("./").unwrap_or(path);
            check_relative(path)?;
            if files
                .insert(path.to_string(), hash.to_ascii_lowercase())
                .is_some()
            {
                return Err(bad(format!("{path:?} is listed twice")));
            }
        }
        if files.is_empty() {
            return Err(CacheError::NoList(format!("{origin} names no file")));
        }
        Ok(Self(files))
    }

    /// The list in `path`; `None` when the file is missing or holds only blank lines (the chart's
    /// ConfigMap when no checksums are given in the values).
    pub fn read(path: &Path) -> Result<Option<Self>, CacheError> {
        match std::fs::read_to_string(path) {
            Ok(text) if text.trim().is_empty() => Ok(None),
            Ok(text) => Self::parse(&text, &path.display().to_string()).map(Some),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io_err(path)(e)),
        }
    }

    /// The list in `sha256sum` format (sorted by path).
    pub fn to_sha256sums(&self) -> String {
        self.0.iter().map(|(p, h)| format!("{h}  {p}\n")).collect()
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.0.iter().map(|(p, h)| (p.as_str(), h.as_str()))
    }
}

/// `rel` (a listed path, `/`-separated) as a path inside `dir`: every part goes through
/// [`segment`], so `..`, absolute paths, hidden names and backslashes are refused.
fn file_path(dir: &Path, rel: &str) -> Result<PathBuf, UnsafeName> {
    let parts: Vec<&str> = rel.split('/').collect();
    join_within(dir, "model file", &parts)
}

fn check_relative(rel: &str) -> Result<(), UnsafeName> {
    file_path(Path::new("/model"), rel).map(|_| ())
}

/// What the record says about one file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Entry {
    sha256: String,
    size: u64,
    mtime_s: i64,
    mtime_ns: i64,
}

impl Entry {
    fn of(sha256: &str, meta: &std::fs::Metadata) -> Self {
        Self {
            sha256: sha256.to_string(),
            size: meta.len(),
            mtime_s: meta.mtime(),
            mtime_ns: meta.mtime_nsec(),
        }
    }
}

/// `<version>/.ditfleet-verified`: the files as they were when their sha256 was last computed.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Record {
    format: u32,
    verified_by: String,
    files: BTreeMap<String, Entry>,
}

fn read_record(dir: &Path) -> Option<Record> {
    let path = dir.join(RECORD_FILE);
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
        Err(e) => {
            warn!(path = %path.display(), error = %e, "verification record unreadable; hashing every file");
            return None;
        }
    };
    match serde_json::from_str::<Record>(&text) {
        Ok(r) if r.format == RECORD_FORMAT => Some(r),
        Ok(r) => {
            warn!(path = %path.display(), format = r.format, "verification record of another format; hashing every file");
            None
        }
        Err(e) => {
            warn!(path = %path.display(), error = %e, "verification record unreadable; hashing every file");
            None
        }
    }
}

/// Writes the record through a temporary file and a rename, so a reader never sees half of it.
fn write_record(dir: &Path, files: BTreeMap<String, Entry>) -> Result<(), CacheError> {
    let record = Record {
        format: RECORD_FORMAT,
        verified_by: format!("ditfleet-worker {}", env!("CARGO_PKG_VERSION")),
        files,
    };
    let text = serde_json::to_string_pretty(&record).expect("the record serializes");
    let tmp = dir.join(format!("{RECORD_FILE}.tmp-{}", std::process::id()));
    write_synced(&tmp, text.as_bytes())?;
    let path = dir.join(RECORD_FILE);
    std::fs::rename(&tmp, &path).map_err(io_err(&path))?;
    sync_dir(dir)
}

fn write_synced(path: &Path, data: &[u8]) -> Result<(), CacheError> {
    use std::io::Write as _;
    let mut f = std::fs::File::create(path).map_err(io_err(path))?;
    f.write_all(data).map_err(io_err(path))?;
    f.sync_all().map_err(io_err(path))
}

fn sync_dir(dir: &Path) -> Result<(), CacheError> {
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err(dir))
}

/// sha256 (lowercase hex) and length of a file's content.
fn hash_file(path: &Path) -> Result<(String, u64), CacheError> {
    let mut f = std::fs::File::open(path).map_err(io_err(path))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut size = 0u64;
    loop {
        let n = f.read(&mut buf).map_err(io_err(path))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        size += n as u64;
    }
    Ok((format!("{:x}", hasher.finalize()), size))
}

#[derive(Debug, Clone, Copy, Default)]
pub struct VerifyOptions {
    /// Hash every file, whatever the record says.
    pub force: bool,
    /// Rewrite the record when it does not describe the files as verified now (needs a writable
    /// directory; where it cannot be written it is reported stale). Without it a stale record is
    /// only reported.
    pub write_record: bool,
}

#[derive(Debug, Default)]
pub struct VerifyReport {
    /// Files trusted from the record without reading them.
    pub trusted: Vec<String>,
    /// Files whose content was hashed.
    pub hashed: Vec<String>,
    pub record_written: bool,
    /// The record does not match the files (they were hashed instead) and was not rewritten.
    pub record_stale: bool,
}

/// Checks every listed file of `dir`: present, a regular file, its sha256 as expected. A file is
/// trusted without reading it when the record names the expected sha256 for it and its size and
/// mtime are the recorded ones; every other file is hashed. All problems are reported at once.
pub fn verify(dir: &Path, expected: &Checksums, opts: VerifyOptions) -> Result<VerifyReport, CacheError> {
    let stored = read_record(dir);
    let record = if opts.force { None } else { stored.clone() };
    let mut report = VerifyReport::default();
    let mut fresh = BTreeMap::new();
    let mut problems = Vec::new();
    for (rel, sha) in expected.iter() {
        let path = file_path(dir, rel)?;
        let meta = match std::fs::metadata(&path) {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                problems.push(format!("{rel}: missing"));
                continue;
            }
            Err(e) => return Err(io_err(&path)(e)),
        };
        if !meta.is_file() {
            problems.push(format!("{rel}: not a regular file"));
            continue;
        }
        let now = Entry::of(sha, &meta);
        if record.as_ref().and_then(|r| r.files.get(rel)) == Some(&now) {
            report.trusted.push(rel.to_string());
            fresh.insert(rel.to_string(), now);
            continue;
        }
        let (actual, size) = hash_file(&path)?;
        if actual != sha {
            problems.push(format!("{rel}: sha256 {actual} ({size} bytes), expected {sha}"));
            continue;
        }
        // A file rewritten while it was read is not recorded as verified.
        let after = std::fs::metadata(&path).map_err(io_err(&path))?;
        if Entry::of(sha, &after) != now {
            problems.push(format!("{rel}: changed while it was hashed"));
            continue;
        }
        report.hashed.push(rel.to_string());
        fresh.insert(rel.to_string(), now);
    }
    if !problems.is_empty() {
        return Err(CacheError::Verification {
            dir: dir.to_path_buf(),
            total: expected.len(),
            problems,
        });
    }
    let unchanged = stored.is_some_and(|r| r.files == fresh);
    if !unchanged {
        // The files are verified either way; a record that cannot be written (a read-only
        // volume, a directory owned by someone else) only means hashing again next time.
        match opts.write_record.then(|| write_record(dir, fresh)) {
            Some(Ok(())) => report.record_written = true,
            Some(Err(e)) => {
                warn!(error = %e, "could not write the verification record");
                report.record_stale = true;
            }
            None => report.record_stale = true,
        }
    }
    Ok(report)
}

/// Where a checkpoint is downloaded from.
pub enum Source {
    /// An object store (S3 or S3-compatible): `<prefix>/<relative path>`.
    Store {
        store: Arc<dyn ObjectStore>,
        prefix: Vec<String>,
        name: String,
    },
    /// Plain HTTP(S): `<base>/<relative path>`, with an optional bearer token.
    Http {
        client: reqwest::Client,
        base: reqwest::Url,
        token: Option<String>,
    },
}

impl Source {
    /// `s3://bucket/prefix` (endpoint, region and credentials from the `AWS_*` variables, as for
    /// results) or `https://host/path` (`token` is sent as `Authorization: Bearer`).
    pub fn parse(uri: &str, token: Option<String>) -> Result<Self, CacheError> {
        if let Some(rest) = uri.strip_prefix("s3://") {
            let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
            if bucket.is_empty() {
                return Err(CacheError::Source(format!("{uri:?} names no bucket")));
            }
            let store = object_store::aws::AmazonS3Builder::from_env()
                .with_bucket_name(bucket)
                .build()
                .map_err(|e| CacheError::Source(e.to_string()))?;
            return Ok(Self::store(Arc::new(store), prefix, uri));
        }
        if uri.starts_with("https://") || uri.starts_with("http://") {
            let base = reqwest::Url::parse(uri).map_err(|e| CacheError::Source(format!("{uri:?}: {e}")))?;
            if base.cannot_be_a_base() {
                return Err(CacheError::Source(format!("{uri:?} cannot hold file paths")));
            }
            let client = reqwest::Client::builder()
                .connect_timeout(Duration::from_secs(30))
                .read_timeout(Duration::from_secs(120))
                .build()
                .map_err(|e| CacheError::Source(e.to_string()))?;
            return Ok(Self::Http { client, base, token });
        }
        Err(CacheError::Source(format!(
            "{uri:?}: expected s3://bucket/prefix or https://host/path"
        )))
    }

    /// An object store with files under `prefix` (`/`-separated); `name` is shown in messages.
    pub fn store(store: Arc<dyn ObjectStore>, prefix: &str, name: &str) -> Self {
        Self::Store {
            store,
            prefix: prefix
                .split('/')
                .filter(|p| !p.is_empty())
                .map(str::to_string)
                .collect(),
            name: name.trim_end_matches('/').to_string(),
        }
    }

    fn describe(&self, rel: &str) -> String {
        match self {
            Self::Store { name, .. } => format!("{name}/{rel}"),
            Self::Http { base, .. } => format!("{}/{rel}", base.as_str().trim_end_matches('/')),
        }
    }

    /// Streams `rel` into `sink`, chunk by chunk.
    async fn read(&self, rel: &str, sink: &mut Sink) -> Result<(), CacheError> {
        let failed = |why: String, retry: bool| CacheError::Download {
            what: self.describe(rel),
            why,
            retry,
        };
        match self {
            Self::Store { store, prefix, .. } => {
                let path: object_store::path::Path =
                    prefix.iter().map(String::as_str).chain(rel.split('/')).collect();
                let got = store.get(&path).await.map_err(|e| {
                    let refused = matches!(
                        e,
                        object_store::Error::NotFound { .. }
                            | object_store::Error::PermissionDenied { .. }
                            | object_store::Error::Unauthenticated { .. }
                    );
                    failed(e.to_string(), !refused)
                })?;
                sink.drain(got.into_stream()).await.map_err(|e| failed(e, true))
            }
            Self::Http { client, base, token } => {
                let mut url = base.clone();
                url.path_segments_mut()
                    .map_err(|()| failed("the base URL cannot hold file paths".into(), false))?
                    .pop_if_empty()
                    .extend(rel.split('/'));
                let mut req = client.get(url);
                if let Some(t) = token {
                    req = req.bearer_auth(t);
                }
                let resp = req.send().await.and_then(|r| r.error_for_status()).map_err(|e| {
                    let refused = e
                        .status()
                        .is_some_and(|s| s.is_client_error() && s.as_u16() != 408 && s.as_u16() != 429);
                    failed(e.without_url().to_string(), !refused)
                })?;
                sink.drain(resp.bytes_stream()).await.map_err(|e| failed(e, true))
            }
        }
    }

    /// A small file of the source (the checksum list), as text.
    async fn read_text(&self, rel: &str) -> Result<String, CacheError> {
        let mut sink = Sink::memory();
        self.read(rel, &mut sink).await?;
        String::from_utf8(sink.into_memory()).map_err(|_| CacheError::Download {
            what: self.describe(rel),
            why: "not UTF-8 text".into(),
            retry: false,
        })
    }
}

/// Where downloaded bytes go: a file (hashed as it is written) or memory.
struct Sink {
    file: Option<tokio::fs::File>,
    memory: Vec<u8>,
    hasher: Sha256,
    size: u64,
}

impl Sink {
    fn memory() -> Self {
        Self {
            file: None,
            memory: Vec::new(),
            hasher: Sha256::new(),
            size: 0,
        }
    }

    async fn drain<S, B, E>(&mut self, stream: S) -> Result<(), String>
    where
        S: Stream<Item = Result<B, E>>,
        B: AsRef<[u8]>,
        E: Display,
    {
        let mut stream = std::pin::pin!(stream);
        while let Some(chunk) = stream.try_next().await.map_err(|e| e.to_string())? {
            let chunk = chunk.as_ref();
            self.hasher.update(chunk);
            self.size += chunk.len() as u64;
            match &mut self.file {
                Some(f) => f.write_all(chunk).await.map_err(|e| e.to_string())?,
                None => self.memory.extend_from_slice(chunk),
            }
        }
        Ok(())
    }

    fn into_memory(self) -> Vec<u8> {
        self.memory
    }
}

#[derive(Debug, Clone)]
pub struct FetchOptions {
    /// Files downloaded at the same time.
    pub parallel: usize,
    /// Hash every file of an existing copy instead of trusting its record.
    pub force: bool,
    /// Name of the checksum list in the source (when none is given) and in the version directory.
    pub list_name: String,
}

impl Default for FetchOptions {
    fn default() -> Self {
        Self {
            parallel: 4,
            force: false,
            list_name: "SHA256SUMS".into(),
        }
    }
}

#[derive(Debug)]
pub struct FetchReport {
    pub dir: PathBuf,
    /// The version was already present and verified; nothing was downloaded.
    pub already_present: bool,
    pub files: usize,
    pub bytes: u64,
}

/// Makes `<cache_root>/<version>` (`version` may have `/`-separated parts, each a plain name) a
/// verified copy of the checkpoint in `source`: the listed files
/// (from `given`, else the source's own list), each checked against its sha256. A version already
/// present is verified (trusting its record for unchanged files) and kept when it matches; a
/// missing or damaged one is downloaded into a staging directory and renamed into place, replacing
/// the damaged copy in one step.
pub async fn fetch(
    source: &Source,
    cache_root: &Path,
    version: &str,
    given: Option<Checksums>,
    opts: &FetchOptions,
) -> Result<FetchReport, CacheError> {
    let parts: Vec<&str> = version.split('/').collect();
    let target = join_within(cache_root, "model version", &parts)?;
    segment("checksum list name", &opts.list_name)?;
    let expected = match given {
        Some(list) => list,
        None => {
            let text = source.read_text(&opts.list_name).await?;
            Checksums::parse(&text, &source.describe(&opts.list_name))?
        }
    };
    if target.exists() {
        let (dir, list) = (target.clone(), expected.clone());
        let check = VerifyOptions {
            force: opts.force,
            write_record: true,
        };
        match blocking(move || verify(&dir, &list, check)).await {
            Ok(r) => {
                info!(dir = %target.display(), trusted = r.trusted.len(), hashed = r.hashed.len(), "model version already present and verified");
                return Ok(FetchReport {
                    dir: target,
                    already_present: true,
                    files: expected.len(),
                    bytes: 0,
                });
            }
            Err(e @ CacheError::Verification { .. }) => {
                warn!(error = %e, "the present copy does not verify; downloading a new one to replace it");
            }
            Err(e) => return Err(e),
        }
    }

    let staging_root = cache_root.join(STAGING_DIR);
    std::fs::create_dir_all(&staging_root).map_err(io_err(&staging_root))?;
    remove_stale(&staging_root);
    let staging = staging_root.join(uuid::Uuid::new_v4().simple().to_string());
    std::fs::create_dir(&staging).map_err(io_err(&staging))?;
    let result = download_all(source, &staging, &expected, opts).await;
    let (files, bytes) = match result {
        Ok(entries) => {
            let bytes: u64 = entries.values().map(|e| e.size).sum();
            let n = entries.len();
            let published = finish_staging(&staging, &expected, &opts.list_name, entries)
                .and_then(|()| publish(&staging, &target, &staging_root, &expected));
            if let Err(e) = published {
                let _ = std::fs::remove_dir_all(&staging);
                return Err(e);
            }
            (n, bytes)
        }
        Err(e) => {
            let _ = std::fs::remove_dir_all(&staging);
            return Err(e);
        }
    };
    info!(dir = %target.display(), files, bytes, "model version downloaded, verified and published");
    Ok(FetchReport {
        dir: target,
        already_present: false,
        files,
        bytes,
    })
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, CacheError> + Send + 'static,
) -> Result<T, CacheError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| CacheError::Source(format!("verification task failed: {e}")))?
}

/// Downloads every listed file under `staging` (several at once), checking each one's sha256 as
/// it is written; returns each file's record entry.
async fn download_all(
    source: &Source,
    staging: &Path,
    expected: &Checksums,
    opts: &FetchOptions,
) -> Result<BTreeMap<String, Entry>, CacheError> {
    futures_util::stream::iter(expected.iter())
        .map(|(rel, sha)| download_retrying(source, staging, rel, sha))
        .buffer_unordered(opts.parallel.max(1))
        .try_collect()
        .await
}

/// One file, with a few attempts while the failure is worth retrying (a dropped connection, a
/// server error; not a refusal or a wrong sha256).
async fn download_retrying(
    source: &Source,
    staging: &Path,
    rel: &str,
    sha: &str,
) -> Result<(String, Entry), CacheError> {
    let dest = file_path(staging, rel)?;
    let mut attempt = 1;
    loop {
        match download(source, rel, &dest, sha).await {
            Ok(entry) => {
                info!(file = rel, bytes = entry.size, "downloaded and verified");
                return Ok((rel.to_string(), entry));
            }
            Err(e @ CacheError::Download { retry: true, .. }) if attempt < DOWNLOAD_ATTEMPTS => {
                warn!(error = %e, attempt, "download failed; retrying");
                tokio::time::sleep(Duration::from_secs(2u64.pow(attempt))).await;
                attempt += 1;
            }
            Err(e) => return Err(e),
        }
    }
}

async fn download(source: &Source, rel: &str, dest: &Path, sha: &str) -> Result<Entry, CacheError> {
    if let Some(parent) = dest.parent() {
        tokio::fs::create_dir_all(parent).await.map_err(io_err(parent))?;
    }
    let file = tokio::fs::File::create(dest).await.map_err(io_err(dest))?;
    let mut sink = Sink {
        file: Some(file),
        ..Sink::memory()
    };
    source.read(rel, &mut sink).await?;
    let mut file = sink.file.take().expect("a file sink");
    file.flush().await.map_err(io_err(dest))?;
    file.sync_all().await.map_err(io_err(dest))?;
    drop(file);
    let actual = format!("{:x}", sink.hasher.finalize());
    if actual != sha {
        return Err(CacheError::Corrupt {
            what: source.describe(rel),
            size: sink.size,
            actual,
            expected: sha.to_string(),
        });
    }
    let meta = std::fs::metadata(dest).map_err(io_err(dest))?;
    Ok(Entry::of(sha, &meta))
}

/// The list and the record go into the staging directory before it is published.
fn finish_staging(
    staging: &Path,
    expected: &Checksums,
    list_name: &str,
    entries: BTreeMap<String, Entry>,
) -> Result<(), CacheError> {
    write_synced(&staging.join(list_name), expected.to_sha256sums().as_bytes())?;
    write_record(staging, entries)
}

/// Renames `staging` to `target`; a damaged `target` is moved aside first and removed after. When
/// another fetch published the version first, its copy is kept if it verifies.
fn publish(
    staging: &Path,
    target: &Path,
    staging_root: &Path,
    expected: &Checksums,
) -> Result<(), CacheError> {
    let parent = target.parent().expect("a version has a parent");
    std::fs::create_dir_all(parent).map_err(io_err(parent))?;
    let old = staging_root.join(format!("replaced.{}", uuid::Uuid::new_v4().simple()));
    let replaced = match std::fs::rename(target, &old) {
        Ok(()) => true,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => false,
        Err(e) => return Err(io_err(target)(e)),
    };
    match std::fs::rename(staging, target) {
        Ok(()) => {}
        Err(e) if target.exists() && !replaced => {
            // Another fetch (a pod on the same node) won the race: keep its copy if it is whole.
            verify(target, expected, VerifyOptions::default()).inspect_err(|_| {
                warn!(error = %e, "publishing lost a race with another fetch whose copy does not verify");
            })?;
            std::fs::remove_dir_all(staging).map_err(io_err(staging))?;
            return Ok(());
        }
        Err(e) => return Err(io_err(target)(e)),
    }
    sync_dir(parent)?;
    if replaced && let Err(e) = std::fs::remove_dir_all(&old) {
        warn!(path = %old.display(), error = %e, "could not remove the replaced copy");
    }
    Ok(())
}

/// Removes staging directories left by fetches that were killed long ago.
fn remove_stale(staging_root: &Path) {
    let Ok(entries) = std::fs::read_dir(staging_root) else {
        return;
    };
    for entry in entries.flatten() {
        let old = entry
            .metadata()
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| SystemTime::now().duration_since(t).ok())
            .is_some_and(|age| age > STALE_STAGING);
        if old && let Err(e) = std::fs::remove_dir_all(entry.path()) {
            warn!(path = %entry.path().display(), error = %e, "could not remove a stale staging directory");
        }
    }
}

/// Waits until `dir` exists (a populate Job publishes it in one rename), at most `limit`.
pub fn wait_for(dir: &Path, limit: Duration, poll: Duration) -> bool {
    let deadline = std::time::Instant::now() + limit;
    let mut said = false;
    loop {
        if dir.exists() {
            return true;
        }
        if std::time::Instant::now() >= deadline {
            return false;
        }
        if !said {
            info!(dir = %dir.display(), "waiting for the model cache to be populated");
            said = true;
        }
        std::thread::sleep(poll.min(deadline.saturating_duration_since(std::time::Instant::now())));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use object_store::memory::InMemory;

    fn sha(data: &[u8]) -> String {
        format!("{:x}", Sha256::digest(data))
    }

    fn tempdir() -> PathBuf {
        let d = std::env::temp_dir().join(format!("ditfleet-model-cache-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    const FILES: &[(&str, &[u8])] = &[
        ("model_index.json", b"{}\n"),
        ("transformer/diffusion_pytorch_model.safetensors", &[7u8; 70_000]),
        ("vae/diffusion_pytorch_model.safetensors", b"vae weights"),
    ];

    fn list() -> Checksums {
        Checksums::parse(
            &FILES
                .iter()
                .map(|(p, d)| format!("{}  {p}\n", sha(d)))
                .collect::<String>(),
            "test",
        )
        .unwrap()
    }

    fn write_model(dir: &Path) {
        for (rel, data) in FILES {
            let p = dir.join(rel);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, data).unwrap();
        }
    }

    /// Rewrites a file with other bytes of the same length and puts its mtime back: only hashing
    /// can tell.
    fn corrupt_keeping_size_and_mtime(path: &Path) {
        let meta = std::fs::metadata(path).unwrap();
        let mut data = std::fs::read(path).unwrap();
        data[0] ^= 0xff;
        std::fs::write(path, &data).unwrap();
        let f = std::fs::File::options().write(true).open(path).unwrap();
        f.set_modified(meta.modified().unwrap()).unwrap();
        assert_eq!(std::fs::metadata(path).unwrap().len(), meta.len());
    }

    fn write_options() -> VerifyOptions {
        VerifyOptions {
            force: false,
            write_record: true,
        }
    }

    #[test]
    fn a_matching_record_is_trusted_without_reading_the_files() {
        let dir = tempdir();
        write_model(&dir);
        let first = verify(&dir, &list(), write_options()).unwrap();
        assert_eq!(first.hashed.len(), FILES.len());
        assert!(first.record_written);

        // Same size and mtime, other bytes: the record is trusted, so the damage goes unseen
        // unless the check is forced. This is what proves nothing was hashed.
        corrupt_keeping_size_and_mtime(&dir.join(FILES[1].0));
        let second = verify(&dir, &list(), VerifyOptions::default()).unwrap();
        assert!(second.hashed.is_empty(), "hashed {:?}", second.hashed);
        assert_eq!(second.trusted.len(), FILES.len());
        assert!(!second.record_stale);

        let forced = verify(
            &dir,
            &list(),
            VerifyOptions {
                force: true,
                write_record: false,
            },
        )
        .unwrap_err();
        assert!(forced.to_string().contains(FILES[1].0), "{forced}");
    }

    #[test]
    fn a_rewritten_file_is_hashed_again_and_fails_with_the_path_and_both_sums() {
        let dir = tempdir();
        write_model(&dir);
        verify(&dir, &list(), write_options()).unwrap();
        let rel = "vae/diffusion_pytorch_model.safetensors";
        std::fs::write(dir.join(rel), b"VAE weights, other length").unwrap();
        let err = verify(&dir, &list(), VerifyOptions::default()).unwrap_err();
        let msg = err.to_string();
        assert!(
            matches!(err, CacheError::Verification { ref problems, .. } if problems.len() == 1),
            "{msg}"
        );
        assert!(msg.contains(rel), "{msg}");
        assert!(msg.contains(&sha(b"vae weights")), "expected sum missing: {msg}");
        assert!(
            msg.contains(&sha(b"VAE weights, other length")),
            "actual sum missing: {msg}"
        );
    }

    #[test]
    fn a_touched_file_with_the_same_content_is_rehashed_once_and_the_record_repaired() {
        let dir = tempdir();
        write_model(&dir);
        verify(&dir, &list(), write_options()).unwrap();
        let rel = FILES[0].0;
        std::fs::write(dir.join(rel), FILES[0].1).unwrap();
        let f = std::fs::File::options().write(true).open(dir.join(rel)).unwrap();
        f.set_modified(SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000))
            .unwrap();

        let read_only = verify(&dir, &list(), VerifyOptions::default()).unwrap();
        assert_eq!(read_only.hashed, vec![rel.to_string()]);
        assert!(read_only.record_stale && !read_only.record_written);

        let repaired = verify(&dir, &list(), write_options()).unwrap();
        assert_eq!(repaired.hashed, vec![rel.to_string()]);
        assert!(repaired.record_written);
        let after = verify(&dir, &list(), VerifyOptions::default()).unwrap();
        assert!(after.hashed.is_empty() && !after.record_stale);
    }

    #[test]
    fn missing_files_and_changed_expected_sums_are_not_trusted_from_the_record() {
        let dir = tempdir();
        write_model(&dir);
        verify(&dir, &list(), write_options()).unwrap();

        // The operator pins another sum for a file: the record (made for the old sum) is not
        // enough, the file is hashed and refused.
        let other = list()
            .to_sha256sums()
            .replace(&sha(FILES[0].1), &sha(b"a newer index"));
        let err = verify(
            &dir,
            &Checksums::parse(&other, "t").unwrap(),
            VerifyOptions::default(),
        )
        .unwrap_err();
        assert!(err.to_string().contains("model_index.json: sha256"), "{err}");

        std::fs::remove_file(dir.join(FILES[2].0)).unwrap();
        let err = verify(&dir, &list(), VerifyOptions::default()).unwrap_err();
        assert!(
            err.to_string().contains(&format!("{}: missing", FILES[2].0)),
            "{err}"
        );
    }

    #[test]
    fn a_garbled_record_means_hashing_everything() {
        let dir = tempdir();
        write_model(&dir);
        std::fs::write(dir.join(RECORD_FILE), "{not json").unwrap();
        let r = verify(&dir, &list(), VerifyOptions::default()).unwrap();
        assert_eq!(r.hashed.len(), FILES.len());
        assert!(r.record_stale);
    }

    #[test]
    fn checksum_lists_refuse_paths_that_leave_the_model_directory() {
        let h = "0".repeat(64);
        for bad in [
            "../x",
            "a/../../x",
            "/etc/passwd",
            "a//b",
            ".hidden",
            "a\\b",
            "x/..",
            "dir/",
        ] {
            let err = Checksums::parse(&format!("{h}  {bad}\n"), "t").unwrap_err();
            assert!(matches!(err, CacheError::UnsafeName(_)), "{bad:?}: {err}");
        }
        let one_space = format!("{h} one-space");
        let not_hex = format!("{}  x", "g".repeat(64));
        for bad in ["nohash", one_space.as_str(), not_hex.as_str()] {
            assert!(matches!(
                Checksums::parse(bad, "t"),
                Err(CacheError::BadList { .. })
            ));
        }
        let dup = format!("{h}  a\n{h}  ./a\n");
        assert!(
            Checksums::parse(&dup, "t")
                .unwrap_err()
                .to_string()
                .contains("twice")
        );
        let ok = Checksums::parse(
            &format!("# comment\n\n{}  ./a/b.bin\n{h} *c\n", "A".repeat(64)),
            "t",
        )
        .unwrap();
        assert_eq!(
            ok.iter().collect::<Vec<_>>(),
            vec![("a/b.bin", "a".repeat(64).as_str()), ("c", h.as_str())]
        );
    }

    async fn store_with_model(with_list: bool) -> Arc<InMemory> {
        let store = Arc::new(InMemory::new());
        for (rel, data) in FILES {
            let p = object_store::path::Path::from(format!("models/flux/{rel}"));
            store.put(&p, data.to_vec().into()).await.unwrap();
        }
        if with_list {
            let p = object_store::path::Path::from("models/flux/SHA256SUMS");
            store
                .put(&p, list().to_sha256sums().into_bytes().into())
                .await
                .unwrap();
        }
        store
    }

    fn staging_entries(root: &Path) -> usize {
        std::fs::read_dir(root.join(STAGING_DIR)).map_or(0, |d| d.count())
    }

    #[tokio::test]
    async fn fetch_publishes_a_verified_version_that_verify_then_trusts() {
        let root = tempdir();
        let store = store_with_model(true).await;
        let source = Source::store(store.clone(), "models/flux", "mem://models/flux");
        let r = fetch(&source, &root, "FLUX.1-dev", None, &FetchOptions::default())
            .await
            .unwrap();
        assert!(!r.already_present);
        assert_eq!(r.files, FILES.len());
        let dir = root.join("FLUX.1-dev");
        for (rel, data) in FILES {
            assert_eq!(std::fs::read(dir.join(rel)).unwrap(), *data);
        }
        assert_eq!(Checksums::read(&dir.join("SHA256SUMS")).unwrap(), Some(list()));
        let v = verify(&dir, &list(), VerifyOptions::default()).unwrap();
        assert!(
            v.hashed.is_empty(),
            "the fetch's record must cover every file: {v:?}"
        );
        assert_eq!(staging_entries(&root), 0);

        // Run again (a re-run Job, a second pod): nothing is downloaded, even with the source gone.
        for (rel, _) in FILES {
            store
                .delete(&object_store::path::Path::from(format!("models/flux/{rel}")))
                .await
                .unwrap();
        }
        let again = fetch(
            &source,
            &root,
            "FLUX.1-dev",
            Some(list()),
            &FetchOptions::default(),
        )
        .await
        .unwrap();
        assert!(again.already_present);
    }

    #[tokio::test]
    async fn a_corrupt_download_publishes_nothing() {
        let root = tempdir();
        let source = Source::store(store_with_model(false).await, "models/flux", "mem://models/flux");
        let wrong = list()
            .to_sha256sums()
            .replace(&sha(FILES[2].1), &sha(b"what the operator pinned"));
        let err = fetch(
            &source,
            &root,
            "FLUX.1-dev",
            Some(Checksums::parse(&wrong, "values").unwrap()),
            &FetchOptions::default(),
        )
        .await
        .unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, CacheError::Corrupt { .. }), "{msg}");
        assert!(
            msg.contains("mem://models/flux/vae/diffusion_pytorch_model.safetensors"),
            "{msg}"
        );
        assert!(!root.join("FLUX.1-dev").exists());
        assert_eq!(staging_entries(&root), 0);
    }

    #[tokio::test]
    async fn a_damaged_copy_is_replaced_in_one_rename() {
        let root = tempdir();
        let dir = root.join("FLUX.1-dev");
        write_model(&dir);
        std::fs::write(dir.join(FILES[1].0), b"truncated").unwrap();
        let source = Source::store(store_with_model(true).await, "models/flux", "mem://models/flux");
        let r = fetch(&source, &root, "FLUX.1-dev", None, &FetchOptions::default())
            .await
            .unwrap();
        assert!(!r.already_present);
        assert_eq!(std::fs::read(dir.join(FILES[1].0)).unwrap(), FILES[1].1);
        assert!(
            verify(&dir, &list(), VerifyOptions::default())
                .unwrap()
                .hashed
                .is_empty()
        );
        assert_eq!(staging_entries(&root), 0, "the replaced copy is removed");
    }

    #[tokio::test]
    async fn versions_from_outside_cannot_leave_the_cache() {
        let root = tempdir();
        let source = Source::store(store_with_model(true).await, "models/flux", "mem://models/flux");
        for bad in ["..", ".", "a/../b", "../x", "a//b", "/abs", "a/", ".hidden", ""] {
            let err = fetch(&source, &root, bad, Some(list()), &FetchOptions::default())
                .await
                .unwrap_err();
            assert!(matches!(err, CacheError::UnsafeName(_)), "{bad:?}: {err}");
        }
        let bad_list = FetchOptions {
            list_name: "../SHA256SUMS".into(),
            ..FetchOptions::default()
        };
        assert!(matches!(
            fetch(&source, &root, "v1", None, &bad_list).await,
            Err(CacheError::UnsafeName(_))
        ));
        assert_eq!(std::fs::read_dir(&root).unwrap().count(), 0);

        // A version in a namespace directory (`<org>/<name>`) is fine.
        fetch(
            &source,
            &root,
            "black-forest-labs/FLUX.1-dev",
            Some(list()),
            &FetchOptions::default(),
        )
        .await
        .unwrap();
        assert!(
            root.join("black-forest-labs/FLUX.1-dev/model_index.json")
                .is_file()
        );
    }

    /// Serves `files` over plain HTTP/1.1, one connection at a time, expecting `token`.
    fn http_server(files: Vec<(String, Vec<u8>)>, token: &'static str) -> String {
        use std::io::{BufRead, BufReader, Write};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(mut conn) = conn else { return };
                let mut reader = BufReader::new(conn.try_clone().unwrap());
                let mut request = String::new();
                reader.read_line(&mut request).unwrap();
                let mut authorized = false;
                loop {
                    let mut h = String::new();
                    if reader.read_line(&mut h).unwrap() == 0 || h == "\r\n" {
                        break;
                    }
                    authorized |= h.eq_ignore_ascii_case(&format!("authorization: Bearer {token}\r\n"));
                }
                let path = request.split(' ').nth(1).unwrap_or("");
                let body = files.iter().find(|(p, _)| p == path).map(|(_, b)| b);
                let (status, body) = match (authorized, body) {
                    (false, _) => ("401 Unauthorized", &b""[..]),
                    (true, Some(b)) => ("200 OK", b.as_slice()),
                    (true, None) => ("404 Not Found", &b""[..]),
                };
                let _ = write!(
                    conn,
                    "HTTP/1.1 {status}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
                    body.len()
                );
                let _ = conn.write_all(body);
            }
        });
        format!("http://{addr}")
    }

    #[tokio::test]
    async fn fetch_over_https_urls_sends_the_token_and_encodes_paths() {
        let mut files: Vec<(String, Vec<u8>)> = FILES
            .iter()
            .map(|(rel, d)| (format!("/repo/resolve/main/{rel}"), d.to_vec()))
            .collect();
        files.push(("/repo/resolve/main/with%20space.txt".into(), b"spaced".to_vec()));
        let base = http_server(files, "hf_secret");
        let mut text = list().to_sha256sums();
        text.push_str(&format!("{}  with space.txt\n", sha(b"spaced")));
        let checksums = Checksums::parse(&text, "values").unwrap();

        let root = tempdir();
        let source = Source::parse(&format!("{base}/repo/resolve/main/"), Some("hf_secret".into())).unwrap();
        let r = fetch(
            &source,
            &root,
            "v1",
            Some(checksums.clone()),
            &FetchOptions::default(),
        )
        .await
        .unwrap();
        assert_eq!(r.files, FILES.len() + 1);
        assert_eq!(std::fs::read(root.join("v1/with space.txt")).unwrap(), b"spaced");

        let anonymous = Source::parse(&format!("{base}/repo/resolve/main"), None).unwrap();
        let err = fetch(&anonymous, &root, "v2", Some(checksums), &FetchOptions::default())
            .await
            .unwrap_err();
        assert!(err.to_string().contains("401"), "{err}");
        assert!(!root.join("v2").exists());
    }
}
