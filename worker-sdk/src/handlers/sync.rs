//! The `sync` handler: copy a content-addressed blob from a source store to
//! a destination store, verifying size and digest before it becomes visible.
//!
//! A job ([`SyncJob`]) names a blob (algorithm, digest, size) and the names
//! of a source and a destination store registered in the handler. The
//! handler skips blobs the destination already has (so re-runs are no-ops),
//! streams the content otherwise, and relies on each store's commit on
//! verify: [`LocalDirStore`] writes to a temporary file and renames it only
//! when size and digest match; [`HttpBlobStore`] uploads to a server that
//! does the same ([`BlobServer`]), and ends the upload with an error if the
//! content it streams does not match. A blob is never partially visible.
//!
//! | what happens | outcome |
//! |---|---|
//! | payload undecodable, unknown version, invalid blob ref, unknown store | permanent |
//! | blob missing at the source | retry (it may arrive) |
//! | content at the source does not match the blob ref | permanent (a corrupt source needs an operator) |
//! | network or disk failure, destination failing mid-copy | retry |
//!
//! [`FullSync`] is the producer that enumerates a source store and enqueues
//! one job per blob missing at the destination, with the blob reference as
//! dedup key. [`SyncHandler::stats`] gives copies, bytes, errors and the
//! most recent errors, for a status page.

mod blob;
mod http_store;
mod local;

use std::collections::{HashMap, VecDeque};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use futures::{Stream, StreamExt};
use tokio_util::sync::CancellationToken;

pub use blob::{Algorithm, Blob, ByteStream};
pub use http_store::{BlobServer, HttpBlobStore};
pub use local::LocalDirStore;

use crate::client::{self, Client, JobBuilder};
use crate::jobs::{SyncJob, SyncResult};
use crate::worker::{Handler, JobContext, JobError, Output};

/// The job kind this handler serves.
pub const KIND: &str = "sync";
/// The payload version this handler understands.
pub const CURRENT_VERSION: u32 = 1;
/// How many recent errors [`SyncStats`] keeps.
pub const RECENT_ERRORS: usize = 20;

/// Why a blob store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The store has no such blob.
    #[error("blob {0} not found")]
    NotFound(String),
    /// The content had another size than the blob ref says.
    #[error("size mismatch: expected {expected} bytes, got {actual}")]
    SizeMismatch {
        /// Declared size.
        expected: u64,
        /// Bytes seen (so far).
        actual: u64,
    },
    /// The content hashed to another digest than the blob ref says.
    #[error("digest mismatch: expected {expected}, got {actual}")]
    DigestMismatch {
        /// Declared reference.
        expected: String,
        /// Reference of the content.
        actual: String,
    },
    /// An argument was malformed.
    #[error("invalid: {0}")]
    Invalid(String),
    /// The local file system failed.
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),
    /// An HTTP store could not be reached or answered an error.
    #[error("HTTP store: {0}")]
    Http(String),
    /// The store refused the upload (its own size or digest check).
    #[error("the store refused the blob: {0}")]
    Rejected(String),
    /// The store cannot do this.
    #[error("not supported by this store: {0}")]
    Unsupported(&'static str),
}

impl StoreError {
    /// A copy of this error (I/O errors keep their kind and text).
    pub fn duplicate(&self) -> Self {
        match self {
            Self::NotFound(reference) => Self::NotFound(reference.clone()),
            Self::SizeMismatch { expected, actual } => Self::SizeMismatch { expected: *expected, actual: *actual },
            Self::DigestMismatch { expected, actual } => {
                Self::DigestMismatch { expected: expected.clone(), actual: actual.clone() }
            }
            Self::Invalid(text) => Self::Invalid(text.clone()),
            Self::Io(error) => Self::Io(std::io::Error::new(error.kind(), error.to_string())),
            Self::Http(text) => Self::Http(text.clone()),
            Self::Rejected(text) => Self::Rejected(text.clone()),
            Self::Unsupported(what) => Self::Unsupported(what),
        }
    }
}

/// What a put did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PutOutcome {
    /// The blob was written and verified.
    Stored,
    /// The store already had it; nothing was written.
    AlreadyPresent,
}

/// A stream of blobs, as [`BlobStore::list`] returns.
pub type BlobList = Pin<Box<dyn Stream<Item = Result<Blob, StoreError>> + Send>>;

/// A content-addressed blob store.
#[async_trait::async_trait]
pub trait BlobStore: Send + Sync + 'static {
    /// The stored size of the blob, or `None` if absent.
    async fn stat(&self, blob: &Blob) -> Result<Option<u64>, StoreError>;

    /// The blob's content ([`StoreError::NotFound`] if absent).
    async fn open(&self, blob: &Blob) -> Result<ByteStream, StoreError>;

    /// Stores `data` as `blob`. Must check size and digest before the blob
    /// becomes visible, and leave nothing visible when they do not match or
    /// the stream fails.
    async fn put(&self, blob: &Blob, data: ByteStream) -> Result<PutOutcome, StoreError>;

    /// Every blob in the store (for full syncs).
    async fn list(&self) -> Result<BlobList, StoreError>;
}

/// A sync job for `queue`: copy `blob` from the store named `source` to the
/// one named `destination`; deduplicated by the blob reference.
pub fn job(queue: impl Into<String>, blob: &Blob, source: &str, destination: &str) -> JobBuilder {
    JobBuilder::new(queue, KIND)
        .message(&SyncJob {
            version: CURRENT_VERSION,
            blob: Some(blob.to_ref()),
            source: source.to_owned(),
            destination: destination.to_owned(),
        })
        .dedup_key(blob.reference())
}

/// One recent failure.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RecentError {
    /// When it happened.
    pub at: SystemTime,
    /// The blob reference.
    pub blob: String,
    /// What went wrong.
    pub message: String,
}

/// The handler's counters.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SyncStats {
    /// Blobs copied.
    pub copied: u64,
    /// Jobs whose blob the destination already had.
    pub skipped: u64,
    /// Bytes copied.
    pub bytes: u64,
    /// Failed attempts.
    pub errors: u64,
    /// The latest failures, newest last (at most [`RECENT_ERRORS`]).
    pub recent_errors: Vec<RecentError>,
}

#[derive(Debug, Default)]
struct Counters {
    copied: AtomicU64,
    skipped: AtomicU64,
    bytes: AtomicU64,
    errors: AtomicU64,
    recent: Mutex<VecDeque<RecentError>>,
}

/// Builds a [`SyncHandler`].
#[derive(Default)]
pub struct SyncHandlerBuilder {
    stores: HashMap<String, Arc<dyn BlobStore>>,
}

impl std::fmt::Debug for SyncHandlerBuilder {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.debug_struct("SyncHandlerBuilder").field("stores", &self.stores.keys().collect::<Vec<_>>()).finish()
    }
}

impl SyncHandlerBuilder {
    /// Registers a store under the name jobs use for it.
    pub fn store(mut self, name: impl Into<String>, store: impl BlobStore) -> Self {
        self.stores.insert(name.into(), Arc::new(store));
        self
    }

    /// Registers a shared store.
    pub fn shared_store(mut self, name: impl Into<String>, store: Arc<dyn BlobStore>) -> Self {
        self.stores.insert(name.into(), store);
        self
    }

    /// The handler.
    pub fn build(self) -> SyncHandler {
        SyncHandler { stores: self.stores, counters: Arc::default() }
    }
}

/// The `sync` handler; see the [module docs](self).
pub struct SyncHandler {
    stores: HashMap<String, Arc<dyn BlobStore>>,
    counters: Arc<Counters>,
}

impl std::fmt::Debug for SyncHandler {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("SyncHandler")
            .field("stores", &self.stores.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

/// A handle on a [`SyncHandler`]'s counters that outlives moving the
/// handler into a worker.
#[derive(Clone, Debug)]
pub struct SyncStatsHandle {
    counters: Arc<Counters>,
}

impl SyncStatsHandle {
    /// The counters now.
    pub fn snapshot(&self) -> SyncStats {
        snapshot(&self.counters)
    }
}

fn snapshot(counters: &Counters) -> SyncStats {
    SyncStats {
        copied: counters.copied.load(Ordering::Relaxed),
        skipped: counters.skipped.load(Ordering::Relaxed),
        bytes: counters.bytes.load(Ordering::Relaxed),
        errors: counters.errors.load(Ordering::Relaxed),
        recent_errors: counters.recent.lock().map(|recent| recent.iter().cloned().collect()).unwrap_or_default(),
    }
}

impl SyncHandler {
    /// Starts building a handler.
    pub fn builder() -> SyncHandlerBuilder {
        SyncHandlerBuilder::default()
    }

    /// The counters now.
    pub fn stats(&self) -> SyncStats {
        snapshot(&self.counters)
    }

    /// A handle on the counters, readable after the handler moved into a worker.
    pub fn stats_handle(&self) -> SyncStatsHandle {
        SyncStatsHandle { counters: self.counters.clone() }
    }

    fn record_error(&self, blob: &str, message: &str) {
        self.counters.errors.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut recent) = self.counters.recent.lock() {
            if recent.len() == RECENT_ERRORS {
                recent.pop_front();
            }
            recent.push_back(RecentError { at: SystemTime::now(), blob: blob.to_owned(), message: message.to_owned() });
        }
    }

    fn store(&self, name: &str) -> Result<&Arc<dyn BlobStore>, JobError> {
        self.stores.get(name).ok_or_else(|| JobError::permanent(format!("unknown blob store {name:?}")))
    }

    /// Copies one blob (the body of [`Handler::handle`]).
    pub async fn sync(&self, job: &JobContext) -> Result<SyncResult, JobError> {
        let payload: SyncJob = job.decode()?;
        if payload.version != CURRENT_VERSION {
            return Err(JobError::permanent(format!(
                "unsupported sync payload version {} (this worker knows {CURRENT_VERSION})",
                payload.version
            )));
        }
        let blob_ref = payload.blob.as_ref().ok_or_else(|| JobError::permanent("the job names no blob"))?;
        let blob = Blob::from_ref(blob_ref).map_err(|error| JobError::permanent(error.to_string()))?;
        let source = self.store(&payload.source)?;
        let destination = self.store(&payload.destination)?;
        let reference = blob.reference();
        let result = self.copy(&blob, source, destination, job.cancellation()).await;
        if let Err(error) = &result {
            self.record_error(&reference, error.message());
            tracing::warn!(blob = %blob, source = %payload.source, destination = %payload.destination, %error, "sync failed");
        }
        result
    }

    async fn copy(
        &self,
        blob: &Blob,
        source: &Arc<dyn BlobStore>,
        destination: &Arc<dyn BlobStore>,
        cancel: &CancellationToken,
    ) -> Result<SyncResult, JobError> {
        let retry = |what: &str, error: StoreError| JobError::retry(format!("{what} {blob}: {error}"));
        match destination.stat(blob).await {
            Ok(Some(size)) if size == blob.size => {
                self.counters.skipped.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(blob = %blob, "destination already has the blob");
                return Ok(SyncResult { copied: false, bytes: 0 });
            }
            Ok(Some(size)) => {
                tracing::warn!(blob = %blob, size, "destination has the blob with a wrong size; replacing it");
            }
            Ok(None) => {}
            Err(error) => return Err(retry("checking the destination for", error)),
        }
        let content = match source.open(blob).await {
            Ok(content) => content,
            Err(StoreError::NotFound(_)) => {
                return Err(JobError::retry(format!("blob {blob} is missing at the source")));
            }
            Err(error) => return Err(retry("reading", error)),
        };
        let verifying = blob::VerifyingStream::new(content, blob);
        let source_failure = verifying.failure.clone();
        let cancelled = cancel.clone();
        let stream: ByteStream = Box::pin(verifying.take_until(async move { cancelled.cancelled().await }));
        let outcome = destination.put(blob, stream).await;
        if let Some(failure) = source_failure.get() {
            return Err(JobError::permanent(format!(
                "the source's content does not match {blob}: {failure}; nothing was written"
            )));
        }
        if cancel.is_cancelled() {
            return Err(JobError::retry(format!("copy of {blob} cancelled")));
        }
        match outcome {
            Ok(PutOutcome::Stored) => {
                self.counters.copied.fetch_add(1, Ordering::Relaxed);
                self.counters.bytes.fetch_add(blob.size, Ordering::Relaxed);
                tracing::info!(blob = %blob, "blob copied");
                Ok(SyncResult { copied: true, bytes: blob.size })
            }
            Ok(PutOutcome::AlreadyPresent) => {
                self.counters.skipped.fetch_add(1, Ordering::Relaxed);
                Ok(SyncResult { copied: false, bytes: 0 })
            }
            Err(error) => Err(retry("writing", error)),
        }
    }
}

impl Handler for SyncHandler {
    async fn handle(&self, job: JobContext) -> Result<Output, JobError> {
        let result = self.sync(&job).await?;
        Ok(Output::message(&result))
    }
}

/// Why a full sync pass failed.
#[derive(Debug, thiserror::Error)]
pub enum FullSyncError {
    /// A store failed.
    #[error("blob store: {0}")]
    Store(#[from] StoreError),
    /// Enqueueing failed.
    #[error("enqueue: {0}")]
    Enqueue(#[from] client::Error),
}

/// What one full sync pass did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FullSyncReport {
    /// Blobs listed at the source.
    pub listed: u64,
    /// Of those, missing at the destination.
    pub missing: u64,
    /// Jobs created.
    pub enqueued: u64,
    /// Jobs that already existed unfinished (dedup key matched).
    pub deduplicated: u64,
}

/// The full-sync producer: enumerates a source store and enqueues one sync
/// job per blob missing at the destination (dedup key: the blob reference,
/// so a blob already queued is not queued twice).
pub struct FullSync {
    client: Client,
    queue: String,
    source_name: String,
    destination_name: String,
    source: Arc<dyn BlobStore>,
    destination: Arc<dyn BlobStore>,
    interval: Duration,
}

impl std::fmt::Debug for FullSync {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("FullSync")
            .field("queue", &self.queue)
            .field("source", &self.source_name)
            .field("destination", &self.destination_name)
            .finish_non_exhaustive()
    }
}

impl FullSync {
    /// A producer for `queue`; the names are those the workers' sync
    /// handlers know the stores by.
    pub fn new(
        client: Client,
        queue: impl Into<String>,
        (source_name, source): (&str, Arc<dyn BlobStore>),
        (destination_name, destination): (&str, Arc<dyn BlobStore>),
    ) -> Self {
        Self {
            client,
            queue: queue.into(),
            source_name: source_name.to_owned(),
            destination_name: destination_name.to_owned(),
            source,
            destination,
            interval: Duration::from_secs(3600),
        }
    }

    /// Time between passes of [`FullSync::run`] (default one hour).
    pub fn interval(mut self, interval: Duration) -> Self {
        self.interval = interval;
        self
    }

    /// One pass: list, compare, enqueue (in batches of up to 1000).
    pub async fn run_once(&self) -> Result<FullSyncReport, FullSyncError> {
        let mut report = FullSyncReport::default();
        let mut listed = self.source.list().await?;
        let mut batch = Vec::new();
        while let Some(blob) = listed.next().await {
            let blob = blob?;
            report.listed += 1;
            if self.destination.stat(&blob).await? == Some(blob.size) {
                continue;
            }
            report.missing += 1;
            batch.push(job(&*self.queue, &blob, &self.source_name, &self.destination_name));
            if batch.len() == client::MAX_JOBS_PER_ENQUEUE {
                self.flush(&mut batch, &mut report).await?;
            }
        }
        self.flush(&mut batch, &mut report).await?;
        Ok(report)
    }

    async fn flush(&self, batch: &mut Vec<JobBuilder>, report: &mut FullSyncReport) -> Result<(), FullSyncError> {
        if batch.is_empty() {
            return Ok(());
        }
        for enqueued in self.client.enqueue_batch(std::mem::take(batch)).await? {
            if enqueued.deduplicated {
                report.deduplicated += 1;
            } else {
                report.enqueued += 1;
            }
        }
        Ok(())
    }

    /// Runs a pass every interval until `shutdown`.
    pub async fn run(self, shutdown: CancellationToken) {
        loop {
            match self.run_once().await {
                Ok(report) if report.missing > 0 => {
                    tracing::info!(?report, "full sync pass enqueued missing blobs");
                }
                Ok(_) => {}
                Err(error) => tracing::warn!(%error, "full sync pass failed"),
            }
            tokio::select! {
                () = tokio::time::sleep(self.interval) => {}
                () = shutdown.cancelled() => return,
            }
        }
    }
}
