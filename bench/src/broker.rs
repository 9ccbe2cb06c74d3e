//! The broker under test: started by the harness (the release binary over a
//! fresh database) or an existing one at `--endpoint`. Reads its CPU time and
//! memory from /proc when it is a local process.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result};
use sqlx::{Connection, PgConnection, PgPool};

/// CPU seconds and memory of the broker process.
#[derive(Clone, Copy, Debug, Default, serde::Serialize)]
pub struct ProcessSample {
    pub cpu_seconds: f64,
    pub rss_mib: f64,
    pub peak_rss_mib: f64,
}

pub struct BrokerUnderTest {
    pub endpoint: String,
    pub pool: PgPool,
    child: Option<Child>,
    pid: Option<u32>,
    created_database: Option<(String, String)>,
}

fn replace_database(url: &str, database: &str) -> String {
    let (base, query) = url.split_once('?').map_or((url, None), |(base, query)| (base, Some(query)));
    let scheme_end = base.find("://").map_or(0, |index| index + 3);
    let host = base[scheme_end..].find('/').map_or(base, |slash| &base[..scheme_end + slash]);
    match query {
        Some(query) => format!("{host}/{database}?{query}"),
        None => format!("{host}/{database}"),
    }
}

impl BrokerUnderTest {
    /// Starts `binary serve` on `listen` over a new database on `server_url`'s server.
    pub async fn start(
        binary: PathBuf,
        server_url: &str,
        listen: &str,
        extra_env: &[(String, String)],
    ) -> Result<Self> {
        let name = format!("wbbench_{}", uuid::Uuid::new_v4().simple());
        let mut admin = PgConnection::connect(server_url).await.context("connect to DATABASE_URL")?;
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}"))).execute(&mut admin).await?;
        admin.close().await?;
        let database_url = replace_database(server_url, &name);
        let mut command = Command::new(&binary);
        command
            .arg("serve")
            .env("DATABASE_URL", &database_url)
            .env("WORKBROKER_LISTEN", listen)
            .env("WORKBROKER_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit());
        for (key, value) in extra_env {
            command.env(key, value);
        }
        let child = command.spawn().with_context(|| format!("start {}", binary.display()))?;
        let pid = child.id();
        let endpoint = format!("http://{listen}");
        let broker = Self {
            endpoint,
            pool: sqlx::postgres::PgPoolOptions::new().max_connections(4).connect_lazy(&database_url)?,
            child: Some(child),
            pid: Some(pid),
            created_database: Some((server_url.to_owned(), name)),
        };
        broker.wait_ready().await?;
        Ok(broker)
    }

    /// An existing broker at `endpoint` whose database is `database_url`.
    pub async fn target(endpoint: &str, database_url: &str, pid: Option<u32>) -> Result<Self> {
        let broker = Self {
            endpoint: endpoint.to_owned(),
            pool: sqlx::postgres::PgPoolOptions::new().max_connections(4).connect(database_url).await?,
            child: None,
            pid,
            created_database: None,
        };
        broker.wait_ready().await?;
        Ok(broker)
    }

    async fn wait_ready(&self) -> Result<()> {
        for _ in 0..300 {
            if let Ok(client) = workbroker_worker_sdk::Client::connect(self.endpoint.clone()).await {
                let mut admin = client.admin();
                if admin.get_queue_stats(workbroker_api::v1::GetQueueStatsRequest::default()).await.is_ok() {
                    return Ok(());
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        anyhow::bail!("broker at {} did not become ready", self.endpoint)
    }

    /// CPU and memory of the broker process, when it is local.
    pub fn sample(&self) -> Option<ProcessSample> {
        let pid = self.pid?;
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        let after_name = stat.rsplit_once(')')?.1;
        let fields: Vec<&str> = after_name.split_whitespace().collect();
        // Fields 14 and 15 of stat (utime, stime) are at 11 and 12 after the name.
        let ticks: f64 = fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        let kib = |key: &str| {
            status
                .lines()
                .find(|line| line.starts_with(key))
                .and_then(|line| line.split_whitespace().nth(1))
                .and_then(|value| value.parse::<f64>().ok())
                .unwrap_or(0.0)
        };
        Some(ProcessSample {
            cpu_seconds: ticks / 100.0,
            rss_mib: kib("VmRSS:") / 1024.0,
            peak_rss_mib: kib("VmHWM:") / 1024.0,
        })
    }

    /// Total size of the job tables and their indexes, in bytes.
    pub async fn database_bytes(&self) -> Result<(i64, i64)> {
        Ok(sqlx::query_as(
            "SELECT pg_total_relation_size('workbroker.jobs'), pg_total_relation_size('workbroker.finished_jobs')",
        )
        .fetch_one(&self.pool)
        .await?)
    }

    /// Unfinished jobs of a queue (cheap: the hot table only).
    pub async fn unfinished(&self, queue: &str) -> Result<i64> {
        Ok(sqlx::query_scalar("SELECT count(*) FROM workbroker.jobs WHERE queue = $1")
            .bind(queue)
            .fetch_one(&self.pool)
            .await?)
    }

    /// Stops a broker the harness started and drops its database.
    pub async fn stop(mut self) -> Result<()> {
        self.pool.close().await;
        if let Some(mut child) = self.child.take() {
            let _ = Command::new("kill").arg("-TERM").arg(child.id().to_string()).status();
            let _ = child.wait();
        }
        if let Some((server_url, name)) = self.created_database.take() {
            let mut admin = PgConnection::connect(&server_url).await?;
            sqlx::query(sqlx::AssertSqlSafe(format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)")))
                .execute(&mut admin)
                .await?;
        }
        Ok(())
    }
}

impl Drop for BrokerUnderTest {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
