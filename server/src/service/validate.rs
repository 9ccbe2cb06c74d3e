//! Validation at the edge: every request is checked here before anything
//! reaches the store, and every refusal names the field at fault.

use std::collections::HashMap;
use std::fmt;
use std::time::Duration;

use uuid::Uuid;
use workbroker_api::names::validate_name;
use workbroker_api::time::{duration_from_proto, timestamp_to_unix_micros};
use workbroker_api::v1;

use super::error::{Error, Result};
use crate::store::{NewJobRecord, RunAt};

/// Most jobs in one Enqueue.
pub const MAX_JOBS_PER_ENQUEUE: usize = 1000;
/// Longest ordering or dedup key, in bytes.
pub const MAX_KEY_BYTES: usize = 256;
/// Most attributes on one job.
pub const MAX_ATTRIBUTES: usize = 64;
/// Longest attribute key, in bytes.
pub const MAX_ATTRIBUTE_KEY_BYTES: usize = 256;
/// Largest total size of a job's attribute keys and values.
pub const MAX_ATTRIBUTES_BYTES: usize = 16 * 1024;
/// Longest worker id.
pub const MAX_WORKER_ID_CHARS: usize = 256;
/// Most queues or kinds one lease stream names.
pub const MAX_STREAM_FILTERS: usize = 64;
/// Largest `max_in_flight` and single credit.
pub const MAX_WINDOW_STEP: u32 = 10_000;
/// Shortest and longest lease or extension.
pub const MIN_LEASE: Duration = Duration::from_secs(1);
pub const MAX_LEASE: Duration = Duration::from_secs(24 * 3600);
/// Longest delay or retry_after.
pub const MAX_DELAY: Duration = Duration::from_secs(365 * 24 * 3600);
/// Longest stored error text, in bytes.
pub const MAX_ERROR_BYTES: usize = 4096;

/// Size limits that depend on configuration.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Largest payload (and ack result), in bytes.
    pub max_payload_bytes: usize,
}

/// The field a check looks at, as a refusal names it (`jobs[3].queue`).
/// Spelled out only when the check fails: checking a 1,000-job request, or
/// an ack, formats no names.
#[derive(Clone, Copy, Debug)]
pub struct Field<'a> {
    /// The list and the index of the item the field belongs to.
    item: Option<(&'a str, usize)>,
    name: &'a str,
}

impl<'a> Field<'a> {
    /// Field `name` of item `index` of the request's list `list`.
    pub const fn of_item(list: &'a str, index: usize, name: &'a str) -> Self {
        Self { item: Some((list, index)), name }
    }

    /// Element `index` of the request's list `list` itself.
    pub const fn element(list: &'a str, index: usize) -> Self {
        Self { item: Some((list, index)), name: "" }
    }
}

impl<'a> From<&'a str> for Field<'a> {
    fn from(name: &'a str) -> Self {
        Self { item: None, name }
    }
}

impl fmt::Display for Field<'_> {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.item {
            Some((list, index)) if self.name.is_empty() => write!(formatter, "{list}[{index}]"),
            Some((list, index)) => write!(formatter, "{list}[{index}].{}", self.name),
            None => formatter.write_str(self.name),
        }
    }
}

/// A refusal of `field`.
fn invalid<'a>(field: impl Into<Field<'a>>, reason: impl fmt::Display) -> Error {
    Error::invalid(field.into().to_string(), reason)
}

pub fn name<'a>(field: impl Into<Field<'a>>, value: &str) -> Result<()> {
    validate_name(value).map_err(|error| invalid(field, error))
}

pub fn job_id<'a>(field: impl Into<Field<'a>>, value: &str) -> Result<i64> {
    let field = field.into();
    if value.is_empty() {
        return Err(invalid(field, "must not be empty"));
    }
    value.parse::<i64>().ok().filter(|id| *id > 0).ok_or_else(|| invalid(field, "is not a job id of this broker"))
}

pub fn lease_token<'a>(field: impl Into<Field<'a>>, value: &str) -> Result<Uuid> {
    let field = field.into();
    if value.is_empty() {
        return Err(invalid(field, "must not be empty"));
    }
    Uuid::parse_str(value).map_err(|_| invalid(field, "is not a lease token of this broker"))
}

/// Checks the `job_id` and `lease_token` fields of an item that names a
/// lease (ack, nack, extension); `item` locates the item in its request's
/// list (`("leases", 2)`), if it is one.
pub fn lease_ref(item: Option<(&str, usize)>, job_id: &str, token: &str) -> Result<(i64, Uuid)> {
    let field = |name| match item {
        Some((list, index)) => Field::of_item(list, index, name),
        None => Field::from(name),
    };
    Ok((self::job_id(field("job_id"), job_id)?, lease_token(field("lease_token"), token)?))
}

pub fn duration_in<'a>(
    field: impl Into<Field<'a>>,
    value: &prost_types::Duration,
    min: Duration,
    max: Duration,
) -> Result<Duration> {
    let field = field.into();
    let duration = duration_from_proto(value).map_err(|error| invalid(field, error))?;
    if duration < min || duration > max {
        return Err(invalid(field, format!("must be between {min:?} and {max:?}")));
    }
    Ok(duration)
}

fn key(field: Field<'_>, value: String) -> Result<Option<String>> {
    if value.len() > MAX_KEY_BYTES {
        return Err(invalid(field, format!("must be at most {MAX_KEY_BYTES} bytes")));
    }
    Ok((!value.is_empty()).then_some(value))
}

fn attributes(field: Field<'_>, attributes: &HashMap<String, String>) -> Result<String> {
    if attributes.is_empty() {
        return Ok("{}".to_owned());
    }
    if attributes.len() > MAX_ATTRIBUTES {
        return Err(invalid(field, format!("must have at most {MAX_ATTRIBUTES} entries")));
    }
    let mut total = 0;
    for (key, value) in attributes {
        if key.is_empty() || key.len() > MAX_ATTRIBUTE_KEY_BYTES {
            return Err(invalid(field, format!("keys must be 1 to {MAX_ATTRIBUTE_KEY_BYTES} bytes")));
        }
        if key.contains('\0') || value.contains('\0') {
            return Err(invalid(field, "must not contain NUL characters"));
        }
        total += key.len() + value.len();
    }
    if total > MAX_ATTRIBUTES_BYTES {
        return Err(invalid(field, format!("keys and values must total at most {MAX_ATTRIBUTES_BYTES} bytes")));
    }
    let object: serde_json::Map<String, serde_json::Value> =
        attributes.iter().map(|(key, value)| (key.clone(), serde_json::Value::String(value.clone()))).collect();
    Ok(serde_json::Value::Object(object).to_string())
}

/// Checks an Enqueue request and turns it into records, which take over
/// its strings and payloads.
pub fn enqueue(request: v1::EnqueueRequest, limits: Limits) -> Result<Vec<NewJobRecord>> {
    if request.jobs.is_empty() || request.jobs.len() > MAX_JOBS_PER_ENQUEUE {
        return Err(Error::invalid("jobs", format!("must have 1 to {MAX_JOBS_PER_ENQUEUE} jobs")));
    }
    request.jobs.into_iter().enumerate().map(|(index, job)| new_job(index, job, limits)).collect()
}

/// Checks `jobs[index]` of an Enqueue request.
fn new_job(index: usize, job: v1::NewJob, limits: Limits) -> Result<NewJobRecord> {
    let field = |name| Field::of_item("jobs", index, name);
    name(field("queue"), &job.queue)?;
    name(field("kind"), &job.kind)?;
    if job.payload.len() > limits.max_payload_bytes {
        return Err(invalid(
            field("payload"),
            format!("is {} bytes; the limit is {}", job.payload.len(), limits.max_payload_bytes),
        ));
    }
    let run_at = match (&job.run_at, &job.delay) {
        (Some(_), Some(_)) => {
            return Err(invalid(field("run_at"), "and delay are mutually exclusive"));
        }
        (Some(timestamp), None) => {
            let unix_micros = timestamp_to_unix_micros(timestamp)
                .filter(|micros| (0..=253_402_300_799_000_000).contains(micros))
                .ok_or_else(|| invalid(field("run_at"), "is not a valid time"))?;
            RunAt::At { unix_micros }
        }
        (None, Some(delay)) => RunAt::After(duration_in(field("delay"), delay, Duration::ZERO, MAX_DELAY)?),
        (None, None) => RunAt::Now,
    };
    let max_attempts = match job.max_attempts {
        0 => None,
        1..=1000 => Some(i32::try_from(job.max_attempts).unwrap_or(1000)),
        _ => {
            return Err(invalid(field("max_attempts"), "must be 0 (queue default) to 1000"));
        }
    };
    let lease_duration = job
        .lease_duration
        .as_ref()
        .map(|lease| duration_in(field("lease_duration"), lease, MIN_LEASE, MAX_LEASE))
        .transpose()?;
    Ok(NewJobRecord {
        attributes_json: attributes(field("attributes"), &job.attributes)?,
        ordering_key: key(field("ordering_key"), job.ordering_key)?,
        dedup_key: key(field("dedup_key"), job.dedup_key)?,
        queue: job.queue,
        kind: job.kind,
        payload: job.payload,
        priority: job.priority,
        run_at,
        max_attempts,
        lease_duration,
    })
}

/// A checked `OpenLease`.
#[derive(Clone, Debug)]
pub struct OpenLease {
    pub worker_id: String,
    pub queues: Vec<String>,
    pub kinds: Vec<String>,
    pub lease_duration: Option<Duration>,
    pub max_in_flight: u32,
}

pub fn open_lease(open: &v1::OpenLease) -> Result<OpenLease> {
    if open.worker_id.is_empty() || open.worker_id.chars().count() > MAX_WORKER_ID_CHARS {
        return Err(Error::invalid("open.worker_id", format!("must be 1 to {MAX_WORKER_ID_CHARS} characters")));
    }
    if open.queues.is_empty() || open.queues.len() > MAX_STREAM_FILTERS {
        return Err(Error::invalid("open.queues", format!("must name 1 to {MAX_STREAM_FILTERS} queues")));
    }
    for (index, queue) in open.queues.iter().enumerate() {
        name(Field::element("open.queues", index), queue)?;
    }
    if open.kinds.len() > MAX_STREAM_FILTERS {
        return Err(Error::invalid("open.kinds", format!("must name at most {MAX_STREAM_FILTERS} kinds")));
    }
    for (index, kind) in open.kinds.iter().enumerate() {
        name(Field::element("open.kinds", index), kind)?;
    }
    if open.max_in_flight == 0 || open.max_in_flight > MAX_WINDOW_STEP {
        return Err(Error::invalid("open.max_in_flight", format!("must be 1 to {MAX_WINDOW_STEP}")));
    }
    let lease_duration = open
        .lease_duration
        .as_ref()
        .map(|lease| duration_in("open.lease_duration", lease, MIN_LEASE, MAX_LEASE))
        .transpose()?;
    let mut queues = open.queues.clone();
    queues.sort();
    queues.dedup();
    let mut kinds = open.kinds.clone();
    kinds.sort();
    kinds.dedup();
    Ok(OpenLease {
        worker_id: open.worker_id.clone(),
        queues,
        kinds,
        lease_duration,
        max_in_flight: open.max_in_flight,
    })
}

pub fn credit(credit: &v1::Credit) -> Result<u32> {
    if credit.count == 0 || credit.count > MAX_WINDOW_STEP {
        return Err(Error::invalid("credit.count", format!("must be 1 to {MAX_WINDOW_STEP}")));
    }
    Ok(credit.count)
}

/// Cuts an error text to at most [`MAX_ERROR_BYTES`] on a character boundary.
pub fn truncate_error(error: &str) -> String {
    if error.len() <= MAX_ERROR_BYTES {
        return error.to_owned();
    }
    let mut end = MAX_ERROR_BYTES;
    while !error.is_char_boundary(end) {
        end -= 1;
    }
    error[..end].to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: Limits = Limits { max_payload_bytes: 1024 };

    fn job() -> v1::NewJob {
        v1::NewJob { queue: "q".into(), kind: "k".into(), ..Default::default() }
    }

    fn field_of(result: Result<Vec<NewJobRecord>>) -> String {
        match result {
            Err(Error::Invalid { field, .. }) => field,
            other => panic!("expected a validation error, got {other:?}"),
        }
    }

    #[test]
    fn enqueue_names_the_field_at_fault() {
        let mut bad_kind = job();
        bad_kind.kind = "has space".into();
        let request = v1::EnqueueRequest { jobs: vec![job(), bad_kind] };
        assert_eq!(field_of(enqueue(request, LIMITS)), "jobs[1].kind");

        let mut big = job();
        big.payload = vec![0; 1025];
        assert_eq!(field_of(enqueue(v1::EnqueueRequest { jobs: vec![big] }, LIMITS)), "jobs[0].payload");

        let mut both = job();
        both.run_at = Some(prost_types::Timestamp { seconds: 1, nanos: 0 });
        both.delay = Some(prost_types::Duration { seconds: 1, nanos: 0 });
        assert_eq!(field_of(enqueue(v1::EnqueueRequest { jobs: vec![both] }, LIMITS)), "jobs[0].run_at");

        let mut negative = job();
        negative.delay = Some(prost_types::Duration { seconds: -1, nanos: 0 });
        assert_eq!(field_of(enqueue(v1::EnqueueRequest { jobs: vec![negative] }, LIMITS)), "jobs[0].delay");

        assert_eq!(field_of(enqueue(v1::EnqueueRequest { jobs: vec![] }, LIMITS)), "jobs");
        let too_many = v1::EnqueueRequest { jobs: vec![job(); MAX_JOBS_PER_ENQUEUE + 1] };
        assert_eq!(field_of(enqueue(too_many, LIMITS)), "jobs");
    }

    #[test]
    fn enqueue_accepts_a_full_job() {
        let mut full = job();
        full.attributes.insert("traceparent".into(), "00-abc-def-01".into());
        full.ordering_key = "crate:serde".into();
        full.dedup_key = "publish:serde:1.0.0".into();
        full.max_attempts = 3;
        full.delay = Some(prost_types::Duration { seconds: 5, nanos: 0 });
        let records = enqueue(v1::EnqueueRequest { jobs: vec![full] }, LIMITS).expect("valid");
        assert_eq!(records[0].max_attempts, Some(3));
        assert_eq!(records[0].run_at, RunAt::After(Duration::from_secs(5)));
        assert_eq!(records[0].ordering_key.as_deref(), Some("crate:serde"));
        assert!(records[0].attributes_json.contains("traceparent"));
    }

    #[test]
    fn ids_and_tokens_are_checked() {
        assert_eq!(job_id("job_id", "42").ok(), Some(42));
        assert!(job_id("job_id", "").is_err());
        assert!(job_id("job_id", "-3").is_err());
        assert!(job_id("job_id", "abc").is_err());
        assert!(lease_token("lease_token", "not-a-uuid").is_err());
        assert!(lease_token("lease_token", &Uuid::new_v4().to_string()).is_ok());
    }

    #[test]
    fn lease_refs_name_their_item() {
        let token = Uuid::new_v4().to_string();
        assert_eq!(lease_ref(Some(("leases", 2)), "42", &token).ok(), Some((42, token.parse().expect("uuid"))));
        let field = |result: Result<(i64, Uuid)>| match result {
            Err(Error::Invalid { field, .. }) => field,
            other => panic!("expected a validation error, got {other:?}"),
        };
        assert_eq!(field(lease_ref(Some(("leases", 2)), "x", &token)), "leases[2].job_id");
        assert_eq!(field(lease_ref(Some(("leases", 0)), "42", "x")), "leases[0].lease_token");
        assert_eq!(field(lease_ref(None, "", &token)), "job_id");
    }

    #[test]
    fn fields_are_spelled_as_the_request_nests_them() {
        assert_eq!(Field::from("queue").to_string(), "queue");
        assert_eq!(Field::of_item("jobs", 3, "queue").to_string(), "jobs[3].queue");
        assert_eq!(Field::element("open.kinds", 1).to_string(), "open.kinds[1]");
        let open = v1::OpenLease {
            worker_id: "w".into(),
            queues: vec!["ok".into(), "not ok".into()],
            max_in_flight: 1,
            ..Default::default()
        };
        match open_lease(&open) {
            Err(Error::Invalid { field, .. }) => assert_eq!(field, "open.queues[1]"),
            other => panic!("expected a validation error, got {other:?}"),
        }
    }

    #[test]
    fn attributes_become_a_json_object() {
        let records = enqueue(v1::EnqueueRequest { jobs: vec![job()] }, LIMITS).expect("valid");
        assert_eq!(records[0].attributes_json, "{}");
        let mut with = job();
        with.attributes.insert("team".into(), "search \"core\"".into());
        let records = enqueue(v1::EnqueueRequest { jobs: vec![with] }, LIMITS).expect("valid");
        let parsed: serde_json::Value = serde_json::from_str(&records[0].attributes_json).expect("json");
        assert_eq!(parsed, serde_json::json!({ "team": "search \"core\"" }));
        let mut nul = job();
        nul.attributes.insert("k".into(), "a\0b".into());
        assert_eq!(field_of(enqueue(v1::EnqueueRequest { jobs: vec![job(), nul] }, LIMITS)), "jobs[1].attributes");
    }

    #[test]
    fn errors_are_truncated_on_character_boundaries() {
        let long = "é".repeat(MAX_ERROR_BYTES);
        let cut = truncate_error(&long);
        assert!(cut.len() <= MAX_ERROR_BYTES);
        assert!(cut.chars().all(|character| character == 'é'));
    }
}
