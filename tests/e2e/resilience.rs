//! The database going away and coming back; graceful shutdown.

use std::str::FromStr;
use std::time::Duration;

use anyhow::{Context, Result};
use sqlx::postgres::PgConnectOptions;
use workbroker_api::v1;
use workbroker_tests::proxy::{TcpProxy, with_address};
use workbroker_tests::*;

#[tokio::test]
async fn the_broker_answers_unavailable_without_its_database_and_recovers_by_itself() -> Result<()> {
    let database = TestDatabase::create().await?;
    let options = PgConnectOptions::from_str(&database.url)?;
    if options.get_host().starts_with('/') {
        println!("skipped: DATABASE_URL uses a Unix socket; this test needs TCP");
        return database.drop_database().await;
    }
    let target =
        tokio::net::lookup_host((options.get_host(), options.get_port())).await?.next().context("database address")?;
    let proxy = TcpProxy::start(target).await?;
    let config = test_config(&with_address(&database.url, proxy.address));
    let broker =
        TestBroker::start_with(TestDatabase { name: database.name.clone(), url: database.url.clone() }, config).await?;
    let mut client = broker.broker().await;
    enqueue(&mut client, vec![new_job("outage", "k")]).await?;
    let mut worker = Worker::on(&mut client, &["outage"], 10).await?;
    let first = worker.take_jobs(1, Duration::from_secs(5)).await?;

    proxy.cut();
    let refused = client.enqueue(v1::EnqueueRequest { jobs: vec![new_job("outage", "k")] }).await;
    let status = refused.err().context("enqueue must fail without a database")?;
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    let ack = client.ack(tokio_stream::iter(vec![ack_of(&first[0])])).await;
    let ack_failed = match ack {
        Err(status) => status.code() == tonic::Code::Unavailable,
        Ok(response) => {
            let mut stream = response.into_inner();
            matches!(stream.message().await, Err(status) if status.code() == tonic::Code::Unavailable)
        }
    };
    assert!(ack_failed, "an ack without a database ends its stream with UNAVAILABLE");

    proxy.restore();
    // The pool reconnects by itself; the same worker stream sees new work again.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    let ids = loop {
        match client.enqueue(v1::EnqueueRequest { jobs: vec![new_job("outage", "k")] }).await {
            Ok(response) => break response.into_inner().jobs,
            Err(status) if status.code() == tonic::Code::Unavailable && tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(status) => return Err(status.into()),
        }
    };
    assert_eq!(ids.len(), 1);
    let next = worker.take_jobs(1, Duration::from_secs(10)).await?;
    assert_eq!(id_of(&next[0]), ids[0].job_id);
    let acked = ack_all(&mut client, vec![ack_of(&first[0]), ack_of(&next[0])]).await?;
    assert!(acked.iter().all(|ack| ack.outcome == v1::Outcome::Ok as i32), "{acked:?}");
    broker.finish().await
}

#[tokio::test]
async fn a_graceful_shutdown_lets_acks_land_then_releases_the_rest() -> Result<()> {
    let database = TestDatabase::create().await?;
    let mut config = test_config(&database.url);
    config.shutdown_grace = Duration::from_secs(2);
    let mut broker = TestBroker::start_with(database, config).await?;
    let mut client = broker.broker().await;
    let ids = enqueue(&mut client, (0..3).map(|_| new_job("drain", "k")).collect()).await?;
    let mut worker = Worker::on(&mut client, &["drain"], 3).await?;
    let held = worker.take_jobs(3, Duration::from_secs(5)).await?;

    let stopping = tokio::spawn(async move {
        let result = broker.stop().await;
        (broker, result)
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    // During the drain, acks still land.
    let acked = ack_all(&mut client, vec![ack_of(&held[0])]).await?;
    assert_eq!(acked[0].outcome, v1::Outcome::Ok as i32);
    // No new work is handed out while draining.
    enqueue(&mut client, vec![new_job("drain", "k")]).await?;

    // The lease stream ends with UNAVAILABLE once the grace period is over.
    let ended = loop {
        match worker.next_within(Duration::from_secs(10)).await {
            Ok(Some(v1::lease_response::Response::Jobs(jobs))) => anyhow::bail!("leased while draining: {jobs:?}"),
            Ok(Some(_)) => continue,
            Ok(None) => break None,
            Err(error) => break Some(error),
        }
    };
    let status = ended.context("the stream must end with a status")?;
    assert!(status.to_string().contains("shutting down"), "{status}");
    let (broker, result) = stopping.await?;
    result?;

    let pool = broker.database.pool().await?;
    let states: Vec<(i64, i16)> =
        sqlx::query_as("SELECT id, state FROM workbroker.all_jobs ORDER BY id").fetch_all(&pool).await?;
    let state_of = |id: &str| states.iter().find(|(job, _)| job.to_string() == id).map(|(_, state)| *state);
    assert_eq!(state_of(&id_of(&held[0])), Some(v1::JobState::Completed as i16));
    for job in &held[1..] {
        assert_eq!(state_of(&id_of(job)), Some(v1::JobState::Available as i16), "released at shutdown");
    }
    assert_eq!(states.len(), ids.len() + 1);
    pool.close().await;
    broker.database.drop_database().await
}

/// The broker keeps its hot statements' connections between statements
/// instead of round-tripping to the database around each; one that died
/// while idle (here: every backend of the broker terminated during a quiet
/// second) is found out before use, so callers see no error.
#[tokio::test]
async fn connections_that_died_in_a_quiet_spell_are_replaced_before_use() -> Result<()> {
    let broker = TestBroker::start().await?;
    let mut client = broker.broker().await;
    enqueue(&mut client, vec![new_job("quiet", "k")]).await?;
    let mut worker = Worker::on(&mut client, &["quiet"], 10).await?;
    let first = worker.take_jobs(1, Duration::from_secs(5)).await?;
    let acked = ack_all(&mut client, vec![ack_of(&first[0])]).await?;
    assert_eq!(acked[0].outcome, v1::Outcome::Ok as i32);

    tokio::time::sleep(Duration::from_millis(1_200)).await;
    let pool = broker.database.pool().await?;
    let terminated: Vec<bool> = sqlx::query_scalar(
        "SELECT pg_terminate_backend(pid, 5000) FROM pg_stat_activity \
          WHERE datname = current_database() AND application_name = 'workbroker'",
    )
    .fetch_all(&pool)
    .await?;
    assert!(!terminated.is_empty() && terminated.iter().all(|done| *done), "{terminated:?}");

    // Every statement of this round would run on a terminated backend if
    // the kept connections were used unchecked.
    let ids = enqueue(&mut client, vec![new_job("quiet", "k")]).await?;
    let next = worker.take_jobs(1, Duration::from_secs(10)).await?;
    assert_eq!(id_of(&next[0]), ids[0]);
    let acked = ack_all(&mut client, vec![ack_of(&next[0])]).await?;
    assert_eq!(acked[0].outcome, v1::Outcome::Ok as i32);
    pool.close().await;
    broker.finish().await
}

/// Kept connections never starve the pool's other users: at the pool's
/// limit a hot statement's connection goes back to the pool instead, and
/// kept connections left idle go back when swept.
#[tokio::test]
async fn kept_connections_do_not_starve_the_pools_other_users() -> Result<()> {
    use workbroker_server::store::Store;
    let broker = TestBroker::start().await?;
    let queues = vec!["kept".to_owned()];

    let one = sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .acquire_timeout(Duration::from_secs(3))
        .connect(&broker.database.url)
        .await?;
    let store = Store::from_pool(one.clone());
    // A hot statement (the announcement), then one that borrows from the
    // pool directly: it would wait out the acquire timeout if the only
    // connection had been kept.
    store.announce_jobs(&queues).await?;
    store.queue_get("kept").await?;
    one.close().await;

    let two = sqlx::postgres::PgPoolOptions::new().max_connections(2).connect(&broker.database.url).await?;
    let store = Store::from_pool(two.clone());
    store.announce_jobs(&queues).await?;
    assert_eq!(two.num_idle(), 0, "below the pool's limit the connection is kept");
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    store.return_idle_connections();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while two.num_idle() == 0 {
        anyhow::ensure!(tokio::time::Instant::now() < deadline, "the idle kept connection never came back to the pool");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    drop(store);
    two.close().await;
    broker.finish().await
}
