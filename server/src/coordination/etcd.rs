//! Connecting to etcd, and the keys workbroker keeps there.

use std::path::PathBuf;
use std::time::Duration;

use etcd_client::{Certificate, Client, ConnectOptions, Identity, TlsOptions};

/// What can go wrong talking to etcd.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("etcd: {0}")]
    Etcd(#[from] etcd_client::Error),
    #[error("reading {path}: {source}")]
    ReadFile { path: PathBuf, source: std::io::Error },
    #[error("etcd configuration: {0}")]
    Config(String),
    #[error("shard map in etcd is malformed: {0}")]
    MalformedMap(#[from] serde_json::Error),
}

/// How to reach etcd and how to use it.
#[derive(Clone, Debug)]
pub struct EtcdConfig {
    /// `http://host:2379` or `https://...` endpoints.
    pub endpoints: Vec<String>,
    /// Key prefix, so several clusters can share one etcd (e.g. `/workbroker/prod`).
    pub prefix: String,
    pub username: Option<String>,
    pub password: Option<String>,
    /// PEM CA bundle to verify etcd's certificate (enables TLS).
    pub ca_file: Option<PathBuf>,
    /// PEM client certificate and key for mutual TLS.
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
    /// TTL of the election lease (and of the membership lease).
    pub lease_ttl: Duration,
    /// Safety margin taken off the trust window of a leader.
    pub trust_margin: Duration,
}

impl EtcdConfig {
    /// Default TTL of the election and membership leases.
    pub const DEFAULT_LEASE_TTL: Duration = Duration::from_secs(10);

    pub fn election_name(&self) -> String {
        format!("{}/election", self.prefix)
    }

    pub fn members_prefix(&self) -> String {
        format!("{}/members/", self.prefix)
    }

    pub fn member_key(&self, member_id: &str) -> String {
        format!("{}/members/{member_id}", self.prefix)
    }

    pub fn shard_map_key(&self) -> String {
        format!("{}/shard-map", self.prefix)
    }

    /// The prefix under which every key of this cluster lives (with a trailing slash).
    pub fn cluster_prefix(&self) -> String {
        format!("{}/", self.prefix)
    }

    fn read(path: &PathBuf) -> Result<Vec<u8>, Error> {
        std::fs::read(path).map_err(|source| Error::ReadFile { path: path.clone(), source })
    }

    fn connect_options(&self) -> Result<ConnectOptions, Error> {
        let mut options = ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(3))
            .with_keep_alive(Duration::from_secs(5), Duration::from_secs(3))
            .with_keep_alive_while_idle(true);
        match (&self.username, &self.password) {
            (Some(user), Some(password)) => options = options.with_user(user.clone(), password.clone()),
            (None, None) => {}
            _ => return Err(Error::Config("etcd username and password go together".to_owned())),
        }
        if self.ca_file.is_some() || self.cert_file.is_some() {
            let mut tls = TlsOptions::new();
            if let Some(ca_file) = &self.ca_file {
                tls = tls.ca_certificate(Certificate::from_pem(Self::read(ca_file)?));
            }
            match (&self.cert_file, &self.key_file) {
                (Some(cert), Some(key)) => {
                    tls = tls.identity(Identity::from_pem(Self::read(cert)?, Self::read(key)?));
                }
                (None, None) => {}
                _ => return Err(Error::Config("etcd client certificate and key go together".to_owned())),
            }
            options = options.with_tls(tls);
        }
        Ok(options)
    }

    /// Connects (lazily where the client allows it).
    pub async fn connect(&self) -> Result<Client, Error> {
        if self.endpoints.is_empty() {
            return Err(Error::Config("no etcd endpoints".to_owned()));
        }
        Ok(Client::connect(&self.endpoints, Some(self.connect_options()?)).await?)
    }
}
