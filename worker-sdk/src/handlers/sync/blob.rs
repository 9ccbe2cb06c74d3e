//! Blob references, digests and the verifying stream.

use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};

use bytes::Bytes;
use futures::Stream;
use sha2::Digest;

use super::StoreError;
use crate::jobs::BlobRef;
use crate::trace::hex;

/// A digest algorithm blobs are addressed by.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Algorithm {
    /// SHA-256 (64 hex digits).
    Sha256,
    /// SHA-512 (128 hex digits).
    Sha512,
}

impl Algorithm {
    /// The name used in blob refs and paths.
    pub fn name(self) -> &'static str {
        match self {
            Self::Sha256 => "sha256",
            Self::Sha512 => "sha512",
        }
    }

    /// Parses `sha256` / `sha512`.
    pub fn parse(name: &str) -> Option<Self> {
        match name {
            "sha256" => Some(Self::Sha256),
            "sha512" => Some(Self::Sha512),
            _ => None,
        }
    }

    fn hex_len(self) -> usize {
        match self {
            Self::Sha256 => 64,
            Self::Sha512 => 128,
        }
    }
}

/// A validated content address: algorithm, lowercase hex digest, size.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Blob {
    /// The algorithm.
    pub algorithm: Algorithm,
    /// Lowercase hex digest.
    pub digest: String,
    /// Size in bytes.
    pub size: u64,
}

impl Blob {
    /// Checks a digest and builds the blob.
    pub fn new(algorithm: Algorithm, digest: &str, size: u64) -> Result<Self, StoreError> {
        if digest.len() != algorithm.hex_len()
            || !digest.bytes().all(|byte| byte.is_ascii_digit() || (b'a'..=b'f').contains(&byte))
        {
            return Err(StoreError::Invalid(format!(
                "digest {digest:?} is not {} lowercase hex digits",
                algorithm.hex_len()
            )));
        }
        Ok(Self { algorithm, digest: digest.to_owned(), size })
    }

    /// The blob of a wire [`BlobRef`].
    pub fn from_ref(blob: &BlobRef) -> Result<Self, StoreError> {
        let algorithm = Algorithm::parse(&blob.algorithm)
            .ok_or_else(|| StoreError::Invalid(format!("unknown digest algorithm {:?}", blob.algorithm)))?;
        Self::new(algorithm, &blob.digest, blob.size)
    }

    /// The wire form.
    pub fn to_ref(&self) -> BlobRef {
        BlobRef { algorithm: self.algorithm.name().to_owned(), digest: self.digest.clone(), size: self.size }
    }

    /// Digest and size of `content` (for tests and tools).
    pub fn of(algorithm: Algorithm, content: &[u8]) -> Self {
        let mut hasher = Hasher::new(algorithm);
        hasher.update(content);
        Self { algorithm, digest: hasher.finish(), size: content.len() as u64 }
    }

    /// `algorithm:digest`, the blob's reference string.
    pub fn reference(&self) -> String {
        format!("{}:{}", self.algorithm.name(), self.digest)
    }
}

impl std::fmt::Display for Blob {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(formatter, "{} ({} bytes)", self.reference(), self.size)
    }
}

/// An incremental hash of either algorithm.
pub(crate) enum Hasher {
    Sha256(sha2::Sha256),
    Sha512(sha2::Sha512),
}

impl Hasher {
    pub(crate) fn new(algorithm: Algorithm) -> Self {
        match algorithm {
            Algorithm::Sha256 => Self::Sha256(sha2::Sha256::new()),
            Algorithm::Sha512 => Self::Sha512(sha2::Sha512::new()),
        }
    }

    pub(crate) fn update(&mut self, bytes: &[u8]) {
        match self {
            Self::Sha256(hasher) => hasher.update(bytes),
            Self::Sha512(hasher) => hasher.update(bytes),
        }
    }

    pub(crate) fn finish(self) -> String {
        match self {
            Self::Sha256(hasher) => hex(&hasher.finalize()),
            Self::Sha512(hasher) => hex(&hasher.finalize()),
        }
    }
}

/// Streamed content and the checks made on it.
pub(crate) struct Verifier {
    blob: Blob,
    hasher: Option<Hasher>,
    seen: u64,
}

impl Verifier {
    pub(crate) fn new(blob: &Blob) -> Self {
        Self { blob: blob.clone(), hasher: Some(Hasher::new(blob.algorithm)), seen: 0 }
    }

    /// Feeds a chunk; fails as soon as more than the declared size arrived.
    pub(crate) fn update(&mut self, chunk: &[u8]) -> Result<(), StoreError> {
        self.seen += chunk.len() as u64;
        if self.seen > self.blob.size {
            return Err(StoreError::SizeMismatch { expected: self.blob.size, actual: self.seen });
        }
        if let Some(hasher) = &mut self.hasher {
            hasher.update(chunk);
        }
        Ok(())
    }

    /// Checks size and digest at the end.
    pub(crate) fn finish(&mut self) -> Result<(), StoreError> {
        if self.seen != self.blob.size {
            return Err(StoreError::SizeMismatch { expected: self.blob.size, actual: self.seen });
        }
        let actual = self.hasher.take().map(Hasher::finish).unwrap_or_default();
        if actual != self.blob.digest {
            return Err(StoreError::DigestMismatch {
                expected: self.blob.reference(),
                actual: format!("{}:{actual}", self.blob.algorithm.name()),
            });
        }
        Ok(())
    }
}

/// A byte stream as blob stores read and write it.
pub type ByteStream = Pin<Box<dyn Stream<Item = Result<Bytes, StoreError>> + Send>>;

/// Passes a stream through while checking it against a blob: when the
/// content does not match, the stream ends with an error instead of ending
/// cleanly, so no store commits it; the mismatch is also kept in `failure`.
pub(crate) struct VerifyingStream {
    inner: ByteStream,
    verifier: Verifier,
    done: bool,
    pub(crate) failure: Arc<OnceLock<StoreError>>,
}

impl VerifyingStream {
    pub(crate) fn new(inner: ByteStream, blob: &Blob) -> Self {
        Self { inner, verifier: Verifier::new(blob), done: false, failure: Arc::new(OnceLock::new()) }
    }

    fn fail(&mut self, error: StoreError) -> Poll<Option<Result<Bytes, StoreError>>> {
        self.done = true;
        let _ = self.failure.set(error.duplicate());
        Poll::Ready(Some(Err(error)))
    }
}

impl Stream for VerifyingStream {
    type Item = Result<Bytes, StoreError>;

    fn poll_next(mut self: Pin<&mut Self>, context: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if self.done {
            return Poll::Ready(None);
        }
        match self.inner.as_mut().poll_next(context) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Some(Ok(chunk))) => match self.verifier.update(&chunk) {
                Ok(()) => Poll::Ready(Some(Ok(chunk))),
                Err(error) => self.fail(error),
            },
            Poll::Ready(Some(Err(error))) => {
                self.done = true;
                Poll::Ready(Some(Err(error)))
            }
            Poll::Ready(None) => match self.verifier.finish() {
                Ok(()) => {
                    self.done = true;
                    Poll::Ready(None)
                }
                Err(error) => self.fail(error),
            },
        }
    }
}
