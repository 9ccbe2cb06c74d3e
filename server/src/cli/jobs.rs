//! `workbroker jobs list|get|cancel|watch`.

use std::io::Write;

use serde_json::{Value, json};
use tonic::transport::Channel;
use workbroker_api::v1;
use workbroker_api::v1::admin_client::AdminClient;

use super::output::{
    Table, attempts_cell, job_json, now, state_name, time_cell, truncate, write_job, write_json, write_json_line,
};
use super::{ClientOptions, Error, Result};

/// Flags of `workbroker jobs`.
#[derive(clap::Args, Clone, Debug)]
pub struct JobsArgs {
    #[command(flatten)]
    pub options: ClientOptions,

    #[command(subcommand)]
    pub command: JobsCommand,
}

/// The `workbroker jobs` subcommands.
#[derive(clap::Subcommand, Clone, Debug)]
pub enum JobsCommand {
    /// List the jobs of a queue in sequence order, a page at a time.
    List(JobsListArgs),
    /// Show one job.
    Get(JobIdArgs),
    /// Cancel a job that is not terminal yet.
    Cancel(JobIdArgs),
    /// Print a job's state, then each change, until it is terminal.
    Watch(JobIdArgs),
}

/// A job state, as the `--state` flag takes it.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum StateArg {
    /// Ready to be leased.
    Available,
    /// Waiting for its run time.
    Scheduled,
    /// Held by a worker.
    Leased,
    /// Acknowledged.
    Completed,
    /// Attempts used up or rejected permanently.
    Dead,
    /// Cancelled.
    Cancelled,
}

impl From<StateArg> for v1::JobState {
    fn from(state: StateArg) -> Self {
        match state {
            StateArg::Available => v1::JobState::Available,
            StateArg::Scheduled => v1::JobState::Scheduled,
            StateArg::Leased => v1::JobState::Leased,
            StateArg::Completed => v1::JobState::Completed,
            StateArg::Dead => v1::JobState::Dead,
            StateArg::Cancelled => v1::JobState::Cancelled,
        }
    }
}

/// Flags of `workbroker jobs list`.
#[derive(clap::Args, Clone, Debug)]
pub struct JobsListArgs {
    /// The queue to list.
    #[arg(long)]
    pub queue: String,

    /// Only jobs in this state.
    #[arg(long, value_enum)]
    pub state: Option<StateArg>,

    /// Jobs per page (1 to 1000; default: the broker's, 100).
    #[arg(long)]
    pub page_size: Option<u32>,

    /// Continue after a previous page (its `next page token`).
    #[arg(long, value_name = "TOKEN")]
    pub page_token: Option<String>,

    /// Follow page tokens to the last page.
    #[arg(long)]
    pub all: bool,
}

/// A job id.
#[derive(clap::Args, Clone, Debug)]
pub struct JobIdArgs {
    /// The job's id.
    pub job_id: String,
}

/// Runs `workbroker jobs ...`.
pub(super) async fn run(args: JobsArgs, out: &mut (dyn Write + Send)) -> Result<()> {
    let options = &args.options;
    match args.command {
        JobsCommand::List(list) => run_list(options, list, out).await,
        JobsCommand::Get(JobIdArgs { job_id }) => {
            let mut broker = options.broker().await?;
            let job = broker.get_job(v1::GetJobRequest { job_id }).await?.into_inner();
            write_one_job(options, &job, out)
        }
        JobsCommand::Cancel(JobIdArgs { job_id }) => {
            let mut broker = options.broker().await?;
            let response = broker.cancel_job(v1::CancelJobRequest { job_id: job_id.clone() }).await?.into_inner();
            let job = response
                .job
                .ok_or_else(|| Error::Protocol(format!("CancelJob of {job_id} answered without the job")))?;
            write_one_job(options, &job, out)
        }
        JobsCommand::Watch(JobIdArgs { job_id }) => run_watch(options, job_id, out).await,
    }
}

fn write_one_job(options: &ClientOptions, job: &v1::Job, out: &mut dyn Write) -> Result<()> {
    if options.json { write_json(out, &job_json(job)) } else { write_job(out, job) }
}

/// One page of jobs and the token of the next (empty after the last).
pub(super) async fn list_page(
    admin: &mut AdminClient<Channel>,
    queue: &str,
    state: v1::JobState,
    page_size: u32,
    page_token: String,
) -> Result<v1::ListJobsResponse> {
    Ok(admin
        .list_jobs(v1::ListJobsRequest { queue: queue.to_owned(), state: state as i32, page_size, page_token })
        .await?
        .into_inner())
}

async fn run_list(options: &ClientOptions, list: JobsListArgs, out: &mut (dyn Write + Send)) -> Result<()> {
    let mut admin = options.admin().await?;
    let state = list.state.map_or(v1::JobState::Unspecified, Into::into);
    let page_size = list.page_size.unwrap_or(0);
    let mut jobs = Vec::new();
    let mut page_token = list.page_token.clone().unwrap_or_default();
    loop {
        let page = list_page(&mut admin, &list.queue, state, page_size, page_token).await?;
        jobs.extend(page.jobs);
        page_token = page.next_page_token;
        if !list.all || page_token.is_empty() {
            break;
        }
    }
    if options.json {
        let jobs: Vec<Value> = jobs.iter().map(job_json).collect();
        return write_json(out, &json!({ "jobs": jobs, "next_page_token": page_token }));
    }
    if jobs.is_empty() {
        writeln!(out, "no jobs")?;
    } else {
        let mut table =
            Table::new(&["JOB ID", "SEQUENCE", "STATE", "KIND", "ATTEMPT", "PRIORITY", "RUN AT", "LAST ERROR"]);
        for job in &jobs {
            table.push(vec![
                job.job_id.clone(),
                job.sequence.to_string(),
                state_name(job.state),
                job.kind.clone(),
                attempts_cell(job),
                job.priority.to_string(),
                time_cell(job.run_at.as_ref()),
                truncate(&job.last_error, 60),
            ]);
        }
        table.write(out)?;
    }
    if !page_token.is_empty() {
        writeln!(out, "next page token: {page_token}")?;
    }
    Ok(())
}

async fn run_watch(options: &ClientOptions, job_id: String, out: &mut (dyn Write + Send)) -> Result<()> {
    let mut broker = options.broker().await?;
    let mut changes = broker.watch_job(v1::WatchJobRequest { job_id }).await?.into_inner();
    while let Some(job) = changes.message().await? {
        if options.json {
            write_json_line(out, &job_json(&job))?;
            continue;
        }
        let mut line = format!(
            "{}  job {}  {}  attempt {}",
            time_cell(Some(&now())),
            job.job_id,
            state_name(job.state),
            attempts_cell(&job),
        );
        if !job.leased_by.is_empty() {
            line.push_str(&format!("  leased by {}", job.leased_by));
        }
        if !job.last_error.is_empty() {
            line.push_str(&format!("  last error: {}", truncate(&job.last_error, 200)));
        }
        writeln!(out, "{line}")?;
        out.flush()?;
    }
    Ok(())
}
