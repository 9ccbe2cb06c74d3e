//! `workbroker`: the broker binary. Parses configuration, sets up logging,
//! and hands over to the library.

use anyhow::Context;
use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;
use workbroker_server::config::{DatabaseArgs, ServeArgs};
use workbroker_server::store::Store;

#[derive(Parser, Debug)]
#[command(
    name = "workbroker",
    version,
    about = "A gRPC work-distribution service on PostgreSQL"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run a broker replica.
    Serve(ServeArgs),
    /// Apply database migrations and exit.
    Migrate(DatabaseArgs),
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("WORKBROKER_LOG")
        .or_else(|_| tracing_subscriber::EnvFilter::try_from_default_env())
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false)
        .init();
}

/// Cancels `shutdown` on SIGTERM or Ctrl-C; a second signal exits at once.
fn spawn_signal_handler(shutdown: CancellationToken) {
    tokio::spawn(async move {
        wait_for_signal().await;
        tracing::info!("shutdown signal received; send another to exit at once");
        shutdown.cancel();
        wait_for_signal().await;
        tracing::warn!("second signal: exiting now");
        std::process::exit(130);
    });
}

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        let mut terminate =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(signal) => signal,
                Err(error) => {
                    tracing::error!(%error, "cannot listen for SIGTERM");
                    let _ = tokio::signal::ctrl_c().await;
                    return;
                }
            };
        tokio::select! {
            _ = terminate.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    init_logging();
    match Cli::parse().command {
        Command::Serve(args) => {
            let config = args.server_config();
            let listener = tokio::net::TcpListener::bind(args.listen)
                .await
                .with_context(|| format!("cannot listen on {}", args.listen))?;
            let shutdown = CancellationToken::new();
            spawn_signal_handler(shutdown.clone());
            workbroker_server::server::run(config, listener, shutdown).await?;
        }
        Command::Migrate(args) => {
            let store = Store::connect_lazy(&args.store_config())?;
            store.migrate().await.context("migrations failed")?;
            println!("migrations applied");
        }
    }
    Ok(())
}
