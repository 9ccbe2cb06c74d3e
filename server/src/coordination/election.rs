//! Leader election through etcd's election API.
//!
//! # States
//!
//! ```text
//!            grant lease           campaign returns
//! Follower ───────────────▶ Candidate ───────────────▶ Leader(term)
//!    ▲                          │                          │
//!    │   lease lost / error     │   trust deadline passed, │
//!    └──────────────────────────┴── lease lost, shutdown ──┘
//! ```
//!
//! Each session grants a dedicated lease (TTL ~10 s) kept alive every TTL/3
//! ([`super::lease::KeptLease`]), then campaigns with it. etcd makes the
//! candidate whose key has the lowest create revision the leader; that
//! revision is the term's **fencing token**.
//!
//! # Invariants
//!
//! - **Trust window.** A leader acts only while `now < last successful
//!   keep-alive send time + TTL − margin`. etcd cannot expire the lease before
//!   `receipt of that keep-alive + TTL`, which is later, so the old leader
//!   stops its chores before any successor can be elected, even when paused
//!   (SIGSTOP) or cut off from etcd.
//! - **Fencing.** Every etcd write of a leader is a transaction that compares
//!   the leader key's create revision with its token; a deposed leader that
//!   wakes up late has its writes refused.
//! - **Postgres decides.** Chores are idempotent, fenced SQL, so even a
//!   leader that acts after its term wastes work and changes nothing it
//!   should not.
//! - **Hand-over.** On graceful shutdown the leader resigns and revokes its
//!   lease, so a successor takes over at once rather than after the TTL.

use std::time::Duration;

use etcd_client::{Client, ResignOptions};
use tokio_util::sync::CancellationToken;

use super::etcd::EtcdConfig;
use super::lease::{KeepAliveFreeze, KeptLease};
use super::{ClusterView, LeaderTerm, Leadership};
use std::sync::Arc;

pub struct Elector {
    client: Client,
    config: EtcdConfig,
    view: Arc<ClusterView>,
    freeze: KeepAliveFreeze,
}

impl Elector {
    pub fn new(client: Client, config: EtcdConfig, view: Arc<ClusterView>, freeze: KeepAliveFreeze) -> Self {
        Self { client, config, view, freeze }
    }

    pub async fn run(mut self, shutdown: CancellationToken) {
        let mut retry_delay = Duration::from_millis(200);
        while !shutdown.is_cancelled() {
            self.view.set_leadership(Leadership::Follower);
            let lease = match KeptLease::grant(
                &self.client,
                self.config.lease_ttl,
                self.config.trust_margin,
                self.freeze.clone(),
            )
            .await
            {
                Ok(lease) => lease,
                Err(error) => {
                    tracing::warn!(%error, retry_in = ?retry_delay, "cannot grant an election lease");
                    if sleep_or_shutdown(retry_delay, &shutdown).await {
                        return;
                    }
                    retry_delay = (retry_delay * 2).min(Duration::from_secs(5));
                    continue;
                }
            };
            retry_delay = Duration::from_millis(200);
            self.view.set_leadership(Leadership::Candidate);
            let member_id = self.view.self_member().member_id.clone();
            let mut campaign_client = self.client.clone();
            let campaign = campaign_client.campaign(self.config.election_name(), member_id.clone(), lease.id);
            let leader_key = tokio::select! {
                result = campaign => match result {
                    Ok(mut response) => response.take_leader(),
                    Err(error) => {
                        tracing::warn!(%error, "campaign failed");
                        None
                    }
                },
                () = lease.lost() => {
                    tracing::warn!("election lease lost while campaigning");
                    None
                }
                () = shutdown.cancelled() => {
                    lease.revoke().await;
                    return;
                }
            };
            let Some(leader_key) = leader_key else {
                lease.revoke().await;
                let _ = sleep_or_shutdown(Duration::from_millis(500), &shutdown).await;
                continue;
            };
            let term = LeaderTerm::new(leader_key.rev(), leader_key.key().to_vec(), lease.trusted_until());
            tracing::info!(member_id = %member_id, fencing_revision = term.fencing_revision, "became leader");
            self.view.set_leadership(Leadership::Leader(term));
            tokio::select! {
                () = lease.lost() => {
                    self.view.set_leadership(Leadership::Follower);
                    tracing::warn!("stepped down: the election lease can no longer be proven alive");
                    lease.revoke().await;
                }
                () = shutdown.cancelled() => {
                    self.view.set_leadership(Leadership::Follower);
                    let resign = self.client.resign(Some(ResignOptions::new().with_leader(leader_key)));
                    match tokio::time::timeout(Duration::from_secs(2), resign).await {
                        Ok(Ok(_)) => tracing::info!("resigned leadership"),
                        Ok(Err(error)) => tracing::warn!(%error, "could not resign leadership"),
                        Err(_) => tracing::warn!("resigning leadership timed out"),
                    }
                    lease.revoke().await;
                    return;
                }
            }
        }
    }
}

/// Sleeps; true when shutdown came first.
pub(crate) async fn sleep_or_shutdown(duration: Duration, shutdown: &CancellationToken) -> bool {
    tokio::select! {
        () = tokio::time::sleep(duration) => false,
        () = shutdown.cancelled() => true,
    }
}
