//! Where the diff handler loads images from.

use std::path::PathBuf;
use std::time::Duration;

use bytes::Bytes;

use crate::handlers::is_safe_name;
use crate::http::{HttpClient, HttpError, empty_body, normalize_base};

/// Why an image could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// The source has no image with this digest (yet): retryable.
    #[error("image {digest} not found")]
    NotFound {
        /// The digest.
        digest: String,
    },
    /// The source could not be reached or failed: retryable.
    #[error("image source unavailable: {0}")]
    Unavailable(String),
    /// The image is larger than the source accepts: permanent.
    #[error("image {digest} exceeds {limit} bytes")]
    TooLarge {
        /// The digest.
        digest: String,
        /// The limit.
        limit: usize,
    },
    /// The digest cannot name a file or URL: permanent.
    #[error("invalid digest {0:?}")]
    InvalidDigest(String),
}

/// A place images are loaded from by digest.
#[async_trait::async_trait]
pub trait ImageSource: Send + Sync + 'static {
    /// The encoded PNG bytes of the image with `digest`.
    async fn load(&self, digest: &str) -> Result<Bytes, SourceError>;
}

/// Largest image file loaded by the built-in sources.
pub const DEFAULT_MAX_IMAGE_BYTES: usize = 64 * 1024 * 1024;

/// Images as `<root>/<digest>.png`.
#[derive(Clone, Debug)]
pub struct DirectorySource {
    root: PathBuf,
    max_bytes: usize,
}

impl DirectorySource {
    /// A source over `root`.
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into(), max_bytes: DEFAULT_MAX_IMAGE_BYTES }
    }
}

#[async_trait::async_trait]
impl ImageSource for DirectorySource {
    async fn load(&self, digest: &str) -> Result<Bytes, SourceError> {
        if !is_safe_name(digest) {
            return Err(SourceError::InvalidDigest(digest.to_owned()));
        }
        let path = self.root.join(format!("{digest}.png"));
        let metadata = match tokio::fs::metadata(&path).await {
            Ok(metadata) => metadata,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
                return Err(SourceError::NotFound { digest: digest.to_owned() });
            }
            Err(error) => return Err(SourceError::Unavailable(format!("{}: {error}", path.display()))),
        };
        if metadata.len() > self.max_bytes as u64 {
            return Err(SourceError::TooLarge { digest: digest.to_owned(), limit: self.max_bytes });
        }
        match tokio::fs::read(&path).await {
            Ok(bytes) => Ok(Bytes::from(bytes)),
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
                Err(SourceError::NotFound { digest: digest.to_owned() })
            }
            Err(error) => Err(SourceError::Unavailable(format!("{}: {error}", path.display()))),
        }
    }
}

/// Images as `GET <base>/<digest>.png` (404 means not found).
#[derive(Clone, Debug)]
pub struct HttpSource {
    base: String,
    client: HttpClient,
    timeout: Duration,
    max_bytes: usize,
}

impl HttpSource {
    /// A source under an `http://` base URL.
    pub fn new(base: &str) -> Result<Self, HttpError> {
        Ok(Self {
            base: normalize_base(base)?,
            client: HttpClient::default(),
            timeout: Duration::from_secs(30),
            max_bytes: DEFAULT_MAX_IMAGE_BYTES,
        })
    }

    /// Per-request timeout (default 30 s).
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }
}

#[async_trait::async_trait]
impl ImageSource for HttpSource {
    async fn load(&self, digest: &str) -> Result<Bytes, SourceError> {
        if !is_safe_name(digest) {
            return Err(SourceError::InvalidDigest(digest.to_owned()));
        }
        let url = format!("{}/{digest}.png", self.base);
        let response = self
            .client
            .send(http::Method::GET, &url, &[], empty_body(), self.timeout)
            .await
            .map_err(|error| SourceError::Unavailable(error.to_string()))?;
        match response.status() {
            http::StatusCode::OK => HttpClient::read_body(&url, response, self.max_bytes, self.timeout)
                .await
                .map_err(|error| SourceError::Unavailable(error.to_string())),
            http::StatusCode::NOT_FOUND | http::StatusCode::GONE => {
                Err(SourceError::NotFound { digest: digest.to_owned() })
            }
            status => Err(SourceError::Unavailable(format!("{url} answered {status}"))),
        }
    }
}
