//! Hand-off at enqueue: a new job that can start now goes straight to a
//! local lease stream that is waiting for work of its queue and kind.
//!
//! A stream is *waiting* when its last lease statement came back short and
//! no notification for its queues has arrived since (it is dry), and it has
//! free slots. For such a stream, leasing a new job after its insert would
//! take a second statement that returns exactly that job; instead the
//! enqueue statement inserts the job already LEASED to the stream (fresh
//! token, attempt 1), and the job is pushed as soon as the statement
//! returns. The job is in the database, under a lease, before `Enqueue`
//! answers, so every guarantee of an ordinary lease holds: fencing by token,
//! release when the stream ends, expiry by the reaper.
//!
//! Only jobs that could be leased at once anyway are handed off: no ordering
//! key (an earlier job of the key may be unfinished), no dedup key (those
//! enqueues take another path), no delay. A paused queue's jobs are inserted
//! as waiting (the statement checks), and their reserved slots are given
//! back. Slots are reserved under the stream's lock before the statement
//! runs, so the window holds.

use std::collections::HashMap;
use std::sync::Arc;

use super::{Dispatcher, LeaseStream, StreamEvent};
use crate::admin::metrics::JobEvent;
use crate::store::{self, EnqueuedRecord, Handoff, HeldLease, JobRecord, NewJobRecord, ReleaseAttempt, RunAt};

impl Dispatcher {
    /// Inserts jobs (see [`store::Store::jobs_enqueue_many`]), handing those
    /// that can start now to waiting local streams, then wakes the streams
    /// of queues that got waiting jobs, here at once and on the other
    /// replicas through the [`super::announcer::Announcer`].
    pub async fn enqueue(&self, jobs: Vec<NewJobRecord>) -> store::Result<Vec<EnqueuedRecord>> {
        let targets = self.reserve_handoffs(&jobs);
        let handoffs: Vec<Option<Handoff<'_>>> = targets
            .iter()
            .map(|target| {
                target.as_ref().map(|stream| Handoff {
                    worker_id: &stream.filter.worker_id,
                    lease_duration: stream.filter.lease_duration,
                })
            })
            .collect();
        let handoffs = if targets.iter().any(Option::is_some) { handoffs.as_slice() } else { &[] };
        let enqueued = match self.store.jobs_enqueue_many(&jobs, handoffs).await {
            Ok(enqueued) => enqueued,
            Err(error) => {
                for stream in targets.iter().flatten() {
                    stream.state().reserved -= 1;
                }
                return Err(error);
            }
        };
        self.metrics.add_by_queue(
            JobEvent::Enqueued,
            jobs.iter().zip(&enqueued).filter(|(_, record)| !record.deduplicated).map(|(job, _)| job.queue.as_str()),
        );

        let mut waiting_queues: Vec<&str> = Vec::new();
        let mut delivered: HashMap<u64, (Arc<LeaseStream>, Vec<JobRecord>)> = HashMap::new();
        for ((job, record), target) in jobs.iter().zip(&enqueued).zip(targets) {
            match (target, record.handed_off) {
                (Some(stream), Some(lease)) => {
                    let leased = leased_record(job, record, &lease, &stream.filter.worker_id);
                    delivered.entry(stream.id).or_insert_with(|| (stream, Vec::new())).1.push(leased);
                }
                (target, _) => {
                    if let Some(stream) = target {
                        stream.state().reserved -= 1;
                    }
                    if !record.deduplicated {
                        waiting_queues.push(&job.queue);
                    }
                }
            }
        }
        for (stream, leased) in delivered.into_values() {
            self.deliver_handoff(&stream, leased).await;
        }
        waiting_queues.sort_unstable();
        waiting_queues.dedup();
        self.queues_have_work(&waiting_queues);
        Ok(enqueued)
    }

    /// Picks, for each job that can start now, a waiting local stream with a
    /// free slot (round robin over the streams of its queue and kind), and
    /// reserves that slot.
    fn reserve_handoffs(&self, jobs: &[NewJobRecord]) -> Vec<Option<Arc<LeaseStream>>> {
        let mut targets: Vec<Option<Arc<LeaseStream>>> = vec![None; jobs.len()];
        // The dedup path of the store does not hand off.
        if self.leasing.is_cancelled() || jobs.iter().any(|job| job.dedup_key.is_some()) {
            return targets;
        }
        let registry = self.registry();
        let mut candidates: HashMap<&str, Vec<Arc<LeaseStream>>> = HashMap::new();
        let mut next: HashMap<&str, usize> = HashMap::new();
        for (index, job) in jobs.iter().enumerate() {
            let immediate = match job.run_at {
                RunAt::Now => true,
                RunAt::After(delay) => delay.is_zero(),
                RunAt::At { .. } => false,
            };
            if !immediate || job.ordering_key.is_some() {
                continue;
            }
            let streams = candidates.entry(job.queue.as_str()).or_insert_with(|| {
                registry
                    .by_queue
                    .get(&job.queue)
                    .map(|ids| ids.iter().filter_map(|id| registry.streams.get(id).cloned()).collect())
                    .unwrap_or_default()
            });
            let start = next.entry(job.queue.as_str()).or_default();
            for offset in 0..streams.len() {
                let stream = &streams[(*start + offset) % streams.len()];
                if !stream.filter.kinds.is_empty() && !stream.filter.kinds.contains(&job.kind) {
                    continue;
                }
                let mut state = stream.state();
                let waiting = !state.closed
                    && !state.draining
                    && state.dry_at_epoch == Some(state.work_epoch)
                    && state.free() > 0;
                if waiting {
                    state.reserved += 1;
                    targets[index] = Some(stream.clone());
                    *start = (*start + offset + 1) % streams.len();
                    break;
                }
            }
        }
        targets
    }

    /// Registers handed-off leases with their stream and pushes them; if the
    /// stream ended or drained meanwhile, hands them back at once.
    async fn deliver_handoff(&self, stream: &LeaseStream, jobs: Vec<JobRecord>) {
        let accepted = {
            let mut registry = self.registry();
            let mut state = stream.state();
            state.reserved -= u32::try_from(jobs.len()).unwrap_or(u32::MAX).min(state.reserved);
            if state.closed || state.draining {
                false
            } else {
                registry.hold(stream.id, &mut state, &jobs);
                true
            }
        };
        self.record_leased(&jobs);
        self.publish_changes(jobs.iter().map(|job| job.id));
        // The jobs move into the stream's event; their leases stay here in
        // case the stream is gone.
        let leases: Vec<HeldLease> = jobs
            .iter()
            .filter_map(|job| job.lease_token.map(|lease_token| HeldLease { job_id: job.id, lease_token }))
            .collect();
        if accepted && stream.events.send(StreamEvent::Leased(jobs)).is_ok() {
            return;
        }
        self.forget_leases(stream, &leases);
        match self
            .store
            .jobs_release_many(&leases, "lease handed back: never delivered", ReleaseAttempt::Refunded)
            .await
        {
            Ok(returned) => self.record_released(&returned),
            Err(error) => {
                tracing::warn!(leases = leases.len(), %error, "could not hand back undelivered leases; they will expire");
            }
        }
    }
}

/// The leased job as the stream receives it, from what the enqueue had and
/// what the statement answered.
fn leased_record(job: &NewJobRecord, record: &EnqueuedRecord, lease: &store::HandedOff, worker_id: &str) -> JobRecord {
    JobRecord {
        id: record.job_id,
        queue: job.queue.clone(),
        kind: job.kind.clone(),
        state: store::state::LEASED,
        priority: job.priority,
        sequence: record.sequence,
        run_at: lease.leased_at,
        created_at: lease.leased_at,
        attempt: 1,
        max_attempts: lease.max_attempts,
        ordering_key: None,
        dedup_key: None,
        lease_token: Some(lease.lease_token),
        lease_expires_at: Some(lease.lease_expires_at),
        leased_by: Some(worker_id.to_owned()),
        last_error: None,
        payload: job.payload.clone(),
        attributes: serde_json::from_str(&job.attributes_json)
            .unwrap_or_else(|_| serde_json::Value::Object(serde_json::Map::new())),
        finished_at: None,
        result: None,
    }
}
