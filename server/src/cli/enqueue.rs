//! `workbroker enqueue`: one job, or `--count` copies of it in one request.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::path::PathBuf;
use std::time::Duration;

use serde_json::json;
use workbroker_api::time::duration_to_proto;
use workbroker_api::v1;

use super::output::{Table, write_json, yes_no};
use super::{ClientOptions, Error, Result, parse_seconds};

/// Flags of `workbroker enqueue`.
#[derive(clap::Args, Clone, Debug)]
pub struct EnqueueArgs {
    #[command(flatten)]
    pub options: ClientOptions,

    /// Queue to enqueue into (created on first use).
    #[arg(long)]
    pub queue: String,

    /// Job kind, which workers filter on.
    #[arg(long)]
    pub kind: String,

    /// Payload as a string.
    #[arg(long, conflicts_with = "payload_file")]
    pub payload: Option<String>,

    /// Read the payload from a file (`-` for stdin).
    #[arg(long, value_name = "PATH")]
    pub payload_file: Option<PathBuf>,

    /// An attribute `key=value` (repeatable).
    #[arg(long = "attribute", value_name = "KEY=VALUE", value_parser = parse_attribute)]
    pub attributes: Vec<(String, String)>,

    /// Priority; higher is leased first.
    #[arg(long, allow_negative_numbers = true, default_value_t = 0)]
    pub priority: i32,

    /// Earliest run time, RFC 3339 (e.g. 2030-01-01T00:00:00Z).
    #[arg(long, value_name = "RFC3339", value_parser = parse_rfc3339, conflicts_with = "delay")]
    pub run_at: Option<prost_types::Timestamp>,

    /// Run after this many seconds (decimal, e.g. 0.5).
    #[arg(long, value_name = "SECONDS", value_parser = parse_seconds)]
    pub delay: Option<Duration>,

    /// Attempts before the job goes dead (default: the queue's).
    #[arg(long)]
    pub max_attempts: Option<u32>,

    /// Ordering key: jobs sharing it run one at a time, in order.
    #[arg(long)]
    pub ordering_key: Option<String>,

    /// Dedup key: no second non-terminal job with this key is created.
    #[arg(long)]
    pub dedup_key: Option<String>,

    /// Default lease duration of the job, in seconds.
    #[arg(long, value_name = "SECONDS", value_parser = parse_seconds)]
    pub lease_duration: Option<Duration>,

    /// Enqueue this many copies in one request (1 to 1000).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub count: u32,
}

fn parse_attribute(text: &str) -> Result<(String, String), String> {
    match text.split_once('=') {
        Some(("", _)) => Err(format!("{text:?} has an empty key")),
        Some((key, value)) => Ok((key.to_owned(), value.to_owned())),
        None => Err(format!("{text:?} is not key=value")),
    }
}

fn parse_rfc3339(text: &str) -> Result<prost_types::Timestamp, String> {
    let time = chrono::DateTime::parse_from_rfc3339(text.trim())
        .map_err(|error| format!("{text:?} is not an RFC 3339 time: {error}"))?;
    Ok(prost_types::Timestamp {
        seconds: time.timestamp(),
        nanos: i32::try_from(time.timestamp_subsec_nanos()).unwrap_or(0),
    })
}

impl EnqueueArgs {
    fn read_payload(&self, input: &mut dyn Read) -> Result<Vec<u8>> {
        if let Some(text) = &self.payload {
            return Ok(text.clone().into_bytes());
        }
        let Some(path) = &self.payload_file else {
            return Ok(Vec::new());
        };
        if path.as_os_str() == "-" {
            let mut payload = Vec::new();
            input.read_to_end(&mut payload).map_err(|source| Error::ReadInput { path: "stdin".to_owned(), source })?;
            return Ok(payload);
        }
        std::fs::read(path).map_err(|source| Error::ReadInput { path: path.display().to_string(), source })
    }

    fn new_job(&self, payload: Vec<u8>) -> v1::NewJob {
        let attributes: HashMap<String, String> = self.attributes.iter().cloned().collect();
        v1::NewJob {
            queue: self.queue.clone(),
            kind: self.kind.clone(),
            payload,
            attributes,
            priority: self.priority,
            run_at: self.run_at,
            delay: self.delay.map(duration_to_proto),
            max_attempts: self.max_attempts.unwrap_or(0),
            ordering_key: self.ordering_key.clone().unwrap_or_default(),
            dedup_key: self.dedup_key.clone().unwrap_or_default(),
            lease_duration: self.lease_duration.map(duration_to_proto),
        }
    }
}

/// Runs `workbroker enqueue`.
pub(super) async fn run(args: EnqueueArgs, input: &mut (dyn Read + Send), out: &mut (dyn Write + Send)) -> Result<()> {
    let mut seen_keys = std::collections::HashSet::new();
    if let Some((key, _)) = args.attributes.iter().find(|(key, _)| !seen_keys.insert(key.as_str())) {
        return Err(Error::InvalidFlag {
            flag: "--attribute".to_owned(),
            reason: format!("key {key:?} is given more than once"),
        });
    }
    let payload = args.read_payload(input)?;
    let job = args.new_job(payload);
    let jobs = vec![job; args.count as usize];
    let mut client = args.options.broker().await?;
    let response = client.enqueue(v1::EnqueueRequest { jobs }).await?.into_inner();
    if response.jobs.len() != args.count as usize {
        return Err(Error::Protocol(format!(
            "asked to enqueue {} jobs, got {} answers",
            args.count,
            response.jobs.len()
        )));
    }
    if args.options.json {
        let jobs: Vec<_> = response
            .jobs
            .iter()
            .map(|job| {
                json!({
                    "job_id": job.job_id,
                    "deduplicated": job.deduplicated,
                    "sequence": job.sequence,
                })
            })
            .collect();
        return write_json(out, &json!({ "jobs": jobs }));
    }
    let mut table = Table::new(&["JOB ID", "DEDUPLICATED", "SEQUENCE"]);
    for job in &response.jobs {
        table.push(vec![job.job_id.clone(), yes_no(job.deduplicated), job.sequence.to_string()]);
    }
    table.write(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attributes_split_at_the_first_equals_sign() {
        assert_eq!(parse_attribute("trace=a=b"), Ok(("trace".to_owned(), "a=b".to_owned())));
        assert_eq!(parse_attribute("empty="), Ok(("empty".to_owned(), String::new())));
        assert!(parse_attribute("=value").is_err());
        assert!(parse_attribute("novalue").is_err());
    }

    #[test]
    fn run_at_parses_rfc3339_with_offsets() {
        let parsed = parse_rfc3339("2030-01-01T01:00:00.5+01:00");
        assert_eq!(parsed, Ok(prost_types::Timestamp { seconds: 1_893_456_000, nanos: 500_000_000 }));
        assert!(parse_rfc3339("tomorrow").is_err());
    }
}
