//! Bad input gets a clear error naming the field and changes nothing;
//! streams answer per item and stay open.

use std::time::Duration;

use anyhow::{Context, Result};
use workbroker_api::v1;
use workbroker_tests::*;

const WAIT: Duration = Duration::from_secs(3);

fn assert_invalid(status: &tonic::Status, field: &str) {
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "status: {status:?}");
    assert!(status.message().contains(field), "the message should name {field}: {}", status.message());
}

#[tokio::test]
async fn an_enqueue_with_one_bad_job_inserts_nothing() -> Result<()> {
    let broker = TestBroker::start().await?;
    let mut client = broker.broker().await;
    let mut admin = broker.admin().await;
    // An existing queue, to see that nothing is added to it either.
    enqueue(&mut client, vec![new_job("existing", "k")]).await?;

    let status = expect_status(
        client
            .enqueue(v1::EnqueueRequest {
                jobs: vec![new_job("fresh", "k"), new_job("bad queue!", "k"), new_job("existing", "k")],
            })
            .await,
    )?;
    assert_invalid(&status, "jobs[1].queue");

    let status = expect_status(
        client
            .enqueue(v1::EnqueueRequest { jobs: vec![new_job("existing", "k"), new_job("fresh", "has space")] })
            .await,
    )?;
    assert_invalid(&status, "jobs[1].kind");

    let status = expect_status(
        client.enqueue(v1::EnqueueRequest { jobs: vec![new_job("fresh", "k"), new_job(&"q".repeat(129), "k")] }).await,
    )?;
    assert_invalid(&status, "jobs[1].queue");

    // All or nothing: the valid jobs of those requests are nowhere.
    match admin.get_queue_stats(v1::GetQueueStatsRequest { queue: "fresh".into() }).await {
        Err(status) => assert_eq!(status.code(), tonic::Code::NotFound),
        Ok(response) => {
            let stats = response.into_inner().queues;
            assert!(
                stats
                    .iter()
                    .all(|queue| queue.last_sequence == 0 && queue.available + queue.scheduled + queue.leased == 0),
                "{stats:?}"
            );
        }
    }
    let stats = stats_of(&mut admin, "existing").await?;
    assert_eq!(stats.available, 1);
    assert_eq!(stats.last_sequence, 1);
    let listed = list_all_jobs(&mut admin, "existing", v1::JobState::Unspecified).await?;
    assert_eq!(listed.len(), 1);
    broker.finish().await
}

#[tokio::test]
async fn a_payload_over_the_default_limit_is_refused() -> Result<()> {
    let broker = TestBroker::start().await?;
    let mut client = broker.broker().await;
    let mut big = new_job("big", "k");
    big.payload = vec![7; 1024 * 1024 + 1];
    let status = expect_status(client.enqueue(v1::EnqueueRequest { jobs: vec![big] }).await)?;
    assert_invalid(&status, "jobs[0].payload");

    let mut exactly = new_job("big", "k");
    exactly.payload = vec![7; 1024 * 1024];
    let ids = enqueue(&mut client, vec![exactly]).await?;
    assert_eq!(get_job(&mut client, &ids[0]).await?.payload.len(), 1024 * 1024);
    broker.finish().await
}

#[tokio::test]
async fn the_payload_limit_is_configurable_and_covers_ack_results() -> Result<()> {
    let database = TestDatabase::create().await?;
    let mut config = test_config(&database.url);
    config.limits.max_payload_bytes = 1024;
    let broker = TestBroker::start_with(database, config).await?;
    let mut client = broker.broker().await;

    let mut small = new_job("small", "k");
    small.payload = vec![1; 1024];
    let mut big = new_job("small", "k");
    big.payload = vec![1; 1025];
    let status = expect_status(client.enqueue(v1::EnqueueRequest { jobs: vec![small.clone(), big] }).await)?;
    assert_invalid(&status, "jobs[1].payload");

    enqueue(&mut client, vec![small]).await?;
    let mut worker = Worker::on(&mut client, &["small"], 1).await?;
    let leased = worker.take_jobs(1, WAIT).await?.remove(0);
    let mut too_big = ack_of(&leased);
    too_big.result = vec![0; 1025];
    let outcomes = ack_all(&mut client, vec![too_big, ack_of(&leased)]).await?;
    assert_eq!(outcomes[0].outcome, v1::Outcome::Invalid as i32);
    assert!(outcomes[0].message.contains("result"), "{}", outcomes[0].message);
    assert_eq!(outcomes[1].outcome, v1::Outcome::Ok as i32);
    broker.finish().await
}

#[tokio::test]
async fn enqueue_needs_one_to_a_thousand_jobs() -> Result<()> {
    let broker = TestBroker::start().await?;
    let mut client = broker.broker().await;
    let status = expect_status(client.enqueue(v1::EnqueueRequest { jobs: vec![] }).await)?;
    assert_invalid(&status, "jobs");

    let status = expect_status(client.enqueue(v1::EnqueueRequest { jobs: vec![new_job("many", "k"); 1001] }).await)?;
    assert_invalid(&status, "jobs");
    let mut admin = broker.admin().await;
    let status = expect_status(admin.get_queue_stats(v1::GetQueueStatsRequest { queue: "many".into() }).await)?;
    assert_eq!(status.code(), tonic::Code::NotFound);

    let ids = enqueue(&mut client, vec![new_job("many", "k"); 1000]).await?;
    assert_eq!(ids.len(), 1000);
    broker.finish().await
}

#[tokio::test]
async fn run_at_and_delay_together_are_refused() -> Result<()> {
    let broker = TestBroker::start().await?;
    let mut client = broker.broker().await;
    let mut both = new_job("timed", "k");
    both.run_at = Some(workbroker_api::time::timestamp_now());
    both.delay = Some(seconds(5.0));
    let status = expect_status(client.enqueue(v1::EnqueueRequest { jobs: vec![both] }).await)?;
    assert_invalid(&status, "jobs[0].run_at");

    let mut negative = new_job("timed", "k");
    negative.delay = Some(prost_types::Duration { seconds: -1, nanos: 0 });
    let status = expect_status(client.enqueue(v1::EnqueueRequest { jobs: vec![negative] }).await)?;
    assert_invalid(&status, "jobs[0].delay");
    broker.finish().await
}

#[tokio::test]
async fn a_lease_stream_must_start_with_open() -> Result<()> {
    let broker = TestBroker::start().await?;
    let mut client = broker.broker().await;
    let credit_first = v1::LeaseRequest { request: Some(v1::lease_request::Request::Credit(v1::Credit { count: 1 })) };
    let status = match client.lease(tokio_stream::iter(vec![credit_first])).await {
        Err(status) => status,
        // Some transports report the status on the first read instead.
        Ok(response) => match response.into_inner().message().await {
            Err(status) => status,
            Ok(message) => anyhow::bail!("expected an error, got {message:?}"),
        },
    };
    assert_invalid(&status, "open");
    broker.finish().await
}

#[tokio::test]
async fn open_lease_with_an_empty_window_is_refused() -> Result<()> {
    let broker = TestBroker::start().await?;
    let mut client = broker.broker().await;
    let result = Worker::open(
        &mut client,
        v1::OpenLease { worker_id: "w".into(), queues: vec!["q".into()], max_in_flight: 0, ..Default::default() },
    )
    .await;
    let error = match result {
        Ok(_) => anyhow::bail!("max_in_flight 0 must be refused"),
        Err(error) => error,
    };
    let status = error
        .downcast_ref::<tonic::Status>()
        .ok_or_else(|| anyhow::anyhow!("expected a gRPC status, got {error:?}"))?;
    assert_invalid(status, "max_in_flight");
    broker.finish().await
}

const LOST_STATUS_BUG: &str = "broker bug: a Lease stream ended for a protocol violation after open \
                               closes without its INVALID_ARGUMENT status (lease_responses in \
                               server/src/service/broker.rs finishes on the closed event channel \
                               before reading the end status)";

fn open_request(worker_id: &str, queue: &str) -> v1::lease_request::Request {
    v1::lease_request::Request::Open(v1::OpenLease {
        worker_id: worker_id.into(),
        queues: vec![queue.into()],
        max_in_flight: 1,
        ..Default::default()
    })
}

#[tokio::test]
async fn a_second_open_ends_the_stream_and_releases_its_leases() -> Result<()> {
    let broker = TestBroker::start().await?;
    let mut client = broker.broker().await;
    let ids = enqueue(&mut client, vec![new_job("twice", "k")]).await?;
    let mut worker = Worker::on(&mut client, &["twice"], 1).await?;
    let leased = worker.take_jobs(1, WAIT).await?.remove(0);
    worker.send(open_request("again", "twice"))?;
    // The stream ends (how it ends is checked by the next, ignored, test).
    let _ = worker.next_within(WAIT).await;

    // The stream is gone, so its lease is back in the queue.
    wait_for_state(&mut client, &ids[0], v1::JobState::Available, WAIT).await?;
    let late = ack_all(&mut client, vec![ack_of(&leased)]).await?;
    assert_eq!(late[0].outcome, v1::Outcome::StaleLease as i32);
    broker.finish().await
}

#[tokio::test]
async fn a_second_open_is_answered_with_invalid_argument() -> Result<()> {
    let broker = TestBroker::start().await?;
    let mut client = broker.broker().await;
    enqueue(&mut client, vec![new_job("twice", "k")]).await?;
    let mut worker = Worker::on(&mut client, &["twice"], 1).await?;
    worker.take_jobs(1, WAIT).await?;
    worker.send(open_request("again", "twice"))?;
    let status = worker.expect_error_status(WAIT).await.context(LOST_STATUS_BUG)?;
    assert_invalid(&status, "open");
    broker.finish().await
}

// Same code path as the test above, but with no lease held the race is
// (in practice) won by the status.
#[tokio::test]
async fn a_zero_credit_is_answered_with_invalid_argument() -> Result<()> {
    let broker = TestBroker::start().await?;
    let mut client = broker.broker().await;
    let mut worker = Worker::on(&mut client, &["credits"], 1).await?;
    worker.credit(0)?;
    let status = worker.expect_error_status(WAIT).await.context(LOST_STATUS_BUG)?;
    assert_invalid(&status, "credit.count");
    broker.finish().await
}

#[tokio::test]
async fn a_bad_item_in_an_ack_stream_is_answered_alone() -> Result<()> {
    let broker = TestBroker::start().await?;
    let mut client = broker.broker().await;
    enqueue(&mut client, vec![new_job("acks", "k"), new_job("acks", "k"), new_job("acks", "k")]).await?;
    let mut worker = Worker::on(&mut client, &["acks"], 3).await?;
    let leased = worker.take_jobs(3, WAIT).await?;
    let mut malformed = ack_of(&leased[1]);
    malformed.lease_token = "not-a-token".into();
    let mut bad_id = ack_of(&leased[2]);
    bad_id.job_id = "-5".into();
    let outcomes =
        ack_all(&mut client, vec![ack_of(&leased[0]), malformed, ack_of(&leased[1]), bad_id, ack_of(&leased[2])])
            .await?;
    let codes: Vec<i32> = outcomes.iter().map(|ack| ack.outcome).collect();
    assert_eq!(
        codes,
        vec![
            v1::Outcome::Ok as i32,
            v1::Outcome::Invalid as i32,
            v1::Outcome::Ok as i32,
            v1::Outcome::Invalid as i32,
            v1::Outcome::Ok as i32,
        ]
    );
    assert!(outcomes[1].message.contains("lease_token"), "{}", outcomes[1].message);
    assert!(outcomes[3].message.contains("job_id"), "{}", outcomes[3].message);
    assert_eq!(outcomes[1].job_id, id_of(&leased[1]));
    for job in &leased {
        assert_eq!(state_of(&mut client, &id_of(job)).await?, v1::JobState::Completed);
    }
    broker.finish().await
}

#[tokio::test]
async fn a_nack_with_a_negative_retry_after_is_invalid_and_changes_nothing() -> Result<()> {
    let broker = TestBroker::start().await?;
    let mut client = broker.broker().await;
    let ids = enqueue(&mut client, vec![new_job("nacks", "k")]).await?;
    let mut worker = Worker::on(&mut client, &["nacks"], 1).await?;
    let leased = worker.take_jobs(1, WAIT).await?.remove(0);
    let mut negative = nack_of(&leased, "oops");
    negative.retry_after = Some(prost_types::Duration { seconds: -1, nanos: 0 });
    let mut malformed = nack_of(&leased, "oops");
    malformed.lease_token = "zzz".into();
    let outcomes = nack_all(&mut client, vec![negative, malformed]).await?;
    assert_eq!(outcomes[0].outcome, v1::Outcome::Invalid as i32);
    assert!(outcomes[0].message.contains("retry_after"), "{}", outcomes[0].message);
    assert_eq!(outcomes[0].next_state, v1::JobState::Unspecified as i32);
    assert_eq!(outcomes[1].outcome, v1::Outcome::Invalid as i32);
    assert_eq!(state_of(&mut client, &ids[0]).await?, v1::JobState::Leased);
    let acks = ack_all(&mut client, vec![ack_of(&leased)]).await?;
    assert_eq!(acks[0].outcome, v1::Outcome::Ok as i32);
    broker.finish().await
}

#[tokio::test]
async fn extend_lease_names_the_bad_field() -> Result<()> {
    let broker = TestBroker::start().await?;
    let mut client = broker.broker().await;
    let ids = enqueue(&mut client, vec![new_job("extend", "k")]).await?;
    let mut worker = Worker::on(&mut client, &["extend"], 1).await?;
    let leased = worker.take_jobs(1, WAIT).await?.remove(0);
    let before = get_job(&mut client, &ids[0]).await?.lease_expires_at;

    let status = expect_status(
        client
            .extend_lease(v1::ExtendLeaseRequest {
                leases: vec![v1::LeaseExtension {
                    job_id: ids[0].clone(),
                    lease_token: leased.lease_token.clone(),
                    extend_by: None,
                }],
            })
            .await,
    )?;
    assert_invalid(&status, "leases[0].extend_by");

    let status = expect_status(
        client
            .extend_lease(v1::ExtendLeaseRequest {
                leases: vec![
                    v1::LeaseExtension {
                        job_id: ids[0].clone(),
                        lease_token: leased.lease_token.clone(),
                        extend_by: Some(seconds(60.0)),
                    },
                    v1::LeaseExtension {
                        job_id: ids[0].clone(),
                        lease_token: "bad".into(),
                        extend_by: Some(seconds(60.0)),
                    },
                ],
            })
            .await,
    )?;
    assert_invalid(&status, "leases[1].lease_token");
    assert_eq!(get_job(&mut client, &ids[0]).await?.lease_expires_at, before, "a refused request extends nothing");

    let status = expect_status(client.extend_lease(v1::ExtendLeaseRequest { leases: vec![] }).await)?;
    assert_invalid(&status, "leases");
    broker.finish().await
}

#[tokio::test]
async fn list_jobs_pages_in_sequence_order_and_filters_by_state() -> Result<()> {
    let broker = TestBroker::start().await?;
    let mut client = broker.broker().await;
    let mut admin = broker.admin().await;
    let ids = enqueue(&mut client, (0..5).map(|_| new_job("listed", "k")).collect()).await?;

    let status = expect_status(
        admin
            .list_jobs(v1::ListJobsRequest {
                queue: "listed".into(),
                page_token: "garbage".into(),
                ..Default::default()
            })
            .await,
    )?;
    assert_invalid(&status, "page_token");
    let status = expect_status(
        admin.list_jobs(v1::ListJobsRequest { queue: "no such queue!".into(), ..Default::default() }).await,
    )?;
    assert_invalid(&status, "queue");

    let mut pages = Vec::new();
    let mut page_token = String::new();
    loop {
        let page = admin
            .list_jobs(v1::ListJobsRequest { queue: "listed".into(), page_size: 2, page_token, ..Default::default() })
            .await?
            .into_inner();
        pages.push(page.jobs.iter().map(|job| job.job_id.clone()).collect::<Vec<_>>());
        let sequences: Vec<u64> = page.jobs.iter().map(|job| job.sequence).collect();
        assert!(sequences.windows(2).all(|pair| pair[0] < pair[1]));
        if page.next_page_token.is_empty() {
            break;
        }
        anyhow::ensure!(pages.len() < 10, "pagination does not end");
        page_token = page.next_page_token;
    }
    assert_eq!(
        pages,
        vec![vec![ids[0].clone(), ids[1].clone()], vec![ids[2].clone(), ids[3].clone()], vec![ids[4].clone()],]
    );

    // Two leased, one of them completed. The queue is paused first so the
    // slot that ack frees is not filled again.
    let mut worker = Worker::on(&mut client, &["listed"], 2).await?;
    let leased = worker.take_jobs(2, WAIT).await?;
    admin.pause_queue(v1::PauseQueueRequest { queue: "listed".into() }).await?;
    ack_all(&mut client, vec![ack_of(&leased[0])]).await?;
    let ids_in = |jobs: Vec<v1::Job>| -> Vec<String> { jobs.into_iter().map(|job| job.job_id).collect() };
    let completed = ids_in(list_all_jobs(&mut admin, "listed", v1::JobState::Completed).await?);
    assert_eq!(completed, vec![id_of(&leased[0])]);
    let leased_now = ids_in(list_all_jobs(&mut admin, "listed", v1::JobState::Leased).await?);
    assert_eq!(leased_now, vec![id_of(&leased[1])]);
    let available = list_all_jobs(&mut admin, "listed", v1::JobState::Available).await?;
    assert_eq!(available.len(), 3);
    assert!(available.iter().all(|job| job.state == v1::JobState::Available as i32));
    let scheduled = list_all_jobs(&mut admin, "listed", v1::JobState::Scheduled).await?;
    assert!(scheduled.is_empty());
    broker.finish().await
}
