//! CancelJob in every state, cancel notices on lease streams (also across
//! replicas), and WatchJob streams.

use std::time::Duration;

use anyhow::{Context, Result};
use tonic::transport::Channel;
use workbroker_api::v1;
use workbroker_api::v1::broker_client::BrokerClient;
use workbroker_tests::*;

const WAIT: Duration = Duration::from_secs(3);

async fn cancel(client: &mut BrokerClient<Channel>, job_id: &str) -> Result<v1::Job, tonic::Status> {
    let response = client.cancel_job(v1::CancelJobRequest { job_id: job_id.to_owned() }).await?.into_inner();
    response.job.ok_or_else(|| tonic::Status::internal("CancelJob answered without a job"))
}

/// The next update of a WatchJob stream: `Some(job)`, or `None` when the
/// stream ended (error if nothing happens within `wait`).
async fn next_update(watch: &mut tonic::Streaming<v1::Job>, wait: Duration) -> Result<Option<v1::Job>> {
    tokio::time::timeout(wait, watch.message()).await.context("no watch update in time")?.map_err(Into::into)
}

async fn expect_update(watch: &mut tonic::Streaming<v1::Job>, state: v1::JobState) -> Result<v1::Job> {
    let job = next_update(watch, WAIT).await?.with_context(|| format!("the watch ended before {state:?}"))?;
    anyhow::ensure!(job.state == state as i32, "expected {state:?}, got {:?}", v1::JobState::try_from(job.state));
    Ok(job)
}

async fn watch(client: &mut BrokerClient<Channel>, job_id: &str) -> Result<tonic::Streaming<v1::Job>> {
    Ok(client.watch_job(v1::WatchJobRequest { job_id: job_id.to_owned() }).await?.into_inner())
}

#[tokio::test]
async fn a_cancelled_available_job_is_never_delivered() -> Result<()> {
    let broker = TestBroker::start().await?;
    let mut client = broker.broker().await;
    let ids = enqueue(&mut client, vec![new_job("cancel", "k")]).await?;
    let job = cancel(&mut client, &ids[0]).await?;
    assert_eq!(job.job_id, ids[0]);
    assert_eq!(job.state, v1::JobState::Cancelled as i32);
    assert!(job.finished_at.is_some());

    let mut worker = Worker::on(&mut client, &["cancel"], 5).await?;
    worker.expect_quiet(Duration::from_millis(400)).await?;
    assert_eq!(state_of(&mut client, &ids[0]).await?, v1::JobState::Cancelled);
    let mut admin = broker.admin().await;
    let stats = stats_of(&mut admin, "cancel").await?;
    assert_eq!((stats.available, stats.cancelled), (0, 1));
    broker.finish().await
}

#[tokio::test]
async fn a_cancelled_scheduled_job_is_never_delivered() -> Result<()> {
    let broker = TestBroker::start().await?;
    let mut client = broker.broker().await;
    let mut delayed = new_job("cancel-later", "k");
    delayed.delay = Some(seconds(0.3));
    let ids = enqueue(&mut client, vec![delayed]).await?;
    assert_eq!(state_of(&mut client, &ids[0]).await?, v1::JobState::Scheduled);
    let job = cancel(&mut client, &ids[0]).await?;
    assert_eq!(job.state, v1::JobState::Cancelled as i32);

    // Well past its time, it still does not arrive.
    let mut worker = Worker::on(&mut client, &["cancel-later"], 5).await?;
    worker.expect_quiet(Duration::from_millis(800)).await?;
    assert_eq!(state_of(&mut client, &ids[0]).await?, v1::JobState::Cancelled);
    broker.finish().await
}

#[tokio::test]
async fn cancelling_a_leased_job_notifies_its_stream_and_frees_the_slot() -> Result<()> {
    let broker = TestBroker::start().await?;
    let mut client = broker.broker().await;
    let ids = enqueue(&mut client, vec![new_job("cancel-leased", "k"), new_job("cancel-leased", "k")]).await?;
    let mut worker = Worker::on(&mut client, &["cancel-leased"], 1).await?;
    let leased = worker.take_jobs(1, WAIT).await?.remove(0);
    assert_eq!(id_of(&leased), ids[0]);
    worker.expect_quiet(Duration::from_millis(200)).await?;

    let job = cancel(&mut client, &ids[0]).await?;
    assert_eq!(job.state, v1::JobState::Cancelled as i32);
    let notice = worker.take_cancel_notice(WAIT).await?;
    assert_eq!(notice.job_id, ids[0]);
    assert_eq!(notice.lease_token, leased.lease_token);

    // The slot is free again: the second job follows the notice.
    let next = worker.take_jobs(1, WAIT).await?.remove(0);
    assert_eq!(id_of(&next), ids[1]);

    // The old lease can no longer settle or extend anything.
    let acks = ack_all(&mut client, vec![ack_of(&leased)]).await?;
    assert_eq!(acks[0].outcome, v1::Outcome::StaleLease as i32);
    let nacks = nack_all(&mut client, vec![nack_of(&leased, "late")]).await?;
    assert_eq!(nacks[0].outcome, v1::Outcome::StaleLease as i32);
    let extended = client
        .extend_lease(v1::ExtendLeaseRequest {
            leases: vec![v1::LeaseExtension {
                job_id: ids[0].clone(),
                lease_token: leased.lease_token.clone(),
                extend_by: Some(seconds(30.0)),
            }],
        })
        .await?
        .into_inner();
    assert_eq!(extended.leases[0].outcome, v1::Outcome::StaleLease as i32);
    assert_eq!(state_of(&mut client, &ids[0]).await?, v1::JobState::Cancelled);
    broker.finish().await
}

#[tokio::test]
async fn cancel_answers_finished_unknown_and_malformed_jobs_with_errors() -> Result<()> {
    let broker = TestBroker::start().await?;
    let mut client = broker.broker().await;
    let ids = enqueue(&mut client, vec![new_job("cancel-errors", "k"), new_job("cancel-errors", "k")]).await?;
    let mut worker = Worker::on(&mut client, &["cancel-errors"], 1).await?;
    let leased = worker.take_jobs(1, WAIT).await?.remove(0);
    ack_all(&mut client, vec![ack_of(&leased)]).await?;
    let completed = id_of(&leased);

    let status = cancel(&mut client, &completed).await.err().context("cancelling a COMPLETED job must fail")?;
    assert_eq!(status.code(), tonic::Code::FailedPrecondition);
    assert_eq!(state_of(&mut client, &completed).await?, v1::JobState::Completed);

    // Cancelling twice: the second finds a CANCELLED job.
    let other = ids.iter().find(|id| **id != completed).context("the other job")?;
    cancel(&mut client, other).await?;
    let status = cancel(&mut client, other).await.err().context("cancelling a CANCELLED job must fail")?;
    assert_eq!(status.code(), tonic::Code::FailedPrecondition);

    let status = cancel(&mut client, "987654321").await.err().context("an unknown id must fail")?;
    assert_eq!(status.code(), tonic::Code::NotFound);

    let status = cancel(&mut client, "not-a-job").await.err().context("a malformed id must fail")?;
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    assert!(status.message().contains("job_id"), "message: {}", status.message());
    broker.finish().await
}

#[tokio::test]
async fn watch_job_follows_a_job_to_completion_and_ends() -> Result<()> {
    let broker = TestBroker::start().await?;
    let mut client = broker.broker().await;
    let ids = enqueue(&mut client, vec![new_job("watched", "k")]).await?;
    let mut updates = watch(&mut client, &ids[0]).await?;
    let first = expect_update(&mut updates, v1::JobState::Available).await?;
    assert_eq!(first.job_id, ids[0]);

    let mut worker = Worker::on(&mut client, &["watched"], 1).await?;
    let leased = worker.take_jobs(1, WAIT).await?.remove(0);
    let during = expect_update(&mut updates, v1::JobState::Leased).await?;
    assert_eq!(during.attempt, 1);

    let mut ack = ack_of(&leased);
    ack.result = b"42".to_vec();
    ack_all(&mut client, vec![ack]).await?;
    let last = expect_update(&mut updates, v1::JobState::Completed).await?;
    assert_eq!(last.result, b"42");
    assert!(next_update(&mut updates, WAIT).await?.is_none(), "the watch ends at a terminal state");
    broker.finish().await
}

#[tokio::test]
async fn watch_job_sees_a_delayed_job_become_available() -> Result<()> {
    let broker = TestBroker::start().await?;
    let mut client = broker.broker().await;
    let mut delayed = new_job("watched-later", "k");
    delayed.delay = Some(seconds(0.5));
    let ids = enqueue(&mut client, vec![delayed]).await?;
    let mut updates = watch(&mut client, &ids[0]).await?;
    expect_update(&mut updates, v1::JobState::Scheduled).await?;
    expect_update(&mut updates, v1::JobState::Available).await?;

    // And a cancel ends the watch too.
    cancel(&mut client, &ids[0]).await?;
    expect_update(&mut updates, v1::JobState::Cancelled).await?;
    assert!(next_update(&mut updates, WAIT).await?.is_none());
    broker.finish().await
}

#[tokio::test]
async fn watch_job_rejects_unknown_and_malformed_ids() -> Result<()> {
    let broker = TestBroker::start().await?;
    let mut client = broker.broker().await;
    let status = expect_status(client.watch_job(v1::WatchJobRequest { job_id: "123456".into() }).await)?;
    assert_eq!(status.code(), tonic::Code::NotFound);
    let status = expect_status(client.watch_job(v1::WatchJobRequest { job_id: "x".into() }).await)?;
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    broker.finish().await
}

#[tokio::test]
async fn a_cancel_on_another_replica_reaches_the_stream_holding_the_lease() -> Result<()> {
    let first = TestBroker::start().await?;
    let second = first.start_replica().await?;
    let mut on_first = first.broker().await;
    let mut on_second = second.broker().await;
    let ids = enqueue(&mut on_first, vec![new_job("cross-cancel", "k"), new_job("cross-cancel", "k")]).await?;
    let mut worker = Worker::on(&mut on_first, &["cross-cancel"], 1).await?;
    let leased = worker.take_jobs(1, WAIT).await?.remove(0);
    let mut updates = watch(&mut on_first, &id_of(&leased)).await?;
    expect_update(&mut updates, v1::JobState::Leased).await?;

    let job = cancel(&mut on_second, &id_of(&leased)).await?;
    assert_eq!(job.state, v1::JobState::Cancelled as i32);
    let notice = worker.take_cancel_notice(WAIT).await?;
    assert_eq!(notice.job_id, id_of(&leased));
    assert_eq!(notice.lease_token, leased.lease_token);

    // The first replica freed the slot and hands out the other job; its
    // watch saw the change made on the second replica.
    let next = worker.take_jobs(1, WAIT).await?.remove(0);
    assert_ne!(id_of(&next), id_of(&leased));
    assert!(ids.contains(&id_of(&next)));
    expect_update(&mut updates, v1::JobState::Cancelled).await?;
    assert!(next_update(&mut updates, WAIT).await?.is_none());

    worker.close();
    second.finish_keep_database().await?;
    first.finish().await
}
