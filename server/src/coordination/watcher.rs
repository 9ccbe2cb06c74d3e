//! Keeps this replica's [`ClusterView`] current: reads every key of the
//! cluster's prefix, then re-reads on every change a prefix watch reports.

use std::sync::Arc;
use std::time::Duration;

use etcd_client::{Client, GetOptions, WatchOptions};
use tokio_util::sync::CancellationToken;

use super::election::sleep_or_shutdown;
use super::etcd::{Error, EtcdConfig};
use super::{ClusterView, MemberInfo, ShardMap};

pub struct ClusterWatcher {
    client: Client,
    config: EtcdConfig,
    view: Arc<ClusterView>,
}

impl ClusterWatcher {
    pub fn new(client: Client, config: EtcdConfig, view: Arc<ClusterView>) -> Self {
        Self { client, config, view }
    }

    pub async fn run(mut self, shutdown: CancellationToken) {
        let mut retry_delay = Duration::from_millis(200);
        while !shutdown.is_cancelled() {
            match self.watch(&shutdown).await {
                Ok(()) => return,
                Err(error) => {
                    tracing::warn!(%error, retry_in = ?retry_delay, "cluster watch interrupted; keeping the last view");
                    if sleep_or_shutdown(retry_delay, &shutdown).await {
                        return;
                    }
                    retry_delay = (retry_delay * 2).min(Duration::from_secs(5));
                }
            }
        }
    }

    /// Syncs, then follows the watch until it breaks (error) or shutdown (Ok).
    async fn watch(&mut self, shutdown: &CancellationToken) -> Result<(), Error> {
        let revision = self.sync().await?;
        let options = WatchOptions::new().with_prefix().with_start_revision(revision + 1);
        let mut stream = self.client.watch(self.config.cluster_prefix(), Some(options)).await?;
        // A periodic re-sync guards against a watch that silently stalls.
        let mut resync = tokio::time::interval(Duration::from_secs(10));
        resync.tick().await;
        loop {
            tokio::select! {
                message = stream.message() => match message? {
                    Some(response) if response.canceled() => return Err(Error::Config("etcd cancelled the watch".to_owned())),
                    Some(_) => { self.sync().await?; }
                    None => return Err(Error::Config("etcd closed the watch".to_owned())),
                },
                _ = resync.tick() => { self.sync().await?; }
                () = shutdown.cancelled() => return Ok(()),
            }
        }
    }

    /// Reads the whole prefix into the view; returns the revision read at.
    async fn sync(&mut self) -> Result<i64, Error> {
        let response = self.client.get(self.config.cluster_prefix(), Some(GetOptions::new().with_prefix())).await?;
        let revision = response.header().map_or(0, |header| header.revision());
        let members_prefix = self.config.members_prefix();
        let election_prefix = format!("{}/", self.config.election_name());
        let map_key = self.config.shard_map_key();
        let mut members: Vec<MemberInfo> = Vec::new();
        let mut leader: Option<(i64, String)> = None;
        let mut shard_map =
            ShardMap { generation: 0, shard_count: self.view.shard_count(), owners: Default::default() };
        let mut map_revision = 0;
        for kv in response.kvs() {
            let key = String::from_utf8_lossy(kv.key());
            if key.starts_with(&members_prefix) {
                match serde_json::from_slice::<MemberInfo>(kv.value()) {
                    Ok(member) => members.push(member),
                    Err(error) => tracing::warn!(key = %key, %error, "ignoring a malformed member record"),
                }
            } else if key.starts_with(&election_prefix) {
                let candidate = (kv.create_revision(), String::from_utf8_lossy(kv.value()).into_owned());
                if leader.as_ref().is_none_or(|(revision, _)| candidate.0 < *revision) {
                    leader = Some(candidate);
                }
            } else if key == map_key {
                shard_map = serde_json::from_slice(kv.value())?;
                map_revision = kv.mod_revision();
            }
        }
        members.sort_by(|a, b| a.member_id.cmp(&b.member_id));
        self.view.update(members, leader.map(|(_, id)| id), shard_map, map_revision);
        Ok(revision)
    }
}
