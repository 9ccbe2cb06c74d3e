//! Transactional enqueue (feature `transactional`): create jobs inside your
//! own PostgreSQL transaction, through the broker's SQL API
//! (`workbroker.enqueue_batch_v1`, installed by `workbroker migrate`). The
//! jobs exist if and only if your transaction commits, and reach waiting
//! workers right after the commit.
//!
//! ```no_run
//! # async fn example(pool: sqlx::PgPool) -> Result<(), Box<dyn std::error::Error>> {
//! use workbroker_worker_sdk::JobBuilder;
//! use workbroker_worker_sdk::transactional::enqueue_in_transaction;
//!
//! let mut transaction = pool.begin().await?;
//! sqlx::query("INSERT INTO versions (krate, num) VALUES ('serde', '1.0.219')").execute(&mut *transaction).await?;
//! let job = JobBuilder::new("index", "index").payload(b"publish serde 1.0.219".to_vec()).ordering_key("serde");
//! let enqueued = enqueue_in_transaction(&mut transaction, [job]).await?;
//! transaction.commit().await?; // a rollback would leave neither the row nor the job
//! println!("job {}", enqueued[0].job_id);
//! # Ok(()) }
//! ```

use sqlx::PgConnection;

use crate::client::JobBuilder;
use crate::trace::{TRACEPARENT, current_traceparent};

/// Why a transactional enqueue failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A job did not pass the SDK's checks.
    #[error(transparent)]
    Job(#[from] crate::client::Error),
    /// The database refused (a refused argument is SQLSTATE 22023 naming the field).
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
    /// The attributes could not be encoded.
    #[error("attributes: {0}")]
    Attributes(#[from] serde_json::Error),
    /// The batch had no job, or more than 1000.
    #[error("a batch has 1 to 1000 jobs, not {0}")]
    BatchSize(usize),
}

/// One enqueued job, in request order.
#[derive(Clone, Debug, PartialEq, Eq, sqlx::FromRow)]
pub struct EnqueuedInTransaction {
    /// The job's id, as the gRPC API shows it.
    pub job_id: String,
    /// True when an unfinished job with the same queue and dedup key was
    /// returned instead of a new one.
    pub deduplicated: bool,
}

fn micros(duration: &prost_types::Duration) -> i64 {
    duration.seconds.saturating_mul(1_000_000).saturating_add(i64::from(duration.nanos / 1_000))
}

/// Enqueues 1 to 1000 jobs on `connection` (a transaction or a connection of
/// the broker's database), all or nothing, injecting the current trace
/// context as `traceparent` like [`crate::Client::enqueue_batch`].
pub async fn enqueue_in_transaction(
    connection: &mut PgConnection,
    jobs: impl IntoIterator<Item = JobBuilder>,
) -> Result<Vec<EnqueuedInTransaction>, Error> {
    let traceparent = current_traceparent().map(|parent| parent.to_string());
    let mut built = Vec::new();
    for job in jobs {
        let mut job = job.build()?;
        if let Some(traceparent) = &traceparent {
            job.attributes.entry(TRACEPARENT.to_owned()).or_insert_with(|| traceparent.clone());
        }
        built.push(job);
    }
    if built.is_empty() || built.len() > 1000 {
        return Err(Error::BatchSize(built.len()));
    }
    let queues: Vec<&str> = built.iter().map(|job| job.queue.as_str()).collect();
    let kinds: Vec<&str> = built.iter().map(|job| job.kind.as_str()).collect();
    let payloads: Vec<&[u8]> = built.iter().map(|job| job.payload.as_slice()).collect();
    let attributes: Vec<String> =
        built.iter().map(|job| serde_json::to_string(&job.attributes)).collect::<Result<_, _>>()?;
    let priorities: Vec<i32> = built.iter().map(|job| job.priority).collect();
    let run_at: Vec<Option<i64>> = built
        .iter()
        .map(|job| {
            job.run_at.as_ref().map(|at| micros(&prost_types::Duration { seconds: at.seconds, nanos: at.nanos }))
        })
        .collect();
    let delays: Vec<Option<i64>> = built.iter().map(|job| job.delay.as_ref().map(micros)).collect();
    let max_attempts: Vec<Option<i32>> = built
        .iter()
        .map(|job| (job.max_attempts > 0).then(|| i32::try_from(job.max_attempts).unwrap_or(i32::MAX)))
        .collect();
    let ordering_keys: Vec<&str> = built.iter().map(|job| job.ordering_key.as_str()).collect();
    let dedup_keys: Vec<&str> = built.iter().map(|job| job.dedup_key.as_str()).collect();
    let leases: Vec<Option<i64>> = built.iter().map(|job| job.lease_duration.as_ref().map(micros)).collect();
    let rows = sqlx::query_as::<_, EnqueuedInTransaction>(
        "SELECT e.job_id, e.deduplicated FROM workbroker.enqueue_batch_v1(ARRAY( \
             SELECT ROW(u.queue, u.kind, u.payload, u.attributes::jsonb, u.priority, \
                        timestamptz 'epoch' + u.run_at_us * interval '1 microsecond', \
                        u.delay_us * interval '1 microsecond', u.max_attempts, \
                        nullif(u.ordering_key, ''), nullif(u.dedup_key, ''), \
                        u.lease_us * interval '1 microsecond')::workbroker.new_job_v1 \
               FROM unnest($1::text[], $2::text[], $3::bytea[], $4::text[], $5::integer[], $6::bigint[], \
                           $7::bigint[], $8::integer[], $9::text[], $10::text[], $11::bigint[]) WITH ORDINALITY \
                    AS u(queue, kind, payload, attributes, priority, run_at_us, delay_us, max_attempts, \
                         ordering_key, dedup_key, lease_us, position) \
              ORDER BY u.position)) AS e",
    )
    .bind(&queues)
    .bind(&kinds)
    .bind(&payloads)
    .bind(&attributes)
    .bind(&priorities)
    .bind(&run_at)
    .bind(&delays)
    .bind(&max_attempts)
    .bind(&ordering_keys)
    .bind(&dedup_keys)
    .bind(&leases)
    .fetch_all(&mut *connection)
    .await?;
    Ok(rows)
}
