//! The LISTEN loop: turns PostgreSQL notifications into dispatcher wake-ups.

use std::sync::Arc;
use std::time::Duration;

use sqlx::postgres::PgListener;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::Dispatcher;
use super::presence::HEARTBEAT_PREFIX;
use crate::store::{HeldLease, JOBS_CHANNEL, LEASES_CHANNEL, Store};

/// Longest payload of one `workbroker_leases` notification we send.
const MAX_NOTIFY_PAYLOAD: usize = 7_000;

/// Listens on `workbroker_jobs` and `workbroker_leases` for as long as the
/// broker runs, reconnecting after connection loss (and then waking every
/// stream, since notifications may have been missed).
pub struct NotificationListener {
    store: Store,
    dispatcher: Arc<Dispatcher>,
}

impl NotificationListener {
    pub fn new(store: Store, dispatcher: Arc<Dispatcher>) -> Self {
        Self { store, dispatcher }
    }

    pub async fn run(self, shutdown: CancellationToken) {
        let mut retry_delay = Duration::from_millis(200);
        while !shutdown.is_cancelled() {
            let listener = match self.connect().await {
                Ok(listener) => listener,
                Err(error) => {
                    tracing::warn!(%error, retry_in = ?retry_delay, "cannot listen for notifications");
                    tokio::select! {
                        () = tokio::time::sleep(retry_delay) => {}
                        () = shutdown.cancelled() => return,
                    }
                    retry_delay = (retry_delay * 2).min(Duration::from_secs(5));
                    continue;
                }
            };
            retry_delay = Duration::from_millis(200);
            self.dispatcher.listening_started();
            self.listen(listener, &shutdown).await;
            self.dispatcher.listening_stopped();
        }
    }

    async fn connect(&self) -> Result<PgListener, sqlx::Error> {
        let mut listener = PgListener::connect_with(self.store.pool()).await?;
        listener.listen_all([JOBS_CHANNEL, LEASES_CHANNEL]).await?;
        Ok(listener)
    }

    async fn listen(&self, mut listener: PgListener, shutdown: &CancellationToken) {
        loop {
            let received = tokio::select! {
                received = listener.try_recv() => received,
                () = shutdown.cancelled() => return,
            };
            match received {
                Ok(Some(notification)) => self.handle(notification.channel(), notification.payload()),
                Ok(None) => {
                    tracing::warn!("notification connection lost; reconnecting");
                    self.dispatcher.listening_started();
                }
                Err(error) => {
                    tracing::warn!(%error, "notification connection failed");
                    return;
                }
            }
        }
    }

    fn handle(&self, channel: &str, payload: &str) {
        let own_origin = self.store.notify_suffix();
        if channel == JOBS_CHANNEL {
            // `queue@origin` comes from an enqueue; this broker's own were
            // woken locally at commit already.
            let (queue, origin) = payload.split_at(payload.find('@').unwrap_or(payload.len()));
            // A bare `queue` comes from a statement that notifies in its
            // transaction (the SQL API, releases, resumes), on any replica
            // or none: it says nothing about who listens.
            let own = origin == own_origin;
            if !origin.is_empty() {
                self.dispatcher.heard_replica(origin, own);
            }
            if !own {
                self.dispatcher.queue_has_work(queue);
            }
            return;
        }
        if let Some(origin) = payload.strip_prefix(HEARTBEAT_PREFIX) {
            self.dispatcher.heard_replica(origin, origin == own_origin);
        } else if let Some(rest) = payload.strip_prefix("cancel:") {
            if let Some(lease) = parse_lease(rest) {
                self.dispatcher.lease_cancelled(lease.job_id, lease.lease_token);
            }
        } else if let Some(rest) = payload.strip_prefix("settled:") {
            let leases: Vec<HeldLease> = rest.split(',').filter_map(parse_lease).collect();
            self.dispatcher.leases_settled(&leases);
        }
    }
}

fn parse_lease(text: &str) -> Option<HeldLease> {
    let (job_id, token) = text.split_once(':')?;
    Some(HeldLease { job_id: job_id.parse().ok()?, lease_token: Uuid::parse_str(token).ok()? })
}

/// Payloads announcing settled leases, each within the notification limit.
pub fn settled_payloads(leases: &[HeldLease]) -> Vec<String> {
    let mut payloads = Vec::new();
    let mut current = String::from("settled:");
    for lease in leases {
        let entry = format!("{}:{}", lease.job_id, lease.lease_token);
        if current.len() + entry.len() + 1 > MAX_NOTIFY_PAYLOAD {
            payloads.push(std::mem::replace(&mut current, String::from("settled:")));
        }
        if !current.ends_with(':') {
            current.push(',');
        }
        current.push_str(&entry);
    }
    if current.len() > "settled:".len() {
        payloads.push(current);
    }
    payloads
}

/// The payload announcing that a leased job was cancelled.
pub fn cancel_payload(job_id: i64, lease_token: Uuid) -> String {
    format!("cancel:{job_id}:{lease_token}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settled_payloads_round_trip_and_stay_small() {
        let leases: Vec<HeldLease> = (0..500).map(|job_id| HeldLease { job_id, lease_token: Uuid::new_v4() }).collect();
        let payloads = settled_payloads(&leases);
        assert!(payloads.len() > 1);
        let mut parsed = Vec::new();
        for payload in &payloads {
            assert!(payload.len() <= MAX_NOTIFY_PAYLOAD);
            let rest = payload.strip_prefix("settled:").expect("prefix");
            parsed.extend(rest.split(',').filter_map(parse_lease));
        }
        assert_eq!(parsed, leases);
        assert!(settled_payloads(&[]).is_empty());
    }

    #[test]
    fn cancel_payload_parses_back() {
        let token = Uuid::new_v4();
        let payload = cancel_payload(42, token);
        let lease = parse_lease(payload.strip_prefix("cancel:").expect("prefix")).expect("parses");
        assert_eq!(lease, HeldLease { job_id: 42, lease_token: token });
    }
}
