//! Where finished images go. The store is an interface: the local directory is the default on one
//! machine; an S3-compatible store plugs in behind the same trait for multi-node clusters.

use std::future::Future;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::pin::Pin;

/// A place that durably keeps result images and hands out URLs to them.
pub trait ResultStore: Send + Sync {
    /// Stores `png` for `job_id` durably (the call returns only once the bytes survive a crash)
    /// and returns the result URL. Storing the same job twice overwrites with identical bytes.
    fn put<'a>(
        &'a self,
        job_id: &'a str,
        png: Vec<u8>,
    ) -> Pin<Box<dyn Future<Output = std::io::Result<String>> + Send + 'a>>;

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
        let final_path = dir.join(format!("{job_id}.png"));
        let tmp = dir.join(format!(".{job_id}.png.{}.tmp", uuid::Uuid::new_v4()));
        {
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(png)?;
            f.sync_all()?;
        }
        std::fs::rename(&tmp, &final_path)?;
        std::fs::File::open(dir)?.sync_all()?;
        Ok(format!("file://{}", final_path.display()))
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

    fn describe(&self) -> String {
        format!("local directory {}", self.dir.display())
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
}
