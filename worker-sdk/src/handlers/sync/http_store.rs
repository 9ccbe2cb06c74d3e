//! A blob store over HTTP, and the reference server for it.
//!
//! Protocol (all paths under a base URL):
//!
//! | request | answer |
//! |---|---|
//! | `HEAD /blobs/<algorithm>/<digest>` | 200 with `Content-Length`, or 404 |
//! | `GET /blobs/<algorithm>/<digest>` | 200 with the content, or 404 |
//! | `PUT /blobs/<algorithm>/<digest>` with `Content-Length` | 201 once stored, 200 if it was already there, 400 if size or digest do not match (nothing stored) |
//! | `GET /blobs` | `text/plain`, one `<algorithm>:<digest> <size>` per line |
//!
//! A server must verify size and digest before a blob becomes visible
//! (commit on verify): [`BlobServer`] does, by writing through a
//! [`LocalDirStore`]. The client streams uploads and also checks the
//! content as it sends it: on a mismatch the request body ends with an
//! error, so the server never sees a complete upload.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::blob::{Algorithm, Blob, ByteStream};
use super::local::LocalDirStore;
use super::{BlobList, BlobStore, PutOutcome, StoreError};
use crate::http::{Body, BoxError, HttpClient, empty_body, normalize_base};

/// Longest listing read from a server.
const MAX_LISTING_BYTES: usize = 256 * 1024 * 1024;

/// The client side of the protocol.
#[derive(Clone, Debug)]
pub struct HttpBlobStore {
    base: String,
    client: HttpClient,
    timeout: Duration,
}

impl HttpBlobStore {
    /// A store under an `http://` base URL.
    pub fn new(base: &str) -> Result<Self, StoreError> {
        Ok(Self {
            base: normalize_base(base).map_err(|error| StoreError::Invalid(error.to_string()))?,
            client: HttpClient::default(),
            timeout: Duration::from_secs(30),
        })
    }

    /// Time allowed until a response head arrives (default 30 s).
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    fn url(&self, blob: &Blob) -> String {
        format!("{}/blobs/{}/{}", self.base, blob.algorithm.name(), blob.digest)
    }

    async fn send(
        &self,
        method: http::Method,
        url: &str,
        headers: &[(http::HeaderName, String)],
        body: Body,
    ) -> Result<http::Response<hyper::body::Incoming>, StoreError> {
        self.client
            .send(method, url, headers, body, self.timeout)
            .await
            .map_err(|error| StoreError::Http(error.to_string()))
    }
}

async fn error_text(response: http::Response<hyper::body::Incoming>) -> String {
    let status = response.status();
    let body = response
        .into_body()
        .collect()
        .await
        .map(|collected| String::from_utf8_lossy(&collected.to_bytes()).into_owned())
        .unwrap_or_default();
    format!("{status}: {}", body.trim())
}

#[async_trait::async_trait]
impl BlobStore for HttpBlobStore {
    async fn stat(&self, blob: &Blob) -> Result<Option<u64>, StoreError> {
        let url = self.url(blob);
        let response = self.send(http::Method::HEAD, &url, &[], empty_body()).await?;
        match response.status() {
            http::StatusCode::OK => {
                let length = response
                    .headers()
                    .get(http::header::CONTENT_LENGTH)
                    .and_then(|value| value.to_str().ok())
                    .and_then(|value| value.parse::<u64>().ok())
                    .ok_or_else(|| StoreError::Http(format!("{url}: HEAD without a Content-Length")))?;
                Ok(Some(length))
            }
            http::StatusCode::NOT_FOUND => Ok(None),
            _ => Err(StoreError::Http(format!("HEAD {url}: {}", error_text(response).await))),
        }
    }

    async fn open(&self, blob: &Blob) -> Result<ByteStream, StoreError> {
        let url = self.url(blob);
        let response = self.send(http::Method::GET, &url, &[], empty_body()).await?;
        match response.status() {
            http::StatusCode::OK => Ok(Box::pin(
                response
                    .into_body()
                    .into_data_stream()
                    .map_err(move |error| StoreError::Http(format!("reading {url}: {error}"))),
            )),
            http::StatusCode::NOT_FOUND => Err(StoreError::NotFound(blob.reference())),
            _ => Err(StoreError::Http(format!("GET {url}: {}", error_text(response).await))),
        }
    }

    async fn put(&self, blob: &Blob, data: ByteStream) -> Result<PutOutcome, StoreError> {
        let url = self.url(blob);
        let body = BodyExt::boxed_unsync(StreamBody::new(
            data.map_ok(Frame::data).map_err(|error| -> BoxError { Box::new(error) }),
        ));
        let response =
            self.send(http::Method::PUT, &url, &[(http::header::CONTENT_LENGTH, blob.size.to_string())], body).await?;
        match response.status() {
            http::StatusCode::CREATED => Ok(PutOutcome::Stored),
            http::StatusCode::OK => Ok(PutOutcome::AlreadyPresent),
            http::StatusCode::BAD_REQUEST => Err(StoreError::Rejected(error_text(response).await)),
            _ => Err(StoreError::Http(format!("PUT {url}: {}", error_text(response).await))),
        }
    }

    async fn list(&self) -> Result<BlobList, StoreError> {
        let url = format!("{}/blobs", self.base);
        let response = self.send(http::Method::GET, &url, &[], empty_body()).await?;
        if response.status() != http::StatusCode::OK {
            return Err(StoreError::Http(format!("GET {url}: {}", error_text(response).await)));
        }
        let body = HttpClient::read_body(&url, response, MAX_LISTING_BYTES, self.timeout * 10)
            .await
            .map_err(|error| StoreError::Http(error.to_string()))?;
        let text = String::from_utf8_lossy(&body).into_owned();
        let blobs: Vec<Result<Blob, StoreError>> =
            text.lines().filter(|line| !line.trim().is_empty()).map(parse_listing_line).collect();
        Ok(Box::pin(futures::stream::iter(blobs)))
    }
}

fn parse_listing_line(line: &str) -> Result<Blob, StoreError> {
    let invalid = || StoreError::Invalid(format!("listing line {line:?}"));
    let (reference, size) = line.trim().split_once(' ').ok_or_else(invalid)?;
    let (algorithm, digest) = reference.split_once(':').ok_or_else(invalid)?;
    let algorithm = Algorithm::parse(algorithm).ok_or_else(invalid)?;
    let size = size.trim().parse().map_err(|_| invalid())?;
    Blob::new(algorithm, digest, size)
}

type ServerBody = http_body_util::combinators::UnsyncBoxBody<Bytes, BoxError>;

fn full(status: http::StatusCode, text: impl Into<Bytes>) -> http::Response<ServerBody> {
    let mut response =
        http::Response::new(http_body_util::Full::new(text.into()).map_err(|never| match never {}).boxed_unsync());
    *response.status_mut() = status;
    response
}

/// The reference server of the protocol, storing into a [`LocalDirStore`].
#[derive(Debug)]
pub struct BlobServer {
    listener: TcpListener,
    store: Arc<LocalDirStore>,
}

impl BlobServer {
    /// A server on `listener` over `store`.
    pub fn new(listener: TcpListener, store: Arc<LocalDirStore>) -> Self {
        Self { listener, store }
    }

    /// The address it listens on.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Serves until `shutdown`, then closes open connections gracefully.
    pub async fn run(self, shutdown: CancellationToken) {
        let connections = TaskTracker::new();
        loop {
            let accepted = tokio::select! {
                accepted = self.listener.accept() => accepted,
                () = shutdown.cancelled() => break,
            };
            let (stream, peer) = match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    tracing::warn!(%error, "blob server accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let store = self.store.clone();
            let shutdown = shutdown.clone();
            connections.spawn(async move {
                let service = hyper::service::service_fn(move |request| {
                    let store = store.clone();
                    async move { Ok::<_, std::convert::Infallible>(handle(&store, request).await) }
                });
                let connection = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
                tokio::pin!(connection);
                let result = tokio::select! {
                    result = connection.as_mut() => result,
                    () = shutdown.cancelled() => {
                        connection.as_mut().graceful_shutdown();
                        connection.await
                    }
                };
                if let Err(error) = result {
                    tracing::debug!(%peer, %error, "blob server connection ended with an error");
                }
            });
        }
        connections.close();
        connections.wait().await;
    }
}

async fn handle(store: &LocalDirStore, request: http::Request<hyper::body::Incoming>) -> http::Response<ServerBody> {
    let path = request.uri().path().to_owned();
    let method = request.method().clone();
    if path == "/blobs" || path == "/blobs/" {
        if method != http::Method::GET {
            return full(http::StatusCode::METHOD_NOT_ALLOWED, "GET only");
        }
        return listing(store).await;
    }
    let Some(rest) = path.strip_prefix("/blobs/") else {
        return full(http::StatusCode::NOT_FOUND, "no such path");
    };
    let Some((algorithm, digest)) = rest.split_once('/') else {
        return full(http::StatusCode::NOT_FOUND, "no such path");
    };
    let Some(algorithm) = Algorithm::parse(algorithm) else {
        return full(http::StatusCode::NOT_FOUND, "unknown algorithm");
    };
    match method {
        http::Method::HEAD | http::Method::GET => {
            let Ok(blob) = Blob::new(algorithm, digest, 0) else {
                return full(http::StatusCode::NOT_FOUND, "invalid digest");
            };
            match store.stat(&blob).await {
                Ok(None) => full(http::StatusCode::NOT_FOUND, ""),
                Err(error) => full(http::StatusCode::INTERNAL_SERVER_ERROR, error.to_string()),
                Ok(Some(size)) if method == http::Method::HEAD => {
                    let mut response = full(http::StatusCode::OK, "");
                    response.headers_mut().insert(http::header::CONTENT_LENGTH, http::HeaderValue::from(size));
                    response
                }
                Ok(Some(size)) => match store.open(&blob).await {
                    Ok(stream) => {
                        let body = BodyExt::boxed_unsync(StreamBody::new(
                            stream.map_ok(Frame::data).map_err(|error| -> BoxError { Box::new(error) }),
                        ));
                        let mut response = http::Response::new(body);
                        response.headers_mut().insert(http::header::CONTENT_LENGTH, http::HeaderValue::from(size));
                        response
                    }
                    Err(StoreError::NotFound(_)) => full(http::StatusCode::NOT_FOUND, ""),
                    Err(error) => full(http::StatusCode::INTERNAL_SERVER_ERROR, error.to_string()),
                },
            }
        }
        http::Method::PUT => {
            let Some(size) = request
                .headers()
                .get(http::header::CONTENT_LENGTH)
                .and_then(|value| value.to_str().ok())
                .and_then(|value| value.parse::<u64>().ok())
            else {
                return full(http::StatusCode::LENGTH_REQUIRED, "Content-Length is required");
            };
            let blob = match Blob::new(algorithm, digest, size) {
                Ok(blob) => blob,
                Err(error) => return full(http::StatusCode::BAD_REQUEST, error.to_string()),
            };
            let body: ByteStream = Box::pin(
                request
                    .into_body()
                    .into_data_stream()
                    .map(|chunk| chunk.map_err(|error| StoreError::Http(format!("upload body: {error}")))),
            );
            match store.put(&blob, body).await {
                Ok(PutOutcome::Stored) => full(http::StatusCode::CREATED, ""),
                Ok(PutOutcome::AlreadyPresent) => full(http::StatusCode::OK, ""),
                Err(error @ (StoreError::SizeMismatch { .. } | StoreError::DigestMismatch { .. })) => {
                    tracing::warn!(blob = %blob, %error, "upload refused");
                    full(http::StatusCode::BAD_REQUEST, error.to_string())
                }
                Err(error) => {
                    tracing::warn!(blob = %blob, %error, "upload failed");
                    full(http::StatusCode::INTERNAL_SERVER_ERROR, error.to_string())
                }
            }
        }
        _ => full(http::StatusCode::METHOD_NOT_ALLOWED, "HEAD, GET or PUT"),
    }
}

async fn listing(store: &LocalDirStore) -> http::Response<ServerBody> {
    let mut blobs = match store.list().await {
        Ok(blobs) => blobs,
        Err(error) => return full(http::StatusCode::INTERNAL_SERVER_ERROR, error.to_string()),
    };
    let mut text = String::new();
    while let Some(blob) = blobs.next().await {
        match blob {
            Ok(blob) => {
                text.push_str(&format!("{} {}\n", blob.reference(), blob.size));
            }
            Err(error) => return full(http::StatusCode::INTERNAL_SERVER_ERROR, error.to_string()),
        }
    }
    full(http::StatusCode::OK, text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_listing_lines() {
        let blob = Blob::of(Algorithm::Sha256, b"abc");
        let parsed = parse_listing_line(&format!("{} 3", blob.reference())).expect("valid");
        assert_eq!(parsed, blob);
        assert!(parse_listing_line("nonsense").is_err());
        assert!(parse_listing_line("md5:abc 3").is_err());
    }
}
