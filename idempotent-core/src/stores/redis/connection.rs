//! The connection commands go over, and sending a command on it within the store's deadline,
//! through the passing failures a deployment has (a lost script cache, a failover).

use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use redis::aio::MultiplexedConnection;
use redis::cluster::ClusterClient;
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::{Route, RoutingInfo, SingleNodeRoutingInfo, SlotAddr};
use redis::{AsyncConnectionConfig, ErrorKind, RedisError, ServerErrorKind, Value};
use tokio::sync::OnceCell;

use super::RedisStore;
use super::error::is_demoted;

/// The connection commands go over: one multiplexed connection, made on first use, and made
/// again after it broke (an I/O error, a closed socket, a response timeout) or after the
/// server it reaches answered but can no longer serve (see `RedisStore::send`). Each
/// connection is a generation: many calls that met the same failure replace it once.
///
/// Commands go straight to the redis crate's `MultiplexedConnection` (its inherent
/// `send_packed_command`, which boxes no future), not through its `ConnectionManager`: a
/// replay is one command, and the manager's shared connection future and boxed call were
/// 3.4% of a 64-task replay's client samples (BENCHMARKS.md, "Where replay-64 goes").
pub(super) struct Connection {
    client: redis::Client,
    config: AsyncConnectionConfig,
    current: RwLock<Arc<Generation>>,
}

/// One connection of [`Connection`], made by the first call that needs it; a failed attempt
/// leaves it unmade, for the next call to try again (one connection attempt per call, no
/// backoff: the caller's retry policy decides how long to keep trying).
struct Generation {
    number: u64,
    connection: OnceCell<MultiplexedConnection>,
}

impl Generation {
    fn new(number: u64) -> Arc<Self> {
        Arc::new(Self {
            number,
            connection: OnceCell::new(),
        })
    }
}

impl Connection {
    pub(super) fn new(
        client: redis::Client,
        connect_timeout: Duration,
        response_timeout: Duration,
    ) -> Self {
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(connect_timeout))
            .set_response_timeout(Some(response_timeout));
        Self {
            client,
            config,
            current: RwLock::new(Generation::new(0)),
        }
    }

    fn generation(&self) -> Arc<Generation> {
        Arc::clone(
            &self
                .current
                .read()
                .unwrap_or_else(|poisoned| poisoned.into_inner()),
        )
    }

    /// The current connection and its generation, connecting now if it is not made yet.
    pub(super) async fn current(&self) -> Result<(u64, MultiplexedConnection), RedisError> {
        // The common case under the read lock only: the connection is made, and cloned
        // without touching the generation's reference count.
        {
            let current = self
                .current
                .read()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            if let Some(connection) = current.connection.get() {
                return Ok((current.number, connection.clone()));
            }
        }
        let generation = self.generation();
        // Boxed: connecting is rare, and its future is larger than a command's; inline, it
        // would make every command's future that much larger.
        let connection = Box::pin(generation.connection.get_or_try_init(|| {
            self.client
                .get_multiplexed_async_connection_with_config(&self.config)
        }))
        .await?
        .clone();
        Ok((generation.number, connection))
    }

    /// Sends `command` on the current connection, and replaces the connection if the command
    /// found it broken (the next command connects afresh).
    pub(super) async fn send(&self, command: &redis::Cmd) -> (u64, Result<Value, RedisError>) {
        let (generation, mut connection) = match self.current().await {
            Ok(current) => current,
            Err(error) => return (self.generation().number, Err(error)),
        };
        let answer = connection.send_packed_command(command).await;
        if let Err(error) = &answer
            && error.is_unrecoverable_error()
        {
            self.replace(generation);
        }
        // An error the server answered is the command's error, as `Cmd::query_async` has it.
        (generation, answer.and_then(Value::extract_error))
    }

    /// Sends `pipeline` as [`send`](Self::send) sends a command.
    pub(super) async fn send_pipeline(
        &self,
        pipeline: &redis::Pipeline,
    ) -> (u64, Result<Vec<Value>, RedisError>) {
        let (generation, mut connection) = match self.current().await {
            Ok(current) => current,
            Err(error) => return (self.generation().number, Err(error)),
        };
        let answer = pipeline.query_async(&mut connection).await;
        if let Err(error) = &answer
            && error.is_unrecoverable_error()
        {
            self.replace(generation);
        }
        (generation, answer)
    }

    /// A new connection in place of generation `seen`, unless that was replaced already. The
    /// old one closes once its last command has its answer.
    pub(super) fn replace(&self, seen: u64) {
        let mut current = self
            .current
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if current.number == seen {
            *current = Generation::new(seen + 1);
        }
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
        let (mut generation, mut error) = match connection.send(command).await {
            (generation, Err(error)) => (generation, error),
            (_, answer) => return answer,
        };
        let again = async {
            let (mut loaded, mut replaced) = (false, false);
            loop {
                if error.kind() == ErrorKind::Server(ServerErrorKind::NoScript)
                    && !loaded
                    && let Some(script) = script
                {
                    loaded = true;
                    let load = match connection.current().await {
                        Ok((_, mut current)) => script.load_async(&mut current).await.map(drop),
                        Err(error) => Err(error),
                    };
                    if let Err(load) = load {
                        error = load;
                        continue;
                    }
                } else if is_demoted(&error) && !replaced {
                    replaced = true;
                    // The server now reached may lack the scripts.
                    loaded = false;
                    connection.replace(generation);
                } else {
                    if error.is_timeout() {
                        connection.replace(generation);
                    }
                    return Err(error);
                }
                match connection.send(command).await {
                    (next, Err(next_error)) => (generation, error) = (next, next_error),
                    (_, answer) => return answer,
                }
            }
        };
        let left = self.deadline.saturating_sub(started.elapsed());
        // Boxed, as the retries are rare: see `Connection::current`.
        match Box::pin(tokio::time::timeout(left, again)).await {
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
