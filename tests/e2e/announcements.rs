//! Job announcements between replicas: a replica alone on its database
//! announces nothing, and starts again as soon as another replica listens.

use std::collections::BTreeSet;
use std::time::Duration;

use anyhow::Result;
use sqlx::postgres::PgListener;
use tokio::time::Instant;
use workbroker_api::v1;
use workbroker_tests::*;

/// Long enough for a replica to be sure that nobody else listens: it must
/// have listened for three heartbeat intervals of a second.
const SETTLE: Duration = Duration::from_millis(4500);

/// What a bare listener heard on the broker's channels.
#[derive(Debug, Default)]
struct Heard {
    /// `workbroker_jobs` payloads (`queue@origin`).
    jobs: Vec<String>,
    /// Origins of heartbeats on `workbroker_leases`.
    heartbeats: BTreeSet<String>,
}

/// Listens for `wait`, or until `done` says the heard notifications suffice.
async fn listen(listener: &mut PgListener, wait: Duration, done: impl Fn(&Heard) -> bool) -> Result<Heard> {
    let deadline = Instant::now() + wait;
    let mut heard = Heard::default();
    while !done(&heard) {
        let Ok(notification) = tokio::time::timeout_at(deadline, listener.recv()).await else {
            break;
        };
        let notification = notification?;
        match notification.channel() {
            "workbroker_jobs" => heard.jobs.push(notification.payload().to_owned()),
            _ => {
                if let Some(origin) = notification.payload().strip_prefix("present:") {
                    heard.heartbeats.insert(origin.to_owned());
                }
            }
        }
    }
    Ok(heard)
}

async fn bare_listener(broker: &TestBroker) -> Result<PgListener> {
    bare_listener_on(&broker.database).await
}

async fn bare_listener_on(database: &TestDatabase) -> Result<PgListener> {
    let mut listener = PgListener::connect(&database.url).await?;
    listener.listen_all(["workbroker_jobs", "workbroker_leases"]).await?;
    Ok(listener)
}

#[tokio::test]
async fn a_replica_alone_announces_no_jobs_until_another_replica_listens() -> Result<()> {
    let first = TestBroker::start().await?;
    let mut listener = bare_listener(&first).await?;
    let settling = listen(&mut listener, SETTLE, |_| false).await?;
    assert_eq!(settling.heartbeats.len(), 1, "one replica's heartbeats: {settling:?}");
    let first_origin = settling.heartbeats.first().cloned().unwrap_or_default();

    // A replica whose listener came up late, or whose heartbeat was late
    // under load, still announces: give it a few tries to settle.
    let mut on_first = first.broker().await;
    let mut quiet = false;
    for attempt in 0..4 {
        enqueue(&mut on_first, vec![new_job(&format!("alone-{attempt}"), "k")]).await?;
        let alone = listen(&mut listener, Duration::from_millis(1500), |_| false).await?;
        assert!(alone.heartbeats.contains(&first_origin), "it still sends its heartbeat: {alone:?}");
        if alone.jobs.is_empty() {
            quiet = true;
            break;
        }
    }
    assert!(quiet, "a lone replica kept announcing its jobs");

    let second = first.start_replica().await?;
    let joined = listen(&mut listener, Duration::from_secs(5), |heard| heard.heartbeats.len() == 2).await?;
    assert_eq!(joined.heartbeats.len(), 2, "the new replica's heartbeat: {joined:?}");
    enqueue(&mut on_first, vec![new_job("together", "k")]).await?;
    let expected = format!("together{first_origin}");
    let together = listen(&mut listener, Duration::from_secs(3), |heard| heard.jobs.contains(&expected)).await?;
    assert!(together.jobs.contains(&expected), "announced once another replica listens: {together:?}");

    // Long after the join (skipped queues are re-sent only when a replica
    // is first heard), the two still announce to each other.
    let _ = listen(&mut listener, SETTLE, |_| false).await?;
    enqueue(&mut on_first, vec![new_job("later", "k")]).await?;
    let expected = format!("later{first_origin}");
    let later = listen(&mut listener, Duration::from_secs(3), |heard| heard.jobs.contains(&expected)).await?;
    assert!(later.jobs.contains(&expected), "announced while another replica listens: {later:?}");
    second.finish_keep_database().await?;
    first.finish().await
}

#[tokio::test]
async fn a_worker_on_a_replica_that_joins_a_lone_one_gets_its_jobs_without_waiting_for_the_idle_recheck() -> Result<()>
{
    let first = TestBroker::start().await?;
    tokio::time::sleep(SETTLE).await;
    let second = first.start_replica().await?;
    let mut on_first = first.broker().await;
    let mut on_second = second.broker().await;
    let mut worker = Worker::on(&mut on_second, &["joined"], 1).await?;
    enqueue(&mut on_first, vec![new_job("joined", "k")]).await?;
    // A stream that missed the announcement would look again only at its
    // idle re-check, five seconds after it went idle.
    worker.take_jobs(1, Duration::from_secs(3)).await?;
    second.finish_keep_database().await?;
    first.finish().await
}

#[tokio::test]
async fn a_dry_stream_looks_again_at_its_idle_recheck_while_its_worker_keeps_sending_credit() -> Result<()> {
    let broker = TestBroker::start().await?;
    let mut client = broker.broker().await;
    let mut worker = Worker::on(&mut client, &["unannounced"], 1).await?;
    worker.expect_quiet(Duration::from_millis(300)).await?;
    // A job from a statement that notifies nobody: only the stream's idle
    // re-check (every 5 s) can find it.
    let pool = broker.database.pool().await?;
    sqlx::query(
        "SELECT * FROM workbroker.enqueue_plain_jobs(ARRAY['unannounced'], ARRAY['k'], NULL, NULL, NULL, NULL, \
         ARRAY[NULL]::bigint[], ARRAY['']::bytea[], ARRAY[NULL]::text[])",
    )
    .fetch_all(&pool)
    .await?;
    // A credit every 300 ms wakes the stream without news of work; it must
    // not put the re-check off.
    let started = Instant::now();
    let leased = loop {
        if let Some(v1::lease_response::Response::Jobs(leased)) = worker.next_within(Duration::from_millis(300)).await?
        {
            break leased.jobs;
        }
        anyhow::ensure!(started.elapsed() < Duration::from_secs(10), "the dry stream never looked again");
        worker.credit(1)?;
    };
    assert_eq!(leased.len(), 1);
    assert!(leased[0].job.as_ref().is_some_and(|job| job.queue == "unannounced"));
    pool.close().await;
    broker.finish().await
}

#[tokio::test]
async fn heartbeats_go_out_while_every_pooled_connection_is_taken() -> Result<()> {
    // A replica whose hot statements hold all its pooled connections must
    // not fall silent (the others would take it for gone and stop
    // announcing their jobs to it): the heartbeat has a connection of its own.
    let database = TestDatabase::create().await?;
    let mut config = test_config(&database.url).store;
    config.max_connections = 4;
    config.batch_connections = 2;
    config.acquire_timeout = Duration::from_millis(500);
    let store = workbroker_server::store::Store::connect_lazy(&config)?;
    let mut held = Vec::new();
    while let Ok(connection) = store.pool().acquire().await {
        held.push(connection);
    }
    assert_eq!(held.len(), 2, "the hot pool is taken");

    let mut listener = bare_listener_on(&database).await?;
    let dispatcher = workbroker_server::dispatch::Dispatcher::new(store.clone());
    let shutdown = tokio_util::sync::CancellationToken::new();
    let heartbeat = tokio::spawn(dispatcher.heartbeat().run(shutdown.clone()));
    let heard = listen(&mut listener, Duration::from_secs(5), |heard| !heard.heartbeats.is_empty()).await?;
    assert_eq!(
        heard.heartbeats.first().map(String::as_str),
        Some(store.notify_suffix()),
        "this replica's heartbeat: {heard:?}"
    );
    assert!(store.pool().acquire().await.is_err(), "the hot pool was still taken");

    shutdown.cancel();
    heartbeat.await?;
    drop(held);
    store.pool().close().await;
    database.drop_database().await
}
