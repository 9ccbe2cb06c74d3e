//! A small HTTP/1.1 client on hyper, shared by the HTTP image source and the
//! HTTP blob store. Plain `http://` only: for HTTPS, implement the source or
//! store trait over the client of your choice.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::BodyExt;
use http_body_util::combinators::UnsyncBoxBody;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

/// Error type of request bodies.
pub(crate) type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// Request body type.
pub(crate) type Body = UnsyncBoxBody<Bytes, BoxError>;

/// Why an HTTP call failed.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    /// The base URL or a path could not be made into a URI.
    #[error("invalid URL {url:?}: {reason}")]
    InvalidUrl {
        /// The URL.
        url: String,
        /// Why.
        reason: String,
    },
    /// Connecting, sending or receiving failed.
    #[error("request to {url} failed: {source}")]
    Request {
        /// The URL.
        url: String,
        /// What hyper said.
        #[source]
        source: BoxError,
    },
    /// The request took longer than its timeout.
    #[error("request to {url} timed out")]
    Timeout {
        /// The URL.
        url: String,
    },
}

/// A pooled HTTP/1.1 client.
#[derive(Clone, Debug)]
pub(crate) struct HttpClient {
    client: Client<HttpConnector, Body>,
}

impl Default for HttpClient {
    fn default() -> Self {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(Duration::from_secs(5)));
        Self {
            client: Client::builder(TokioExecutor::new()).pool_idle_timeout(Duration::from_secs(30)).build(connector),
        }
    }
}

/// Checks that `base` is an `http://` URL and strips a trailing slash.
pub(crate) fn normalize_base(base: &str) -> Result<String, HttpError> {
    let trimmed = base.trim_end_matches('/');
    let uri: http::Uri = trimmed.parse().map_err(|error: http::uri::InvalidUri| HttpError::InvalidUrl {
        url: base.to_owned(),
        reason: error.to_string(),
    })?;
    if uri.scheme_str() != Some("http") || uri.host().is_none() {
        return Err(HttpError::InvalidUrl {
            url: base.to_owned(),
            reason: "must be an http:// URL with a host".to_owned(),
        });
    }
    Ok(trimmed.to_owned())
}

/// An empty request body.
pub(crate) fn empty_body() -> Body {
    http_body_util::Empty::<Bytes>::new().map_err(|never| match never {}).boxed_unsync()
}

impl HttpClient {
    /// Sends a request; `timeout` covers the time until the response head.
    pub(crate) async fn send(
        &self,
        method: http::Method,
        url: &str,
        headers: &[(http::HeaderName, String)],
        body: Body,
        timeout: Duration,
    ) -> Result<http::Response<hyper::body::Incoming>, HttpError> {
        let uri: http::Uri = url.parse().map_err(|error: http::uri::InvalidUri| HttpError::InvalidUrl {
            url: url.to_owned(),
            reason: error.to_string(),
        })?;
        let mut builder = http::Request::builder().method(method).uri(uri);
        for (name, value) in headers {
            builder = builder.header(name, value);
        }
        let request = builder
            .body(body)
            .map_err(|error| HttpError::InvalidUrl { url: url.to_owned(), reason: error.to_string() })?;
        match tokio::time::timeout(timeout, self.client.request(request)).await {
            Err(_) => Err(HttpError::Timeout { url: url.to_owned() }),
            Ok(Err(error)) => Err(HttpError::Request { url: url.to_owned(), source: Box::new(error) }),
            Ok(Ok(response)) => Ok(response),
        }
    }

    /// Reads a whole response body, refusing more than `limit` bytes.
    pub(crate) async fn read_body(
        url: &str,
        response: http::Response<hyper::body::Incoming>,
        limit: usize,
        timeout: Duration,
    ) -> Result<Bytes, HttpError> {
        let limited = http_body_util::Limited::new(response.into_body(), limit);
        match tokio::time::timeout(timeout, limited.collect()).await {
            Err(_) => Err(HttpError::Timeout { url: url.to_owned() }),
            Ok(Err(error)) => Err(HttpError::Request { url: url.to_owned(), source: error }),
            Ok(Ok(collected)) => Ok(collected.to_bytes()),
        }
    }
}
