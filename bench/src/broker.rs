//! The broker under test: started by the harness (the release binary over a
//! fresh database) or an existing one at `--endpoint`. Reads its CPU time and
//! memory from /proc when it is a local process.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result};
use sqlx::{Connection, PgConnection, PgPool};

/// Sizes of the job tables (heap and indexes, in bytes) and row counts as
/// PostgreSQL's statistics see them.
#[derive(Clone, Copy, Debug, Default, serde::Serialize, sqlx::FromRow)]
pub struct TableSizes {
    pub hot_table_bytes: i64,
    pub hot_index_bytes: i64,
    pub finished_table_bytes: i64,
    pub finished_index_bytes: i64,
    pub hot_live_rows: i64,
    pub hot_dead_rows: i64,
    pub finished_live_rows: i64,
    pub autovacuum_runs: i64,
}

impl TableSizes {
    pub fn describe(&self) -> String {
        let mib = |bytes: i64| bytes as f64 / (1024.0 * 1024.0);
        format!(
            "jobs {:.1} MiB + indexes {:.1} MiB ({} live, {} dead rows); finished_jobs {:.1} MiB + indexes {:.1} MiB ({} rows); {} autovacuum runs",
            mib(self.hot_table_bytes),
            mib(self.hot_index_bytes),
            self.hot_live_rows,
            self.hot_dead_rows,
            mib(self.finished_table_bytes),
            mib(self.finished_index_bytes),
            self.finished_live_rows,
            self.autovacuum_runs
        )
    }
}

/// CPU seconds and memory of a process: the broker, or this harness.
#[derive(Clone, Copy, Debug, Default, serde::Serialize)]
pub struct ProcessSample {
    pub cpu_seconds: f64,
    pub rss_mib: f64,
    pub peak_rss_mib: f64,
}

/// The broker's and the harness's samples at one moment.
#[derive(Clone, Copy, Debug)]
pub struct CpuSnapshot {
    pub broker: Option<ProcessSample>,
    pub harness: Option<ProcessSample>,
}

impl CpuSnapshot {
    /// CPU seconds the broker and the harness spent since `before`.
    pub fn cpu_since(&self, before: &CpuSnapshot) -> (Option<f64>, Option<f64>) {
        let spent = |after: Option<ProcessSample>, before: Option<ProcessSample>| {
            Some(after?.cpu_seconds - before?.cpu_seconds)
        };
        (spent(self.broker, before.broker), spent(self.harness, before.harness))
    }
}

/// CPU (user and system) and memory of a local process, from /proc.
fn process_sample(pid: u32) -> Option<ProcessSample> {
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
        process_sample(self.pid?)
    }

    /// CPU of the broker and of this harness now, for the CPU each spends on
    /// a scenario.
    pub fn snapshot(&self) -> CpuSnapshot {
        CpuSnapshot { broker: self.sample(), harness: process_sample(std::process::id()) }
    }

    /// Sizes of the job tables and their indexes, and vacuum's progress.
    pub async fn table_sizes(&self) -> Result<TableSizes> {
        Ok(sqlx::query_as(
            "SELECT pg_relation_size('workbroker.jobs') AS hot_table_bytes, \
                    pg_indexes_size('workbroker.jobs') AS hot_index_bytes, \
                    pg_relation_size('workbroker.finished_jobs') AS finished_table_bytes, \
                    pg_indexes_size('workbroker.finished_jobs') AS finished_index_bytes, \
                    coalesce(h.n_live_tup, 0) AS hot_live_rows, coalesce(h.n_dead_tup, 0) AS hot_dead_rows, \
                    coalesce(f.n_live_tup, 0) AS finished_live_rows, \
                    coalesce(h.autovacuum_count, 0) + coalesce(f.autovacuum_count, 0) AS autovacuum_runs \
               FROM pg_stat_user_tables h, pg_stat_user_tables f \
              WHERE h.relid = 'workbroker.jobs'::regclass AND f.relid = 'workbroker.finished_jobs'::regclass",
        )
        .fetch_one(&self.pool)
        .await?)
    }

    /// Deletes the jobs of the harness's own queues (`bench-*`) and vacuums,
    /// so that every scenario run starts from the same, empty tables.
    pub async fn clean_up(&self) -> Result<()> {
        // One connection for all of it: PostgreSQL counts the deleted rows
        // as dead only when this session flushes its statistics, which an
        // idle session may put off for up to ten seconds. Counted after the
        // VACUUM below, they would make the broker's vacuumer vacuum both
        // tables again in the middle of the next run (seen: 100,000
        // "dead" rows in `finished_jobs`, vacuumed for 0.2 to 0.4 s at the
        // time of a latency spike). So the session flushes them first.
        let mut connection = self.pool.acquire().await?;
        // The broker may still be handing back the leases of workers that
        // just stopped, and its retention purge deletes finished jobs at
        // any time: its statements and these deletes can then lock the same
        // rows in opposite orders, and PostgreSQL cancels one of them.
        for statement in [
            "DELETE FROM workbroker.jobs WHERE queue LIKE 'bench-%'",
            "DELETE FROM workbroker.finished_jobs WHERE queue LIKE 'bench-%'",
        ] {
            let mut attempt = 0;
            while let Err(error) = sqlx::query(statement).execute(&mut *connection).await {
                let deadlock =
                    error.as_database_error().and_then(|error| error.code()).is_some_and(|code| code == "40P01");
                attempt += 1;
                if !deadlock || attempt == 5 {
                    return Err(error.into());
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
        // PostgreSQL 15 and later; an older server flushes on its own time.
        if let Err(error) = sqlx::query("SELECT pg_stat_force_next_flush()").execute(&mut *connection).await {
            eprintln!(
                "could not flush the clean-up's statistics ({error}); the broker may vacuum again during the next run"
            );
        }
        sqlx::raw_sql("VACUUM workbroker.jobs, workbroker.finished_jobs").execute(&mut *connection).await?;
        Ok(())
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
