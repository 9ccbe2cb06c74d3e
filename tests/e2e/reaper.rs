//! The reaper, driven directly through the server library: expired leases
//! come back exactly once even with two reapers racing, acked jobs are never
//! touched, and finished jobs are pruned after their queue's retention.

use std::collections::HashSet;
use std::time::Duration;

use anyhow::{Context, Result};
use workbroker_api::v1;
use workbroker_server::reaper::{Reaper, ReaperConfig, ReaperCounts};
use workbroker_server::store::{AckItem, JOBS_LEASE_SQL, LeaseParams, SettleOutcome, Store};
use workbroker_tests::*;

/// A broker whose own reaper stays out of the way (it ticks once at start,
/// then not for an hour), over a fresh database.
async fn broker_without_reaper() -> Result<TestBroker> {
    let database = TestDatabase::create().await?;
    let config = config_without_reaper(&database.url);
    TestBroker::start_with(database, config).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_reapers_racing_return_each_expired_lease_exactly_once() -> Result<()> {
    let broker = broker_without_reaper().await?;
    let mut client = broker.broker().await;
    let ids = enqueue(&mut client, (0..200).map(|_| new_job("reaped", "k")).collect()).await?;
    assert_eq!(ids.len(), 200);

    let store = Store::from_pool(broker.database.pool().await?);
    let queues = vec!["reaped".to_owned()];
    let leased = store
        .jobs_lease(&LeaseParams {
            queues: &queues,
            kinds: &[],
            limit: 200,
            lease_duration: None,
            worker_id: "reaper-test",
            shards: None,
        })
        .await?;
    assert_eq!(leased.len(), 200);
    assert!(leased.iter().all(|job| job.attempt == 1));

    let acked: Vec<AckItem> = leased
        .iter()
        .step_by(4)
        .map(|job| {
            Ok(AckItem {
                job_id: job.id,
                lease_token: job.lease_token.context("a leased job has a token")?,
                result: Vec::new(),
            })
        })
        .collect::<Result<_>>()?;
    assert_eq!(acked.len(), 50);
    let outcomes = store.jobs_ack_many(&acked).await?.outputs;
    assert!(outcomes.iter().all(|outcome| *outcome == SettleOutcome::Ok));
    let acked_ids: HashSet<i64> = acked.iter().map(|item| item.job_id).collect();

    let expired =
        sqlx::query("UPDATE workbroker.jobs SET lease_expires_at = now() - interval '1 second' WHERE state = 3")
            .execute(store.pool())
            .await?
            .rows_affected();
    assert_eq!(expired, 150);

    // Two reapers on their own pools, small batches so they interleave.
    let config = ReaperConfig { interval: Duration::from_secs(3600), batch_size: 10 };
    let first = Reaper::new(Store::from_pool(broker.database.pool().await?), config);
    let second = Reaper::new(Store::from_pool(broker.database.pool().await?), config);
    let (first_counts, second_counts) = tokio::join!(first.run_once(), second.run_once());
    let (first_counts, second_counts) = (first_counts?, second_counts?);
    assert_eq!(first_counts.requeued + second_counts.requeued, 150, "first {first_counts:?}, second {second_counts:?}");
    assert_eq!(first_counts.dead + second_counts.dead, 0);

    let mut admin = broker.admin().await;
    let jobs = list_all_jobs(&mut admin, "reaped", v1::JobState::Unspecified).await?;
    assert_eq!(jobs.len(), 200);
    for job in &jobs {
        let id: i64 = job.job_id.parse()?;
        if acked_ids.contains(&id) {
            assert_eq!(job.state, v1::JobState::Completed as i32, "{job:?}");
        } else {
            assert_eq!(job.state, v1::JobState::Available as i32, "{job:?}");
            assert_eq!(job.attempt, 1);
            assert_eq!(job.last_error, "lease expired");
        }
    }
    let stats = stats_of(&mut admin, "reaped").await?;
    assert_eq!((stats.completed, stats.available, stats.leased), (50, 150, 0));

    let third = Reaper::new(store.clone(), config).run_once().await?;
    assert_eq!(third, ReaperCounts::default());

    // The stale tokens can settle nothing now.
    let stale: Vec<AckItem> = leased
        .iter()
        .filter(|job| !acked_ids.contains(&job.id))
        .take(5)
        .map(|job| {
            Ok(AckItem {
                job_id: job.id,
                lease_token: job.lease_token.context("a leased job has a token")?,
                result: Vec::new(),
            })
        })
        .collect::<Result<_>>()?;
    let outcomes = store.jobs_ack_many(&stale).await?.outputs;
    assert!(outcomes.iter().all(|outcome| *outcome == SettleOutcome::StaleLease));
    broker.finish().await
}

#[tokio::test]
async fn an_expired_lease_on_its_last_attempt_goes_dead_once() -> Result<()> {
    let broker = broker_without_reaper().await?;
    let mut client = broker.broker().await;
    let mut last_try = new_job("last", "k");
    last_try.max_attempts = 1;
    let ids = enqueue(&mut client, vec![last_try, new_job("last", "k")]).await?;
    let mut worker = Worker::on(&mut client, &["last"], 2).await?;
    worker.take_jobs(2, Duration::from_secs(3)).await?;

    let store = Store::from_pool(broker.database.pool().await?);
    sqlx::query("UPDATE workbroker.jobs SET lease_expires_at = now() - interval '1 second' WHERE state = 3")
        .execute(store.pool())
        .await?;
    let config = ReaperConfig { interval: Duration::from_secs(3600), batch_size: 100 };
    let counts = Reaper::new(store.clone(), config).run_once().await?;
    assert_eq!((counts.requeued, counts.dead), (1, 1), "{counts:?}");
    assert_eq!(state_of(&mut client, &ids[0]).await?, v1::JobState::Dead);
    let dead = get_job(&mut client, &ids[0]).await?;
    assert_eq!(dead.last_error, "lease expired");
    let again = Reaper::new(store, config).run_once().await?;
    assert_eq!((again.requeued, again.dead), (0, 0));
    worker.close();
    broker.finish().await
}

#[tokio::test]
async fn finished_jobs_past_their_retention_are_pruned_but_dead_jobs_stay() -> Result<()> {
    let broker = broker_without_reaper().await?;
    let mut client = broker.broker().await;
    let mut admin = broker.admin().await;
    admin
        .configure_queue(v1::ConfigureQueueRequest {
            queue: "pruned".into(),
            completed_retention: Some(seconds(0.0)),
            ..Default::default()
        })
        .await?;
    // A second queue keeps the default retention (an hour).
    let kept = enqueue(&mut client, vec![new_job("retained", "k")]).await?;
    let ids =
        enqueue(&mut client, vec![new_job("pruned", "k"), new_job("pruned", "k"), new_job("pruned", "k")]).await?;

    let mut worker = Worker::on(&mut client, &["pruned", "retained"], 4).await?;
    let leased = worker.take_jobs(4, Duration::from_secs(3)).await?;
    let mut acks = Vec::new();
    let mut kill = Vec::new();
    let mut cancel_id = None;
    for job in &leased {
        let id = id_of(job);
        if id == ids[1] {
            let mut nack = nack_of(job, "fatal");
            nack.permanent = true;
            kill.push(nack);
        } else if id == ids[2] {
            cancel_id = Some(id);
        } else {
            acks.push(ack_of(job));
        }
    }
    ack_all(&mut client, acks).await?;
    nack_all(&mut client, kill).await?;
    let cancel_id = cancel_id.context("the third job was leased")?;
    client.cancel_job(v1::CancelJobRequest { job_id: cancel_id.clone() }).await?;
    assert_eq!(state_of(&mut client, &ids[0]).await?, v1::JobState::Completed);

    let store = Store::from_pool(broker.database.pool().await?);
    // finished_at < now() - 0 s: make sure the database clock has moved on.
    tokio::time::sleep(Duration::from_millis(20)).await;
    let counts = Reaper::new(store.clone(), ReaperConfig { interval: Duration::from_secs(3600), batch_size: 100 })
        .run_once()
        .await?;
    assert_eq!(counts.pruned, 2, "the completed and the cancelled job: {counts:?}");

    for pruned in [&ids[0], &cancel_id] {
        let status = expect_status(client.get_job(v1::GetJobRequest { job_id: pruned.clone() }).await)?;
        assert_eq!(status.code(), tonic::Code::NotFound);
    }
    assert_eq!(state_of(&mut client, &ids[1]).await?, v1::JobState::Dead);
    assert_eq!(state_of(&mut client, &kept[0]).await?, v1::JobState::Completed);
    let stats = stats_of(&mut admin, "pruned").await?;
    assert_eq!((stats.completed, stats.dead, stats.cancelled), (0, 1, 0));
    assert_eq!(stats.completed_watermark, 3, "pruning does not move the watermark back");
    broker.finish().await
}

/// With autovacuum off (as on the CI database) or behind, the leader's
/// vacuumer vacuums a job table once its dead rows pass the threshold.
#[tokio::test]
async fn the_vacuumer_vacuums_a_job_table_full_of_dead_rows() -> Result<()> {
    use workbroker_server::store::maintenance::JobTable;
    use workbroker_server::vacuum::{VacuumConfig, Vacuumer};

    let broker = TestBroker::start().await?;
    let mut client = broker.broker().await;
    let pool = broker.database.pool().await?;
    let config = VacuumConfig {
        interval: std::time::Duration::from_secs(1),
        min_dead_rows: 50,
        dead_fraction: 0.0,
        ..VacuumConfig::default()
    };
    let vacuumer = Vacuumer::new(Store::from_pool(pool.clone()), config);
    assert!(vacuumer.run_once().await?.is_empty(), "nothing to vacuum in an empty database");

    // Every leased and acked job leaves dead rows behind in the hot table.
    enqueue(&mut client, (0..120).map(|_| new_job("vacuum", "k")).collect()).await?;
    let mut worker = Worker::on(&mut client, &["vacuum"], 120).await?;
    let leased = worker.take_jobs(120, std::time::Duration::from_secs(10)).await?;
    ack_all(&mut client, leased.iter().map(ack_of).collect()).await?;
    let dead_rows = || async {
        let dead: i64 =
            sqlx::query_scalar("SELECT n_dead_tup FROM pg_stat_user_tables WHERE relid = 'workbroker.jobs'::regclass")
                .fetch_one(&pool)
                .await?;
        Ok::<_, anyhow::Error>(dead)
    };
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    while dead_rows().await? <= 50 {
        anyhow::ensure!(tokio::time::Instant::now() < deadline, "the statistics never showed the dead rows");
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }

    let vacuumed = vacuumer.run_once().await?;
    assert!(vacuumed.contains(&JobTable::Jobs), "vacuumed {vacuumed:?}");
    assert!(dead_rows().await? < 50, "the vacuum reclaimed the dead rows");
    // Churn alone does not analyze: an ANALYZE makes every session plan its
    // statements on the table again.
    let (vacuumed_at, analyzed_at): (bool, bool) = sqlx::query_as(
        "SELECT last_vacuum IS NOT NULL, last_analyze IS NOT NULL FROM pg_stat_user_tables \
          WHERE relid = 'workbroker.jobs'::regclass",
    )
    .fetch_one(&pool)
    .await?;
    assert!(vacuumed_at && !analyzed_at, "vacuumed: {vacuumed_at}, analyzed: {analyzed_at}");
    pool.close().await;
    broker.finish().await
}

/// A job table that filled up since its statistics were taken gets them
/// again (and with them fresh plans for every cached statement on it).
#[tokio::test]
async fn the_vacuumer_analyzes_a_job_table_that_filled_up() -> Result<()> {
    use workbroker_server::vacuum::{VacuumConfig, Vacuumer};

    let broker = TestBroker::start().await?;
    let mut client = broker.broker().await;
    let pool = broker.database.pool().await?;
    let config = VacuumConfig { min_grown_rows: 100, growth_factor: 2.0, ..VacuumConfig::default() };
    let vacuumer = Vacuumer::new(Store::from_pool(pool.clone()), config);
    let activity = || async {
        let row: (i64, bool) = sqlx::query_as(
            "SELECT n_mod_since_analyze, last_analyze IS NOT NULL FROM pg_stat_user_tables \
              WHERE relid = 'workbroker.jobs'::regclass",
        )
        .fetch_one(&pool)
        .await?;
        Ok::<_, anyhow::Error>(row)
    };
    vacuumer.run_once().await?;
    assert!(!activity().await?.1, "an empty table is not analyzed");

    enqueue(&mut client, (0..150).map(|_| new_job("analyze", "k")).collect()).await?;
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    while activity().await?.0 <= 100 {
        anyhow::ensure!(tokio::time::Instant::now() < deadline, "the statistics never showed the inserts");
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    assert!(vacuumer.run_once().await?.is_empty(), "no dead rows: analyzed, not vacuumed");
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let (changed, analyzed) = activity().await?;
        if analyzed && changed == 0 {
            break;
        }
        anyhow::ensure!(tokio::time::Instant::now() < deadline, "not analyzed: {changed} changed rows");
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    pool.close().await;
    broker.finish().await
}

/// ANALYZE of `finished_jobs` keeps statistics of the columns statements
/// filter and sort it by, and leaves the others out (migration 0018): the
/// vacuumer analyzes the table every time it doubles, which at 5,000 jobs/s
/// came every few seconds, and statistics of all its columns cost two and a
/// half times the CPU.
#[tokio::test]
async fn an_analyze_of_finished_jobs_keeps_statistics_of_the_filtered_columns_only() -> Result<()> {
    let broker = broker_without_reaper().await?;
    let mut client = broker.broker().await;
    let pool = broker.database.pool().await?;
    enqueue(&mut client, (0..50).map(|_| new_job("statistics", "k")).collect()).await?;
    let mut worker = Worker::on(&mut client, &["statistics"], 50).await?;
    let leased = worker.take_jobs(50, Duration::from_secs(10)).await?;
    ack_all(&mut client, leased.iter().map(ack_of).collect()).await?;
    let finished: i64 = sqlx::query_scalar("SELECT count(*) FROM workbroker.finished_jobs").fetch_one(&pool).await?;
    assert_eq!(finished, 50);

    sqlx::raw_sql("ANALYZE workbroker.finished_jobs").execute(&pool).await?;
    let columns: Vec<String> = sqlx::query_scalar(
        "SELECT attname::text FROM pg_stats WHERE schemaname = 'workbroker' AND tablename = 'finished_jobs' \
          ORDER BY attname",
    )
    .fetch_all(&pool)
    .await?;
    assert_eq!(columns, ["dedup_key", "finished_at", "id", "queue", "sequence", "state"]);
    pool.close().await;
    broker.finish().await
}

/// Vacuum leaves an emptied job table its size (migration 0017): giving the
/// empty last pages back would take the table's ACCESS EXCLUSIVE lock, which
/// stops every enqueue, lease and ack while it is held.
#[tokio::test]
async fn a_vacuum_of_an_emptied_job_table_leaves_it_its_size() -> Result<()> {
    let broker = broker_without_reaper().await?;
    let mut client = broker.broker().await;
    let pool = broker.database.pool().await?;
    for _ in 0..2 {
        enqueue(&mut client, (0..1_000).map(|_| new_job("emptied", "k")).collect()).await?;
    }
    let size = || async {
        let bytes: i64 = sqlx::query_scalar("SELECT pg_relation_size('workbroker.jobs')").fetch_one(&pool).await?;
        Ok::<_, anyhow::Error>(bytes)
    };
    let filled = size().await?;
    assert!(filled > 8192 * 4, "2,000 jobs fill several pages: {filled} bytes");

    sqlx::query("DELETE FROM workbroker.jobs WHERE queue = 'emptied'").execute(&pool).await?;
    sqlx::raw_sql("VACUUM workbroker.jobs").execute(&pool).await?;
    assert_eq!(size().await?, filled, "the vacuum gave the empty pages back");

    let options: Vec<String> = sqlx::query_scalar(
        "SELECT relname || ':' || array_to_string(reloptions, ',') FROM pg_class \
          WHERE oid IN ('workbroker.jobs'::regclass, 'workbroker.finished_jobs'::regclass) ORDER BY relname",
    )
    .fetch_all(&pool)
    .await?;
    for table in &options {
        assert!(table.contains("vacuum_truncate=off"), "{table}");
    }
    assert_eq!(options.len(), 2);
    pool.close().await;
    broker.finish().await
}

/// The hot and group-commit connections price sequential and bitmap scans
/// out, and the lease's generic plan walks the waiting index in its order.
/// Cached generic plans are made from whatever the statistics said last: an
/// ANALYZE that saw a nearly empty job table once made the lease update its
/// rows through a scan of the whole table, and one of an empty table made it
/// read every job of its queue through the (queue, sequence) index and sort
/// them. Here the statistics are those of an emptied table when a queue
/// fills again.
#[tokio::test]
async fn the_lease_plan_walks_the_waiting_index_after_an_analyze_of_an_empty_table() -> Result<()> {
    let database = TestDatabase::create().await?;
    let store = Store::connect_lazy(&test_config(&database.url).store)?;
    store.migrate().await?;
    for (setting, expected) in
        [("enable_seqscan", "off"), ("enable_bitmapscan", "off"), ("plan_cache_mode", "force_generic_plan")]
    {
        let value: String =
            sqlx::query_scalar(sqlx::AssertSqlSafe(format!("SHOW {setting}"))).fetch_one(store.pool()).await?;
        assert_eq!(value, expected, "{setting}");
    }

    let pool = database.pool().await?;
    let fill =
        "SELECT count(*) FROM workbroker.enqueue_default_jobs('planned', array_fill('k'::text, ARRAY[20000]), NULL)";
    sqlx::raw_sql("ALTER TABLE workbroker.jobs SET (autovacuum_enabled = off)").execute(&pool).await?;
    sqlx::raw_sql(fill).execute(&pool).await?;
    sqlx::raw_sql("DELETE FROM workbroker.jobs; ANALYZE workbroker.jobs").execute(&pool).await?;
    sqlx::raw_sql(fill).execute(&pool).await?;

    let mut connection = store.pool().acquire().await?;
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!("PREPARE lease_plan AS {JOBS_LEASE_SQL}")))
        .execute(&mut *connection)
        .await?;
    let plan: Vec<String> =
        sqlx::query_scalar("EXPLAIN EXECUTE lease_plan(ARRAY['planned'], '{}', 100, NULL, 'w', NULL)")
            .fetch_all(&mut *connection)
            .await?;
    let plan = plan.join("\n");
    assert!(plan.contains("Index Scan using jobs_waiting_idx"), "{plan}");
    for other_path in ["Bitmap", "Seq Scan on jobs", "jobs_queue_sequence_idx"] {
        assert!(!plan.contains(other_path), "{plan}");
    }
    drop(connection);
    pool.close().await;
    store.pool().close().await;
    database.drop_database().await
}
