//! Coordination through a real etcd: election, failover, fencing, membership,
//! shard-affine dispatch, and serving on while etcd is down.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use tokio::time::Instant;
use workbroker_api::v1;
use workbroker_server::coordination::election::Elector;
use workbroker_server::coordination::lease::KeepAliveFreeze;
use workbroker_server::coordination::rebalancer::fenced_put;
use workbroker_server::coordination::{ClusterView, Leadership, MemberInfo};
use workbroker_tests::etcd::TestEtcd;
use workbroker_tests::process::BrokerProcess;
use workbroker_tests::*;

const TTL_SECONDS: u64 = 3;

/// Polls until every process agrees on one leader among `expected_members`
/// members, the leader being one of these processes; returns the leader id.
/// (Membership and leadership are separate keys: for a moment after a kill
/// a view may have dropped the dead member but not yet its leadership.)
async fn agreed_leader(replicas: &[&BrokerProcess], expected_members: usize, wait: Duration) -> Result<String> {
    let deadline = Instant::now() + wait;
    loop {
        let mut leaders = Vec::new();
        let mut member_counts = Vec::new();
        for replica in replicas {
            if let Ok(info) = replica.cluster().await {
                leaders.push(info.leader_id.clone());
                member_counts.push(info.members.len());
            }
        }
        let agreed = leaders.len() == replicas.len()
            && !leaders[0].is_empty()
            && leaders.iter().all(|leader| *leader == leaders[0])
            && replicas.iter().any(|replica| replica.member_id == leaders[0])
            && member_counts.iter().all(|count| *count == expected_members);
        if agreed {
            return Ok(leaders[0].clone());
        }
        anyhow::ensure!(Instant::now() < deadline, "no agreement: leaders {leaders:?}, members {member_counts:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn median(values: &mut [Duration]) -> Duration {
    values.sort();
    values[values.len() / 2]
}

#[tokio::test]
async fn three_replicas_elect_one_leader_and_a_killed_leader_is_replaced() -> Result<()> {
    let database = TestDatabase::create().await?;
    let etcd = TestEtcd::start().await?;
    let prefix = format!("/wbtest/{}", uuid::Uuid::new_v4().simple());
    let mut replicas = Vec::new();
    for _ in 0..3 {
        replicas.push(BrokerProcess::start(&database.url, &etcd.endpoint, &prefix, TTL_SECONDS).await?);
    }
    let kills: usize =
        std::env::var("WORKBROKER_FAILOVER_KILLS").ok().and_then(|value| value.parse().ok()).unwrap_or(2);
    let mut failovers = Vec::new();
    for round in 0..kills {
        let leader = agreed_leader(&replicas.iter().collect::<Vec<_>>(), 3, Duration::from_secs(20)).await?;
        let leader_index = replicas.iter().position(|replica| replica.member_id == leader).context("leader is ours")?;
        let cluster = replicas[leader_index].cluster().await?;
        assert_eq!(cluster.members.iter().filter(|member| member.leader).count(), 1, "exactly one leader");
        assert_eq!(cluster.shard_count, 64);
        let owned: usize = cluster.members.iter().map(|member| member.shards.len()).sum();
        assert_eq!(owned, 64, "every shard owned once");

        let mut killed = replicas.remove(leader_index);
        killed.kill()?;
        let killed_at = Instant::now();

        // A lease taken right after the kill expires while there may be no
        // leader; the next leader's reaper must still return it.
        let mut client = replicas[0].broker().await?;
        let queue = format!("failover-{round}");
        let ids = enqueue(&mut client, vec![new_job(&queue, "k")]).await?;
        let mut worker = Worker::open(
            &mut client,
            v1::OpenLease {
                worker_id: "holder".into(),
                queues: vec![queue.clone()],
                max_in_flight: 1,
                lease_duration: Some(seconds(1.0)),
                ..Default::default()
            },
        )
        .await?;
        worker.take_jobs(1, Duration::from_secs(5)).await?;

        let new_leader =
            agreed_leader(&replicas.iter().collect::<Vec<_>>(), 2, Duration::from_secs(TTL_SECONDS + 10)).await?;
        let failover = killed_at.elapsed();
        assert_ne!(new_leader, leader);
        assert!(failover <= Duration::from_secs(TTL_SECONDS + 2), "failover took {failover:?}");
        failovers.push(failover);
        wait_for_state(&mut client, &ids[0], v1::JobState::Available, Duration::from_secs(10)).await?;
        drop(worker);

        replicas.push(BrokerProcess::start(&database.url, &etcd.endpoint, &prefix, TTL_SECONDS).await?);
    }
    let max = failovers.iter().max().copied().unwrap_or_default();
    let median = median(&mut failovers);
    println!("failover over {kills} kills (TTL {TTL_SECONDS} s): median {median:?}, max {max:?}");
    for replica in &mut replicas {
        replica.terminate()?;
    }
    database.drop_database().await
}

#[tokio::test]
async fn a_paused_leader_process_is_replaced_and_follows_after_it_resumes() -> Result<()> {
    let database = TestDatabase::create().await?;
    let etcd = TestEtcd::start().await?;
    let prefix = format!("/wbtest/{}", uuid::Uuid::new_v4().simple());
    let mut replicas = Vec::new();
    for _ in 0..2 {
        replicas.push(BrokerProcess::start(&database.url, &etcd.endpoint, &prefix, TTL_SECONDS).await?);
    }
    let leader = agreed_leader(&replicas.iter().collect::<Vec<_>>(), 2, Duration::from_secs(20)).await?;
    let leader_index = replicas.iter().position(|replica| replica.member_id == leader).context("leader is ours")?;
    let other_index = 1 - leader_index;
    replicas[leader_index].pause()?;
    let deadline = Instant::now() + Duration::from_secs(TTL_SECONDS + 5);
    loop {
        let info = replicas[other_index].cluster().await?;
        if info.leader_id == replicas[other_index].member_id {
            break;
        }
        anyhow::ensure!(Instant::now() < deadline, "no successor while the leader is paused");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    replicas[leader_index].resume()?;
    let successor =
        agreed_leader(&replicas.iter().collect::<Vec<_>>(), 2, Duration::from_secs(TTL_SECONDS + 5)).await?;
    assert_eq!(successor, replicas[other_index].member_id, "the resumed replica follows the successor");
    for replica in &mut replicas {
        replica.terminate()?;
    }
    database.drop_database().await
}

fn member(id: &str) -> MemberInfo {
    MemberInfo {
        member_id: id.to_owned(),
        grpc_address: "127.0.0.1:0".to_owned(),
        started_at: chrono::Utc::now(),
        version: "test".to_owned(),
    }
}

/// Waits for the next leadership value matching `wanted` and returns when it came.
async fn leadership_at(view: &Arc<ClusterView>, wanted: fn(&Leadership) -> bool, wait: Duration) -> Result<Instant> {
    let mut leadership = view.subscribe_leadership();
    let deadline = Instant::now() + wait;
    loop {
        if wanted(&leadership.borrow_and_update()) {
            return Ok(Instant::now());
        }
        tokio::time::timeout_at(deadline, leadership.changed())
            .await
            .context("leadership did not change in time")??;
    }
}

#[tokio::test]
async fn a_frozen_leader_steps_down_before_a_successor_and_its_writes_are_fenced() -> Result<()> {
    let etcd = TestEtcd::start().await?;
    let config = etcd.config(Duration::from_secs(TTL_SECONDS));
    let client = config.connect().await?;
    let shutdown = tokio_util::sync::CancellationToken::new();

    let first = ClusterView::clustered(member("first"), 64);
    let freeze = KeepAliveFreeze::default();
    tokio::spawn(Elector::new(client.clone(), config.clone(), first.clone(), freeze.clone()).run(shutdown.clone()));
    leadership_at(&first, |leadership| matches!(leadership, Leadership::Leader(_)), Duration::from_secs(10)).await?;
    let Leadership::Leader(first_term) = first.leadership() else { anyhow::bail!("first should lead") };

    let second = ClusterView::clustered(member("second"), 64);
    tokio::spawn(
        Elector::new(client.clone(), config.clone(), second.clone(), KeepAliveFreeze::default()).run(shutdown.clone()),
    );
    leadership_at(&second, |leadership| matches!(leadership, Leadership::Candidate), Duration::from_secs(5)).await?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!matches!(second.leadership(), Leadership::Leader(_)), "one leader at a time");

    // As if the process were paused: no more keep-alives.
    freeze.set(true);
    let stepped_down =
        leadership_at(&first, |leadership| !matches!(leadership, Leadership::Leader(_)), Duration::from_secs(10))
            .await?;
    assert!(!first_term.is_trusted(), "the old term is no longer trusted once stepped down");
    let successor_started =
        leadership_at(&second, |leadership| matches!(leadership, Leadership::Leader(_)), Duration::from_secs(15))
            .await?;
    assert!(stepped_down < successor_started, "the old leader stopped before the successor started");

    let mut writer = client.clone();
    let key = format!("{}/fencing-probe", config.prefix);
    let accepted = fenced_put(&mut writer, &first_term, key.clone(), b"stale".to_vec(), None).await?;
    assert!(!accepted, "a deposed leader's write fails on the fencing compare");
    let Leadership::Leader(second_term) = second.leadership() else { anyhow::bail!("second should lead") };
    assert!(fenced_put(&mut writer, &second_term, key, b"fresh".to_vec(), None).await?);
    shutdown.cancel();
    Ok(())
}

async fn clustered_broker(
    database: &TestDatabase,
    etcd: &workbroker_server::coordination::etcd::EtcdConfig,
    migrate: bool,
) -> Result<TestBroker> {
    let mut config = test_config(&database.url);
    config.etcd = Some(etcd.clone());
    config.migrate = migrate;
    TestBroker::start_with(TestDatabase { name: database.name.clone(), url: database.url.clone() }, config).await
}

async fn wait_for_map(broker: &TestBroker, members: usize, wait: Duration) -> Result<v1::ClusterInfo> {
    let mut admin = broker.admin().await;
    let deadline = Instant::now() + wait;
    loop {
        let info = admin.get_cluster_info(v1::GetClusterInfoRequest {}).await?.into_inner();
        let owners = info.members.iter().filter(|member| !member.shards.is_empty()).count();
        if info.members.len() == members && owners == members && !info.leader_id.is_empty() {
            return Ok(info);
        }
        anyhow::ensure!(Instant::now() < deadline, "shard map not settled: {info:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn a_worker_on_one_replica_drains_a_queue_whose_shards_belong_to_another() -> Result<()> {
    let database = TestDatabase::create().await?;
    let etcd = TestEtcd::start().await?;
    let config = etcd.config(Duration::from_secs(TTL_SECONDS));
    let first = clustered_broker(&database, &config, true).await?;
    let second = clustered_broker(&database, &config, false).await?;
    let info = wait_for_map(&first, 2, Duration::from_secs(15)).await?;
    assert!(info.shard_map_generation >= 1);
    let shard_sizes: Vec<usize> = info.members.iter().map(|member| member.shards.len()).collect();
    assert_eq!(shard_sizes, vec![32, 32], "balanced");
    let second_id = second_member_id(&second).await?;
    let foreign_shard = info
        .members
        .iter()
        .find(|member| member.member_id == second_id)
        .and_then(|member| member.shards.first().copied())
        .context("second owns shards")?;

    let mut client = first.broker().await;
    enqueue(&mut client, (0..40).map(|_| new_job("affinity", "k")).collect()).await?;
    let pool = database.pool().await?;
    sqlx::query("UPDATE workbroker.jobs SET shard = $1").bind(i32::try_from(foreign_shard)?).execute(&pool).await?;

    let mut worker = Worker::on(&mut client, &["affinity"], 10).await?;
    let mut done = 0;
    while done < 40 {
        let jobs = worker.take_jobs(1, Duration::from_secs(5)).await?;
        ack_all(&mut client, jobs.iter().map(ack_of).collect()).await?;
        done += jobs.len();
    }
    let stats = stats_of(&mut first.admin().await, "affinity").await?;
    assert_eq!(stats.completed, 40);
    second.finish_keep_database().await?;
    first.finish().await
}

async fn second_member_id(broker: &TestBroker) -> Result<String> {
    Ok(broker.admin().await.get_cluster_info(v1::GetClusterInfoRequest {}).await?.into_inner().self_id)
}

#[tokio::test]
async fn without_etcd_a_replica_leads_itself() -> Result<()> {
    let broker = TestBroker::start().await?;
    let info = broker.admin().await.get_cluster_info(v1::GetClusterInfoRequest {}).await?.into_inner();
    assert_eq!(info.members.len(), 1);
    assert_eq!(info.leader_id, info.self_id);
    assert!(info.members[0].leader);
    assert_eq!(info.members[0].shards.len(), 64);
    assert_eq!(info.shard_count, 64);
    broker.finish().await
}

#[tokio::test]
async fn while_etcd_is_down_serving_goes_on_and_only_the_chores_pause() -> Result<()> {
    let database = TestDatabase::create().await?;
    let mut etcd = TestEtcd::start_local().await?;
    let config = etcd.config(Duration::from_secs(2));
    let broker = clustered_broker(&database, &config, true).await?;
    wait_for_map(&broker, 1, Duration::from_secs(10)).await?;
    etcd.stop()?;
    // Past the trust window: the leader chores have stopped.
    tokio::time::sleep(Duration::from_secs(3)).await;

    let mut client = broker.broker().await;
    let ids = enqueue(&mut client, vec![new_job("outage", "k"), new_job("outage", "k")]).await?;
    let mut worker = Worker::open(
        &mut client,
        v1::OpenLease {
            worker_id: "w".into(),
            queues: vec!["outage".into()],
            max_in_flight: 2,
            lease_duration: Some(seconds(1.0)),
            ..Default::default()
        },
    )
    .await?;
    let jobs = worker.take_jobs(2, Duration::from_secs(5)).await?;
    let acked = ack_all(&mut client, vec![ack_of(&jobs[0])]).await?;
    assert_eq!(acked[0].outcome, v1::Outcome::Ok as i32, "acks go on without etcd");
    let unacked = if id_of(&jobs[0]) == ids[0] { &ids[1] } else { &ids[0] };
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(state_of(&mut client, unacked).await?, v1::JobState::Leased, "no reaper runs without a trusted leader");

    etcd.restart().await?;
    wait_for_state(&mut client, unacked, v1::JobState::Available, Duration::from_secs(15)).await?;
    broker.finish().await
}
