//! Brokers as real processes (the `workbroker` binary), for tests that kill
//! (SIGKILL) or pause (SIGSTOP) a replica.

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result};
use tonic::transport::Channel;
use workbroker_api::v1;
use workbroker_api::v1::admin_client::AdminClient;
use workbroker_api::v1::broker_client::BrokerClient;

/// The `workbroker` binary next to the test executable (`cargo test
/// --workspace` builds it before running tests).
pub fn broker_binary() -> Result<PathBuf> {
    let executable = std::env::current_exe()?;
    let target_dir =
        executable.parent().and_then(|deps| deps.parent()).context("test executable has no target directory")?;
    let binary = target_dir.join("workbroker");
    anyhow::ensure!(
        binary.exists(),
        "{} is missing: run `cargo build -p workbroker-server` (scripts/test.sh does)",
        binary.display()
    );
    Ok(binary)
}

/// A broker replica running as a child process.
pub struct BrokerProcess {
    pub member_id: String,
    pub address: String,
    child: Option<Child>,
}

impl BrokerProcess {
    /// Starts `workbroker serve` on a free loopback port.
    pub async fn start(database_url: &str, etcd_endpoint: &str, etcd_prefix: &str, ttl_seconds: u64) -> Result<Self> {
        Self::start_with_env(database_url, etcd_endpoint, etcd_prefix, ttl_seconds, &[]).await
    }

    /// [`BrokerProcess::start`] with extra environment variables (they win
    /// over the defaults; an empty `etcd_endpoint` runs the replica alone).
    pub async fn start_with_env(
        database_url: &str,
        etcd_endpoint: &str,
        etcd_prefix: &str,
        ttl_seconds: u64,
        env: &[(&str, &str)],
    ) -> Result<Self> {
        let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let address = format!("127.0.0.1:{port}");
        let member_id = format!("replica-{port}");
        let child = Command::new(broker_binary()?)
            .arg("serve")
            .env("DATABASE_URL", database_url)
            .env("WORKBROKER_LISTEN", &address)
            .env("WORKBROKER_MEMBER_ID", &member_id)
            .env("ETCD_ENDPOINTS", etcd_endpoint)
            .env("WORKBROKER_ETCD_PREFIX", etcd_prefix)
            .env("WORKBROKER_ELECTION_TTL_SECONDS", ttl_seconds.to_string())
            .env("WORKBROKER_REAPER_INTERVAL_MS", "200")
            .env("WORKBROKER_SHUTDOWN_GRACE_SECONDS", "1")
            .env("WORKBROKER_LOG", std::env::var("WORKBROKER_TEST_LOG").unwrap_or_else(|_| "warn".to_owned()))
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .context("start the workbroker binary")?;
        let process = Self { member_id, address, child: Some(child) };
        for _ in 0..200 {
            if let Ok(mut admin) = process.admin().await
                && admin.get_queue_stats(v1::GetQueueStatsRequest::default()).await.is_ok()
            {
                return Ok(process);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        anyhow::bail!("broker process {} did not become ready", process.address)
    }

    async fn channel(&self) -> Result<Channel> {
        Ok(Channel::from_shared(format!("http://{}", self.address))?
            .connect_timeout(Duration::from_secs(1))
            .timeout(Duration::from_secs(5))
            .connect()
            .await?)
    }

    pub async fn admin(&self) -> Result<AdminClient<Channel>> {
        Ok(AdminClient::new(self.channel().await?))
    }

    pub async fn broker(&self) -> Result<BrokerClient<Channel>> {
        Ok(BrokerClient::new(self.channel().await?))
    }

    /// The cluster as this replica sees it.
    pub async fn cluster(&self) -> Result<v1::ClusterInfo> {
        Ok(self.admin().await?.get_cluster_info(v1::GetClusterInfoRequest {}).await?.into_inner())
    }

    fn pid(&self) -> Result<String> {
        Ok(self.child.as_ref().context("process already gone")?.id().to_string())
    }

    fn signal(&self, signal: &str) -> Result<()> {
        let status = Command::new("kill").arg(format!("-{signal}")).arg(self.pid()?).status()?;
        anyhow::ensure!(status.success(), "kill -{signal} failed");
        Ok(())
    }

    /// SIGKILL: no graceful shutdown, no resignation.
    pub fn kill(&mut self) -> Result<()> {
        if let Some(mut child) = self.child.take() {
            child.kill()?;
            child.wait()?;
        }
        Ok(())
    }

    /// SIGSTOP: the process freezes (timers included).
    pub fn pause(&self) -> Result<()> {
        self.signal("STOP")
    }

    /// SIGCONT.
    pub fn resume(&self) -> Result<()> {
        self.signal("CONT")
    }

    /// SIGTERM and wait: a graceful stop.
    pub fn terminate(&mut self) -> Result<()> {
        if self.child.is_some() {
            self.signal("TERM")?;
        }
        if let Some(mut child) = self.child.take() {
            child.wait()?;
        }
        Ok(())
    }
}

impl Drop for BrokerProcess {
    fn drop(&mut self) {
        let _ = self.kill();
    }
}
