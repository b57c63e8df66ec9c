//! The connection commands go over, and sending a command on it within the store's deadline,
//! through the passing failures a deployment has (a lost script cache, a failover).

use std::sync::RwLock;
use std::time::{Duration, Instant};

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::cluster::ClusterClient;
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::{Route, RoutingInfo, SingleNodeRoutingInfo, SlotAddr};
use redis::{ErrorKind, RedisError, ServerErrorKind, Value};
use tokio::sync::OnceCell;

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

/// Where the store's commands go: one server (or whatever server its address leads to), or a
/// Redis Cluster.
pub(super) enum Commands {
    Single(Connection),
    Cluster(Cluster),
}

/// The cluster client's connection: one multiplexed connection per node, routed by each
/// command's key, following `MOVED` and `ASK` and the cluster's failovers by itself. Made on
/// first use (the store's builder does not connect), and again after a failed attempt.
pub(super) struct Cluster {
    client: ClusterClient,
    /// The connect timeout plus the response timeout.
    setup_timeout: Duration,
    connection: OnceCell<ClusterConnection>,
}

impl Cluster {
    pub(super) fn new(client: ClusterClient, setup_timeout: Duration) -> Self {
        Self {
            client,
            setup_timeout,
            connection: OnceCell::new(),
        }
    }

    /// The connection, made now if it is not yet: the cluster client reaches one of the nodes
    /// it was given, reads the slot map and connects to every node in it, each within the
    /// connect and response timeouts (a node that does not answer is left out, and tried
    /// again when a command needs it), so the whole may take their sum.
    pub(super) async fn connection(&self) -> Result<ClusterConnection, RedisError> {
        self.connection
            .get_or_try_init(|| async {
                match tokio::time::timeout(self.setup_timeout, self.client.get_async_connection())
                .await
                {
                    Ok(connection) => connection,
                    Err(_) => Err(RedisError::from(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        format!(
                            "the Redis Cluster's nodes did not answer within the connect timeout plus the response timeout ({:?})",
                            self.setup_timeout
                        ),
                    ))),
                }
            })
            .await
            .cloned()
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
        match &*self.commands {
            Commands::Single(connection) => self.send_single(connection, command, script).await,
            Commands::Cluster(cluster) => self.send_cluster(cluster, command, script).await,
        }
    }

    /// [`send`](Self::send) to a Redis Cluster. The cluster client follows redirections and
    /// failovers by itself (retrying within the deadline); a node that has not loaded the
    /// script answers `NOSCRIPT`, and the script is loaded (on every primary) and run again.
    async fn send_cluster(
        &self,
        cluster: &Cluster,
        command: &redis::Cmd,
        script: Option<&redis::Script>,
    ) -> Result<Value, RedisError> {
        let send = async {
            let mut connection = cluster.connection().await?;
            match command.query_async::<Value>(&mut connection).await {
                Err(error)
                    if error.kind() == ErrorKind::Server(ServerErrorKind::NoScript)
                        && let Some(script) = script =>
                {
                    script.load_async(&mut connection).await?;
                    command.query_async::<Value>(&mut connection).await
                }
                answer => answer,
            }
        };
        match tokio::time::timeout(self.deadline, send).await {
            Ok(answer) => answer,
            Err(_) => Err(past_deadline(self.deadline)),
        }
    }

    async fn send_single(
        &self,
        connection: &Connection,
        command: &redis::Cmd,
        script: Option<&redis::Script>,
    ) -> Result<Value, RedisError> {
        let started = Instant::now();
        let (mut generation, mut manager) = connection.current();
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
                    (generation, manager) = connection.replace(generation);
                } else {
                    if error.is_timeout() {
                        connection.replace(generation);
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
                connection.replace(generation);
                Err(past_deadline(self.deadline))
            }
        }
    }
}

impl RedisStore {
    /// `WAIT replicas timeout` on the connection that wrote `record_key` (on a cluster, the
    /// primary of its slot): how many replicas acknowledged every write made on it so far.
    pub(super) async fn replicas_acknowledging(
        &self,
        record_key: &str,
        replicas: u32,
        timeout: Duration,
    ) -> Result<u32, RedisError> {
        let mut command = redis::cmd("WAIT");
        command.arg(replicas).arg(
            u64::try_from(timeout.as_millis())
                .unwrap_or(u64::MAX)
                .max(1),
        );
        let answer = match &*self.commands {
            Commands::Single(connection) => self.send_single(connection, &command, None).await,
            Commands::Cluster(cluster) => {
                let route = RoutingInfo::SingleNode(SingleNodeRoutingInfo::SpecificNode(
                    Route::new(slot(record_key.as_bytes()), SlotAddr::Master),
                ));
                let send = async {
                    cluster
                        .connection()
                        .await?
                        .route_command(command, route)
                        .await
                };
                match tokio::time::timeout(self.deadline, send).await {
                    Ok(answer) => answer,
                    Err(_) => Err(past_deadline(self.deadline)),
                }
            }
        }?;
        match answer {
            Value::Int(acknowledged) => Ok(u32::try_from(acknowledged).unwrap_or(0)),
            other => Err(RedisError::from((
                ErrorKind::UnexpectedReturnType,
                "WAIT answered something other than a number",
                format!("{other:?}"),
            ))),
        }
    }
}

/// The Redis Cluster slot of `key`: CRC16 (XMODEM) of its hash tag (the part between the
/// first `{` and the next `}`, if not empty) or of the whole key, modulo 16384.
pub(super) fn slot(key: &[u8]) -> u16 {
    let hashed = key
        .iter()
        .position(|&byte| byte == b'{')
        .and_then(|open| {
            let rest = &key[open + 1..];
            let close = rest.iter().position(|&byte| byte == b'}')?;
            (close > 0).then(|| &rest[..close])
        })
        .unwrap_or(key);
    let mut crc: u16 = 0;
    for &byte in hashed {
        crc ^= u16::from(byte) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc % 16384
}

pub(super) fn past_deadline(deadline: Duration) -> RedisError {
    RedisError::from(std::io::Error::new(
        std::io::ErrorKind::TimedOut,
        format!("no answer within {deadline:?} (the connect timeout plus the response timeout)"),
    ))
}

#[cfg(test)]
mod tests {
    use super::slot;

    #[test]
    fn slots_are_redis_cluster_s() {
        // Values from Redis's CLUSTER KEYSLOT.
        assert_eq!(slot(b"foo"), 12182);
        assert_eq!(slot(b"bar"), 5061);
        assert_eq!(slot(b"{user1000}.following"), slot(b"user1000"));
        assert_eq!(slot(b"idempotent:{abc}"), slot(b"idempotent:done:{abc}"));
        // An empty tag hashes the whole key.
        assert_eq!(slot(b"{}x"), 10595);
    }
}
