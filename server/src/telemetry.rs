//! Logging, traces and metrics: the global `tracing` subscriber, the
//! OpenTelemetry (OTLP over gRPC) exporters, and the spans the broker makes
//! for RPCs and for each step of a job's life.
//!
//! OTLP is off unless an endpoint is configured with the standard variables:
//! `OTEL_EXPORTER_OTLP_ENDPOINT` (traces and metrics),
//! `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` or `OTEL_EXPORTER_OTLP_METRICS_ENDPOINT`.
//! The exporters honour the other standard variables (`OTEL_SERVICE_NAME`,
//! default `workbroker`; `OTEL_RESOURCE_ATTRIBUTES`; `OTEL_EXPORTER_OTLP_HEADERS`,
//! `..._TIMEOUT`, `..._COMPRESSION`; `OTEL_TRACES_SAMPLER` and `..._ARG`;
//! `OTEL_BSP_*`; `OTEL_METRIC_EXPORT_INTERVAL`), and `OTEL_SDK_DISABLED=true`,
//! `OTEL_TRACES_EXPORTER=none` or `OTEL_METRICS_EXPORTER=none` turn parts off.
//!
//! # Spans
//!
//! Span names and attributes follow the OpenTelemetry messaging semantic
//! conventions (`messaging.system = "workbroker"`, `messaging.operation.type`,
//! `messaging.operation.name`, `messaging.destination.name` = the queue,
//! `messaging.message.id` = the job id):
//!
//! - one span per RPC ([`rpc_span`]): `workbroker publish <queue>` (Enqueue),
//!   `workbroker receive <queue>` (a Lease stream), `workbroker settle` (Ack, Nack),
//!   `<service>/<method>` for the rest. A `traceparent` request header makes
//!   it a child of the caller's span.
//! - one span per job and lifecycle step ([`record_job_steps`]):
//!   `workbroker create <queue>` (enqueued), `workbroker lease <queue>`,
//!   `workbroker ack|nack|expire|release <queue>`. Each is a child of the
//!   producer's span named by the job's `traceparent` attribute (so the
//!   producer's trace holds every broker step and the worker's handler span)
//!   and links to the RPC span it happened in.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::{TraceContextExt, TracerProvider as _};
use opentelemetry_otlp::WithExportConfig as _;
use opentelemetry_sdk::metrics::SdkMeterProvider;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing::field::Empty;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

use crate::admin::recent_errors::{RecentErrors, RecentErrorsLayer};

/// Service name when `OTEL_SERVICE_NAME` does not say.
pub const DEFAULT_SERVICE_NAME: &str = "workbroker";
/// Longest shutdown waits for the exporters to flush.
pub const FLUSH_TIMEOUT: Duration = Duration::from_secs(5);
/// The attribute (and header) carrying W3C trace context.
pub const TRACEPARENT: &str = "traceparent";

/// Set once traces are exported: the per-job spans are only made then.
static TRACES_ENABLED: AtomicBool = AtomicBool::new(false);

/// Why telemetry could not start.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("OTLP exporter: {0}")]
    Exporter(#[from] opentelemetry_otlp::ExporterBuildError),
    #[error("a global tracing subscriber is already installed: {0}")]
    Subscriber(#[from] tracing_subscriber::util::TryInitError),
}

/// What to turn on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TelemetryConfig {
    /// Export spans over OTLP.
    pub traces: bool,
    /// Export metrics over OTLP.
    pub metrics: bool,
    /// Overrides the OTLP endpoint of both (tests); `None`: the `OTEL_*` variables.
    pub endpoint: Option<String>,
}

fn variable(name: &str) -> Option<String> {
    std::env::var(name).ok().map(|value| value.trim().to_owned()).filter(|value| !value.is_empty())
}

impl TelemetryConfig {
    /// Reads the standard `OTEL_*` variables.
    pub fn from_env() -> Self {
        if variable("OTEL_SDK_DISABLED").is_some_and(|value| value.eq_ignore_ascii_case("true")) {
            return Self { traces: false, metrics: false, endpoint: None };
        }
        let common = variable("OTEL_EXPORTER_OTLP_ENDPOINT").is_some();
        let exporter_on = |name: &str| variable(name).is_none_or(|value| !value.eq_ignore_ascii_case("none"));
        Self {
            traces: (common || variable("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT").is_some())
                && exporter_on("OTEL_TRACES_EXPORTER"),
            metrics: (common || variable("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT").is_some())
                && exporter_on("OTEL_METRICS_EXPORTER"),
            endpoint: None,
        }
    }
}

/// Keeps the exporters alive; [`TelemetryGuard::shutdown`] flushes them.
#[derive(Debug, Default)]
pub struct TelemetryGuard {
    tracer_provider: Option<SdkTracerProvider>,
    meter_provider: Option<SdkMeterProvider>,
}

impl TelemetryGuard {
    /// True when spans are exported.
    pub fn exports_traces(&self) -> bool {
        self.tracer_provider.is_some()
    }

    /// Flushes and stops the exporters, waiting at most [`FLUSH_TIMEOUT`].
    pub async fn shutdown(mut self) {
        let tracer_provider = self.tracer_provider.take();
        let meter_provider = self.meter_provider.take();
        if tracer_provider.is_none() && meter_provider.is_none() {
            return;
        }
        TRACES_ENABLED.store(false, Ordering::Relaxed);
        // The SDK's shutdown blocks while the exporters (which run on this
        // runtime) send; keep it off the runtime's worker threads.
        let flush = tokio::task::spawn_blocking(move || {
            if let Some(provider) = tracer_provider
                && let Err(error) = provider.shutdown_with_timeout(FLUSH_TIMEOUT)
            {
                eprintln!("warning: flushing traces failed: {error}");
            }
            if let Some(provider) = meter_provider
                && let Err(error) = provider.shutdown_with_timeout(FLUSH_TIMEOUT)
            {
                eprintln!("warning: flushing metrics failed: {error}");
            }
        });
        if tokio::time::timeout(FLUSH_TIMEOUT * 2, flush).await.is_err() {
            eprintln!("warning: telemetry did not flush within {:?}", FLUSH_TIMEOUT * 2);
        }
    }
}

fn resource() -> opentelemetry_sdk::Resource {
    let builder = opentelemetry_sdk::Resource::builder();
    let named_in_env = variable("OTEL_SERVICE_NAME").is_some()
        || variable("OTEL_RESOURCE_ATTRIBUTES").is_some_and(|attributes| attributes.contains("service.name="));
    let builder = if named_in_env { builder } else { builder.with_service_name(DEFAULT_SERVICE_NAME) };
    builder.with_attribute(opentelemetry::KeyValue::new("service.version", env!("CARGO_PKG_VERSION"))).build()
}

/// Builds the OTLP providers `config` asks for. Must run inside a Tokio
/// runtime (the gRPC exporters live on it).
pub fn providers(config: &TelemetryConfig) -> Result<TelemetryGuard, Error> {
    let mut guard = TelemetryGuard::default();
    if config.traces {
        let mut exporter = opentelemetry_otlp::SpanExporter::builder().with_tonic();
        if let Some(endpoint) = &config.endpoint {
            exporter = exporter.with_endpoint(endpoint.clone());
        }
        let provider =
            SdkTracerProvider::builder().with_batch_exporter(exporter.build()?).with_resource(resource()).build();
        guard.tracer_provider = Some(provider);
    }
    if config.metrics {
        let mut exporter = opentelemetry_otlp::MetricExporter::builder().with_tonic();
        if let Some(endpoint) = &config.endpoint {
            exporter = exporter.with_endpoint(endpoint.clone());
        }
        let provider =
            SdkMeterProvider::builder().with_periodic_exporter(exporter.build()?).with_resource(resource()).build();
        guard.meter_provider = Some(provider);
    }
    Ok(guard)
}

/// Installs the global subscriber: human-readable logs filtered by
/// `log_filter`, the status page's recent-errors buffer (WARN and above),
/// and — when OTLP is configured in the environment — the OpenTelemetry
/// layer and meter provider. Call once, inside the Tokio runtime; keep the
/// guard and call its `shutdown` last.
pub fn init(log_filter: EnvFilter) -> Result<TelemetryGuard, Error> {
    init_with(log_filter, &TelemetryConfig::from_env())
}

/// [`init`] with an explicit configuration.
pub fn init_with(log_filter: EnvFilter, config: &TelemetryConfig) -> Result<TelemetryGuard, Error> {
    let guard = providers(config)?;
    let otel_layer = guard.tracer_provider.as_ref().map(|provider| {
        tracing_opentelemetry::layer()
            .with_tracer(provider.tracer("workbroker"))
            // Per-tick spans of the background loops would be one span a second of noise.
            .with_filter(EnvFilter::new("workbroker_server=info,workbroker_server::reaper=warn"))
    });
    tracing_subscriber::registry()
        .with(tracing_subscriber::fmt::layer().with_target(false).with_filter(log_filter))
        .with(RecentErrorsLayer::new(RecentErrors::global()).with_filter(tracing::level_filters::LevelFilter::WARN))
        .with(otel_layer)
        .try_init()?;
    if let Some(provider) = &guard.tracer_provider {
        opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
        opentelemetry::global::set_tracer_provider(provider.clone());
        TRACES_ENABLED.store(true, Ordering::Relaxed);
    }
    if let Some(provider) = &guard.meter_provider {
        opentelemetry::global::set_meter_provider(provider.clone());
    }
    Ok(guard)
}

/// True while spans are exported (so the per-job spans are worth making).
pub fn traces_enabled() -> bool {
    TRACES_ENABLED.load(Ordering::Relaxed)
}

/// The OpenTelemetry context a W3C `traceparent` value names, if valid.
pub fn context_from_traceparent(traceparent: &str) -> Option<opentelemetry::Context> {
    let carrier: HashMap<String, String> = HashMap::from([(TRACEPARENT.to_owned(), traceparent.to_owned())]);
    let context = TraceContextPropagator::new().extract(&carrier);
    context.span().span_context().is_valid().then_some(context)
}

/// What a messaging RPC does, per the semantic conventions.
fn rpc_operation(service: &str, method: &str) -> Option<(&'static str, &'static str)> {
    if service != "workbroker.v1.Broker" {
        return None;
    }
    match method {
        "Enqueue" => Some(("send", "publish")),
        "Lease" => Some(("receive", "receive")),
        "Ack" | "Nack" => Some(("settle", "settle")),
        _ => None,
    }
}

/// The span of one gRPC request (tonic's `trace_fn`). Messaging RPCs carry
/// the messaging attributes; the Enqueue handler records the queue and the
/// final name (`workbroker publish <queue>`) once it has read the request.
pub fn rpc_span(request: &http::Request<()>) -> tracing::Span {
    let path = request.uri().path().trim_start_matches('/');
    let (service, method) = path.split_once('/').unwrap_or((path, ""));
    let operation = rpc_operation(service, method);
    let name = match operation {
        Some((_, operation_name)) => format!("workbroker {operation_name}"),
        None => path.to_owned(),
    };
    let span = tracing::info_span!(
        "grpc",
        otel.name = %name,
        otel.kind = "server",
        rpc.system = "grpc",
        rpc.service = %service,
        rpc.method = %method,
        messaging.system = Empty,
        messaging.operation.type = Empty,
        messaging.operation.name = Empty,
        messaging.destination.name = Empty,
        messaging.batch.message_count = Empty,
    );
    if let Some((operation_type, operation_name)) = operation {
        span.record("messaging.system", "workbroker");
        span.record("messaging.operation.type", operation_type);
        span.record("messaging.operation.name", operation_name);
    }
    if traces_enabled()
        && let Some(traceparent) = request.headers().get(TRACEPARENT).and_then(|value| value.to_str().ok())
        && let Some(parent) = context_from_traceparent(traceparent)
    {
        let _ = span.set_parent(parent);
    }
    span
}

/// Records the queue(s) of an Enqueue on its RPC span.
pub fn record_publish(span: &tracing::Span, queues: &[&str], message_count: usize) {
    span.record("messaging.batch.message_count", message_count);
    record_destination(span, "publish", queues);
}

/// Records the queue(s) a Lease stream reads on its RPC span.
pub fn record_receive(span: &tracing::Span, queues: &[&str]) {
    record_destination(span, "receive", queues);
}

/// A single destination names the span `workbroker <operation> <queue>`.
fn record_destination(span: &tracing::Span, operation_name: &str, queues: &[&str]) {
    if let [queue] = queues {
        span.record("messaging.destination.name", *queue);
        let name = format!("workbroker {operation_name} {queue}");
        if traces_enabled() {
            // The OpenTelemetry span has started by now: rename it directly.
            span.context().span().update_name(name.clone());
        }
        span.record("otel.name", name);
    }
}

/// A step of a job's life.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum JobStep {
    /// Inserted by Enqueue.
    Create,
    /// Handed to a worker.
    Lease,
    /// Acked.
    Ack,
    /// Nacked (retried or dead).
    Nack,
    /// Its lease expired and the reaper returned it.
    Expire,
    /// Its lease stream ended and the lease was handed back.
    Release,
}

impl JobStep {
    /// `messaging.operation.name`.
    pub fn operation_name(self) -> &'static str {
        match self {
            JobStep::Create => "create",
            JobStep::Lease => "lease",
            JobStep::Ack => "ack",
            JobStep::Nack => "nack",
            JobStep::Expire => "expire",
            JobStep::Release => "release",
        }
    }

    /// `messaging.operation.type`.
    pub fn operation_type(self) -> &'static str {
        match self {
            JobStep::Create => "create",
            JobStep::Lease => "receive",
            JobStep::Ack | JobStep::Nack | JobStep::Expire | JobStep::Release => "settle",
        }
    }
}

/// One job for [`record_job_steps`].
#[derive(Clone, Copy, Debug)]
pub struct JobRef<'a> {
    pub job_id: i64,
    pub queue: &'a str,
    /// The job's `traceparent` attribute.
    pub traceparent: Option<&'a str>,
}

/// Records one span per job for `step`, each a child of the producer's span
/// named by the job's `traceparent` (else of the current span) and linked
/// to the current (RPC) span. Does nothing unless traces are exported.
pub fn record_job_steps<'a>(step: JobStep, jobs: impl IntoIterator<Item = JobRef<'a>>) {
    if !traces_enabled() {
        return;
    }
    let current = tracing::Span::current().context().span().span_context().clone();
    for job in jobs {
        let span = tracing::info_span!(
            "job",
            otel.name = %format!("workbroker {} {}", step.operation_name(), job.queue),
            otel.kind = if step == JobStep::Create { "producer" } else { "internal" },
            messaging.system = "workbroker",
            messaging.operation.type = step.operation_type(),
            messaging.operation.name = step.operation_name(),
            messaging.destination.name = job.queue,
            messaging.message.id = %job.job_id,
        );
        if let Some(parent) = job.traceparent.and_then(context_from_traceparent) {
            let _ = span.set_parent(parent);
        }
        if current.is_valid() {
            span.add_link(current.clone());
        }
        drop(span);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_valid_traceparent_and_rejects_garbage() {
        let context = context_from_traceparent("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
            .expect("a valid traceparent");
        assert_eq!(context.span().span_context().trace_id().to_string(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert!(context_from_traceparent("not a traceparent").is_none());
        assert!(context_from_traceparent("00-00000000000000000000000000000000-00f067aa0ba902b7-01").is_none());
    }

    #[test]
    fn messaging_rpcs_are_named_by_operation() {
        assert_eq!(rpc_operation("workbroker.v1.Broker", "Enqueue"), Some(("send", "publish")));
        assert_eq!(rpc_operation("workbroker.v1.Broker", "Nack"), Some(("settle", "settle")));
        assert_eq!(rpc_operation("workbroker.v1.Admin", "GetQueueStats"), None);
    }
}
