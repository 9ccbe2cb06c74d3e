//! An etcd lease kept alive, with a local trust deadline.
//!
//! The deadline is `send time of the last successful keep-alive + TTL −
//! margin`, on the monotonic clock. Until then the lease is certainly alive
//! in etcd (etcd counts its TTL from when it received that keep-alive, which
//! is after we sent it). Once the deadline passes without a newer successful
//! keep-alive, the holder must act as if the lease were gone.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use etcd_client::Client;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::etcd::Error;

/// A test hook: while set, keep-alives are not sent (as if the process were paused).
#[derive(Clone, Debug, Default)]
pub struct KeepAliveFreeze(Arc<AtomicBool>);

impl KeepAliveFreeze {
    pub fn set(&self, frozen: bool) {
        self.0.store(frozen, Ordering::SeqCst);
    }

    pub fn is_set(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
}

/// A granted lease and its keep-alive task.
pub struct KeptLease {
    pub id: i64,
    trusted_until: watch::Receiver<Instant>,
    lost: CancellationToken,
    stop: CancellationToken,
    client: Client,
}

impl KeptLease {
    /// Grants a lease of `ttl` and keeps it alive every `ttl / 3`.
    pub async fn grant(
        client: &Client,
        ttl: Duration,
        margin: Duration,
        freeze: KeepAliveFreeze,
    ) -> Result<Self, Error> {
        let mut client = client.clone();
        let ttl_seconds = i64::try_from(ttl.as_secs().max(1)).unwrap_or(i64::MAX);
        let sent = Instant::now();
        let id = client.lease_grant(ttl_seconds, None).await?.id();
        let (trusted_sender, trusted_until) = watch::channel(sent + ttl.saturating_sub(margin));
        let lost = CancellationToken::new();
        let stop = CancellationToken::new();
        tokio::spawn(keep_alive_loop(
            client.clone(),
            id,
            ttl,
            margin,
            trusted_sender,
            lost.clone(),
            stop.clone(),
            freeze,
        ));
        Ok(Self { id, trusted_until, lost, stop, client })
    }

    /// The current trust deadline, updated by every successful keep-alive.
    pub fn trusted_until(&self) -> watch::Receiver<Instant> {
        self.trusted_until.clone()
    }

    /// Resolves once the lease can no longer be proven alive.
    pub async fn lost(&self) {
        let mut trusted_until = self.trusted_until.clone();
        loop {
            let deadline = *trusted_until.borrow_and_update();
            tokio::select! {
                () = self.lost.cancelled() => return,
                () = tokio::time::sleep_until(deadline) => {
                    if *trusted_until.borrow() <= Instant::now() {
                        return;
                    }
                }
                changed = trusted_until.changed() => {
                    if changed.is_err() {
                        return;
                    }
                }
            }
        }
    }

    /// Stops the keep-alives and revokes the lease (best effort, bounded).
    pub async fn revoke(mut self) {
        self.stop.cancel();
        let revoke = self.client.lease_revoke(self.id);
        if let Ok(Err(error)) = tokio::time::timeout(Duration::from_secs(2), revoke).await {
            tracing::debug!(lease = self.id, %error, "could not revoke lease");
        }
    }
}

impl Drop for KeptLease {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

#[allow(clippy::too_many_arguments)]
async fn keep_alive_loop(
    mut client: Client,
    id: i64,
    ttl: Duration,
    margin: Duration,
    trusted: watch::Sender<Instant>,
    lost: CancellationToken,
    stop: CancellationToken,
    freeze: KeepAliveFreeze,
) {
    let period = ttl / 3;
    let mut stream = None;
    loop {
        tokio::select! {
            () = tokio::time::sleep(period) => {}
            () = stop.cancelled() => return,
        }
        if *trusted.borrow() <= Instant::now() {
            lost.cancel();
            return;
        }
        if freeze.is_set() {
            continue;
        }
        let sent = Instant::now();
        let attempt = async {
            if stream.is_none() {
                stream = Some(client.lease_keep_alive(id).await?);
            }
            let Some((keeper, responses)) = stream.as_mut() else {
                return Err(etcd_client::Error::InvalidArgs("no keep-alive stream".to_owned()));
            };
            keeper.keep_alive().await?;
            match tokio::time::timeout(period, responses.message()).await {
                Ok(Ok(Some(response))) => Ok(response.ttl()),
                Ok(Ok(None)) => Err(etcd_client::Error::InvalidArgs("keep-alive stream ended".to_owned())),
                Ok(Err(error)) => Err(error),
                Err(_) => Err(etcd_client::Error::InvalidArgs("keep-alive timed out".to_owned())),
            }
        };
        match attempt.await {
            Ok(remaining) if remaining > 0 => {
                trusted.send_replace(sent + ttl.saturating_sub(margin));
            }
            Ok(_) => {
                tracing::warn!(lease = id, "etcd says the lease has expired");
                lost.cancel();
                return;
            }
            Err(error) => {
                tracing::warn!(lease = id, %error, "lease keep-alive failed");
                stream = None;
            }
        }
    }
}
