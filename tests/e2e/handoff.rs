//! Hand-off at enqueue: a job that can start now goes straight to a waiting
//! local stream, inserted already leased to it. These tests pin down when it
//! must happen and when it must not, and that such a lease behaves like any
//! other.

use std::time::Duration;

use anyhow::Result;
use workbroker_api::v1;
use workbroker_tests::*;

const WAIT: Duration = Duration::from_secs(10);
/// Long enough for an idle stream's first (empty) lease to come back, so it
/// waits for work.
const SETTLE: Duration = Duration::from_millis(300);

/// Whether the job was inserted already leased: its lease began in the very
/// statement that created it.
async fn handed_off(broker: &TestBroker, job_id: &str) -> Result<bool> {
    let pool = broker.database.pool().await?;
    let same: Option<bool> = sqlx::query_scalar(
        "SELECT leased_at = created_at FROM workbroker.all_jobs WHERE id = $1::bigint AND leased_at IS NOT NULL",
    )
    .bind(job_id)
    .fetch_optional(&pool)
    .await?;
    pool.close().await;
    Ok(same.unwrap_or(false))
}

#[tokio::test]
async fn a_job_for_a_waiting_worker_arrives_leased_and_settles_like_any_lease() -> Result<()> {
    let broker = TestBroker::start().await?;
    let mut client = broker.broker().await;
    let mut worker = Worker::on(&mut client, &["handoff"], 4).await?;
    worker.expect_quiet(SETTLE).await?;

    let mut job = new_job("handoff", "k");
    job.payload = b"payload".to_vec();
    job.priority = 3;
    job.attributes.insert("team".into(), "search".into());
    let ids = enqueue(&mut client, vec![job]).await?;
    let leased = worker.take_jobs(1, WAIT).await?.remove(0);
    let delivered = leased.job.clone().expect("job");
    assert_eq!(delivered.job_id, ids[0]);
    assert_eq!(delivered.payload, b"payload");
    assert_eq!(delivered.priority, 3);
    assert_eq!(delivered.attributes.get("team").map(String::as_str), Some("search"));
    assert_eq!(delivered.state, v1::JobState::Leased as i32);
    assert_eq!(delivered.sequence, 1);
    assert_eq!(delivered.max_attempts, 25, "the queue's default");
    assert_eq!(leased.attempt, 1);
    assert!(leased.lease_expires_at.is_some());
    assert!(handed_off(&broker, &ids[0]).await?, "the job was inserted leased");

    let stored = get_job(&mut client, &ids[0]).await?;
    assert_eq!(stored.state, v1::JobState::Leased as i32);
    assert_eq!(stored.leased_by, "test-worker");
    assert_eq!(stored.attempt, 1);

    // Fenced like any lease: a wrong token changes nothing, the right one completes.
    let mut wrong = ack_of(&leased);
    wrong.lease_token = uuid::Uuid::new_v4().to_string();
    let outcomes = ack_all(&mut client, vec![wrong, ack_of(&leased)]).await?;
    assert_eq!(outcomes[0].outcome, v1::Outcome::StaleLease as i32);
    assert_eq!(outcomes[1].outcome, v1::Outcome::Ok as i32);
    assert_eq!(state_of(&mut client, &ids[0]).await?, v1::JobState::Completed);
    broker.finish().await
}

#[tokio::test]
async fn a_handoff_fills_only_the_free_slots_and_leaves_the_rest_waiting() -> Result<()> {
    let broker = TestBroker::start().await?;
    let mut client = broker.broker().await;
    let mut admin = broker.admin().await;
    let mut worker = Worker::on(&mut client, &["handoff-window"], 2).await?;
    worker.expect_quiet(SETTLE).await?;

    let ids = enqueue(&mut client, (0..5).map(|_| new_job("handoff-window", "k")).collect()).await?;
    let first = worker.take_jobs(2, WAIT).await?;
    worker.expect_quiet(SETTLE).await?;
    assert_eq!(first.iter().map(id_of).collect::<Vec<_>>(), ids[..2], "the earliest jobs, in order");
    let stats = stats_of(&mut admin, "handoff-window").await?;
    assert_eq!((stats.leased, stats.available), (2, 3));

    // The rest come the ordinary way as slots free.
    ack_all(&mut client, vec![ack_of(&first[0])]).await?;
    let third = worker.take_jobs(1, WAIT).await?.remove(0);
    assert_eq!(id_of(&third), ids[2]);
    assert!(!handed_off(&broker, &ids[2]).await?);
    broker.finish().await
}

#[tokio::test]
async fn a_paused_queue_hands_nothing_off() -> Result<()> {
    let broker = TestBroker::start().await?;
    let mut client = broker.broker().await;
    let mut admin = broker.admin().await;
    admin.pause_queue(v1::PauseQueueRequest { queue: "handoff-paused".into() }).await?;
    let mut worker = Worker::on(&mut client, &["handoff-paused"], 4).await?;
    worker.expect_quiet(SETTLE).await?;

    let ids = enqueue(&mut client, vec![new_job("handoff-paused", "k")]).await?;
    worker.expect_quiet(SETTLE).await?;
    assert_eq!(state_of(&mut client, &ids[0]).await?, v1::JobState::Available);

    admin.resume_queue(v1::ResumeQueueRequest { queue: "handoff-paused".into() }).await?;
    let leased = worker.take_jobs(1, WAIT).await?.remove(0);
    assert_eq!(id_of(&leased), ids[0]);
    // The slot reserved for the refused hand-off was given back.
    let more = enqueue(&mut client, (0..3).map(|_| new_job("handoff-paused", "k")).collect()).await?;
    let next = worker.take_jobs(3, WAIT).await?;
    assert_eq!(next.iter().map(id_of).collect::<Vec<_>>(), more);
    broker.finish().await
}

#[tokio::test]
async fn only_jobs_a_worker_asked_for_are_handed_to_it() -> Result<()> {
    let broker = TestBroker::start().await?;
    let mut client = broker.broker().await;
    let mut kind_a = Worker::open(
        &mut client,
        v1::OpenLease {
            worker_id: "kind-a".into(),
            queues: vec!["handoff-kinds".into()],
            kinds: vec!["a".into()],
            max_in_flight: 4,
            ..Default::default()
        },
    )
    .await?;
    kind_a.expect_quiet(SETTLE).await?;

    let ids = enqueue(&mut client, vec![new_job("handoff-kinds", "b")]).await?;
    kind_a.expect_quiet(SETTLE).await?;
    assert_eq!(state_of(&mut client, &ids[0]).await?, v1::JobState::Available);
    let mut any_kind = Worker::on(&mut client, &["handoff-kinds"], 1).await?;
    assert_eq!(id_of(&any_kind.take_jobs(1, WAIT).await?.remove(0)), ids[0]);
    broker.finish().await
}

#[tokio::test]
async fn a_keyed_job_is_not_handed_off_past_an_unfinished_predecessor() -> Result<()> {
    let broker = TestBroker::start().await?;
    let mut client = broker.broker().await;
    let first = enqueue(&mut client, vec![keyed_job("handoff-keys", "k", "crate-a")]).await?;
    let mut worker = Worker::on(&mut client, &["handoff-keys"], 4).await?;
    let held = worker.take_jobs(1, WAIT).await?.remove(0);
    assert_eq!(id_of(&held), first[0]);
    // The worker holds the head and waits with free slots.
    worker.expect_quiet(SETTLE).await?;
    let second = enqueue(&mut client, vec![keyed_job("handoff-keys", "k", "crate-a")]).await?;
    worker.expect_quiet(SETTLE).await?;
    assert_eq!(state_of(&mut client, &second[0]).await?, v1::JobState::Available);

    ack_all(&mut client, vec![ack_of(&held)]).await?;
    assert_eq!(id_of(&worker.take_jobs(1, WAIT).await?.remove(0)), second[0]);
    broker.finish().await
}

#[tokio::test]
async fn delayed_jobs_and_draining_workers_get_no_handoff() -> Result<()> {
    let broker = TestBroker::start().await?;
    let mut client = broker.broker().await;
    let mut worker = Worker::on(&mut client, &["handoff-later"], 4).await?;
    worker.expect_quiet(SETTLE).await?;

    let mut delayed = new_job("handoff-later", "k");
    delayed.delay = Some(seconds(0.5));
    let ids = enqueue(&mut client, vec![delayed]).await?;
    assert_eq!(state_of(&mut client, &ids[0]).await?, v1::JobState::Scheduled);
    let leased = worker.take_jobs(1, WAIT).await?.remove(0);
    assert_eq!(id_of(&leased), ids[0]);
    assert!(!handed_off(&broker, &ids[0]).await?);

    worker.send(v1::lease_request::Request::Drain(v1::Drain {}))?;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let after_drain = enqueue(&mut client, vec![new_job("handoff-later", "k")]).await?;
    worker.expect_quiet(SETTLE).await?;
    assert_eq!(state_of(&mut client, &after_drain[0]).await?, v1::JobState::Available);
    broker.finish().await
}
