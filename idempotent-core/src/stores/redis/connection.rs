//! The connection commands go over, and sending a command on it within the store's deadline,
//! through the passing failures a deployment has (a lost script cache, a failover).

use std::sync::RwLock;
use std::time::Instant;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{ErrorKind, RedisError, ServerErrorKind, Value};

use super::RedisStore;
use super::error::{is_demoted, unavailable};
use crate::error::StoreError;

/// The connection commands go over: a `ConnectionManager`, which reconnects by itself when the
/// connection breaks, replaced by a new one when the server it reaches answers but can no
/// longer serve (see `RedisStore::send`). The generation tells a replacement asked for by many
/// calls that met the same failure apart from a later one: one new connection per failure.
pub(super) struct Connection {
    client: redis::Client,
    config: ConnectionManagerConfig,
    current: RwLock<(u64, ConnectionManager)>,
}

impl Connection {
    pub(super) fn new(
        client: redis::Client,
        config: ConnectionManagerConfig,
    ) -> Result<Self, StoreError> {
        let manager = ConnectionManager::new_lazy_with_config(client.clone(), config.clone())
            .map_err(|error| unavailable("could not set up the Redis connection", error))?;
        Ok(Self {
            client,
            config,
            current: RwLock::new((0, manager)),
        })
    }

    pub(super) fn current(&self) -> (u64, ConnectionManager) {
        let current = self
            .current
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        (current.0, current.1.clone())
    }

    /// A new connection in place of generation `seen`, unless that was replaced already; the
    /// current one either way. The old one closes once its last command has its answer.
    pub(super) fn replace(&self, seen: u64) -> (u64, ConnectionManager) {
        let mut current = self
            .current
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if current.0 == seen
            && let Ok(manager) =
                ConnectionManager::new_lazy_with_config(self.client.clone(), self.config.clone())
        {
            *current = (seen + 1, manager);
        }
        (current.0, current.1.clone())
    }
}

impl RedisStore {
    /// Sends `command` (running `script` if the command is its `EVALSHA`) within the store's
    /// deadline, the connect timeout plus the response timeout.
    ///
    /// The common path needs no timer of its own: it makes at most one connection attempt and
    /// sends one command, each bounded by its timeout. A server that has lost its script cache
    /// (a restart, a failover, `SCRIPT FLUSH`) answers `NOSCRIPT`: the script is loaded and run
    /// again. A server that answers `READONLY` was demoted to a replica (a failover) but keeps
    /// its clients' connections: the command is sent once more on a new connection, which
    /// reaches whatever server the address leads to now; nothing was written by the first
    /// attempt (a script stops at its first write, and an error there aborts it). These second
    /// tries run within what is left of the deadline. A response timeout drops the connection,
    /// so that the next call connects afresh rather than queue behind a host that may never
    /// answer again.
    pub(super) async fn send(
        &self,
        command: &redis::Cmd,
        script: Option<&redis::Script>,
    ) -> Result<Value, RedisError> {
        let started = Instant::now();
        let (mut generation, mut manager) = self.connection.current();
        let mut error = match command.query_async::<Value>(&mut manager).await {
            Err(error) => error,
            answer => return answer,
        };
        let again = async {
            let (mut loaded, mut replaced) = (false, false);
            loop {
                if error.kind() == ErrorKind::Server(ServerErrorKind::NoScript)
                    && !loaded
                    && let Some(script) = script
                {
                    loaded = true;
                    if let Err(load) = script.load_async(&mut manager).await {
                        error = load;
                        continue;
                    }
                } else if is_demoted(&error) && !replaced {
                    replaced = true;
                    // The server now reached may lack the scripts.
                    loaded = false;
                    (generation, manager) = self.connection.replace(generation);
                } else {
                    if error.is_timeout() {
                        self.connection.replace(generation);
                    }
                    return Err(error);
                }
                match command.query_async::<Value>(&mut manager).await {
                    Err(next) => error = next,
                    answer => return answer,
                }
            }
        };
        let left = self.deadline.saturating_sub(started.elapsed());
        match tokio::time::timeout(left, again).await {
            Ok(result) => result,
            Err(_) => {
                // A connection that took all of the deadline is as good as black-holed.
                self.connection.replace(generation);
                Err(RedisError::from(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!(
                        "no answer within {:?} (the connect timeout plus the response timeout)",
                        self.deadline
                    ),
                )))
            }
        }
    }
}
