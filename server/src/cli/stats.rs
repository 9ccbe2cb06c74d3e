//! `workbroker stats [QUEUE]`: per-state counts, waiting age and watermark.

use std::io::Write;

use serde_json::json;
use workbroker_api::v1;

use super::output::{Table, duration_cell, duration_json, write_json, yes_no};
use super::{ClientOptions, Result};

/// Flags of `workbroker stats`.
#[derive(clap::Args, Clone, Debug)]
pub struct StatsArgs {
    #[command(flatten)]
    pub options: ClientOptions,

    /// Only this queue (default: every queue).
    pub queue: Option<String>,
}

/// Runs `workbroker stats`.
pub(super) async fn run(args: StatsArgs, out: &mut (dyn Write + Send)) -> Result<()> {
    let mut admin = args.options.admin().await?;
    let response = admin
        .get_queue_stats(v1::GetQueueStatsRequest { queue: args.queue.clone().unwrap_or_default() })
        .await?
        .into_inner();
    if args.options.json {
        let queues: Vec<_> = response
            .queues
            .iter()
            .map(|stats| {
                json!({
                    "queue": stats.queue,
                    "scheduled": stats.scheduled,
                    "available": stats.available,
                    "leased": stats.leased,
                    "completed": stats.completed,
                    "dead": stats.dead,
                    "cancelled": stats.cancelled,
                    "oldest_available_age": duration_json(stats.oldest_available_age.as_ref()),
                    "completed_watermark": stats.completed_watermark,
                    "last_sequence": stats.last_sequence,
                    "paused": stats.paused,
                })
            })
            .collect();
        return write_json(out, &json!({ "queues": queues }));
    }
    if response.queues.is_empty() {
        writeln!(out, "no queues")?;
        return Ok(());
    }
    let mut table = Table::new(&[
        "QUEUE",
        "SCHEDULED",
        "AVAILABLE",
        "LEASED",
        "COMPLETED",
        "DEAD",
        "CANCELLED",
        "OLDEST WAITING",
        "WATERMARK",
        "LAST SEQUENCE",
        "PAUSED",
    ]);
    for stats in &response.queues {
        let oldest = match &stats.oldest_available_age {
            Some(age) if stats.available > 0 => duration_cell(Some(age)),
            _ => "-".to_owned(),
        };
        table.push(vec![
            stats.queue.clone(),
            stats.scheduled.to_string(),
            stats.available.to_string(),
            stats.leased.to_string(),
            stats.completed.to_string(),
            stats.dead.to_string(),
            stats.cancelled.to_string(),
            oldest,
            stats.completed_watermark.to_string(),
            stats.last_sequence.to_string(),
            yes_no(stats.paused),
        ]);
    }
    table.write(out)
}
