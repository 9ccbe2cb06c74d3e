//! The operator CLI (`workbroker enqueue|stats|jobs|dead|queues|cluster|work`)
//! against a real broker.
//!
//! The commands run in-process through `workbroker_server::cli::run_with_input`
//! (the same code the binary runs, with stdout captured in a buffer and stdin
//! given by the test), so these tests need no prebuilt binary. One test runs
//! the real `workbroker` binary to check the exit code and the one-line
//! `error: ...` on stderr; like the process-based tests it expects
//! `target/debug/workbroker` to be built (`scripts/test.sh` does).

use std::time::Duration;

use anyhow::{Context, Result};
use workbroker_api::v1;
use workbroker_server::cli;
use workbroker_server::cli::output::{JsonValue, parse_json};
use workbroker_tests::*;

const WAIT: Duration = Duration::from_secs(10);

/// Runs `workbroker <args> --endpoint <endpoint>` in-process; returns stdout.
async fn run_cli(endpoint: &str, args: &[&str]) -> Result<String, cli::Error> {
    run_cli_with_input(endpoint, args, b"").await
}

/// Like [`run_cli`], with `input` as stdin.
async fn run_cli_with_input(endpoint: &str, args: &[&str], input: &[u8]) -> Result<String, cli::Error> {
    let mut argv: Vec<String> = vec!["workbroker".to_owned()];
    argv.extend(args.iter().map(|arg| (*arg).to_owned()));
    argv.push("--endpoint".to_owned());
    argv.push(endpoint.to_owned());
    let mut input = std::io::Cursor::new(input.to_vec());
    let mut out: Vec<u8> = Vec::new();
    cli::run_with_input(argv, &mut input, &mut out).await?;
    Ok(String::from_utf8_lossy(&out).into_owned())
}

/// Runs a command with `--json` and parses its one document.
async fn run_json(endpoint: &str, args: &[&str]) -> Result<JsonValue> {
    let mut with_json: Vec<&str> = args.to_vec();
    with_json.push("--json");
    let text = run_cli(endpoint, &with_json).await?;
    parse_json(&text).with_context(|| format!("--json output of {args:?} does not parse: {text}"))
}

fn text(value: &JsonValue) -> Result<String> {
    value.as_str().map(str::to_owned).with_context(|| format!("expected a string, got {value}"))
}

fn array(value: &JsonValue) -> Result<&Vec<JsonValue>> {
    value.as_array().with_context(|| format!("expected an array, got {value}"))
}

/// The id of the single job an `enqueue --json` printed.
fn enqueued_id(document: &JsonValue) -> Result<String> {
    let jobs = array(&document["jobs"])?;
    anyhow::ensure!(jobs.len() == 1, "expected one enqueued job, got {document}");
    text(&jobs[0]["job_id"])
}

#[tokio::test]
async fn enqueue_options_and_every_payload_source_show_in_jobs_get() -> Result<()> {
    let broker = TestBroker::start().await?;
    let endpoint = broker.endpoint();

    // --payload and every option.
    let enqueued = run_json(
        &endpoint,
        &[
            "enqueue",
            "--queue",
            "cli.q",
            "--kind",
            "send",
            "--payload",
            "hello world",
            "--attribute",
            "traceparent=00-abc-01",
            "--attribute",
            "formula=a=b",
            "--priority",
            "-3",
            "--max-attempts",
            "7",
            "--ordering-key",
            "user-1",
            "--dedup-key",
            "welcome-1",
            "--lease-duration",
            "12.5",
        ],
    )
    .await?;
    assert_eq!(enqueued["jobs"][0]["deduplicated"], JsonValue::Bool(false));
    assert_eq!(enqueued["jobs"][0]["sequence"].as_u64(), Some(1));
    let id = enqueued_id(&enqueued)?;
    let job = run_json(&endpoint, &["jobs", "get", &id]).await?;
    assert_eq!(text(&job["job_id"])?, id);
    assert_eq!(text(&job["queue"])?, "cli.q");
    assert_eq!(text(&job["kind"])?, "send");
    assert_eq!(text(&job["payload"])?, "hello world");
    assert_eq!(text(&job["attributes"]["traceparent"])?, "00-abc-01");
    assert_eq!(text(&job["attributes"]["formula"])?, "a=b");
    assert_eq!(job["priority"].as_i64(), Some(-3));
    assert_eq!(job["max_attempts"].as_u64(), Some(7));
    assert_eq!(text(&job["ordering_key"])?, "user-1");
    assert_eq!(text(&job["dedup_key"])?, "welcome-1");
    assert_eq!(text(&job["state"])?, "available");
    assert!(text(&job["created_at"])?.ends_with('Z'), "RFC 3339 in UTC: {}", job["created_at"]);
    assert_eq!(job["finished_at"], JsonValue::Null);

    // The same dedup key answers the existing job, in a table by default.
    let table =
        run_cli(&endpoint, &["enqueue", "--queue", "cli.q", "--kind", "send", "--dedup-key", "welcome-1"]).await?;
    let row = table.lines().nth(1).context("a row under the header")?;
    assert!(table.starts_with("JOB ID"), "{table}");
    assert!(row.starts_with(&id) && row.contains("yes"), "deduplicated row: {table}");

    // The human view of the job shows the payload and attributes.
    let shown = run_cli(&endpoint, &["jobs", "get", &id]).await?;
    assert!(shown.contains("hello world"), "{shown}");
    assert!(shown.contains("traceparent=00-abc-01"), "{shown}");
    assert!(shown.contains("1/7") || shown.contains("0/7"), "{shown}");

    // --payload-file PATH with bytes that are not UTF-8: base64 in JSON.
    let path = std::env::temp_dir().join(format!("workbroker-cli-{}.bin", uuid::Uuid::new_v4().simple()));
    std::fs::write(&path, [0xff_u8, 0x00, 0x01])?;
    let path_text = path.to_string_lossy().into_owned();
    let from_file =
        run_json(&endpoint, &["enqueue", "--queue", "cli.q", "--kind", "bin", "--payload-file", &path_text]).await;
    std::fs::remove_file(&path)?;
    let file_id = enqueued_id(&from_file?)?;
    let job = run_json(&endpoint, &["jobs", "get", &file_id]).await?;
    assert_eq!(text(&job["payload_base64"])?, "/wAB");
    assert!(job.get("payload").is_none(), "binary payloads only under payload_base64: {job}");

    // --payload-file - reads stdin.
    let out = run_cli_with_input(
        &endpoint,
        &["enqueue", "--queue", "cli.q", "--kind", "stdin", "--payload-file", "-", "--json"],
        b"{\"from\": \"stdin\"}",
    )
    .await?;
    let stdin_id = enqueued_id(&parse_json(&out)?)?;
    let job = run_json(&endpoint, &["jobs", "get", &stdin_id]).await?;
    assert_eq!(text(&job["payload"])?, "{\"from\": \"stdin\"}");

    // --delay and --run-at make scheduled jobs; --run-at is kept exactly.
    let delayed = enqueued_id(
        &run_json(&endpoint, &["enqueue", "--queue", "cli.q", "--kind", "later", "--delay", "3600"]).await?,
    )?;
    assert_eq!(text(&run_json(&endpoint, &["jobs", "get", &delayed]).await?["state"])?, "scheduled");
    let at = enqueued_id(
        &run_json(&endpoint, &["enqueue", "--queue", "cli.q", "--kind", "later", "--run-at", "2099-01-02T03:04:05Z"])
            .await?,
    )?;
    let job = run_json(&endpoint, &["jobs", "get", &at]).await?;
    assert_eq!(text(&job["state"])?, "scheduled");
    assert_eq!(text(&job["run_at"])?, "2099-01-02T03:04:05Z");

    // --count N enqueues N copies in one request, in sequence order.
    let copies = run_json(&endpoint, &["enqueue", "--queue", "cli.copies", "--kind", "k", "--count", "3"]).await?;
    let copies = array(&copies["jobs"])?;
    assert_eq!(copies.len(), 3);
    let sequences: Vec<u64> = copies.iter().filter_map(|job| job["sequence"].as_u64()).collect();
    assert_eq!(sequences, vec![1, 2, 3]);

    // Local checks refuse malformed flags before anything is sent.
    let error = run_cli(&endpoint, &["enqueue", "--queue", "q", "--kind", "k", "--attribute", "novalue"])
        .await
        .expect_err("an attribute without '=' is refused");
    assert!(matches!(error, cli::Error::Usage(_)), "{error:?}");
    assert!(error.one_line().contains("--attribute"), "{}", error.one_line());
    let error = run_cli(&endpoint, &["enqueue", "--queue", "q", "--kind", "k", "--delay", "soon"])
        .await
        .expect_err("a delay that is not a number is refused");
    assert!(error.one_line().contains("--delay"), "{}", error.one_line());
    broker.finish().await
}

#[tokio::test]
async fn stats_shows_the_queue_in_a_table_and_as_json() -> Result<()> {
    let broker = TestBroker::start().await?;
    let endpoint = broker.endpoint();
    run_cli(&endpoint, &["enqueue", "--queue", "stats.q", "--kind", "k", "--count", "2"]).await?;

    let table = run_cli(&endpoint, &["stats"]).await?;
    let header = table.lines().next().context("a header")?;
    for column in ["QUEUE", "SCHEDULED", "AVAILABLE", "LEASED", "DEAD", "OLDEST WAITING", "WATERMARK", "PAUSED"] {
        assert!(header.contains(column), "missing {column}: {table}");
    }
    let row = table.lines().find(|line| line.starts_with("stats.q")).context("a row for the queue")?;
    let cells: Vec<&str> = row.split_whitespace().collect();
    assert_eq!(cells[2], "2", "two available: {table}");
    assert_eq!(cells.last().copied(), Some("no"), "not paused: {table}");

    let stats = run_json(&endpoint, &["stats", "stats.q"]).await?;
    let queues = array(&stats["queues"])?;
    assert_eq!(queues.len(), 1);
    assert_eq!(text(&queues[0]["queue"])?, "stats.q");
    assert_eq!(queues[0]["available"].as_u64(), Some(2));
    assert_eq!(queues[0]["last_sequence"].as_u64(), Some(2));
    assert_eq!(queues[0]["completed_watermark"].as_u64(), Some(0));
    assert!(queues[0]["oldest_available_age"].is_number(), "seconds as a number: {stats}");
    assert_eq!(queues[0]["paused"], JsonValue::Bool(false));

    let error = run_cli(&endpoint, &["stats", "no.such.queue"]).await.expect_err("unknown queue");
    assert!(error.one_line().starts_with("NOT_FOUND: "), "{}", error.one_line());
    broker.finish().await
}

#[tokio::test]
async fn jobs_list_pages_follows_tokens_and_filters_by_state() -> Result<()> {
    let broker = TestBroker::start().await?;
    let endpoint = broker.endpoint();
    let enqueued = run_json(&endpoint, &["enqueue", "--queue", "pages", "--kind", "k", "--count", "5"]).await?;
    let ids: Vec<String> = array(&enqueued["jobs"])?.iter().map(|job| text(&job["job_id"])).collect::<Result<_>>()?;

    let first = run_json(&endpoint, &["jobs", "list", "--queue", "pages", "--page-size", "2"]).await?;
    let first_ids: Vec<String> =
        array(&first["jobs"])?.iter().map(|job| text(&job["job_id"])).collect::<Result<_>>()?;
    assert_eq!(first_ids, ids[..2]);
    let token = text(&first["next_page_token"])?;
    assert!(!token.is_empty());

    let second =
        run_json(&endpoint, &["jobs", "list", "--queue", "pages", "--page-size", "2", "--page-token", &token]).await?;
    let second_ids: Vec<String> =
        array(&second["jobs"])?.iter().map(|job| text(&job["job_id"])).collect::<Result<_>>()?;
    assert_eq!(second_ids, ids[2..4]);

    let all = run_json(&endpoint, &["jobs", "list", "--queue", "pages", "--page-size", "2", "--all"]).await?;
    assert_eq!(array(&all["jobs"])?.len(), 5);
    assert_eq!(text(&all["next_page_token"])?, "");

    let table = run_cli(&endpoint, &["jobs", "list", "--queue", "pages", "--page-size", "2"]).await?;
    assert!(table.lines().next().is_some_and(|header| header.starts_with("JOB ID")), "{table}");
    assert!(table.contains(&format!("next page token: {token}")), "{table}");
    assert_eq!(table.lines().filter(|line| line.contains("available")).count(), 2, "{table}");

    let none = run_cli(&endpoint, &["jobs", "list", "--queue", "pages", "--state", "completed"]).await?;
    assert_eq!(none.trim(), "no jobs");
    let available = run_json(&endpoint, &["jobs", "list", "--queue", "pages", "--state", "available", "--all"]).await?;
    assert_eq!(array(&available["jobs"])?.len(), 5);
    broker.finish().await
}

#[tokio::test]
async fn cancel_prints_the_cancelled_job_and_watch_follows_a_job_to_completion() -> Result<()> {
    let broker = TestBroker::start().await?;
    let endpoint = broker.endpoint();

    let doomed = enqueued_id(&run_json(&endpoint, &["enqueue", "--queue", "watch.q", "--kind", "k"]).await?)?;
    let cancelled = run_json(&endpoint, &["jobs", "cancel", &doomed]).await?;
    assert_eq!(text(&cancelled["state"])?, "cancelled");
    assert!(cancelled["finished_at"].is_string());
    let shown = run_cli(&endpoint, &["jobs", "get", &doomed]).await?;
    assert!(shown.lines().any(|line| line.starts_with("state:") && line.ends_with("cancelled")), "{shown}");
    let again = run_cli(&endpoint, &["jobs", "cancel", &doomed]).await.expect_err("already terminal");
    assert!(again.one_line().starts_with("FAILED_PRECONDITION"), "{}", again.one_line());

    // Watching a terminal job prints it once and ends.
    let watched = run_cli(&endpoint, &["jobs", "watch", &doomed]).await?;
    assert_eq!(watched.lines().count(), 1, "{watched}");
    assert!(watched.contains("cancelled"), "{watched}");

    // Watch a job while `work` completes it.
    let id = enqueued_id(&run_json(&endpoint, &["enqueue", "--queue", "watch.q", "--kind", "k"]).await?)?;
    let watch = {
        let endpoint = endpoint.clone();
        let id = id.clone();
        tokio::spawn(async move { run_cli(&endpoint, &["jobs", "watch", &id]).await })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    run_cli(&endpoint, &["work", "--queue", "watch.q", "--wait", "5"]).await?;
    let watched = tokio::time::timeout(WAIT, watch).await.context("watch did not end at the terminal state")???;
    let lines: Vec<&str> = watched.lines().collect();
    assert!(lines.first().is_some_and(|line| line.contains(&id) && line.contains("available")), "{watched}");
    assert!(lines.last().is_some_and(|line| line.contains("completed")), "{watched}");

    // --json streams one document per change.
    let lines = run_cli(&endpoint, &["jobs", "watch", &id, "--json"]).await?;
    for line in lines.lines() {
        assert_eq!(text(&parse_json(line)?["state"])?, "completed");
    }
    broker.finish().await
}

#[tokio::test]
async fn a_job_failed_by_work_is_listed_dead_with_its_error_and_redriven() -> Result<()> {
    let broker = TestBroker::start().await?;
    let endpoint = broker.endpoint();
    let id = enqueued_id(
        &run_json(&endpoint, &["enqueue", "--queue", "dlq", "--kind", "k", "--max-attempts", "1", "--payload", "p"])
            .await?,
    )?;

    let out =
        run_cli(&endpoint, &["work", "--queue", "dlq", "--fail", "--result", "boom: disk full", "--wait", "5"]).await?;
    assert!(out.contains(&format!("leased job {id}")), "{out}");
    assert!(out.contains(&format!("nacked job {id}: OK, now dead")), "{out}");

    let listed = run_cli(&endpoint, &["dead", "list", "--queue", "dlq"]).await?;
    let row =
        listed.lines().find(|line| line.starts_with(&id)).with_context(|| format!("no row for {id}: {listed}"))?;
    assert!(row.contains("boom: disk full"), "{listed}");
    assert!(row.contains("1/1"), "{listed}");
    let listed = run_json(&endpoint, &["dead", "list", "--queue", "dlq"]).await?;
    let dead = array(&listed["jobs"])?;
    assert_eq!(dead.len(), 1);
    assert_eq!(text(&dead[0]["last_error"])?, "boom: disk full");
    assert_eq!(text(&dead[0]["state"])?, "dead");

    let redriven =
        run_cli(&endpoint, &["dead", "redrive", "--queue", "dlq", "--job", &id, "--max-attempts", "3"]).await?;
    assert!(redriven.starts_with("redrove 1 dead job of dlq"), "{redriven}");
    assert!(redriven.contains(&id), "{redriven}");
    let job = run_json(&endpoint, &["jobs", "get", &id]).await?;
    assert_eq!(text(&job["state"])?, "available");
    assert_eq!(job["max_attempts"].as_u64(), Some(3));
    assert_eq!(run_cli(&endpoint, &["dead", "list", "--queue", "dlq"]).await?.trim(), "no dead jobs in dlq");
    let nothing = run_json(&endpoint, &["dead", "redrive", "--queue", "dlq"]).await?;
    assert_eq!(nothing["redriven"].as_u64(), Some(0));
    broker.finish().await
}

#[tokio::test]
async fn queues_pause_resume_and_configure_print_the_queue() -> Result<()> {
    let broker = TestBroker::start().await?;
    let endpoint = broker.endpoint();
    run_cli(&endpoint, &["enqueue", "--queue", "steer", "--kind", "k"]).await?;

    let paused = run_cli(&endpoint, &["queues", "pause", "steer"]).await?;
    assert!(paused.lines().any(|line| line.starts_with("paused:") && line.ends_with("yes")), "{paused}");
    let nothing = run_cli(&endpoint, &["work", "--queue", "steer", "--wait", "0.5"]).await?;
    assert_eq!(nothing.trim(), "no job", "a paused queue hands out nothing");
    let stats = run_json(&endpoint, &["stats", "steer"]).await?;
    assert_eq!(stats["queues"][0]["paused"], JsonValue::Bool(true));

    let resumed = run_json(&endpoint, &["queues", "resume", "steer"]).await?;
    assert_eq!(resumed["paused"], JsonValue::Bool(false));

    let configured = run_json(
        &endpoint,
        &[
            "queues",
            "configure",
            "steer",
            "--max-attempts",
            "5",
            "--lease-duration",
            "45",
            "--backoff-initial",
            "0.5",
            "--backoff-max",
            "60",
            "--backoff-multiplier",
            "1.5",
            "--backoff-jitter",
            "0",
            "--completed-retention",
            "3600",
        ],
    )
    .await?;
    assert_eq!(text(&configured["queue"])?, "steer");
    assert_eq!(configured["max_attempts"].as_u64(), Some(5));
    assert_eq!(configured["lease_duration"].as_f64(), Some(45.0));
    assert_eq!(configured["backoff_initial"].as_f64(), Some(0.5));
    assert_eq!(configured["backoff_max"].as_f64(), Some(60.0));
    assert_eq!(configured["backoff_multiplier"].as_f64(), Some(1.5));
    assert_eq!(configured["backoff_jitter"].as_f64(), Some(0.0));
    assert_eq!(configured["completed_retention"].as_f64(), Some(3600.0));
    assert!(configured["created_at"].is_string());

    // Flags not given stay as they are; the table form shows durations.
    let shown = run_cli(&endpoint, &["queues", "configure", "steer", "--max-attempts", "6"]).await?;
    assert!(shown.lines().any(|line| line.starts_with("max attempts:") && line.ends_with(" 6")), "{shown}");
    assert!(shown.lines().any(|line| line.starts_with("lease duration:") && line.ends_with(" 45s")), "{shown}");
    assert!(shown.lines().any(|line| line.starts_with("backoff initial:") && line.ends_with(" 0.5s")), "{shown}");

    // The broker judges the settings.
    let error = run_cli(&endpoint, &["queues", "configure", "steer", "--backoff-jitter", "2"])
        .await
        .expect_err("jitter above 1 is refused");
    let line = error.one_line();
    assert!(line.starts_with("INVALID_ARGUMENT: ") && line.contains("backoff_jitter"), "{line}");
    broker.finish().await
}

#[tokio::test]
async fn cluster_shows_this_broker_as_member_and_leader() -> Result<()> {
    let broker = TestBroker::start().await?;
    let endpoint = broker.endpoint();
    let info = run_json(&endpoint, &["cluster"]).await?;
    let members = array(&info["members"])?;
    assert!(!members.is_empty(), "{info}");
    let leader = text(&info["leader_id"])?;
    assert!(!leader.is_empty(), "a lone broker leads itself: {info}");
    assert!(members.iter().any(|member| member["leader"] == JsonValue::Bool(true)), "{info}");
    assert!(info["shard_count"].as_u64().is_some_and(|count| count > 0), "{info}");
    assert!(info["shard_map_generation"].is_u64(), "{info}");

    let table = run_cli(&endpoint, &["cluster"]).await?;
    assert!(table.starts_with("MEMBER"), "{table}");
    let leader_row = table.lines().find(|line| line.starts_with(&leader)).context("a row for the leader")?;
    assert!(leader_row.trim_end().ends_with('*'), "{table}");
    assert!(table.lines().any(|line| line.starts_with("leader:") && line.ends_with(&leader)), "{table}");
    assert!(table.lines().any(|line| line.starts_with("shard count:")), "{table}");
    broker.finish().await
}

#[tokio::test]
async fn work_acks_a_job_which_is_completed_with_its_result() -> Result<()> {
    let broker = TestBroker::start().await?;
    let endpoint = broker.endpoint();
    let mut client = broker.broker().await;

    let nothing = run_cli(&endpoint, &["work", "--queue", "work.q", "--wait", "0.2"]).await?;
    assert_eq!(nothing.trim(), "no job");
    let nothing = run_json(&endpoint, &["work", "--queue", "work.q", "--wait", "0.2"]).await?;
    assert!(array(&nothing["jobs"])?.is_empty(), "{nothing}");

    let id = enqueued_id(
        &run_json(&endpoint, &["enqueue", "--queue", "work.q", "--kind", "send", "--payload", "do it"]).await?,
    )?;
    let out =
        run_cli(&endpoint, &["work", "--queue", "work.q", "--kind", "send", "--result", "done", "--wait", "5"]).await?;
    assert!(out.contains(&format!("leased job {id}")), "{out}");
    assert!(out.contains("kind send") && out.contains("attempt 1/"), "{out}");
    assert!(out.contains("payload: do it"), "{out}");
    assert!(out.contains(&format!("acked job {id}: OK")), "{out}");
    let job = get_job(&mut client, &id).await?;
    assert_eq!(job.state, v1::JobState::Completed as i32);
    assert_eq!(job.result, b"done");
    assert!(job.leased_by.is_empty());

    // Several jobs, as JSON; a kind filter leaves other kinds alone.
    run_cli(&endpoint, &["enqueue", "--queue", "work.q", "--kind", "send", "--count", "2"]).await?;
    let other = enqueued_id(&run_json(&endpoint, &["enqueue", "--queue", "work.q", "--kind", "other"]).await?)?;
    let worked =
        run_json(&endpoint, &["work", "--queue", "work.q", "--kind", "send", "--max-jobs", "2", "--wait", "5"]).await?;
    let jobs = array(&worked["jobs"])?;
    assert_eq!(jobs.len(), 2, "{worked}");
    for job in jobs {
        assert_eq!(text(&job["outcome"])?, "OK");
        assert_eq!(text(&job["job"]["kind"])?, "send");
        assert_eq!(job["attempt"].as_u64(), Some(1));
    }
    assert!(text(&worked["worker_id"])?.starts_with("cli-"), "{worked}");
    assert_eq!(state_of(&mut client, &other).await?, v1::JobState::Available);
    let stats = stats_of(&mut broker.admin().await, "work.q").await?;
    assert_eq!((stats.completed, stats.available, stats.leased), (3, 1, 0));
    broker.finish().await
}

#[tokio::test]
async fn work_reports_every_job_the_broker_pushed_after_the_ack() -> Result<()> {
    // An ack frees a slot and the broker refills it at once; when `work`
    // closes its stream that lease is released (spending an attempt). The
    // output must name exactly the jobs this happened to.
    let broker = TestBroker::start().await?;
    let endpoint = broker.endpoint();
    let mut client = broker.broker().await;
    let enqueued = run_json(&endpoint, &["enqueue", "--queue", "refill", "--kind", "k", "--count", "3"]).await?;
    let ids: Vec<String> = array(&enqueued["jobs"])?.iter().map(|job| text(&job["job_id"])).collect::<Result<_>>()?;

    let worked = run_json(&endpoint, &["work", "--queue", "refill", "--wait", "5"]).await?;
    let jobs = array(&worked["jobs"])?;
    assert_eq!(jobs.len(), 1, "{worked}");
    let acked = text(&jobs[0]["job"]["job_id"])?;
    let mut reported: Vec<String> =
        array(&worked["handed_back"])?.iter().map(|job| text(&job["job_id"])).collect::<Result<_>>()?;
    reported.sort();

    let mut spent = Vec::new();
    for id in &ids {
        let job = get_job(&mut client, id).await?;
        if *id == acked {
            assert_eq!(job.state, v1::JobState::Completed as i32);
            continue;
        }
        assert_eq!(job.state, v1::JobState::Available as i32, "job {id} is back in the queue");
        if job.attempt > 0 {
            spent.push(id.clone());
        }
    }
    spent.sort();
    assert_eq!(reported, spent, "handed back jobs reported: {worked}");
    for job in array(&worked["handed_back"])? {
        assert_eq!(text(&job["state"])?, "available");
        assert_eq!(job["attempt"].as_u64(), Some(1));
    }
    broker.finish().await
}

#[tokio::test]
async fn a_bad_queue_name_is_refused_with_the_field_named() -> Result<()> {
    let broker = TestBroker::start().await?;
    let endpoint = broker.endpoint();

    let error = run_cli(&endpoint, &["enqueue", "--queue", "", "--kind", "k"]).await.expect_err("empty queue");
    assert!(matches!(error, cli::Error::Status(ref status) if status.code() == tonic::Code::InvalidArgument));
    assert_eq!(error.one_line(), "INVALID_ARGUMENT: jobs[0].queue: must not be empty");

    let error =
        run_cli(&endpoint, &["enqueue", "--queue", "no spaces", "--kind", "k"]).await.expect_err("bad character");
    assert!(error.one_line().starts_with("INVALID_ARGUMENT: jobs[0].queue: "), "{}", error.one_line());

    for args in [
        &["stats", "bad/name"][..],
        &["jobs", "list", "--queue", "bad/name"][..],
        &["dead", "list", "--queue", "bad/name"][..],
        &["queues", "pause", "bad/name"][..],
        &["work", "--queue", "bad/name", "--wait", "1"][..],
    ] {
        let error = run_cli(&endpoint, args).await.expect_err("bad queue name");
        let line = error.one_line();
        assert!(line.starts_with("INVALID_ARGUMENT: ") && line.contains("queue"), "{args:?}: {line}");
    }

    let error = run_cli(&endpoint, &["jobs", "get", "not-an-id"]).await.expect_err("bad id");
    assert!(error.one_line().starts_with("INVALID_ARGUMENT: job_id"), "{}", error.one_line());
    let error = run_cli(&endpoint, &["jobs", "get", "987654321"]).await.expect_err("unknown id");
    assert!(error.one_line().starts_with("NOT_FOUND"), "{}", error.one_line());
    broker.finish().await
}

#[tokio::test]
async fn an_unreachable_endpoint_is_a_one_line_unavailable_error() -> Result<()> {
    // A port nothing listens on: bind one, then free it.
    let address = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
    let endpoint = format!("http://{address}");
    for args in [&["stats"][..], &["cluster"][..], &["jobs", "get", "1"][..], &["work", "--queue", "q"][..]] {
        let error = run_cli(&endpoint, args).await.expect_err("nothing listens there");
        let line = error.one_line();
        assert!(line.starts_with(&format!("UNAVAILABLE: cannot connect to {endpoint}")), "{args:?}: {line}");
        assert!(!line.contains('\n'));
    }
    // Without a scheme, http:// is assumed.
    let error = run_cli(&address.to_string(), &["stats"]).await.expect_err("nothing listens there");
    assert!(error.one_line().starts_with("UNAVAILABLE: "), "{}", error.one_line());

    // Usage errors and help come from the same entry point.
    let error = run_cli(&endpoint, &["enqueue", "--queue", "q"]).await.expect_err("--kind is required");
    assert!(matches!(error, cli::Error::Usage(_)), "{error:?}");
    let help = run_cli(&endpoint, &["jobs", "--help"]).await?;
    for command in ["list", "get", "cancel", "watch"] {
        assert!(help.contains(command), "{help}");
    }
    Ok(())
}

#[tokio::test]
async fn the_binary_prints_one_error_line_and_exits_non_zero() -> Result<()> {
    let binary = process::broker_binary()?;
    let broker = TestBroker::start().await?;
    let endpoint = broker.endpoint();
    let run = |args: Vec<String>| {
        let binary = binary.clone();
        tokio::task::spawn_blocking(move || {
            std::process::Command::new(binary)
                .args(args)
                .env_remove("WORKBROKER_ENDPOINT")
                .stdin(std::process::Stdio::null())
                .output()
        })
    };

    let output = run(vec![
        "enqueue".into(),
        "--queue".into(),
        "".into(),
        "--kind".into(),
        "k".into(),
        "--endpoint".into(),
        endpoint.clone(),
    ])
    .await??;
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(
        stderr, "error: INVALID_ARGUMENT: jobs[0].queue: must not be empty\n",
        "stale binary? rebuild with `cargo build -p workbroker-server`"
    );
    assert!(!output.status.success());
    assert!(output.stdout.is_empty());

    let output = run(vec![
        "enqueue".into(),
        "--queue".into(),
        "bin.q".into(),
        "--kind".into(),
        "k".into(),
        "--payload-file".into(),
        "-".into(),
        "--endpoint".into(),
        endpoint.clone(),
    ])
    .await??;
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    assert!(String::from_utf8_lossy(&output.stdout).starts_with("JOB ID"));

    let unreachable = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
    let output = run(vec!["stats".into(), "--endpoint".into(), format!("http://{unreachable}")]).await??;
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.starts_with("error: UNAVAILABLE: "), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(!output.status.success());
    broker.finish().await
}

/// `--runtime-threads` sets how many worker threads the broker's async
/// runtime has, and `/metrics` reports it.
#[tokio::test]
async fn the_broker_runs_as_many_runtime_threads_as_asked() -> Result<()> {
    let database = TestDatabase::create().await?;
    for threads in ["1", "3"] {
        let admin = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
        let admin_listen = admin.to_string();
        let mut broker = process::BrokerProcess::start_with_env(
            &database.url,
            "",
            "/workbroker-runtime-threads-test",
            10,
            &[("WORKBROKER_RUNTIME_THREADS", threads), ("WORKBROKER_ADMIN_LISTEN", admin_listen.as_str())],
        )
        .await?;
        let metrics = http_get(admin, "/metrics").await?;
        let line = metrics.body.lines().find(|line| line.starts_with("workbroker_runtime_threads ")).map(str::to_owned);
        broker.terminate()?;
        assert_eq!(line, Some(format!("workbroker_runtime_threads {threads}")), "{}", metrics.body);
    }
    database.drop_database().await
}
