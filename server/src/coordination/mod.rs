//! Cluster coordination: membership, leader election, and the shard map.
//!
//! Postgres decides; etcd coordinates. Every job state change is a fenced SQL
//! statement, so nothing here is needed for correctness: leadership decides
//! which replica runs the cluster-wide chores (reaper, rebalancer) and the
//! shard map which replica looks at which jobs first. A split brain wastes
//! work at worst.
//!
//! Without etcd configured, one replica runs alone and leads itself
//! ([`ClusterView::single_node`]). With etcd, each replica runs:
//! - [`membership::Membership`]: registers this replica under its own lease;
//! - [`election::Elector`]: campaigns for leadership (see its module doc for
//!   the state machine, the trust window and fencing);
//! - [`watcher::ClusterWatcher`]: keeps this replica's view of members,
//!   leader and shard map current from etcd;
//! - [`chores::LeaderChores`]: runs the reaper and the rebalancer while, and
//!   only while, this replica is a trusted leader.

pub mod chores;
pub mod election;
pub mod etcd;
pub mod lease;
pub mod membership;
pub mod rebalancer;
pub mod shards;
pub mod watcher;

use std::sync::{Arc, RwLock};

use chrono::{DateTime, Utc};
use tokio::sync::{Notify, watch};
use tokio::time::Instant;

pub use shards::ShardMap;

/// Who a replica is, as registered in etcd.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct MemberInfo {
    pub member_id: String,
    pub grpc_address: String,
    pub started_at: DateTime<Utc>,
    pub version: String,
}

/// A point-in-time view of the cluster.
#[derive(Clone, Debug)]
pub struct ClusterSnapshot {
    pub self_id: String,
    pub leader_id: Option<String>,
    pub members: Vec<MemberInfo>,
    pub shard_map: ShardMap,
}

/// This replica's term as leader.
#[derive(Clone, Debug)]
pub struct LeaderTerm {
    /// Create revision of the leader key: the fencing token of every etcd
    /// write the leader makes.
    pub fencing_revision: i64,
    /// The leader key itself.
    pub leader_key: Vec<u8>,
    /// Trust deadline of the election lease; `None`: forever (single node).
    trusted_until: Option<watch::Receiver<Instant>>,
}

impl LeaderTerm {
    pub fn new(fencing_revision: i64, leader_key: Vec<u8>, trusted_until: watch::Receiver<Instant>) -> Self {
        Self { fencing_revision, leader_key, trusted_until: Some(trusted_until) }
    }

    /// True while the election lease is provably alive.
    pub fn is_trusted(&self) -> bool {
        self.trusted_until.as_ref().is_none_or(|until| Instant::now() < *until.borrow())
    }
}

/// Whether this replica leads.
#[derive(Clone, Debug)]
pub enum Leadership {
    /// Another replica leads, or nobody yet.
    Follower,
    /// Waiting in the election.
    Candidate,
    /// This replica leads for this term.
    Leader(LeaderTerm),
}

#[derive(Debug)]
struct ViewState {
    members: Vec<MemberInfo>,
    leader_id: Option<String>,
    shard_map: ShardMap,
    shard_map_mod_revision: i64,
}

/// This replica's view of the cluster, shared by the services, the dispatcher
/// and the coordination loops.
#[derive(Debug)]
pub struct ClusterView {
    self_member: MemberInfo,
    shard_count: u32,
    state: RwLock<ViewState>,
    leadership: watch::Sender<Leadership>,
    /// Shards this replica owns; `None` while no map says (dispatch from all).
    owned_shards: watch::Sender<Option<Arc<Vec<i32>>>>,
    /// Pinged whenever members or the map change.
    changed: Notify,
}

impl ClusterView {
    fn new(self_member: MemberInfo, shard_count: u32, leadership: Leadership) -> Arc<Self> {
        Arc::new(Self {
            state: RwLock::new(ViewState {
                members: Vec::new(),
                leader_id: None,
                shard_map: ShardMap { generation: 0, shard_count, owners: Default::default() },
                shard_map_mod_revision: 0,
            }),
            self_member,
            shard_count,
            leadership: watch::channel(leadership).0,
            owned_shards: watch::channel(None).0,
            changed: Notify::new(),
        })
    }

    /// A replica running alone: the only member, the leader, owner of every shard.
    pub fn single_node(self_member: MemberInfo, shard_count: u32) -> Arc<Self> {
        let view = Self::new(
            self_member.clone(),
            shard_count,
            Leadership::Leader(LeaderTerm { fencing_revision: 0, leader_key: Vec::new(), trusted_until: None }),
        );
        let assignment = shards::assign(shard_count, &[self_member.member_id.clone()].into(), &Default::default());
        view.update(
            vec![self_member.clone()],
            Some(self_member.member_id),
            shards::to_map(1, shard_count, &assignment),
            0,
        );
        view
    }

    /// A replica coordinated through etcd; starts as a follower with an empty view.
    pub fn clustered(self_member: MemberInfo, shard_count: u32) -> Arc<Self> {
        Self::new(self_member, shard_count, Leadership::Follower)
    }

    fn state(&self) -> std::sync::RwLockReadGuard<'_, ViewState> {
        self.state.read().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub fn self_member(&self) -> &MemberInfo {
        &self.self_member
    }

    pub fn shard_count(&self) -> u32 {
        self.shard_count
    }

    pub fn snapshot(&self) -> ClusterSnapshot {
        let state = self.state();
        ClusterSnapshot {
            self_id: self.self_member.member_id.clone(),
            leader_id: state.leader_id.clone(),
            members: state.members.clone(),
            shard_map: state.shard_map.clone(),
        }
    }

    /// The map and the etcd mod revision it was read at.
    pub fn shard_map_with_revision(&self) -> (ShardMap, i64) {
        let state = self.state();
        (state.shard_map.clone(), state.shard_map_mod_revision)
    }

    /// Replaces the view; logs what changed.
    pub fn update(&self, members: Vec<MemberInfo>, leader_id: Option<String>, shard_map: ShardMap, map_revision: i64) {
        let mut state = self.state.write().unwrap_or_else(std::sync::PoisonError::into_inner);
        let member_ids =
            |members: &[MemberInfo]| members.iter().map(|member| member.member_id.clone()).collect::<Vec<_>>();
        if member_ids(&state.members) != member_ids(&members) {
            tracing::info!(members = ?member_ids(&members), "cluster members changed");
        }
        if state.leader_id != leader_id {
            tracing::info!(leader = ?leader_id, "cluster leader changed");
        }
        if state.shard_map.generation != shard_map.generation {
            let owned = shard_map.shards_of(&self.self_member.member_id);
            tracing::info!(generation = shard_map.generation, owned = owned.len(), owners = ?shard_map.owners.iter().map(|(member, shards)| (member.clone(), shards.len())).collect::<Vec<_>>(), "shard map changed");
            let owned: Vec<i32> = owned.into_iter().filter_map(|shard| i32::try_from(shard).ok()).collect();
            // No map, or every shard ours: no preference to apply.
            let everything = owned.len() >= self.shard_count as usize;
            let owned = (!shard_map.owners.is_empty() && !everything).then(|| Arc::new(owned));
            self.owned_shards.send_replace(owned);
        }
        state.members = members;
        state.leader_id = leader_id;
        state.shard_map = shard_map;
        state.shard_map_mod_revision = map_revision;
        drop(state);
        self.changed.notify_waiters();
    }

    pub fn leadership(&self) -> Leadership {
        self.leadership.borrow().clone()
    }

    pub fn subscribe_leadership(&self) -> watch::Receiver<Leadership> {
        self.leadership.subscribe()
    }

    pub fn set_leadership(&self, leadership: Leadership) {
        self.leadership.send_replace(leadership);
    }

    /// True while this replica is a trusted leader.
    pub fn is_trusted_leader(&self) -> bool {
        matches!(&*self.leadership.borrow(), Leadership::Leader(term) if term.is_trusted())
    }

    pub fn subscribe_owned_shards(&self) -> watch::Receiver<Option<Arc<Vec<i32>>>> {
        self.owned_shards.subscribe()
    }

    /// Resolves at the next change of members or map.
    pub async fn changed(&self) {
        self.changed.notified().await;
    }
}

/// Runs every coordination loop of a replica configured with etcd: connects
/// (retrying while etcd is unreachable — serving goes on meanwhile), then
/// membership, election, the cluster watcher and the leader chores.
pub struct EtcdCoordination {
    pub config: etcd::EtcdConfig,
    pub view: Arc<ClusterView>,
    pub store: crate::store::Store,
    pub reaper: crate::reaper::ReaperConfig,
    pub vacuum: crate::vacuum::VacuumConfig,
    pub freeze: lease::KeepAliveFreeze,
    /// Where the reaper counts expiries.
    pub metrics: Arc<crate::admin::metrics::Metrics>,
}

impl EtcdCoordination {
    pub async fn run(self, shutdown: tokio_util::sync::CancellationToken) {
        let mut retry_delay = std::time::Duration::from_millis(200);
        let client = loop {
            match self.config.connect().await {
                Ok(client) => break client,
                Err(error) => {
                    tracing::warn!(%error, retry_in = ?retry_delay, "cannot connect to etcd; leader-only chores wait");
                    if election::sleep_or_shutdown(retry_delay, &shutdown).await {
                        return;
                    }
                    retry_delay = (retry_delay * 2).min(std::time::Duration::from_secs(5));
                }
            }
        };
        tracing::info!(endpoints = ?self.config.endpoints, prefix = %self.config.prefix, "coordinating through etcd");
        let tasks = tokio_util::task::TaskTracker::new();
        tasks.spawn(
            membership::Membership::new(client.clone(), self.config.clone(), self.view.clone(), self.freeze.clone())
                .run(shutdown.clone()),
        );
        tasks.spawn(
            election::Elector::new(client.clone(), self.config.clone(), self.view.clone(), self.freeze.clone())
                .run(shutdown.clone()),
        );
        tasks.spawn(
            watcher::ClusterWatcher::new(client.clone(), self.config.clone(), self.view.clone()).run(shutdown.clone()),
        );
        tasks.spawn(
            chores::LeaderChores::new(
                self.view.clone(),
                self.store.clone(),
                self.reaper,
                Some((client, self.config.clone())),
            )
            .with_metrics(self.metrics.clone())
            .with_vacuum(self.vacuum)
            .run(shutdown.clone()),
        );
        tasks.close();
        tasks.wait().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn member(id: &str) -> MemberInfo {
        MemberInfo {
            member_id: id.to_owned(),
            grpc_address: "127.0.0.1:1".to_owned(),
            started_at: Utc::now(),
            version: "test".to_owned(),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_term_is_trusted_only_until_its_deadline() {
        let (deadline, receiver) = watch::channel(Instant::now() + Duration::from_secs(9));
        let term = LeaderTerm::new(7, b"key".to_vec(), receiver);
        assert!(term.is_trusted());
        tokio::time::advance(Duration::from_secs(8)).await;
        assert!(term.is_trusted());
        // A successful keep-alive moves the deadline.
        deadline.send_replace(Instant::now() + Duration::from_secs(9));
        tokio::time::advance(Duration::from_secs(8)).await;
        assert!(term.is_trusted());
        tokio::time::advance(Duration::from_secs(2)).await;
        assert!(!term.is_trusted(), "past the deadline the term must not act");
    }

    #[test]
    fn a_single_node_leads_itself_and_owns_every_shard() {
        let view = ClusterView::single_node(member("alone"), 16);
        assert!(view.is_trusted_leader());
        let snapshot = view.snapshot();
        assert_eq!(snapshot.leader_id.as_deref(), Some("alone"));
        assert_eq!(snapshot.shard_map.shards_of("alone"), (0..16).collect::<Vec<_>>());
        assert!(view.subscribe_owned_shards().borrow().is_none(), "owning every shard needs no preference");
    }

    #[test]
    fn a_clustered_view_starts_as_a_follower_without_a_map() {
        let view = ClusterView::clustered(member("new"), 64);
        assert!(!view.is_trusted_leader());
        assert!(view.subscribe_owned_shards().borrow().is_none(), "no map: dispatch from every shard");
    }
}
