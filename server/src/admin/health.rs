//! Liveness and readiness.
//!
//! - `/healthz`: the process runs and answers HTTP: `200 ok`. It checks
//!   nothing else, so a database outage never gets every replica restarted.
//! - `/readyz`: this replica can do useful work: the database answers and
//!   every embedded migration is applied, and the broker is not shutting
//!   down. Otherwise `503` with the reason on one line.

use std::time::Duration;

use crate::store::Store;

/// Longest a readiness check waits for the database.
const READINESS_TIMEOUT: Duration = Duration::from_secs(2);

/// The outcome of a check: ready, or why not.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Readiness {
    Ready,
    NotReady(String),
}

/// Checks the database and the migrations.
pub async fn readiness(store: &Store, shutting_down: bool) -> Readiness {
    if shutting_down {
        return Readiness::NotReady("shutting down".to_owned());
    }
    let check = async {
        if let Err(error) = store.ping().await {
            return Readiness::NotReady(format!("database unreachable: {error}"));
        }
        match store.migrations_current().await {
            Ok(true) => Readiness::Ready,
            Ok(false) => Readiness::NotReady("database migrations are not current".to_owned()),
            Err(error) => Readiness::NotReady(format!("cannot read the migration state: {error}")),
        }
    };
    match tokio::time::timeout(READINESS_TIMEOUT, check).await {
        Ok(readiness) => readiness,
        Err(_) => Readiness::NotReady(format!("database did not answer within {READINESS_TIMEOUT:?}")),
    }
}
