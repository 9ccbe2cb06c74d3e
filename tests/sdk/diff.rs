//! The diff handler end to end: generated PNGs with known differences,
//! metrics in the job result and in `diff_metrics`, and its failure modes.

use std::time::Duration;

use anyhow::{Context, Result};
use prost::Message;
use workbroker_api::v1;
use workbroker_tests::TestBroker;
use workbroker_worker_sdk::handlers::diff::{
    self, DecodedImage, DiffHandler, DirectorySource, HttpSource, MetricsStore, encode_png,
};
use workbroker_worker_sdk::jobs::{DiffJob, DiffResult};
use workbroker_worker_sdk::{Client, JobBuilder, Worker};

use crate::common::{RunningWorker, StaticServer, TempDir, WAIT, fast_retries, init_logs, wait_terminal};

fn solid(width: u32, height: u32, pixel: [u8; 4]) -> DecodedImage {
    DecodedImage { width, height, rgba: pixel.repeat((width * height) as usize) }
}

fn write_png(dir: &TempDir, digest: &str, image: &DecodedImage) -> Result<()> {
    std::fs::write(dir.join(&format!("{digest}.png")), encode_png(image)?)?;
    Ok(())
}

fn result_of(job: &v1::Job) -> Result<DiffResult> {
    Ok(DiffResult::decode(job.result.as_slice())?)
}

#[tokio::test]
async fn diff_metrics_of_known_differences_are_returned_and_stored() -> Result<()> {
    init_logs();
    let broker = TestBroker::start().await?;
    let client = Client::connect(broker.endpoint()).await?;
    fast_retries(&client, "diffs").await?;
    let images = TempDir::new("diff-images")?;
    let base = solid(8, 4, [100, 150, 200, 255]);
    let mut one_pixel = base.clone();
    // Pixel (3, 2): red +20, green -40, alpha unchanged.
    let offset = ((2 * 8 + 3) * 4) as usize;
    one_pixel.rgba[offset] = 120;
    one_pixel.rgba[offset + 1] = 110;
    let wider = solid(10, 4, [100, 150, 200, 255]);
    write_png(&images, "sha256-base", &base)?;
    write_png(&images, "sha256-one", &one_pixel)?;
    write_png(&images, "sha256-wider", &wider)?;
    std::fs::write(images.join("sha256-garbage.png"), b"this is not a png")?;

    let pool = broker.database.pool().await?;
    let store = MetricsStore::new(pool.clone(), "workbroker_handlers")?;
    let handler = DiffHandler::builder()
        .source(diff::DEFAULT_SOURCE, DirectorySource::new(images.path.clone()))
        .metrics_store(store.clone())
        .build_with_setup()
        .await?;
    let worker =
        Worker::builder(client.clone()).queues(["diffs"]).concurrency(4).handler(diff::KIND, handler).build()?;
    let running = RunningWorker::start(worker);

    let enqueued = client
        .enqueue_batch([
            diff::job("diffs", "sha256-base", "sha256-base"),
            diff::job("diffs", "sha256-one", "sha256-base"),
            diff::job("diffs", "sha256-base", "sha256-wider"),
            diff::job("diffs", "sha256-base", "sha256-late"),
            diff::job("diffs", "sha256-base", "sha256-garbage"),
            JobBuilder::new("diffs", diff::KIND).message(&DiffJob {
                version: 2,
                left_digest: "sha256-base".into(),
                right_digest: "sha256-one".into(),
                image_source: String::new(),
            }),
            JobBuilder::new("diffs", diff::KIND).payload(b"\xff\xff not protobuf".to_vec()),
        ])
        .await?;
    let ids: Vec<String> = enqueued.into_iter().map(|job| job.job_id).collect();

    // Identical: nothing differs.
    let identical = wait_terminal(&client, &ids[0], WAIT).await?;
    assert_eq!(identical.state, v1::JobState::Completed as i32, "{identical:?}");
    let result = result_of(&identical)?;
    assert_eq!(result.differing_pixels, 0);
    assert_eq!(result.total_pixels, 32);
    assert_eq!(result.max_channel_difference, 0);
    assert_eq!(result.score, 0.0);
    assert!(!result.dimensions_differ);

    // One pixel off by (20, 40, 0, 0).
    let one = wait_terminal(&client, &ids[1], WAIT).await?;
    assert_eq!(one.state, v1::JobState::Completed as i32, "{one:?}");
    let result = result_of(&one)?;
    assert_eq!(result.differing_pixels, 1);
    assert_eq!(result.differing_percent, 100.0 / 32.0);
    assert_eq!(result.max_channel_difference, 40);
    let expected_score = 0.5 / 32.0 + 0.5 * (60.0 / (32.0 * 4.0)) / 255.0;
    assert!((result.score - expected_score).abs() < 1e-12, "{}", result.score);
    // Stored under the unordered pair: found in either order.
    let stored = store.get("sha256-base", "sha256-one").await?.context("row for the pair")?;
    assert_eq!(stored.digest_a, "sha256-base");
    assert_eq!(stored.result.differing_pixels, 1);
    assert_eq!(stored.result.max_channel_difference, 40);

    // Different dimensions: the two extra columns differ.
    let wider_job = wait_terminal(&client, &ids[2], WAIT).await?;
    let result = result_of(&wider_job)?;
    assert!(result.dimensions_differ);
    assert_eq!(result.total_pixels, 40);
    assert_eq!(result.differing_pixels, 8);
    assert_eq!((result.left_width, result.right_width), (8, 10));
    let stored = store.get("sha256-wider", "sha256-base").await?.context("row")?;
    assert!(stored.result.dimensions_differ);
    assert_eq!(stored.result.differing_pixels, 8);

    // Undecodable image, unknown version, undecodable payload: dead at once.
    for (index, needle) in
        [(4, "sha256-garbage"), (5, "unsupported diff payload version 2"), (6, "payload does not decode")]
    {
        let job = wait_terminal(&client, &ids[index], WAIT).await?;
        assert_eq!(job.state, v1::JobState::Dead as i32, "{job:?}");
        assert_eq!(job.attempt, 1, "permanent errors are not retried");
        assert!(job.last_error.contains(needle), "{}", job.last_error);
    }

    // A missing image is retried until it appears.
    crate::common::eventually("the missing image was retried", WAIT, || {
        let client = client.clone();
        let id = ids[3].clone();
        async move { Ok(client.get(&id).await?.attempt >= 2) }
    })
    .await?;
    let waiting = client.get(&ids[3]).await?;
    assert!(waiting.last_error.contains("not found"), "{}", waiting.last_error);
    write_png(&images, "sha256-late", &base)?;
    let late = wait_terminal(&client, &ids[3], WAIT).await?;
    assert_eq!(late.state, v1::JobState::Completed as i32, "{late:?}");
    assert_eq!(result_of(&late)?.differing_pixels, 0);

    let rows: i64 =
        sqlx::query_scalar("SELECT count(*) FROM workbroker_handlers.diff_metrics").fetch_one(&pool).await?;
    assert_eq!(rows, 4, "base/base, base/one, base/wider, base/late");
    pool.close().await;
    running.stop().await?;
    broker.finish().await
}

#[tokio::test]
async fn diff_loads_images_over_http_and_times_out_slow_sources() -> Result<()> {
    init_logs();
    let broker = TestBroker::start().await?;
    let client = Client::connect(broker.endpoint()).await?;
    let images = TempDir::new("diff-http")?;
    let left = solid(3, 3, [0, 0, 0, 255]);
    let mut right = left.clone();
    right.rgba[0] = 255;
    write_png(&images, "left", &left)?;
    write_png(&images, "right", &right)?;
    let server = StaticServer::start(images.path.clone()).await?;
    let handler = DiffHandler::builder()
        .source("cdn", HttpSource::new(&server.url())?)
        .timeout(Duration::from_millis(500))
        .build();
    let worker = Worker::builder(client.clone()).queues(["http-diffs"]).handler(diff::KIND, handler).build()?;
    let running = RunningWorker::start(worker);
    let ok = client.enqueue(diff::job_from_source("http-diffs", "left", "right", "cdn")).await?;
    let slow = client.enqueue(diff::job_from_source("http-diffs", "left", "slow-image", "cdn").max_attempts(1)).await?;
    let unknown_source = client.enqueue(diff::job_from_source("http-diffs", "left", "right", "nowhere")).await?;

    let job = wait_terminal(&client, &ok.job_id, WAIT).await?;
    assert_eq!(job.state, v1::JobState::Completed as i32, "{job:?}");
    let result = result_of(&job)?;
    assert_eq!(result.differing_pixels, 1);
    assert_eq!(result.max_channel_difference, 255);

    let started = tokio::time::Instant::now();
    let job = wait_terminal(&client, &slow.job_id, WAIT).await?;
    assert_eq!(job.state, v1::JobState::Dead as i32, "one attempt allowed: {job:?}");
    assert!(job.last_error.contains("cancelled while loading images"), "{}", job.last_error);
    assert!(started.elapsed() < Duration::from_secs(5), "the timeout cut the 30 s load short");

    let job = wait_terminal(&client, &unknown_source.job_id, WAIT).await?;
    assert_eq!(job.state, v1::JobState::Dead as i32);
    assert!(job.last_error.contains("unknown image source"), "{}", job.last_error);
    running.stop().await?;
    broker.finish().await
}
