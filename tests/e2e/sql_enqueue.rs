//! Transactional enqueue: jobs created inside the application's own
//! PostgreSQL transaction through `workbroker.enqueue_v1` / `enqueue_batch_v1`.

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use sqlx::{Connection, PgConnection};
use workbroker_api::v1;
use workbroker_tests::*;

const WAIT: Duration = Duration::from_secs(10);

async fn connect(broker: &TestBroker) -> Result<PgConnection> {
    Ok(PgConnection::connect(&broker.database.url).await?)
}

#[tokio::test]
async fn a_committed_job_reaches_a_waiting_worker_and_a_rolled_back_one_never_does() -> Result<()> {
    let broker = TestBroker::start().await?;
    let mut client = broker.broker().await;
    let mut worker = Worker::on(&mut client, &["registry"], 10).await?;
    let mut connection = connect(&broker).await?;

    let mut rolled_back = connection.begin().await?;
    let _: String = sqlx::query_scalar("SELECT workbroker.enqueue_v1('registry', 'index', convert_to('x', 'UTF8'))")
        .fetch_one(&mut *rolled_back)
        .await?;
    rolled_back.rollback().await?;

    let mut transaction = connection.begin().await?;
    let job_id: String =
        sqlx::query_scalar("SELECT workbroker.enqueue_v1('registry', 'index', ordering_key => 'serde')")
            .fetch_one(&mut *transaction)
            .await?;
    // Invisible to workers before the commit.
    worker.expect_quiet(Duration::from_millis(300)).await?;
    transaction.commit().await?;
    let leased = worker.take_jobs(1, Duration::from_secs(3)).await?;
    assert_eq!(id_of(&leased[0]), job_id);
    assert_eq!(leased[0].job.as_ref().map(|job| job.ordering_key.as_str()), Some("serde"));
    assert_eq!(leased[0].job.as_ref().map(|job| job.sequence), Some(1));

    // The rolled-back job never shows up.
    worker.expect_quiet(Duration::from_millis(500)).await?;
    let total: i64 = sqlx::query_scalar("SELECT count(*) FROM workbroker.all_jobs").fetch_one(&mut connection).await?;
    assert_eq!(total, 1);
    broker.finish().await
}

/// The `blocked` flags of the jobs still in the hot table, in the order given.
async fn blocked_flags(connection: &mut PgConnection, ids: &[i64]) -> Result<Vec<bool>> {
    Ok(sqlx::query_scalar(
        "SELECT j.blocked FROM unnest($1::bigint[]) WITH ORDINALITY AS i(id, place) \
           JOIN workbroker.jobs j ON j.id = i.id ORDER BY i.place",
    )
    .bind(ids)
    .fetch_all(connection)
    .await?)
}

/// Keyed jobs enqueued through SQL are marked blocked at commit, like the
/// broker's own: behind an earlier job of the transaction or an unfinished
/// job of the key; acking the head unblocks the next, which is then leased.
#[tokio::test]
async fn sql_enqueued_keyed_jobs_are_blocked_behind_their_key_until_its_head_finishes() -> Result<()> {
    let broker = TestBroker::start().await?;
    let mut client = broker.broker().await;
    let mut connection = connect(&broker).await?;
    let mut ids = Vec::new();
    for batch in [&["serde", "serde", "tokio"][..], &["serde"][..]] {
        let mut transaction = connection.begin().await?;
        for key in batch {
            let id: String = sqlx::query_scalar("SELECT workbroker.enqueue_v1('keyed', 'index', ordering_key => $1)")
                .bind(key)
                .fetch_one(&mut *transaction)
                .await?;
            ids.push(id.parse::<i64>()?);
        }
        transaction.commit().await?;
    }
    assert_eq!(blocked_flags(&mut connection, &ids).await?, [false, true, false, true]);

    let mut worker = Worker::on(&mut client, &["keyed"], 10).await?;
    let heads = worker.take_jobs(2, Duration::from_secs(3)).await?;
    worker.expect_quiet(Duration::from_millis(300)).await?;
    let serde_head =
        heads.iter().find(|job| id_of(job) == ids[0].to_string()).context("the first serde job was not leased")?;
    ack_all(&mut client, vec![ack_of(serde_head)]).await?;
    let next = worker.take_jobs(1, Duration::from_secs(3)).await?;
    assert_eq!(id_of(&next[0]), ids[1].to_string());
    // The acked job left the table; the last serde job waits behind the next.
    assert_eq!(blocked_flags(&mut connection, &ids).await?, [false, false, true]);
    broker.finish().await
}

#[tokio::test]
async fn commit_to_delivery_latency_of_sql_enqueued_jobs() -> Result<()> {
    let broker = TestBroker::start().await?;
    let mut client = broker.broker().await;
    let mut worker = Worker::on(&mut client, &["latency"], 1000).await?;
    let mut connection = connect(&broker).await?;
    let mut latencies = Vec::new();
    for _ in 0..100 {
        let mut transaction = connection.begin().await?;
        let _: String =
            sqlx::query_scalar("SELECT workbroker.enqueue_v1('latency', 'noop')").fetch_one(&mut *transaction).await?;
        transaction.commit().await?;
        let committed = Instant::now();
        worker.take_jobs(1, WAIT).await?;
        latencies.push(committed.elapsed());
    }
    latencies.sort();
    let p50 = latencies[latencies.len() / 2];
    let p99 = latencies[latencies.len() * 99 / 100];
    // Reported, not asserted: see the closing note of the issue.
    println!("sql enqueue commit-to-delivery over {} jobs: p50 {p50:?}, p99 {p99:?}", latencies.len());
    broker.finish().await
}

#[tokio::test]
async fn a_long_transaction_neither_blocks_enqueues_nor_breaks_the_watermark() -> Result<()> {
    let broker = TestBroker::start().await?;
    let mut client = broker.broker().await;
    let mut admin = broker.admin().await;
    // The queue exists before the long transaction starts.
    enqueue(&mut client, vec![new_job("index", "k")]).await?;

    let mut connection = connect(&broker).await?;
    let mut long = connection.begin().await?;
    let late_id: String =
        sqlx::query_scalar("SELECT workbroker.enqueue_v1('index', 'k')").fetch_one(&mut *long).await?;

    // Meanwhile gRPC enqueues and acks go on, unblocked.
    let during = tokio::time::timeout(
        Duration::from_secs(5),
        enqueue(&mut client, vec![new_job("index", "k"), new_job("index", "k")]),
    )
    .await
    .context("a gRPC enqueue was blocked by the open transaction")??;
    let mut worker = Worker::on(&mut client, &["index"], 10).await?;
    let leased = worker.take_jobs(3, WAIT).await?;
    ack_all(&mut client, leased.iter().map(ack_of).collect()).await?;
    let stats = stats_of(&mut admin, "index").await?;
    assert_eq!(stats.completed_watermark, 3, "everything committed so far is done");
    assert_eq!(stats.last_sequence, 3);
    assert_eq!(during.len(), 2);

    tokio::time::sleep(Duration::from_millis(500)).await;
    long.commit().await?;
    // The late job is numbered after everything committed before it, so the
    // published watermark (3) never covers it while it is unfinished.
    let late = worker.take_jobs(1, WAIT).await?;
    assert_eq!(id_of(&late[0]), late_id);
    assert_eq!(late[0].job.as_ref().map(|job| job.sequence), Some(4));
    let stats = stats_of(&mut admin, "index").await?;
    assert_eq!(stats.completed_watermark, 3, "the watermark waits for the late job");
    ack_all(&mut client, vec![ack_of(&late[0])]).await?;
    let stats = stats_of(&mut admin, "index").await?;
    assert_eq!(stats.completed_watermark, 4, "and then moves on exactly");
    broker.finish().await
}

#[tokio::test]
async fn a_batch_is_all_or_nothing_and_bad_arguments_name_the_field() -> Result<()> {
    let broker = TestBroker::start().await?;
    let mut connection = connect(&broker).await?;
    let result = sqlx::query(
        "SELECT * FROM workbroker.enqueue_batch_v1(ARRAY[
             ROW('ok', 'k', NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL)::workbroker.new_job_v1,
             ROW('ok', 'k', NULL, NULL, NULL, NULL, NULL, 5000, NULL, NULL, NULL)::workbroker.new_job_v1])",
    )
    .execute(&mut connection)
    .await;
    let error = result.err().context("max_attempts 5000 must be refused")?;
    let database_error = error.as_database_error().context("a database error")?;
    assert_eq!(database_error.code().as_deref(), Some("22023"));
    assert!(database_error.message().contains("jobs[1].max_attempts"), "{}", database_error.message());

    for (call, field) in [
        ("SELECT workbroker.enqueue_v1('bad queue', 'k')", "queue"),
        ("SELECT workbroker.enqueue_v1('q', '')", "kind"),
        ("SELECT workbroker.enqueue_v1('q', 'k', attributes => '[1]')", "attributes"),
        ("SELECT workbroker.enqueue_v1('q', 'k', run_at => now(), delay => interval '1 s')", "run_at"),
        ("SELECT workbroker.enqueue_v1('q', 'k', delay => interval '-1 s')", "delay"),
        ("SELECT workbroker.enqueue_v1('q', 'k', payload => decode(repeat('00', 1048577), 'hex'))", "payload"),
    ] {
        let error = sqlx::query(call).execute(&mut connection).await.err().context("must be refused")?;
        let message = error.as_database_error().map(|error| error.message().to_owned()).unwrap_or_default();
        assert!(message.contains(field), "{call}: {message}");
    }
    let total: i64 = sqlx::query_scalar("SELECT count(*) FROM workbroker.all_jobs").fetch_one(&mut connection).await?;
    assert_eq!(total, 0, "no refused call inserted anything");

    let rows: Vec<(String, bool)> = sqlx::query_as(
        "SELECT job_id, deduplicated FROM workbroker.enqueue_batch_v1(ARRAY[
             ROW('q', 'k', NULL, '{\"traceparent\": \"00-ab-cd-01\"}', 5, NULL, interval '1 hour', 3, 'key', 'd', NULL)::workbroker.new_job_v1,
             ROW('q', 'k', NULL, NULL, NULL, NULL, NULL, NULL, NULL, 'd', NULL)::workbroker.new_job_v1])",
    )
    .fetch_all(&mut connection)
    .await?;
    assert_eq!(rows[0].0, rows[1].0);
    assert_eq!((rows[0].1, rows[1].1), (false, true));
    let mut client = broker.broker().await;
    let job = client.get_job(v1::GetJobRequest { job_id: rows[0].0.clone() }).await?.into_inner();
    assert_eq!(job.state, v1::JobState::Scheduled as i32);
    assert_eq!(job.max_attempts, 3);
    assert_eq!(job.priority, 5);
    assert_eq!(job.attributes.get("traceparent").map(String::as_str), Some("00-ab-cd-01"));
    broker.finish().await
}

#[tokio::test]
async fn the_enqueuer_role_can_enqueue_and_nothing_else() -> Result<()> {
    let broker = TestBroker::start().await?;
    let mut connection = connect(&broker).await?;
    let role = format!("wbtest_app_{}", &uuid::Uuid::new_v4().simple().to_string()[..12]);
    for statement in [
        format!("CREATE ROLE {role} LOGIN PASSWORD 'app-secret'"),
        format!("GRANT workbroker_enqueuer TO {role}"),
        format!("GRANT CONNECT ON DATABASE {} TO {role}", broker.database.name),
    ] {
        sqlx::query(sqlx::AssertSqlSafe(statement)).execute(&mut connection).await?;
    }
    let app_url = rewrite_user(&broker.database.url, &role);
    let mut app = PgConnection::connect(&app_url).await.context("connect as the app role")?;
    let job_id: String = sqlx::query_scalar("SELECT workbroker.enqueue_v1('app', 'k')").fetch_one(&mut app).await?;
    assert!(!job_id.is_empty());
    for forbidden in [
        "SELECT count(*) FROM workbroker.jobs",
        "SELECT count(*) FROM workbroker.finished_jobs",
        "UPDATE workbroker.jobs SET priority = 1",
        "DELETE FROM workbroker.jobs",
        "UPDATE workbroker.queues SET paused = true",
        "SELECT workbroker.backoff_micros(1, interval '1 s', interval '1 s', 2, 0)",
    ] {
        let error = sqlx::query(forbidden).execute(&mut app).await.err().context(forbidden)?;
        let code = error.as_database_error().and_then(|error| error.code().map(|code| code.into_owned()));
        assert_eq!(code.as_deref(), Some("42501"), "{forbidden} must be refused with insufficient_privilege");
    }
    app.close().await?;
    let mut client = broker.broker().await;
    assert_eq!(state_of(&mut client, &job_id).await?, v1::JobState::Available);
    broker.finish().await?;
    let mut admin = PgConnection::connect(&server_url()).await?;
    sqlx::query(sqlx::AssertSqlSafe(format!("DROP ROLE IF EXISTS {role}"))).execute(&mut admin).await?;
    Ok(())
}

/// `url` with its user and password replaced by `role` / `app-secret`.
fn rewrite_user(url: &str, role: &str) -> String {
    let (scheme, rest) = url.split_once("://").unwrap_or(("postgres", url));
    let host_and_path = rest.rsplit_once('@').map_or(rest, |(_, host)| host);
    format!("{scheme}://{role}:app-secret@{host_and_path}")
}
