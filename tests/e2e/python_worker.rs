//! The Python example (examples/python) against a real broker: the producer
//! enqueues 50 jobs, the worker completes them all (one after a nack, one
//! only thanks to lease extensions), then stops cleanly on SIGTERM.
//!
//! Needs `python3` (with `venv`) and PyPI: a virtualenv with
//! examples/python/requirements.txt is created once under target/python-venv.
//! Skips with a message when `python3` is missing.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::Duration;

use anyhow::{Context, Result};
use sha2::{Digest, Sha256};
use workbroker_api::v1;
use workbroker_tests::*;

const QUEUE: &str = "py-jobs";
const KIND: &str = "py-demo";
const TRACEPARENT: &str = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
const VENV_TIMEOUT: Duration = Duration::from_secs(600);
const PRODUCER_TIMEOUT: Duration = Duration::from_secs(120);
const COMPLETION_TIMEOUT: Duration = Duration::from_secs(120);
const EXIT_TIMEOUT: Duration = Duration::from_secs(20);

fn repo_root() -> PathBuf {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/..")).to_path_buf()
}

fn examples_dir() -> PathBuf {
    repo_root().join("examples/python")
}

/// The virtualenv's interpreter, creating the virtualenv first when it is
/// missing or was made from another requirements.txt.
async fn python_venv(scratch: &Path) -> Result<PathBuf> {
    let requirements_path = examples_dir().join("requirements.txt");
    let requirements = std::fs::read_to_string(&requirements_path).context("read requirements.txt")?;
    let target = repo_root().join("target");
    let venv = target.join("python-venv");
    let marker = venv.join(".workbroker-requirements");
    if std::fs::read_to_string(&marker).ok().as_deref() == Some(requirements.as_str()) {
        return Ok(venv.join("bin/python"));
    }
    // Build next to it and rename into place, so an interrupted or concurrent
    // build never leaves a half-made virtualenv behind the marker.
    std::fs::create_dir_all(&target)?;
    let building = target.join(format!("python-venv.building-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&building);
    println!("creating {} (pip install -r examples/python/requirements.txt)", venv.display());
    run_bounded(
        Command::new("python3").arg("-m").arg("venv").arg(&building),
        "python3 -m venv (Debian: apt-get install python3-venv)",
        VENV_TIMEOUT,
        scratch,
    )
    .await?;
    run_bounded(
        Command::new(building.join("bin/python"))
            .args(["-m", "pip", "install", "--disable-pip-version-check", "--no-input", "-r"])
            .arg(&requirements_path),
        "pip install -r examples/python/requirements.txt",
        VENV_TIMEOUT,
        scratch,
    )
    .await?;
    std::fs::write(building.join(".workbroker-requirements"), &requirements)?;
    let _ = std::fs::remove_dir_all(&venv);
    if let Err(error) = std::fs::rename(&building, &venv) {
        let _ = std::fs::remove_dir_all(&building);
        anyhow::ensure!(marker.exists(), "could not move the virtualenv into place: {error}");
    }
    Ok(venv.join("bin/python"))
}

/// Runs a command to completion within `limit`; returns its stdout, or an
/// error with its stderr.
async fn run_bounded(command: &mut Command, what: &str, limit: Duration, scratch: &Path) -> Result<String> {
    let name = uuid::Uuid::new_v4().simple().to_string();
    let stdout_path = scratch.join(format!("{name}.out"));
    let stderr_path = scratch.join(format!("{name}.err"));
    let mut child = command
        .stdin(Stdio::null())
        .stdout(File::create(&stdout_path)?)
        .stderr(File::create(&stderr_path)?)
        .spawn()
        .with_context(|| format!("start {what}"))?;
    let status = wait_bounded(&mut child, limit).await;
    let stdout = std::fs::read_to_string(&stdout_path).unwrap_or_default();
    let stderr = std::fs::read_to_string(&stderr_path).unwrap_or_default();
    match status {
        Ok(status) if status.success() => Ok(stdout),
        Ok(status) => anyhow::bail!("{what} failed ({status}):\n{stderr}{stdout}"),
        Err(error) => anyhow::bail!("{what}: {error}:\n{stderr}{stdout}"),
    }
}

/// Waits for the child to exit; kills it after `limit`.
async fn wait_bounded(child: &mut Child, limit: Duration) -> Result<ExitStatus> {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(status);
        }
        if tokio::time::Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            anyhow::bail!("did not finish within {limit:?} (killed)");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Environment shared by the Python scripts: stubs generated under target/,
/// unbuffered output, no bytecode written into the source tree.
fn python_command(python: &Path, script: &str) -> Command {
    let mut command = Command::new(python);
    command
        .arg(examples_dir().join(script))
        .current_dir(examples_dir())
        .env("WORKBROKER_PY_GENERATED_DIR", repo_root().join("target/python-generated"))
        .env("PYTHONUNBUFFERED", "1")
        .env("PYTHONDONTWRITEBYTECODE", "1");
    command
}

/// Runs the producer and returns the ids it printed.
async fn produce(python: &Path, endpoint: &str, scratch: &Path, count: usize, extra: &[&str]) -> Result<Vec<String>> {
    let mut command = python_command(python, "producer.py");
    command.args(["--endpoint", endpoint, "--queue", QUEUE, "--kind", KIND, "--print-ids"]);
    command.args(["--count", &count.to_string()]).args(extra);
    let stdout = run_bounded(&mut command, "producer.py", PRODUCER_TIMEOUT, scratch).await?;
    let ids: Vec<String> = stdout.lines().map(str::trim).filter(|line| !line.is_empty()).map(str::to_owned).collect();
    anyhow::ensure!(ids.len() == count, "producer printed {} ids, expected {count}: {stdout}", ids.len());
    Ok(ids)
}

/// The worker as a child process; killed if the test ends early.
struct WorkerProcess {
    child: Option<Child>,
    log: PathBuf,
}

impl WorkerProcess {
    fn start(python: &Path, endpoint: &str, scratch: &Path) -> Result<Self> {
        let log = scratch.join("worker.log");
        let output = File::create(&log)?;
        let child = python_command(python, "worker.py")
            .args(["--endpoint", endpoint, "--queue", QUEUE, "--kind", KIND])
            .args(["--worker-id", "python-e2e", "--max-in-flight", "8", "--shutdown-grace", "10"])
            .stdin(Stdio::null())
            .stdout(output.try_clone()?)
            .stderr(output)
            .spawn()
            .context("start worker.py")?;
        Ok(Self { child: Some(child), log })
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Fails if the worker already exited.
    fn ensure_running(&mut self) -> Result<()> {
        let child = self.child.as_mut().context("worker already stopped")?;
        if let Some(status) = child.try_wait()? {
            anyhow::bail!("the worker exited early ({status}):\n{}", self.log());
        }
        Ok(())
    }

    /// SIGTERM, then waits for the exit.
    async fn terminate(&mut self) -> Result<ExitStatus> {
        let mut child = self.child.take().context("worker already stopped")?;
        let signalled = Command::new("kill").arg("-TERM").arg(child.id().to_string()).status();
        if !matches!(signalled, Ok(status) if status.success()) {
            let _ = child.kill();
            let _ = child.wait();
            anyhow::bail!("could not send SIGTERM to the worker: {signalled:?}");
        }
        wait_bounded(&mut child, EXIT_TIMEOUT).await.context("the worker after SIGTERM")
    }
}

impl Drop for WorkerProcess {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn python3_available() -> bool {
    match Command::new("python3").arg("--version").stdout(Stdio::null()).stderr(Stdio::null()).status() {
        Ok(status) => status.success(),
        Err(error) => {
            println!("skipping the Python worker test: python3 not found ({error}); install python3 and python3-venv");
            false
        }
    }
}

fn hex_sha256(data: &[u8]) -> String {
    Sha256::digest(data).iter().map(|byte| format!("{byte:02x}")).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_python_worker_completes_jobs_from_the_python_producer() -> Result<()> {
    if !python3_available() {
        return Ok(());
    }
    let scratch = std::env::temp_dir().join(format!("workbroker-python-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&scratch)?;
    let python = python_venv(&scratch).await?;

    let broker = TestBroker::start().await?;
    let endpoint = broker.endpoint();
    let mut client = broker.broker().await;
    let mut admin = broker.admin().await;

    let started = tokio::time::Instant::now();
    let plain =
        produce(&python, &endpoint, &scratch, 45, &["--payload", "hello {i}", "--attribute", "source=e2e"]).await?;
    // A few keyed jobs: the broker leases them one at a time, in enqueue order.
    let keyed =
        produce(&python, &endpoint, &scratch, 3, &["--payload", "keyed {i}", "--ordering-key", "account-7"]).await?;
    let fail_once =
        produce(&python, &endpoint, &scratch, 1, &["--payload", "fail-once", "--traceparent", TRACEPARENT]).await?;
    let long = produce(&python, &endpoint, &scratch, 1, &["--payload", "sleep:4", "--lease-duration", "2"]).await?;
    let total = plain.len() + keyed.len() + fail_once.len() + long.len();
    println!("the producer enqueued {total} jobs in {:?}", started.elapsed());

    let mut worker = WorkerProcess::start(&python, &endpoint, &scratch)?;
    let started = tokio::time::Instant::now();
    loop {
        let stats = stats_of(&mut admin, QUEUE).await?;
        if stats.completed == total as u64 {
            break;
        }
        worker.ensure_running()?;
        anyhow::ensure!(
            started.elapsed() < COMPLETION_TIMEOUT,
            "only {} of {total} jobs completed within {COMPLETION_TIMEOUT:?} ({stats:?}); worker log:\n{}",
            stats.completed,
            worker.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    println!("the worker completed {total} jobs in {:?}", started.elapsed());

    // Ordinary jobs: first attempt, the handler's result, attributes kept.
    let first = get_job(&mut client, &plain[0]).await?;
    assert_eq!(first.payload, b"hello 0");
    assert_eq!(first.result, hex_sha256(b"hello 0").as_bytes(), "result = sha256 of the payload");
    assert_eq!(first.attributes.get("source").map(String::as_str), Some("e2e"));
    for id in plain.iter().chain(&keyed) {
        let job = get_job(&mut client, id).await?;
        assert_eq!(job.state, v1::JobState::Completed as i32, "job {id}");
        assert_eq!(job.attempt, 1, "job {id} took one attempt");
        let traceparent = job.attributes.get("traceparent").context("a traceparent attribute")?;
        assert!(
            traceparent.len() == 55 && traceparent.starts_with("00-") && traceparent.ends_with("-01"),
            "job {id}: a W3C traceparent, got {traceparent}"
        );
    }

    // Keyed jobs completed one at a time, in enqueue order.
    let mut keyed_jobs = Vec::new();
    for id in &keyed {
        keyed_jobs.push(get_job(&mut client, id).await?);
    }
    keyed_jobs.sort_by_key(|job| job.sequence);
    for pair in keyed_jobs.windows(2) {
        let earlier = pair[0].finished_at.as_ref().context("finished_at")?;
        let later = pair[1].finished_at.as_ref().context("finished_at")?;
        assert!(
            (earlier.seconds, earlier.nanos) <= (later.seconds, later.nanos),
            "keyed job {} finished before {} (an earlier sequence)",
            pair[1].job_id,
            pair[0].job_id
        );
    }

    // The nacked job: failed once (retry_after 0), completed on the second attempt.
    let nacked = get_job(&mut client, &fail_once[0]).await?;
    assert_eq!(nacked.state, v1::JobState::Completed as i32);
    assert_eq!(nacked.attempt, 2, "fail-once completes on its second attempt");
    assert_eq!(nacked.last_error, "failing once on purpose");
    assert_eq!(nacked.attributes.get("traceparent").map(String::as_str), Some(TRACEPARENT));

    // The long job: a 2 s lease, 4 s of work, kept alive by ExtendLease.
    let long_job = get_job(&mut client, &long[0]).await?;
    assert_eq!(long_job.state, v1::JobState::Completed as i32);
    assert_eq!(long_job.attempt, 1, "the lease was extended, never lost");
    assert_eq!(long_job.result, b"slept");
    let log = worker.log();
    assert!(
        log.contains(&format!("extended the lease of job {}", long[0])),
        "the worker extended the long job's lease; log:\n{log}"
    );

    // SIGTERM: a clean exit (status 0), nothing left leased.
    let status = worker.terminate().await?;
    let log = worker.log();
    println!("--- worker log ---\n{log}--- end of worker log ---");
    assert!(status.success(), "the worker exits 0 after SIGTERM, got {status}");
    assert!(log.contains("stopped:"), "the worker logged its clean stop");
    let stats = stats_of(&mut admin, QUEUE).await?;
    assert_eq!(stats.leased, 0, "no job left leased: {stats:?}");
    assert_eq!(stats.completed, total as u64, "{stats:?}");
    assert_eq!(stats.available + stats.scheduled + stats.dead, 0, "{stats:?}");

    let _ = std::fs::remove_dir_all(&scratch);
    broker.finish().await
}
