//! `workbroker work`: a tiny manual worker for first sessions.
//!
//! It opens a Lease stream with `max_in_flight = --max-jobs`, prints each job
//! as it arrives, and holds the jobs until it has `--max-jobs` of them or
//! `--wait` has passed. Then it settles them all at once over one Ack stream
//! (or one Nack stream with `--fail`), prints the outcomes and closes the
//! lease stream, reading it to its end.
//!
//! Once it has its jobs, the CLI sends `drain` on the lease stream: the
//! broker refills no freed slot, and a job it may already have pushed into one
//! goes back without using an attempt when the stream closes. The CLI settles
//! its jobs in one round, keeps reading for a short grace so that such a job
//! arrives before the close, and reports each of them with its state after
//! the close (`handed back`).

use std::io::Write;
use std::time::Duration;

use serde_json::{Value, json};
use tokio_stream::StreamExt;
use tokio_stream::wrappers::UnboundedReceiverStream;
use tonic::transport::Channel;
use workbroker_api::v1;
use workbroker_api::v1::broker_client::BrokerClient;

use super::output::{attempts_cell, bytes_text, job_json, outcome_name, state_name, time_cell, time_json, write_json};
use super::{ClientOptions, Error, Result, parse_seconds};

/// How long closing the lease stream may take (the broker releases what it
/// still holds before it ends the stream).
const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);

/// How long the lease stream stays open after the settles, so that a job the
/// broker pushes into the freed slots arrives (and is reported) before the
/// close rather than during it.
const SETTLE_GRACE: Duration = Duration::from_millis(300);

/// Longest worker id the broker accepts.
const MAX_WORKER_ID_CHARS: usize = 256;

/// Flags of `workbroker work`.
#[derive(clap::Args, Clone, Debug)]
pub struct WorkArgs {
    #[command(flatten)]
    pub options: ClientOptions,

    /// Queue to lease from.
    #[arg(long)]
    pub queue: String,

    /// Only jobs of this kind (repeatable; default: every kind).
    #[arg(long = "kind", value_name = "KIND")]
    pub kinds: Vec<String>,

    /// Most jobs to take (the stream's max_in_flight).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub max_jobs: u32,

    /// Nack the jobs instead of acking them.
    #[arg(long)]
    pub fail: bool,

    /// Result stored with each ack (with --fail: the error text of the nack).
    #[arg(long)]
    pub result: Option<String>,

    /// Seconds to wait for jobs; with none, print `no job` and exit 0.
    #[arg(long, value_name = "SECONDS", default_value = "10", value_parser = parse_seconds)]
    pub wait: Duration,
}

/// `cli-<hostname>`, else `cli-<pid>`.
fn worker_id() -> String {
    let hostname = std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/proc/sys/kernel/hostname").ok())
        .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
        .map(|name| name.trim().to_owned())
        .filter(|name| !name.is_empty());
    let id = match hostname {
        Some(hostname) => format!("cli-{hostname}"),
        None => format!("cli-{}", std::process::id()),
    };
    id.chars().take(MAX_WORKER_ID_CHARS).collect()
}

fn job_id_of(leased: &v1::LeasedJob) -> String {
    leased.job.as_ref().map(|job| job.job_id.clone()).unwrap_or_default()
}

/// How one job was settled.
struct Settled {
    outcome: i32,
    message: String,
    next_state: Option<i32>,
}

/// Runs `workbroker work`.
pub(super) async fn run(args: WorkArgs, out: &mut (dyn Write + Send)) -> Result<()> {
    let json = args.options.json;
    let worker_id = worker_id();
    let mut broker = args.options.broker().await?;

    let (requests, receiver) = tokio::sync::mpsc::unbounded_channel();
    let open = v1::LeaseRequest {
        request: Some(v1::lease_request::Request::Open(v1::OpenLease {
            worker_id: worker_id.clone(),
            queues: vec![args.queue.clone()],
            kinds: args.kinds.clone(),
            lease_duration: None,
            max_in_flight: args.max_jobs,
        })),
    };
    requests.send(open).map_err(|_| Error::Protocol("the lease stream closed before it opened".to_owned()))?;
    let mut responses = broker.lease(UnboundedReceiverStream::new(receiver)).await?.into_inner();

    let deadline = tokio::time::Instant::now() + args.wait;
    let mut held: Vec<v1::LeasedJob> = Vec::new();
    let mut cancelled: Vec<String> = Vec::new();
    let mut stream_ended = false;
    while held.len() < args.max_jobs as usize {
        let message = match tokio::time::timeout_at(deadline, responses.message()).await {
            Err(_elapsed) => break,
            Ok(message) => message?,
        };
        let Some(message) = message else {
            stream_ended = true;
            break;
        };
        match message.response {
            Some(v1::lease_response::Response::Jobs(leased)) => {
                for job in leased.jobs {
                    if !json {
                        write_leased(out, &job)?;
                    }
                    held.push(job);
                }
            }
            Some(v1::lease_response::Response::Cancelled(notice)) => {
                held.retain(|job| job.lease_token != notice.lease_token);
                if !json {
                    writeln!(out, "job {} was cancelled; dropped it", notice.job_id)?;
                }
                cancelled.push(notice.job_id);
            }
            None => {}
        }
    }
    // Ask for no more jobs: freed slots are not refilled, and anything left
    // when the stream closes goes back without using an attempt.
    if !stream_ended {
        let drain = v1::LeaseRequest { request: Some(v1::lease_request::Request::Drain(v1::Drain {})) };
        let _ = requests.send(drain);
    }

    if held.is_empty() {
        let handed_back = close_lease_stream(&mut broker, requests, responses, stream_ended, Duration::ZERO).await;
        if json {
            let document = json!({
                "worker_id": worker_id,
                "jobs": [],
                "cancelled": cancelled,
                "handed_back": handed_back_json(&handed_back),
            });
            return write_json(out, &document);
        }
        writeln!(out, "no job")?;
        return write_handed_back(out, &handed_back);
    }
    if stream_ended && !json {
        writeln!(out, "the broker closed the lease stream; settling anyway (expect STALE_LEASE)")?;
    }

    let settled = if args.fail {
        nack_all(&mut broker, &held, &args, &worker_id).await
    } else {
        ack_all(&mut broker, &held, &args).await
    };
    // Closing the lease stream only now keeps our leases until the settles
    // landed (see the module docs).
    let handed_back = close_lease_stream(&mut broker, requests, responses, stream_ended, SETTLE_GRACE).await;
    let settled = settled?;

    let mut failures = Vec::new();
    let mut documents = Vec::new();
    for (job, settled) in held.iter().zip(&settled) {
        let job_id = job_id_of(job);
        let outcome = outcome_name(settled.outcome);
        if settled.outcome != v1::Outcome::Ok as i32 {
            failures.push(format!("job {job_id}: {outcome} {}", settled.message));
        }
        if json {
            documents.push(json!({
                "job": job.job.as_ref().map_or(Value::Null, job_json),
                "lease_token": job.lease_token,
                "lease_expires_at": time_json(job.lease_expires_at.as_ref()),
                "attempt": job.attempt,
                "settled": if args.fail { "nack" } else { "ack" },
                "outcome": outcome,
                "message": settled.message,
                "next_state": settled.next_state.map(state_name),
            }));
            continue;
        }
        let verb = if args.fail { "nacked" } else { "acked" };
        let mut line = format!("{verb} job {job_id}: {outcome}");
        if let Some(next_state) = settled.next_state.filter(|state| *state != 0) {
            line.push_str(&format!(", now {}", state_name(next_state)));
        }
        if !settled.message.is_empty() {
            line.push_str(&format!(" ({})", settled.message));
        }
        writeln!(out, "{line}")?;
    }
    if json {
        let document = json!({
            "worker_id": worker_id,
            "jobs": documents,
            "cancelled": cancelled,
            "handed_back": handed_back_json(&handed_back),
        });
        write_json(out, &document)?;
    } else {
        write_handed_back(out, &handed_back)?;
    }
    match failures.first() {
        None => Ok(()),
        Some(first) => Err(Error::NotSettled { failed: failures.len(), total: held.len(), first: first.clone() }),
    }
}

/// A job the broker pushed after the CLI stopped taking jobs, and the job as
/// it is once the stream closed (`None` if it could not be read).
struct HandedBack {
    leased: v1::LeasedJob,
    now: Option<v1::Job>,
}

/// Reads the lease stream for `grace` more (a settle may have refilled the
/// window), half-closes it and reads it to its end, which the broker sends
/// after it released whatever the stream still held. Returns the jobs pushed
/// after the CLI stopped taking them, read again: they are back in the queue
/// (or dead, when that lease was their last attempt).
async fn close_lease_stream(
    broker: &mut BrokerClient<Channel>,
    requests: tokio::sync::mpsc::UnboundedSender<v1::LeaseRequest>,
    mut responses: tonic::Streaming<v1::LeaseResponse>,
    stream_ended: bool,
    grace: Duration,
) -> Vec<HandedBack> {
    let mut pushed: Vec<v1::LeasedJob> = Vec::new();
    if !stream_ended {
        let grace_end = tokio::time::Instant::now() + grace;
        while let Ok(Ok(Some(message))) = tokio::time::timeout_at(grace_end, responses.message()).await {
            if let Some(v1::lease_response::Response::Jobs(leased)) = message.response {
                pushed.extend(leased.jobs);
            }
        }
        drop(requests);
        let deadline = tokio::time::Instant::now() + CLOSE_TIMEOUT;
        while let Ok(Ok(Some(message))) = tokio::time::timeout_at(deadline, responses.message()).await {
            if let Some(v1::lease_response::Response::Jobs(leased)) = message.response {
                pushed.extend(leased.jobs);
            }
        }
    }
    let mut handed_back = Vec::with_capacity(pushed.len());
    for leased in pushed {
        let now =
            broker.get_job(v1::GetJobRequest { job_id: job_id_of(&leased) }).await.ok().map(|job| job.into_inner());
        handed_back.push(HandedBack { leased, now });
    }
    handed_back
}

fn handed_back_json(handed_back: &[HandedBack]) -> Value {
    Value::Array(
        handed_back
            .iter()
            .map(|job| {
                json!({
                    "job_id": job_id_of(&job.leased),
                    "state": job.now.as_ref().map(|now| state_name(now.state)),
                    "attempt": job.now.as_ref().map_or(job.leased.attempt, |now| now.attempt),
                    "max_attempts": job.leased.job.as_ref().map(|leased| leased.max_attempts),
                })
            })
            .collect(),
    )
}

fn write_handed_back(out: &mut dyn Write, handed_back: &[HandedBack]) -> Result<()> {
    for job in handed_back {
        let (state, attempts) = match (&job.now, &job.leased.job) {
            (Some(now), _) => (state_name(now.state), attempts_cell(now)),
            (None, Some(leased)) => ("unknown".to_owned(), attempts_cell(leased)),
            (None, None) => ("unknown".to_owned(), job.leased.attempt.to_string()),
        };
        writeln!(
            out,
            "job {} was pushed after the settle and handed back as the stream closed: now {state}, attempt {attempts} \
             (a lease counts as an attempt)",
            job_id_of(&job.leased),
        )?;
    }
    Ok(())
}

fn write_leased(out: &mut dyn Write, leased: &v1::LeasedJob) -> Result<()> {
    match &leased.job {
        Some(job) => writeln!(
            out,
            "leased job {}  queue {}  kind {}  attempt {}  lease until {}\n  payload: {}",
            job.job_id,
            job.queue,
            job.kind,
            attempts_cell(job),
            time_cell(leased.lease_expires_at.as_ref()),
            bytes_text(&job.payload),
        )?,
        None => writeln!(out, "leased a job without its record (token {})", leased.lease_token)?,
    }
    Ok(())
}

async fn ack_all(broker: &mut BrokerClient<Channel>, held: &[v1::LeasedJob], args: &WorkArgs) -> Result<Vec<Settled>> {
    let result = args.result.clone().unwrap_or_default().into_bytes();
    let acks: Vec<v1::AckRequest> = held
        .iter()
        .map(|job| v1::AckRequest {
            job_id: job_id_of(job),
            lease_token: job.lease_token.clone(),
            result: result.clone(),
        })
        .collect();
    let mut responses = broker.ack(tokio_stream::iter(acks)).await?.into_inner();
    let mut settled = Vec::with_capacity(held.len());
    while let Some(response) = responses.next().await {
        let response = response?;
        settled.push(Settled { outcome: response.outcome, message: response.message, next_state: None });
    }
    expect_count(&settled, held.len(), "Ack")?;
    Ok(settled)
}

async fn nack_all(
    broker: &mut BrokerClient<Channel>,
    held: &[v1::LeasedJob],
    args: &WorkArgs,
    worker_id: &str,
) -> Result<Vec<Settled>> {
    let error =
        args.result.clone().unwrap_or_else(|| format!("failed by hand with `workbroker work --fail` ({worker_id})"));
    let nacks: Vec<v1::NackRequest> = held
        .iter()
        .map(|job| v1::NackRequest {
            job_id: job_id_of(job),
            lease_token: job.lease_token.clone(),
            error: error.clone(),
            retry_after: None,
            permanent: false,
        })
        .collect();
    let mut responses = broker.nack(tokio_stream::iter(nacks)).await?.into_inner();
    let mut settled = Vec::with_capacity(held.len());
    while let Some(response) = responses.next().await {
        let response = response?;
        settled.push(Settled {
            outcome: response.outcome,
            message: response.message,
            next_state: Some(response.next_state),
        });
    }
    expect_count(&settled, held.len(), "Nack")?;
    Ok(settled)
}

fn expect_count(settled: &[Settled], expected: usize, rpc: &str) -> Result<()> {
    if settled.len() == expected {
        Ok(())
    } else {
        Err(Error::Protocol(format!("{rpc} answered {} of {expected} requests", settled.len())))
    }
}
