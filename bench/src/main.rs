//! `workbroker-bench`: runs named scenarios against a broker and reports
//! jobs/s, latency percentiles (HDR histogram), broker CPU and RSS, and the
//! job tables' sizes, as a table and as JSON. With `--ceilings` (the output
//! of `scripts/bench-sql-ceiling.sh`, measured on the same database server in
//! the same run) every figure carries its ratio to the raw SQL ceiling.
//!
//! ```text
//! workbroker-bench --start all                 # start the release broker on a fresh database
//! workbroker-bench --start --repeat 1 --seconds 600 steady   # the 10-minute steady run
//! workbroker-bench --endpoint http://127.0.0.1:50051 --database-url postgres://... drain
//! ```

mod broker;
mod report;
mod scenarios;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Parser, ValueEnum};

use crate::broker::BrokerUnderTest;
use crate::scenarios::Sizes;

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Scenario {
    EnqueueBulk,
    EnqueueSingle,
    Drain,
    Steady,
    Latency,
    Backlog,
    Ordered,
    All,
}

#[derive(Parser, Debug)]
#[command(name = "workbroker-bench", about = "Benchmark scenarios against a workbroker broker")]
struct Args {
    /// Scenarios to run, in order.
    #[arg(value_enum, required = true)]
    scenarios: Vec<Scenario>,
    /// Start the broker binary over a fresh database on DATABASE_URL's server.
    #[arg(long, conflicts_with = "endpoint")]
    start: bool,
    /// Target a running broker instead (its database is --database-url).
    #[arg(long)]
    endpoint: Option<String>,
    /// Process id of a targeted broker, to read its CPU and RSS.
    #[arg(long)]
    broker_pid: Option<u32>,
    /// The database server (with --start) or the broker's database (with --endpoint).
    #[arg(long, env = "DATABASE_URL")]
    database_url: String,
    /// The broker binary for --start (default: next to this binary).
    #[arg(long)]
    broker_binary: Option<PathBuf>,
    /// Listen address of a started broker.
    #[arg(long, default_value = "127.0.0.1:50199")]
    listen: String,
    /// Jobs per scenario (drain, ordered, enqueue-*; jobs drained in backlog).
    #[arg(long, default_value_t = 50_000)]
    jobs: u64,
    /// Producer connections.
    #[arg(long, default_value_t = 4)]
    producers: usize,
    /// HTTP/2 connections the 16 clients of enqueue-single share (2 to 16:
    /// at least one for each of its two threads). 16, the default, gives
    /// each client its own, as each of pgbench's 16 clients has its own;
    /// fewer has several clients' calls share one, as tasks of one process
    /// share a tonic `Channel`.
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u16).range(2..=16))]
    single_connections: u16,
    /// SDK worker processes-in-one (each its own connection).
    #[arg(long, default_value_t = 4)]
    workers: usize,
    /// Jobs each worker holds at once.
    #[arg(long, default_value_t = 500)]
    concurrency: u32,
    /// Duration of steady and latency runs.
    #[arg(long, default_value_t = 20)]
    seconds: u64,
    /// Enqueue rate of the latency scenario (repeat the scenario for several rates).
    #[arg(long = "rate", default_values_t = vec![200_u64, 5000])]
    rates: Vec<u64>,
    /// Jobs queued in the large backlog run.
    #[arg(long, default_value_t = 1_000_000)]
    backlog: u64,
    /// Jobs queued in the small backlog run.
    #[arg(long, default_value_t = 10_000)]
    small_backlog: u64,
    /// Distinct ordering keys of the ordered scenario.
    #[arg(long, default_value_t = 1000)]
    keys: u64,
    /// Leases held at once while RSS is sampled (backlog scenario).
    #[arg(long, default_value_t = 10_000)]
    leases_in_flight: u32,
    /// Jobs drained (and timed) from each backlog per round.
    #[arg(long, default_value_t = 10_000)]
    backlog_drain: u64,
    /// Timed rounds of the backlog scenario in each run (after an untimed
    /// one); each round drains both backlogs back to back.
    #[arg(long, default_value_t = 9)]
    backlog_rounds: usize,
    /// Completed-job retention of the steady scenario's queue, in seconds.
    #[arg(long, default_value_t = 60)]
    steady_retention_seconds: u64,
    /// Seconds between two samples of the table sizes in the steady scenario.
    #[arg(long, default_value_t = 60)]
    size_sample_seconds: u64,
    /// Runs of each scenario; the table shows the median.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u16).range(1..=100))]
    repeat: u16,
    /// Endpoints the drain workers connect to, comma-separated (e.g. every
    /// replica of a cluster); default: the broker under test.
    #[arg(long)]
    worker_endpoints: Option<String>,
    /// Ceilings JSON from scripts/bench-sql-ceiling.sh.
    #[arg(long)]
    ceilings: Option<PathBuf>,
    /// Measure the scenario's raw SQL ceiling with this script
    /// (scripts/bench-sql-ceiling.sh) just before each run of a scenario that
    /// has one, and report each run's ratio to it ("paired").
    #[arg(long)]
    ceiling_script: Option<PathBuf>,
    /// Seconds of each timed pgbench run of --ceiling-script.
    #[arg(long, default_value_t = 10)]
    ceiling_seconds: u64,
    /// Where to write the JSON report.
    #[arg(long)]
    json: Option<PathBuf>,
}

impl Scenario {
    /// The raw SQL ceiling (a name of scripts/bench-sql-ceiling.sh) the
    /// scenario's rate is compared with.
    fn ceiling(self) -> Option<&'static str> {
        match self {
            Self::EnqueueBulk => Some("bulk_insert_1000"),
            Self::EnqueueSingle => Some("single_insert_16"),
            Self::Drain | Self::Ordered => Some("drain_lease100_delete100"),
            Self::Steady => Some("lifecycle_100"),
            Self::Latency | Self::Backlog | Self::All => None,
        }
    }
}

/// Measures one ceiling once with `script` (see `--ceiling-script`), on the
/// server of `database_url`.
async fn measure_ceiling(script: &Path, database_url: &str, name: &'static str, seconds: u64) -> Result<f64> {
    let output = std::env::temp_dir().join(format!("workbroker-bench-ceiling-{}.json", std::process::id()));
    let status = {
        let mut command = std::process::Command::new(script);
        command
            .arg(&output)
            .arg(seconds.to_string())
            .arg("1")
            .arg(name)
            .env("DATABASE_URL", database_url)
            .stdout(std::process::Stdio::null());
        tokio::task::spawn_blocking(move || command.status()).await?
    }
    .with_context(|| format!("run {}", script.display()))?;
    anyhow::ensure!(status.success(), "{} {name}: {status}", script.display());
    let ceilings: BTreeMap<String, f64> = serde_json::from_slice(&std::fs::read(&output)?)?;
    let _ = std::fs::remove_file(&output);
    ceilings.get(name).copied().with_context(|| format!("{} did not measure {name}", script.display()))
}

/// One run of a scenario; a scenario that fails is reported as such.
async fn run_scenario(
    scenario: Scenario,
    broker: &BrokerUnderTest,
    sizes: &Sizes,
    rates: &[u64],
) -> Vec<report::ScenarioResult> {
    let outcome: Result<Vec<report::ScenarioResult>> = match scenario {
        Scenario::EnqueueBulk => scenarios::enqueue_bulk(broker, sizes).await.map(|result| vec![result]),
        Scenario::EnqueueSingle => scenarios::enqueue_single(broker, sizes).await.map(|result| vec![result]),
        Scenario::Drain => scenarios::drain(broker, sizes).await.map(|result| vec![result]),
        Scenario::Ordered => scenarios::ordered(broker, sizes).await.map(|result| vec![result]),
        Scenario::Steady => scenarios::steady(broker, sizes).await.map(|result| vec![result]),
        Scenario::Latency => {
            let mut runs = Vec::new();
            for rate in rates {
                match scenarios::latency(broker, &Sizes { rate: *rate, ..sizes.clone() }).await {
                    Ok(result) => runs.push(result),
                    Err(error) => runs.push(report::failed(&format!("latency @ {rate}/s"), &error)),
                }
            }
            Ok(runs)
        }
        Scenario::Backlog => scenarios::backlog(broker, sizes).await,
        Scenario::All => Ok(Vec::new()),
    };
    outcome.unwrap_or_else(|error| vec![report::failed(&format!("{scenario:?}"), &error)])
}

fn expand(scenarios: &[Scenario]) -> Vec<Scenario> {
    if scenarios.contains(&Scenario::All) {
        return vec![
            Scenario::EnqueueBulk,
            Scenario::EnqueueSingle,
            Scenario::Drain,
            Scenario::Ordered,
            Scenario::Steady,
            Scenario::Latency,
            Scenario::Backlog,
        ];
    }
    scenarios.to_vec()
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let ceilings: BTreeMap<String, f64> = match &args.ceilings {
        Some(path) => {
            serde_json::from_slice(&std::fs::read(path).with_context(|| format!("read {}", path.display()))?)?
        }
        None => BTreeMap::new(),
    };
    let broker = match &args.endpoint {
        Some(endpoint) => BrokerUnderTest::target(endpoint, &args.database_url, args.broker_pid).await?,
        None => {
            let binary = match &args.broker_binary {
                Some(binary) => binary.clone(),
                None => std::env::current_exe()?.with_file_name("workbroker"),
            };
            BrokerUnderTest::start(binary, &args.database_url, &args.listen, &[]).await?
        }
    };
    let mut results = Vec::new();
    for scenario in expand(&args.scenarios) {
        eprintln!("running {scenario:?}");
        let mut repetitions: Vec<Vec<report::ScenarioResult>> = Vec::new();
        for run in 0..usize::from(args.repeat) {
            let sizes = Sizes {
                jobs: args.jobs,
                producers: args.producers,
                single_connections: usize::from(args.single_connections),
                workers: args.workers,
                concurrency: args.concurrency,
                seconds: args.seconds,
                rate: 0,
                backlog: args.backlog,
                small_backlog: args.small_backlog,
                keys: args.keys,
                leases_in_flight: args.leases_in_flight,
                backlog_drain: args.backlog_drain,
                backlog_rounds: args.backlog_rounds.max(1),
                steady_retention: Duration::from_secs(args.steady_retention_seconds),
                size_sample_interval: Duration::from_secs(args.size_sample_seconds.max(1)),
                run,
                worker_endpoints: args.worker_endpoints.clone(),
            };
            let paired = match (&args.ceiling_script, scenario.ceiling()) {
                (Some(script), Some(name)) => {
                    let ceiling = measure_ceiling(script, &args.database_url, name, args.ceiling_seconds).await?;
                    eprintln!("  {name} just before run {run}: {ceiling:.0} jobs/s");
                    Some((name, ceiling))
                }
                _ => None,
            };
            let mut outcome = run_scenario(scenario, &broker, &sizes, &args.rates).await;
            if let Some((name, ceiling)) = paired {
                for result in outcome.iter_mut().filter(|result| result.ceiling == Some(name) && result.jobs > 0) {
                    report::pair_ceiling(result, ceiling);
                }
            }
            repetitions.push(outcome);
            // Every run starts from empty tables: leftovers of one (a filled
            // queue nobody drains, a million-job backlog) would weigh on the next.
            broker.clean_up().await?;
        }
        // The i-th result of every repetition is the same measurement.
        let width = repetitions.iter().map(Vec::len).max().unwrap_or(0);
        let first = results.len();
        for index in 0..width {
            let runs: Vec<report::ScenarioResult> =
                repetitions.iter().filter_map(|results| results.get(index).cloned()).collect();
            results.extend(report::median(runs));
        }
        if scenario == Scenario::Backlog && args.repeat > 1 {
            report::note_backlog_ratio_of_medians(&mut results[first..]);
        }
        report::apply_ceilings(&mut results, &ceilings);
        if let Some(path) = &args.json {
            let document = serde_json::json!({ "ceilings": ceilings, "scenarios": results });
            std::fs::write(path, serde_json::to_vec_pretty(&document)?)?;
        }
    }
    report::apply_ceilings(&mut results, &ceilings);
    report::print_table(&results, &ceilings);
    if let Some(path) = &args.json {
        let document = serde_json::json!({ "ceilings": ceilings, "scenarios": results });
        std::fs::write(path, serde_json::to_vec_pretty(&document)?)?;
        eprintln!("wrote {}", path.display());
    }
    if args.endpoint.is_none() {
        broker.stop().await?;
    }
    Ok(())
}
