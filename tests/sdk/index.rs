//! The index handler end to end against a bare git repository on disk:
//! publish / yank / unyank sequences in order, idempotent re-runs, and a
//! push that fails once and is retried.

use std::time::Duration;

use anyhow::{Context, Result};
use prost::Message;
use workbroker_api::v1;
use workbroker_tests::TestBroker;
use workbroker_worker_sdk::handlers::index::{self, IndexConfig, IndexHandler};
use workbroker_worker_sdk::jobs::{IndexResult, PublishVersion};
use workbroker_worker_sdk::{Client, Worker};

use crate::common::{RunningWorker, TempDir, WAIT, eventually, fast_retries, init_logs, wait_terminal};

fn release(name: &str, vers: &str) -> PublishVersion {
    PublishVersion {
        name: name.to_owned(),
        vers: vers.to_owned(),
        cksum: format!("{:0>64}", format!("{:x}", vers.len() * 7 + name.len())),
        ..Default::default()
    }
}

/// The bare remote and the worker's checkout.
struct Remote {
    _dir: TempDir,
    bare: std::path::PathBuf,
    checkout: std::path::PathBuf,
}

impl Remote {
    fn new() -> Result<Self> {
        let dir = TempDir::new("index")?;
        let bare = dir.join("index.git");
        git2::Repository::init_bare(&bare)?;
        let checkout = dir.join("checkout");
        Ok(Self { _dir: dir, bare, checkout })
    }

    fn url(&self) -> String {
        self.bare.to_string_lossy().into_owned()
    }

    fn handler(&self) -> IndexHandler {
        let mut config = IndexConfig::new(self.url(), self.checkout.clone());
        config.push_retry_after = Duration::from_millis(300);
        IndexHandler::new(config)
    }

    /// The file at `path` on the remote's main branch.
    fn file(&self, path: &str) -> Result<String> {
        let repo = git2::Repository::open_bare(&self.bare)?;
        let commit = repo.find_reference("refs/heads/main")?.peel_to_commit()?;
        let entry = commit.tree()?.get_path(std::path::Path::new(path))?;
        let blob = repo.find_blob(entry.id())?;
        Ok(String::from_utf8(blob.content().to_vec())?)
    }

    /// Commit subjects on the remote's main branch, oldest first.
    fn log(&self) -> Result<Vec<String>> {
        let repo = git2::Repository::open_bare(&self.bare)?;
        let mut walk = repo.revwalk()?;
        walk.push_ref("refs/heads/main")?;
        walk.set_sorting(git2::Sort::TOPOLOGICAL | git2::Sort::REVERSE)?;
        let mut subjects = Vec::new();
        for id in walk {
            let commit = repo.find_commit(id?)?;
            subjects.push(commit.summary().ok().flatten().unwrap_or_default().to_owned());
        }
        Ok(subjects)
    }
}

fn yanked_by_version(file: &str) -> Result<Vec<(String, bool)>> {
    file.lines()
        .map(|line| {
            let value: serde_json::Value = serde_json::from_str(line)?;
            Ok((value["vers"].as_str().context("vers")?.to_owned(), value["yanked"].as_bool().context("yanked")?))
        })
        .collect()
}

#[tokio::test]
async fn publish_yank_unyank_apply_in_order_and_rerun_idempotently() -> Result<()> {
    init_logs();
    let broker = TestBroker::start().await?;
    let client = Client::connect(broker.endpoint()).await?;
    let remote = Remote::new()?;
    let worker = Worker::builder(client.clone())
        .queues(["index"])
        .concurrency(4)
        .handler(index::KIND, remote.handler())
        .build()?;
    let running = RunningWorker::start(worker);

    // All at once, the rapid yank → unyank → yank of 1.0.0 included: the
    // ordering key (the lowercase package name) keeps each package's jobs
    // in enqueue order even with four handlers running.
    let enqueued = client
        .enqueue_batch([
            index::publish("index", release("Demo-Crate", "1.0.0")),
            index::publish("index", release("x", "0.1.0")),
            index::publish("index", release("Demo-Crate", "1.1.0")),
            index::yank("index", "Demo-Crate", "1.0.0"),
            index::unyank("index", "demo-crate", "1.0.0"),
            index::yank("index", "Demo-Crate", "1.0.0"),
            index::yank("index", "x", "0.1.0"),
        ])
        .await?;
    let mut ids = Vec::new();
    for job in enqueued {
        let job = wait_terminal(&client, &job.job_id, WAIT).await?;
        assert_eq!(job.state, v1::JobState::Completed as i32, "{job:?}");
        assert!(job.ordering_key == "demo-crate" || job.ordering_key == "x", "{job:?}");
        ids.push(job.job_id);
    }
    assert_eq!(ids.len(), 7);

    let demo = remote.file("de/mo/demo-crate")?;
    assert_eq!(
        yanked_by_version(&demo)?,
        vec![("1.0.0".to_owned(), true), ("1.1.0".to_owned(), false)],
        "final state after yank, unyank, yank is yanked:\n{demo}"
    );
    assert!(demo.starts_with("{\"name\":\"Demo-Crate\",\"vers\":\"1.0.0\",\"deps\":[],\"cksum\":"), "{demo}");
    assert_eq!(yanked_by_version(&remote.file("1/x")?)?, vec![("0.1.0".to_owned(), true)]);
    let log = remote.log()?;
    let demo_log: Vec<&String> =
        log.iter().filter(|subject| subject.contains("Demo-Crate") || subject.contains("demo-crate")).collect();
    assert_eq!(
        demo_log,
        [
            "Publish Demo-Crate 1.0.0",
            "Publish Demo-Crate 1.1.0",
            "Yank Demo-Crate 1.0.0",
            "Unyank demo-crate 1.0.0",
            "Yank Demo-Crate 1.0.0",
        ],
        "{log:?}"
    );
    assert_eq!(log.len(), 7);

    // Re-running the same jobs changes nothing and commits nothing.
    for rerun in [
        index::publish("index", release("Demo-Crate", "1.1.0")),
        index::yank("index", "Demo-Crate", "1.0.0"),
        index::publish("index", release("x", "0.1.0")),
    ] {
        let enqueued = client.enqueue(rerun).await?;
        let job = wait_terminal(&client, &enqueued.job_id, WAIT).await?;
        assert_eq!(job.state, v1::JobState::Completed as i32, "{job:?}");
        let result = IndexResult::decode(job.result.as_slice())?;
        assert!(!result.changed, "{result:?}");
    }
    assert_eq!(remote.file("de/mo/demo-crate")?, demo);
    assert_eq!(remote.log()?.len(), 7);

    // Conflicting metadata for a published version, and a yank of an
    // unknown version, are refused for good.
    let mut conflicting = release("Demo-Crate", "1.0.0");
    conflicting.cksum = "f".repeat(64);
    for (refused, needle) in [
        (index::publish("index", conflicting), "different metadata"),
        (index::yank("index", "Demo-Crate", "9.9.9"), "not in the index"),
    ] {
        let enqueued = client.enqueue(refused).await?;
        let job = wait_terminal(&client, &enqueued.job_id, WAIT).await?;
        assert_eq!(job.state, v1::JobState::Dead as i32, "{job:?}");
        assert!(job.last_error.contains(needle), "{}", job.last_error);
    }
    running.stop().await?;
    broker.finish().await
}

#[tokio::test]
async fn a_failing_push_is_retried_and_lands_once() -> Result<()> {
    init_logs();
    let broker = TestBroker::start().await?;
    let client = Client::connect(broker.endpoint()).await?;
    fast_retries(&client, "index-push").await?;
    let remote = Remote::new()?;
    let worker =
        Worker::builder(client.clone()).queues(["index-push"]).handler(index::KIND, remote.handler()).build()?;
    let running = RunningWorker::start(worker);
    let first = client.enqueue(index::publish("index-push", release("serde", "1.0.0"))).await?;
    wait_terminal(&client, &first.job_id, WAIT).await?;

    // A stale ref lock in the remote makes the next push fail.
    let lock = remote.bare.join("refs/heads/main.lock");
    std::fs::write(&lock, b"")?;
    let job = client.enqueue(index::yank("index-push", "serde", "1.0.0")).await?;
    eventually("the push failed once", WAIT, || {
        let client = client.clone();
        let id = job.job_id.clone();
        async move { Ok(!client.get(&id).await?.last_error.is_empty()) }
    })
    .await?;
    let failed = client.get(&job.job_id).await?;
    assert!(failed.last_error.contains("push"), "{}", failed.last_error);
    assert_eq!(yanked_by_version(&remote.file("se/rd/serde")?)?, vec![("1.0.0".to_owned(), false)]);
    std::fs::remove_file(&lock)?;

    let done = wait_terminal(&client, &job.job_id, WAIT).await?;
    assert_eq!(done.state, v1::JobState::Completed as i32, "{done:?}");
    assert!(done.attempt >= 2, "{done:?}");
    assert_eq!(yanked_by_version(&remote.file("se/rd/serde")?)?, vec![("1.0.0".to_owned(), true)]);
    assert_eq!(remote.log()?, ["Publish serde 1.0.0", "Yank serde 1.0.0"]);
    running.stop().await?;
    broker.finish().await
}
