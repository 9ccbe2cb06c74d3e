//! Store records to wire messages.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use workbroker_api::time::{duration_to_proto, timestamp_from_unix_micros};
use workbroker_api::v1;

use crate::store::{JobRecord, QueueRecord, QueueStatsRecord};

pub fn timestamp(time: DateTime<Utc>) -> prost_types::Timestamp {
    timestamp_from_unix_micros(time.timestamp_micros())
}

fn attributes(value: serde_json::Value) -> HashMap<String, String> {
    match value {
        serde_json::Value::Object(map) => map
            .into_iter()
            .map(|(key, value)| {
                let text = match value {
                    serde_json::Value::String(text) => text,
                    other => other.to_string(),
                };
                (key, text)
            })
            .collect(),
        _ => HashMap::new(),
    }
}

/// The wire form of a job; takes the record, so that its strings and payload
/// move instead of being copied (a leased batch goes through here whole).
pub fn job(record: JobRecord) -> v1::Job {
    let leased = record.state == crate::store::state::LEASED;
    v1::Job {
        job_id: record.id.to_string(),
        queue: record.queue,
        kind: record.kind,
        payload: record.payload,
        attributes: attributes(record.attributes),
        priority: record.priority,
        state: i32::from(record.state),
        attempt: u32::try_from(record.attempt).unwrap_or(0),
        max_attempts: u32::try_from(record.max_attempts).unwrap_or(0),
        ordering_key: record.ordering_key.unwrap_or_default(),
        dedup_key: record.dedup_key.unwrap_or_default(),
        created_at: Some(timestamp(record.created_at)),
        run_at: Some(timestamp(record.run_at)),
        finished_at: record.finished_at.map(timestamp),
        last_error: record.last_error.unwrap_or_default(),
        result: record.result.unwrap_or_default(),
        sequence: u64::try_from(record.sequence).unwrap_or(0),
        leased_by: if leased { record.leased_by.unwrap_or_default() } else { String::new() },
        lease_expires_at: if leased { record.lease_expires_at.map(timestamp) } else { None },
    }
}

pub fn leased_job(record: JobRecord) -> v1::LeasedJob {
    let lease_token = record.lease_token.map(|token| token.to_string()).unwrap_or_default();
    let lease_expires_at = record.lease_expires_at.map(timestamp);
    let attempt = u32::try_from(record.attempt).unwrap_or(0);
    v1::LeasedJob { job: Some(job(record)), lease_token, lease_expires_at, attempt }
}

pub fn queue_info(record: &QueueRecord) -> v1::QueueInfo {
    v1::QueueInfo {
        queue: record.name.clone(),
        paused: record.paused,
        max_attempts: u32::try_from(record.max_attempts).unwrap_or(0),
        lease_duration: Some(duration_to_proto(record.lease_duration)),
        backoff_initial: Some(duration_to_proto(record.backoff_initial)),
        backoff_max: Some(duration_to_proto(record.backoff_max)),
        backoff_multiplier: record.backoff_multiplier,
        backoff_jitter: record.backoff_jitter,
        completed_retention: Some(duration_to_proto(record.completed_retention)),
        created_at: Some(timestamp(record.created_at)),
    }
}

pub fn queue_stats(record: &QueueStatsRecord) -> v1::QueueStats {
    v1::QueueStats {
        queue: record.queue.clone(),
        scheduled: record.scheduled,
        available: record.available,
        leased: record.leased,
        completed: record.completed,
        dead: record.dead,
        cancelled: record.cancelled,
        oldest_available_age: Some(duration_to_proto(record.oldest_available_age)),
        completed_watermark: record.completed_watermark,
        paused: record.paused,
        last_sequence: record.last_sequence,
    }
}
