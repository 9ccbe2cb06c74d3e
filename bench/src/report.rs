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
    /// One run's late jobs; `None` in a median of several runs (each run
    /// keeps its own).
    pub late: Option<LateJobs>,
}

/// The jobs of one latency run later than `over_ms`, for putting a stall
/// beside the broker's and PostgreSQL's logs.
#[derive(Clone, Debug, serde::Serialize)]
pub struct LateJobs {
    /// What counts as late (the p99 target).
    pub over_ms: f64,
    /// (second of the run they were sent in, how many).
    pub by_second: Vec<(u64, u64)>,
    /// When the run's second 0 began (Unix time, seconds).
    pub sending_started_unix: f64,
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
    /// CPU this harness process spent on the run: its producers, workers
    /// and gRPC stacks share the machine with the broker and PostgreSQL.
    pub harness_cpu_seconds: Option<f64>,
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
    /// The same ceiling measured just before this run (`--ceiling-script`);
    /// for a large backlog's drain, the small backlog's drain rate in the
    /// same round. For a median, the median of the runs' paired ceilings.
    pub paired_ceiling: Option<f64>,
    /// jobs_per_second / paired_ceiling; for a median, the median of the
    /// runs' own ratios, which a machine whose speed drifts over the run
    /// leaves alone where it moves the run-wide `ratio`.
    pub paired_ratio: Option<f64>,
    /// Every repetition in the order it ran, when the figures above are
    /// their median.
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
        harness_cpu_seconds: None,
        broker_rss_mib: None,
        broker_peak_rss_mib: None,
        sizes: TableSizes::default(),
        size_samples: Vec::new(),
        ceiling: None,
        ratio: None,
        paired_ceiling: None,
        paired_ratio: None,
        runs: Vec::new(),
        notes: vec![format!("{error:#}")],
    }
}

/// The middle value (the upper one of an even count); `None` when empty.
fn middle(mut values: Vec<f64>) -> Option<f64> {
    values.sort_by(f64::total_cmp);
    values.get(values.len() / 2).copied()
}

/// The median of repeated runs of one scenario: the run with the median
/// rate (for latency runs, the median of each percentile; with paired
/// ceilings, the median of the runs' own ratios), carrying every run in
/// `runs` in the order they ran.
pub fn median(runs: Vec<ScenarioResult>) -> Option<ScenarioResult> {
    median_of(runs, "runs")
}

/// [`median`], naming the repetitions `what` in its note.
pub fn median_of(runs: Vec<ScenarioResult>, what: &str) -> Option<ScenarioResult> {
    let mut by_rate: Vec<&ScenarioResult> = runs.iter().collect();
    by_rate.sort_by(|a, b| a.jobs_per_second.total_cmp(&b.jobs_per_second));
    let mut median = (*by_rate.get(runs.len() / 2)?).clone();
    if runs.len() == 1 {
        if let Some(late) = median.latency.as_ref().and_then(|latency| latency.late.as_ref()) {
            median.notes.push(late.summary());
        }
        return Some(median);
    }
    if let Some(latency) = &mut median.latency {
        latency.late = None;
        let all: Vec<&Latency> = runs.iter().filter_map(|run| run.latency.as_ref()).collect();
        let of = |value: fn(&Latency) -> f64| middle(all.iter().map(|latency| value(latency)).collect());
        latency.p50_ms = of(|latency| latency.p50_ms).unwrap_or(latency.p50_ms);
        latency.p90_ms = of(|latency| latency.p90_ms).unwrap_or(latency.p90_ms);
        latency.p99_ms = of(|latency| latency.p99_ms).unwrap_or(latency.p99_ms);
        latency.max_ms = of(|latency| latency.max_ms).unwrap_or(latency.max_ms);
    }
    median.paired_ceiling = middle(runs.iter().filter_map(|run| run.paired_ceiling).collect());
    median.paired_ratio = middle(runs.iter().filter_map(|run| run.paired_ratio).collect());
    median.notes.push(format!(
        "median of {} {what}, in the order they ran: {}",
        runs.len(),
        runs.iter()
            .map(|run| match (&run.latency, run.paired_ratio) {
                (Some(latency), _) => match &latency.late {
                    Some(late) =>
                        format!("p50 {:.2} / p99 {:.2} ms ({})", latency.p50_ms, latency.p99_ms, late.summary()),
                    None => format!("p50 {:.2} / p99 {:.2} ms", latency.p50_ms, latency.p99_ms),
                },
                (None, Some(ratio)) => format!("{:.0}/s (paired {:.0} %)", run.jobs_per_second, ratio * 100.0),
                (None, None) => format!("{:.0}/s", run.jobs_per_second),
            })
            .collect::<Vec<_>>()
            .join(", ")
    ));
    median.runs = runs;
    Some(median)
}

impl LateJobs {
    /// How many jobs were late, and the seconds of the run most of them
    /// were sent in (at most three, the worst first).
    fn summary(&self) -> String {
        let total: u64 = self.by_second.iter().map(|(_, count)| count).sum();
        if total == 0 {
            return format!("none over {} ms", self.over_ms);
        }
        let mut worst = self.by_second.clone();
        worst.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        let seconds: Vec<String> =
            worst.iter().take(3).map(|(second, count)| format!("{count} in second {second}")).collect();
        format!("{total} over {} ms: {}", self.over_ms, seconds.join(", "))
    }
}

/// Pairs one run with the ceiling measured just before it.
pub fn pair_ceiling(result: &mut ScenarioResult, ceiling: f64) {
    result.paired_ceiling = Some(ceiling);
    result.paired_ratio = Some(result.jobs_per_second / ceiling.max(1e-9));
}

/// The backlog scenario's verdict over repeated runs: the median drain rate
/// with the large backlog against the median with the small one, and the
/// median of the runs' own (paired, round by round) ratios. The large
/// backlog's result comes second.
pub fn note_backlog_ratio_of_medians(backlog: &mut [ScenarioResult]) {
    if let [small, large, ..] = backlog {
        let ratio = 100.0 * large.jobs_per_second / small.jobs_per_second.max(1e-9);
        let paired = large.paired_ratio.map_or_else(String::new, |paired| {
            format!(
                "; the median of the runs' paired ratios (each the median of its rounds') is {:.1} %",
                100.0 * paired
            )
        });
        large.notes.push(format!(
            "medians: the rate with the large backlog is {ratio:.1} % of the rate with the small one{paired}"
        ));
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
        "{:<38} {:>9} {:>8} {:>11} {:>14} {:>7} {:>14} {:>7} {:>9} {:>9} {:>9} {:>11} {:>12}",
        "scenario",
        "jobs",
        "seconds",
        "jobs/s",
        "ceiling jobs/s",
        "ratio",
        "paired ceiling",
        "paired",
        "p50 ms",
        "p99 ms",
        "RSS MiB",
        "broker µs/j",
        "harness µs/j"
    );
    for result in results {
        let ceiling = result.ceiling.and_then(|name| ceilings.get(name));
        let dash = || "-".to_owned();
        let percent = |ratio: f64| format!("{:.0} %", ratio * 100.0);
        let per_job = |cpu_seconds: f64| format!("{:.1}", cpu_seconds * 1e6 / result.jobs.max(1) as f64);
        println!(
            "{:<38} {:>9} {:>8.2} {:>11.0} {:>14} {:>7} {:>14} {:>7} {:>9} {:>9} {:>9} {:>11} {:>12}",
            result.name,
            result.jobs,
            result.seconds,
            result.jobs_per_second,
            ceiling.map_or_else(dash, |value| format!("{value:.0}")),
            result.ratio.map_or_else(dash, percent),
            result.paired_ceiling.map_or_else(dash, |value| format!("{value:.0}")),
            result.paired_ratio.map_or_else(dash, percent),
            result.latency.as_ref().map_or_else(dash, |latency| format!("{:.2}", latency.p50_ms)),
            result.latency.as_ref().map_or_else(dash, |latency| format!("{:.2}", latency.p99_ms)),
            result.broker_rss_mib.map_or_else(dash, |rss| format!("{rss:.1}")),
            result.broker_cpu_seconds.map_or_else(dash, per_job),
            result.harness_cpu_seconds.map_or_else(dash, per_job),
        );
        for note in &result.notes {
            println!("    {note}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(jobs_per_second: f64, paired_ceiling: Option<f64>) -> ScenarioResult {
        let mut result = failed("drain", &anyhow::anyhow!("unused"));
        result.name = "drain".to_owned();
        result.notes.clear();
        result.jobs = 50_000;
        result.jobs_per_second = jobs_per_second;
        if let Some(ceiling) = paired_ceiling {
            pair_ceiling(&mut result, ceiling);
        }
        result
    }

    fn latency_run(p99_ms: f64, late_by_second: Vec<(u64, u64)>) -> ScenarioResult {
        let mut result = run(5_000.0, None);
        result.latency = Some(Latency {
            samples: 100,
            p50_ms: 1.0,
            p90_ms: 2.0,
            p99_ms,
            max_ms: 50.0,
            late: Some(LateJobs { over_ms: 10.0, by_second: late_by_second, sending_started_unix: 0.0 }),
        });
        result
    }

    #[test]
    fn each_latency_run_says_when_its_late_jobs_were_sent() {
        let median = median(vec![
            latency_run(6.0, Vec::new()),
            latency_run(40.0, vec![(3, 2), (7, 90), (8, 30), (12, 1)]),
            latency_run(7.0, vec![(5, 1)]),
        ])
        .expect("three runs");
        let note = &median.notes[median.notes.len() - 1];
        assert!(note.contains("p99 6.00 ms (none over 10 ms)"), "{note}");
        assert!(
            note.contains("p99 40.00 ms (123 over 10 ms: 90 in second 7, 30 in second 8, 2 in second 3)"),
            "{note}"
        );
        assert!(note.contains("p99 7.00 ms (1 over 10 ms: 1 in second 5)"), "{note}");
        assert!(median.latency.as_ref().is_some_and(|latency| latency.late.is_none()));
        let late = median.runs[1].latency.as_ref().and_then(|latency| latency.late.as_ref());
        assert_eq!(late.map(|late| late.by_second.len()), Some(4));

        let single = super::median(vec![latency_run(40.0, vec![(7, 90)])]).expect("one run");
        assert!(single.notes.iter().any(|note| note == "90 over 10 ms: 90 in second 7"), "{:?}", single.notes);
    }

    #[test]
    fn the_median_of_paired_runs_is_the_median_of_their_own_ratios() {
        // The fastest run met the fastest ceiling: its ratio is the lowest.
        let median =
            median(vec![run(30_000.0, Some(40_000.0)), run(45_000.0, Some(90_000.0)), run(20_000.0, Some(25_000.0))])
                .expect("three runs");
        assert_eq!(median.jobs_per_second, 30_000.0);
        assert_eq!(median.paired_ceiling, Some(40_000.0));
        assert_eq!(median.paired_ratio, Some(0.75));
        // The runs stay in the order they ran.
        let rates: Vec<f64> = median.runs.iter().map(|run| run.jobs_per_second).collect();
        assert_eq!(rates, [30_000.0, 45_000.0, 20_000.0]);
        assert!(median.notes[0].contains("30000/s (paired 75 %), 45000/s (paired 50 %)"), "{:?}", median.notes);
    }

    #[test]
    fn runs_without_a_paired_ceiling_have_no_paired_ratio() {
        let median = median(vec![run(1.0, None), run(3.0, None), run(2.0, None)]).expect("three runs");
        assert_eq!(median.jobs_per_second, 2.0);
        assert_eq!(median.paired_ceiling, None);
        assert_eq!(median.paired_ratio, None);
    }
}
