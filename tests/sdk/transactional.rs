//! The SDK's transactional enqueue: jobs created inside the caller's sqlx
//! transaction exist only if it commits.

use std::time::Duration;

use anyhow::Result;
use sqlx::Connection;
use workbroker_api::v1;
use workbroker_tests::*;
use workbroker_worker_sdk::JobBuilder;
use workbroker_worker_sdk::transactional::{Error, enqueue_in_transaction};

#[tokio::test]
async fn jobs_enqueued_in_a_transaction_exist_only_if_it_commits() -> Result<()> {
    let broker = TestBroker::start().await?;
    let mut connection = sqlx::PgConnection::connect(&broker.database.url).await?;

    let mut rolled_back = connection.begin().await?;
    let gone =
        enqueue_in_transaction(&mut rolled_back, [JobBuilder::new("index", "index").payload(b"x".to_vec())]).await?;
    rolled_back.rollback().await?;

    let mut transaction = connection.begin().await?;
    let jobs = [
        JobBuilder::new("index", "index")
            .payload(b"publish serde".to_vec())
            .ordering_key("serde")
            .dedup_key("publish:serde:1.0.0")
            .priority(3)
            .max_attempts(4)
            .attribute("team", "registry"),
        JobBuilder::new("index", "index").dedup_key("publish:serde:1.0.0"),
        JobBuilder::new("index", "index").delay(Duration::from_secs(3600)),
    ];
    let enqueued = enqueue_in_transaction(&mut transaction, jobs).await?;
    transaction.commit().await?;
    assert_eq!(enqueued.len(), 3);
    assert_eq!(enqueued[0].job_id, enqueued[1].job_id);
    assert!(!enqueued[0].deduplicated && enqueued[1].deduplicated);

    let mut client = broker.broker().await;
    let job = client.get_job(v1::GetJobRequest { job_id: enqueued[0].job_id.clone() }).await?.into_inner();
    assert_eq!(job.payload, b"publish serde");
    assert_eq!((job.priority, job.max_attempts, job.ordering_key.as_str()), (3, 4, "serde"));
    assert_eq!(job.attributes.get("team").map(String::as_str), Some("registry"));
    assert_eq!(state_of(&mut client, &enqueued[2].job_id).await?, v1::JobState::Scheduled);
    let missing = client.get_job(v1::GetJobRequest { job_id: gone[0].job_id.clone() }).await;
    assert_eq!(missing.map(|_| ()).err().map(|status| status.code()), Some(tonic::Code::NotFound));

    // Bad input: the database names the field, and nothing is inserted.
    let refused = enqueue_in_transaction(&mut connection, [JobBuilder::new("index", "index").max_attempts(5000)]).await;
    match refused {
        Err(Error::Database(error)) => {
            let message = error.as_database_error().map(|error| error.message().to_owned()).unwrap_or_default();
            assert!(message.contains("max_attempts"), "{message}");
        }
        other => anyhow::bail!("expected a database error, got {other:?}"),
    }
    broker.finish().await
}
