//! Wires every part of a broker together and runs it until shutdown.
//!
//! Shutdown order: stop handing out jobs, let in-flight acks land (up to the
//! grace period), release whatever is still leased, stop the gRPC server,
//! stop the background loops (batchers flush what they hold), stop the admin
//! HTTP listener (it answers `/metrics` and `/readyz` = 503 during the drain),
//! close the pool. `main` flushes telemetry last.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::transport::server::TcpIncoming;
use workbroker_api::v1::admin_server::AdminServer;
use workbroker_api::v1::broker_server::BrokerServer;

use crate::admin::metrics::{self, Metrics, MetricsRefresher};
use crate::admin::{AdminListener, RecentErrors};
use crate::coordination::chores::LeaderChores;
use crate::coordination::etcd::EtcdConfig;
use crate::coordination::lease::KeepAliveFreeze;
use crate::coordination::{ClusterView, EtcdCoordination, MemberInfo};
use crate::dispatch::Dispatcher;
use crate::dispatch::listener::NotificationListener;
use crate::reaper::ReaperConfig;
use crate::service::validate::Limits;
use crate::service::{AdminService, BatcherSettings, Batchers, BrokerService, Shared};
use crate::store::{self, KeptConnectionSweeper, Store, StoreConfig};
use crate::vacuum::VacuumConfig;

/// Everything a broker needs to run.
#[derive(Clone, Debug)]
pub struct ServerConfig {
    pub store: StoreConfig,
    /// Apply migrations before serving.
    pub migrate: bool,
    pub limits: Limits,
    /// Largest gRPC message decoded or encoded.
    pub max_message_bytes: usize,
    /// How long shutdown waits for in-flight jobs.
    pub shutdown_grace: Duration,
    pub reaper: ReaperConfig,
    pub vacuum: VacuumConfig,
    pub member_id: String,
    pub advertise_address: Option<String>,
    pub batchers: BatcherSettings,
    pub watch_poll_interval: Duration,
    /// Coordinate through etcd; `None`: run alone and lead yourself.
    pub etcd: Option<EtcdConfig>,
    /// Shard count to set on a database without jobs; `None`: use the stored one.
    pub shard_count: Option<u32>,
    /// Test hook: freezes this replica's etcd keep-alives.
    pub keep_alive_freeze: KeepAliveFreeze,
    /// Address of the admin HTTP listener (health, metrics, status page); `None`: off.
    pub admin_listen: Option<SocketAddr>,
}

/// Why the broker stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Store(#[from] store::Error),
    #[error("gRPC server failed: {0}")]
    Transport(#[from] tonic::transport::Error),
    #[error("reflection service: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    #[error("listener: {0}")]
    Io(#[from] std::io::Error),
    #[error("configuration: {0}")]
    Config(String),
    #[error("cannot listen on {address} (admin HTTP): {source}")]
    AdminListen { address: SocketAddr, source: std::io::Error },
}

/// How often to retry migrations while the database is unreachable at start.
const MIGRATE_RETRIES: u32 = 30;

async fn migrate_with_retry(store: &Store, shutdown: &CancellationToken) -> Result<(), store::Error> {
    let mut attempt = 0;
    loop {
        match store.migrate().await {
            Ok(()) => return Ok(()),
            Err(store::Error::Migration(sqlx::migrate::MigrateError::Execute(sqlx::Error::Io(error))))
                if attempt < MIGRATE_RETRIES =>
            {
                tracing::warn!(%error, "database unreachable; retrying migrations");
            }
            Err(store::Error::Unavailable(error)) if attempt < MIGRATE_RETRIES => {
                tracing::warn!(%error, "database unreachable; retrying migrations");
            }
            Err(error) => return Err(error),
        }
        attempt += 1;
        tokio::select! {
            () = tokio::time::sleep(Duration::from_secs(1)) => {}
            () = shutdown.cancelled() => return Ok(()),
        }
    }
}

/// The shard count in force: `wanted` is applied while the database has no
/// jobs; a database that cannot be read yet falls back to the default.
async fn shard_count(store: &Store, wanted: Option<u32>) -> Result<u32, Error> {
    match wanted {
        Some(wanted) => {
            let in_force = store.settings_shard_count_set(wanted).await?;
            if in_force != wanted {
                return Err(Error::Config(format!(
                    "shard count {wanted} requested but {in_force} is stored and jobs exist; \
                     shard counts change only on an empty database"
                )));
            }
            Ok(in_force)
        }
        None => match store.settings_shard_count().await {
            Ok(count) => Ok(count),
            Err(error) => {
                tracing::warn!(%error, "cannot read the shard count yet; assuming {DEFAULT_SHARD_COUNT}");
                Ok(DEFAULT_SHARD_COUNT)
            }
        },
    }
}

/// Shard count of a fresh database.
const DEFAULT_SHARD_COUNT: u32 = 64;

/// Runs a broker on `listener` until `shutdown` fires, then shuts down in
/// order. Serves the admin HTTP listener on `config.admin_listen` if set.
pub async fn run(config: ServerConfig, listener: TcpListener, shutdown: CancellationToken) -> Result<(), Error> {
    let admin_listener = match config.admin_listen {
        Some(address) => {
            Some(TcpListener::bind(address).await.map_err(|source| Error::AdminListen { address, source })?)
        }
        None => None,
    };
    run_with_admin_listener(config, listener, admin_listener, shutdown).await
}

/// [`run`] with the admin HTTP listener already bound (tests bind
/// `127.0.0.1:0` and read the port first); `config.admin_listen` is ignored.
pub async fn run_with_admin_listener(
    config: ServerConfig,
    listener: TcpListener,
    admin_listener: Option<TcpListener>,
    shutdown: CancellationToken,
) -> Result<(), Error> {
    let local_address = listener.local_addr()?;
    let store = Store::connect_lazy(&config.store)?;
    if config.migrate {
        migrate_with_retry(&store, &shutdown).await?;
        tracing::info!("database migrations applied");
    }

    let shard_count = shard_count(&store, config.shard_count).await?;

    let background = TaskTracker::new();
    let background_stop = CancellationToken::new();
    let metrics = Metrics::new();
    let dispatcher = Dispatcher::with_metrics(store.clone(), metrics.clone());
    background.spawn(NotificationListener::new(store.clone(), dispatcher.clone()).run(background_stop.clone()));
    background.spawn(dispatcher.announcer().run(background_stop.clone()));
    background.spawn(dispatcher.heartbeat().run(background_stop.clone()));
    background.spawn(KeptConnectionSweeper::new(store.clone()).run(background_stop.clone()));
    let batchers = Batchers::start(&store, &dispatcher, config.batchers, &background, &background_stop, &metrics);
    background.spawn(MetricsRefresher::new(store.clone(), metrics.clone()).run(background_stop.clone()));

    let member = MemberInfo {
        member_id: config.member_id.clone(),
        grpc_address: config.advertise_address.clone().unwrap_or_else(|| local_address.to_string()),
        started_at: chrono::Utc::now(),
        version: env!("CARGO_PKG_VERSION").to_owned(),
    };
    let cluster = match &config.etcd {
        None => {
            let view = ClusterView::single_node(member, shard_count);
            background.spawn(
                LeaderChores::new(view.clone(), store.clone(), config.reaper, None)
                    .with_metrics(metrics.clone())
                    .with_vacuum(config.vacuum)
                    .run(background_stop.clone()),
            );
            view
        }
        Some(etcd) => {
            let view = ClusterView::clustered(member, shard_count);
            let coordination = EtcdCoordination {
                config: etcd.clone(),
                view: view.clone(),
                store: store.clone(),
                reaper: config.reaper,
                vacuum: config.vacuum,
                freeze: config.keep_alive_freeze.clone(),
                metrics: metrics.clone(),
            };
            background.spawn(coordination.run(background_stop.clone()));
            view
        }
    };
    dispatcher.follow_owned_shards(cluster.subscribe_owned_shards());
    let shared = Arc::new(Shared {
        store: store.clone(),
        dispatcher: dispatcher.clone(),
        batchers,
        limits: config.limits,
        cluster,
        watch_poll_interval: config.watch_poll_interval,
        metrics,
    });
    metrics::register_opentelemetry(&shared);
    let admin_stop = CancellationToken::new();
    let admin = admin_listener.map(|admin_listener| {
        let admin = AdminListener::new(admin_listener, shared.clone(), RecentErrors::global(), shutdown.clone());
        if let Ok(address) = admin.local_addr() {
            tracing::info!(%address, "admin HTTP listening");
        }
        tokio::spawn(admin.run(admin_stop.clone()))
    });

    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    health_reporter.set_serving::<BrokerServer<BrokerService>>().await;
    health_reporter.set_serving::<AdminServer<AdminService>>().await;
    let reflection_v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(workbroker_api::v1::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    let reflection_v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(workbroker_api::v1::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()?;
    let broker_service = BrokerServer::new(BrokerService::new(shared.clone()))
        .max_decoding_message_size(config.max_message_bytes)
        .max_encoding_message_size(config.max_message_bytes);
    let admin_service = AdminServer::new(AdminService::new(shared.clone()))
        .max_decoding_message_size(config.max_message_bytes)
        .max_encoding_message_size(config.max_message_bytes);

    let server_stop = CancellationToken::new();
    let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
    let server = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(Duration::from_secs(20)))
        .http2_keepalive_timeout(Some(Duration::from_secs(20)))
        .trace_fn(crate::telemetry::rpc_span)
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(broker_service)
        .add_service(admin_service)
        .serve_with_incoming_shutdown(incoming, server_stop.clone().cancelled_owned());
    let mut server = tokio::spawn(server);
    tracing::info!(address = %local_address, member_id = %config.member_id, "broker listening");

    let server_result = tokio::select! {
        () = shutdown.cancelled() => None,
        result = &mut server => Some(result),
    };
    if let Some(result) = server_result {
        // The server stopped on its own: an error.
        background_stop.cancel();
        background.close();
        background.wait().await;
        stop_admin(admin, &admin_stop).await;
        store.close().await;
        return match result {
            Ok(outcome) => outcome.map_err(Error::from),
            Err(join_error) => Err(Error::Io(std::io::Error::other(join_error))),
        };
    }

    tracing::info!(grace = ?config.shutdown_grace, held = dispatcher.held_leases(), "shutting down: draining leases");
    health_reporter.set_not_serving::<BrokerServer<BrokerService>>().await;
    dispatcher.stop_leasing();
    dispatcher.wait_drained(tokio::time::Instant::now() + config.shutdown_grace).await;
    dispatcher.close_all("lease released: broker shutting down").await;
    server_stop.cancel();
    match tokio::time::timeout(Duration::from_secs(5), &mut server).await {
        Ok(Ok(Err(error))) => tracing::warn!(%error, "gRPC server stopped with an error"),
        Ok(_) => {}
        Err(_) => {
            tracing::warn!("gRPC connections still open after shutdown; closing them");
            server.abort();
        }
    }
    background_stop.cancel();
    background.close();
    background.wait().await;
    stop_admin(admin, &admin_stop).await;
    store.close().await;
    tracing::info!("broker stopped");
    Ok(())
}

/// Stops the admin HTTP listener and waits for it.
async fn stop_admin(admin: Option<tokio::task::JoinHandle<()>>, admin_stop: &CancellationToken) {
    admin_stop.cancel();
    if let Some(admin) = admin
        && let Err(error) = admin.await
    {
        tracing::warn!(%error, "admin HTTP listener panicked");
    }
}
