//! The completed watermark: the largest sequence W such that every job of the
//! queue with sequence <= W is terminal — exact, monotonic, and safe under
//! concurrent enqueues on several replicas.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{Context, Result};
use tokio::time::Instant;
use tonic::transport::Channel;
use workbroker_api::v1;
use workbroker_api::v1::admin_client::AdminClient;
use workbroker_tests::*;

const WAIT: Duration = Duration::from_secs(5);

async fn watermark(admin: &mut AdminClient<Channel>, queue: &str) -> Result<u64> {
    Ok(stats_of(admin, queue).await?.completed_watermark)
}

/// The watermark recomputed from a full listing of the queue.
fn recompute_watermark(jobs: &[v1::Job]) -> u64 {
    let mut by_sequence: Vec<(u64, bool)> = jobs
        .iter()
        .map(|job| {
            let terminal = [v1::JobState::Completed as i32, v1::JobState::Dead as i32, v1::JobState::Cancelled as i32]
                .contains(&job.state);
            (job.sequence, terminal)
        })
        .collect();
    by_sequence.sort_unstable();
    let last = by_sequence.last().map_or(0, |(sequence, _)| *sequence);
    match by_sequence.iter().find(|(_, terminal)| !terminal) {
        Some((first_unfinished, _)) => first_unfinished - 1,
        None => last,
    }
}

#[tokio::test]
async fn the_watermark_advances_over_the_contiguous_prefix_of_finished_jobs() -> Result<()> {
    let broker = TestBroker::start().await?;
    let mut client = broker.broker().await;
    let mut admin = broker.admin().await;
    admin.configure_queue(v1::ConfigureQueueRequest { queue: "wm".into(), ..Default::default() }).await?;
    assert_eq!(watermark(&mut admin, "wm").await?, 0, "an empty queue");

    let ids = enqueue(&mut client, vec![new_job("wm", "k"), new_job("wm", "k"), new_job("wm", "k")]).await?;
    assert_eq!(watermark(&mut admin, "wm").await?, 0, "nothing done yet");

    let mut worker = Worker::on(&mut client, &["wm"], 3).await?;
    let leased = worker.take_jobs(3, WAIT).await?;
    let lease = |job_id: &str| leased.iter().find(|job| id_of(job) == job_id).map(ack_of).context("job was leased");
    for (position, id) in ids.iter().enumerate() {
        let job = get_job(&mut client, id).await?;
        assert_eq!(job.sequence, position as u64 + 1);
    }

    ack_all(&mut client, vec![lease(&ids[1])?]).await?;
    assert_eq!(watermark(&mut admin, "wm").await?, 0, "job 1 still holds it back");
    ack_all(&mut client, vec![lease(&ids[0])?]).await?;
    assert_eq!(watermark(&mut admin, "wm").await?, 2);
    ack_all(&mut client, vec![lease(&ids[2])?]).await?;
    assert_eq!(watermark(&mut admin, "wm").await?, 3);

    // A new job does not lower it; finishing it moves it on.
    let more = enqueue(&mut client, vec![new_job("wm", "k")]).await?;
    assert_eq!(watermark(&mut admin, "wm").await?, 3);
    let job = worker.take_jobs(1, WAIT).await?.remove(0);
    assert_eq!(id_of(&job), more[0]);
    ack_all(&mut client, vec![ack_of(&job)]).await?;
    assert_eq!(watermark(&mut admin, "wm").await?, 4);
    broker.finish().await
}

#[tokio::test]
async fn dead_and_cancelled_jobs_count_as_finished() -> Result<()> {
    let broker = TestBroker::start().await?;
    let mut client = broker.broker().await;
    let mut admin = broker.admin().await;
    let ids = enqueue(&mut client, vec![new_job("wm", "k"), new_job("wm", "k"), new_job("wm", "k")]).await?;
    client.cancel_job(v1::CancelJobRequest { job_id: ids[1].clone() }).await?;
    assert_eq!(watermark(&mut admin, "wm").await?, 0);

    let mut worker = Worker::on(&mut client, &["wm"], 1).await?;
    let first = worker.take_jobs(1, WAIT).await?.remove(0);
    assert_eq!(id_of(&first), ids[0]);
    let mut nack = nack_of(&first, "fatal");
    nack.permanent = true;
    nack_all(&mut client, vec![nack]).await?;
    assert_eq!(watermark(&mut admin, "wm").await?, 2, "DEAD job 1 and CANCELLED job 2 are both finished");

    let third = worker.take_jobs(1, WAIT).await?.remove(0);
    assert_eq!(id_of(&third), ids[2]);
    ack_all(&mut client, vec![ack_of(&third)]).await?;
    assert_eq!(watermark(&mut admin, "wm").await?, 3);
    let stats = stats_of(&mut admin, "wm").await?;
    assert_eq!((stats.completed, stats.dead, stats.cancelled), (1, 1, 1), "{stats:?}");

    // Redriving the dead job gives it a new sequence; the watermark stays.
    admin.redrive_dead_letters(v1::RedriveDeadLettersRequest { queue: "wm".into(), ..Default::default() }).await?;
    assert_eq!(get_job(&mut client, &ids[0]).await?.sequence, 4);
    assert_eq!(watermark(&mut admin, "wm").await?, 3);
    let again = worker.take_jobs(1, WAIT).await?.remove(0);
    ack_all(&mut client, vec![ack_of(&again)]).await?;
    assert_eq!(watermark(&mut admin, "wm").await?, 4);
    broker.finish().await
}

/// The enqueue barrier (migration 0004): an enqueue that has taken its
/// sequence but not committed holds watermark reads back, so a later
/// enqueue that committed first cannot carry the watermark past it.
#[tokio::test]
async fn a_watermark_read_waits_for_an_enqueue_in_flight() -> Result<()> {
    let broker = TestBroker::start().await?;
    let mut client = broker.broker().await;
    let pool = broker.database.pool().await?;
    let store = workbroker_server::store::Store::from_pool(pool.clone());
    // The queue exists (a queue created by an uncommitted enqueue would hold
    // other enqueues into it until that commits).
    broker
        .admin()
        .await
        .configure_queue(v1::ConfigureQueueRequest { queue: "barrier".into(), ..Default::default() })
        .await?;

    let mut in_flight = pool.begin().await?;
    let (first_sequence,): (i64,) = sqlx::query_as(
        "SELECT sequence FROM workbroker.enqueue_jobs(ARRAY['barrier'], ARRAY['k'], NULL, NULL, NULL, NULL, NULL, \
                NULL, NULL, NULL, NULL, NULL, NULL, '')",
    )
    .fetch_one(&mut *in_flight)
    .await?;
    assert_eq!(first_sequence, 1);
    // A later enqueue is not held back, and commits first.
    let later = client.enqueue(v1::EnqueueRequest { jobs: vec![new_job("barrier", "k")] }).await?.into_inner();
    assert_eq!(later.jobs[0].sequence, 2);
    let mut worker = Worker::on(&mut client, &["barrier"], 1).await?;
    let leased = worker.take_jobs(1, WAIT).await?;
    ack_all(&mut client, leased.iter().map(ack_of).collect()).await?;

    // Job 2 is done and job 1 is not visible yet: a read now would say 2.
    let queues = vec!["barrier".to_owned()];
    let read = tokio::spawn(async move { store.queue_watermarks(&queues).await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!read.is_finished(), "the watermark read must wait for the enqueue in flight");
    in_flight.commit().await?;
    let watermarks = read.await??;
    let read = watermarks.get("barrier").context("the queue's watermark")?;
    assert_eq!((read.completed_watermark, read.last_sequence), (0, 2));
    pool.close().await;
    broker.finish().await
}

#[tokio::test]
async fn sequence_gaps_from_deduplicated_enqueues_do_not_stall_the_watermark() -> Result<()> {
    let broker = TestBroker::start().await?;
    let mut client = broker.broker().await;
    let mut admin = broker.admin().await;
    let mut keyed = new_job("gaps", "k");
    keyed.dedup_key = "blob:1".into();
    let first = enqueue(&mut client, vec![keyed.clone()]).await?;
    let duplicate = client.enqueue(v1::EnqueueRequest { jobs: vec![keyed.clone()] }).await?.into_inner();
    assert!(duplicate.jobs[0].deduplicated);
    assert_eq!(duplicate.jobs[0].job_id, first[0]);
    let last = enqueue(&mut client, vec![new_job("gaps", "k")]).await?;

    let jobs = list_all_jobs(&mut admin, "gaps", v1::JobState::Unspecified).await?;
    assert_eq!(jobs.len(), 2);
    let stats = stats_of(&mut admin, "gaps").await?;
    assert!(
        stats.last_sequence > jobs.len() as u64,
        "this test expects the deduplicated enqueue to leave a gap: {:?}",
        jobs.iter().map(|job| job.sequence).collect::<Vec<_>>()
    );

    let mut worker = Worker::on(&mut client, &["gaps"], 2).await?;
    let leased = worker.take_jobs(2, WAIT).await?;
    let (of_first, of_last): (Vec<_>, Vec<_>) = leased.iter().partition(|job| id_of(job) == first[0]);
    ack_all(&mut client, of_last.into_iter().map(ack_of).collect()).await?;
    assert_eq!(watermark(&mut admin, "gaps").await?, 0);
    ack_all(&mut client, of_first.into_iter().map(ack_of).collect()).await?;
    let stats = stats_of(&mut admin, "gaps").await?;
    assert_eq!(stats.completed_watermark, stats.last_sequence, "every job is finished, gaps included");
    assert_eq!(get_job(&mut client, &last[0]).await?.sequence, stats.last_sequence);
    broker.finish().await
}

/// Replicas, producer tasks per replica, calls per task, jobs per call.
const REPLICAS: usize = 2;
const TASKS: usize = 8;
const CALLS: usize = 25;
const JOBS_PER_CALL: usize = 2;
const HOLD: &[u8] = b"hold";

/// One Enqueue call as the producer saw it.
struct EnqueueRecord {
    started: Instant,
    job_ids: Vec<String>,
    sequences: Vec<u64>,
}

/// One GetQueueStats answer.
struct Observation {
    answered: Instant,
    watermark: u64,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_watermark_is_exact_and_monotonic_under_concurrent_enqueues_on_two_replicas() -> Result<()> {
    let first = TestBroker::start().await?;
    let second = first.start_replica().await?;
    let replicas = [&first, &second];
    let queue = "busy";
    first
        .admin()
        .await
        .configure_queue(v1::ConfigureQueueRequest { queue: queue.into(), ..Default::default() })
        .await?;

    // A worker acks everything except the jobs marked "hold" (enqueued by
    // the last call of some producers), which therefore never finish.
    let mut worker_client = first.broker().await;
    let mut worker = Worker::on(&mut worker_client, &[queue], 200).await?;
    let stop = Arc::new(AtomicBool::new(false));
    let worker_task = {
        let stop = stop.clone();
        let mut client = worker_client.clone();
        tokio::spawn(async move {
            let mut held = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                let jobs = match worker.next_within(Duration::from_millis(50)).await? {
                    Some(v1::lease_response::Response::Jobs(jobs)) => jobs.jobs,
                    Some(other) => anyhow::bail!("unexpected {other:?}"),
                    None => continue,
                };
                let (hold, done): (Vec<_>, Vec<_>) =
                    jobs.into_iter().partition(|job| job.job.as_ref().is_some_and(|job| job.payload == HOLD));
                held.extend(hold);
                if !done.is_empty() {
                    let acks = ack_all(&mut client, done.iter().map(ack_of).collect()).await?;
                    anyhow::ensure!(
                        acks.iter().all(|ack| ack.outcome == v1::Outcome::Ok as i32),
                        "an ack failed: {acks:?}"
                    );
                }
            }
            Ok::<_, anyhow::Error>((worker, held))
        })
    };

    // A poller reads the watermark from both replicas in turn.
    let poller = {
        let stop = stop.clone();
        let mut admins = [first.admin().await, second.admin().await];
        tokio::spawn(async move {
            let mut observations = Vec::new();
            let mut turn = 0;
            while !stop.load(Ordering::Relaxed) {
                let replica_count = admins.len();
                let admin = &mut admins[turn % replica_count];
                turn += 1;
                let watermark = watermark(admin, queue).await?;
                observations.push(Observation { answered: Instant::now(), watermark });
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            Ok::<_, anyhow::Error>(observations)
        })
    };

    let mut producers = Vec::new();
    for (replica_index, replica) in replicas.iter().enumerate() {
        for task in 0..TASKS {
            let mut client = replica.broker().await;
            let holds = replica_index == 1 && task % 2 == 0;
            producers.push(tokio::spawn(async move {
                let mut records = Vec::with_capacity(CALLS);
                for call in 0..CALLS {
                    let jobs = (0..JOBS_PER_CALL)
                        .map(|index| {
                            let mut job = new_job(queue, "k");
                            if holds && call == CALLS - 1 && index == 0 {
                                job.payload = HOLD.to_vec();
                            }
                            job
                        })
                        .collect();
                    let started = Instant::now();
                    let response = client.enqueue(v1::EnqueueRequest { jobs }).await?.into_inner();
                    records.push(EnqueueRecord {
                        started,
                        job_ids: response.jobs.iter().map(|job| job.job_id.clone()).collect(),
                        sequences: response.jobs.iter().map(|job| job.sequence).collect(),
                    });
                }
                Ok::<_, anyhow::Error>(records)
            }));
        }
    }
    let mut records = Vec::new();
    for producer in producers {
        records.extend(producer.await??);
    }
    let total = REPLICAS * TASKS * CALLS * JOBS_PER_CALL;
    let holds = TASKS / 2;

    // Wait until everything but the held jobs is completed.
    let mut admin = first.admin().await;
    let deadline = Instant::now() + WAIT;
    loop {
        let stats = stats_of(&mut admin, queue).await?;
        if stats.completed == (total - holds) as u64 {
            break;
        }
        anyhow::ensure!(Instant::now() < deadline, "only {} of {} jobs completed", stats.completed, total - holds);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stop.store(true, Ordering::Relaxed);
    let observations = poller.await??;
    let (worker, held) = worker_task.await??;
    assert_eq!(held.len(), holds);

    // Sequences: unique, exactly 1..=N, and as the Enqueue responses said.
    let jobs = list_all_jobs(&mut admin, queue, v1::JobState::Unspecified).await?;
    assert_eq!(jobs.len(), total);
    let mut sequences: Vec<u64> = jobs.iter().map(|job| job.sequence).collect();
    sequences.sort_unstable();
    assert_eq!(sequences, (1..=total as u64).collect::<Vec<_>>());
    let listed: std::collections::HashMap<&str, u64> =
        jobs.iter().map(|job| (job.job_id.as_str(), job.sequence)).collect();
    let mut seen_ids = HashSet::new();
    for record in &records {
        for (job_id, sequence) in record.job_ids.iter().zip(&record.sequences) {
            assert!(seen_ids.insert(job_id.clone()), "job id {job_id} twice");
            assert_eq!(listed.get(job_id.as_str()), Some(sequence));
        }
    }

    // The final watermark is exact, on both replicas.
    let expected = recompute_watermark(&jobs);
    let min_held = held.iter().filter_map(|job| job.job.as_ref().map(|job| job.sequence)).min().context("held jobs")?;
    assert_eq!(expected, min_held - 1);
    for replica in replicas {
        let mut admin = replica.admin().await;
        assert_eq!(watermark(&mut admin, queue).await?, expected);
    }

    // It never went backwards, and never passed a job that was enqueued
    // after it was published.
    assert!(observations.len() > 10, "only {} observations", observations.len());
    for pair in observations.windows(2) {
        assert!(
            pair[1].watermark >= pair[0].watermark,
            "the watermark went back from {} to {}",
            pair[0].watermark,
            pair[1].watermark
        );
    }
    assert!(observations.iter().all(|seen| seen.watermark <= expected));
    for record in &records {
        let published_before = observations
            .iter()
            .filter(|seen| seen.answered < record.started)
            .map(|seen| seen.watermark)
            .max()
            .unwrap_or(0);
        for sequence in &record.sequences {
            assert!(
                *sequence > published_before,
                "sequence {sequence} appeared below the watermark {published_before} published before its enqueue"
            );
        }
    }

    worker.close();
    second.finish_keep_database().await?;
    first.finish().await
}
