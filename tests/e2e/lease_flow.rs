//! Enqueue, push delivery, windows and credits, fencing, release on stream end.

use std::time::Duration;

use anyhow::Result;
use workbroker_api::v1;
use workbroker_tests::*;

const WAIT: Duration = Duration::from_secs(10);

#[tokio::test]
async fn a_job_goes_from_enqueue_to_completed_with_its_result() -> Result<()> {
    let broker = TestBroker::start().await?;
    let mut client = broker.broker().await;
    let mut job = new_job("emails", "send");
    job.payload = b"hello".to_vec();
    job.attributes.insert("traceparent".into(), "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".into());
    let ids = enqueue(&mut client, vec![job]).await?;
    assert_eq!(state_of(&mut client, &ids[0]).await?, v1::JobState::Available);

    let mut worker = Worker::on(&mut client, &["emails"], 1).await?;
    let leased = worker.take_jobs(1, WAIT).await?;
    let job = leased[0].job.clone().expect("job");
    assert_eq!(job.job_id, ids[0]);
    assert_eq!(job.payload, b"hello");
    assert_eq!(job.state, v1::JobState::Leased as i32);
    assert_eq!(leased[0].attempt, 1);
    assert_eq!(job.sequence, 1);
    assert!(job.attributes.contains_key("traceparent"));
    assert!(!leased[0].lease_token.is_empty());

    let mut ack = ack_of(&leased[0]);
    ack.result = b"done".to_vec();
    let outcomes = ack_all(&mut client, vec![ack.clone(), ack]).await?;
    assert_eq!(outcomes[0].outcome, v1::Outcome::Ok as i32);
    assert_eq!(outcomes[1].outcome, v1::Outcome::Ok as i32, "acking twice with the same token is OK");

    let stored = client.get_job(v1::GetJobRequest { job_id: ids[0].clone() }).await?.into_inner();
    assert_eq!(stored.state, v1::JobState::Completed as i32);
    assert_eq!(stored.result, b"done");
    assert!(stored.finished_at.is_some());
    broker.finish().await
}

#[tokio::test]
async fn a_waiting_worker_gets_a_new_job_pushed_without_polling() -> Result<()> {
    let broker = TestBroker::start().await?;
    let mut client = broker.broker().await;
    let mut worker = Worker::on(&mut client, &["push"], 4).await?;
    worker.expect_quiet(Duration::from_millis(200)).await?;
    enqueue(&mut client, vec![new_job("push", "k")]).await?;
    // The idle re-check runs every 5 s; arriving well before it proves the
    // notification path delivered the job.
    let started = tokio::time::Instant::now();
    worker.take_jobs(1, Duration::from_secs(3)).await?;
    assert!(started.elapsed() < Duration::from_secs(3));
    broker.finish().await
}

#[tokio::test]
async fn a_job_enqueued_on_another_replica_reaches_the_waiting_worker() -> Result<()> {
    let first = TestBroker::start().await?;
    let second = first.start_replica().await?;
    let mut on_first = first.broker().await;
    let mut on_second = second.broker().await;
    let mut worker = Worker::on(&mut on_first, &["cross"], 1).await?;
    worker.expect_quiet(Duration::from_millis(100)).await?;
    enqueue(&mut on_second, vec![new_job("cross", "k")]).await?;
    worker.take_jobs(1, Duration::from_secs(3)).await?;
    second.finish_keep_database().await?;
    first.finish().await
}

#[tokio::test]
async fn the_window_is_max_in_flight_plus_credits_and_acks_free_slots() -> Result<()> {
    let broker = TestBroker::start().await?;
    let mut client = broker.broker().await;
    enqueue(&mut client, (0..8).map(|_| new_job("window", "k")).collect()).await?;
    let mut worker = Worker::on(&mut client, &["window"], 2).await?;
    let first = worker.take_jobs(2, WAIT).await?;
    worker.expect_quiet(Duration::from_millis(300)).await?;

    // An ack frees exactly one slot.
    ack_all(&mut client, vec![ack_of(&first[0])]).await?;
    let third = worker.take_jobs(1, WAIT).await?;
    worker.expect_quiet(Duration::from_millis(300)).await?;

    // A nack frees one too.
    nack_all(&mut client, vec![nack_of(&first[1], "boom")]).await?;
    let fourth = worker.take_jobs(1, WAIT).await?;
    worker.expect_quiet(Duration::from_millis(300)).await?;

    // Credits widen the window.
    worker.credit(3)?;
    let more = worker.take_jobs(3, WAIT).await?;
    worker.expect_quiet(Duration::from_millis(300)).await?;
    let held = 2 + more.len();
    assert_eq!(held, 5);
    drop((third, fourth));
    broker.finish().await
}

#[tokio::test]
async fn only_the_current_token_can_settle_a_job() -> Result<()> {
    let broker = TestBroker::start().await?;
    let mut client = broker.broker().await;
    let ids = enqueue(&mut client, vec![new_job("fence", "k")]).await?;
    let mut worker = Worker::open(
        &mut client,
        v1::OpenLease {
            worker_id: "slow".into(),
            queues: vec!["fence".into()],
            max_in_flight: 1,
            lease_duration: Some(seconds(1.0)),
            ..Default::default()
        },
    )
    .await?;
    let stale = worker.take_jobs(1, WAIT).await?.remove(0);
    // The lease expires and the reaper puts the job back; it is leased again
    // (to the same stream, whose slot is still taken, so use a second one).
    let mut second = Worker::on(&mut client, &["fence"], 1).await?;
    let current = second.take_jobs(1, WAIT).await?.remove(0);
    assert_eq!(id_of(&current), ids[0]);
    assert_ne!(current.lease_token, stale.lease_token);
    assert_eq!(current.attempt, 2);

    let extend = client
        .extend_lease(v1::ExtendLeaseRequest {
            leases: vec![
                v1::LeaseExtension {
                    job_id: ids[0].clone(),
                    lease_token: stale.lease_token.clone(),
                    extend_by: Some(seconds(30.0)),
                },
                v1::LeaseExtension {
                    job_id: ids[0].clone(),
                    lease_token: current.lease_token.clone(),
                    extend_by: Some(seconds(30.0)),
                },
            ],
        })
        .await?
        .into_inner();
    assert_eq!(extend.leases[0].outcome, v1::Outcome::StaleLease as i32);
    assert_eq!(extend.leases[1].outcome, v1::Outcome::Ok as i32);
    assert!(extend.leases[1].lease_expires_at.is_some());

    let nacks = nack_all(&mut client, vec![nack_of(&stale, "late")]).await?;
    assert_eq!(nacks[0].outcome, v1::Outcome::StaleLease as i32);
    let acks = ack_all(&mut client, vec![ack_of(&stale), ack_of(&current), ack_of(&stale)]).await?;
    assert_eq!(acks[0].outcome, v1::Outcome::StaleLease as i32);
    assert_eq!(acks[1].outcome, v1::Outcome::Ok as i32);
    assert_eq!(acks[2].outcome, v1::Outcome::StaleLease as i32);
    assert_eq!(state_of(&mut client, &ids[0]).await?, v1::JobState::Completed);

    let unknown = ack_all(
        &mut client,
        vec![v1::AckRequest { job_id: "999999".into(), lease_token: current.lease_token.clone(), result: vec![] }],
    )
    .await?;
    assert_eq!(unknown[0].outcome, v1::Outcome::NotFound as i32);
    broker.finish().await
}

#[tokio::test]
async fn leases_of_a_stream_that_ends_go_back_at_once() -> Result<()> {
    let broker = TestBroker::start().await?;
    let mut client = broker.broker().await;
    let ids = enqueue(&mut client, vec![new_job("release", "k"), new_job("release", "k")]).await?;
    let mut worker = Worker::on(&mut client, &["release"], 2).await?;
    let held = worker.take_jobs(2, WAIT).await?;
    worker.close();
    for id in &ids {
        // Within a second, not at lease expiry (30 s by default).
        wait_for_state(&mut client, id, v1::JobState::Available, Duration::from_secs(1)).await?;
    }
    let late = ack_all(&mut client, held.iter().map(ack_of).collect()).await?;
    assert!(late.iter().all(|ack| ack.outcome == v1::Outcome::StaleLease as i32));
    let job = client.get_job(v1::GetJobRequest { job_id: ids[0].clone() }).await?.into_inner();
    assert_eq!(job.attempt, 1);
    assert!(job.last_error.contains("stream closed"), "last_error: {}", job.last_error);
    broker.finish().await
}

#[tokio::test]
async fn higher_priority_jobs_are_leased_first() -> Result<()> {
    let broker = TestBroker::start().await?;
    let mut client = broker.broker().await;
    let mut low = new_job("prio", "k");
    low.priority = -5;
    let mut high = new_job("prio", "k");
    high.priority = 10;
    let ids = enqueue(&mut client, vec![low, new_job("prio", "k"), high]).await?;
    let mut worker = Worker::on(&mut client, &["prio"], 1).await?;
    let mut order = Vec::new();
    for _ in 0..3 {
        let job = worker.take_jobs(1, WAIT).await?.remove(0);
        order.push(id_of(&job));
        ack_all(&mut client, vec![ack_of(&job)]).await?;
    }
    assert_eq!(order, vec![ids[2].clone(), ids[1].clone(), ids[0].clone()]);
    broker.finish().await
}

#[tokio::test]
async fn one_enqueue_of_many_jobs_answers_each_job_in_request_order() -> Result<()> {
    let broker = TestBroker::start().await?;
    let mut client = broker.broker().await;
    let mut admin = broker.admin().await;
    // Mixed kinds, priorities, times, attempt limits and attributes in one
    // request (one statement, the lean one: no keys, no worker to hand off
    // to), first over three queues, then all in one queue, which the lean
    // statement numbers without joining each job to its queue (migration
    // 0014): the answer's n-th id must be the n-th job, stored as sent, each
    // queue numbers its jobs in request order, and a job without an attempt
    // limit gets its queue's.
    admin
        .configure_queue(v1::ConfigureQueueRequest {
            queue: "mixed-c".into(),
            max_attempts: Some(7),
            ..Default::default()
        })
        .await?;
    let run_at = prost_types::Timestamp { seconds: 4_102_444_800, nanos: 123_456_000 };
    let batch = |queues: &[&str]| -> Vec<v1::NewJob> {
        (0..60_i32)
            .map(|index| {
                let queue = queues[usize::try_from(index).unwrap_or(0) % queues.len()];
                let mut job = new_job(queue, ["k", "l"][(index % 2) as usize]);
                job.payload = format!("{queue}-job-{index}").into_bytes();
                job.priority = index % 4;
                if index % 5 == 0 {
                    job.delay = Some(seconds(60.0));
                } else if index % 7 == 0 {
                    job.run_at = Some(run_at);
                }
                if index % 4 == 1 {
                    job.max_attempts = 3;
                    job.attributes.insert("index".into(), index.to_string());
                }
                job
            })
            .collect()
    };
    let mut last_sequence: std::collections::HashMap<String, u64> = std::collections::HashMap::new();
    for jobs in [batch(&["mixed-a", "mixed-b", "mixed-c"]), batch(&["mixed-c"])] {
        let answer = client.enqueue(v1::EnqueueRequest { jobs: jobs.clone() }).await?.into_inner().jobs;
        assert_eq!(answer.len(), jobs.len());
        for (job, enqueued) in jobs.iter().zip(&answer) {
            let stored = client.get_job(v1::GetJobRequest { job_id: enqueued.job_id.clone() }).await?.into_inner();
            assert_eq!(stored.payload, job.payload, "job {} answered with another job's id", enqueued.job_id);
            assert_eq!((&stored.queue, &stored.kind, stored.priority), (&job.queue, &job.kind, job.priority));
            assert_eq!(stored.attributes, job.attributes);
            let queue_default = if job.queue == "mixed-c" { 7 } else { 25 };
            assert_eq!(stored.max_attempts, if job.max_attempts == 0 { queue_default } else { job.max_attempts });
            if job.run_at.is_some() {
                assert_eq!(stored.run_at, job.run_at);
                assert_eq!(stored.state, v1::JobState::Scheduled as i32);
            }
            assert_eq!(stored.sequence, enqueued.sequence);
            let previous = last_sequence.insert(job.queue.clone(), enqueued.sequence).unwrap_or(0);
            assert!(enqueued.sequence > previous, "sequences of {} follow the request order", job.queue);
        }
    }
    broker.finish().await
}

#[tokio::test]
async fn jobs_that_set_only_kind_and_payload_are_answered_in_request_order_with_their_queues_defaults() -> Result<()> {
    // Such a batch of one queue goes to the narrowest enqueue statement
    // (migration 0016), which falls back to the one that creates the queue
    // when it does not exist yet. Either way the answer's n-th id must be
    // the n-th job, stored as sent with its queue's defaults (an attempt
    // limit read from the queue's row), numbered in request order. Function
    // statistics tell which statements ran.
    let database = TestDatabase::create().await?;
    let pool = database.pool().await?;
    sqlx::query(sqlx::AssertSqlSafe(format!("ALTER DATABASE {} SET track_functions = 'pl'", database.name)))
        .execute(&pool)
        .await?;
    let config = test_config(&database.url);
    let broker = TestBroker::start_with(database, config).await?;
    let mut client = broker.broker().await;
    let mut admin = broker.admin().await;
    let batch = |round: usize| -> Vec<v1::NewJob> {
        (0..50_usize)
            .map(|index| {
                let mut job = new_job("defaults", ["k", "l", "m"][index % 3]);
                // Round 1 has no payload at all (the array goes as NULL).
                if round != 1 && index % 4 != 0 {
                    job.payload = format!("round-{round}-job-{index}").into_bytes();
                }
                job
            })
            .collect()
    };
    let mut last_sequence = 0;
    for round in 0..3 {
        let max_attempts = if round == 2 {
            admin
                .configure_queue(v1::ConfigureQueueRequest {
                    queue: "defaults".into(),
                    max_attempts: Some(7),
                    ..Default::default()
                })
                .await?;
            7
        } else {
            25
        };
        let jobs = batch(round);
        let answer = client.enqueue(v1::EnqueueRequest { jobs: jobs.clone() }).await?.into_inner().jobs;
        assert_eq!(answer.len(), jobs.len());
        for (job, enqueued) in jobs.iter().zip(&answer) {
            let stored = get_job(&mut client, &enqueued.job_id).await?;
            assert_eq!(stored.payload, job.payload, "job {} answered with another job's id", enqueued.job_id);
            assert_eq!(
                (stored.queue.as_str(), stored.kind.as_str(), stored.priority),
                ("defaults", job.kind.as_str(), 0)
            );
            assert_eq!((stored.state, stored.max_attempts), (v1::JobState::Available as i32, max_attempts));
            assert!(stored.attributes.is_empty());
            assert!(stored.run_at.is_some());
            assert_eq!(stored.sequence, enqueued.sequence);
            assert!(enqueued.sequence > last_sequence, "sequences follow the request order");
            last_sequence = enqueued.sequence;
        }
    }
    // Three calls of the narrow statement; the first created the queue
    // through `enqueue_plain_jobs`; the statement for jobs with options never ran.
    let calls = async || -> Result<Vec<(String, i64)>> {
        let mut connection = pool.acquire().await?;
        sqlx::query("SELECT pg_stat_clear_snapshot()").execute(&mut *connection).await?;
        Ok(sqlx::query_as(
            "SELECT funcname::text, calls FROM pg_stat_user_functions \
              WHERE schemaname = 'workbroker' AND funcname LIKE 'enqueue%jobs' ORDER BY funcname",
        )
        .fetch_all(&mut *connection)
        .await?)
    };
    let expected = vec![("enqueue_default_jobs".to_owned(), 3), ("enqueue_plain_jobs".to_owned(), 1)];
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let mut seen = calls().await?;
    // Backends report their statistics when idle, at most once a second,
    // and one that went idle within a second of its last report waits for
    // its idle timer (10 s).
    while seen != expected && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(250)).await;
        seen = calls().await?;
    }
    assert_eq!(seen, expected);
    pool.close().await;
    broker.finish().await
}

#[tokio::test]
async fn delayed_jobs_wait_for_their_time_then_arrive_promptly() -> Result<()> {
    let broker = TestBroker::start().await?;
    let mut client = broker.broker().await;
    let mut delayed = new_job("later", "k");
    delayed.delay = Some(seconds(0.8));
    let ids = enqueue(&mut client, vec![delayed]).await?;
    assert_eq!(state_of(&mut client, &ids[0]).await?, v1::JobState::Scheduled);
    let mut worker = Worker::on(&mut client, &["later"], 1).await?;
    worker.expect_quiet(Duration::from_millis(500)).await?;
    worker.take_jobs(1, Duration::from_secs(2)).await?;
    broker.finish().await
}

#[tokio::test]
async fn dedup_keys_return_the_unfinished_job() -> Result<()> {
    let broker = TestBroker::start().await?;
    let mut client = broker.broker().await;
    let mut job = new_job("dedup", "k");
    job.dedup_key = "blob:sha256:abc".into();
    let first = client.enqueue(v1::EnqueueRequest { jobs: vec![job.clone(), job.clone()] }).await?.into_inner();
    assert!(!first.jobs[0].deduplicated);
    assert!(first.jobs[1].deduplicated, "a duplicate inside one request");
    assert_eq!(first.jobs[0].job_id, first.jobs[1].job_id);
    let again = client.enqueue(v1::EnqueueRequest { jobs: vec![job.clone()] }).await?.into_inner();
    assert!(again.jobs[0].deduplicated);
    assert_eq!(again.jobs[0].job_id, first.jobs[0].job_id);

    let mut worker = Worker::on(&mut client, &["dedup"], 1).await?;
    let leased = worker.take_jobs(1, WAIT).await?;
    ack_all(&mut client, vec![ack_of(&leased[0])]).await?;
    let after = client.enqueue(v1::EnqueueRequest { jobs: vec![job] }).await?.into_inner();
    assert!(!after.jobs[0].deduplicated, "a finished job no longer holds its key");
    assert_ne!(after.jobs[0].job_id, first.jobs[0].job_id);
    broker.finish().await
}

#[tokio::test]
async fn a_paused_queue_keeps_its_jobs_until_resumed() -> Result<()> {
    let broker = TestBroker::start().await?;
    let mut client = broker.broker().await;
    let mut admin = broker.admin().await;
    let info = admin.pause_queue(v1::PauseQueueRequest { queue: "paused".into() }).await?.into_inner();
    assert!(info.paused);
    enqueue(&mut client, vec![new_job("paused", "k")]).await?;
    let mut worker = Worker::on(&mut client, &["paused"], 1).await?;
    worker.expect_quiet(Duration::from_millis(400)).await?;
    assert!(stats_of(&mut admin, "paused").await?.paused);
    admin.resume_queue(v1::ResumeQueueRequest { queue: "paused".into() }).await?;
    worker.take_jobs(1, Duration::from_secs(3)).await?;
    broker.finish().await
}

#[tokio::test]
async fn kinds_filter_what_a_stream_receives() -> Result<()> {
    let broker = TestBroker::start().await?;
    let mut client = broker.broker().await;
    let ids = enqueue(&mut client, vec![new_job("mixed", "diff"), new_job("mixed", "sync")]).await?;
    let mut worker = Worker::open(
        &mut client,
        v1::OpenLease {
            worker_id: "w".into(),
            queues: vec!["mixed".into()],
            kinds: vec!["sync".into()],
            max_in_flight: 5,
            ..Default::default()
        },
    )
    .await?;
    let jobs = worker.take_jobs(1, WAIT).await?;
    assert_eq!(id_of(&jobs[0]), ids[1]);
    worker.expect_quiet(Duration::from_millis(300)).await?;
    broker.finish().await
}

#[tokio::test]
async fn a_drained_stream_gets_no_more_jobs_and_hands_leftovers_back_without_using_an_attempt() -> Result<()> {
    let broker = TestBroker::start().await?;
    let mut client = broker.broker().await;
    let ids = enqueue(&mut client, (0..4).map(|_| new_job("drain", "k")).collect()).await?;
    let mut worker = Worker::on(&mut client, &["drain"], 2).await?;
    let held = worker.take_jobs(2, WAIT).await?;
    worker.send(v1::lease_request::Request::Drain(v1::Drain {}))?;
    // Acking frees a slot, but a draining stream is not refilled.
    ack_all(&mut client, vec![ack_of(&held[0])]).await?;
    worker.expect_quiet(Duration::from_millis(400)).await?;
    worker.close();
    let leftover = id_of(&held[1]);
    wait_for_state(&mut client, &leftover, v1::JobState::Available, Duration::from_secs(1)).await?;
    let job = client.get_job(v1::GetJobRequest { job_id: leftover.clone() }).await?.into_inner();
    assert_eq!(job.attempt, 0, "a drained stream's leftover lease does not use an attempt");

    // Without a drain, a stream that ends counts the attempt (a crashing worker).
    let mut second = Worker::on(&mut client, &["drain"], 1).await?;
    let taken = second.take_jobs(1, WAIT).await?;
    second.close();
    wait_for_state(&mut client, &id_of(&taken[0]), v1::JobState::Available, Duration::from_secs(1)).await?;
    let job = client.get_job(v1::GetJobRequest { job_id: id_of(&taken[0]) }).await?.into_inner();
    assert_eq!(job.attempt, 1);
    assert_eq!(ids.len(), 4);
    broker.finish().await
}
