//! A content-addressed blob store in a local directory.
//!
//! Layout: `<root>/<algorithm>/<first two hex digits>/<digest>`. Writes go
//! to `<root>/.tmp/<random>` while the content is hashed, and are renamed
//! into place only once size and digest match, so a partial or corrupt blob
//! is never visible; a crash leaves at most a file under `.tmp`.

use std::path::{Path, PathBuf};

use futures::StreamExt;
use tokio::io::AsyncWriteExt;
use tokio_util::io::ReaderStream;

use super::blob::{Algorithm, Blob, ByteStream, Verifier};
use super::{BlobList, BlobStore, PutOutcome, StoreError};

/// Name of the directory holding writes in progress.
const TEMP_DIR: &str = ".tmp";

/// A content-addressed directory: `<root>/<algorithm>/<first two hex
/// digits>/<digest>`; writes land in `<root>/.tmp` and are renamed into
/// place only once size and digest match.
#[derive(Clone, Debug)]
pub struct LocalDirStore {
    root: PathBuf,
}

/// Removes a temporary file unless it was committed.
struct TempFile {
    path: Option<PathBuf>,
}

impl Drop for TempFile {
    fn drop(&mut self) {
        if let Some(path) = self.path.take() {
            let _ = std::fs::remove_file(path);
        }
    }
}

impl LocalDirStore {
    /// A store rooted at `root` (created on first write).
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    /// The root directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Where a blob lives.
    pub fn path_of(&self, blob: &Blob) -> PathBuf {
        self.root.join(blob.algorithm.name()).join(&blob.digest[..2]).join(&blob.digest)
    }

    /// Writes raw bytes at a blob's path without any check (to simulate
    /// corruption in tests and tools).
    pub async fn write_unchecked(&self, blob: &Blob, content: &[u8]) -> Result<(), StoreError> {
        let path = self.path_of(blob);
        if let Some(parent) = path.parent() {
            tokio::fs::create_dir_all(parent).await?;
        }
        tokio::fs::write(path, content).await?;
        Ok(())
    }

    /// Stores `content` (verified like any put).
    pub async fn put_bytes(&self, blob: &Blob, content: Vec<u8>) -> Result<PutOutcome, StoreError> {
        let stream: ByteStream = Box::pin(futures::stream::once(async move { Ok(bytes::Bytes::from(content)) }));
        self.put(blob, stream).await
    }
}

#[async_trait::async_trait]
impl BlobStore for LocalDirStore {
    async fn stat(&self, blob: &Blob) -> Result<Option<u64>, StoreError> {
        match tokio::fs::metadata(self.path_of(blob)).await {
            Ok(metadata) => Ok(Some(metadata.len())),
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(error) => Err(error.into()),
        }
    }

    async fn open(&self, blob: &Blob) -> Result<ByteStream, StoreError> {
        match tokio::fs::File::open(self.path_of(blob)).await {
            Ok(file) => {
                Ok(Box::pin(ReaderStream::with_capacity(file, 64 * 1024).map(|chunk| chunk.map_err(StoreError::from))))
            }
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => Err(StoreError::NotFound(blob.reference())),
            Err(error) => Err(error.into()),
        }
    }

    async fn put(&self, blob: &Blob, mut data: ByteStream) -> Result<PutOutcome, StoreError> {
        let final_path = self.path_of(blob);
        if let Ok(metadata) = tokio::fs::metadata(&final_path).await
            && metadata.len() == blob.size
        {
            return Ok(PutOutcome::AlreadyPresent);
        }
        let temp_dir = self.root.join(TEMP_DIR);
        tokio::fs::create_dir_all(&temp_dir).await?;
        let temp_path = temp_dir.join(format!("{}.partial", uuid::Uuid::new_v4().simple()));
        let mut temp = TempFile { path: Some(temp_path.clone()) };
        let mut file = tokio::fs::File::create(&temp_path).await?;
        let mut verifier = Verifier::new(blob);
        while let Some(chunk) = data.next().await {
            let chunk = chunk?;
            verifier.update(&chunk)?;
            file.write_all(&chunk).await?;
        }
        verifier.finish()?;
        file.flush().await?;
        file.sync_all().await?;
        drop(file);
        if let Some(parent) = final_path.parent() {
            tokio::fs::create_dir_all(parent).await?;
        }
        tokio::fs::rename(&temp_path, &final_path).await?;
        temp.path = None;
        Ok(PutOutcome::Stored)
    }

    async fn list(&self) -> Result<BlobList, StoreError> {
        let root = self.root.clone();
        let blobs = tokio::task::spawn_blocking(move || list_blocking(&root))
            .await
            .map_err(|error| StoreError::Io(std::io::Error::other(error)))??;
        Ok(Box::pin(futures::stream::iter(blobs.into_iter().map(Ok))))
    }
}

fn list_blocking(root: &Path) -> Result<Vec<Blob>, StoreError> {
    let mut blobs = Vec::new();
    for algorithm in [Algorithm::Sha256, Algorithm::Sha512] {
        let algorithm_dir = root.join(algorithm.name());
        let prefixes = match std::fs::read_dir(&algorithm_dir) {
            Ok(prefixes) => prefixes,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => continue,
            Err(error) => return Err(error.into()),
        };
        for prefix in prefixes {
            let prefix = prefix?;
            if !prefix.file_type()?.is_dir() {
                continue;
            }
            for entry in std::fs::read_dir(prefix.path())? {
                let entry = entry?;
                let metadata = entry.metadata()?;
                if !metadata.is_file() {
                    continue;
                }
                let name = entry.file_name();
                let Some(digest) = name.to_str() else {
                    continue;
                };
                if let Ok(blob) = Blob::new(algorithm, digest, metadata.len()) {
                    blobs.push(blob);
                }
            }
        }
    }
    blobs.sort_by(|a, b| a.digest.cmp(&b.digest));
    Ok(blobs)
}
