//! The operator CLI: `workbroker` subcommands that talk to a running broker
//! over gRPC (`enqueue`, `stats`, `jobs`, `dead`, `queues`, `cluster`, `work`).
//!
//! Every command writes its output to a `&mut dyn Write` and returns a typed
//! [`Error`], so `main.rs` only prints and sets the exit code, and tests run
//! the CLI in-process with [`run`] / [`run_with_input`] against a real broker.
//!
//! Output is an aligned table (or `key: value` lines for one object) by
//! default; `--json` prints one JSON document instead (`jobs watch --json`
//! prints one document per line, as the changes stream in). In JSON, payloads
//! and results are text under `payload` / `result` when they are valid UTF-8,
//! else base64 under `payload_base64` / `result_base64`; timestamps are
//! RFC 3339; durations are seconds as numbers.

use std::ffi::OsString;
use std::io::{Read, Write};
use std::time::Duration;

use tonic::transport::{Channel, Endpoint};
use workbroker_api::v1::admin_client::AdminClient;
use workbroker_api::v1::broker_client::BrokerClient;

mod cluster;
mod dead;
mod enqueue;
mod jobs;
pub mod output;
mod queues;
mod stats;
mod work;

pub use cluster::ClusterArgs;
pub use dead::{DeadArgs, DeadCommand, DeadListArgs, DeadRedriveArgs};
pub use enqueue::EnqueueArgs;
pub use jobs::{JobIdArgs, JobsArgs, JobsCommand, JobsListArgs, StateArg};
pub use queues::{QueueNameArgs, QueuesArgs, QueuesCommand, QueuesConfigureArgs};
pub use stats::StatsArgs;
pub use work::WorkArgs;

/// Endpoint used when neither `--endpoint` nor `WORKBROKER_ENDPOINT` is given.
pub const DEFAULT_ENDPOINT: &str = "http://127.0.0.1:50051";

/// How long connecting to the broker may take before the command fails.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Largest response message the CLI decodes (job pages can carry big payloads).
const MAX_DECODED_MESSAGE_BYTES: usize = 1 << 30;

/// Errors of the client subcommands. Each displays as one line; gRPC errors
/// start with the status code name (`INVALID_ARGUMENT: jobs[0].queue: ...`).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The command line could not be parsed (only from [`run`]; the binary
    /// lets clap report these itself).
    #[error("{0}")]
    Usage(String),
    /// A flag's value was refused before anything was sent.
    #[error("invalid {flag}: {reason}")]
    InvalidFlag {
        /// The flag at fault, e.g. `--attribute`.
        flag: String,
        /// Why it was refused.
        reason: String,
    },
    /// The broker could not be reached.
    #[error("UNAVAILABLE: cannot connect to {endpoint}: {reason}")]
    Connect {
        /// The endpoint that was tried.
        endpoint: String,
        /// The transport error and its causes, on one line.
        reason: String,
    },
    /// The broker answered with an error status.
    #[error("{}", status_line(.0))]
    Status(#[from] tonic::Status),
    /// A payload file (or stdin) could not be read.
    #[error("cannot read {path}: {source}")]
    ReadInput {
        /// The file, or `stdin`.
        path: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The output could not be written.
    #[error("cannot write output: {0}")]
    Output(#[from] std::io::Error),
    /// The output could not be encoded as JSON.
    #[error("cannot encode JSON output: {0}")]
    Json(#[from] serde_json::Error),
    /// The broker broke the protocol (e.g. a response count that does not match).
    #[error("unexpected answer from the broker: {0}")]
    Protocol(String),
    /// Some jobs taken by `work` could not be settled (stale lease, not found...).
    #[error("{failed} of {total} jobs were not settled: {first}")]
    NotSettled {
        /// How many settles did not answer OK.
        failed: usize,
        /// How many jobs were settled in all.
        total: usize,
        /// The first failure, `job <id>: <OUTCOME> <message>`.
        first: String,
    },
}

impl Error {
    /// The error as a single line (newlines folded into spaces), for `error: ...`.
    pub fn one_line(&self) -> String {
        one_line(&self.to_string())
    }
}

/// `text` with every run of line breaks folded into one space.
fn one_line(text: &str) -> String {
    text.split(['\n', '\r']).map(str::trim).filter(|part| !part.is_empty()).collect::<Vec<_>>().join(" ")
}

/// Result of the CLI functions.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// The canonical name of a gRPC status code, e.g. `INVALID_ARGUMENT`.
pub fn code_name(code: tonic::Code) -> &'static str {
    match code {
        tonic::Code::Ok => "OK",
        tonic::Code::Cancelled => "CANCELLED",
        tonic::Code::Unknown => "UNKNOWN",
        tonic::Code::InvalidArgument => "INVALID_ARGUMENT",
        tonic::Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        tonic::Code::NotFound => "NOT_FOUND",
        tonic::Code::AlreadyExists => "ALREADY_EXISTS",
        tonic::Code::PermissionDenied => "PERMISSION_DENIED",
        tonic::Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        tonic::Code::FailedPrecondition => "FAILED_PRECONDITION",
        tonic::Code::Aborted => "ABORTED",
        tonic::Code::OutOfRange => "OUT_OF_RANGE",
        tonic::Code::Unimplemented => "UNIMPLEMENTED",
        tonic::Code::Internal => "INTERNAL",
        tonic::Code::Unavailable => "UNAVAILABLE",
        tonic::Code::DataLoss => "DATA_LOSS",
        tonic::Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

fn status_line(status: &tonic::Status) -> String {
    let name = code_name(status.code());
    let message = one_line(status.message());
    if message.is_empty() { name.to_owned() } else { format!("{name}: {message}") }
}

/// `error` and its chain of sources, joined with `: ` (duplicates skipped).
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut parts: Vec<String> = vec![error.to_string()];
    let mut source = error.source();
    while let Some(cause) = source {
        let text = cause.to_string();
        if parts.last() != Some(&text) {
            parts.push(text);
        }
        source = cause.source();
    }
    one_line(&parts.join(": "))
}

/// Flags every client subcommand takes.
#[derive(clap::Args, Clone, Debug)]
pub struct ClientOptions {
    /// gRPC endpoint of the broker (`http://` is assumed when no scheme is given).
    #[arg(
        long,
        env = "WORKBROKER_ENDPOINT",
        default_value = DEFAULT_ENDPOINT,
        global = true
    )]
    pub endpoint: String,

    /// Print one JSON document instead of a table.
    #[arg(long, global = true)]
    pub json: bool,
}

impl ClientOptions {
    /// The endpoint with a scheme.
    fn endpoint_url(&self) -> String {
        if self.endpoint.contains("://") { self.endpoint.clone() } else { format!("http://{}", self.endpoint) }
    }

    /// A connected channel to the broker.
    async fn channel(&self) -> Result<Channel> {
        let url = self.endpoint_url();
        let endpoint = Endpoint::from_shared(url.clone()).map_err(|error| Error::InvalidFlag {
            flag: "--endpoint".to_owned(),
            reason: format!("{url:?} is not a URL: {}", error_chain(&error)),
        })?;
        endpoint
            .connect_timeout(CONNECT_TIMEOUT)
            .connect()
            .await
            .map_err(|error| Error::Connect { endpoint: url, reason: error_chain(&error) })
    }

    /// A `Broker` client on a fresh connection.
    async fn broker(&self) -> Result<BrokerClient<Channel>> {
        Ok(BrokerClient::new(self.channel().await?)
            .max_decoding_message_size(MAX_DECODED_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_DECODED_MESSAGE_BYTES))
    }

    /// An `Admin` client on a fresh connection.
    async fn admin(&self) -> Result<AdminClient<Channel>> {
        Ok(AdminClient::new(self.channel().await?)
            .max_decoding_message_size(MAX_DECODED_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_DECODED_MESSAGE_BYTES))
    }
}

/// The client subcommands, flattened into the `workbroker` binary's commands
/// next to `serve` and `migrate`.
#[derive(clap::Subcommand, Debug)]
pub enum Command {
    /// Enqueue a job (or --count copies of it).
    Enqueue(EnqueueArgs),
    /// Show per-state counts of one queue, or of every queue.
    Stats(StatsArgs),
    /// List, read, cancel and watch jobs.
    Jobs(JobsArgs),
    /// List and redrive dead jobs.
    Dead(DeadArgs),
    /// Pause, resume and configure queues.
    Queues(QueuesArgs),
    /// Show the broker cluster: members, leader, shard map.
    Cluster(ClusterArgs),
    /// Lease and settle jobs by hand: a tiny worker for first sessions.
    Work(WorkArgs),
}

/// The client subcommands as a program of their own, for [`run`].
#[derive(clap::Parser, Debug)]
#[command(name = "workbroker", about = "Operator commands of workbroker")]
struct ClientCli {
    #[command(subcommand)]
    command: Command,
}

/// Parses `args` (program name first, as `std::env::args()` gives them) as a
/// client subcommand and runs it, reading `--payload-file -` from stdin.
pub async fn run<I, T>(args: I, out: &mut (dyn Write + Send)) -> Result<()>
where
    I: IntoIterator<Item = T>,
    T: Into<OsString> + Clone,
{
    run_with_input(args, &mut std::io::stdin(), out).await
}

/// Like [`run`], with `input` standing in for stdin.
pub async fn run_with_input<I, T>(args: I, input: &mut (dyn Read + Send), out: &mut (dyn Write + Send)) -> Result<()>
where
    I: IntoIterator<Item = T>,
    T: Into<OsString> + Clone,
{
    let cli = match <ClientCli as clap::Parser>::try_parse_from(args) {
        Ok(cli) => cli,
        Err(error) => {
            return match error.kind() {
                clap::error::ErrorKind::DisplayHelp
                | clap::error::ErrorKind::DisplayVersion
                | clap::error::ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => {
                    write!(out, "{}", error.render())?;
                    Ok(())
                }
                _ => {
                    let rendered = error.render().to_string();
                    let first = rendered.lines().next().unwrap_or_default();
                    Err(Error::Usage(first.strip_prefix("error: ").unwrap_or(first).to_owned()))
                }
            };
        }
    };
    execute(cli.command, input, out).await
}

/// Runs a parsed client subcommand.
pub async fn execute(command: Command, input: &mut (dyn Read + Send), out: &mut (dyn Write + Send)) -> Result<()> {
    match command {
        Command::Enqueue(args) => enqueue::run(args, input, out).await,
        Command::Stats(args) => stats::run(args, out).await,
        Command::Jobs(args) => jobs::run(args, out).await,
        Command::Dead(args) => dead::run(args, out).await,
        Command::Queues(args) => queues::run(args, out).await,
        Command::Cluster(args) => cluster::run(args, out).await,
        Command::Work(args) => work::run(args, out).await,
    }?;
    out.flush()?;
    Ok(())
}

/// Parses a duration flag: seconds as a non-negative decimal number (`0.5`).
pub fn parse_seconds(text: &str) -> Result<Duration, String> {
    let seconds: f64 = text.trim().parse().map_err(|_| format!("{text:?} is not a number of seconds"))?;
    if !seconds.is_finite() {
        return Err(format!("{text:?} is not a finite number of seconds"));
    }
    if seconds < 0.0 {
        return Err(format!("{text:?} is negative"));
    }
    Duration::try_from_secs_f64(seconds).map_err(|error| format!("{text:?}: {error}"))
}

/// Parses a finite decimal number (`1.5`).
pub fn parse_finite(text: &str) -> Result<f64, String> {
    let value: f64 = text.trim().parse().map_err(|_| format!("{text:?} is not a number"))?;
    if value.is_finite() { Ok(value) } else { Err(format!("{text:?} is not a finite number")) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seconds_parse_decimals_and_refuse_negatives() {
        assert_eq!(parse_seconds("0.5"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_seconds("30"), Ok(Duration::from_secs(30)));
        assert!(parse_seconds("-1").is_err());
        assert!(parse_seconds("NaN").is_err());
        assert!(parse_seconds("inf").is_err());
        assert!(parse_seconds("ten").is_err());
    }

    #[test]
    fn status_errors_are_one_line_with_the_code_name() {
        let error = Error::from(tonic::Status::invalid_argument("jobs[0].queue: must not be empty"));
        assert_eq!(error.one_line(), "INVALID_ARGUMENT: jobs[0].queue: must not be empty");
        let multi = Error::from(tonic::Status::internal("first\nsecond\r\n"));
        assert_eq!(multi.one_line(), "INTERNAL: first second");
        assert_eq!(Error::from(tonic::Status::not_found("")).one_line(), "NOT_FOUND");
    }

    #[test]
    fn the_command_tree_is_consistent() {
        <ClientCli as clap::CommandFactory>::command().debug_assert();
    }
}
