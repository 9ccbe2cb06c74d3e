//! Telling the other replicas about new jobs, after the enqueue committed.
//!
//! The enqueue transaction itself does not notify: a notifying transaction
//! holds a database-wide lock across its commit, WAL flush included, so
//! concurrent enqueues could not share a flush (migration 0007 says more).
//! Instead, once an enqueue has returned, the dispatcher hands the queues
//! that got waiting jobs to [`Announcements`], and the [`Announcer`] loop
//! sends them: one statement at a time, each carrying every queue named
//! since the last one, so the notifications cost next to nothing however
//! many enqueues commit per second. Queues whose every new job was handed
//! off to a local stream are not announced at all.
//!
//! Notifications are wake-up hints, never the only way to find work: a
//! replica that misses one finds the jobs at its streams' idle re-check.
//!
//! The announcer announces nothing while it is sure that no other replica
//! listens ([`super::presence`], from the heartbeats that
//! [`super::heartbeat`] sends).

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::presence::Presence;
use crate::store::{self, Store};

/// Wait after a failed announcement before trying again.
const RETRY_DELAY: Duration = Duration::from_millis(200);

/// Queues waiting to be announced. Shared by the dispatcher (which adds to
/// it) and the [`Announcer`] (which sends and empties it).
#[derive(Debug, Default)]
pub struct Announcements {
    pending: Mutex<BTreeSet<String>>,
    ready: Notify,
    /// Who listens, from the heartbeats the listener hears.
    presence: Mutex<Presence>,
    /// Asks the heartbeat for a beat now (the listener reconnected).
    beat: Notify,
}

impl Announcements {
    /// Adds queues to the next announcement; while no other replica
    /// listens, keeps them as skipped instead, without waking the announcer.
    pub fn announce<'a>(&self, queues: impl IntoIterator<Item = &'a str>) {
        let mut queues = queues.into_iter();
        if self.presence().skip_if_alone(&mut queues, Instant::now()) {
            return;
        }
        let added = {
            let mut pending = self.pending();
            let before = pending.len();
            for queue in queues {
                if !pending.contains(queue) {
                    pending.insert(queue.to_owned());
                }
            }
            pending.len() > before
        };
        if added {
            self.ready.notify_one();
        }
    }

    fn pending(&self) -> std::sync::MutexGuard<'_, BTreeSet<String>> {
        self.pending.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn presence(&self) -> std::sync::MutexGuard<'_, Presence> {
        self.presence.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn take(&self) -> Vec<String> {
        std::mem::take(&mut *self.pending()).into_iter().collect()
    }

    /// The listener (re)connected: it may have missed heartbeats, so
    /// announce everything for a while, and send a heartbeat now so that
    /// the other replicas hear this one at once.
    pub fn listening_started(&self) {
        self.presence().listening_started(Instant::now());
        self.beat.notify_one();
    }

    /// Resolves when the listener asks for a heartbeat now.
    pub(crate) async fn beat_requested(&self) {
        self.beat.notified().await;
    }

    /// The listener lost its connection.
    pub fn listening_stopped(&self) {
        self.presence().listening_stopped();
    }

    /// The listener heard the replica with notification origin `origin`
    /// (`own`: this one). A replica not heard before gets the
    /// announcements skipped lately.
    pub fn heard(&self, origin: &str, own: bool) {
        let skipped = self.presence().heard(origin, own, Instant::now());
        if !skipped.is_empty() {
            tracing::debug!(origin, queues = skipped.len(), "another replica listens: announcing the skipped queues");
            self.announce(skipped.iter().map(String::as_str));
        }
    }
}

/// The loop that sends [`Announcements`].
pub struct Announcer {
    store: Store,
    announcements: Arc<Announcements>,
}

impl Announcer {
    pub fn new(store: Store, announcements: Arc<Announcements>) -> Self {
        Self { store, announcements }
    }

    /// Sends announcements as they come until `shutdown`, then sends what is
    /// still pending once. After a failure it waits [`RETRY_DELAY`] and
    /// tries again with whatever is pending by then.
    pub async fn run(self, shutdown: CancellationToken) {
        let mut failing = false;
        loop {
            let sent = tokio::select! {
                () = self.announcements.ready.notified() => self.send_pending().await,
                () = shutdown.cancelled() => {
                    let _ = self.send_pending().await;
                    return;
                }
            };
            match sent {
                Ok(()) if failing => {
                    failing = false;
                    tracing::info!("notifying the other replicas works again");
                }
                Ok(()) => {}
                Err(error) => {
                    if !failing {
                        failing = true;
                        tracing::warn!(%error, "could not notify the other replicas of new jobs; they find them at their idle re-check until this recovers");
                    }
                    tokio::select! {
                        () = tokio::time::sleep(RETRY_DELAY) => {}
                        () = shutdown.cancelled() => return,
                    }
                }
            }
        }
    }

    /// Sends what is pending; on failure puts it back, so that the next
    /// attempt carries it.
    async fn send_pending(&self) -> Result<(), store::Error> {
        let queues = self.announcements.take();
        if queues.is_empty() {
            return Ok(());
        }
        let sent = self.store.announce_jobs(&queues).await;
        if sent.is_err() {
            self.announcements.announce(queues.iter().map(String::as_str));
        }
        sent
    }
}
