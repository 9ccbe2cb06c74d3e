//! `workbroker`: the broker binary. Parses configuration, sets up logging,
//! and hands over to the library: `serve` and `migrate` run the broker, the
//! client subcommands (`enqueue`, `stats`, `jobs`, ...) are
//! [`workbroker_server::cli`].

use std::io::Write;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;
use workbroker_server::config::{DatabaseArgs, ServeArgs};
use workbroker_server::store::Store;

#[derive(Parser, Debug)]
#[command(name = "workbroker", version, about = "A gRPC work-distribution service on PostgreSQL")]
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
    #[command(flatten)]
    Client(workbroker_server::cli::Command),
}

/// Logs to stderr (filtered by `WORKBROKER_LOG` or `RUST_LOG`), keeps recent
/// warnings for the status page, and exports traces and metrics over OTLP
/// when `OTEL_EXPORTER_OTLP_ENDPOINT` is set. Flush the guard on exit.
fn init_logging() -> anyhow::Result<workbroker_server::telemetry::TelemetryGuard> {
    let filter = tracing_subscriber::EnvFilter::try_from_env("WORKBROKER_LOG")
        .or_else(|_| tracing_subscriber::EnvFilter::try_from_default_env())
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    workbroker_server::telemetry::init(filter).context("cannot set up logging and telemetry")
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
        let mut terminate = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
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

fn main() -> ExitCode {
    let command = Cli::parse().command;
    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    if let Command::Serve(ServeArgs { runtime_threads: Some(threads), .. }) = &command {
        runtime.worker_threads(usize::from(*threads));
    }
    let runtime = match runtime.enable_all().build() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("error: cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async {
        match command {
            Command::Client(command) => run_client(command).await,
            Command::Serve(args) => report(serve(args).await),
            Command::Migrate(args) => report(migrate(args).await),
        }
    })
}

/// Runs a client subcommand; on failure prints `error: <one line>` to stderr.
async fn run_client(command: workbroker_server::cli::Command) -> ExitCode {
    let mut stdout = std::io::stdout();
    let result = workbroker_server::cli::execute(command, &mut std::io::stdin(), &mut stdout).await;
    let _ = stdout.flush();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {}", error.one_line());
            ExitCode::FAILURE
        }
    }
}

fn report(result: anyhow::Result<()>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let telemetry = init_logging()?;
    if let Some(warning) = args.connection_budget_warning() {
        tracing::warn!("{warning}");
    }
    let config = args.server_config();
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    let shutdown = CancellationToken::new();
    spawn_signal_handler(shutdown.clone());
    let result = workbroker_server::server::run(config, listener, shutdown).await;
    telemetry.shutdown().await;
    result?;
    Ok(())
}

async fn migrate(args: DatabaseArgs) -> anyhow::Result<()> {
    let _telemetry = init_logging()?;
    let store = Store::connect_lazy(&args.store_config())?;
    store.migrate().await.context("migrations failed")?;
    println!("migrations applied");
    Ok(())
}
