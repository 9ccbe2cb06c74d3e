//! `workbroker queues pause|resume|configure`: steer a queue; each prints the
//! queue's resulting settings.

use std::io::Write;
use std::time::Duration;

use workbroker_api::time::duration_to_proto;
use workbroker_api::v1;

use super::output::{queue_info_json, write_json, write_queue_info};
use super::{ClientOptions, Result, parse_finite, parse_seconds};

/// Flags of `workbroker queues`.
#[derive(clap::Args, Clone, Debug)]
pub struct QueuesArgs {
    #[command(flatten)]
    pub options: ClientOptions,

    #[command(subcommand)]
    pub command: QueuesCommand,
}

/// The `workbroker queues` subcommands.
#[derive(clap::Subcommand, Clone, Debug)]
pub enum QueuesCommand {
    /// Stop leasing from a queue (enqueues and acks go on).
    Pause(QueueNameArgs),
    /// Resume leasing from a paused queue.
    Resume(QueueNameArgs),
    /// Change a queue's settings; flags not given stay unchanged.
    Configure(QueuesConfigureArgs),
}

/// Just a queue name.
#[derive(clap::Args, Clone, Debug)]
pub struct QueueNameArgs {
    /// The queue.
    pub queue: String,
}

/// Flags of `workbroker queues configure`.
#[derive(clap::Args, Clone, Debug)]
pub struct QueuesConfigureArgs {
    /// The queue (created if unknown).
    pub queue: String,

    /// Default attempts of new jobs before they go dead.
    #[arg(long)]
    pub max_attempts: Option<u32>,

    /// Default lease duration, in seconds.
    #[arg(long, value_name = "SECONDS", value_parser = parse_seconds)]
    pub lease_duration: Option<Duration>,

    /// First retry delay, in seconds.
    #[arg(long, value_name = "SECONDS", value_parser = parse_seconds)]
    pub backoff_initial: Option<Duration>,

    /// Cap of the retry delay, in seconds.
    #[arg(long, value_name = "SECONDS", value_parser = parse_seconds)]
    pub backoff_max: Option<Duration>,

    /// Growth factor of the retry delay per attempt.
    #[arg(long, value_name = "X", value_parser = parse_finite)]
    pub backoff_multiplier: Option<f64>,

    /// Random fraction taken off each retry delay (0 to 1).
    #[arg(long, value_name = "X", value_parser = parse_finite)]
    pub backoff_jitter: Option<f64>,

    /// How long completed and cancelled jobs are kept, in seconds.
    #[arg(long, value_name = "SECONDS", value_parser = parse_seconds)]
    pub completed_retention: Option<Duration>,
}

/// Runs `workbroker queues ...`.
pub(super) async fn run(args: QueuesArgs, out: &mut (dyn Write + Send)) -> Result<()> {
    let mut admin = args.options.admin().await?;
    let info = match args.command {
        QueuesCommand::Pause(QueueNameArgs { queue }) => admin.pause_queue(v1::PauseQueueRequest { queue }).await?,
        QueuesCommand::Resume(QueueNameArgs { queue }) => admin.resume_queue(v1::ResumeQueueRequest { queue }).await?,
        QueuesCommand::Configure(configure) => {
            admin
                .configure_queue(v1::ConfigureQueueRequest {
                    queue: configure.queue,
                    max_attempts: configure.max_attempts,
                    lease_duration: configure.lease_duration.map(duration_to_proto),
                    backoff_initial: configure.backoff_initial.map(duration_to_proto),
                    backoff_max: configure.backoff_max.map(duration_to_proto),
                    backoff_multiplier: configure.backoff_multiplier,
                    backoff_jitter: configure.backoff_jitter,
                    completed_retention: configure.completed_retention.map(duration_to_proto),
                })
                .await?
        }
    }
    .into_inner();
    if args.options.json { write_json(out, &queue_info_json(&info)) } else { write_queue_info(out, &info) }
}
