//! Telemetry: the Prometheus `/metrics` endpoint scraped and parsed, health
//! and readiness, and OTLP export received by an in-test collector (the
//! `opentelemetry-proto` generated tonic servers).

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result};
use opentelemetry_proto::tonic::collector::metrics::v1::metrics_service_server::{
    MetricsService, MetricsServiceServer,
};
use opentelemetry_proto::tonic::collector::metrics::v1::{ExportMetricsServiceRequest, ExportMetricsServiceResponse};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{TraceService, TraceServiceServer};
use opentelemetry_proto::tonic::collector::trace::v1::{ExportTraceServiceRequest, ExportTraceServiceResponse};
use opentelemetry_proto::tonic::common::v1::KeyValue;
use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValue;
use opentelemetry_proto::tonic::metrics::v1::metric::Data as MetricData;
use opentelemetry_proto::tonic::metrics::v1::number_data_point::Value as NumberValue;
use opentelemetry_proto::tonic::trace::v1::Span;
use tokio_util::sync::CancellationToken;
use workbroker_api::v1;
use workbroker_tests::process::BrokerProcess;
use workbroker_tests::*;

const WAIT: Duration = Duration::from_secs(10);

/// One scrape in the Prometheus text format.
struct Scrape {
    samples: Vec<(String, BTreeMap<String, String>, f64)>,
    types: HashMap<String, String>,
}

impl Scrape {
    fn parse(text: &str) -> Result<Self> {
        let mut samples = Vec::new();
        let mut types = HashMap::new();
        for line in text.lines().filter(|line| !line.trim().is_empty()) {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let (name, kind) = rest.split_once(' ').context("TYPE line without a kind")?;
                types.insert(name.to_owned(), kind.to_owned());
                continue;
            }
            if line.starts_with('#') {
                continue;
            }
            let (series, value) = line.rsplit_once(' ').with_context(|| format!("no value in {line:?}"))?;
            let value: f64 = match value {
                "+Inf" => f64::INFINITY,
                other => other.parse().with_context(|| format!("bad value in {line:?}"))?,
            };
            let (name, labels) = match series.split_once('{') {
                None => (series.to_owned(), BTreeMap::new()),
                Some((name, rest)) => {
                    let body = rest.strip_suffix('}').with_context(|| format!("unclosed labels in {line:?}"))?;
                    (name.to_owned(), parse_labels(body)?)
                }
            };
            samples.push((name, labels, value));
        }
        Ok(Self { samples, types })
    }

    /// The sample of `name` whose labels are exactly `labels`.
    fn value(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let wanted: BTreeMap<String, String> =
            labels.iter().map(|(key, value)| ((*key).to_owned(), (*value).to_owned())).collect();
        self.samples.iter().find(|(sample, labels, _)| sample == name && *labels == wanted).map(|(_, _, value)| *value)
    }

    fn value_or_zero(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.value(name, labels).unwrap_or(0.0)
    }
}

fn parse_labels(body: &str) -> Result<BTreeMap<String, String>> {
    let mut labels = BTreeMap::new();
    let mut rest = body;
    while !rest.is_empty() {
        let (key, after) = rest.split_once("=\"").context("label without a value")?;
        let mut value = String::new();
        let mut characters = after.char_indices();
        let mut end = None;
        while let Some((index, character)) = characters.next() {
            match character {
                '\\' => match characters.next() {
                    Some((_, 'n')) => value.push('\n'),
                    Some((_, escaped)) => value.push(escaped),
                    None => anyhow::bail!("dangling escape"),
                },
                '"' => {
                    end = Some(index);
                    break;
                }
                other => value.push(other),
            }
        }
        let end = end.context("unterminated label value")?;
        labels.insert(key.trim_start_matches(',').to_owned(), value);
        rest = after[end + 1..].trim_start_matches(',');
    }
    Ok(labels)
}

async fn scrape(broker: &TestBroker) -> Result<Scrape> {
    let response = broker.admin_get("/metrics").await?;
    anyhow::ensure!(response.status == 200, "/metrics answered {}", response.status);
    anyhow::ensure!(
        response.header("content-type").is_some_and(|value| value.starts_with("text/plain; version=0.0.4")),
        "unexpected content type {:?}",
        response.header("content-type")
    );
    Scrape::parse(&response.body)
}

/// Scrapes until `check` holds (error after `wait`).
async fn scrape_until(broker: &TestBroker, wait: Duration, check: impl Fn(&Scrape) -> bool) -> Result<Scrape> {
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        let scraped = scrape(broker).await?;
        if check(&scraped) {
            return Ok(scraped);
        }
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "metrics did not reach the expected values in {wait:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

const REQUIRED_METRICS: [(&str, &str); 19] = [
    ("workbroker_jobs_enqueued_total", "counter"),
    ("workbroker_jobs_leased_total", "counter"),
    ("workbroker_jobs_acked_total", "counter"),
    ("workbroker_jobs_nacked_total", "counter"),
    ("workbroker_jobs_expired_total", "counter"),
    ("workbroker_jobs_released_total", "counter"),
    ("workbroker_jobs_dead_total", "counter"),
    ("workbroker_job_lease_latency_seconds", "histogram"),
    ("workbroker_jobs", "gauge"),
    ("workbroker_queue_oldest_available_age_seconds", "gauge"),
    ("workbroker_leases_in_flight", "gauge"),
    ("workbroker_lease_streams", "gauge"),
    ("workbroker_leader", "gauge"),
    ("workbroker_owned_shards", "gauge"),
    ("workbroker_db_pool_connections", "gauge"),
    ("workbroker_db_pool_max_connections", "gauge"),
    ("workbroker_db_oldest_transaction_age_seconds", "gauge"),
    ("workbroker_db_xmin_horizon_age", "gauge"),
    ("workbroker_build_info", "gauge"),
];

#[tokio::test]
async fn metrics_count_enqueues_leases_acks_nacks_and_dead_letters_by_queue() -> Result<()> {
    let broker = TestBroker::start_with_admin().await?;
    let before = scrape(&broker).await?;
    for (name, kind) in REQUIRED_METRICS {
        assert_eq!(before.types.get(name).map(String::as_str), Some(kind), "{name} missing or not a {kind}");
    }
    assert_eq!(before.value("workbroker_leader", &[]), Some(1.0), "a single node leads itself");
    assert_eq!(before.value("workbroker_owned_shards", &[]), Some(64.0), "a single node owns every shard");
    assert_eq!(before.value_or_zero("workbroker_jobs_enqueued_total", &[("queue", "metered")]), 0.0);

    let mut client = broker.broker().await;
    enqueue(&mut client, (0..3).map(|_| new_job("metered", "k")).collect()).await?;
    enqueue(&mut client, vec![new_job("other", "k")]).await?;
    let mut deduplicated = new_job("metered", "k");
    deduplicated.dedup_key = "once".to_owned();
    enqueue(&mut client, vec![deduplicated.clone()]).await?;
    enqueue(&mut client, vec![deduplicated]).await?;

    let mut worker = Worker::on(&mut client, &["metered"], 4).await?;
    let leased = worker.take_jobs(4, WAIT).await?;
    let during = scrape(&broker).await?;
    assert_eq!(during.value("workbroker_leases_in_flight", &[]), Some(4.0));
    assert_eq!(during.value("workbroker_lease_streams", &[]), Some(1.0));

    ack_all(&mut client, leased[..2].iter().map(ack_of).collect()).await?;
    let mut permanent = nack_of(&leased[2], "cannot parse");
    permanent.permanent = true;
    let mut retried = nack_of(&leased[3], "try again");
    retried.retry_after = Some(seconds(3600.0));
    nack_all(&mut client, vec![permanent, retried]).await?;
    // Stale acks move nothing: a token that was never current, and the
    // token of the job that went DEAD.
    let mut never_current = ack_of(&leased[1]);
    never_current.lease_token = uuid::Uuid::new_v4().to_string();
    let outcomes = ack_all(&mut client, vec![never_current, ack_of(&leased[2])]).await?;
    assert!(outcomes.iter().all(|outcome| outcome.outcome == v1::Outcome::StaleLease as i32), "{outcomes:?}");

    let queue = [("queue", "metered")];
    let after = scrape_until(&broker, Duration::from_secs(15), |scrape| {
        scrape.value("workbroker_jobs", &[("queue", "metered"), ("state", "dead")]) == Some(1.0)
    })
    .await?;
    assert_eq!(after.value("workbroker_jobs_enqueued_total", &queue), Some(4.0), "deduplicated enqueue counted");
    assert_eq!(after.value("workbroker_jobs_enqueued_total", &[("queue", "other")]), Some(1.0));
    assert_eq!(after.value("workbroker_jobs_leased_total", &queue), Some(4.0));
    assert_eq!(after.value("workbroker_jobs_acked_total", &queue), Some(2.0));
    assert_eq!(after.value("workbroker_jobs_nacked_total", &queue), Some(2.0));
    assert_eq!(after.value("workbroker_jobs_dead_total", &queue), Some(1.0));
    assert_eq!(after.value_or_zero("workbroker_jobs_expired_total", &queue), 0.0);
    assert_eq!(after.value("workbroker_job_lease_latency_seconds_count", &queue), Some(4.0));
    assert_eq!(
        after.value("workbroker_job_lease_latency_seconds_bucket", &[("queue", "metered"), ("le", "+Inf")]),
        Some(4.0)
    );
    assert!(after.value("workbroker_job_lease_latency_seconds_sum", &queue).is_some_and(|sum| sum < 40.0));
    assert_eq!(after.value("workbroker_leases_in_flight", &[]), Some(0.0), "every slot is free again");

    // Database gauges (refreshed in the background).
    assert_eq!(after.value("workbroker_jobs", &[("queue", "metered"), ("state", "completed")]), Some(2.0));
    assert_eq!(after.value("workbroker_jobs", &[("queue", "metered"), ("state", "scheduled")]), Some(1.0));
    assert_eq!(after.value("workbroker_jobs", &[("queue", "other"), ("state", "available")]), Some(1.0));
    assert!(after.value("workbroker_queue_oldest_available_age_seconds", &[("queue", "other")]).is_some());
    let in_use = after.value("workbroker_db_pool_connections", &[("state", "in_use")]).context("pool in use")?;
    let idle = after.value("workbroker_db_pool_connections", &[("state", "idle")]).context("pool idle")?;
    let max = after.value("workbroker_db_pool_max_connections", &[]).context("pool max")?;
    assert!(in_use + idle >= 1.0 && in_use + idle <= max, "pool {in_use} + {idle} of {max}");
    drop(worker);
    broker.finish().await
}

#[tokio::test]
async fn expiries_and_releases_are_counted_and_the_watchdog_sees_a_long_transaction() -> Result<()> {
    let broker = TestBroker::start_with_admin().await?;
    let mut client = broker.broker().await;
    enqueue(&mut client, (0..3).map(|_| new_job("expiring", "k")).collect()).await?;
    let mut slow = Worker::open(
        &mut client,
        v1::OpenLease {
            worker_id: "slow".to_owned(),
            queues: vec!["expiring".to_owned()],
            max_in_flight: 1,
            lease_duration: Some(seconds(1.0)),
            ..Default::default()
        },
    )
    .await?;
    slow.take_jobs(1, WAIT).await?;
    // The lease expires; the reaper (100 ms ticks in tests) returns it.
    // Meanwhile a second stream takes two jobs and goes away: released.
    let mut leaving = Worker::on(&mut client, &["expiring"], 2).await?;
    leaving.take_jobs(2, WAIT).await?;
    leaving.close();

    // A transaction left open on another connection holds the xmin horizon.
    let pool = broker.database.pool().await?;
    let mut holder = pool.begin().await?;
    sqlx::query("SELECT txid_current()").execute(&mut *holder).await?;

    let queue = [("queue", "expiring")];
    let after = scrape_until(&broker, Duration::from_secs(20), |scrape| {
        scrape.value_or_zero("workbroker_jobs_expired_total", &queue) >= 1.0
            && scrape.value_or_zero("workbroker_jobs_released_total", &queue) >= 2.0
            && scrape.value_or_zero("workbroker_db_oldest_transaction_age_seconds", &[]) >= 1.0
    })
    .await?;
    assert!(after.value_or_zero("workbroker_db_xmin_horizon_age", &[]) >= 1.0, "the open transaction holds an xmin");
    assert_eq!(after.value_or_zero("workbroker_jobs_dead_total", &queue), 0.0);
    holder.rollback().await?;
    pool.close().await;
    drop(slow);
    broker.finish().await
}

#[tokio::test]
async fn health_and_readiness_answer_and_readiness_notices_missing_migrations() -> Result<()> {
    let broker = TestBroker::start_with_admin().await?;
    let health = broker.admin_get("/healthz").await?;
    assert_eq!((health.status, health.body.as_str()), (200, "ok\n"));
    let ready = broker.admin_get("/readyz").await?;
    assert_eq!((ready.status, ready.body.as_str()), (200, "ready\n"));
    assert_eq!(broker.admin_get("/nothing-here").await?.status, 404);

    // Pretend the newest migration was never applied.
    let pool = broker.database.pool().await?;
    sqlx::query("DELETE FROM _sqlx_migrations WHERE version = (SELECT max(version) FROM _sqlx_migrations)")
        .execute(&pool)
        .await?;
    pool.close().await;
    let not_ready = broker.admin_get("/readyz").await?;
    assert_eq!(not_ready.status, 503);
    assert!(not_ready.body.contains("migrations are not current"), "{}", not_ready.body);
    assert_eq!(broker.admin_get("/healthz").await?.status, 200, "liveness does not depend on the database");
    broker.finish().await
}

/// What the in-test OTLP collector received.
#[derive(Clone, Default)]
struct Collector {
    spans: Arc<Mutex<Vec<(String, Span)>>>,
    metrics: Arc<Mutex<Vec<MetricPoint>>>,
}

/// One received data point: metric name, value, attributes.
type MetricPoint = (String, f64, Vec<KeyValue>);

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut spans = self.spans.lock().expect("collector lock");
        for resource_spans in request.into_inner().resource_spans {
            let service = resource_spans
                .resource
                .as_ref()
                .and_then(|resource| attribute(&resource.attributes, "service.name"))
                .unwrap_or_default();
            for scope in resource_spans.scope_spans {
                spans.extend(scope.spans.into_iter().map(|span| (service.clone(), span)));
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse { partial_success: None }))
    }
}

#[tonic::async_trait]
impl MetricsService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportMetricsServiceRequest>,
    ) -> Result<tonic::Response<ExportMetricsServiceResponse>, tonic::Status> {
        let mut metrics = self.metrics.lock().expect("collector lock");
        for resource in request.into_inner().resource_metrics {
            for scope in resource.scope_metrics {
                for metric in scope.metrics {
                    let points = match metric.data {
                        Some(MetricData::Sum(sum)) => sum.data_points,
                        Some(MetricData::Gauge(gauge)) => gauge.data_points,
                        _ => Vec::new(),
                    };
                    for point in points {
                        let value = match point.value {
                            Some(NumberValue::AsInt(value)) => value as f64,
                            Some(NumberValue::AsDouble(value)) => value,
                            None => continue,
                        };
                        metrics.push((metric.name.clone(), value, point.attributes));
                    }
                }
            }
        }
        Ok(tonic::Response::new(ExportMetricsServiceResponse { partial_success: None }))
    }
}

impl Collector {
    /// Serves OTLP/gRPC on a free loopback port until `stop`.
    async fn start(stop: CancellationToken) -> Result<(Self, SocketAddr)> {
        let collector = Self::default();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let address = listener.local_addr()?;
        let server = tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(collector.clone()))
            .add_service(MetricsServiceServer::new(collector.clone()))
            .serve_with_incoming_shutdown(
                tonic::transport::server::TcpIncoming::from(listener),
                stop.cancelled_owned(),
            );
        tokio::spawn(server);
        Ok((collector, address))
    }

    /// Spans about `job_id` (by `messaging.message.id`).
    fn job_spans(&self, job_id: &str) -> Vec<(String, Span)> {
        let spans = self.spans.lock().expect("collector lock");
        spans
            .iter()
            .filter(|(_, span)| attribute(&span.attributes, "messaging.message.id").as_deref() == Some(job_id))
            .cloned()
            .collect()
    }
}

fn attribute(attributes: &[KeyValue], key: &str) -> Option<String> {
    attributes.iter().find(|attribute| attribute.key == key).and_then(|attribute| {
        match attribute.value.as_ref()?.value.as_ref()? {
            AnyValue::StringValue(value) => Some(value.clone()),
            AnyValue::IntValue(value) => Some(value.to_string()),
            AnyValue::BoolValue(value) => Some(value.to_string()),
            AnyValue::DoubleValue(value) => Some(value.to_string()),
            _ => None,
        }
    })
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|byte| format!("{byte:02x}")).collect()
}

#[tokio::test]
async fn otlp_receives_every_broker_span_of_a_job_in_the_producers_trace() -> Result<()> {
    let stop = CancellationToken::new();
    let (collector, collector_address) = Collector::start(stop.clone()).await?;
    let database = TestDatabase::create().await?;
    let endpoint = format!("http://{collector_address}");
    let mut process = BrokerProcess::start_with_env(
        &database.url,
        "",
        "/workbroker-telemetry-test",
        10,
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()),
            ("OTEL_SERVICE_NAME", "workbroker-under-test"),
            ("OTEL_BSP_SCHEDULE_DELAY", "100"),
            ("OTEL_METRIC_EXPORT_INTERVAL", "500"),
        ],
    )
    .await?;

    // The producer's span, as a W3C traceparent in the job's attributes
    // (and on the Enqueue call itself).
    let trace_id = uuid::Uuid::new_v4().simple().to_string();
    let producer_span_id = uuid::Uuid::new_v4().simple().to_string()[..16].to_owned();
    let traceparent = format!("00-{trace_id}-{producer_span_id}-01");
    let mut client = process.broker().await?;
    let mut job = new_job("traced", "k");
    job.attributes.insert("traceparent".to_owned(), traceparent.clone());
    let mut request = tonic::Request::new(v1::EnqueueRequest { jobs: vec![job] });
    request.metadata_mut().insert("traceparent", traceparent.parse()?);
    let job_id = client.enqueue(request).await?.into_inner().jobs.first().context("one job")?.job_id.clone();
    // A job without trace context, enqueued alongside, must not join the trace.
    let untraced = enqueue(&mut client, vec![new_job("traced", "k")]).await?;

    let mut worker = Worker::on(&mut client, &["traced"], 2).await?;
    let leased = worker.take_jobs(2, WAIT).await?;
    ack_all(&mut client, leased.iter().map(ack_of).collect()).await?;

    let expected = ["workbroker create traced", "workbroker lease traced", "workbroker ack traced"];
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let spans = loop {
        let spans = collector.job_spans(&job_id);
        if expected.iter().all(|name| spans.iter().any(|(_, span)| span.name == *name)) {
            break spans;
        }
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "the collector got only {:?}",
            spans.iter().map(|(_, span)| span.name.clone()).collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    for (service, span) in &spans {
        assert_eq!(service, "workbroker-under-test");
        assert_eq!(hex(&span.trace_id), trace_id, "{} is outside the producer's trace", span.name);
        assert_eq!(hex(&span.parent_span_id), producer_span_id, "{} is not a child of the producer", span.name);
        assert_eq!(attribute(&span.attributes, "messaging.system").as_deref(), Some("workbroker"));
        assert_eq!(attribute(&span.attributes, "messaging.destination.name").as_deref(), Some("traced"));
    }
    let operation_type = |name: &str| {
        spans
            .iter()
            .find(|(_, span)| span.name == name)
            .and_then(|(_, span)| attribute(&span.attributes, "messaging.operation.type"))
    };
    assert_eq!(operation_type("workbroker create traced").as_deref(), Some("create"));
    assert_eq!(operation_type("workbroker lease traced").as_deref(), Some("receive"));
    assert_eq!(operation_type("workbroker ack traced").as_deref(), Some("settle"));

    // The Enqueue RPC span follows the messaging conventions and the caller's header.
    {
        let all = collector.spans.lock().expect("collector lock");
        let publish = all
            .iter()
            .map(|(_, span)| span)
            .find(|span| span.name == "workbroker publish traced" && hex(&span.trace_id) == trace_id)
            .with_context(|| {
                let seen: Vec<(String, String)> =
                    all.iter().map(|(_, span)| (span.name.clone(), hex(&span.trace_id))).collect();
                format!("no `workbroker publish traced` RPC span in the producer's trace; got {seen:?}")
            })?;
        assert_eq!(attribute(&publish.attributes, "messaging.operation.type").as_deref(), Some("send"));
        assert_eq!(attribute(&publish.attributes, "rpc.method").as_deref(), Some("Enqueue"));
        let untraced_spans: Vec<&Span> = all
            .iter()
            .map(|(_, span)| span)
            .filter(|span| attribute(&span.attributes, "messaging.message.id").as_deref() == Some(untraced[0].as_str()))
            .collect();
        assert!(untraced_spans.iter().all(|span| hex(&span.trace_id) != trace_id), "an untraced job joined the trace");
    }

    // Metrics go over OTLP too.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let enqueued = collector
            .metrics
            .lock()
            .expect("collector lock")
            .iter()
            .filter(|(name, _, attributes)| {
                name == "workbroker.jobs.enqueued"
                    && attribute(attributes, "messaging.destination.name").as_deref() == Some("traced")
            })
            .map(|(_, value, _)| *value)
            .fold(0.0, f64::max);
        if enqueued >= 2.0 {
            break;
        }
        anyhow::ensure!(tokio::time::Instant::now() < deadline, "no workbroker.jobs.enqueued metric arrived");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // The Lease stream's span ends with the stream; a graceful stop flushes it.
    drop(worker);
    process.terminate()?;
    let receive = collector
        .spans
        .lock()
        .expect("collector lock")
        .iter()
        .any(|(_, span)| span.name == "workbroker receive traced");
    assert!(receive, "the Lease stream's `workbroker receive traced` span was not flushed at shutdown");
    stop.cancel();
    database.drop_database().await
}
