//! A small pool of connections, used on Tokio's blocking threads.
//!
//! Connections are opened lazily and put back after use. At most `max_connections` are in use
//! at once, and at most one of them writes: SQLite lets one writer at a time into a database
//! anyway, and queueing this store's writers here (fairly, without sleeping) leaves SQLite's
//! busy handler to arbitrate only between processes. The time an operation spends queued
//! counts against the busy timeout.

use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use rusqlite::{Connection, ErrorCode};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::schema::{self, ConnectionSettings};
use crate::error::StoreError;

pub(super) struct Pool {
    path: PathBuf,
    settings: ConnectionSettings,
    idle: Mutex<Vec<Connection>>,
    connections: Arc<Semaphore>,
    writer: Arc<Semaphore>,
}

/// Whether an operation writes (and so queues behind this store's other writers).
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Access {
    Read,
    Write,
}

impl Pool {
    pub(super) fn new(
        path: PathBuf,
        settings: ConnectionSettings,
        first: Connection,
        max_connections: usize,
    ) -> Self {
        Self {
            path,
            settings,
            idle: Mutex::new(vec![first]),
            connections: Arc::new(Semaphore::new(max_connections)),
            writer: Arc::new(Semaphore::new(1)),
        }
    }

    pub(super) fn path(&self) -> &std::path::Path {
        &self.path
    }

    pub(super) fn busy_timeout(&self) -> Duration {
        self.settings.busy_timeout
    }

    pub(super) fn synchronous(&self) -> super::Synchronous {
        self.settings.synchronous
    }

    fn idle(&self) -> MutexGuard<'_, Vec<Connection>> {
        // Pushing or popping a connection cannot be torn by a panic.
        self.idle
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Runs `op` on a connection on a blocking thread, within the busy timeout.
    pub(super) async fn run<T, F>(self: &Arc<Self>, access: Access, op: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&mut Connection) -> Result<T, StoreError> + Send + 'static,
    {
        let started = Instant::now();
        let busy_timeout = self.busy_timeout();
        let permits = tokio::time::timeout(busy_timeout, async {
            let writer = match access {
                Access::Write => Some(Arc::clone(&self.writer).acquire_owned().await),
                Access::Read => None,
            };
            let connection = Arc::clone(&self.connections).acquire_owned().await;
            (writer, connection)
        })
        .await;
        let permits: Permits = match permits {
            Ok((Some(Ok(writer)), Ok(connection))) => (Some(writer), connection),
            Ok((None, Ok(connection))) => (None, connection),
            Ok(_) => unreachable!("the pool's semaphores are never closed"),
            Err(_) => {
                return Err(busy(
                    busy_timeout,
                    "queued behind this store's other operations",
                ));
            }
        };
        let pool = Arc::clone(self);
        let joined = tokio::task::spawn_blocking(move || {
            // Held until the operation ends, even if the caller stops waiting for it.
            let _permits = permits;
            let mut connection = match pool.idle().pop() {
                Some(connection) => connection,
                None => schema::open(&pool.path, pool.settings)?,
            };
            let left = busy_timeout.saturating_sub(started.elapsed());
            let result = connection
                .busy_timeout(left)
                .map_err(|error| from_sqlite("could not set the busy timeout", error, busy_timeout))
                .and_then(|()| op(&mut connection));
            // A connection left inside a transaction (a failed rollback) is not reused.
            if connection.is_autocommit() {
                pool.idle().push(connection);
            }
            result
        })
        .await;
        match joined {
            Ok(result) => result,
            Err(error) => Err(StoreError::Backend {
                message: format!("a SQLite store operation did not finish: {error}"),
                source: Some(Box::new(error)),
            }),
        }
    }
}

type Permits = (Option<OwnedSemaphorePermit>, OwnedSemaphorePermit);

fn busy(busy_timeout: Duration, why: &str) -> StoreError {
    StoreError::Unavailable {
        message: format!(
            "the SQLite database stayed busy for longer than the busy timeout ({busy_timeout:?}): {why}; raise busy_timeout or shorten the other writers' transactions"
        ),
        source: None,
    }
}

/// A rusqlite error as a store error: a database still locked after the busy timeout, or one
/// that cannot be opened, is `Unavailable`; the rest is `Backend`.
pub(super) fn from_sqlite(
    context: &str,
    error: rusqlite::Error,
    busy_timeout: Duration,
) -> StoreError {
    match error.sqlite_error_code() {
        Some(ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked) => StoreError::Unavailable {
            message: format!(
                "{context}: the SQLite database stayed locked by another connection for longer than the busy timeout ({busy_timeout:?}); raise busy_timeout or shorten the other writers' transactions"
            ),
            source: Some(Box::new(error)),
        },
        Some(ErrorCode::CannotOpen) => StoreError::Unavailable {
            message: format!("{context}: {error}"),
            source: Some(Box::new(error)),
        },
        _ => StoreError::Backend {
            message: format!("{context}: {error}"),
            source: Some(Box::new(error)),
        },
    }
}
