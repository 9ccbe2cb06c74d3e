//! `workbroker dead list|redrive`: dead letters and sending them back.

use std::io::Write;

use serde_json::{Value, json};
use workbroker_api::v1;

use super::jobs::list_page;
use super::output::{Table, attempts_cell, job_json, time_cell, truncate, write_json};
use super::{ClientOptions, Result};

/// Jobs per ListJobs page when listing dead letters.
const DEAD_PAGE_SIZE: u32 = 1000;

/// Flags of `workbroker dead`.
#[derive(clap::Args, Clone, Debug)]
pub struct DeadArgs {
    #[command(flatten)]
    pub options: ClientOptions,

    #[command(subcommand)]
    pub command: DeadCommand,
}

/// The `workbroker dead` subcommands.
#[derive(clap::Subcommand, Clone, Debug)]
pub enum DeadCommand {
    /// List the dead jobs of a queue with their last error.
    List(DeadListArgs),
    /// Move dead jobs back to available (all of the queue, or the --job ids).
    Redrive(DeadRedriveArgs),
}

/// Flags of `workbroker dead list`.
#[derive(clap::Args, Clone, Debug)]
pub struct DeadListArgs {
    /// The queue.
    #[arg(long)]
    pub queue: String,
}

/// Flags of `workbroker dead redrive`.
#[derive(clap::Args, Clone, Debug)]
pub struct DeadRedriveArgs {
    /// The queue.
    #[arg(long)]
    pub queue: String,

    /// Only this job (repeatable; default: every dead job of the queue).
    #[arg(long = "job", value_name = "ID")]
    pub job_ids: Vec<String>,

    /// Attempts granted to each redriven job (default: keep its max_attempts).
    #[arg(long)]
    pub max_attempts: Option<u32>,
}

/// Runs `workbroker dead ...`.
pub(super) async fn run(args: DeadArgs, out: &mut (dyn Write + Send)) -> Result<()> {
    let mut admin = args.options.admin().await?;
    match args.command {
        DeadCommand::List(DeadListArgs { queue }) => {
            let mut jobs = Vec::new();
            let mut page_token = String::new();
            loop {
                let page = list_page(&mut admin, &queue, v1::JobState::Dead, DEAD_PAGE_SIZE, page_token).await?;
                jobs.extend(page.jobs);
                page_token = page.next_page_token;
                if page_token.is_empty() {
                    break;
                }
            }
            if args.options.json {
                let jobs: Vec<Value> = jobs.iter().map(job_json).collect();
                return write_json(out, &json!({ "jobs": jobs }));
            }
            if jobs.is_empty() {
                writeln!(out, "no dead jobs in {queue}")?;
                return Ok(());
            }
            let mut table = Table::new(&["JOB ID", "SEQUENCE", "KIND", "ATTEMPT", "FINISHED", "LAST ERROR"]);
            for job in &jobs {
                table.push(vec![
                    job.job_id.clone(),
                    job.sequence.to_string(),
                    job.kind.clone(),
                    attempts_cell(job),
                    time_cell(job.finished_at.as_ref()),
                    truncate(&job.last_error, 100),
                ]);
            }
            table.write(out)
        }
        DeadCommand::Redrive(redrive) => {
            let response = admin
                .redrive_dead_letters(v1::RedriveDeadLettersRequest {
                    queue: redrive.queue.clone(),
                    job_ids: redrive.job_ids,
                    max_attempts: redrive.max_attempts.unwrap_or(0),
                })
                .await?
                .into_inner();
            if args.options.json {
                return write_json(out, &json!({ "redriven": response.redriven, "job_ids": response.job_ids }));
            }
            let noun = if response.redriven == 1 { "job" } else { "jobs" };
            writeln!(out, "redrove {} dead {noun} of {}", response.redriven, redrive.queue)?;
            for job_id in &response.job_ids {
                writeln!(out, "  {job_id}")?;
            }
            Ok(())
        }
    }
}
