//! Where finished images go. The store is an interface: the local directory is the default on one
//! machine; the S3-compatible store ([`S3Store`], `DITFLEET_RESULT_URL=s3://bucket/prefix`) serves
//! multi-node clusters.

use std::future::Future;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::pin::Pin;

use ditfleet_common::ident::{join_within, segment};

/// A place that durably keeps result images and hands out URLs to them.
pub trait ResultStore: Send + Sync {
    /// Stores `png` for `job_id` durably (the call returns only once the bytes survive a crash)
    /// and returns the result URL. Storing the same job twice overwrites with identical bytes.
    fn put<'a>(
        &'a self,
        job_id: &'a str,
        png: Vec<u8>,
    ) -> Pin<Box<dyn Future<Output = std::io::Result<String>> + Send + 'a>>;

    /// Stores a step checkpoint of a running job durably and returns its URL. Older checkpoints of
    /// the job are removed (only the newest is ever resumed from).
    fn put_checkpoint<'a>(
        &'a self,
        job_id: &'a str,
        step: u32,
        bytes: Vec<u8>,
    ) -> Pin<Box<dyn Future<Output = std::io::Result<String>> + Send + 'a>>;

    /// Reads a checkpoint by the URL [`ResultStore::put_checkpoint`] returned.
    fn get_checkpoint<'a>(
        &'a self,
        url: &'a str,
    ) -> Pin<Box<dyn Future<Output = std::io::Result<Vec<u8>>> + Send + 'a>>;

    /// Removes every checkpoint of a job (it finished).
    fn delete_checkpoints<'a>(
        &'a self,
        job_id: &'a str,
    ) -> Pin<Box<dyn Future<Output = std::io::Result<()>> + Send + 'a>>;

    /// Human-readable description for logs.
    fn describe(&self) -> String;
}

/// Files `<dir>/<job_id>.png`, written to a temporary name, fsynced, renamed, directory fsynced.
#[derive(Debug, Clone)]
pub struct LocalDirStore {
    dir: PathBuf,
}

impl LocalDirStore {
    pub fn new(dir: &Path) -> std::io::Result<Self> {
        std::fs::create_dir_all(dir)?;
        Ok(Self {
            dir: std::fs::canonicalize(dir)?,
        })
    }

    fn put_blocking(dir: &Path, job_id: &str, png: &[u8]) -> std::io::Result<String> {
        let final_path = join_within(dir, "job id", &[&format!("{}.png", segment("job id", job_id)?)])?;
        Self::write_durably(dir, &final_path, png)?;
        Ok(format!("file://{}", final_path.display()))
    }

    /// Temporary file, fsync, rename, directory fsync.
    fn write_durably(dir: &Path, final_path: &Path, bytes: &[u8]) -> std::io::Result<()> {
        let name = final_path
            .file_name()
            .map(|n| n.to_string_lossy().to_string())
            .unwrap_or_default();
        let tmp = dir.join(format!(".{name}.{}.tmp", uuid::Uuid::new_v4()));
        {
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(bytes)?;
            f.sync_all()?;
        }
        std::fs::rename(&tmp, final_path)?;
        std::fs::File::open(dir)?.sync_all()?;
        Ok(())
    }

    /// `<dir>/checkpoints/<job_id>`; an id that is not one plain path segment is refused, so
    /// neither a write nor the clean-up at the job's end can reach outside this job's folder.
    fn checkpoint_dir(&self, job_id: &str) -> std::io::Result<PathBuf> {
        Ok(join_within(&self.dir, "job id", &["checkpoints", job_id])?)
    }

    fn put_checkpoint_blocking(dir: &Path, step: u32, bytes: &[u8]) -> std::io::Result<String> {
        std::fs::create_dir_all(dir)?;
        let path = dir.join(format!("step-{step:05}.ckpt"));
        Self::write_durably(dir, &path, bytes)?;
        for e in std::fs::read_dir(dir)? {
            let p = e?.path();
            if p != path && p.extension().is_some_and(|x| x == "ckpt") {
                let _ = std::fs::remove_file(p);
            }
        }
        Ok(format!("file://{}", path.display()))
    }
}

impl ResultStore for LocalDirStore {
    fn put<'a>(
        &'a self,
        job_id: &'a str,
        png: Vec<u8>,
    ) -> Pin<Box<dyn Future<Output = std::io::Result<String>> + Send + 'a>> {
        let dir = self.dir.clone();
        let job_id = job_id.to_string();
        Box::pin(async move {
            tokio::task::spawn_blocking(move || Self::put_blocking(&dir, &job_id, &png))
                .await
                .map_err(std::io::Error::other)?
        })
    }

    fn put_checkpoint<'a>(
        &'a self,
        job_id: &'a str,
        step: u32,
        bytes: Vec<u8>,
    ) -> Pin<Box<dyn Future<Output = std::io::Result<String>> + Send + 'a>> {
        let dir = self.checkpoint_dir(job_id);
        Box::pin(async move {
            let dir = dir?;
            tokio::task::spawn_blocking(move || Self::put_checkpoint_blocking(&dir, step, &bytes))
                .await
                .map_err(std::io::Error::other)?
        })
    }

    fn get_checkpoint<'a>(
        &'a self,
        url: &'a str,
    ) -> Pin<Box<dyn Future<Output = std::io::Result<Vec<u8>>> + Send + 'a>> {
        let root = self.dir.join("checkpoints");
        Box::pin(async move {
            let path = PathBuf::from(url.strip_prefix("file://").unwrap_or(url));
            // Lexical containment is not enough with `..` parts: only plain parts below the root.
            let plain = path.strip_prefix(&root).is_ok_and(|rel| {
                rel.components()
                    .all(|c| matches!(c, std::path::Component::Normal(_)))
            });
            if !plain {
                return Err(std::io::Error::other(format!(
                    "{url} is not a checkpoint of this store ({})",
                    root.display()
                )));
            }
            tokio::fs::read(path).await
        })
    }

    fn delete_checkpoints<'a>(
        &'a self,
        job_id: &'a str,
    ) -> Pin<Box<dyn Future<Output = std::io::Result<()>> + Send + 'a>> {
        let dir = self.checkpoint_dir(job_id);
        Box::pin(async move {
            match tokio::fs::remove_dir_all(&dir?).await {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
                _ => Ok(()),
            }
        })
    }

    fn describe(&self) -> String {
        format!("local directory {}", self.dir.display())
    }
}

/// Objects `<prefix>/<job_id>.png` in an S3 bucket or an S3-compatible server (MinIO, Ceph,
/// R2, ...), through `object_store`. Endpoint, region and credentials come from the standard
/// `AWS_*` variables (`AWS_ENDPOINT_URL`, `AWS_REGION`, `AWS_ACCESS_KEY_ID` /
/// `AWS_SECRET_ACCESS_KEY`, or IRSA's `AWS_WEB_IDENTITY_TOKEN_FILE` + `AWS_ROLE_ARN`, or the
/// instance/container metadata); `AWS_ALLOW_HTTP=true` permits a plain-HTTP endpoint. The result
/// URL is the object's `s3://bucket/key`, or with [`ResultUrls`] a presigned HTTPS GET URL or a
/// public base URL + key.
#[derive(Debug)]
pub struct S3Store {
    store: object_store::aws::AmazonS3,
    bucket: String,
    prefix: String,
    endpoint: Option<String>,
    urls: ResultUrls,
}

/// What the result URL of an S3 object is.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum ResultUrls {
    /// `s3://bucket/key` (clients read with their own credentials).
    #[default]
    Object,
    /// A presigned GET URL valid this long (clients need no credentials).
    Presigned(std::time::Duration),
    /// `<base>/<key>`: a public bucket or a CDN in front of it.
    Public(String),
}

impl S3Store {
    /// Parses `s3://bucket[/prefix]` and builds the client from the environment (no request is
    /// made here).
    pub fn from_url(url: &str, urls: ResultUrls) -> std::io::Result<Self> {
        let rest = url
            .strip_prefix("s3://")
            .ok_or_else(|| std::io::Error::other("the result URL must start with s3://"))?;
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        if bucket.is_empty() {
            return Err(std::io::Error::other("the result URL names no bucket"));
        }
        let builder = object_store::aws::AmazonS3Builder::from_env().with_bucket_name(bucket);
        let endpoint = builder
            .get_config_value(&object_store::aws::AmazonS3ConfigKey::Endpoint)
            .map(|e| ditfleet_common::config::redact_url(&e));
        let store = builder.build().map_err(std::io::Error::other)?;
        Ok(Self {
            store,
            bucket: bucket.to_string(),
            prefix: prefix.trim_matches('/').to_string(),
            endpoint,
            urls,
        })
    }

    fn key(&self, job_id: &str) -> std::io::Result<String> {
        Ok(self.prefixed(&format!("{}.png", segment("job id", job_id)?)))
    }

    fn prefixed(&self, name: &str) -> String {
        if self.prefix.is_empty() {
            name.to_string()
        } else {
            format!("{}/{name}", self.prefix)
        }
    }

    /// `<prefix>/checkpoints/<job_id>`: a job's step checkpoints (`step-00005.ckpt`).
    fn checkpoint_dir(&self, job_id: &str) -> std::io::Result<object_store::path::Path> {
        let id = segment("job id", job_id)?;
        Ok(object_store::path::Path::from(
            self.prefixed(&format!("checkpoints/{id}")).as_str(),
        ))
    }

    /// Objects under a job's checkpoint directory.
    async fn checkpoint_objects(&self, job_id: &str) -> std::io::Result<Vec<object_store::path::Path>> {
        use futures_util::TryStreamExt as _;
        use object_store::ObjectStore as _;
        let dir = self.checkpoint_dir(job_id)?;
        let list: Vec<object_store::ObjectMeta> = self
            .store
            .list(Some(&dir))
            .try_collect()
            .await
            .map_err(std::io::Error::other)?;
        Ok(list.into_iter().map(|m| m.location).collect())
    }
}

impl ResultStore for S3Store {
    fn put<'a>(
        &'a self,
        job_id: &'a str,
        png: Vec<u8>,
    ) -> Pin<Box<dyn Future<Output = std::io::Result<String>> + Send + 'a>> {
        use object_store::ObjectStore as _;
        Box::pin(async move {
            let key = self.key(job_id)?;
            let path = object_store::path::Path::from(key.as_str());
            // A successful PUT is durable on S3 (and on the compatible servers we support).
            let mut opts = object_store::PutOptions::default();
            opts.attributes.insert(
                object_store::Attribute::ContentType,
                object_store::AttributeValue::from("image/png"),
            );
            self.store
                .put_opts(&path, object_store::PutPayload::from(png), opts)
                .await
                .map_err(std::io::Error::other)?;
            match &self.urls {
                ResultUrls::Object => Ok(format!("s3://{}/{key}", self.bucket)),
                ResultUrls::Public(base) => Ok(format!("{}/{key}", base.trim_end_matches('/'))),
                ResultUrls::Presigned(valid) => {
                    use object_store::signer::Signer as _;
                    let url = self
                        .store
                        .signed_url(object_store::signer::Method::GET, &path, *valid)
                        .await
                        .map_err(std::io::Error::other)?;
                    Ok(url.to_string())
                }
            }
        })
    }

    fn put_checkpoint<'a>(
        &'a self,
        job_id: &'a str,
        step: u32,
        bytes: Vec<u8>,
    ) -> Pin<Box<dyn Future<Output = std::io::Result<String>> + Send + 'a>> {
        use object_store::ObjectStoreExt as _;
        Box::pin(async move {
            let path = self
                .checkpoint_dir(job_id)?
                .join(format!("step-{step:05}.ckpt").as_str());
            self.store
                .put(&path, object_store::PutPayload::from(bytes))
                .await
                .map_err(std::io::Error::other)?;
            // Only the newest is ever resumed from: remove the older ones (best effort).
            for old in self.checkpoint_objects(job_id).await.unwrap_or_default() {
                if old != path {
                    let _ = self.store.delete(&old).await;
                }
            }
            Ok(format!("s3://{}/{path}", self.bucket))
        })
    }

    fn get_checkpoint<'a>(
        &'a self,
        url: &'a str,
    ) -> Pin<Box<dyn Future<Output = std::io::Result<Vec<u8>>> + Send + 'a>> {
        use object_store::ObjectStoreExt as _;
        Box::pin(async move {
            let own = format!("s3://{}/{}", self.bucket, self.prefixed("checkpoints/"));
            let Some(key) = url
                .strip_prefix(&format!("s3://{}/", self.bucket))
                .filter(|_| url.starts_with(&own))
            else {
                return Err(std::io::Error::other(format!(
                    "{url} is not a checkpoint of this store ({own})"
                )));
            };
            let got = self
                .store
                .get(&object_store::path::Path::from(key))
                .await
                .map_err(std::io::Error::other)?;
            Ok(got.bytes().await.map_err(std::io::Error::other)?.to_vec())
        })
    }

    fn delete_checkpoints<'a>(
        &'a self,
        job_id: &'a str,
    ) -> Pin<Box<dyn Future<Output = std::io::Result<()>> + Send + 'a>> {
        use object_store::ObjectStoreExt as _;
        Box::pin(async move {
            for p in self.checkpoint_objects(job_id).await? {
                match self.store.delete(&p).await {
                    Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
                    Err(e) => return Err(std::io::Error::other(e)),
                }
            }
            Ok(())
        })
    }

    fn describe(&self) -> String {
        format!(
            "s3://{}/{} (endpoint {})",
            self.bucket,
            self.prefix,
            self.endpoint.as_deref().unwrap_or("AWS default")
        )
    }
}

/// The store `result_url` selects: `s3://bucket/prefix` → [`S3Store`]; unset or `file://dir` →
/// [`LocalDirStore`] (in `result_dir` when unset).
pub fn open(
    result_url: Option<&str>,
    result_dir: &Path,
    urls: ResultUrls,
) -> std::io::Result<Box<dyn ResultStore>> {
    match result_url {
        Some(u) if u.starts_with("s3://") => Ok(Box::new(S3Store::from_url(u, urls)?)),
        Some(u) => match u.strip_prefix("file://") {
            Some(dir) => Ok(Box::new(LocalDirStore::new(Path::new(dir))?)),
            None => Err(std::io::Error::other("the result URL must be s3:// or file://")),
        },
        None => Ok(Box::new(LocalDirStore::new(result_dir)?)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn local_store_writes_atomically_and_returns_a_file_url() {
        let dir = std::env::temp_dir().join(format!("ditfleet-store-{}", uuid::Uuid::new_v4()));
        let store = LocalDirStore::new(&dir).unwrap();
        let url = store.put("job-1", b"\x89PNG fake".to_vec()).await.unwrap();
        let path = url.strip_prefix("file://").unwrap();
        assert_eq!(std::fs::read(path).unwrap(), b"\x89PNG fake");
        let names: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names.len(), 1, "no temporary file is left behind: {names:?}");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[tokio::test]
    async fn checkpoints_keep_only_the_newest_and_are_deleted_with_the_job() {
        let dir = std::env::temp_dir().join(format!("ditfleet-store-{}", uuid::Uuid::new_v4()));
        let store = LocalDirStore::new(&dir).unwrap();
        let u1 = store.put_checkpoint("j:1", 5, b"five".to_vec()).await.unwrap();
        let u2 = store.put_checkpoint("j:1", 10, b"ten".to_vec()).await.unwrap();
        assert_eq!(store.get_checkpoint(&u2).await.unwrap(), b"ten");
        assert!(
            store.get_checkpoint(&u1).await.is_err(),
            "older checkpoint removed"
        );
        assert!(
            store.get_checkpoint("file:///etc/passwd").await.is_err(),
            "only its own files"
        );
        store.delete_checkpoints("j:1").await.unwrap();
        assert!(store.get_checkpoint(&u2).await.is_err());
        store.delete_checkpoints("never-had-one").await.unwrap();
        std::fs::remove_dir_all(dir).unwrap();
    }
}
