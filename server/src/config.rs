//! Command-line and environment configuration of `workbroker serve` and
//! `workbroker migrate`, and its translation into [`ServerConfig`].

use std::net::SocketAddr;
use std::time::Duration;

use crate::coordination::etcd::EtcdConfig;
use crate::coordination::lease::KeepAliveFreeze;
use crate::reaper::ReaperConfig;
use crate::server::ServerConfig;
use crate::service::BatcherSettings;
use crate::service::validate::Limits;
use crate::store::StoreConfig;
use crate::vacuum::VacuumConfig;

/// How to reach PostgreSQL.
#[derive(clap::Args, Clone, Debug)]
pub struct DatabaseArgs {
    /// PostgreSQL URL, e.g. postgres://postgres@127.0.0.1:5432/workbroker
    #[arg(long, env = "DATABASE_URL")]
    pub database_url: String,

    /// Most database connections this replica opens.
    #[arg(long, env = "WORKBROKER_MAX_CONNECTIONS", default_value_t = 20)]
    pub max_connections: u32,
}

impl DatabaseArgs {
    pub fn store_config(&self) -> StoreConfig {
        StoreConfig {
            database_url: self.database_url.clone(),
            max_connections: self.max_connections.max(2),
            batch_connections: 0,
            acquire_timeout: Duration::from_secs(5),
        }
    }
}

/// Flags of `workbroker serve`.
#[derive(clap::Args, Clone, Debug)]
pub struct ServeArgs {
    #[command(flatten)]
    pub database: DatabaseArgs,

    /// Address of the gRPC listener.
    #[arg(long, env = "WORKBROKER_LISTEN", default_value = "127.0.0.1:50051")]
    pub listen: SocketAddr,

    /// Address of the admin HTTP listener: /healthz, /readyz, /metrics and the status page (default: off).
    #[arg(long, env = "WORKBROKER_ADMIN_LISTEN")]
    pub admin_listen: Option<SocketAddr>,

    /// Address other replicas and clients reach this one at (default: the listen address).
    #[arg(long, env = "WORKBROKER_ADVERTISE_ADDRESS")]
    pub advertise_address: Option<String>,

    /// Unique id of this replica (default: a random one).
    #[arg(long, env = "WORKBROKER_MEMBER_ID")]
    pub member_id: Option<String>,

    /// Do not apply database migrations at start.
    #[arg(long, env = "WORKBROKER_NO_MIGRATE")]
    pub no_migrate: bool,

    /// Largest job payload or ack result, in bytes.
    #[arg(long, env = "WORKBROKER_MAX_PAYLOAD_BYTES", default_value_t = 1024 * 1024)]
    pub max_payload_bytes: usize,

    /// Largest gRPC message the broker decodes, in bytes (raised to fit the payload limit).
    #[arg(long, env = "WORKBROKER_MAX_MESSAGE_BYTES", default_value_t = 16 * 1024 * 1024)]
    pub max_message_bytes: usize,

    /// Seconds a shutdown waits for in-flight jobs to be acked before releasing them.
    #[arg(long, env = "WORKBROKER_SHUTDOWN_GRACE_SECONDS", default_value_t = 10.0)]
    pub shutdown_grace_seconds: f64,

    /// Milliseconds between two reaper passes.
    #[arg(long, env = "WORKBROKER_REAPER_INTERVAL_MS", default_value_t = 1000)]
    pub reaper_interval_ms: u64,

    /// Seconds between two checks of the job tables' dead rows, which the
    /// leader vacuums when they pile up (0: leave it to autovacuum). The
    /// leader also checks about a second after its own replica inserted
    /// another 5,000 jobs, so under a heavy flow checks, and vacuums, come
    /// more often than this.
    #[arg(long, env = "WORKBROKER_VACUUM_INTERVAL_SECONDS", default_value_t = 5)]
    pub vacuum_interval_seconds: u64,

    /// Threads of the broker's async runtime (default: one per CPU the
    /// process may use, cgroup quotas included). Where the broker shares a
    /// few cores with PostgreSQL, fewer threads hand work between each
    /// other less often: on two cores shared with the database, 1 thread
    /// cut the broker's CPU per one-job `Enqueue` by 13 to 17 %.
    #[arg(long, env = "WORKBROKER_RUNTIME_THREADS", value_parser = clap::value_parser!(u16).range(1..=1024))]
    pub runtime_threads: Option<u16>,

    /// Enqueue statements this replica runs at once; waiting requests are
    /// grouped into the next one (a statement starts beside a running one
    /// only once 1,000 jobs or more wait).
    #[arg(long, env = "WORKBROKER_ENQUEUE_CONCURRENCY", default_value_t = 4, value_parser = clap::value_parser!(u16).range(1..=64))]
    pub enqueue_concurrency: u16,

    /// Ack statements (and, apart, nack statements) this replica runs at
    /// once; acks waiting meanwhile are grouped into the next one.
    #[arg(long, env = "WORKBROKER_SETTLE_CONCURRENCY", default_value_t = 2, value_parser = clap::value_parser!(u16).range(1..=64))]
    pub settle_concurrency: u16,

    /// Microseconds (at most 100,000) a few acks no other job waits on (no
    /// ordering key; their worker's stream is waiting for work with free
    /// slots and is not draining) wait for more to share their statement;
    /// 0 never waits.
    #[arg(long, env = "WORKBROKER_ACK_LINGER_US", default_value_t = 1_000, value_parser = clap::value_parser!(u64).range(0..=100_000))]
    pub ack_linger_us: u64,

    /// Shards jobs are spread over; applied only to a database without jobs (default: stored, 64).
    #[arg(long, env = "WORKBROKER_SHARD_COUNT", value_parser = clap::value_parser!(u32).range(1..=65536))]
    pub shard_count: Option<u32>,

    #[command(flatten)]
    pub etcd: EtcdArgs,
}

/// Flags of the etcd connection. Without endpoints the replica runs alone.
#[derive(clap::Args, Clone, Debug)]
pub struct EtcdArgs {
    /// Comma-separated etcd endpoints (http://host:2379 or https://...).
    #[arg(long, env = "ETCD_ENDPOINTS", value_delimiter = ',')]
    pub etcd_endpoints: Vec<String>,

    /// Key prefix in etcd, so several clusters can share one etcd.
    #[arg(long, env = "WORKBROKER_ETCD_PREFIX", default_value = "/workbroker")]
    pub etcd_prefix: String,

    /// etcd user name (with --etcd-password).
    #[arg(long, env = "ETCD_USERNAME")]
    pub etcd_username: Option<String>,

    /// etcd password.
    #[arg(long, env = "ETCD_PASSWORD", hide_env_values = true)]
    pub etcd_password: Option<String>,

    /// PEM CA bundle that signed etcd's certificate (turns TLS on).
    #[arg(long, env = "WORKBROKER_ETCD_CA_FILE")]
    pub etcd_ca_file: Option<std::path::PathBuf>,

    /// PEM client certificate for mutual TLS (with --etcd-key-file).
    #[arg(long, env = "WORKBROKER_ETCD_CERT_FILE")]
    pub etcd_cert_file: Option<std::path::PathBuf>,

    /// PEM client key for mutual TLS.
    #[arg(long, env = "WORKBROKER_ETCD_KEY_FILE")]
    pub etcd_key_file: Option<std::path::PathBuf>,

    /// TTL of the election and membership leases, in seconds.
    #[arg(long, env = "WORKBROKER_ELECTION_TTL_SECONDS", default_value_t = 10, value_parser = clap::value_parser!(u64).range(2..=300))]
    pub election_ttl_seconds: u64,
}

impl EtcdArgs {
    /// The etcd configuration, or `None` when no endpoint is given.
    pub fn etcd_config(&self) -> Option<EtcdConfig> {
        let endpoints: Vec<String> = self
            .etcd_endpoints
            .iter()
            .map(|endpoint| endpoint.trim().to_owned())
            .filter(|endpoint| !endpoint.is_empty())
            .map(|endpoint| if endpoint.contains("://") { endpoint } else { format!("http://{endpoint}") })
            .collect();
        if endpoints.is_empty() {
            return None;
        }
        let lease_ttl = Duration::from_secs(self.election_ttl_seconds);
        Some(EtcdConfig {
            endpoints,
            prefix: self.etcd_prefix.trim_end_matches('/').to_owned(),
            username: self.etcd_username.clone(),
            password: self.etcd_password.clone(),
            ca_file: self.etcd_ca_file.clone(),
            cert_file: self.etcd_cert_file.clone(),
            key_file: self.etcd_key_file.clone(),
            lease_ttl,
            trust_margin: (lease_ttl / 10).max(Duration::from_millis(500)),
        })
    }
}

impl ServeArgs {
    /// Enqueue, ack and nack statements allowed in flight at once: the
    /// connections kept for them out of `--max-connections`.
    fn group_commit_statements(&self) -> u32 {
        u32::from(self.enqueue_concurrency) + 2 * u32::from(self.settle_concurrency)
    }

    /// A warning when the enqueue, ack and nack statements allowed in flight
    /// at once take more than half of `--max-connections`: they get that
    /// many connections of their own, and lease statements, reads and admin
    /// calls share the rest, where a statement that waits 5 s for a
    /// connection fails as unavailable.
    pub fn connection_budget_warning(&self) -> Option<String> {
        let statements = self.group_commit_statements();
        let pool = self.database.store_config().max_connections;
        (statements * 2 > pool).then(|| {
            format!(
                "--enqueue-concurrency {} and --settle-concurrency {} (acks and nacks each) allow {statements} \
                 statements at once, more than half of --max-connections {pool}; raise --max-connections",
                self.enqueue_concurrency, self.settle_concurrency
            )
        })
    }

    pub fn server_config(&self) -> ServerConfig {
        let member_id = self
            .member_id
            .clone()
            .unwrap_or_else(|| format!("broker-{}", &uuid::Uuid::new_v4().simple().to_string()[..12]));
        ServerConfig {
            store: StoreConfig { batch_connections: self.group_commit_statements(), ..self.database.store_config() },
            migrate: !self.no_migrate,
            limits: Limits { max_payload_bytes: self.max_payload_bytes },
            max_message_bytes: self.max_message_bytes.max(self.max_payload_bytes + 64 * 1024),
            shutdown_grace: Duration::from_secs_f64(self.shutdown_grace_seconds.clamp(0.0, 3600.0)),
            reaper: ReaperConfig {
                interval: Duration::from_millis(self.reaper_interval_ms.clamp(10, 60_000)),
                ..ReaperConfig::default()
            },
            vacuum: VacuumConfig {
                interval: Duration::from_secs(self.vacuum_interval_seconds.min(3600)),
                ..VacuumConfig::default()
            },
            member_id,
            advertise_address: self.advertise_address.clone(),
            batchers: BatcherSettings {
                max_concurrent_enqueues: usize::from(self.enqueue_concurrency),
                max_concurrent_flushes: usize::from(self.settle_concurrency),
                ack_linger: Duration::from_micros(self.ack_linger_us),
                ..BatcherSettings::default()
            },
            watch_poll_interval: Duration::from_millis(500),
            etcd: self.etcd.etcd_config(),
            shard_count: self.shard_count,
            keep_alive_freeze: KeepAliveFreeze::default(),
            admin_listen: self.admin_listen,
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::ServeArgs;
    use crate::service::BatcherSettings;

    #[derive(Parser)]
    struct Command {
        #[command(flatten)]
        serve: ServeArgs,
    }

    fn batchers(args: &[&str]) -> BatcherSettings {
        serve_args(args).server_config().batchers
    }

    #[test]
    fn statement_concurrency_flags_default_to_the_batcher_defaults_and_override_them() {
        let defaults = BatcherSettings::default();
        let parsed = batchers(&[]);
        assert_eq!(
            (parsed.max_concurrent_enqueues, parsed.max_concurrent_flushes),
            (defaults.max_concurrent_enqueues, defaults.max_concurrent_flushes)
        );
        assert_eq!(parsed.ack_linger, defaults.ack_linger);
        let parsed = batchers(&["--enqueue-concurrency", "3", "--settle-concurrency", "5", "--ack-linger-us", "0"]);
        assert_eq!((parsed.max_concurrent_enqueues, parsed.max_concurrent_flushes), (3, 5));
        assert_eq!(parsed.ack_linger, std::time::Duration::ZERO);
        assert!(Command::try_parse_from(["workbroker", "--database-url", "x", "--settle-concurrency", "0"]).is_err());
    }

    fn serve_args(args: &[&str]) -> ServeArgs {
        Command::try_parse_from(["workbroker", "--database-url", "postgres://127.0.0.1/x"].iter().chain(args))
            .expect("flags parse")
            .serve
    }

    #[test]
    fn the_group_commit_statements_get_one_connection_each_out_of_the_pool() {
        let store = serve_args(&[]).server_config().store;
        assert_eq!((store.max_connections, store.batch_connections), (20, 8));
        let store = serve_args(&["--enqueue-concurrency", "1", "--settle-concurrency", "3", "--max-connections", "30"])
            .server_config()
            .store;
        assert_eq!((store.max_connections, store.batch_connections), (30, 7));
    }

    #[test]
    fn statement_concurrency_beyond_half_the_pool_is_warned_about() {
        assert_eq!(serve_args(&[]).connection_budget_warning(), None);
        assert_eq!(
            serve_args(&["--settle-concurrency", "3", "--max-connections", "20"]).connection_budget_warning(),
            None
        );
        let warning = serve_args(&["--settle-concurrency", "5", "--max-connections", "20"])
            .connection_budget_warning()
            .expect("14 statements against 20 connections");
        assert!(warning.contains("allow 14 statements") && warning.contains("--max-connections 20"), "{warning}");
    }
}
