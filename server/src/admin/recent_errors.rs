//! A small ring buffer of the warnings and errors the broker logged, for the
//! status page, filled by a `tracing` layer.
//!
//! The broker logs every failure it does not answer to a caller (a batch
//! that failed, a lease statement retried, etcd unreachable, a release that
//! could not be written); the layer copies those WARN and ERROR events here.
//! Repeats of the newest message are folded into one entry with a count, so
//! an outage that logs on every retry does not push everything else out.

use std::collections::VecDeque;
use std::fmt::Write as _;
use std::sync::{Arc, Mutex, OnceLock};

use chrono::{DateTime, Utc};
use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::layer::{Context, Layer};

/// Entries kept.
pub const DEFAULT_CAPACITY: usize = 50;

/// One logged warning or error.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RecentError {
    /// When it was last logged.
    pub at: DateTime<Utc>,
    /// `WARN` or `ERROR`.
    pub level: String,
    /// The module that logged it.
    pub target: String,
    /// The message, then its fields as `key=value`.
    pub message: String,
    /// How many times in a row it was logged.
    pub repeated: u64,
}

/// The bounded buffer.
#[derive(Debug)]
pub struct RecentErrors {
    capacity: usize,
    entries: Mutex<VecDeque<RecentError>>,
}

impl RecentErrors {
    /// An empty buffer keeping `capacity` entries.
    pub fn new(capacity: usize) -> Arc<Self> {
        Arc::new(Self { capacity: capacity.max(1), entries: Mutex::new(VecDeque::new()) })
    }

    /// The process-wide buffer that [`crate::telemetry::init`] fills and the
    /// status page shows.
    pub fn global() -> Arc<Self> {
        static GLOBAL: OnceLock<Arc<RecentErrors>> = OnceLock::new();
        GLOBAL.get_or_init(|| RecentErrors::new(DEFAULT_CAPACITY)).clone()
    }

    /// Adds an entry (or counts a repeat of the newest one).
    pub fn push(&self, level: &str, target: &str, message: String) {
        let mut entries = self.entries.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let now = Utc::now();
        if let Some(newest) = entries.back_mut()
            && newest.level == level
            && newest.target == target
            && newest.message == message
        {
            newest.repeated += 1;
            newest.at = now;
            return;
        }
        if entries.len() == self.capacity {
            entries.pop_front();
        }
        entries.push_back(RecentError {
            at: now,
            level: level.to_owned(),
            target: target.to_owned(),
            message,
            repeated: 1,
        });
    }

    /// The entries, newest first.
    pub fn snapshot(&self) -> Vec<RecentError> {
        self.entries.lock().unwrap_or_else(std::sync::PoisonError::into_inner).iter().rev().cloned().collect()
    }
}

/// Copies WARN and ERROR events into a [`RecentErrors`].
pub struct RecentErrorsLayer {
    errors: Arc<RecentErrors>,
}

impl RecentErrorsLayer {
    /// A layer feeding `errors`.
    pub fn new(errors: Arc<RecentErrors>) -> Self {
        Self { errors }
    }
}

/// Collects an event's message and fields into one line.
#[derive(Default)]
struct MessageVisitor {
    message: String,
    fields: String,
}

impl Visit for MessageVisitor {
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.message.push_str(value);
        } else {
            let _ = write!(self.fields, " {}={value}", field.name());
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            let _ = write!(self.message, "{value:?}");
        } else {
            let _ = write!(self.fields, " {}={value:?}", field.name());
        }
    }
}

impl<S: Subscriber> Layer<S> for RecentErrorsLayer {
    fn on_event(&self, event: &Event<'_>, _context: Context<'_, S>) {
        let level = *event.metadata().level();
        if level > Level::WARN {
            return;
        }
        let mut visitor = MessageVisitor::default();
        event.record(&mut visitor);
        visitor.message.push_str(&visitor.fields);
        self.errors.push(level.as_str(), event.metadata().target(), visitor.message);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tracing_subscriber::layer::SubscriberExt;

    #[test]
    fn keeps_the_newest_warnings_and_folds_repeats() {
        let errors = RecentErrors::new(2);
        let subscriber = tracing_subscriber::registry().with(RecentErrorsLayer::new(errors.clone()));
        tracing::subscriber::with_default(subscriber, || {
            tracing::info!("not kept");
            tracing::warn!(batch = "ack", "batch failed");
            tracing::warn!(batch = "ack", "batch failed");
            tracing::error!("first error");
            tracing::error!(code = 7, "second error");
        });
        let kept = errors.snapshot();
        assert_eq!(kept.len(), 2);
        assert_eq!(kept[0].message, "second error code=7");
        assert_eq!(kept[1].message, "first error");
        assert_eq!(kept[1].level, "ERROR");
        let errors = RecentErrors::new(5);
        errors.push("WARN", "t", "same".to_owned());
        errors.push("WARN", "t", "same".to_owned());
        assert_eq!(errors.snapshot()[0].repeated, 2);
    }
}
