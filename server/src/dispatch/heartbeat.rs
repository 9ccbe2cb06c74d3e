//! This replica's heartbeat, sent on a connection of its own.
//!
//! Every replica tells the others, once a second, that it listens
//! ([`super::presence`]); a replica that hears no other one announces no
//! jobs. The heartbeat goes out on a connection outside the pools: a
//! replica whose hot statements hold every pooled connection for a few
//! seconds would otherwise fall silent and look gone to the others, which
//! would then stop announcing their jobs to its streams until its pool
//! frees up (costing those streams up to their idle re-check, never a job).

use std::sync::Arc;
use std::time::Duration;

use sqlx::PgConnection;
use tokio::time::MissedTickBehavior;
use tokio_util::sync::CancellationToken;

use super::announcer::Announcements;
use super::presence::{self, HEARTBEAT_INTERVAL};
use crate::store::{self, LEASES_CHANNEL, Store};

/// How long connecting may take before the heartbeat gives up until its
/// next beat.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long one heartbeat statement may take before its connection is
/// dropped: longer than that and this replica's own heartbeat has lapsed
/// anyway ([`presence::OWN_HEARTBEAT_TTL`]).
const SEND_TIMEOUT: Duration = Duration::from_secs(2);

/// The loop that sends this replica's heartbeat.
pub struct Heartbeat {
    store: Store,
    announcements: Arc<Announcements>,
}

impl Heartbeat {
    pub fn new(store: Store, announcements: Arc<Announcements>) -> Self {
        Self { store, announcements }
    }

    /// Sends a heartbeat every [`HEARTBEAT_INTERVAL`], and at once when the
    /// listener (re)connects, until `shutdown`. A failed heartbeat drops
    /// its connection; the next one connects again.
    pub async fn run(self, shutdown: CancellationToken) {
        let payload = presence::heartbeat_payload(self.store.notify_suffix());
        let mut connection: Option<PgConnection> = None;
        let mut failing = false;
        let mut ticks = tokio::time::interval(HEARTBEAT_INTERVAL);
        ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = ticks.tick() => {}
                () = self.announcements.beat_requested() => ticks.reset(),
                () = shutdown.cancelled() => break,
            }
            match self.send(&mut connection, &payload).await {
                Ok(()) if failing => {
                    failing = false;
                    tracing::info!("heartbeats go out again");
                }
                Ok(()) => {}
                Err(error) => {
                    connection = None;
                    if !failing {
                        failing = true;
                        tracing::warn!(%error, "could not send this replica's heartbeat; the other replicas keep announcing their jobs to it while they heard it lately, and its streams find the rest at their idle re-check");
                    }
                }
            }
        }
        if let Some(connection) = connection {
            store::close_connection(connection).await;
        }
    }

    async fn send(&self, connection: &mut Option<PgConnection>, payload: &str) -> Result<(), store::Error> {
        let connection = match connection {
            Some(connection) => connection,
            None => {
                let connected = tokio::time::timeout(CONNECT_TIMEOUT, self.store.connect_dedicated())
                    .await
                    .map_err(|_| store::Error::Unavailable("connecting for the heartbeat timed out".to_owned()))??;
                connection.insert(connected)
            }
        };
        tokio::time::timeout(SEND_TIMEOUT, store::notify_on(connection, LEASES_CHANNEL, payload))
            .await
            .map_err(|_| store::Error::Unavailable("the heartbeat statement timed out".to_owned()))?
    }
}
