//! The hot indexes are led by `workbroker.queue_key(queue)`, a 32-bit hash of
//! the queue name (migration 0013). Two queues whose names hash alike share
//! an index range, and every statement must still see only its own queue's
//! jobs: leases, counts, watermarks, listings, pruning and redrive.

use std::collections::HashSet;
use std::time::Duration;

use anyhow::Result;
use workbroker_api::v1;
use workbroker_server::reaper::{Reaper, ReaperConfig};
use workbroker_server::store::Store;
use workbroker_tests::*;

/// Two names with one key, found by grouping `hashtext('q' || n)` over
/// n = 1..300,000.
const FIRST: &str = "q7169";
const SECOND: &str = "q122757";

const WAIT: Duration = Duration::from_secs(5);

fn id_set(ids: &[String]) -> HashSet<String> {
    ids.iter().cloned().collect()
}

#[tokio::test]
async fn queues_whose_names_hash_alike_keep_their_jobs_apart() -> Result<()> {
    let database = TestDatabase::create().await?;
    let config = config_without_reaper(&database.url);
    let broker = TestBroker::start_with(database, config).await?;
    let pool = broker.database.pool().await?;
    let (first_key, second_key): (i32, i32) =
        sqlx::query_as("SELECT workbroker.queue_key($1), workbroker.queue_key($2)")
            .bind(FIRST)
            .bind(SECOND)
            .fetch_one(&pool)
            .await?;
    assert_eq!(first_key, second_key, "the test needs two names with one key");

    let mut client = broker.broker().await;
    let mut admin = broker.admin().await;
    admin
        .configure_queue(v1::ConfigureQueueRequest {
            queue: FIRST.into(),
            completed_retention: Some(seconds(0.0)),
            ..Default::default()
        })
        .await?;
    let first = enqueue(&mut client, (0..3).map(|_| new_job(FIRST, "k")).collect()).await?;
    let second = enqueue(&mut client, (0..2).map(|_| new_job(SECOND, "k")).collect()).await?;

    let listed = list_all_jobs(&mut admin, FIRST, v1::JobState::Unspecified).await?;
    let listed: Vec<String> = listed.into_iter().map(|job| job.job_id).collect();
    assert_eq!(listed, first, "the listing is the first queue's jobs, in sequence order");
    assert_eq!(stats_of(&mut admin, SECOND).await?.available, 2);

    // A worker of the first queue gets its three jobs and nothing of the second.
    let mut worker = Worker::on(&mut client, &[FIRST], 10).await?;
    let leased = worker.take_jobs(3, WAIT).await?;
    let leased_ids: Vec<String> = leased.iter().map(id_of).collect();
    assert_eq!(id_set(&leased_ids), id_set(&first));
    worker.expect_quiet(Duration::from_millis(300)).await?;
    let by_id = |id: &str| leased.iter().find(|job| id_of(job) == id).cloned();
    let (Some(done), Some(failed)) = (by_id(&first[0]), by_id(&first[1])) else {
        anyhow::bail!("the first queue's jobs were leased");
    };
    ack_all(&mut client, vec![ack_of(&done)]).await?;
    let mut nack = nack_of(&failed, "fatal");
    nack.permanent = true;
    nack_all(&mut client, vec![nack]).await?;

    // The second queue: one completed (kept an hour), one dead.
    let mut other = Worker::on(&mut client, &[SECOND], 10).await?;
    let other_leased = other.take_jobs(2, WAIT).await?;
    let other_ids: Vec<String> = other_leased.iter().map(id_of).collect();
    assert_eq!(id_set(&other_ids), id_set(&second));
    let completed = other_leased.iter().find(|job| id_of(job) == second[0]).map(ack_of);
    let dead = other_leased.iter().find(|job| id_of(job) == second[1]).map(|job| {
        let mut nack = nack_of(job, "fatal");
        nack.permanent = true;
        nack
    });
    ack_all(&mut client, completed.into_iter().collect()).await?;
    nack_all(&mut client, dead.into_iter().collect()).await?;

    // Sequences 1 (completed) and 2 (dead) are done, 3 is leased.
    let stats = stats_of(&mut admin, FIRST).await?;
    assert_eq!((stats.leased, stats.completed, stats.dead, stats.completed_watermark), (1, 1, 1, 2));
    let stats = stats_of(&mut admin, SECOND).await?;
    assert_eq!((stats.available, stats.completed, stats.dead, stats.completed_watermark), (0, 1, 1, 2));
    let dead_first = list_all_jobs(&mut admin, FIRST, v1::JobState::Dead).await?;
    assert_eq!(dead_first.iter().map(|job| job.job_id.clone()).collect::<Vec<_>>(), [first[1].clone()]);

    // Pruning takes the first queue's completed job (no retention) and
    // leaves the second's (an hour).
    tokio::time::sleep(Duration::from_millis(20)).await;
    let counts =
        Reaper::new(Store::from_pool(pool), ReaperConfig { interval: Duration::from_secs(3600), batch_size: 100 })
            .run_once()
            .await?;
    assert_eq!(counts.pruned, 1, "{counts:?}");
    let status = expect_status(client.get_job(v1::GetJobRequest { job_id: first[0].clone() }).await)?;
    assert_eq!(status.code(), tonic::Code::NotFound);
    assert_eq!(state_of(&mut client, &second[0]).await?, v1::JobState::Completed);

    // Redriving the first queue revives its dead job only.
    let redriven = admin
        .redrive_dead_letters(v1::RedriveDeadLettersRequest { queue: FIRST.into(), ..Default::default() })
        .await?
        .into_inner();
    assert_eq!(redriven.job_ids, [first[1].clone()]);
    assert_eq!(state_of(&mut client, &second[1]).await?, v1::JobState::Dead);
    let again = worker.take_jobs(1, WAIT).await?;
    assert_eq!(id_of(&again[0]), first[1]);
    other.expect_quiet(Duration::from_millis(300)).await?;
    worker.close();
    other.close();
    broker.finish().await
}
