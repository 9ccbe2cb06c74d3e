//! The sync handler end to end: present, missing, corrupted and normal
//! blobs between local stores; an HTTP destination that fails mid-copy; the
//! full-sync producer.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::{Context, Result};
use prost::Message;
use workbroker_api::v1;
use workbroker_tests::TestBroker;
use workbroker_worker_sdk::handlers::sync::{
    self, Algorithm, Blob, BlobServer, BlobStore, FullSync, HttpBlobStore, LocalDirStore, SyncHandler,
};
use workbroker_worker_sdk::jobs::SyncResult;
use workbroker_worker_sdk::{Client, Worker};

use crate::common::{CuttingProxy, RunningWorker, TempDir, WAIT, eventually, fast_retries, init_logs, wait_terminal};

fn content(seed: u8, size: usize) -> Vec<u8> {
    (0..size).map(|index| (index as u8).wrapping_mul(31).wrapping_add(seed)).collect()
}

fn files_under(root: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut found = Vec::new();
    let mut pending = vec![root.to_path_buf()];
    while let Some(dir) = pending.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                pending.push(path);
            } else {
                found.push(path);
            }
        }
    }
    found
}

fn result_of(job: &v1::Job) -> Result<SyncResult> {
    Ok(SyncResult::decode(job.result.as_slice())?)
}

#[tokio::test]
async fn sync_copies_skips_retries_missing_and_rejects_corrupt_blobs() -> Result<()> {
    init_logs();
    let broker = TestBroker::start().await?;
    let client = Client::connect(broker.endpoint()).await?;
    fast_retries(&client, "blobs").await?;
    let source_dir = TempDir::new("sync-source")?;
    let destination_dir = TempDir::new("sync-destination")?;
    let source = LocalDirStore::new(source_dir.path.clone());
    let destination = LocalDirStore::new(destination_dir.path.clone());

    let normal = content(1, 200_000);
    let normal_blob = Blob::of(Algorithm::Sha256, &normal);
    source.put_bytes(&normal_blob, normal.clone()).await?;

    let present = content(2, 1000);
    let present_blob = Blob::of(Algorithm::Sha512, &present);
    source.put_bytes(&present_blob, present.clone()).await?;
    destination.put_bytes(&present_blob, present.clone()).await?;

    let late = content(3, 5000);
    let late_blob = Blob::of(Algorithm::Sha256, &late);

    // Same size, other bytes: only the digest check can tell.
    let corrupt = content(4, 70_000);
    let corrupt_blob = Blob::of(Algorithm::Sha256, &corrupt);
    let mut damaged = corrupt.clone();
    damaged[35_000] ^= 0xff;
    source.write_unchecked(&corrupt_blob, &damaged).await?;

    let handler = SyncHandler::builder().store("origin", source.clone()).store("replica", destination.clone()).build();
    let stats = handler.stats_handle();
    let worker =
        Worker::builder(client.clone()).queues(["blobs"]).concurrency(4).handler(sync::KIND, handler).build()?;
    let running = RunningWorker::start(worker);
    let ids: Vec<String> = client
        .enqueue_batch([
            sync::job("blobs", &normal_blob, "origin", "replica"),
            sync::job("blobs", &present_blob, "origin", "replica"),
            sync::job("blobs", &late_blob, "origin", "replica"),
            sync::job("blobs", &corrupt_blob, "origin", "replica"),
        ])
        .await?
        .into_iter()
        .map(|job| job.job_id)
        .collect();

    let copied = wait_terminal(&client, &ids[0], WAIT).await?;
    assert_eq!(copied.state, v1::JobState::Completed as i32, "{copied:?}");
    assert_eq!(result_of(&copied)?, SyncResult { copied: true, bytes: 200_000 });
    assert_eq!(std::fs::read(destination.path_of(&normal_blob))?, normal);
    assert_eq!(copied.dedup_key, normal_blob.reference());

    let skipped = wait_terminal(&client, &ids[1], WAIT).await?;
    assert_eq!(skipped.state, v1::JobState::Completed as i32, "{skipped:?}");
    assert_eq!(result_of(&skipped)?, SyncResult { copied: false, bytes: 0 });

    let rejected = wait_terminal(&client, &ids[3], WAIT).await?;
    assert_eq!(rejected.state, v1::JobState::Dead as i32, "{rejected:?}");
    assert!(rejected.last_error.contains("does not match"), "{}", rejected.last_error);
    assert_eq!(destination.stat(&corrupt_blob).await?, None, "nothing visible at the destination");

    eventually("the missing blob was retried", WAIT, || {
        let client = client.clone();
        let id = ids[2].clone();
        async move { Ok(client.get(&id).await?.attempt >= 2) }
    })
    .await?;
    assert!(client.get(&ids[2]).await?.last_error.contains("missing at the source"));
    assert_eq!(destination.stat(&late_blob).await?, None);
    source.put_bytes(&late_blob, late.clone()).await?;
    let arrived = wait_terminal(&client, &ids[2], WAIT).await?;
    assert_eq!(arrived.state, v1::JobState::Completed as i32, "{arrived:?}");
    assert_eq!(std::fs::read(destination.path_of(&late_blob))?, late);

    // No temporary leftovers, and exactly the three good blobs.
    let mut files = files_under(&destination_dir.path);
    files.sort();
    assert_eq!(files.len(), 3, "{files:?}");
    assert!(files.iter().all(|path| !path.to_string_lossy().contains(".tmp")), "{files:?}");

    let stats = stats.snapshot();
    assert_eq!(stats.copied, 2);
    assert_eq!(stats.skipped, 1);
    assert_eq!(stats.bytes, 205_000);
    assert!(stats.errors >= 2, "{stats:?}");
    assert!(stats.recent_errors.iter().any(|error| error.blob == corrupt_blob.reference()));
    running.stop().await?;
    broker.finish().await
}

#[tokio::test]
async fn an_http_destination_failing_mid_copy_leaves_nothing_and_the_retry_succeeds() -> Result<()> {
    init_logs();
    let broker = TestBroker::start().await?;
    let client = Client::connect(broker.endpoint()).await?;
    // A retry waits 1 s, long enough to look at the destination in between.
    client
        .admin()
        .configure_queue(v1::ConfigureQueueRequest {
            queue: "remote-blobs".into(),
            backoff_initial: Some(workbroker_api::time::duration_to_proto(Duration::from_secs(1))),
            backoff_max: Some(workbroker_api::time::duration_to_proto(Duration::from_secs(1))),
            backoff_jitter: Some(0.0),
            ..Default::default()
        })
        .await?;
    let source_dir = TempDir::new("sync-http-source")?;
    let server_dir = TempDir::new("sync-http-server")?;
    let source = LocalDirStore::new(source_dir.path.clone());
    let server_store = Arc::new(LocalDirStore::new(server_dir.path.clone()));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let server = BlobServer::new(listener, server_store.clone());
    let server_address = server.local_addr()?;
    let server_stop = tokio_util::sync::CancellationToken::new();
    let server_task = tokio::spawn(server.run(server_stop.clone()));
    let proxy = CuttingProxy::start(server_address, 1).await?;

    let data = content(9, 1_000_000);
    let blob = Blob::of(Algorithm::Sha256, &data);
    source.put_bytes(&blob, data.clone()).await?;
    let handler = SyncHandler::builder()
        .store("origin", source.clone())
        .store("remote", HttpBlobStore::new(&proxy.url())?)
        .build();
    let worker = Worker::builder(client.clone()).queues(["remote-blobs"]).handler(sync::KIND, handler).build()?;
    let running = RunningWorker::start(worker);
    let job = client.enqueue(sync::job("remote-blobs", &blob, "origin", "remote")).await?;

    // The first upload is cut mid-body; the job waits for its retry.
    let mut broker_client = broker.broker().await;
    workbroker_tests::wait_for_state(&mut broker_client, &job.job_id, v1::JobState::Scheduled, WAIT).await?;
    assert_eq!(proxy.cuts_done.load(Ordering::SeqCst), 1);
    let failed = client.get(&job.job_id).await?;
    assert_eq!(failed.attempt, 1);
    assert!(!failed.last_error.is_empty());
    assert_eq!(server_store.stat(&blob).await?, None, "no partial blob is visible");
    eventually("the server cleaned up the partial upload", Duration::from_secs(2), || {
        let root = server_dir.path.clone();
        async move { Ok(files_under(&root).is_empty()) }
    })
    .await?;

    let done = wait_terminal(&client, &job.job_id, WAIT).await?;
    assert_eq!(done.state, v1::JobState::Completed as i32, "{done:?}");
    assert_eq!(done.attempt, 2);
    assert_eq!(std::fs::read(server_store.path_of(&blob))?, data);
    // Read back through HTTP too.
    let remote = HttpBlobStore::new(&format!("http://{server_address}"))?;
    assert_eq!(remote.stat(&blob).await?, Some(1_000_000));
    running.stop().await?;
    server_stop.cancel();
    server_task.await?;
    broker.finish().await
}

#[tokio::test]
async fn the_full_sync_producer_enqueues_each_missing_blob_once() -> Result<()> {
    init_logs();
    let broker = TestBroker::start().await?;
    let client = Client::connect(broker.endpoint()).await?;
    let source_dir = TempDir::new("full-source")?;
    let destination_dir = TempDir::new("full-destination")?;
    let source = LocalDirStore::new(source_dir.path.clone());
    let destination = LocalDirStore::new(destination_dir.path.clone());
    let mut blobs = Vec::new();
    for seed in 0..5u8 {
        let data = content(seed + 20, 3000 + usize::from(seed));
        let blob = Blob::of(Algorithm::Sha256, &data);
        source.put_bytes(&blob, data.clone()).await?;
        if seed < 2 {
            destination.put_bytes(&blob, data).await?;
        }
        blobs.push(blob);
    }
    let full = FullSync::new(
        client.clone(),
        "full",
        ("origin", Arc::new(source.clone()) as Arc<dyn BlobStore>),
        ("replica", Arc::new(destination.clone()) as Arc<dyn BlobStore>),
    );
    let first = full.run_once().await?;
    assert_eq!((first.listed, first.missing, first.enqueued, first.deduplicated), (5, 3, 3, 0));
    // A second pass before the jobs ran: the dedup keys return the same jobs.
    let second = full.run_once().await?;
    assert_eq!((second.missing, second.enqueued, second.deduplicated), (3, 0, 3));
    let stats = client.queue_stats("full").await?.into_iter().next().context("stats")?;
    assert_eq!(stats.available, 3);

    let handler = SyncHandler::builder().store("origin", source.clone()).store("replica", destination.clone()).build();
    let worker = Worker::builder(client.clone()).queues(["full"]).handler(sync::KIND, handler).build()?;
    let running = RunningWorker::start(worker);
    eventually("the missing blobs were copied", WAIT, || {
        let client = client.clone();
        async move {
            let stats = client.queue_stats("full").await?;
            Ok(stats.first().is_some_and(|stats| stats.completed == 3))
        }
    })
    .await?;
    for blob in &blobs {
        assert_eq!(destination.stat(blob).await?, Some(blob.size), "{blob}");
    }
    let third = full.run_once().await?;
    assert_eq!((third.listed, third.missing, third.enqueued), (5, 0, 0));
    running.stop().await?;
    broker.finish().await
}
