//! A real etcd server for tests: the Debian `etcd` binary on free loopback
//! ports with a temporary data directory, killed when dropped.
//!
//! `ETCD_ENDPOINTS` names an existing etcd to use instead (each test then
//! works under its own key prefix); tests that stop and restart etcd always
//! start their own.

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result};
use workbroker_server::coordination::etcd::EtcdConfig;

/// A running etcd (ours or the environment's).
pub struct TestEtcd {
    pub endpoint: String,
    child: Option<Child>,
    data_dir: Option<PathBuf>,
    client_port: u16,
    peer_port: u16,
}

fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

impl TestEtcd {
    /// The environment's etcd if `ETCD_ENDPOINTS` is set, else a new local one.
    pub async fn start() -> Result<Self> {
        if let Ok(endpoints) = std::env::var("ETCD_ENDPOINTS")
            && let Some(endpoint) = endpoints.split(',').map(str::trim).find(|endpoint| !endpoint.is_empty())
        {
            let endpoint = if endpoint.contains("://") { endpoint.to_owned() } else { format!("http://{endpoint}") };
            return Ok(Self { endpoint, child: None, data_dir: None, client_port: 0, peer_port: 0 });
        }
        Self::start_local().await
    }

    /// Always a new local etcd (for tests that stop and restart it).
    pub async fn start_local() -> Result<Self> {
        let data_dir = std::env::temp_dir().join(format!("wbtest-etcd-{}", uuid::Uuid::new_v4().simple()));
        let mut etcd = Self {
            endpoint: String::new(),
            child: None,
            data_dir: Some(data_dir),
            client_port: free_port()?,
            peer_port: free_port()?,
        };
        etcd.endpoint = format!("http://127.0.0.1:{}", etcd.client_port);
        etcd.spawn().await?;
        Ok(etcd)
    }

    async fn spawn(&mut self) -> Result<()> {
        let data_dir = self.data_dir.clone().context("only a local etcd can be started")?;
        let client_url = format!("http://127.0.0.1:{}", self.client_port);
        let peer_url = format!("http://127.0.0.1:{}", self.peer_port);
        let child = Command::new("etcd")
            .arg("--name")
            .arg("wbtest")
            .arg("--data-dir")
            .arg(&data_dir)
            .arg("--listen-client-urls")
            .arg(&client_url)
            .arg("--advertise-client-urls")
            .arg(&client_url)
            .arg("--listen-peer-urls")
            .arg(&peer_url)
            .arg("--initial-advertise-peer-urls")
            .arg(&peer_url)
            .arg("--initial-cluster")
            .arg(format!("wbtest={peer_url}"))
            .arg("--log-level")
            .arg("error")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("start etcd (Debian package etcd-server; scripts/test.sh installs it)")?;
        self.child = Some(child);
        self.wait_ready().await
    }

    async fn wait_ready(&self) -> Result<()> {
        for _ in 0..200 {
            if let Ok(mut client) = etcd_client::Client::connect([self.endpoint.as_str()], None).await
                && client.status().await.is_ok()
            {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        anyhow::bail!("etcd at {} did not become ready", self.endpoint)
    }

    /// Kills the local etcd (its data stays).
    pub fn stop(&mut self) -> Result<()> {
        if let Some(mut child) = self.child.take() {
            child.kill()?;
            child.wait()?;
        }
        Ok(())
    }

    /// Starts the local etcd again on the same ports and data.
    pub async fn restart(&mut self) -> Result<()> {
        self.stop()?;
        self.spawn().await
    }

    /// A coordination config under a fresh key prefix, with a short TTL.
    pub fn config(&self, ttl: Duration) -> EtcdConfig {
        EtcdConfig {
            endpoints: vec![self.endpoint.clone()],
            prefix: format!("/wbtest/{}", uuid::Uuid::new_v4().simple()),
            username: None,
            password: None,
            ca_file: None,
            cert_file: None,
            key_file: None,
            lease_ttl: ttl,
            trust_margin: Duration::from_millis(500),
        }
    }
}

impl Drop for TestEtcd {
    fn drop(&mut self) {
        let _ = self.stop();
        if let Some(data_dir) = self.data_dir.take() {
            let _ = std::fs::remove_dir_all(data_dir);
        }
    }
}
