//! The `diff` handler: compare two images by digest, compute pixel-diff
//! metrics, store them.
//!
//! A job ([`DiffJob`]) names two image digests and optionally an image
//! source. The handler loads both PNGs ([`ImageSource`]: a directory of
//! `<digest>.png`, an HTTP base URL, or your own), decodes them to RGBA
//! (cached in a bounded LRU, [`ImageCache`]), computes [`DiffResult`]
//! ([`compare`]) and stores it in the `diff_metrics` table keyed by the
//! unordered digest pair ([`MetricsStore`]) and as the job's result.
//!
//! | what happens | outcome |
//! |---|---|
//! | payload does not decode, or `version` is not 1 | permanent (dead letter) |
//! | digest malformed, unknown source name | permanent |
//! | image missing, source unreachable, database error | retry |
//! | image undecodable or too large | permanent |
//! | the job runs past its timeout (default 10 min) | cancelled, retried |

mod cache;
mod image;
mod source;
mod store;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

pub use cache::{DEFAULT_CACHE_BYTES, ImageCache};
pub use image::{DEFAULT_MAX_PIXELS, DecodeError, DecodedImage, compare, decode_png, encode_png};
pub use source::{DEFAULT_MAX_IMAGE_BYTES, DirectorySource, HttpSource, ImageSource, SourceError};
pub use store::{DEFAULT_SCHEMA, MetricsStore, StoreError, StoredMetrics};

use crate::client::JobBuilder;
use crate::handlers::is_safe_name;
use crate::jobs::{DiffJob, DiffResult};
use crate::worker::{Handler, JobContext, JobError, Output};

/// The job kind this handler serves.
pub const KIND: &str = "diff";
/// The payload version this handler understands.
pub const CURRENT_VERSION: u32 = 1;
/// Default per-job timeout.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10 * 60);
/// Name of the source used when a job names none.
pub const DEFAULT_SOURCE: &str = "default";

/// A diff job for `queue` comparing `left` and `right` (from the worker's
/// default image source).
pub fn job(queue: impl Into<String>, left: &str, right: &str) -> JobBuilder {
    job_from_source(queue, left, right, "")
}

/// A diff job loading both images from the named source.
pub fn job_from_source(queue: impl Into<String>, left: &str, right: &str, source: &str) -> JobBuilder {
    JobBuilder::new(queue, KIND).message(&DiffJob {
        version: CURRENT_VERSION,
        left_digest: left.to_owned(),
        right_digest: right.to_owned(),
        image_source: source.to_owned(),
    })
}

/// Builds a [`DiffHandler`].
#[derive(Default)]
pub struct DiffHandlerBuilder {
    sources: HashMap<String, Arc<dyn ImageSource>>,
    store: Option<MetricsStore>,
    cache_bytes: Option<usize>,
    max_pixels: Option<u64>,
    timeout: Option<Duration>,
}

impl std::fmt::Debug for DiffHandlerBuilder {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("DiffHandlerBuilder")
            .field("sources", &self.sources.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

impl DiffHandlerBuilder {
    /// Registers an image source under `name` ([`DEFAULT_SOURCE`] is used
    /// for jobs that name none).
    pub fn source(mut self, name: impl Into<String>, source: impl ImageSource) -> Self {
        self.sources.insert(name.into(), Arc::new(source));
        self
    }

    /// Stores metrics in PostgreSQL (call [`MetricsStore::setup`] first, or
    /// use [`DiffHandlerBuilder::build_with_setup`]).
    pub fn metrics_store(mut self, store: MetricsStore) -> Self {
        self.store = Some(store);
        self
    }

    /// Bound of the decoded-image cache in bytes (default 256 MiB).
    pub fn cache_bytes(mut self, bytes: usize) -> Self {
        self.cache_bytes = Some(bytes);
        self
    }

    /// Largest image accepted, in pixels (default 64 Mi).
    pub fn max_pixels(mut self, pixels: u64) -> Self {
        self.max_pixels = Some(pixels);
        self
    }

    /// Per-job timeout (default 10 minutes).
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }

    /// The handler.
    pub fn build(self) -> DiffHandler {
        DiffHandler {
            sources: self.sources,
            store: self.store,
            cache: ImageCache::new(self.cache_bytes.unwrap_or(DEFAULT_CACHE_BYTES)),
            max_pixels: self.max_pixels.unwrap_or(DEFAULT_MAX_PIXELS),
            timeout: self.timeout.unwrap_or(DEFAULT_TIMEOUT),
        }
    }

    /// Creates the metrics table (if a store is set), then builds.
    pub async fn build_with_setup(self) -> Result<DiffHandler, StoreError> {
        if let Some(store) = &self.store {
            store.setup().await?;
        }
        Ok(self.build())
    }
}

/// The `diff` handler; see the [module docs](self).
pub struct DiffHandler {
    sources: HashMap<String, Arc<dyn ImageSource>>,
    store: Option<MetricsStore>,
    cache: ImageCache,
    max_pixels: u64,
    timeout: Duration,
}

impl std::fmt::Debug for DiffHandler {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("DiffHandler")
            .field("sources", &self.sources.keys().collect::<Vec<_>>())
            .field("cached_images", &self.cache.len())
            .finish_non_exhaustive()
    }
}

impl DiffHandler {
    /// Starts building a handler.
    pub fn builder() -> DiffHandlerBuilder {
        DiffHandlerBuilder::default()
    }

    /// The decoded-image cache.
    pub fn cache(&self) -> &ImageCache {
        &self.cache
    }

    /// Loads and decodes one image, through the cache.
    async fn image(
        &self,
        source_name: &str,
        source: &Arc<dyn ImageSource>,
        digest: &str,
    ) -> Result<Arc<DecodedImage>, JobError> {
        let key = format!("{source_name}/{digest}");
        if let Some(image) = self.cache.get(&key) {
            return Ok(image);
        }
        let bytes = source.load(digest).await.map_err(|error| match error {
            SourceError::NotFound { .. } | SourceError::Unavailable(_) => {
                JobError::retry(format!("source {source_name:?}: {error}"))
            }
            SourceError::TooLarge { .. } | SourceError::InvalidDigest(_) => {
                JobError::permanent(format!("source {source_name:?}: {error}"))
            }
        })?;
        let max_pixels = self.max_pixels;
        let decoded = tokio::task::spawn_blocking(move || decode_png(&bytes, max_pixels))
            .await
            .map_err(|error| JobError::retry(format!("decoder task failed: {error}")))?
            .map_err(|error| JobError::permanent(format!("image {digest}: {error}")))?;
        let decoded = Arc::new(decoded);
        self.cache.insert(&key, decoded.clone());
        Ok(decoded)
    }

    /// Runs one diff job to its result.
    pub async fn diff(&self, job: &JobContext) -> Result<DiffResult, JobError> {
        let payload: DiffJob = job.decode()?;
        if payload.version != CURRENT_VERSION {
            return Err(JobError::permanent(format!(
                "unsupported diff payload version {} (this worker knows {CURRENT_VERSION})",
                payload.version
            )));
        }
        for (field, digest) in [("left_digest", &payload.left_digest), ("right_digest", &payload.right_digest)] {
            if !is_safe_name(digest) {
                return Err(JobError::permanent(format!("{field} {digest:?} is not a valid digest")));
            }
        }
        let source_name = if payload.image_source.is_empty() { DEFAULT_SOURCE } else { payload.image_source.as_str() };
        let source = self
            .sources
            .get(source_name)
            .ok_or_else(|| JobError::permanent(format!("unknown image source {source_name:?}")))?;
        let loaded = tokio::select! {
            loaded = async {
                tokio::try_join!(
                    self.image(source_name, source, &payload.left_digest),
                    self.image(source_name, source, &payload.right_digest),
                )
            } => loaded,
            () = job.cancellation().cancelled() => {
                return Err(JobError::retry(format!("cancelled while loading images: {:?}", job.cancel_reason())));
            }
        };
        let (left, right) = loaded?;
        let cancel = job.cancellation().clone();
        let result = tokio::task::spawn_blocking(move || compare(&left, &right, &cancel))
            .await
            .map_err(|error| JobError::retry(format!("diff task failed: {error}")))?
            .ok_or_else(|| JobError::retry(format!("cancelled: {:?}", job.cancel_reason())))?;
        if let Some(store) = &self.store {
            store
                .upsert(&payload.left_digest, &payload.right_digest, &result)
                .await
                .map_err(|error| JobError::retry(format!("storing metrics: {error}")))?;
        }
        tracing::info!(
            left = %payload.left_digest,
            right = %payload.right_digest,
            differing_pixels = result.differing_pixels,
            score = result.score,
            "diff computed"
        );
        Ok(result)
    }
}

impl Handler for DiffHandler {
    async fn handle(&self, job: JobContext) -> Result<Output, JobError> {
        let result = self.diff(&job).await?;
        Ok(Output::message(&result))
    }

    fn timeout(&self) -> Option<Duration> {
        Some(self.timeout)
    }
}
