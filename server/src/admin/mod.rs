//! The admin HTTP listener (`--admin-listen`): health, readiness, Prometheus
//! metrics and the status page, served with hyper's HTTP/1.1 server.
//!
//! | path       | what                                                        |
//! |------------|-------------------------------------------------------------|
//! | `/healthz` | `200 ok` while the process runs ([`health`])                 |
//! | `/readyz`  | `200 ready` when the database answers and migrations are current, else `503` and why |
//! | `/metrics` | Prometheus text format ([`metrics`])                         |
//! | `/`        | the HTML status page ([`status_page`])                       |
//!
//! The listener stops last among the request handlers: during a drain,
//! `/readyz` answers `503 shutting down` while `/metrics` and the status page
//! keep answering, so the drain can be watched.

pub mod health;
pub mod metrics;
pub mod recent_errors;
pub mod status_page;

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use metrics::Metrics;
pub use recent_errors::RecentErrors;

use crate::service::Shared;

/// How long a client may take to send its request head.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// How long shutdown waits for requests in progress.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(3);
/// Content type of the Prometheus text format.
const METRICS_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

struct AdminState {
    shared: Arc<Shared>,
    recent_errors: Arc<RecentErrors>,
    draining: CancellationToken,
}

/// The admin HTTP listener.
pub struct AdminListener {
    listener: TcpListener,
    state: Arc<AdminState>,
}

impl AdminListener {
    /// Serves on `listener`. `draining` fires when the broker starts shutting
    /// down (readiness turns `503`); the listener itself runs until `run`'s
    /// shutdown token fires.
    pub fn new(
        listener: TcpListener,
        shared: Arc<Shared>,
        recent_errors: Arc<RecentErrors>,
        draining: CancellationToken,
    ) -> Self {
        Self { listener, state: Arc::new(AdminState { shared, recent_errors, draining }) }
    }

    /// The bound address.
    pub fn local_addr(&self) -> std::io::Result<std::net::SocketAddr> {
        self.listener.local_addr()
    }

    /// Accepts connections until `shutdown`, then lets requests in progress
    /// finish (up to a few seconds).
    pub async fn run(self, shutdown: CancellationToken) {
        let connections = TaskTracker::new();
        loop {
            let accepted = tokio::select! {
                accepted = self.listener.accept() => accepted,
                () = shutdown.cancelled() => break,
            };
            let (stream, _peer) = match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    // Out of file descriptors and the like: back off, keep serving.
                    tracing::warn!(%error, "admin listener cannot accept");
                    tokio::select! {
                        () = tokio::time::sleep(Duration::from_millis(100)) => continue,
                        () = shutdown.cancelled() => break,
                    }
                }
            };
            let state = self.state.clone();
            let shutdown = shutdown.clone();
            connections.spawn(async move {
                let service = service_fn(move |request| {
                    let state = state.clone();
                    async move { Ok::<_, Infallible>(route(&state, request).await) }
                });
                let connection = http1::Builder::new()
                    .timer(TokioTimer::new())
                    .header_read_timeout(HEADER_READ_TIMEOUT)
                    .serve_connection(TokioIo::new(stream), service);
                tokio::pin!(connection);
                tokio::select! {
                    result = connection.as_mut() => {
                        if let Err(error) = result {
                            tracing::debug!(%error, "admin connection ended with an error");
                        }
                    }
                    () = shutdown.cancelled() => {
                        connection.as_mut().graceful_shutdown();
                        let _ = tokio::time::timeout(SHUTDOWN_GRACE, connection).await;
                    }
                }
            });
        }
        connections.close();
        if tokio::time::timeout(SHUTDOWN_GRACE, connections.wait()).await.is_err() {
            tracing::debug!("admin connections still open at shutdown; dropping them");
        }
    }
}

fn response(status: StatusCode, content_type: &str, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(body.into()));
    *response.status_mut() = status;
    if let Ok(value) = header::HeaderValue::from_str(content_type) {
        response.headers_mut().insert(header::CONTENT_TYPE, value);
    }
    response.headers_mut().insert(header::CACHE_CONTROL, header::HeaderValue::from_static("no-store"));
    response
}

fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    response(status, "text/plain; charset=utf-8", body)
}

async fn route(state: &AdminState, request: Request<Incoming>) -> Response<Full<Bytes>> {
    if request.method() != Method::GET && request.method() != Method::HEAD {
        let mut answer = text(StatusCode::METHOD_NOT_ALLOWED, "only GET and HEAD\n");
        answer.headers_mut().insert(header::ALLOW, header::HeaderValue::from_static("GET, HEAD"));
        return answer;
    }
    match request.uri().path() {
        "/healthz" => text(StatusCode::OK, "ok\n"),
        "/readyz" => match health::readiness(&state.shared.store, state.draining.is_cancelled()).await {
            health::Readiness::Ready => text(StatusCode::OK, "ready\n"),
            health::Readiness::NotReady(reason) => text(StatusCode::SERVICE_UNAVAILABLE, format!("{reason}\n")),
        },
        "/metrics" => response(StatusCode::OK, METRICS_CONTENT_TYPE, metrics::render(&state.shared)),
        "/" | "/status" => {
            let data = status_page::gather(&state.shared, state.recent_errors.snapshot()).await;
            response(StatusCode::OK, "text/html; charset=utf-8", status_page::render(&state.shared, &data))
        }
        _ => text(StatusCode::NOT_FOUND, "not found; try /, /metrics, /healthz or /readyz\n"),
    }
}
