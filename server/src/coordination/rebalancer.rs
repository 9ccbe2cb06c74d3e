//! The shard rebalancer (leader only): keeps the published shard map
//! balanced over the live members, moving as few shards as possible, and
//! publishes each new map with a higher generation in a transaction fenced by
//! the leader key's create revision.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use etcd_client::{Client, Compare, CompareOp, Txn, TxnOp};
use tokio_util::sync::CancellationToken;

use super::etcd::{Error, EtcdConfig};
use super::shards::{assign, to_map};
use super::{ClusterView, LeaderTerm};

/// How often the rebalancer looks even without a change notification.
const RECHECK: Duration = Duration::from_secs(2);

/// What a rebalancing pass did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RebalanceOutcome {
    /// The map was already right.
    Unchanged,
    /// A new map was published; `moved` shards changed owner.
    Published { generation: u64, moved: usize },
    /// The fenced write was refused: this replica is no longer the leader
    /// (or another write raced it).
    Refused,
}

pub struct Rebalancer {
    client: Client,
    config: EtcdConfig,
    view: Arc<ClusterView>,
    term: LeaderTerm,
}

impl Rebalancer {
    pub fn new(client: Client, config: EtcdConfig, view: Arc<ClusterView>, term: LeaderTerm) -> Self {
        Self { client, config, view, term }
    }

    pub async fn run(mut self, shutdown: CancellationToken) {
        loop {
            if self.term.is_trusted() {
                match self.run_once().await {
                    Ok(RebalanceOutcome::Published { generation, moved }) => {
                        tracing::info!(generation, moved, "published a new shard map");
                    }
                    Ok(RebalanceOutcome::Refused) => tracing::warn!("shard map write refused by the fencing compare"),
                    Ok(RebalanceOutcome::Unchanged) => {}
                    Err(error) => tracing::warn!(%error, "rebalancing failed"),
                }
            }
            tokio::select! {
                () = self.view.changed() => {}
                () = tokio::time::sleep(RECHECK) => {}
                () = shutdown.cancelled() => return,
            }
        }
    }

    /// One pass: compute the assignment and publish it if it changed.
    #[tracing::instrument(name = "rebalancer.tick", skip_all)]
    pub async fn run_once(&mut self) -> Result<RebalanceOutcome, Error> {
        let snapshot = self.view.snapshot();
        let (map, map_revision) = self.view.shard_map_with_revision();
        let shard_count = self.view.shard_count();
        let members: BTreeSet<String> = snapshot.members.iter().map(|member| member.member_id.clone()).collect();
        if members.is_empty() {
            return Ok(RebalanceOutcome::Unchanged);
        }
        let previous = if map.shard_count == shard_count { map.owner_by_shard() } else { Default::default() };
        let next = assign(shard_count, &members, &previous);
        if next == previous {
            return Ok(RebalanceOutcome::Unchanged);
        }
        let moved = next.iter().filter(|(shard, owner)| previous.get(shard) != Some(owner)).count();
        let generation = map.generation + 1;
        let value = serde_json::to_vec(&to_map(generation, shard_count, &next))?;
        Ok(if self.fenced_put(self.config.shard_map_key(), value, Some(map_revision)).await? {
            RebalanceOutcome::Published { generation, moved }
        } else {
            RebalanceOutcome::Refused
        })
    }

    /// Writes `key` only if this term's leader key still has the fencing
    /// revision (and, when given, `key` is still at `expected_revision`).
    pub async fn fenced_put(
        &mut self,
        key: String,
        value: Vec<u8>,
        expected_revision: Option<i64>,
    ) -> Result<bool, Error> {
        fenced_put(&mut self.client, &self.term, key, value, expected_revision).await
    }
}

/// A put that succeeds only while `term` still leads.
pub async fn fenced_put(
    client: &mut Client,
    term: &LeaderTerm,
    key: String,
    value: Vec<u8>,
    expected_revision: Option<i64>,
) -> Result<bool, Error> {
    let mut compares = vec![Compare::create_revision(term.leader_key.clone(), CompareOp::Equal, term.fencing_revision)];
    if let Some(revision) = expected_revision {
        compares.push(Compare::mod_revision(key.clone(), CompareOp::Equal, revision));
    }
    let transaction = Txn::new().when(compares).and_then(vec![TxnOp::put(key, value, None)]);
    Ok(client.txn(transaction).await?.succeeded())
}
