//! Connections kept out of their pool between the hot path's statements.
//!
//! sqlx's pool makes two empty round trips to PostgreSQL around every
//! statement it lends a connection to: a ping when the connection comes back
//! (always) and another when it is lent again (`test_before_acquire`). A
//! lease, ack or enqueue statement thus took three round trips, and the two
//! empty ones cost the broker and the backend CPU and the caller latency.
//!
//! A [`WarmPool`] keeps connections checked out of their pool between
//! statements: [`WarmPool::run`] runs a statement on the one used last (its
//! backend is warm) and keeps it again when the statement ended cleanly. What the pings
//! guarded against is kept where it matters:
//!
//! - a connection whose statement failed other than with an ordinary
//!   database error (I/O, protocol, decoding, a terminated backend), or
//!   whose statement was cancelled (the guard dropped before
//!   [`WarmConnection::settle`]), goes back to the pool, which pings it and
//!   closes it when it is broken;
//! - a connection idle for [`PING_AFTER_IDLE`] or longer is pinged before
//!   use, as pgx's pool does, so that the first statement after a quiet
//!   spell or a database restart does not fail on a dead connection, and
//!   the [`KeptConnectionSweeper`] gives such connections back to the pool
//!   (keeping them saves nothing once they need a ping, and in the pool
//!   they serve its other users and its idle limit closes them);
//! - a connection goes back to the pool after [`RETURN_AFTER`] out of it,
//!   so that the pool's lifetime and idle limits still apply to it;
//! - a connection goes back to the pool, not to the kept ones, when the
//!   pool is at its limit with no idle connection: someone may be waiting
//!   in the pool (another statement of the same pool, a listener
//!   reconnecting), and the pool serves its waiters in turn. Kept
//!   connections never starve the pool's other users.

use std::fmt;
use std::ops::{Deref, DerefMut};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use sqlx::pool::PoolConnection;
use sqlx::{Connection, PgConnection, PgPool, Postgres};

/// Idle time after which a kept connection is pinged before use.
pub const PING_AFTER_IDLE: Duration = Duration::from_secs(1);

/// Time out of the pool after which a connection goes back to it.
pub const RETURN_AFTER: Duration = Duration::from_secs(60);

/// A pool and the connections kept out of it (see the module docs).
pub struct WarmPool {
    pool: PgPool,
    kept: Mutex<Vec<Kept>>,
}

struct Kept {
    connection: PoolConnection<Postgres>,
    /// When it was taken out of the pool.
    taken: Instant,
    /// When its last statement ended.
    idle_since: Instant,
}

impl fmt::Debug for WarmPool {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.debug_struct("WarmPool").field("pool", &self.pool).field("kept", &self.kept_count()).finish()
    }
}

impl WarmPool {
    pub fn new(pool: PgPool) -> Self {
        Self { pool, kept: Mutex::new(Vec::new()) }
    }

    /// The pool behind.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// Connections kept idle out of the pool.
    pub fn kept_count(&self) -> usize {
        self.kept().len()
    }

    fn kept(&self) -> MutexGuard<'_, Vec<Kept>> {
        self.kept.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The connection used last, pinged first if it was idle for
    /// [`PING_AFTER_IDLE`]; a connection from the pool when none is kept.
    async fn acquire(&self) -> sqlx::Result<WarmConnection<'_>> {
        loop {
            let Some(kept) = self.kept().pop() else { break };
            let mut connection =
                WarmConnection { home: self, connection: Some(kept.connection), taken: kept.taken, reusable: false };
            if kept.idle_since.elapsed() < PING_AFTER_IDLE {
                return Ok(connection);
            }
            match connection.ping().await {
                Ok(()) => return Ok(connection),
                Err(error) => tracing::info!(%error, "a kept database connection failed its ping; closing it"),
            }
        }
        let connection = self.pool.acquire().await?;
        Ok(WarmConnection { home: self, connection: Some(connection), taken: Instant::now(), reusable: false })
    }

    /// Runs `statement` on a connection from [`WarmPool::acquire`], kept
    /// for the next statement if it ended cleanly (see
    /// [`WarmConnection::settle`]).
    pub async fn run<T>(&self, statement: impl AsyncFnOnce(&mut PgConnection) -> sqlx::Result<T>) -> sqlx::Result<T> {
        let mut connection = self.acquire().await?;
        let result = statement(&mut connection).await;
        connection.settle(result)
    }

    /// Gives the connections kept idle for [`PING_AFTER_IDLE`] or longer
    /// back to the pool.
    pub fn return_idle(&self) {
        let stale: Vec<Kept> = {
            let mut kept = self.kept();
            let (stale, fresh) =
                std::mem::take(&mut *kept).into_iter().partition(|kept| kept.idle_since.elapsed() >= PING_AFTER_IDLE);
            *kept = fresh;
            stale
        };
        drop(stale);
    }

    /// True when the pool is at its limit and has no idle connection, so
    /// that an `acquire` on it may be waiting.
    fn pool_may_have_waiters(&self) -> bool {
        self.pool.size() >= self.pool.options().get_max_connections() && self.pool.num_idle() == 0
    }

    /// Marks the pool closed and gives every kept connection back to it,
    /// so that `close` finds them all; connections in use then go back to
    /// the pool too.
    pub async fn close(&self) {
        let closing = self.pool.close();
        drop(std::mem::take(&mut *self.kept()));
        closing.await;
    }
}

impl Drop for WarmPool {
    fn drop(&mut self) {
        // Giving a connection back to the pool spawns a task; without a
        // runtime (the store dropped after it) close the connections here.
        if tokio::runtime::Handle::try_current().is_err() {
            for kept in std::mem::take(&mut *self.kept()) {
                drop(kept.connection.detach());
            }
        }
    }
}

/// How often the [`KeptConnectionSweeper`] looks for idle kept connections.
const SWEEP_INTERVAL: Duration = Duration::from_millis(500);

/// The loop that gives kept connections idle for [`PING_AFTER_IDLE`] back
/// to their pool (see [`super::Store::return_idle_connections`]).
pub struct KeptConnectionSweeper {
    store: super::Store,
}

impl KeptConnectionSweeper {
    pub fn new(store: super::Store) -> Self {
        Self { store }
    }

    pub async fn run(self, shutdown: tokio_util::sync::CancellationToken) {
        let mut ticks = tokio::time::interval(SWEEP_INTERVAL);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = ticks.tick() => self.store.return_idle_connections(),
                () = shutdown.cancelled() => return,
            }
        }
    }
}

/// A connection lent by a [`WarmPool`]. It is kept for the next statement
/// only once [`WarmConnection::settle`] saw its statement end cleanly;
/// dropped otherwise, it goes back to the pool.
pub struct WarmConnection<'a> {
    home: &'a WarmPool,
    connection: Option<PoolConnection<Postgres>>,
    taken: Instant,
    reusable: bool,
}

impl WarmConnection<'_> {
    /// Takes the result of the statement run on this connection: the
    /// connection is kept for the next one when the statement succeeded or
    /// failed with an error that leaves the connection sound.
    fn settle<T>(mut self, result: sqlx::Result<T>) -> sqlx::Result<T> {
        self.reusable = match &result {
            Ok(_) => true,
            Err(error) => leaves_connection_sound(error),
        };
        result
    }
}

/// Whether the connection a statement failed on can run the next one: the
/// database refused the statement and said so (the connection then reads
/// up to the end of the statement's answer), and did not end the session.
fn leaves_connection_sound(error: &sqlx::Error) -> bool {
    match error {
        sqlx::Error::Database(database_error) => {
            let code = database_error.code().unwrap_or_default();
            // connection_exception class, operator_intervention (a
            // terminated backend or a shutdown), too_many_connections.
            !(code.starts_with("08") || code.starts_with("57") || code == "53300")
        }
        _ => false,
    }
}

impl Deref for WarmConnection<'_> {
    type Target = PgConnection;

    fn deref(&self) -> &PgConnection {
        // Present from construction until drop.
        self.connection.as_deref().unwrap_or_else(|| unreachable!("a warm connection is present until dropped"))
    }
}

impl DerefMut for WarmConnection<'_> {
    fn deref_mut(&mut self) -> &mut PgConnection {
        self.connection.as_deref_mut().unwrap_or_else(|| unreachable!("a warm connection is present until dropped"))
    }
}

impl Drop for WarmConnection<'_> {
    fn drop(&mut self) {
        let Some(connection) = self.connection.take() else { return };
        if !self.reusable || self.taken.elapsed() >= RETURN_AFTER || self.home.pool_may_have_waiters() {
            return;
        }
        let mut kept = self.home.kept();
        // Checked under the lock `close` drains under: a connection kept
        // after the drain would keep the pool's `close` waiting.
        if self.home.pool.is_closed() {
            drop(kept);
            return;
        }
        kept.push(Kept { connection, taken: self.taken, idle_since: Instant::now() });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_database_errors_that_keep_the_session_keep_the_connection() {
        assert!(!leaves_connection_sound(&sqlx::Error::Io(std::io::Error::other("reset"))));
        assert!(!leaves_connection_sound(&sqlx::Error::Protocol("unexpected message".to_owned())));
        assert!(!leaves_connection_sound(&sqlx::Error::RowNotFound));
        assert!(!leaves_connection_sound(&sqlx::Error::PoolTimedOut));
    }
}
