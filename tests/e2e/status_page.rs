//! The HTML status page: fetched over HTTP and checked for what an operator
//! looks for, and rendered once in headless Chromium.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result};
use tracing_subscriber::layer::SubscriberExt;
use workbroker_api::v1;
use workbroker_server::admin::recent_errors::{RecentErrors, RecentErrorsLayer};
use workbroker_tests::*;

const WAIT: Duration = Duration::from_secs(10);
const CHROMIUM: &str = "/usr/bin/chromium";

/// A broker with a queue, a connected worker holding a lease, a paused
/// queue and a dead letter whose error needs escaping.
async fn broker_with_activity(worker_id: &str) -> Result<(TestBroker, Worker, String)> {
    let database = TestDatabase::create().await?;
    let config = test_config(&database.url);
    let member_id = config.member_id.clone();
    let broker = TestBroker::start_with_admin_config(database, config).await?;
    let mut client = broker.broker().await;
    enqueue(&mut client, (0..3).map(|_| new_job("status-q", "render")).collect()).await?;
    let mut worker = Worker::open(
        &mut client,
        v1::OpenLease {
            worker_id: worker_id.to_owned(),
            queues: vec!["status-q".to_owned()],
            max_in_flight: 2,
            ..Default::default()
        },
    )
    .await?;
    let leased = worker.take_jobs(2, WAIT).await?;
    let mut fatal = nack_of(&leased[0], "disk <full> & \"on fire\"");
    fatal.permanent = true;
    nack_all(&mut client, vec![fatal]).await?;
    worker.take_jobs(1, WAIT).await?;
    broker.admin().await.pause_queue(v1::PauseQueueRequest { queue: "paused-q".to_owned() }).await?;
    Ok((broker, worker, member_id))
}

#[tokio::test]
async fn the_status_page_shows_queues_workers_dead_letters_cluster_and_recent_errors() -> Result<()> {
    // The binary installs this layer globally (telemetry::init); here it
    // covers this test's thread, which runs the broker's tasks too.
    let subscriber = tracing_subscriber::registry().with(RecentErrorsLayer::new(RecentErrors::global()));
    let _guard = tracing::subscriber::set_default(subscriber);

    let (broker, worker, member_id) = broker_with_activity("status-worker-7").await?;
    tracing::warn!(marker = "status-page-test", "something <odd> happened");

    let page = broker.admin_get("/").await?;
    assert_eq!(page.status, 200);
    assert_eq!(page.header("content-type"), Some("text/html; charset=utf-8"));
    let html = &page.body;
    assert!(html.starts_with("<!DOCTYPE html>"));
    assert!(!html.contains("<script"), "the page needs no scripts");
    assert!(html.contains("<code>status-q</code>"), "the queue is listed");
    assert!(html.contains("<code>paused-q</code>") && html.contains(">paused<"), "the paused queue is marked");
    assert!(html.contains("<code>status-worker-7</code>"), "the worker of the open lease stream is listed");
    assert!(html.contains("2 lease(s) in flight"), "the worker's in-flight leases are counted");
    assert!(html.contains("disk &lt;full&gt; &amp; &quot;on fire&quot;"), "the dead letter's error is shown, escaped");
    assert!(!html.contains("disk <full>"), "raw error text must not reach the page");
    assert!(html.contains(&format!("<code>{member_id}</code>")), "the member is listed");
    assert!(html.contains("leader: <strong>"), "the leader is named");
    assert!(html.contains("0-63"), "the shard map shows this member owning every shard");
    assert!(html.contains("something &lt;odd&gt; happened marker=status-page-test"), "recent errors are listed");

    drop(worker);
    broker.finish().await
}

/// The number of distinct colours in an RGBA/RGB image (capped), to tell a
/// rendered page from a blank screenshot.
fn distinct_colours(path: &Path) -> Result<(u32, u32, usize)> {
    let decoder = png::Decoder::new(std::io::BufReader::new(std::fs::File::open(path)?));
    let mut reader = decoder.read_info()?;
    let mut buffer = vec![0; reader.output_buffer_size().context("image too large")?];
    let info = reader.next_frame(&mut buffer)?;
    let channels = info.color_type.samples();
    let mut colours = std::collections::HashSet::new();
    for pixel in buffer[..info.buffer_size()].chunks(channels) {
        colours.insert(pixel.to_vec());
        if colours.len() > 1000 {
            break;
        }
    }
    Ok((info.width, info.height, colours.len()))
}

#[tokio::test]
async fn chromium_renders_the_status_page() -> Result<()> {
    if !Path::new(CHROMIUM).exists() {
        println!("skipped: chromium not installed ({CHROMIUM} is absent)");
        return Ok(());
    }
    let (broker, worker, _member_id) = broker_with_activity("chromium-worker").await?;
    let address = broker.admin_address.context("admin listener")?;
    let directory = std::env::temp_dir().join(format!("workbroker-status-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&directory)?;
    let screenshot = directory.join("status.png");
    let url = format!("http://{address}/");
    let arguments = [
        "--headless".to_owned(),
        "--no-sandbox".to_owned(),
        "--disable-gpu".to_owned(),
        "--disable-background-networking".to_owned(),
        "--disable-component-update".to_owned(),
        "--disable-sync".to_owned(),
        "--no-first-run".to_owned(),
        format!("--user-data-dir={}", directory.join("profile").display()),
        format!("--screenshot={}", screenshot.display()),
        "--window-size=1280,900".to_owned(),
        url,
    ];
    let output = tokio::time::timeout(
        Duration::from_secs(90),
        tokio::task::spawn_blocking(move || Command::new(CHROMIUM).args(arguments).output()),
    )
    .await
    .context("chromium did not finish within 90 s")???;
    anyhow::ensure!(
        screenshot.exists(),
        "chromium wrote no screenshot (exit {}): {}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    let (width, height, colours) = distinct_colours(&screenshot)?;
    assert_eq!((width, height), (1280, 900));
    assert!(colours > 20, "the screenshot looks blank ({colours} colours)");
    println!("status page screenshot: {}", screenshot.display());
    drop(worker);
    broker.finish().await
}
