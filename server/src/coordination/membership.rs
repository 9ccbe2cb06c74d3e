//! Membership: this replica registers itself under its own lease, kept alive.
//! A replica that dies drops out when its lease expires; one that stops
//! gracefully revokes it and drops out at once.

use std::sync::Arc;
use std::time::Duration;

use etcd_client::{Client, PutOptions};
use tokio_util::sync::CancellationToken;

use super::ClusterView;
use super::election::sleep_or_shutdown;
use super::etcd::EtcdConfig;
use super::lease::{KeepAliveFreeze, KeptLease};

pub struct Membership {
    client: Client,
    config: EtcdConfig,
    view: Arc<ClusterView>,
    freeze: KeepAliveFreeze,
}

impl Membership {
    pub fn new(client: Client, config: EtcdConfig, view: Arc<ClusterView>, freeze: KeepAliveFreeze) -> Self {
        Self { client, config, view, freeze }
    }

    pub async fn run(mut self, shutdown: CancellationToken) {
        let key = self.config.member_key(&self.view.self_member().member_id);
        let value = match serde_json::to_vec(self.view.self_member()) {
            Ok(value) => value,
            Err(error) => {
                tracing::error!(%error, "cannot encode this member");
                return;
            }
        };
        let mut retry_delay = Duration::from_millis(200);
        while !shutdown.is_cancelled() {
            let registered = async {
                let lease = KeptLease::grant(
                    &self.client,
                    self.config.lease_ttl,
                    self.config.trust_margin,
                    self.freeze.clone(),
                )
                .await?;
                self.client.put(key.clone(), value.clone(), Some(PutOptions::new().with_lease(lease.id))).await?;
                Ok::<_, super::etcd::Error>(lease)
            };
            let lease = match registered.await {
                Ok(lease) => lease,
                Err(error) => {
                    tracing::warn!(%error, retry_in = ?retry_delay, "cannot register in etcd");
                    if sleep_or_shutdown(retry_delay, &shutdown).await {
                        return;
                    }
                    retry_delay = (retry_delay * 2).min(Duration::from_secs(5));
                    continue;
                }
            };
            retry_delay = Duration::from_millis(200);
            tracing::info!(key = %key, "registered as a cluster member");
            tokio::select! {
                () = lease.lost() => tracing::warn!("membership lease lost; registering again"),
                () = shutdown.cancelled() => {
                    lease.revoke().await;
                    return;
                }
            }
        }
    }
}
