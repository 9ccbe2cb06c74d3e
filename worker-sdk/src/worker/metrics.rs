//! Counters of one worker, cheap to read at any time.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub(crate) leased: AtomicU64,
    pub(crate) succeeded: AtomicU64,
    pub(crate) failed: AtomicU64,
    pub(crate) panicked: AtomicU64,
    pub(crate) cancelled: AtomicU64,
    pub(crate) leases_lost: AtomicU64,
    pub(crate) released_at_shutdown: AtomicU64,
    pub(crate) acks_ok: AtomicU64,
    pub(crate) nacks_ok: AtomicU64,
    pub(crate) settles_refused: AtomicU64,
    pub(crate) extensions_ok: AtomicU64,
    pub(crate) lease_streams_opened: AtomicU64,
}

impl Counters {
    pub(crate) fn add(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

/// A handle on a worker's counters; see [`WorkerMetrics::snapshot`].
#[derive(Clone, Debug, Default)]
pub struct WorkerMetrics {
    pub(crate) counters: Arc<Counters>,
}

/// Counter values at one moment.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MetricsSnapshot {
    /// Jobs received from the broker.
    pub leased: u64,
    /// Handler runs that returned `Ok`.
    pub succeeded: u64,
    /// Handler runs that returned `Err` (or timed out, or were abandoned).
    pub failed: u64,
    /// Handler runs that panicked.
    pub panicked: u64,
    /// Jobs stopped by a cancel notice.
    pub cancelled: u64,
    /// Leases found lost while a job was held.
    pub leases_lost: u64,
    /// Jobs handed back unstarted at shutdown.
    pub released_at_shutdown: u64,
    /// Acks the broker answered OK.
    pub acks_ok: u64,
    /// Nacks the broker answered OK.
    pub nacks_ok: u64,
    /// Acks and nacks refused (stale lease, not found, invalid).
    pub settles_refused: u64,
    /// Lease extensions answered OK.
    pub extensions_ok: u64,
    /// Lease streams opened (more than one per endpoint means reconnections).
    pub lease_streams_opened: u64,
}

impl WorkerMetrics {
    /// The current values.
    pub fn snapshot(&self) -> MetricsSnapshot {
        let counters = &self.counters;
        let read = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        MetricsSnapshot {
            leased: read(&counters.leased),
            succeeded: read(&counters.succeeded),
            failed: read(&counters.failed),
            panicked: read(&counters.panicked),
            cancelled: read(&counters.cancelled),
            leases_lost: read(&counters.leases_lost),
            released_at_shutdown: read(&counters.released_at_shutdown),
            acks_ok: read(&counters.acks_ok),
            nacks_ok: read(&counters.nacks_ok),
            settles_refused: read(&counters.settles_refused),
            extensions_ok: read(&counters.extensions_ok),
            lease_streams_opened: read(&counters.lease_streams_opened),
        }
    }
}
