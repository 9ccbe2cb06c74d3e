//! Nacks, backoff, attempts, dead letters and their redrive, queue settings.

use std::time::Duration;

use anyhow::Result;
use workbroker_api::v1;
use workbroker_tests::*;

const WAIT: Duration = Duration::from_secs(5);
/// The queue backoff these tests configure: short, without jitter.
const BACKOFF: Duration = Duration::from_millis(100);

#[tokio::test]
async fn a_nack_without_retry_after_waits_for_the_queue_backoff() -> Result<()> {
    let broker = TestBroker::start().await?;
    let mut client = broker.broker().await;
    let mut admin = broker.admin().await;
    configure_fast_backoff(&mut admin, "retry", BACKOFF).await?;
    let ids = enqueue(&mut client, vec![new_job("retry", "k")]).await?;
    let mut worker = Worker::on(&mut client, &["retry"], 1).await?;
    let first = worker.take_jobs(1, WAIT).await?.remove(0);
    assert_eq!(first.attempt, 1);

    let nacks = nack_all(&mut client, vec![nack_of(&first, "upstream timed out")]).await?;
    assert_eq!(nacks[0].outcome, v1::Outcome::Ok as i32);
    assert_eq!(nacks[0].next_state, v1::JobState::Scheduled as i32);

    let again = worker.take_jobs(1, WAIT).await?.remove(0);
    assert_eq!(id_of(&again), ids[0]);
    assert_eq!(again.attempt, 2);
    assert_ne!(again.lease_token, first.lease_token);
    let job = again.job.clone().expect("a leased job carries its job");
    assert_eq!(job.last_error, "upstream timed out");

    ack_all(&mut client, vec![ack_of(&again)]).await?;
    let stored = get_job(&mut client, &ids[0]).await?;
    assert_eq!(stored.state, v1::JobState::Completed as i32);
    assert_eq!(stored.attempt, 2);
    broker.finish().await
}

#[tokio::test]
async fn a_nack_with_zero_retry_after_makes_the_job_available_at_once() -> Result<()> {
    let broker = TestBroker::start().await?;
    let mut client = broker.broker().await;
    let mut admin = broker.admin().await;
    // A long queue backoff, so only retry_after can explain a quick return.
    admin
        .configure_queue(v1::ConfigureQueueRequest {
            queue: "now".into(),
            backoff_initial: Some(seconds(60.0)),
            ..Default::default()
        })
        .await?;
    let ids = enqueue(&mut client, vec![new_job("now", "k")]).await?;
    let mut worker = Worker::on(&mut client, &["now"], 1).await?;
    let first = worker.take_jobs(1, WAIT).await?.remove(0);

    let mut nack = nack_of(&first, "try again");
    nack.retry_after = Some(seconds(0.0));
    let nacks = nack_all(&mut client, vec![nack]).await?;
    assert_eq!(nacks[0].outcome, v1::Outcome::Ok as i32);
    assert_eq!(nacks[0].next_state, v1::JobState::Available as i32);

    let again = worker.take_jobs(1, WAIT).await?.remove(0);
    assert_eq!(id_of(&again), ids[0]);
    assert_eq!(again.attempt, 2);
    broker.finish().await
}

#[tokio::test]
async fn the_last_allowed_attempt_failing_makes_the_job_dead() -> Result<()> {
    let broker = TestBroker::start().await?;
    let mut client = broker.broker().await;
    let mut admin = broker.admin().await;
    configure_fast_backoff(&mut admin, "limited", BACKOFF).await?;
    let mut job = new_job("limited", "k");
    job.max_attempts = 2;
    let ids = enqueue(&mut client, vec![job]).await?;
    let mut worker = Worker::on(&mut client, &["limited"], 1).await?;

    let first = worker.take_jobs(1, WAIT).await?.remove(0);
    assert_eq!(first.job.as_ref().map(|job| job.max_attempts), Some(2));
    let nacks = nack_all(&mut client, vec![nack_of(&first, "first failure")]).await?;
    assert_eq!(nacks[0].next_state, v1::JobState::Scheduled as i32);

    let second = worker.take_jobs(1, WAIT).await?.remove(0);
    assert_eq!(second.attempt, 2);
    let nacks = nack_all(&mut client, vec![nack_of(&second, "second failure")]).await?;
    assert_eq!(nacks[0].outcome, v1::Outcome::Ok as i32);
    assert_eq!(nacks[0].next_state, v1::JobState::Dead as i32);

    let stored = get_job(&mut client, &ids[0]).await?;
    assert_eq!(stored.state, v1::JobState::Dead as i32);
    assert_eq!(stored.attempt, 2);
    assert_eq!(stored.last_error, "second failure");
    assert!(stored.finished_at.is_some());
    worker.expect_quiet(Duration::from_millis(300)).await?;
    assert_eq!(stats_of(&mut admin, "limited").await?.dead, 1);
    broker.finish().await
}

#[tokio::test]
async fn a_permanent_nack_makes_the_job_dead_with_attempts_left() -> Result<()> {
    let broker = TestBroker::start().await?;
    let mut client = broker.broker().await;
    let ids = enqueue(&mut client, vec![new_job("poison", "k")]).await?;
    let mut worker = Worker::on(&mut client, &["poison"], 1).await?;
    let leased = worker.take_jobs(1, WAIT).await?.remove(0);
    let max_attempts = leased.job.as_ref().map_or(0, |job| job.max_attempts);
    assert!(max_attempts > 1, "the queue default leaves attempts: {max_attempts}");

    let mut nack = nack_of(&leased, "unsupported payload version");
    nack.permanent = true;
    let nacks = nack_all(&mut client, vec![nack]).await?;
    assert_eq!(nacks[0].outcome, v1::Outcome::Ok as i32);
    assert_eq!(nacks[0].next_state, v1::JobState::Dead as i32);

    let stored = get_job(&mut client, &ids[0]).await?;
    assert_eq!(stored.state, v1::JobState::Dead as i32);
    assert_eq!(stored.attempt, 1);
    assert_eq!(stored.last_error, "unsupported payload version");
    worker.expect_quiet(Duration::from_millis(300)).await?;
    broker.finish().await
}

#[tokio::test]
async fn redriven_dead_jobs_come_back_with_a_new_sequence_and_fresh_attempts() -> Result<()> {
    let broker = TestBroker::start().await?;
    let mut client = broker.broker().await;
    let mut admin = broker.admin().await;
    let ids =
        enqueue(&mut client, vec![new_job("redrive", "k"), new_job("redrive", "k"), new_job("redrive", "k")]).await?;
    let mut worker = Worker::on(&mut client, &["redrive"], 3).await?;
    let leased = worker.take_jobs(3, WAIT).await?;
    // Two die, one completes.
    let mut kill = Vec::new();
    let mut completed = None;
    for job in &leased {
        if id_of(job) == ids[1] {
            completed = Some(ack_of(job));
        } else {
            let mut nack = nack_of(job, "fatal");
            nack.permanent = true;
            kill.push(nack);
        }
    }
    let completed = completed.expect("the second job was leased");
    nack_all(&mut client, kill).await?;
    ack_all(&mut client, vec![completed]).await?;
    // No stream is open while the dead jobs come back, so they stay AVAILABLE.
    worker.close();
    let dead_before = list_all_jobs(&mut admin, "redrive", v1::JobState::Dead).await?;
    let mut dead_ids: Vec<String> = dead_before.iter().map(|job| job.job_id.clone()).collect();
    dead_ids.sort();
    let mut expected_dead = vec![ids[0].clone(), ids[2].clone()];
    expected_dead.sort();
    assert_eq!(dead_ids, expected_dead);
    let highest_before = stats_of(&mut admin, "redrive").await?.last_sequence;
    assert_eq!(highest_before, 3);

    let redriven = admin
        .redrive_dead_letters(v1::RedriveDeadLettersRequest { queue: "redrive".into(), ..Default::default() })
        .await?
        .into_inner();
    assert_eq!(redriven.redriven, 2);
    let mut redriven_ids = redriven.job_ids.clone();
    redriven_ids.sort();
    assert_eq!(redriven_ids, expected_dead);

    for before in &dead_before {
        let after = get_job(&mut client, &before.job_id).await?;
        assert_eq!(after.state, v1::JobState::Available as i32);
        assert_eq!(after.attempt, 0, "attempts start over");
        assert!(
            after.sequence > highest_before,
            "job {} got sequence {} after redrive, not above {highest_before}",
            after.job_id,
            after.sequence
        );
        assert!(after.sequence > before.sequence);
    }
    let stats = stats_of(&mut admin, "redrive").await?;
    assert_eq!(stats.dead, 0);
    assert_eq!(stats.last_sequence, 5);

    // They are leased again, starting over at attempt 1.
    let mut worker = Worker::on(&mut client, &["redrive"], 3).await?;
    let again = worker.take_jobs(2, WAIT).await?;
    let mut again_ids: Vec<String> = again.iter().map(id_of).collect();
    again_ids.sort();
    assert_eq!(again_ids, expected_dead);
    assert!(again.iter().all(|job| job.attempt == 1));
    let acks = ack_all(&mut client, again.iter().map(ack_of).collect()).await?;
    assert!(acks.iter().all(|ack| ack.outcome == v1::Outcome::Ok as i32));
    assert_eq!(stats_of(&mut admin, "redrive").await?.completed_watermark, 5);
    broker.finish().await
}

#[tokio::test]
async fn configure_queue_validates_and_returns_the_new_settings() -> Result<()> {
    let broker = TestBroker::start().await?;
    let mut admin = broker.admin().await;

    let status = expect_status(
        admin
            .configure_queue(v1::ConfigureQueueRequest {
                queue: "settings".into(),
                backoff_multiplier: Some(0.5),
                ..Default::default()
            })
            .await,
    )?;
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    assert!(status.message().contains("backoff_multiplier"), "message: {}", status.message());

    let status = expect_status(
        admin
            .configure_queue(v1::ConfigureQueueRequest {
                queue: "settings".into(),
                backoff_initial: Some(seconds(10.0)),
                backoff_max: Some(seconds(1.0)),
                ..Default::default()
            })
            .await,
    )?;
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    assert!(status.message().contains("backoff_max"), "message: {}", status.message());

    let info = admin
        .configure_queue(v1::ConfigureQueueRequest {
            queue: "settings".into(),
            max_attempts: Some(7),
            lease_duration: Some(seconds(45.0)),
            backoff_initial: Some(seconds(0.1)),
            backoff_max: Some(seconds(2.0)),
            backoff_multiplier: Some(3.0),
            backoff_jitter: Some(0.0),
            completed_retention: Some(seconds(120.0)),
        })
        .await?
        .into_inner();
    assert_eq!(info.queue, "settings");
    assert_eq!(info.max_attempts, 7);
    assert_eq!(info.lease_duration, Some(seconds(45.0)));
    assert_eq!(info.backoff_initial, Some(seconds(0.1)));
    assert_eq!(info.backoff_max, Some(seconds(2.0)));
    assert_eq!(info.backoff_multiplier, 3.0);
    assert_eq!(info.backoff_jitter, 0.0);
    assert_eq!(info.completed_retention, Some(seconds(120.0)));

    // A partial update leaves the rest alone.
    let info = admin
        .configure_queue(v1::ConfigureQueueRequest {
            queue: "settings".into(),
            max_attempts: Some(3),
            ..Default::default()
        })
        .await?
        .into_inner();
    assert_eq!(info.max_attempts, 3);
    assert_eq!(info.backoff_multiplier, 3.0);
    assert_eq!(info.lease_duration, Some(seconds(45.0)));

    // New jobs take the queue's default max_attempts.
    let mut client = broker.broker().await;
    let ids = enqueue(&mut client, vec![new_job("settings", "k")]).await?;
    assert_eq!(get_job(&mut client, &ids[0]).await?.max_attempts, 3);
    broker.finish().await
}

#[tokio::test]
async fn a_lease_that_expires_on_its_last_attempt_makes_the_job_dead() -> Result<()> {
    let broker = TestBroker::start().await?;
    let mut client = broker.broker().await;
    let mut job = new_job("expiring", "k");
    job.max_attempts = 1;
    let ids = enqueue(&mut client, vec![job]).await?;
    let mut worker = Worker::open(
        &mut client,
        v1::OpenLease {
            worker_id: "stuck".into(),
            queues: vec!["expiring".into()],
            max_in_flight: 1,
            lease_duration: Some(seconds(1.0)),
            ..Default::default()
        },
    )
    .await?;
    let leased = worker.take_jobs(1, WAIT).await?.remove(0);
    assert_eq!(leased.attempt, 1);
    // Never acked: the reaper (every 100 ms here) finds the expired lease.
    wait_for_state(&mut client, &ids[0], v1::JobState::Dead, WAIT).await?;
    let stored = get_job(&mut client, &ids[0]).await?;
    assert_eq!(stored.attempt, 1);
    assert_eq!(stored.last_error, "lease expired");
    let late = ack_all(&mut client, vec![ack_of(&leased)]).await?;
    assert_eq!(late[0].outcome, v1::Outcome::StaleLease as i32);
    assert_eq!(state_of(&mut client, &ids[0]).await?, v1::JobState::Dead);
    broker.finish().await
}
