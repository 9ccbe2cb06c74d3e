//! Results: one row per scenario, printed as a table and written as JSON,
//! each compared with the raw SQL ceiling of the same run where one applies.

use std::collections::BTreeMap;

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
    pub hot_table_bytes: i64,
    pub finished_table_bytes: i64,
    /// Name of the raw SQL ceiling this compares with.
    pub ceiling: Option<&'static str>,
    /// jobs_per_second / ceiling, when the ceiling was measured.
    pub ratio: Option<f64>,
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
        hot_table_bytes: 0,
        finished_table_bytes: 0,
        ceiling: None,
        ratio: None,
        notes: vec![format!("{error:#}")],
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
