//! Cluster coordination. Without etcd configured, one replica runs alone and
//! leads itself: it is the only member, the leader, and owns every shard.

use chrono::{DateTime, Utc};

/// Who this replica is.
#[derive(Clone, Debug)]
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
    pub leader_id: String,
    pub members: Vec<MemberInfo>,
    pub shard_map_generation: u64,
    /// Shards of each member, by member id.
    pub shards: Vec<(String, Vec<u32>)>,
}

/// The single-node cluster: this replica alone.
#[derive(Clone, Debug)]
pub struct SingleNode {
    member: MemberInfo,
}

impl SingleNode {
    pub fn new(member: MemberInfo) -> Self {
        Self { member }
    }

    /// This replica as the only member, leader and owner of all `shard_count` shards.
    pub fn snapshot(&self, shard_count: u32) -> ClusterSnapshot {
        ClusterSnapshot {
            self_id: self.member.member_id.clone(),
            leader_id: self.member.member_id.clone(),
            members: vec![self.member.clone()],
            shard_map_generation: 1,
            shards: vec![(self.member.member_id.clone(), (0..shard_count).collect())],
        }
    }
}
