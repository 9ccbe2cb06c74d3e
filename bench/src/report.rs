//! Results: one row per scenario, printed as a table and written as JSON,
//! each compared with the raw SQL ceiling of the same run where one applies.

use std::collections::BTreeMap;

use crate::broker::TableSizes;

/// Latency percentiles, enqueue to handler start.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Latency {
    pub samples: u64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

/// One scenario's figures.
#[derive(Clone, Debug, serde::Serialize)]
pub struct ScenarioResult {
    pub name: String,
    pub jobs: u64,
    pub seconds: f64,
    pub jobs_per_second: f64,
    pub latency: Option<Latency>,
    pub broker_cpu_seconds: Option<f64>,
    pub broker_rss_mib: Option<f64>,
    pub broker_peak_rss_mib: Option<f64>,
    /// Job tables at the end of the run.
    pub sizes: TableSizes,
    /// (seconds into the run, sizes), where the scenario samples them.
    pub size_samples: Vec<(f64, TableSizes)>,
    /// Name of the raw SQL ceiling this compares with.
    pub ceiling: Option<&'static str>,
    /// jobs_per_second / ceiling, when the ceiling was measured.
    pub ratio: Option<f64>,
    /// Every repetition, when the figures above are their median.
    pub runs: Vec<ScenarioResult>,
    pub notes: Vec<String>,
}

/// A scenario that could not complete, reported with its error.
pub fn failed(name: &str, error: &anyhow::Error) -> ScenarioResult {
    ScenarioResult {
        name: format!("{name} (failed)"),
        jobs: 0,
        seconds: 0.0,
        jobs_per_second: 0.0,
        latency: None,
        broker_cpu_seconds: None,
        broker_rss_mib: None,
        broker_peak_rss_mib: None,
        sizes: TableSizes::default(),
        size_samples: Vec::new(),
        ceiling: None,
        ratio: None,
        runs: Vec::new(),
        notes: vec![format!("{error:#}")],
    }
}

/// The median of repeated runs of one scenario: the run with the median
/// rate (for latency runs, the median of each percentile), carrying every
/// run in `runs`.
pub fn median(mut runs: Vec<ScenarioResult>) -> Option<ScenarioResult> {
    runs.sort_by(|a, b| a.jobs_per_second.total_cmp(&b.jobs_per_second));
    let mut median = runs.get(runs.len() / 2)?.clone();
    if runs.len() == 1 {
        return Some(median);
    }
    let middle = |mut values: Vec<f64>| {
        values.sort_by(f64::total_cmp);
        values[values.len() / 2]
    };
    if let Some(latency) = &mut median.latency {
        let all: Vec<&Latency> = runs.iter().filter_map(|run| run.latency.as_ref()).collect();
        latency.p50_ms = middle(all.iter().map(|latency| latency.p50_ms).collect());
        latency.p90_ms = middle(all.iter().map(|latency| latency.p90_ms).collect());
        latency.p99_ms = middle(all.iter().map(|latency| latency.p99_ms).collect());
        latency.max_ms = middle(all.iter().map(|latency| latency.max_ms).collect());
    }
    median.notes.push(format!(
        "median of {} runs: {}",
        runs.len(),
        runs.iter()
            .map(|run| match &run.latency {
                Some(latency) => format!("p50 {:.2} / p99 {:.2} ms", latency.p50_ms, latency.p99_ms),
                None => format!("{:.0}/s", run.jobs_per_second),
            })
            .collect::<Vec<_>>()
            .join(", ")
    ));
    median.runs = runs;
    Some(median)
}

/// The backlog scenario's verdict over repeated runs: the median drain rate
/// with the large backlog against the median with the small one (each run's
/// own pair is in its notes). The large backlog's result comes second.
pub fn note_backlog_ratio_of_medians(backlog: &mut [ScenarioResult]) {
    if let [small, large, ..] = backlog {
        let ratio = 100.0 * large.jobs_per_second / small.jobs_per_second.max(1e-9);
        large
            .notes
            .push(format!("medians: the rate with the large backlog is {ratio:.1} % of the rate with the small one"));
    }
}

/// Fills in ratios from a ceilings file (`{"name": jobs_per_second, ...}`).
pub fn apply_ceilings(results: &mut [ScenarioResult], ceilings: &BTreeMap<String, f64>) {
    for result in results {
        if let Some(ceiling) = result.ceiling.and_then(|name| ceilings.get(name)) {
            result.ratio = Some(result.jobs_per_second / ceiling.max(1e-9));
        }
    }
}

pub fn print_table(results: &[ScenarioResult], ceilings: &BTreeMap<String, f64>) {
    println!(
        "{:<38} {:>9} {:>8} {:>11} {:>14} {:>7} {:>9} {:>9} {:>9}",
        "scenario", "jobs", "seconds", "jobs/s", "ceiling jobs/s", "ratio", "p50 ms", "p99 ms", "RSS MiB"
    );
    for result in results {
        let ceiling = result.ceiling.and_then(|name| ceilings.get(name));
        let dash = || "-".to_owned();
        println!(
            "{:<38} {:>9} {:>8.2} {:>11.0} {:>14} {:>7} {:>9} {:>9} {:>9}",
            result.name,
            result.jobs,
            result.seconds,
            result.jobs_per_second,
            ceiling.map_or_else(dash, |value| format!("{value:.0}")),
            result.ratio.map_or_else(dash, |ratio| format!("{:.0} %", ratio * 100.0)),
            result.latency.as_ref().map_or_else(dash, |latency| format!("{:.2}", latency.p50_ms)),
            result.latency.as_ref().map_or_else(dash, |latency| format!("{:.2}", latency.p99_ms)),
            result.broker_rss_mib.map_or_else(dash, |rss| format!("{rss:.1}")),
        );
        for note in &result.notes {
            println!("    {note}");
        }
    }
}
