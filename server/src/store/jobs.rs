//! Job statements: enqueue, lease, ack, nack, extend, release, expire, cancel,
//! redrive, prune, read.
//!
//! Settles find their job by `id` and `lease_token` alone, never with
//! `state = 3` beside them: a job has a token exactly while it is LEASED
//! (the table's check constraint), so the state adds nothing, and it would
//! let the planner answer from the partial index of leased jobs instead of
//! probing the primary key. With statistics taken while nothing was leased
//! (a paused queue filling up) that index looks one row long, and the
//! cached plan of every ack then walked all leased jobs for each batch: a
//! million-job backlog drained at 2,600 jobs/s instead of 20,000.

use std::collections::HashMap;
use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::PgConnection;
use uuid::Uuid;

use super::{
    AckItem, CancelResult, EnqueuedRecord, Error, ExtendItem, ExtendResult, HandedOff, Handoff, HeldLease, JobRecord,
    LeaseParams, ListParams, NackItem, NackResult, NewJobRecord, ReleaseAttempt, Result, ReturnedJob, RunAt,
    SettleOutcome, Settled, Store,
};

/// One notification per payload (`$2`) on a channel (`$1`), committed
/// asynchronously ([`Store::notify_many`] says why).
const NOTIFY_MANY: &str = "SELECT set_config('synchronous_commit', 'off', true), pg_notify($1, p.payload) \
                           FROM unnest($2::text[]) AS p(payload)";

/// The enqueue of a plain batch (migration 0015).
const ENQUEUE_PLAIN_JOBS: &str =
    "SELECT * FROM workbroker.enqueue_known_queue_jobs($1, $2, $3, $4, $5, $6, $7, $8, $9)";

/// The enqueue of a plain batch of one queue whose jobs set nothing but a
/// kind and a payload (migration 0016).
const ENQUEUE_DEFAULT_JOBS: &str = "SELECT * FROM workbroker.enqueue_default_jobs($1, $2, $3)";

/// Columns of a job read from the `all_jobs` view (public state included).
macro_rules! job_fields {
    () => {
        "j.id, j.queue, j.kind, j.state, j.priority, j.sequence, j.run_at, j.created_at, j.attempt, \
         j.max_attempts, j.ordering_key, j.dedup_key, j.lease_token, j.lease_expires_at, j.leased_by, \
         j.last_error, j.payload, j.attributes, j.finished_at, j.result"
    };
}

/// Columns of a job read from the hot `jobs` table (`j`), which has no result yet.
macro_rules! hot_job_fields {
    () => {
        "j.id, j.queue, j.kind, \
         CASE WHEN j.state = 2 AND j.run_at > now() THEN 1::smallint ELSE j.state END AS state, \
         j.priority, j.sequence, j.run_at, j.created_at, j.attempt, j.max_attempts, j.ordering_key, \
         j.dedup_key, j.lease_token, j.lease_expires_at, j.leased_by, j.last_error, j.payload, \
         j.attributes, NULL::timestamptz AS finished_at, NULL::bytea AS result"
    };
}

/// `INSERT INTO finished_jobs ... SELECT ... FROM $source`: moves rows that a
/// `DELETE ... RETURNING j.*` produced into the finished table, with the
/// terminal state, last error and result given as SQL expressions.
macro_rules! insert_finished {
    ($source:literal, $state:literal, $last_error:literal, $result:literal) => {
        concat!(
            "INSERT INTO workbroker.finished_jobs (id, queue, kind, state, priority, sequence, run_at, \
             created_at, attempt, max_attempts, ordering_key, dedup_key, shard, lease_duration, \
             lease_token, lease_expires_at, leased_by, leased_at, last_error, payload, attributes, \
             finished_at, result) \
             SELECT id, queue, kind, ",
            $state,
            ", priority, sequence, run_at, created_at, attempt, \
             max_attempts, ordering_key, dedup_key, shard, lease_duration, lease_token, \
             lease_expires_at, leased_by, leased_at, ",
            $last_error,
            ", payload, attributes, now(), ",
            $result,
            " FROM ",
            $source
        )
    };
}

/// A CTE `counted` that adds the rows `$source` inserted into
/// `finished_jobs` (it must return `queue` and `state`) to the counters
/// (migration 0011): one upsert per queue and state, in that order so
/// concurrent statements cannot deadlock on them. A data-modifying CTE runs
/// to completion whether or not the statement reads it.
macro_rules! count_finished {
    ($source:literal) => {
        concat!(
            "counted AS (INSERT INTO workbroker.finished_counts AS c (queue, state, slot, count) \
               SELECT n.queue, n.state, (pg_backend_pid() % 64)::smallint, count(*) FROM ",
            $source,
            " n GROUP BY n.queue, n.state ORDER BY n.queue, n.state \
             ON CONFLICT (queue, state, slot) DO UPDATE SET count = c.count + excluded.count)"
        )
    };
}

/// Hands leases back to the queue, or to DEAD when their attempts are used up,
/// answering one row per moved job `(id, queue, traceparent, dead)`.
/// `$targets` is a CTE body yielding `(id, token)` of the leases to return;
/// `$2` is the error recorded on each job; `$refund` a SQL boolean: true
/// gives the lease's attempt back (the job was handed back unworked). Wakes
/// the queues that got work back, including where a job that went DEAD
/// released its ordering key.
macro_rules! return_leases {
    ($targets:literal, $refund:literal) => {
        concat!(
            "WITH targets AS (",
            $targets,
            "), \
             eligible AS ( \
                 SELECT j.id, t.token, NOT ",
            $refund,
            " AND j.attempt >= j.max_attempts AS to_dead \
                   FROM targets t JOIN workbroker.jobs j \
                     ON j.id = t.id AND j.lease_token = t.token), \
             requeued AS ( \
                 UPDATE workbroker.jobs j \
                    SET state = 2, run_at = now(), lease_token = NULL, lease_expires_at = NULL, \
                        leased_by = NULL, leased_at = NULL, last_error = $2, \
                        attempt = CASE WHEN ",
            $refund,
            " THEN greatest(j.attempt - 1, 0) ELSE j.attempt END \
                   FROM eligible e \
                  WHERE j.id = e.id AND NOT e.to_dead AND j.lease_token = e.token \
                 RETURNING j.id, j.queue, j.attributes ->> 'traceparent' AS traceparent), \
             killed AS ( \
                 DELETE FROM workbroker.jobs j USING eligible e \
                  WHERE j.id = e.id AND e.to_dead AND j.lease_token = e.token \
                 RETURNING j.*), \
             dead AS (",
            insert_finished!("killed", "5", "$2", "NULL"),
            " RETURNING id, queue, state, ordering_key, attributes ->> 'traceparent' AS traceparent), ",
            count_finished!("dead"),
            ", ",
            clear_key_heads!("dead"),
            ", \
             notified AS ( \
                 SELECT pg_notify('workbroker_jobs', queue) FROM ( \
                     SELECT queue FROM requeued \
                     UNION SELECT queue FROM killed WHERE ordering_key IS NOT NULL) q) \
             SELECT r.id, r.queue, r.traceparent, r.dead \
               FROM (SELECT id, queue, traceparent, false AS dead FROM requeued \
                     UNION ALL SELECT id, queue, traceparent, true AS dead FROM dead) r \
              WHERE (SELECT count(*) FROM notified) >= 0 AND (SELECT count(*) FROM cleared) >= 0 \
              ORDER BY r.id"
        )
    };
}

/// A CTE `cleared` that clears `blocked` on the next job of every ordering
/// key among the jobs `$source` moved out of `workbroker.jobs` (migration
/// 0010); `$source` must return `queue` and `ordering_key`. It aggregates
/// all of `$source`, so it runs once every row is deleted, and only when a
/// moved job had a key. The statement must read `cleared`.
macro_rules! clear_key_heads {
    ($source:literal) => {
        concat!(
            "cleared AS (SELECT workbroker.unblock_key_heads(array_agg(c.queue), array_agg(c.ordering_key)) \
               FROM ",
            $source,
            " c WHERE c.ordering_key IS NOT NULL HAVING count(*) > 0)"
        )
    };
}

/// What `workbroker.enqueue_jobs` says of one job.
#[derive(sqlx::FromRow)]
struct InsertedRow {
    id: i64,
    sequence: i64,
    /// False when an unfinished job held the dedup key.
    inserted: bool,
    /// 1-based place in the function's input.
    place: i64,
    lease_token: Option<Uuid>,
    lease_expires_at: Option<DateTime<Utc>>,
    max_attempts: Option<i32>,
    leased_at: Option<DateTime<Utc>>,
}

impl InsertedRow {
    fn record(&self) -> EnqueuedRecord {
        let handed_off = match (self.lease_token, self.lease_expires_at, self.max_attempts, self.leased_at) {
            (Some(lease_token), Some(lease_expires_at), Some(max_attempts), Some(leased_at)) => {
                Some(HandedOff { lease_token, lease_expires_at, max_attempts, leased_at })
            }
            _ => None,
        };
        EnqueuedRecord { job_id: self.id, sequence: self.sequence, deduplicated: false, handed_off }
    }
}

/// `None` when every value is the default (`is_default`), else the values.
fn unless_all<T>(values: Vec<T>, is_default: impl Fn(&T) -> bool) -> Option<Vec<T>> {
    if values.iter().all(is_default) { None } else { Some(values) }
}

fn micros(duration: Duration) -> i64 {
    i64::try_from(duration.as_micros()).unwrap_or(i64::MAX)
}

/// The per-job arrays of the enqueue functions, one element per job; an
/// array whose every value is the default goes as one NULL (unnest pads it
/// with NULLs): nothing to encode, send or unpack.
struct JobColumns<'a> {
    queues: Vec<&'a str>,
    kinds: Vec<&'a str>,
    priorities: Option<Vec<i32>>,
    run_at_micros: Option<Vec<Option<i64>>>,
    delay_micros: Option<Vec<i64>>,
    max_attempts: Option<Vec<Option<i32>>>,
    ordering_keys: Option<Vec<Option<&'a str>>>,
    dedup_keys: Option<Vec<Option<&'a str>>>,
    lease_micros: Option<Vec<Option<i64>>>,
    payloads: Option<Vec<&'a [u8]>>,
    attributes: Option<Vec<Option<&'a str>>>,
}

impl<'a> JobColumns<'a> {
    /// The columns of `jobs`, in their order.
    fn new(jobs: impl ExactSizeIterator<Item = &'a NewJobRecord>) -> Self {
        let count = jobs.len();
        let mut queues = Vec::with_capacity(count);
        let mut kinds = Vec::with_capacity(count);
        let mut priorities = Vec::with_capacity(count);
        let mut run_at_micros: Vec<Option<i64>> = Vec::with_capacity(count);
        let mut delay_micros: Vec<i64> = Vec::with_capacity(count);
        let mut max_attempts: Vec<Option<i32>> = Vec::with_capacity(count);
        let mut ordering_keys: Vec<Option<&str>> = Vec::with_capacity(count);
        let mut dedup_keys: Vec<Option<&str>> = Vec::with_capacity(count);
        let mut lease_micros: Vec<Option<i64>> = Vec::with_capacity(count);
        let mut payloads: Vec<&[u8]> = Vec::with_capacity(count);
        let mut attributes: Vec<Option<&str>> = Vec::with_capacity(count);
        for job in jobs {
            queues.push(job.queue.as_str());
            kinds.push(job.kind.as_str());
            priorities.push(job.priority);
            match job.run_at {
                RunAt::Now => {
                    run_at_micros.push(None);
                    delay_micros.push(0);
                }
                RunAt::At { unix_micros } => {
                    run_at_micros.push(Some(unix_micros));
                    delay_micros.push(0);
                }
                RunAt::After(delay) => {
                    run_at_micros.push(None);
                    delay_micros.push(micros(delay));
                }
            }
            max_attempts.push(job.max_attempts);
            ordering_keys.push(job.ordering_key.as_deref());
            dedup_keys.push(job.dedup_key.as_deref());
            lease_micros.push(job.lease_duration.map(micros));
            payloads.push(job.payload.as_slice());
            // No attributes (the common case) spares the database a JSON parse.
            attributes.push((job.attributes_json != "{}").then_some(job.attributes_json.as_str()));
        }
        Self {
            queues,
            kinds,
            priorities: unless_all(priorities, |priority| *priority == 0),
            run_at_micros: unless_all(run_at_micros, Option::is_none),
            delay_micros: unless_all(delay_micros, |delay| *delay == 0),
            max_attempts: unless_all(max_attempts, Option::is_none),
            ordering_keys: unless_all(ordering_keys, Option::is_none),
            dedup_keys: unless_all(dedup_keys, Option::is_none),
            lease_micros: unless_all(lease_micros, Option::is_none),
            payloads: unless_all(payloads, |payload| payload.is_empty()),
            attributes: unless_all(attributes, Option::is_none),
        }
    }

    /// The one queue of a batch whose jobs set nothing but their kind and
    /// payload (no priority, time, attempt limit, keys, lease duration or
    /// attributes); `None` for any other batch.
    fn defaults_only(&self) -> Option<&'a str> {
        let first = *self.queues.first()?;
        let defaults = self.priorities.is_none()
            && self.run_at_micros.is_none()
            && self.delay_micros.is_none()
            && self.max_attempts.is_none()
            && self.ordering_keys.is_none()
            && self.dedup_keys.is_none()
            && self.lease_micros.is_none()
            && self.attributes.is_none();
        (defaults && self.queues.iter().all(|queue| *queue == first)).then_some(first)
    }

    /// Binds the columns as the enqueue functions take them: the keys
    /// (ordering, dedup) only for `enqueue_jobs`, whose further arguments
    /// the caller binds after these.
    fn bind<'q, Row>(
        self,
        query: sqlx::query::QueryAs<'q, sqlx::Postgres, Row, sqlx::postgres::PgArguments>,
        keys: KeyColumns,
    ) -> sqlx::query::QueryAs<'q, sqlx::Postgres, Row, sqlx::postgres::PgArguments>
    where
        'a: 'q,
    {
        let query = query
            .bind(self.queues)
            .bind(self.kinds)
            .bind(self.priorities)
            .bind(self.run_at_micros)
            .bind(self.delay_micros)
            .bind(self.max_attempts);
        let query = match keys {
            KeyColumns::With => query.bind(self.ordering_keys).bind(self.dedup_keys),
            KeyColumns::Without => query,
        };
        query.bind(self.lease_micros).bind(self.payloads).bind(self.attributes)
    }
}

/// Whether an enqueue function takes the ordering and dedup key columns.
#[derive(Clone, Copy)]
enum KeyColumns {
    With,
    Without,
}

/// The lease statement (see [`Store::jobs_lease`]); public so that a test
/// can read the plan the hot connections make of it.
pub const JOBS_LEASE_SQL: &str = concat!(
    "WITH open_queues AS ( \
             SELECT name, lease_duration FROM workbroker.queues \
              WHERE name = ANY($1::text[]) AND NOT paused), \
         picked AS ( \
             SELECT c.id, c.priority, c.run_at, q.lease_duration AS queue_lease_duration \
               FROM open_queues q \
               CROSS JOIN LATERAL ( \
                   SELECT j.id, j.priority, j.run_at FROM workbroker.jobs j \
                    WHERE ",
    same_queue!("j.queue", "q.name"),
    " \
                      AND j.state = 2 AND NOT j.blocked AND j.run_at <= now() \
                      AND (cardinality($2::text[]) = 0 OR j.kind = ANY($2::text[])) \
                      AND ($6::integer[] IS NULL OR j.shard = ANY($6::integer[])) \
                      AND (j.ordering_key IS NULL OR NOT EXISTS ( \
                            SELECT 1 FROM workbroker.jobs earlier \
                             WHERE earlier.queue = j.queue AND earlier.ordering_key = j.ordering_key \
                               AND earlier.sequence < j.sequence)) \
                    ORDER BY j.priority DESC, j.run_at, j.id \
                    LIMIT $3 \
                    FOR UPDATE OF j SKIP LOCKED) c \
              ORDER BY c.priority DESC, c.run_at, c.id \
              LIMIT $3), \
         leased AS ( \
             UPDATE workbroker.jobs j \
                SET state = 3, attempt = j.attempt + 1, lease_token = gen_random_uuid(), \
                    lease_expires_at = now() + coalesce($4::bigint * interval '1 microsecond', \
                                                         j.lease_duration, p.queue_lease_duration), \
                    leased_by = $5, leased_at = now() \
               FROM picked p \
              WHERE j.id = p.id AND j.id = ANY (ARRAY(SELECT id FROM picked)) \
             RETURNING j.*) \
         SELECT ",
    hot_job_fields!(),
    " FROM leased j ORDER BY j.priority DESC, j.run_at, j.id"
);

impl Store {
    /// Inserts jobs (all or nothing), numbering them from each queue's
    /// sequence and creating unknown queues. A job whose queue and dedup key
    /// match an unfinished job (or an earlier job of the same batch) is not
    /// inserted: the existing job is returned with `deduplicated`.
    ///
    /// Without dedup keys this is one statement, committed on its own (one
    /// round trip; a lean one when no job has an ordering key and none is
    /// handed off); with dedup keys it is a transaction that looks up the
    /// jobs it collided with.
    ///
    /// `handoffs` (empty, or one per job) names the local lease stream a job
    /// goes to directly: such a job is inserted LEASED to that stream's
    /// worker (unless its queue is paused) and its record carries the lease.
    /// Only the one-statement path hands off.
    ///
    /// Sends no notification: the caller announces the queues that got
    /// waiting jobs once this has returned ([`Store::announce_jobs`]).
    pub async fn jobs_enqueue_many(
        &self,
        jobs: &[NewJobRecord],
        handoffs: &[Option<Handoff<'_>>],
    ) -> Result<Vec<EnqueuedRecord>> {
        let plain = |job: &NewJobRecord| job.dedup_key.is_none() && job.ordering_key.is_none();
        let enqueued = if jobs.iter().all(plain) && handoffs.iter().all(Option::is_none) {
            self.insert_plain_jobs(jobs).await?
        } else if jobs.iter().all(|job| job.dedup_key.is_none()) {
            let all: Vec<usize> = (0..jobs.len()).collect();
            let rows =
                self.batch().run(async |connection| self.insert_jobs(connection, jobs, &all, handoffs).await).await?;
            let rows = rows_in_input_order(rows, all.len(), |row| row.place)?;
            rows.iter().map(InsertedRow::record).collect()
        } else {
            self.jobs_enqueue_with_dedup(jobs).await?
        };
        self.record_inserted(enqueued.len());
        Ok(enqueued)
    }

    async fn jobs_enqueue_with_dedup(&self, jobs: &[NewJobRecord]) -> Result<Vec<EnqueuedRecord>> {
        // Duplicates inside the batch point at their first occurrence.
        let mut first_with_key: HashMap<(&str, &str), usize> = HashMap::new();
        let mut duplicate_of: Vec<Option<usize>> = Vec::with_capacity(jobs.len());
        for (index, job) in jobs.iter().enumerate() {
            let earlier = job.dedup_key.as_deref().and_then(|key| {
                let slot = first_with_key.entry((job.queue.as_str(), key));
                match slot {
                    std::collections::hash_map::Entry::Occupied(entry) => Some(*entry.get()),
                    std::collections::hash_map::Entry::Vacant(entry) => {
                        entry.insert(index);
                        None
                    }
                }
            });
            duplicate_of.push(earlier);
        }
        let mut pending: Vec<usize> =
            duplicate_of.iter().enumerate().filter(|(_, earlier)| earlier.is_none()).map(|(index, _)| index).collect();
        let mut results: Vec<Option<EnqueuedRecord>> = vec![None; jobs.len()];

        let mut transaction = self.pool().begin().await?;
        // A conflicting job can finish between our insert and our look-up; then
        // the insert is simply tried again (bounded). Each try takes fresh
        // sequences; the ones a conflict left unused are harmless gaps.
        for _round in 0..5 {
            if pending.is_empty() {
                break;
            }
            let rows = self.insert_jobs(&mut *transaction, jobs, &pending, &[]).await?;
            let rows = rows_in_input_order(rows, pending.len(), |row| row.place)?;
            let mut conflicted: Vec<usize> = Vec::new();
            for (index, row) in pending.drain(..).zip(rows) {
                if row.inserted {
                    results[index] = Some(row.record());
                } else {
                    conflicted.push(index);
                }
            }
            if conflicted.is_empty() {
                break;
            }
            let queues: Vec<&str> = conflicted.iter().map(|index| jobs[*index].queue.as_str()).collect();
            let keys: Vec<&str> =
                conflicted.iter().map(|index| jobs[*index].dedup_key.as_deref().unwrap_or_default()).collect();
            let existing: Vec<(String, String, i64, i64)> = sqlx::query_as(
                "SELECT j.queue, j.dedup_key, j.id, j.sequence FROM workbroker.jobs j \
                 JOIN unnest($1::text[], $2::text[]) AS i(queue, dedup_key) \
                   ON j.queue = i.queue AND j.dedup_key = i.dedup_key",
            )
            .bind(&queues)
            .bind(&keys)
            .fetch_all(&mut *transaction)
            .await?;
            let existing: HashMap<(String, String), (i64, i64)> =
                existing.into_iter().map(|(queue, key, id, sequence)| ((queue, key), (id, sequence))).collect();
            for index in conflicted {
                let job = &jobs[index];
                let key = (job.queue.clone(), job.dedup_key.clone().unwrap_or_default());
                match existing.get(&key) {
                    Some((job_id, existing_sequence)) => {
                        results[index] = Some(EnqueuedRecord {
                            job_id: *job_id,
                            sequence: *existing_sequence,
                            deduplicated: true,
                            handed_off: None,
                        })
                    }
                    None => pending.push(index),
                }
            }
        }
        if !pending.is_empty() {
            return Err(Error::Conflict("dedup key kept changing hands during enqueue".to_owned()));
        }
        transaction.commit().await?;

        let mut output = Vec::with_capacity(jobs.len());
        for (index, earlier) in duplicate_of.iter().enumerate() {
            let record = match earlier {
                Some(first) => results[*first].map(|first| EnqueuedRecord { deduplicated: true, ..first }),
                None => results[index],
            };
            let Some(record) = record else {
                return Err(Error::Conflict("enqueue lost track of a job".to_owned()));
            };
            output.push(record);
        }
        Ok(output)
    }

    /// Inserts `jobs[index]` for each of `indexes` with one call of
    /// `workbroker.enqueue_jobs` (migration 0004): creates unknown queues,
    /// takes their enqueue barrier, numbers, inserts (handing off as
    /// `handoffs[index]` says, when given; skipping dedup-key collisions),
    /// without notifying (migration 0007). Answers in the order of `indexes`.
    async fn insert_jobs<'e>(
        &self,
        executor: impl sqlx::PgExecutor<'e>,
        jobs: &[NewJobRecord],
        indexes: &[usize],
        handoffs: &[Option<Handoff<'_>>],
    ) -> sqlx::Result<Vec<InsertedRow>> {
        let count = indexes.len();
        let mut handoff_workers: Vec<Option<&str>> = Vec::with_capacity(count);
        let mut handoff_lease_micros: Vec<Option<i64>> = Vec::with_capacity(count);
        for index in indexes {
            let handoff = handoffs.get(*index).copied().flatten();
            handoff_workers.push(handoff.map(|handoff| handoff.worker_id));
            handoff_lease_micros.push(handoff.and_then(|handoff| handoff.lease_duration).map(micros));
        }
        let columns = JobColumns::new(indexes.iter().map(|index| &jobs[*index]));
        let query = sqlx::query_as(
            "SELECT * FROM workbroker.enqueue_jobs($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14)",
        );
        columns
            .bind(query, KeyColumns::With)
            .bind(unless_all(handoff_workers, Option::is_none))
            .bind(unless_all(handoff_lease_micros, Option::is_none))
            .bind(None::<&str>)
            .fetch_all(executor)
            .await
    }

    /// Inserts `jobs`, none of which has an ordering key or a dedup key, as
    /// waiting jobs with one call of `workbroker.enqueue_known_queue_jobs`
    /// (migration 0015; for a batch of one existing queue, otherwise
    /// `enqueue_plain_jobs` of migrations 0012 and 0014), which does what
    /// `enqueue_jobs` does for such jobs with a narrower statement; a batch
    /// of one queue whose jobs set only kind and payload goes to the
    /// narrower still `enqueue_default_jobs` (migration 0016). Answers in
    /// the order of `jobs`.
    async fn insert_plain_jobs(&self, jobs: &[NewJobRecord]) -> Result<Vec<EnqueuedRecord>> {
        let count = jobs.len();
        let columns = JobColumns::new(jobs.iter());
        let query = match columns.defaults_only() {
            Some(queue) => sqlx::query_as(ENQUEUE_DEFAULT_JOBS).bind(queue).bind(columns.kinds).bind(columns.payloads),
            None => columns.bind(sqlx::query_as(ENQUEUE_PLAIN_JOBS), KeyColumns::Without),
        };
        let rows: Vec<(i64, i64)> = self.batch().run(async |connection| query.fetch_all(connection).await).await?;
        // Ids are drawn in input order, so id order is input order.
        Ok(rows_in_input_order(rows, count, |(id, _)| *id)?
            .into_iter()
            .map(|(job_id, sequence)| EnqueuedRecord { job_id, sequence, deduplicated: false, handed_off: None })
            .collect())
    }

    /// Leases up to `limit` available jobs of the given queues (and kinds),
    /// highest priority first, then by run_at. A job with an ordering key is
    /// eligible only when no earlier unfinished job of its queue has that key.
    /// Paused queues are skipped. Each lease gets a fresh token.
    ///
    /// Jobs marked `blocked` (known not to be their key's head, migration
    /// 0009) are not in the waiting index and never read; every other keyed
    /// candidate is still checked, since an unblocked keyed job is only
    /// probably its key's head.
    pub async fn jobs_lease(&self, params: &LeaseParams<'_>) -> Result<Vec<JobRecord>> {
        let query = sqlx::query_as::<_, JobRecord>(JOBS_LEASE_SQL)
            .bind(params.queues)
            .bind(params.kinds)
            .bind(i64::from(params.limit))
            .bind(params.lease_duration.map(micros))
            .bind(params.worker_id)
            .bind(params.shards);
        Ok(self.hot.run(async |connection| query.fetch_all(connection).await).await?)
    }

    /// Time until the next waiting job of these queues (and kinds) becomes
    /// due, or `None` when nothing is scheduled.
    ///
    /// The waiting index is ordered by priority before run_at, so "the
    /// earliest future run_at" is found per priority: the distinct
    /// priorities of a queue's waiting jobs are walked down the index (a
    /// skip scan written as a recursive query), and for each one the first
    /// run_at after now is one index probe. Cost: a few probes per priority
    /// in use, however many jobs wait (a plain min(run_at) read them all).
    /// Blocked jobs do not count: the finish of their key's head wakes the
    /// queue.
    pub async fn jobs_next_due(&self, queues: &[String], kinds: &[String]) -> Result<Option<Duration>> {
        let query = sqlx::query_scalar(concat!(
            "WITH RECURSIVE priorities AS ( \
                 SELECT q.name AS queue, \
                        (SELECT j.priority FROM workbroker.jobs j \
                          WHERE ",
            same_queue!("j.queue", "q.name"),
            " \
                            AND j.state = 2 AND NOT j.blocked \
                          ORDER BY j.priority DESC LIMIT 1) AS priority \
                   FROM unnest($1::text[]) AS q(name) \
                 UNION ALL \
                 SELECT p.queue, \
                        (SELECT j.priority FROM workbroker.jobs j \
                          WHERE ",
            same_queue!("j.queue", "p.queue"),
            " \
                            AND j.state = 2 AND NOT j.blocked AND j.priority < p.priority \
                          ORDER BY j.priority DESC LIMIT 1) \
                   FROM priorities p WHERE p.priority IS NOT NULL) \
             SELECT (extract(epoch FROM min(due.run_at) - now()) * 1e6)::bigint \
               FROM priorities p \
               CROSS JOIN LATERAL ( \
                   SELECT j.run_at FROM workbroker.jobs j \
                    WHERE ",
            same_queue!("j.queue", "p.queue"),
            " \
                      AND j.state = 2 AND NOT j.blocked AND j.priority = p.priority \
                      AND j.run_at > now() \
                      AND (cardinality($2::text[]) = 0 OR j.kind = ANY($2::text[])) \
                    ORDER BY j.run_at LIMIT 1) due \
              WHERE p.priority IS NOT NULL"
        ))
        .bind(queues)
        .bind(kinds);
        let micros_until: Option<i64> = self.hot.run(async |connection| query.fetch_one(connection).await).await?;
        Ok(micros_until.map(|value| Duration::from_micros(u64::try_from(value).unwrap_or(0))))
    }

    /// Completes leased jobs. Each item succeeds only with the job's current
    /// token while it is leased; repeating an ack that took effect answers Ok.
    /// Queues where a job of an ordering key finished come back to be woken.
    pub async fn jobs_ack_many(&self, items: &[AckItem]) -> Result<Settled<SettleOutcome>> {
        let ids: Vec<i64> = items.iter().map(|item| item.job_id).collect();
        let tokens: Vec<Uuid> = items.iter().map(|item| item.lease_token).collect();
        let results: Vec<&[u8]> = items.iter().map(|item| item.result.as_slice()).collect();
        let query = sqlx::query_as(concat!(
            "WITH input AS ( \
                 SELECT * FROM unnest($1::bigint[], $2::uuid[], $3::bytea[]) WITH ORDINALITY \
                     AS i(id, token, result, position)), \
             done AS ( \
                 DELETE FROM workbroker.jobs j USING input i \
                  WHERE j.id = i.id AND j.lease_token = i.token \
                 RETURNING j.*, i.result AS ack_result), \
             moved AS (",
            insert_finished!("done", "4", "last_error", "nullif(ack_result, ''::bytea)"),
            " RETURNING id, lease_token, queue, state, ordering_key), ",
            count_finished!("moved"),
            ", ",
            clear_key_heads!("moved"),
            " \
             SELECT CASE \
                 WHEN m.id IS NOT NULL THEN 1 \
                 WHEN EXISTS (SELECT 1 FROM workbroker.finished_jobs f \
                               WHERE f.id = i.id AND f.state = 4 AND f.lease_token = i.token) THEN 1 \
                 WHEN EXISTS (SELECT 1 FROM workbroker.jobs j WHERE j.id = i.id) \
                   OR EXISTS (SELECT 1 FROM workbroker.finished_jobs f WHERE f.id = i.id) THEN 2 \
                 ELSE 3 END::smallint, \
                    CASE WHEN m.ordering_key IS NOT NULL THEN m.queue END AS unblocked \
               FROM input i \
               LEFT JOIN moved m ON m.id = i.id AND m.lease_token = i.token \
              WHERE (SELECT count(*) FROM cleared) >= 0 \
              ORDER BY i.position"
        ))
        .bind(&ids)
        .bind(&tokens)
        .bind(&results);
        let rows: Vec<(i16, Option<String>)> =
            self.batch().run(async |connection| query.fetch_all(connection).await).await?;
        Ok(Settled::collect(rows.into_iter().map(|(outcome, unblocked)| (settle_outcome(outcome), unblocked))))
    }

    /// Fails leased jobs: back to the queue after `retry_after` or the queue's
    /// backoff, or DEAD when permanent or out of attempts. Fenced like acks.
    /// Queues that got a job back, or where a job of an ordering key went
    /// DEAD, come back to be woken.
    pub async fn jobs_nack_many(&self, items: &[NackItem]) -> Result<Settled<NackResult>> {
        let ids: Vec<i64> = items.iter().map(|item| item.job_id).collect();
        let tokens: Vec<Uuid> = items.iter().map(|item| item.lease_token).collect();
        let errors: Vec<&str> = items.iter().map(|item| item.error.as_str()).collect();
        let retry_after: Vec<Option<i64>> = items.iter().map(|item| item.retry_after.map(micros)).collect();
        let permanent: Vec<bool> = items.iter().map(|item| item.permanent).collect();
        let query = sqlx::query_as(concat!(
            "WITH input AS ( \
                 SELECT * FROM unnest($1::bigint[], $2::uuid[], $3::text[], $4::bigint[], $5::boolean[]) \
                     WITH ORDINALITY AS i(id, token, error, retry_after_us, permanent, position)), \
             target AS ( \
                 SELECT DISTINCT ON (j.id) j.id, i.token, i.error, \
                        (i.permanent OR j.attempt >= j.max_attempts) AS to_dead, \
                        coalesce(i.retry_after_us, workbroker.backoff_micros(j.attempt, q.backoff_initial, \
                                 q.backoff_max, q.backoff_multiplier, q.backoff_jitter)) AS delay_us \
                   FROM input i \
                   JOIN workbroker.jobs j ON j.id = i.id AND j.lease_token = i.token \
                   JOIN workbroker.queues q ON q.name = j.queue \
                  ORDER BY j.id, i.position), \
             retried AS ( \
                 UPDATE workbroker.jobs j \
                    SET state = 2, run_at = now() + t.delay_us * interval '1 microsecond', \
                        lease_token = NULL, lease_expires_at = NULL, leased_by = NULL, leased_at = NULL, \
                        last_error = t.error \
                   FROM target t \
                  WHERE j.id = t.id AND NOT t.to_dead AND j.lease_token = t.token \
                 RETURNING j.id, t.token, j.queue, t.delay_us > 0 AS scheduled), \
             killed AS ( \
                 DELETE FROM workbroker.jobs j USING target t \
                  WHERE j.id = t.id AND t.to_dead AND j.lease_token = t.token \
                 RETURNING j.*, t.error AS nack_error), \
             dead AS (",
            insert_finished!("killed", "5", "nack_error", "NULL"),
            " RETURNING id, lease_token, queue, state, ordering_key), ",
            count_finished!("dead"),
            ", ",
            clear_key_heads!("dead"),
            " \
             SELECT CASE \
                      WHEN r.id IS NOT NULL OR d.id IS NOT NULL THEN 1 \
                      WHEN EXISTS (SELECT 1 FROM workbroker.jobs j WHERE j.id = i.id) \
                        OR EXISTS (SELECT 1 FROM workbroker.finished_jobs f WHERE f.id = i.id) THEN 2 \
                      ELSE 3 END::smallint AS outcome, \
                    CASE WHEN r.id IS NOT NULL THEN (CASE WHEN r.scheduled THEN 1 ELSE 2 END) \
                         WHEN d.id IS NOT NULL THEN 5 ELSE 0 END::smallint AS next_state, \
                    coalesce(r.queue, CASE WHEN d.ordering_key IS NOT NULL THEN d.queue END) AS wake \
               FROM input i \
               LEFT JOIN retried r ON r.id = i.id AND r.token = i.token \
               LEFT JOIN dead d ON d.id = i.id AND d.lease_token = i.token \
              WHERE (SELECT count(*) FROM cleared) >= 0 \
              ORDER BY i.position"
        ))
        .bind(&ids)
        .bind(&tokens)
        .bind(&errors)
        .bind(&retry_after)
        .bind(&permanent);
        let rows: Vec<(i16, i16, Option<String>)> =
            self.batch().run(async |connection| query.fetch_all(connection).await).await?;
        Ok(Settled::collect(rows.into_iter().map(|(outcome, next_state, wake)| {
            (NackResult { outcome: settle_outcome(outcome), next_state: (next_state != 0).then_some(next_state) }, wake)
        })))
    }

    /// Moves lease expiries to now + `extend_by`, for current tokens of leased jobs.
    pub async fn jobs_extend_many(&self, items: &[ExtendItem]) -> Result<Vec<ExtendResult>> {
        let ids: Vec<i64> = items.iter().map(|item| item.job_id).collect();
        let tokens: Vec<Uuid> = items.iter().map(|item| item.lease_token).collect();
        let extend: Vec<i64> = items.iter().map(|item| micros(item.extend_by)).collect();
        let query = sqlx::query_as(
            "WITH input AS ( \
                 SELECT * FROM unnest($1::bigint[], $2::uuid[], $3::bigint[]) WITH ORDINALITY \
                     AS i(id, token, extend_us, position)), \
             extended AS ( \
                 UPDATE workbroker.jobs j \
                    SET lease_expires_at = now() + i.extend_us * interval '1 microsecond' \
                   FROM input i \
                  WHERE j.id = i.id AND j.lease_token = i.token \
                 RETURNING j.id, j.lease_token, j.lease_expires_at) \
             SELECT CASE \
                      WHEN e.id IS NOT NULL THEN 1 \
                      WHEN EXISTS (SELECT 1 FROM workbroker.jobs j WHERE j.id = i.id) \
                        OR EXISTS (SELECT 1 FROM workbroker.finished_jobs f WHERE f.id = i.id) THEN 2 \
                      ELSE 3 END::smallint, \
                    e.lease_expires_at \
               FROM input i \
               LEFT JOIN extended e ON e.id = i.id AND e.lease_token = i.token \
              ORDER BY i.position",
        )
        .bind(&ids)
        .bind(&tokens)
        .bind(&extend);
        let rows: Vec<(i16, Option<DateTime<Utc>>)> =
            self.hot.run(async |connection| query.fetch_all(connection).await).await?;
        Ok(rows
            .into_iter()
            .map(|(outcome, lease_expires_at)| ExtendResult { outcome: settle_outcome(outcome), lease_expires_at })
            .collect())
    }

    /// Hands leases back (their stream ended): each job still leased under
    /// its token returns to the queue at once. With [`ReleaseAttempt::Counted`]
    /// the lease counts as a failed attempt (the job goes DEAD if it was its
    /// last); with `Refunded` the attempt is given back.
    pub async fn jobs_release_many(
        &self,
        leases: &[HeldLease],
        reason: &str,
        attempt: ReleaseAttempt,
    ) -> Result<Vec<ReturnedJob>> {
        if leases.is_empty() {
            return Ok(Vec::new());
        }
        let ids: Vec<i64> = leases.iter().map(|lease| lease.job_id).collect();
        let tokens: Vec<Uuid> = leases.iter().map(|lease| lease.lease_token).collect();
        let query = sqlx::query_as::<_, ReturnedJob>(return_leases!(
            "SELECT u.id, u.token FROM unnest($1::bigint[], $3::uuid[]) AS u(id, token)",
            "$4"
        ))
        .bind(&ids)
        .bind(reason)
        .bind(&tokens)
        .bind(attempt == ReleaseAttempt::Refunded);
        Ok(self.hot.run(async |connection| query.fetch_all(connection).await).await?)
    }

    /// Returns up to `limit` leases that expired (by the database clock) to
    /// their queue, or to DEAD when their attempts are used up. Concurrent
    /// callers take disjoint rows (SKIP LOCKED) and every change re-checks the
    /// token, so running this twice returns each job once.
    pub async fn jobs_expire_leases(&self, limit: u32) -> Result<Vec<ReturnedJob>> {
        let rows = sqlx::query_as::<_, ReturnedJob>(return_leases!(
            "SELECT j.id, j.lease_token AS token FROM workbroker.jobs j \
              WHERE j.state = 3 AND j.lease_expires_at < now() \
              ORDER BY j.lease_expires_at LIMIT $1 FOR UPDATE SKIP LOCKED",
            "false"
        ))
        .bind(i64::from(limit))
        .bind("lease expired")
        .fetch_all(&self.planned)
        .await?;
        Ok(rows)
    }

    /// Deletes up to `limit` COMPLETED and CANCELLED jobs older than their
    /// queue's retention. DEAD jobs stay until redriven.
    pub async fn jobs_prune_finished(&self, limit: u32) -> Result<u64> {
        // Per queue, oldest first, through (queue key, finished_at): a pass with
        // nothing to prune costs one index probe per queue. The rows go as
        // `id = ANY (array)`, probed on the primary key whatever the
        // statistics say (an `IN (subquery)` was planned as a hash join over
        // the whole table when the statistics had it small). Two reapers may
        // pick the same rows; the second DELETE then finds them gone.
        let deleted = sqlx::query(concat!(
            "DELETE FROM workbroker.finished_jobs f WHERE f.id = ANY (ARRAY( \
                 SELECT old.id FROM workbroker.queues q \
                  CROSS JOIN LATERAL ( \
                      SELECT f.id FROM workbroker.finished_jobs f \
                       WHERE ",
            same_queue!("f.queue", "q.name"),
            " \
                         AND f.state IN (4, 6) \
                         AND f.finished_at < now() - q.completed_retention \
                       ORDER BY f.finished_at LIMIT $1) old \
                  LIMIT $1))"
        ))
        .bind(i64::from(limit))
        .execute(&self.planned)
        .await?
        .rows_affected();
        Ok(deleted)
    }

    /// Reads one job wherever it lives.
    pub async fn job_get(&self, job_id: i64) -> Result<Option<JobRecord>> {
        let job = sqlx::query_as::<_, JobRecord>(concat!(
            "SELECT ",
            job_fields!(),
            " FROM workbroker.all_jobs j WHERE j.id = $1"
        ))
        .bind(job_id)
        .fetch_optional(self.pool())
        .await?;
        Ok(job)
    }

    /// Cancels a job that is not terminal. A leased job's token is returned so
    /// the stream holding it can be told.
    ///
    /// The job's key lock (migration 0009) is taken before the row: a blocked
    /// job may be the next one a concurrent finish of its key clears, and
    /// that finish holds the lock while it updates the row.
    pub async fn job_cancel(&self, job_id: i64) -> Result<CancelResult> {
        let mut transaction = self.pool().begin().await?;
        sqlx::query(
            "SELECT workbroker.take_key_locks(ARRAY[queue], ARRAY[ordering_key]) \
               FROM workbroker.jobs WHERE id = $1 AND ordering_key IS NOT NULL",
        )
        .bind(job_id)
        .execute(&mut *transaction)
        .await?;
        let cancelled = sqlx::query_as::<_, JobRecord>(concat!(
            "WITH gone AS (DELETE FROM workbroker.jobs j WHERE j.id = $1 RETURNING j.*), \
             moved AS (",
            insert_finished!("gone", "6", "last_error", "NULL"),
            " RETURNING *), ",
            count_finished!("moved"),
            ", ",
            clear_key_heads!("moved"),
            ", \
             notified AS (SELECT pg_notify('workbroker_jobs', queue) FROM gone WHERE ordering_key IS NOT NULL) \
             SELECT ",
            job_fields!(),
            " FROM moved j WHERE (SELECT count(*) FROM notified) >= 0 AND (SELECT count(*) FROM cleared) >= 0"
        ))
        .bind(job_id)
        .fetch_optional(&mut *transaction)
        .await?;
        transaction.commit().await?;
        if let Some(job) = cancelled {
            let held_lease = job.lease_token;
            return Ok(CancelResult::Cancelled { job, held_lease });
        }
        Ok(match self.job_get(job_id).await? {
            Some(job) => CancelResult::AlreadyTerminal(job),
            None => CancelResult::NotFound,
        })
    }

    /// A page of a queue's jobs in sequence order.
    pub async fn jobs_list(&self, params: &ListParams<'_>) -> Result<Vec<JobRecord>> {
        let jobs = sqlx::query_as::<_, JobRecord>(concat!(
            "SELECT ",
            job_fields!(),
            " FROM workbroker.all_jobs j \
              WHERE ",
            same_queue!("j.queue", "$1"),
            " \
                AND j.sequence > $2 AND ($3::smallint IS NULL OR j.state = $3) \
              ORDER BY j.sequence LIMIT $4"
        ))
        .bind(params.queue)
        .bind(params.after_sequence)
        .bind(params.state)
        .bind(i64::from(params.limit))
        .fetch_all(&self.planned)
        .await?;
        Ok(jobs)
    }

    /// Moves DEAD jobs of a queue back to the queue, available now, with a new
    /// sequence (so the completed watermark never goes backwards) and a fresh
    /// attempt count. `job_ids` empty: every dead job (up to `limit`). A dead
    /// job whose dedup key is now held by an unfinished job is left dead.
    /// A revived keyed job is not marked blocked (migration 0009): marking
    /// it would take its key's lock after this transaction's move out of
    /// `finished_jobs`, an order other statements do not share; unblocked,
    /// it costs the lease a probe while it waits behind its key.
    pub async fn jobs_redrive(
        &self,
        queue: &str,
        job_ids: &[i64],
        max_attempts: Option<i32>,
        limit: u32,
    ) -> Result<Vec<i64>> {
        // New sequences are taken under the queue's enqueue barrier, like
        // any enqueue's (see migration 0004); exclusive, as a revived job may
        // have an ordering key.
        let mut transaction = self.planned.begin().await?;
        sqlx::query("SELECT workbroker.enqueue_barrier(ARRAY[$1], true)")
            .bind(queue)
            .execute(&mut *transaction)
            .await?;
        let ids: Vec<i64> = sqlx::query_scalar(concat!(
            "WITH picked AS ( \
                 SELECT f.id, f.sequence FROM workbroker.finished_jobs f \
                  WHERE ",
            same_queue!("f.queue", "$1"),
            " AND f.state = 5 \
                    AND (cardinality($2::bigint[]) = 0 OR f.id = ANY($2::bigint[])) \
                    AND (f.dedup_key IS NULL OR NOT EXISTS ( \
                          SELECT 1 FROM workbroker.jobs j \
                           WHERE j.queue = f.queue AND j.dedup_key = f.dedup_key)) \
                  ORDER BY f.sequence LIMIT $4 FOR UPDATE OF f SKIP LOCKED), \
             gone AS ( \
                 DELETE FROM workbroker.finished_jobs f USING picked p WHERE f.id = p.id RETURNING f.*), \
             numbered AS ( \
                 SELECT g.*, nextval(g.queue_sequence) AS new_sequence \
                   FROM (SELECT gone.*, q.sequence AS queue_sequence \
                           FROM gone JOIN workbroker.queues q ON q.name = gone.queue \
                          ORDER BY gone.sequence) g), \
             revived AS ( \
                 INSERT INTO workbroker.jobs (id, queue, kind, state, priority, sequence, run_at, created_at, \
                     attempt, max_attempts, ordering_key, dedup_key, shard, lease_duration, last_error, \
                     payload, attributes) \
                 SELECT n.id, n.queue, n.kind, 2, n.priority, n.new_sequence, now(), n.created_at, 0, \
                        coalesce($3::integer, n.max_attempts), n.ordering_key, n.dedup_key, n.shard, \
                        n.lease_duration, n.last_error, n.payload, n.attributes \
                   FROM numbered n \
                 RETURNING id), \
             notified AS (SELECT pg_notify('workbroker_jobs', $1) WHERE EXISTS (SELECT 1 FROM revived)) \
             SELECT id FROM revived WHERE (SELECT count(*) FROM notified) >= 0 ORDER BY id"
        ))
        .bind(queue)
        .bind(job_ids)
        .bind(max_attempts)
        .bind(i64::from(limit))
        .fetch_all(&mut *transaction)
        .await?;
        transaction.commit().await?;
        Ok(ids)
    }

    /// Sends a notification (outside any transaction).
    pub async fn notify(&self, channel: &str, payload: &str) -> Result<()> {
        self.notify_many(channel, &[payload]).await
    }

    /// Sends one notification per payload on `channel`, in one statement
    /// outside any transaction.
    ///
    /// Its transaction commits asynchronously: a transaction that notifies
    /// holds a database-wide lock across its commit, and waiting there for
    /// a WAL flush would hold up every other notifying commit. Losing the
    /// notifications in a crash loses nothing (their listeners lose their
    /// connection too, and look again when they reconnect).
    pub async fn notify_many<Payload: AsRef<str>>(&self, channel: &str, payloads: &[Payload]) -> Result<()> {
        let payloads: Vec<&str> = payloads.iter().map(AsRef::as_ref).collect();
        let query = sqlx::query(NOTIFY_MANY).bind(channel).bind(&payloads);
        self.hot.run(async |connection| query.execute(connection).await).await?;
        Ok(())
    }

    /// Tells every replica's listener that these queues got waiting jobs:
    /// one `workbroker_jobs` notification per queue, the name followed by
    /// this store's [`Store::notify_suffix`] (so this replica's own listener
    /// skips them).
    pub async fn announce_jobs(&self, queues: &[String]) -> Result<()> {
        let payloads: Vec<String> = queues.iter().map(|queue| format!("{queue}{}", self.notify_suffix())).collect();
        self.notify_many(super::JOBS_CHANNEL, &payloads).await
    }
}

/// Sends one notification on `connection` (a connection of its own, see
/// [`Store::connect_dedicated`]), committed asynchronously like
/// [`Store::notify_many`]'s.
pub async fn notify_on(connection: &mut PgConnection, channel: &str, payload: &str) -> Result<()> {
    sqlx::query(NOTIFY_MANY).bind(channel).bind([payload]).execute(connection).await?;
    Ok(())
}

/// The rows an enqueue function answered for `count` jobs, in input order
/// (by `place`). The functions answer in input order in practice; nothing
/// in SQL promises it without a sort, so check (cheap) rather than trust.
fn rows_in_input_order<Row, Place: Ord>(
    mut rows: Vec<Row>,
    count: usize,
    place: impl Fn(&Row) -> Place,
) -> Result<Vec<Row>> {
    if rows.len() != count {
        return Err(Error::Conflict(format!("enqueue answered {} rows for {count} jobs", rows.len())));
    }
    if !rows.is_sorted_by_key(&place) {
        rows.sort_unstable_by_key(place);
    }
    Ok(rows)
}

fn settle_outcome(code: i16) -> SettleOutcome {
    match code {
        1 => SettleOutcome::Ok,
        2 => SettleOutcome::StaleLease,
        _ => SettleOutcome::NotFound,
    }
}

/// Microseconds as a `Duration`, clamping negatives to zero.
pub(crate) fn duration_from_micros(value: i64) -> Duration {
    Duration::from_micros(u64::try_from(value).unwrap_or(0))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plain(queue: &str, payload: &[u8]) -> NewJobRecord {
        NewJobRecord {
            queue: queue.to_owned(),
            kind: "k".to_owned(),
            payload: payload.to_vec(),
            attributes_json: "{}".to_owned(),
            priority: 0,
            run_at: RunAt::Now,
            max_attempts: None,
            ordering_key: None,
            dedup_key: None,
            lease_duration: None,
        }
    }

    fn defaults_only(jobs: &[NewJobRecord]) -> Option<&str> {
        JobColumns::new(jobs.iter()).defaults_only()
    }

    #[test]
    fn only_a_batch_of_one_queue_whose_jobs_set_kind_and_payload_alone_takes_the_default_statement() {
        let jobs = vec![plain("a", b""), plain("a", b"payload"), plain("a", b"")];
        assert_eq!(defaults_only(&jobs), Some("a"));
        assert_eq!(defaults_only(&[plain("a", b""), plain("a", b"")]), Some("a"), "no payloads at all");
        let mut no_delay = jobs.clone();
        no_delay[0].run_at = RunAt::After(Duration::ZERO);
        assert_eq!(defaults_only(&no_delay), Some("a"), "a delay of zero is the default");
        assert_eq!(defaults_only(&[]), None);

        let changes: [fn(&mut NewJobRecord); 9] = [
            |job| job.queue = "b".to_owned(),
            |job| job.priority = 1,
            |job| job.run_at = RunAt::After(Duration::from_secs(1)),
            |job| job.run_at = RunAt::At { unix_micros: 1 },
            |job| job.max_attempts = Some(3),
            |job| job.lease_duration = Some(Duration::from_secs(30)),
            |job| job.attributes_json = r#"{"a":"b"}"#.to_owned(),
            |job| job.ordering_key = Some("key".to_owned()),
            |job| job.dedup_key = Some("key".to_owned()),
        ];
        for change in changes {
            let mut changed = jobs.clone();
            change(&mut changed[1]);
            assert_eq!(defaults_only(&changed), None);
        }
    }
}
