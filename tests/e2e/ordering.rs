//! Ordering keys: one job per key at a time, in enqueue order; a job in
//! backoff holds its key, a terminal one releases it; and jobs of a key
//! become visible in sequence order even when enqueued concurrently.
//!
//! Upper bounds here are 3 s: the dispatcher re-checks idle streams every
//! 5 s on its own, so a successor arriving within 3 s shows it was pushed
//! because its predecessor finished, not found by the periodic re-check.

use std::time::Duration;

use anyhow::Result;
use tonic::transport::Channel;
use workbroker_api::v1;
use workbroker_api::v1::broker_client::BrokerClient;
use workbroker_tests::*;

const WAIT: Duration = Duration::from_secs(3);
const QUIET: Duration = Duration::from_millis(400);

/// Takes one job and checks which one it is.
async fn expect_next(worker: &mut Worker, expected_id: &str) -> Result<v1::LeasedJob> {
    let job = worker.take_jobs(1, WAIT).await?.remove(0);
    anyhow::ensure!(id_of(&job) == expected_id, "expected job {expected_id}, got {}", id_of(&job));
    Ok(job)
}

/// Opens a new stream (which leases at once), checks it receives exactly
/// `expected_ids` in any order and nothing more, and returns the leases.
async fn fresh_stream_gets(
    client: &mut BrokerClient<Channel>,
    queue: &str,
    expected_ids: &[&str],
) -> Result<(Worker, Vec<v1::LeasedJob>)> {
    let mut worker = Worker::on(client, &[queue], 10).await?;
    let jobs = stream_gets(&mut worker, expected_ids).await?;
    Ok((worker, jobs))
}

/// Checks an open stream is sent exactly `expected_ids` (in any order) and
/// nothing more, and returns the leases.
async fn stream_gets(worker: &mut Worker, expected_ids: &[&str]) -> Result<Vec<v1::LeasedJob>> {
    let jobs = worker.take_jobs(expected_ids.len(), WAIT).await?;
    let mut got: Vec<String> = jobs.iter().map(id_of).collect();
    got.sort();
    let mut expected: Vec<String> = expected_ids.iter().map(|id| (*id).to_owned()).collect();
    expected.sort();
    anyhow::ensure!(got == expected, "expected {expected:?}, got {got:?}");
    worker.expect_quiet(QUIET).await?;
    Ok(jobs)
}

fn lease_of<'a>(jobs: &'a [v1::LeasedJob], job_id: &str) -> Result<&'a v1::LeasedJob> {
    jobs.iter().find(|job| id_of(job) == job_id).ok_or_else(|| anyhow::anyhow!("job {job_id} was not leased"))
}

async fn cancel(client: &mut BrokerClient<Channel>, job_id: &str) -> Result<v1::Job> {
    client
        .cancel_job(v1::CancelJobRequest { job_id: job_id.to_owned() })
        .await?
        .into_inner()
        .job
        .ok_or_else(|| anyhow::anyhow!("CancelJob returned no job"))
}

#[tokio::test]
async fn jobs_sharing_a_key_are_leased_one_at_a_time_in_enqueue_order() -> Result<()> {
    let broker = TestBroker::start().await?;
    let mut client = broker.broker().await;
    let ids = enqueue(
        &mut client,
        vec![
            keyed_job("ordered", "index", "a"),
            keyed_job("ordered", "index", "a"),
            keyed_job("ordered", "index", "a"),
            keyed_job("ordered", "index", "b"),
            new_job("ordered", "index"),
        ],
    )
    .await?;
    let (a1, a2, a3, b1, free) = (ids[0].as_str(), ids[1].as_str(), ids[2].as_str(), ids[3].as_str(), ids[4].as_str());

    // A window of 10, yet only the head of each key and the keyless job.
    let (worker, first) = fresh_stream_gets(&mut client, "ordered", &[a1, b1, free]).await?;
    ack_all(&mut client, first.iter().map(ack_of).collect()).await?;
    worker.close();

    // Each later stream sees exactly the next job of key "a".
    let (worker, second) = fresh_stream_gets(&mut client, "ordered", &[a2]).await?;
    ack_all(&mut client, vec![ack_of(lease_of(&second, a2)?)]).await?;
    worker.close();
    let (worker, third) = fresh_stream_gets(&mut client, "ordered", &[a3]).await?;
    ack_all(&mut client, vec![ack_of(lease_of(&third, a3)?)]).await?;
    worker.close();

    let mut admin = broker.admin().await;
    let stats = stats_of(&mut admin, "ordered").await?;
    assert_eq!(stats.completed, 5);
    assert_eq!(stats.completed_watermark, 5);
    broker.finish().await
}

/// A deep backlog of few keys, planned with table statistics (as a busy
/// broker's tables are): only the head of each key is leased, a leased head
/// holds its key, and the next job of a key comes once its head is acked.
#[tokio::test]
async fn only_key_heads_are_leased_from_a_deep_analyzed_backlog() -> Result<()> {
    const PER_KEY: usize = 40;
    let broker = TestBroker::start().await?;
    let mut client = broker.broker().await;
    let keys = ["a", "b", "c"];
    let mut jobs: Vec<v1::NewJob> =
        (0..PER_KEY).flat_map(|_| keys.iter().map(|key| keyed_job("deep", "index", key))).collect();
    jobs.push(new_job("deep", "index"));
    let ids = enqueue(&mut client, jobs).await?;
    // Jobs are interleaved a, b, c, a, b, c, ...: job `round` of a key is
    // at `round * 3 + key index`.
    let nth = |round: usize, key: usize| ids[round * keys.len() + key].as_str();
    let pool = broker.database.pool().await?;
    // Every job but the first of each key waits marked blocked, out of the
    // lease's index.
    let blocked: i64 =
        sqlx::query_scalar("SELECT count(*) FROM workbroker.jobs WHERE blocked").fetch_one(&pool).await?;
    assert_eq!(blocked, i64::try_from(keys.len() * (PER_KEY - 1))?);
    sqlx::query("ANALYZE workbroker.jobs").execute(&pool).await?;
    pool.close().await;

    // One stream with room for ten: whatever it is sent beyond the heads
    // would be a job leased out of order.
    let (mut worker, first) =
        fresh_stream_gets(&mut client, "deep", &[nth(0, 0), nth(0, 1), nth(0, 2), &ids[ids.len() - 1]]).await?;
    // Key "b" keeps its head leased: only the second jobs of "a" and "c" come.
    let acks = [nth(0, 0), nth(0, 2), &ids[ids.len() - 1]]
        .into_iter()
        .map(|id| lease_of(&first, id).map(ack_of))
        .collect::<Result<Vec<_>>>()?;
    ack_all(&mut client, acks).await?;
    let second = stream_gets(&mut worker, &[nth(1, 0), nth(1, 2)]).await?;
    ack_all(&mut client, vec![ack_of(lease_of(&first, nth(0, 1))?)]).await?;
    stream_gets(&mut worker, &[nth(1, 1)]).await?;
    ack_all(&mut client, second.iter().map(ack_of).collect()).await?;
    stream_gets(&mut worker, &[nth(2, 0), nth(2, 2)]).await?;
    worker.close();
    broker.finish().await
}

#[tokio::test]
async fn a_job_in_backoff_holds_its_key() -> Result<()> {
    let broker = TestBroker::start().await?;
    let mut client = broker.broker().await;
    let ids = enqueue(
        &mut client,
        vec![keyed_job("held", "index", "crate:serde"), keyed_job("held", "index", "crate:serde")],
    )
    .await?;
    let mut worker = Worker::on(&mut client, &["held"], 10).await?;
    let a1 = expect_next(&mut worker, &ids[0]).await?;
    worker.expect_quiet(Duration::from_millis(200)).await?;

    let mut nack = nack_of(&a1, "index locked");
    nack.retry_after = Some(seconds(0.3));
    let nacks = nack_all(&mut client, vec![nack]).await?;
    assert_eq!(nacks[0].next_state, v1::JobState::Scheduled as i32);

    // A1 waits out its 300 ms; A2 must not overtake it, though the stream
    // has free slots and A2 is AVAILABLE.
    let again = worker.take_jobs(1, WAIT).await?.remove(0);
    assert_eq!(id_of(&again), ids[0], "A1 comes back before A2");
    assert_eq!(again.attempt, 2);
    worker.expect_quiet(QUIET).await?;
    assert_eq!(state_of(&mut client, &ids[1]).await?, v1::JobState::Available);

    ack_all(&mut client, vec![ack_of(&again)]).await?;
    worker.close();
    fresh_stream_gets(&mut client, "held", &[&ids[1]]).await?;
    broker.finish().await
}

#[tokio::test]
async fn a_dead_job_releases_its_key() -> Result<()> {
    let broker = TestBroker::start().await?;
    let mut client = broker.broker().await;
    let ids =
        enqueue(&mut client, vec![keyed_job("poisoned", "index", "a"), keyed_job("poisoned", "index", "a")]).await?;
    let (worker, first) = fresh_stream_gets(&mut client, "poisoned", &[&ids[0]]).await?;
    let mut nack = nack_of(&first[0], "cannot parse");
    nack.permanent = true;
    let nacks = nack_all(&mut client, vec![nack]).await?;
    assert_eq!(nacks[0].next_state, v1::JobState::Dead as i32);
    worker.close();
    fresh_stream_gets(&mut client, "poisoned", &[&ids[1]]).await?;
    broker.finish().await
}

/// A redriven keyed job takes a new sequence, so it waits behind the job of
/// its key that is unfinished now (not marked blocked: the lease's check
/// holds it back) and comes once that job is acked.
#[tokio::test]
async fn a_redriven_keyed_job_waits_behind_its_key() -> Result<()> {
    let broker = TestBroker::start().await?;
    let mut client = broker.broker().await;
    let ids =
        enqueue(&mut client, vec![keyed_job("revived", "index", "a"), keyed_job("revived", "index", "a")]).await?;
    let (mut worker, first) = fresh_stream_gets(&mut client, "revived", &[&ids[0]]).await?;
    let mut nack = nack_of(&first[0], "cannot parse");
    nack.permanent = true;
    nack_all(&mut client, vec![nack]).await?;
    let second = stream_gets(&mut worker, &[&ids[1]]).await?;

    let mut admin = broker.admin().await;
    let redriven = admin
        .redrive_dead_letters(v1::RedriveDeadLettersRequest { queue: "revived".into(), ..Default::default() })
        .await?
        .into_inner();
    assert_eq!(redriven.job_ids, [ids[0].clone()]);
    worker.expect_quiet(QUIET).await?;
    ack_all(&mut client, vec![ack_of(&second[0])]).await?;
    stream_gets(&mut worker, &[&ids[0]]).await?;
    worker.close();
    broker.finish().await
}

#[tokio::test]
async fn cancelling_the_head_of_a_key_releases_it() -> Result<()> {
    let broker = TestBroker::start().await?;
    let mut client = broker.broker().await;
    let ids = enqueue(
        &mut client,
        vec![
            keyed_job("cancelled-head", "index", "a"),
            keyed_job("cancelled-head", "index", "a"),
            keyed_job("cancelled-head", "index", "a"),
        ],
    )
    .await?;
    let (mut worker, first) = fresh_stream_gets(&mut client, "cancelled-head", &[&ids[0]]).await?;
    let cancelled = cancel(&mut client, &ids[0]).await?;
    assert_eq!(cancelled.state, v1::JobState::Cancelled as i32);
    let notice = worker.take_cancel_notice(WAIT).await?;
    assert_eq!(notice.job_id, ids[0]);
    assert_eq!(notice.lease_token, first[0].lease_token);
    worker.close();
    fresh_stream_gets(&mut client, "cancelled-head", &[&ids[1]]).await?;
    broker.finish().await
}

#[tokio::test]
async fn cancelling_a_waiting_head_releases_its_key() -> Result<()> {
    let broker = TestBroker::start().await?;
    let mut client = broker.broker().await;
    // The head is delayed (SCHEDULED) and blocks its successor until cancelled.
    let mut head = keyed_job("waiting-head", "index", "a");
    head.delay = Some(seconds(60.0));
    let ids = enqueue(&mut client, vec![head, keyed_job("waiting-head", "index", "a")]).await?;
    let (worker, _) = fresh_stream_gets(&mut client, "waiting-head", &[]).await?;
    worker.close();
    cancel(&mut client, &ids[0]).await?;
    fresh_stream_gets(&mut client, "waiting-head", &[&ids[1]]).await?;
    broker.finish().await
}

// The same releases, observed by the stream that is already waiting: the
// successor must be pushed to it, as for any job that becomes available.

#[tokio::test]
async fn a_waiting_stream_gets_the_successor_pushed_when_the_head_is_acked() -> Result<()> {
    let broker = TestBroker::start().await?;
    let mut client = broker.broker().await;
    let ids = enqueue(
        &mut client,
        vec![
            keyed_job("push-ack", "index", "a"),
            keyed_job("push-ack", "index", "a"),
            keyed_job("push-ack", "index", "a"),
            keyed_job("push-ack", "index", "b"),
            new_job("push-ack", "index"),
        ],
    )
    .await?;
    let mut worker = Worker::on(&mut client, &["push-ack"], 10).await?;
    let first = worker.take_jobs(3, WAIT).await?;
    worker.expect_quiet(QUIET).await?;
    ack_all(&mut client, vec![ack_of(lease_of(&first, &ids[0])?)]).await?;
    let a2 = expect_next(&mut worker, &ids[1]).await?;
    worker.expect_quiet(QUIET).await?;
    ack_all(&mut client, vec![ack_of(&a2)]).await?;
    expect_next(&mut worker, &ids[2]).await?;
    broker.finish().await
}

#[tokio::test]
async fn a_waiting_stream_gets_the_successor_pushed_when_the_head_dies() -> Result<()> {
    let broker = TestBroker::start().await?;
    let mut client = broker.broker().await;
    let ids =
        enqueue(&mut client, vec![keyed_job("push-dead", "index", "a"), keyed_job("push-dead", "index", "a")]).await?;
    let mut worker = Worker::on(&mut client, &["push-dead"], 10).await?;
    let a1 = expect_next(&mut worker, &ids[0]).await?;
    worker.expect_quiet(Duration::from_millis(200)).await?;
    let mut nack = nack_of(&a1, "cannot parse");
    nack.permanent = true;
    nack_all(&mut client, vec![nack]).await?;
    expect_next(&mut worker, &ids[1]).await?;
    broker.finish().await
}

/// The settle wakes are sent after the commit, by the replica that ran the
/// settle statement: a stream on another replica must hear of them too.
#[tokio::test]
async fn a_stream_on_another_replica_gets_the_successor_when_the_head_is_acked_or_nacked_here() -> Result<()> {
    let first = TestBroker::start().await?;
    let second = first.start_replica().await?;
    let mut on_first = first.broker().await;
    let mut on_second = second.broker().await;
    let ids = enqueue(
        &mut on_first,
        vec![
            keyed_job("push-far", "index", "a"),
            keyed_job("push-far", "index", "a"),
            keyed_job("push-far", "index", "a"),
        ],
    )
    .await?;
    let mut worker = Worker::on(&mut on_first, &["push-far"], 10).await?;
    let a1 = expect_next(&mut worker, &ids[0]).await?;
    worker.expect_quiet(QUIET).await?;
    ack_all(&mut on_second, vec![ack_of(&a1)]).await?;
    let a2 = expect_next(&mut worker, &ids[1]).await?;
    worker.expect_quiet(QUIET).await?;
    // A retry after a short delay: the job goes back to wait, holding its
    // key, and the other replica's stream is told to look again.
    let mut nack = nack_of(&a2, "flaky");
    nack.retry_after = Some(prost_types::Duration { seconds: 0, nanos: 0 });
    nack_all(&mut on_second, vec![nack]).await?;
    expect_next(&mut worker, &ids[1]).await?;
    second.finish_keep_database().await?;
    first.finish().await
}

#[tokio::test]
async fn a_waiting_stream_gets_the_successor_pushed_when_the_head_is_cancelled() -> Result<()> {
    let broker = TestBroker::start().await?;
    let mut client = broker.broker().await;
    // Key "a": a leased head. Key "b": a head delayed for a minute.
    let mut delayed_head = keyed_job("push-cancel", "index", "b");
    delayed_head.delay = Some(seconds(60.0));
    let ids = enqueue(
        &mut client,
        vec![
            keyed_job("push-cancel", "index", "a"),
            keyed_job("push-cancel", "index", "a"),
            delayed_head,
            keyed_job("push-cancel", "index", "b"),
        ],
    )
    .await?;
    let mut worker = Worker::on(&mut client, &["push-cancel"], 10).await?;
    let a1 = expect_next(&mut worker, &ids[0]).await?;
    worker.expect_quiet(Duration::from_millis(200)).await?;

    cancel(&mut client, &ids[0]).await?;
    let notice = worker.take_cancel_notice(WAIT).await?;
    assert_eq!(notice.lease_token, a1.lease_token);
    expect_next(&mut worker, &ids[1]).await?;

    cancel(&mut client, &ids[2]).await?;
    expect_next(&mut worker, &ids[3]).await?;
    broker.finish().await
}

/// Enqueues of keyed jobs take the enqueue barrier exclusive: while one is in
/// flight (its sequence taken, not committed), another keyed enqueue into the
/// queue waits, so the later job can never be visible, and leased, first.
#[tokio::test]
async fn a_keyed_enqueue_waits_for_a_keyed_enqueue_in_flight() -> Result<()> {
    let broker = TestBroker::start().await?;
    let mut client = broker.broker().await;
    broker
        .admin()
        .await
        .configure_queue(v1::ConfigureQueueRequest { queue: "keys-race".into(), ..Default::default() })
        .await?;
    let pool = broker.database.pool().await?;
    let mut in_flight = pool.begin().await?;
    let (first_id, first_sequence): (i64, i64) = sqlx::query_as(
        "SELECT id, sequence FROM workbroker.enqueue_jobs(ARRAY['keys-race'], ARRAY['k'], NULL, NULL, NULL, NULL, \
                ARRAY['crate-a'], NULL, NULL, NULL, NULL, NULL, NULL, '')",
    )
    .fetch_one(&mut *in_flight)
    .await?;
    assert_eq!(first_sequence, 1);

    let mut second_client = client.clone();
    let second =
        tokio::spawn(async move { enqueue(&mut second_client, vec![keyed_job("keys-race", "k", "crate-a")]).await });
    tokio::time::sleep(QUIET).await;
    assert!(!second.is_finished(), "a keyed enqueue must wait for the keyed enqueue in flight");

    in_flight.commit().await?;
    let second = second.await??;
    assert_eq!(get_job(&mut client, &second[0]).await?.sequence, 2);
    let mut worker = Worker::on(&mut client, &["keys-race"], 5).await?;
    let head = expect_next(&mut worker, &first_id.to_string()).await?;
    worker.expect_quiet(QUIET).await?;
    ack_all(&mut client, vec![ack_of(&head)]).await?;
    expect_next(&mut worker, &second[0]).await?;
    pool.close().await;
    broker.finish().await
}

/// The head of key "k" is leased, and a transaction deletes it and clears
/// its key (as an ack's statement does) without committing; a keyed enqueue
/// of "k" meanwhile still sees the head and marks its job blocked. The
/// enqueue then waits for the key's lock, and once the delete commits it
/// unblocks its own job: leasable.
#[tokio::test]
async fn a_keyed_enqueue_racing_the_finish_of_its_key_unblocks_its_job_after_the_finish() -> Result<()> {
    let broker = TestBroker::start().await?;
    let mut client = broker.broker().await;
    let head = enqueue(&mut client, vec![keyed_job("race", "k", "k")]).await?.remove(0);
    let (mut worker, _) = fresh_stream_gets(&mut client, "race", &[head.as_str()]).await?;

    let pool = broker.database.pool().await?;
    let mut finishing = pool.begin().await?;
    // What an ack's statement does: move the job out, then clear its key.
    sqlx::query("DELETE FROM workbroker.jobs WHERE id = $1")
        .bind(head.parse::<i64>()?)
        .execute(&mut *finishing)
        .await?;
    sqlx::query("SELECT workbroker.unblock_key_heads(ARRAY['race'], ARRAY['k'])").execute(&mut *finishing).await?;
    let mut enqueue_client = client.clone();
    let enqueued = tokio::spawn(async move { enqueue(&mut enqueue_client, vec![keyed_job("race", "k", "k")]).await });
    tokio::time::sleep(QUIET).await;
    assert!(!enqueued.is_finished(), "the enqueue must wait for the key's lock held by the finish");
    finishing.commit().await?;
    let next = enqueued.await??.remove(0);

    let blocked: bool = sqlx::query_scalar("SELECT blocked FROM workbroker.jobs WHERE id = $1")
        .bind(next.parse::<i64>()?)
        .fetch_one(&pool)
        .await?;
    assert!(!blocked, "the job is its key's head once the finish committed");
    stream_gets(&mut worker, &[next.as_str()]).await?;
    worker.close();
    pool.close().await;
    broker.finish().await
}

/// The reverse order: a keyed enqueue of "k" is in flight (its job blocked
/// behind the leased head, the key's lock held) when the head is acked. The
/// ack waits for the enqueue's commit, then sees the new job and unblocks
/// it.
#[tokio::test]
async fn the_finish_of_a_key_racing_a_keyed_enqueue_unblocks_the_new_job_after_the_enqueue() -> Result<()> {
    let broker = TestBroker::start().await?;
    let mut client = broker.broker().await;
    let head = enqueue(&mut client, vec![keyed_job("race", "k", "k")]).await?.remove(0);
    let (mut worker, leases) = fresh_stream_gets(&mut client, "race", &[head.as_str()]).await?;

    let pool = broker.database.pool().await?;
    let mut enqueuing = pool.begin().await?;
    let next_id: i64 = sqlx::query_scalar(
        "SELECT id FROM workbroker.enqueue_jobs(ARRAY['race'], ARRAY['k'], NULL, NULL, NULL, NULL, ARRAY['k'], \
                NULL, NULL, NULL, NULL, NULL, NULL, '')",
    )
    .fetch_one(&mut *enqueuing)
    .await?;
    let blocked: bool = sqlx::query_scalar("SELECT blocked FROM workbroker.jobs WHERE id = $1")
        .bind(next_id)
        .fetch_one(&mut *enqueuing)
        .await?;
    assert!(blocked, "the new job waits behind the leased head");
    let mut ack_client = client.clone();
    let ack = ack_of(lease_of(&leases, &head)?);
    let acked = tokio::spawn(async move { ack_all(&mut ack_client, vec![ack]).await });
    tokio::time::sleep(QUIET).await;
    assert!(!acked.is_finished(), "the ack must wait for the enqueue in flight");
    enqueuing.commit().await?;
    acked.await??;

    let blocked: bool =
        sqlx::query_scalar("SELECT blocked FROM workbroker.jobs WHERE id = $1").bind(next_id).fetch_one(&pool).await?;
    assert!(!blocked, "the ack unblocked the job enqueued while it ran");
    stream_gets(&mut worker, &[next_id.to_string().as_str()]).await?;
    worker.close();
    pool.close().await;
    broker.finish().await
}

/// Keyed enqueues and acks running at once: each key has its own producer
/// enqueuing one job at a time, so a key's next job is often enqueued while
/// its only unfinished job is being acked (the race `unblock_key_heads`
/// closes). Every job completes (no key is left blocked, no statement fails
/// on a deadlock), each key's jobs in sequence order and never two of a key
/// in one delivery.
#[tokio::test]
async fn keyed_enqueues_and_acks_at_once_complete_every_key_in_order() -> Result<()> {
    const KEYS: usize = 16;
    const PER_KEY: usize = 60;
    let total = KEYS * PER_KEY;
    let broker = TestBroker::start().await?;
    let mut client = broker.broker().await;
    let mut worker = Worker::on(&mut client, &["churn"], 64).await?;
    let producers: Vec<_> = (0..KEYS)
        .map(|key| {
            let mut client = client.clone();
            tokio::spawn(async move {
                for _ in 0..PER_KEY {
                    enqueue(&mut client, vec![keyed_job("churn", "k", &format!("key-{key}"))]).await?;
                }
                anyhow::Ok(())
            })
        })
        .collect();

    let mut last_sequence: std::collections::HashMap<String, u64> = std::collections::HashMap::new();
    let mut completed = 0;
    while completed < total {
        let jobs = worker
            .take_jobs(1, Duration::from_secs(20))
            .await
            .map_err(|error| anyhow::anyhow!("after {completed} of {total} jobs: {error}"))?;
        let mut keys_in_delivery = std::collections::HashSet::new();
        for leased in &jobs {
            let job = leased.job.as_ref().ok_or_else(|| anyhow::anyhow!("a lease without its job"))?;
            anyhow::ensure!(
                keys_in_delivery.insert(job.ordering_key.clone()),
                "two jobs of {} at once",
                job.ordering_key
            );
            let last = last_sequence.insert(job.ordering_key.clone(), job.sequence).unwrap_or(0);
            anyhow::ensure!(job.sequence > last, "{}: sequence {} after {last}", job.ordering_key, job.sequence);
        }
        ack_all(&mut client, jobs.iter().map(ack_of).collect()).await?;
        completed += jobs.len();
    }
    for producer in producers {
        producer.await??;
    }
    worker.expect_quiet(QUIET).await?;
    worker.close();
    let mut admin = broker.admin().await;
    assert_eq!(stats_of(&mut admin, "churn").await?.completed, u64::try_from(total)?);
    broker.finish().await
}

/// Cancelling a blocked job takes its key's lock before its row. A finish of
/// the key's head clears the next job's flag while holding that lock; if the
/// cancel held the row first and then waited for the lock, each would wait
/// for the other.
#[tokio::test]
async fn cancelling_a_blocked_job_waits_for_its_key_lock_before_taking_the_row() -> Result<()> {
    let broker = TestBroker::start().await?;
    let mut client = broker.broker().await;
    let ids = enqueue(&mut client, vec![keyed_job("lockorder", "k", "a"), keyed_job("lockorder", "k", "a")]).await?;
    let blocked_id = ids[1].parse::<i64>()?;
    let pool = broker.database.pool().await?;
    // A finish of "a" in the middle of its unblocking: key lock held.
    let mut finishing = pool.begin().await?;
    sqlx::query("SELECT workbroker.take_key_locks(ARRAY['lockorder'], ARRAY['a'])").execute(&mut *finishing).await?;

    let mut cancel_client = client.clone();
    let blocked_job = ids[1].clone();
    let cancelled = tokio::spawn(async move { cancel(&mut cancel_client, &blocked_job).await });
    tokio::time::sleep(QUIET).await;
    assert!(!cancelled.is_finished(), "the cancel waits for the key lock");
    // The finish can still update the blocked job's row: the cancel has not taken it.
    let update = sqlx::query("UPDATE workbroker.jobs SET blocked = false WHERE id = $1").bind(blocked_id);
    tokio::time::timeout(WAIT, update.execute(&mut *finishing))
        .await
        .map_err(|_| anyhow::anyhow!("the cancel took the row before the key lock"))??;
    finishing.commit().await?;
    let job = cancelled.await??;
    assert_eq!(job.state, v1::JobState::Cancelled as i32);
    pool.close().await;
    broker.finish().await
}
