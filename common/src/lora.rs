//! The fleet's LoRA registry: adapters an operator pushes (`ditfleetctl lora push`) and the
//! scheduler (admission) and workers (download, verify) read.
//!
//! Layout, the same on both backends:
//!
//! ```text
//! <prefix>/loras/<name>/<version>/adapter.safetensors
//! <prefix>/loras/<name>/<version>/manifest.json   {name, version, base_model, sha256, bytes, format, created}
//! ```
//!
//! The backend is `DITFLEET_LORA_REGISTRY`: `s3://bucket/prefix` (the S3-compatible store the
//! results use; credentials and endpoint from the standard `AWS_*` variables) or a directory
//! (`file:///models` or `/models`, typically the model root). An adapter counts as present only
//! once its manifest is: a push writes the file first and the manifest last, a removal deletes
//! the manifest first, so a half-done push or removal is never listed nor admitted.
//!
//! `name` and `version` come from jobs and operators; every path and key built from them goes
//! through [`valid_lora_ident`] (the job contract's rule) and [`crate::ident::segment`], so neither
//! can leave `<prefix>/loras/` (`..`, separators and the fleet's own key shapes are refused or stay
//! one segment).

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use sha2::Digest;

use crate::ident::{UnsafeName, join_within, segment};
use crate::job::{KNOWN_MODELS, LORA_IDENT_RULE, valid_lora_ident};

/// The adapter's file name in its version folder.
pub const ADAPTER_FILE: &str = "adapter.safetensors";
/// The manifest's file name in its version folder.
pub const MANIFEST_FILE: &str = "manifest.json";
/// The folder (key segment) under the registry's prefix that holds every adapter.
pub const LORAS_DIR: &str = "loras";
/// Largest safetensors header read to detect an adapter's format.
const MAX_HEADER: u64 = 64 << 20;

/// What the registry records about one adapter version.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    pub name: String,
    pub version: String,
    /// The model the adapter was trained for (`flux-dev`, `sdxl-base`, ...): a job of another
    /// model naming it is rejected.
    pub base_model: String,
    /// SHA-256 of `adapter.safetensors`, lowercase hex.
    pub sha256: String,
    pub bytes: u64,
    /// `peft` (diffusers/PEFT `lora_A`/`lora_B` keys) or `kohya` (`lora_down`/`lora_up`).
    pub format: String,
    /// When it was pushed (RFC 3339, UTC).
    pub created: String,
}

impl Manifest {
    /// `name@version`.
    pub fn label(&self) -> String {
        format!("{}@{}", self.name, self.version)
    }
}

/// Registry failures.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error(transparent)]
    UnsafeName(#[from] UnsafeName),
    #[error("{what} {value:?} {LORA_IDENT_RULE}")]
    BadIdent { what: &'static str, value: String },
    #[error("{0}")]
    Config(String),
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("s3 {key}: {source}")]
    S3 {
        key: String,
        #[source]
        source: object_store::Error,
    },
    #[error("manifest of {label} is unreadable: {reason}")]
    BadManifest { label: String, reason: String },
    #[error("{0}")]
    NotAdapter(String),
    #[error("{label} is not in the LoRA registry ({registry})")]
    NotFound { label: String, registry: String },
    #[error(
        "{label}: the downloaded adapter does not match its manifest (sha256 {got}, {got_bytes} bytes; the manifest says {want}, {want_bytes} bytes)"
    )]
    Checksum {
        label: String,
        got: String,
        got_bytes: u64,
        want: String,
        want_bytes: u64,
    },
}

fn io_err(path: &Path, source: std::io::Error) -> RegistryError {
    RegistryError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// Checks `name` and `version` with the job contract's rule and as single path segments.
pub fn check_ident(name: &str, version: &str) -> Result<(), RegistryError> {
    for (what, v) in [("name", name), ("version", version)] {
        if !valid_lora_ident(v) {
            return Err(RegistryError::BadIdent {
                what,
                value: v.chars().take(64).collect(),
            });
        }
        segment("LoRA adapter", v)?;
    }
    Ok(())
}

/// The adapter format from a safetensors file's tensor names, or why it is not an adapter.
pub fn detect_format<'a>(keys: impl IntoIterator<Item = &'a str>) -> Result<&'static str, String> {
    let (mut peft, mut kohya, mut n) = (0usize, 0usize, 0usize);
    for k in keys {
        if k == "__metadata__" {
            continue;
        }
        n += 1;
        if k.contains(".lora_A.")
            || k.contains(".lora_B.")
            || k.contains(".lora.down.")
            || k.contains(".lora.up.")
        {
            peft += 1;
        } else if k.contains(".lora_down.") || k.contains(".lora_up.") || k.ends_with(".alpha") {
            kohya += 1;
        }
    }
    match (peft, kohya) {
        _ if n == 0 => Err("the safetensors file holds no tensors".into()),
        (p, 0) if p > 0 => Ok("peft"),
        (0, k) if k > 0 => Ok("kohya"),
        (0, 0) => Err(format!(
            "none of its {n} tensors is a LoRA weight (expected PEFT lora_A/lora_B or kohya lora_down/lora_up names)"
        )),
        _ => Err("it mixes PEFT (lora_A/lora_B) and kohya (lora_down/lora_up) tensor names".into()),
    }
}

/// The tensor names of a safetensors file's header (`reader` at its start).
pub fn safetensors_keys(reader: &mut impl Read, file_len: u64) -> Result<Vec<String>, String> {
    let mut len = [0u8; 8];
    reader
        .read_exact(&mut len)
        .map_err(|_| "too short for a safetensors file".to_string())?;
    let n = u64::from_le_bytes(len);
    if !(2..=MAX_HEADER).contains(&n) || n + 8 > file_len {
        return Err(format!(
            "not a safetensors file (header length {n} for a {file_len}-byte file)"
        ));
    }
    let mut header = vec![0u8; n as usize];
    reader
        .read_exact(&mut header)
        .map_err(|e| format!("reading the safetensors header: {e}"))?;
    let v: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(&header).map_err(|e| format!("not a safetensors file (header: {e})"))?;
    Ok(v.into_iter().map(|(k, _)| k).collect())
}

/// Checks a local adapter file and describes it: its format (from the tensor names), size and
/// SHA-256.
pub fn inspect_file(path: &Path) -> Result<(&'static str, u64, String), RegistryError> {
    let mut f = std::fs::File::open(path).map_err(|e| io_err(path, e))?;
    let len = f.metadata().map_err(|e| io_err(path, e))?.len();
    let keys = safetensors_keys(&mut f, len)
        .map_err(|e| RegistryError::NotAdapter(format!("{}: {e}", path.display())))?;
    let format = detect_format(keys.iter().map(String::as_str))
        .map_err(|e| RegistryError::NotAdapter(format!("{}: {e}", path.display())))?;
    let (sha, bytes) = sha256_file(path)?;
    Ok((format, bytes, sha))
}

/// SHA-256 (lowercase hex) and length of a file.
pub fn sha256_file(path: &Path) -> Result<(String, u64), RegistryError> {
    let mut f = std::fs::File::open(path).map_err(|e| io_err(path, e))?;
    let mut h = sha2::Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut total = 0u64;
    loop {
        let n = f.read(&mut buf).map_err(|e| io_err(path, e))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
        total += n as u64;
    }
    Ok((hex(&h.finalize()), total))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The canonical key of a LoRA stack (`name@version*scale,...` in stack order, the scale as the
/// `f32` the engines apply), how workers advertise the stack they hold applied and how the
/// scheduler matches a job's stack against it. Empty for no adapters.
pub fn stack_key<'a>(stack: impl IntoIterator<Item = (&'a str, &'a str, f32)>) -> String {
    stack
        .into_iter()
        .map(|(n, v, s)| format!("{n}@{v}*{s}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// Where the registry lives.
#[derive(Clone)]
pub enum Registry {
    /// `<root>/loras/...` on a filesystem (the model root, a shared volume).
    Dir(PathBuf),
    /// `s3://bucket/<prefix>/loras/...`.
    S3 {
        store: Arc<object_store::aws::AmazonS3>,
        bucket: String,
        prefix: String,
    },
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.describe())
    }
}

impl Registry {
    /// `s3://bucket[/prefix]`, `file:///dir` or an absolute directory. The S3 client is built
    /// from the `AWS_*` variables (no request is made here).
    pub fn open(url: &str) -> Result<Self, RegistryError> {
        if let Some(rest) = url.strip_prefix("s3://") {
            let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
            if bucket.is_empty() {
                return Err(RegistryError::Config(format!("{url}: no bucket")));
            }
            let store = object_store::aws::AmazonS3Builder::from_env()
                .with_bucket_name(bucket)
                .build()
                .map_err(|e| RegistryError::Config(format!("{url}: {e}")))?;
            let prefix = prefix.trim_matches('/').to_string();
            for part in prefix.split('/').filter(|p| !p.is_empty()) {
                segment("registry prefix", part)?;
            }
            return Ok(Self::S3 {
                store: Arc::new(store),
                bucket: bucket.to_string(),
                prefix,
            });
        }
        let dir = url.strip_prefix("file://").unwrap_or(url);
        if !dir.starts_with('/') {
            return Err(RegistryError::Config(format!(
                "{url}: the LoRA registry is s3://bucket[/prefix], file:///absolute/dir or /absolute/dir"
            )));
        }
        Ok(Self::Dir(PathBuf::from(dir)))
    }

    /// For logs and messages.
    pub fn describe(&self) -> String {
        match self {
            Self::Dir(d) => format!("{}/{LORAS_DIR}", d.display()),
            Self::S3 { bucket, prefix, .. } if prefix.is_empty() => format!("s3://{bucket}/{LORAS_DIR}"),
            Self::S3 { bucket, prefix, .. } => format!("s3://{bucket}/{prefix}/{LORAS_DIR}"),
        }
    }

    /// `<root>/loras/<name>/<version>/<file>` (checked to stay below `<root>/loras`).
    pub fn local_path(root: &Path, name: &str, version: &str, file: &str) -> Result<PathBuf, RegistryError> {
        check_ident(name, version)?;
        Ok(join_within(
            &root.join(LORAS_DIR),
            "LoRA adapter",
            &[name, version, file],
        )?)
    }

    fn key_parts(prefix: &str, parts: &[&str]) -> object_store::path::Path {
        object_store::path::Path::from_iter(
            prefix
                .split('/')
                .filter(|p| !p.is_empty())
                .chain([LORAS_DIR])
                .chain(parts.iter().copied()),
        )
    }

    /// The object key `<prefix>/loras/<name>/<version>/<file>`.
    pub fn s3_key(
        prefix: &str,
        name: &str,
        version: &str,
        file: &str,
    ) -> Result<object_store::path::Path, RegistryError> {
        check_ident(name, version)?;
        segment("LoRA file", file)?;
        Ok(Self::key_parts(prefix, &[name, version, file]))
    }

    /// The manifest of `name@version`, `None` when the registry has none.
    pub async fn manifest(&self, name: &str, version: &str) -> Result<Option<Manifest>, RegistryError> {
        let label = format!("{name}@{version}");
        let bytes = match self {
            Self::Dir(root) => {
                let p = Self::local_path(root, name, version, MANIFEST_FILE)?;
                match tokio::fs::read(&p).await {
                    Ok(b) => b,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
                    Err(e) => return Err(io_err(&p, e)),
                }
            }
            Self::S3 { store, prefix, .. } => {
                use object_store::ObjectStoreExt as _;
                let key = Self::s3_key(prefix, name, version, MANIFEST_FILE)?;
                match store.get(&key).await {
                    Ok(got) => got
                        .bytes()
                        .await
                        .map_err(|source| RegistryError::S3 {
                            key: key.to_string(),
                            source,
                        })?
                        .to_vec(),
                    Err(object_store::Error::NotFound { .. }) => return Ok(None),
                    Err(source) => {
                        return Err(RegistryError::S3 {
                            key: key.to_string(),
                            source,
                        });
                    }
                }
            }
        };
        let m: Manifest = serde_json::from_slice(&bytes).map_err(|e| RegistryError::BadManifest {
            label: label.clone(),
            reason: e.to_string(),
        })?;
        if m.name != name || m.version != version {
            return Err(RegistryError::BadManifest {
                label,
                reason: format!("it names {}", m.label()),
            });
        }
        Ok(Some(m))
    }

    /// Every adapter version with a readable manifest, sorted by name and version.
    pub async fn list(&self) -> Result<Vec<Manifest>, RegistryError> {
        let mut ids = Vec::new();
        match self {
            Self::Dir(root) => {
                let base = root.join(LORAS_DIR);
                let names = match std::fs::read_dir(&base) {
                    Ok(r) => r,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
                    Err(e) => return Err(io_err(&base, e)),
                };
                for n in names.flatten() {
                    let name = n.file_name().to_string_lossy().to_string();
                    let Ok(versions) = std::fs::read_dir(n.path()) else {
                        continue;
                    };
                    for v in versions.flatten() {
                        let version = v.file_name().to_string_lossy().to_string();
                        if v.path().join(MANIFEST_FILE).is_file() {
                            ids.push((name.clone(), version));
                        }
                    }
                }
            }
            Self::S3 { store, prefix, .. } => {
                use futures_util::TryStreamExt as _;
                use object_store::ObjectStore as _;
                let base = Self::key_parts(prefix, &[]);
                let all: Vec<object_store::ObjectMeta> = store
                    .list(Some(&base))
                    .try_collect()
                    .await
                    .map_err(|source| RegistryError::S3 {
                        key: base.to_string(),
                        source,
                    })?;
                for o in all {
                    let parts: Vec<String> = o.location.parts().map(|p| p.as_ref().to_string()).collect();
                    if let [.., name, version, file] = parts.as_slice()
                        && file == MANIFEST_FILE
                        && parts.len() >= 3 + base.parts().count()
                    {
                        ids.push((name.clone(), version.clone()));
                    }
                }
            }
        }
        let mut out = Vec::new();
        for (name, version) in ids {
            if check_ident(&name, &version).is_err() {
                continue;
            }
            if let Some(m) = self.manifest(&name, &version).await? {
                out.push(m);
            }
        }
        out.sort_by(|a, b| (&a.name, &a.version).cmp(&(&b.name, &b.version)));
        Ok(out)
    }

    /// Pushes a local adapter file as `name@version` for `base_model`: checks it is a LoRA
    /// safetensors file, computes its SHA-256, uploads it, then writes the manifest (last, so a
    /// push that stops half way is never listed). `progress(done, total)` follows the upload.
    /// Pushing a version again replaces it.
    pub async fn push(
        &self,
        file: &Path,
        name: &str,
        version: &str,
        base_model: &str,
        progress: &mut (dyn FnMut(u64, u64) + Send),
    ) -> Result<Manifest, RegistryError> {
        check_ident(name, version)?;
        if !KNOWN_MODELS.contains(&base_model) {
            return Err(RegistryError::Config(format!(
                "base model {base_model:?} is not a known model ({})",
                KNOWN_MODELS.join(", ")
            )));
        }
        let f = file.to_path_buf();
        let (format, bytes, sha256) = tokio::task::spawn_blocking(move || inspect_file(&f))
            .await
            .map_err(|e| RegistryError::Config(e.to_string()))??;
        let manifest = Manifest {
            name: name.into(),
            version: version.into(),
            base_model: base_model.into(),
            sha256,
            bytes,
            format: format.into(),
            created: humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string(),
        };
        let json = serde_json::to_vec_pretty(&manifest).expect("manifest serialises");
        match self {
            Self::Dir(root) => {
                let adapter = Self::local_path(root, name, version, ADAPTER_FILE)?;
                let mpath = Self::local_path(root, name, version, MANIFEST_FILE)?;
                let dir = adapter.parent().expect("a version folder").to_path_buf();
                // A re-push first takes the old manifest away: never a manifest beside other bytes.
                match std::fs::remove_file(&mpath) {
                    Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(io_err(&mpath, e)),
                    _ => {}
                }
                std::fs::create_dir_all(&dir).map_err(|e| io_err(&dir, e))?;
                let tmp = dir.join(format!(".{ADAPTER_FILE}.{}.tmp", uuid::Uuid::new_v4()));
                let copied = (|| -> std::io::Result<()> {
                    let mut src = std::fs::File::open(file)?;
                    let mut dst = std::fs::File::create(&tmp)?;
                    let mut buf = vec![0u8; 8 << 20];
                    let mut done = 0u64;
                    loop {
                        let n = src.read(&mut buf)?;
                        if n == 0 {
                            break;
                        }
                        dst.write_all(&buf[..n])?;
                        done += n as u64;
                        progress(done, bytes);
                    }
                    dst.sync_all()?;
                    std::fs::rename(&tmp, &adapter)
                })();
                if let Err(e) = copied {
                    let _ = std::fs::remove_file(&tmp);
                    return Err(io_err(&adapter, e));
                }
                write_atomic(&dir, &mpath, &json)?;
            }
            Self::S3 { store, prefix, .. } => {
                use object_store::ObjectStoreExt as _;
                let akey = Self::s3_key(prefix, name, version, ADAPTER_FILE)?;
                let mkey = Self::s3_key(prefix, name, version, MANIFEST_FILE)?;
                let s3 = |key: &object_store::path::Path| {
                    let key = key.to_string();
                    move |source| RegistryError::S3 { key, source }
                };
                match store.delete(&mkey).await {
                    Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
                    Err(e) => return Err(s3(&mkey)(e)),
                }
                let upload = store.put_multipart(&akey).await.map_err(s3(&akey))?;
                let mut w = object_store::WriteMultipart::new(upload);
                let mut src = std::fs::File::open(file).map_err(|e| io_err(file, e))?;
                let mut buf = vec![0u8; 8 << 20];
                let mut done = 0u64;
                loop {
                    let n = src.read(&mut buf).map_err(|e| io_err(file, e))?;
                    if n == 0 {
                        break;
                    }
                    w.wait_for_capacity(4).await.map_err(s3(&akey))?;
                    w.write(&buf[..n]);
                    done += n as u64;
                    progress(done, bytes);
                }
                w.finish().await.map_err(s3(&akey))?;
                store
                    .put(&mkey, object_store::PutPayload::from(json))
                    .await
                    .map_err(s3(&mkey))?;
            }
        }
        Ok(manifest)
    }

    /// Removes `name@version` (manifest first, so it stops being admitted at once). `false` when
    /// the registry had no manifest for it (leftover files of a stopped push are removed anyway).
    pub async fn remove(&self, name: &str, version: &str) -> Result<bool, RegistryError> {
        match self {
            Self::Dir(root) => {
                let mpath = Self::local_path(root, name, version, MANIFEST_FILE)?;
                let existed = match std::fs::remove_file(&mpath) {
                    Ok(()) => true,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => false,
                    Err(e) => return Err(io_err(&mpath, e)),
                };
                let dir = mpath.parent().expect("a version folder").to_path_buf();
                match std::fs::remove_dir_all(&dir) {
                    Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(io_err(&dir, e)),
                    _ => {}
                }
                // The name's folder goes when its last version does.
                if let Some(parent) = dir.parent() {
                    let _ = std::fs::remove_dir(parent);
                }
                Ok(existed)
            }
            Self::S3 { store, prefix, .. } => {
                use object_store::ObjectStoreExt as _;
                let mkey = Self::s3_key(prefix, name, version, MANIFEST_FILE)?;
                let existed = match store.head(&mkey).await {
                    Ok(_) => true,
                    Err(object_store::Error::NotFound { .. }) => false,
                    Err(source) => {
                        return Err(RegistryError::S3 {
                            key: mkey.to_string(),
                            source,
                        });
                    }
                };
                for file in [MANIFEST_FILE, ADAPTER_FILE] {
                    let key = Self::s3_key(prefix, name, version, file)?;
                    match store.delete(&key).await {
                        Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
                        Err(source) => {
                            return Err(RegistryError::S3 {
                                key: key.to_string(),
                                source,
                            });
                        }
                    }
                }
                Ok(existed)
            }
        }
    }

    /// Downloads (or copies) the adapter of `m` to `dest`, through a temporary file beside it,
    /// and checks its size and SHA-256 against the manifest; `dest` appears only when they match.
    pub async fn fetch(&self, m: &Manifest, dest: &Path) -> Result<(), RegistryError> {
        let dir = dest
            .parent()
            .ok_or_else(|| RegistryError::Config(format!("{}: no parent folder", dest.display())))?;
        tokio::fs::create_dir_all(dir).await.map_err(|e| io_err(dir, e))?;
        let tmp = dir.join(format!(".fetch.{}.tmp", uuid::Uuid::new_v4()));
        let result = self.fetch_to(m, &tmp).await;
        let checked = match result {
            Ok((sha, bytes)) if sha == m.sha256 && bytes == m.bytes => {
                tokio::fs::rename(&tmp, dest).await.map_err(|e| io_err(dest, e))
            }
            Ok((got, got_bytes)) => Err(RegistryError::Checksum {
                label: m.label(),
                got,
                got_bytes,
                want: m.sha256.clone(),
                want_bytes: m.bytes,
            }),
            Err(e) => Err(e),
        };
        if checked.is_err() {
            let _ = tokio::fs::remove_file(&tmp).await;
        }
        checked
    }

    async fn fetch_to(&self, m: &Manifest, tmp: &Path) -> Result<(String, u64), RegistryError> {
        use tokio::io::AsyncWriteExt as _;
        let mut out = tokio::fs::File::create(tmp).await.map_err(|e| io_err(tmp, e))?;
        let mut h = sha2::Sha256::new();
        let mut total = 0u64;
        match self {
            Self::Dir(root) => {
                let src = Self::local_path(root, &m.name, &m.version, ADAPTER_FILE)?;
                let mut f = match tokio::fs::File::open(&src).await {
                    Ok(f) => f,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                        return Err(RegistryError::NotFound {
                            label: m.label(),
                            registry: self.describe(),
                        });
                    }
                    Err(e) => return Err(io_err(&src, e)),
                };
                let mut buf = vec![0u8; 1 << 20];
                loop {
                    use tokio::io::AsyncReadExt as _;
                    let n = f.read(&mut buf).await.map_err(|e| io_err(&src, e))?;
                    if n == 0 {
                        break;
                    }
                    h.update(&buf[..n]);
                    out.write_all(&buf[..n]).await.map_err(|e| io_err(tmp, e))?;
                    total += n as u64;
                }
            }
            Self::S3 { store, prefix, .. } => {
                use futures_util::StreamExt as _;
                use object_store::ObjectStoreExt as _;
                let key = Self::s3_key(prefix, &m.name, &m.version, ADAPTER_FILE)?;
                let s3 = |source| RegistryError::S3 {
                    key: key.to_string(),
                    source,
                };
                let mut stream = match store.get(&key).await {
                    Ok(g) => g.into_stream(),
                    Err(object_store::Error::NotFound { .. }) => {
                        return Err(RegistryError::NotFound {
                            label: m.label(),
                            registry: self.describe(),
                        });
                    }
                    Err(e) => return Err(s3(e)),
                };
                while let Some(chunk) = stream.next().await {
                    let chunk = chunk.map_err(s3)?;
                    h.update(&chunk);
                    out.write_all(&chunk).await.map_err(|e| io_err(tmp, e))?;
                    total += chunk.len() as u64;
                }
            }
        }
        out.sync_all().await.map_err(|e| io_err(tmp, e))?;
        Ok((hex(&h.finalize()), total))
    }
}

/// Temporary file, fsync, rename.
fn write_atomic(dir: &Path, path: &Path, bytes: &[u8]) -> Result<(), RegistryError> {
    let tmp = dir.join(format!(".manifest.{}.tmp", uuid::Uuid::new_v4()));
    let r = (|| -> std::io::Result<()> {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if let Err(e) = r {
        let _ = std::fs::remove_file(&tmp);
        return Err(io_err(path, e));
    }
    Ok(())
}

/// A safetensors file of F32 tensors `(name, shape, values)`, for tests and fixtures.
pub fn f32_safetensors(tensors: &[(&str, Vec<usize>, Vec<f32>)]) -> Vec<u8> {
    let mut header = serde_json::Map::new();
    let mut data = Vec::new();
    for (name, shape, values) in tensors {
        assert_eq!(
            shape.iter().product::<usize>(),
            values.len(),
            "{name}: shape and values disagree"
        );
        let start = data.len();
        data.extend(values.iter().flat_map(|v| v.to_le_bytes()));
        header.insert(
            (*name).to_string(),
            serde_json::json!({"dtype": "F32", "shape": shape, "data_offsets": [start, data.len()]}),
        );
    }
    let mut h = serde_json::to_vec(&header).expect("header serialises");
    while !h.len().is_multiple_of(8) {
        h.push(b' ');
    }
    let mut out = (h.len() as u64).to_le_bytes().to_vec();
    out.extend(h);
    out.extend(data);
    out
}

/// A minimal safetensors file with the given tensor names (each one f32 element, tensor `i`
/// holding `i`), for tests and fixtures.
pub fn tiny_safetensors(keys: &[&str]) -> Vec<u8> {
    let tensors: Vec<(&str, Vec<usize>, Vec<f32>)> = keys
        .iter()
        .enumerate()
        .map(|(i, k)| (*k, vec![1], vec![i as f32]))
        .collect();
    f32_safetensors(&tensors)
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOSTILE: &[&str] = &[
        "",
        ".",
        "..",
        ".hidden",
        "../x",
        "a/b",
        "/abs",
        "a\\b",
        "..\\x",
        "a\0b",
        "-flag",
        "a b",
        "ditfleet:job:x",
        "x*",
    ];

    #[test]
    fn hostile_names_and_versions_never_become_a_path_or_key() {
        let root = Path::new("/srv/models");
        for bad in HOSTILE {
            assert!(check_ident(bad, "1").is_err(), "name {bad:?}");
            assert!(check_ident("a", bad).is_err(), "version {bad:?}");
            assert!(
                Registry::local_path(root, bad, "1", ADAPTER_FILE).is_err(),
                "{bad:?}"
            );
            assert!(
                Registry::local_path(root, "a", bad, MANIFEST_FILE).is_err(),
                "{bad:?}"
            );
            assert!(Registry::s3_key("p", bad, "1", ADAPTER_FILE).is_err(), "{bad:?}");
            assert!(Registry::s3_key("p", "a", bad, ADAPTER_FILE).is_err(), "{bad:?}");
        }
        assert!(Registry::s3_key("p", "a", "1", "../x").is_err());
    }

    #[test]
    fn ordinary_names_stay_one_segment_below_the_loras_folder() {
        let root = Path::new("/srv/models");
        // Including the fleet's own key shapes: one segment each, never a separator.
        for (n, v) in [
            ("pixel-art", "v1.2"),
            ("a..b", "x."),
            ("0style", "2024_01"),
            ("job.victim.done", "ditfleet.work.small"),
        ] {
            let p = Registry::local_path(root, n, v, ADAPTER_FILE).unwrap();
            assert_eq!(p, root.join("loras").join(n).join(v).join(ADAPTER_FILE));
            let k = Registry::s3_key("fleet/results", n, v, MANIFEST_FILE).unwrap();
            assert_eq!(k.as_ref(), format!("fleet/results/loras/{n}/{v}/manifest.json"));
            assert_eq!(k.parts().count(), 6);
        }
        assert_eq!(
            Registry::s3_key("", "a", "1", ADAPTER_FILE).unwrap().as_ref(),
            "loras/a/1/adapter.safetensors"
        );
    }

    #[test]
    fn formats_are_told_apart_by_tensor_names() {
        assert_eq!(
            detect_format([
                "unet.down.0.attn.to_q.lora_A.weight",
                "unet.down.0.attn.to_q.lora_B.weight"
            ]),
            Ok("peft")
        );
        assert_eq!(
            detect_format([
                "lora_unet_down_blocks_0_attn_to_q.lora_down.weight",
                "lora_unet_down_blocks_0_attn_to_q.lora_up.weight",
                "lora_unet_down_blocks_0_attn_to_q.alpha",
                "__metadata__"
            ]),
            Ok("kohya")
        );
        assert!(
            detect_format(["model.weight"])
                .unwrap_err()
                .contains("none of its 1 tensors")
        );
        assert!(
            detect_format(["a.lora_A.weight", "b.lora_down.weight"])
                .unwrap_err()
                .contains("mixes")
        );
        assert!(detect_format([]).is_err());
    }

    #[test]
    fn safetensors_headers_are_read_and_garbage_is_refused() {
        let st = tiny_safetensors(&["x.lora_A.weight", "x.lora_B.weight"]);
        let keys = safetensors_keys(&mut st.as_slice(), st.len() as u64).unwrap();
        assert_eq!(keys.len(), 2);
        assert!(safetensors_keys(&mut &b"short"[..], 5).is_err());
        let mut huge = u64::MAX.to_le_bytes().to_vec();
        huge.extend(b"{}");
        assert!(safetensors_keys(&mut huge.as_slice(), huge.len() as u64).is_err());
        let mut notjson = 4u64.to_le_bytes().to_vec();
        notjson.extend(b"nope");
        assert!(safetensors_keys(&mut notjson.as_slice(), notjson.len() as u64).is_err());
    }

    #[test]
    fn stack_keys_name_each_adapter_and_scale_in_order() {
        assert_eq!(stack_key([]), "");
        assert_eq!(
            stack_key([("a", "1", 0.8f32), ("b", "v2", 1.0)]),
            "a@1*0.8,b@v2*1"
        );
        assert_ne!(
            stack_key([("a", "1", 1.0), ("b", "1", 1.0)]),
            stack_key([("b", "1", 1.0), ("a", "1", 1.0)])
        );
    }

    #[tokio::test]
    async fn a_directory_registry_pushes_lists_fetches_verifies_and_removes() {
        let root = std::env::temp_dir().join(format!("ditfleet-lora-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&root).unwrap();
        let src = root.join("in.safetensors");
        std::fs::write(&src, tiny_safetensors(&["x.lora_A.weight", "x.lora_B.weight"])).unwrap();
        let reg = Registry::open(&format!("file://{}", root.display())).unwrap();
        assert!(reg.list().await.unwrap().is_empty());
        let mut seen = 0;
        let m = reg
            .push(&src, "pixel-art", "v1", "sdxl-base", &mut |d, _| seen = d)
            .await
            .unwrap();
        assert_eq!(
            (m.format.as_str(), m.bytes, seen),
            ("peft", std::fs::metadata(&src).unwrap().len(), m.bytes)
        );
        assert_eq!(reg.manifest("pixel-art", "v1").await.unwrap(), Some(m.clone()));
        assert_eq!(reg.manifest("pixel-art", "v2").await.unwrap(), None);
        assert!(reg.manifest("..", "v1").await.is_err());
        // A push that stopped before its manifest is not listed.
        std::fs::create_dir_all(root.join("loras/half/1")).unwrap();
        std::fs::write(root.join("loras/half/1/adapter.safetensors"), b"x").unwrap();
        assert_eq!(reg.list().await.unwrap(), vec![m.clone()]);
        let dest = root.join("cache/a.safetensors");
        reg.fetch(&m, &dest).await.unwrap();
        assert_eq!(std::fs::read(&dest).unwrap(), std::fs::read(&src).unwrap());
        // Bytes that do not match the manifest are refused and never appear at the destination.
        std::fs::write(root.join("loras/pixel-art/v1/adapter.safetensors"), b"tampered").unwrap();
        let dest2 = root.join("cache/b.safetensors");
        let err = reg.fetch(&m, &dest2).await.unwrap_err();
        assert!(matches!(err, RegistryError::Checksum { .. }), "{err}");
        assert!(!dest2.exists());
        // Not a safetensors file / not an adapter.
        std::fs::write(root.join("junk"), b"not safetensors at all").unwrap();
        let err = reg
            .push(&root.join("junk"), "j", "1", "flux-dev", &mut |_, _| {})
            .await
            .unwrap_err();
        assert!(err.to_string().contains("not a safetensors file"), "{err}");
        let err = reg
            .push(&src, "j", "1", "sd15", &mut |_, _| {})
            .await
            .unwrap_err();
        assert!(err.to_string().contains("not a known model"), "{err}");
        assert!(reg.remove("pixel-art", "v1").await.unwrap());
        assert!(!reg.remove("pixel-art", "v1").await.unwrap());
        assert!(!root.join("loras/pixel-art").exists());
        assert!(reg.remove("../etc", "v1").await.is_err());
        std::fs::remove_dir_all(&root).unwrap();
    }
}
