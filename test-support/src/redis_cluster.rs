//! [`RedisCluster`]: a real Redis Cluster of three primaries and three replicas for one test.
//!
//! # How it is made
//! Six [`RedisServer`]s, each `redis-server --cluster-enabled yes` on a free 127.0.0.1 port in
//! its own temporary folder (with its own watchdog), joined by `redis-cli --cluster create ...
//! --cluster-replicas 1 --cluster-yes`. `redis-cli` is looked for beside the `redis-server` that
//! runs (see [`crate::REDIS_SERVER_ENV`]), then on `PATH`.
//!
//! # What makes failovers fast and deterministic
//! - `--cluster-node-timeout 1000` ([`RedisCluster::NODE_TIMEOUT`]): a primary that answers no
//!   ping for 1 s is suspected, and failed once a majority of primaries agree; its replica then
//!   waits 0.5–1 s and is elected. A failover takes about 2–3 s. Shorter timeouts would make a
//!   process that a loaded 2-core machine leaves unscheduled for a moment look dead (a failover
//!   nobody asked for); longer ones only make the tests slower.
//! - `--cluster-replica-validity-factor 0`: a replica always stands for election, however long
//!   it was cut off from its primary (also after [`RedisCluster::pause`]).
//! - `--cluster-allow-replica-migration no`: a replica never moves to a primary left without one,
//!   so the pairs stay as [`RedisCluster::start`] found them.
//! - `--repl-diskless-sync-delay 0`: a replica's full sync starts at once (the default waits 5 s
//!   for more replicas), at the start and when a node comes back.
//! - `--cluster-port`: a free port of its own for each node's cluster bus (the default, port +
//!   10000, may be past 65535 for a port from the ephemeral range).
//! - `--cluster-announce-ip 127.0.0.1`: every node announces 127.0.0.1, the address clients
//!   are redirected to.
//!
//! `cluster-require-full-coverage` keeps its default (`yes`), as in production: while a
//! primary is down and not yet replaced, every node answers `CLUSTERDOWN`, for every slot.
//! Nothing is persisted (no RDB, no AOF): a node restarted after a kill comes back empty and
//! takes its data from its primary.

use std::fmt;
use std::fs;
use std::io;
use std::panic::{self, AssertUnwindSafe};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use crate::ports::free_port;
use crate::process::{tail, wait_timeout};
use crate::redis::{REDIS_SERVER_ENV, RedisOptions, RedisServer, redis_server_binary};

/// How many hash slots a Redis Cluster has.
const SLOTS: u32 = 16384;
/// How long every wait of the cluster may take.
const WAIT: Duration = Duration::from_secs(30);
/// How often the cluster is polled while waiting.
const POLL: Duration = Duration::from_millis(50);

/// A real Redis Cluster of 3 primaries and 3 replicas (one replica per primary) for one test:
/// six `redis-server --cluster-enabled yes` on free 127.0.0.1 ports, each in its own temporary
/// folder, all killed and removed on drop (or by their watchdogs if the test process dies).
///
/// Nodes are known by their index, `0..RedisCluster::NODES`, which stays the same across
/// failovers and restarts; which nodes are primaries changes with failovers
/// ([`RedisCluster::primaries`], [`RedisCluster::replica_of`], [`RedisCluster::node_for_key`]).
///
/// A cluster client is given [`RedisCluster::urls`]. Every node announces `127.0.0.1` and its
/// port, so the redirections (`MOVED 3999 127.0.0.1:PORT`) and `CLUSTER SLOTS` lead to
/// addresses the test process can reach. See the module's documentation for the configuration.
///
/// The methods panic with a clear message (what was seen, and the tail of every node's log)
/// when something fails or a wait takes over 30 s: this is a test helper.
///
/// ```no_run
/// use idempotent_test_support::RedisCluster;
///
/// let mut cluster = RedisCluster::start();
/// let urls = cluster.urls(); // for the cluster client under test
/// let primary = cluster.node_for_key("order:{42}");
/// assert_eq!(cluster.command(primary, &["SET", "order:{42}", "paid"]), "OK");
/// cluster.wait_until_replicated(primary);
/// let promoted = cluster.kill_primary_and_wait_for_failover(primary);
/// assert_eq!(cluster.command(promoted, &["GET", "order:{42}"]), "paid");
/// cluster.restart(primary); // back, as the replica of `promoted`
/// # let _ = urls;
/// ```
#[derive(Debug)]
pub struct RedisCluster {
    nodes: Vec<RedisServer>,
}

impl RedisCluster {
    /// How many nodes the cluster has: 3 primaries and 3 replicas.
    pub const NODES: usize = 6;

    /// How many primaries (shards) the cluster has.
    pub const PRIMARIES: usize = 3;

    /// `cluster-node-timeout`: how long a node may not answer before it is suspected; a
    /// failover takes about twice or three times this.
    pub const NODE_TIMEOUT: Duration = Duration::from_millis(1000);

    /// Starts six nodes, joins them into a cluster with `redis-cli --cluster create`, and
    /// returns once the cluster is fully usable: every node says `cluster_state:ok` with all
    /// 16384 slots served, every node sees the same three primaries (slots `0-5460`,
    /// `5461-10922`, `10923-16383`), and each primary has one replica whose replication link
    /// is up.
    ///
    /// ```no_run
    /// let cluster = idempotent_test_support::RedisCluster::start();
    /// assert_eq!(cluster.primaries().len(), 3);
    /// ```
    ///
    /// # Panics
    /// If `redis-server` or `redis-cli` cannot be found, a node does not start, `redis-cli`
    /// fails, or the cluster is not usable within 30 s: the message says what was seen, with
    /// `redis-cli`'s output or the nodes' logs.
    pub fn start() -> RedisCluster {
        let nodes = (0..RedisCluster::NODES).map(|_| start_node()).collect();
        let cluster = RedisCluster { nodes };
        cluster.create();
        cluster.wait_for(
            "become usable after `redis-cli --cluster create`",
            |cluster| {
                let shape = cluster.settled()?;
                let primaries = shape.primaries();
                let replicas = shape.replicas();
                if primaries.len() != RedisCluster::PRIMARIES
                    || replicas.len() != RedisCluster::NODES - RedisCluster::PRIMARIES
                {
                    return Err(format!("not yet 3 primaries and 3 replicas: {shape}"));
                }
                for primary in primaries {
                    if !replicas.iter().any(|&(_, of)| of == primary) {
                        return Err(format!("node {primary} has no replica yet: {shape}"));
                    }
                }
                Ok(())
            },
        );
        cluster
    }

    /// `redis://127.0.0.1:PORT/` of every node, in index order, primaries and replicas alike
    /// (running or not): what a cluster client is given.
    pub fn urls(&self) -> Vec<String> {
        self.nodes.iter().map(RedisServer::url).collect()
    }

    /// `redis://127.0.0.1:PORT/` of the current primaries ([`RedisCluster::primaries`]).
    pub fn primary_urls(&self) -> Vec<String> {
        self.primaries()
            .into_iter()
            .map(|index| self.nodes[index].url())
            .collect()
    }

    /// The indexes of the nodes that serve slots as primaries now, in index order, as the
    /// running nodes see it.
    ///
    /// # Panics
    /// If no node answers `CLUSTER NODES`.
    pub fn primaries(&self) -> Vec<usize> {
        let (_, lines) = self.any_view();
        let mut primaries: Vec<usize> = lines
            .iter()
            .filter(|line| line.primary && !line.failing && !line.slots.is_empty())
            .filter_map(|line| self.index_of_port(line.port))
            .collect();
        primaries.sort_unstable();
        primaries
    }

    /// The hash slot of `key`, `0..16384`: CRC16 (XMODEM) of the key modulo 16384, as Redis
    /// computes it, of the part between the first `{` and the next `}` when that part is not
    /// empty (a hash tag: `user:{42}:cart` and `user:{42}:orders` share a slot).
    ///
    /// ```
    /// use idempotent_test_support::RedisCluster;
    ///
    /// assert_eq!(RedisCluster::slot_of("foo"), 12182);
    /// assert_eq!(RedisCluster::slot_of("{user1000}.following"), RedisCluster::slot_of("user1000"));
    /// ```
    pub fn slot_of(key: &str) -> u16 {
        let slot = u32::from(crc16(hash_tag(key.as_bytes()))) % SLOTS;
        u16::try_from(slot).unwrap_or_default()
    }

    /// The index of the node that serves the slot of `key` as primary now (the node that
    /// accepts a write of it), as the running nodes say of themselves. When two claim the slot
    /// (in the middle of a failover), the one with the newer configuration epoch.
    ///
    /// ```no_run
    /// # let cluster = idempotent_test_support::RedisCluster::start();
    /// let node = cluster.node_for_key("k");
    /// assert_eq!(cluster.command(node, &["SET", "k", "v"]), "OK");
    /// ```
    ///
    /// # Panics
    /// If no running node serves the slot (a primary was killed and not yet replaced).
    pub fn node_for_key(&self, key: &str) -> usize {
        let slot = RedisCluster::slot_of(key);
        let mut owner: Option<(u64, usize)> = None;
        let mut seen = Vec::new();
        for index in self.live() {
            let Ok(lines) = self.view(index) else {
                seen.push(format!("node {index}: no answer"));
                continue;
            };
            let Some(me) = lines.iter().find(|line| line.myself) else {
                continue;
            };
            seen.push(format!("node {index}: {}", me.describe()));
            let serves = me.primary
                && me
                    .slots
                    .iter()
                    .any(|&(first, last)| first <= slot && slot <= last);
            if serves && owner.is_none_or(|(epoch, _)| me.epoch > epoch) {
                owner = Some((me.epoch, index));
            }
        }
        match owner {
            Some((_, index)) => index,
            None => panic!(
                "no running node serves slot {slot} (of key {key:?}) as primary now; the nodes say \
                 of themselves:\n{}",
                seen.join("\n")
            ),
        }
    }

    /// Node `index`: its URL, port, log, process.
    ///
    /// # Panics
    /// If `index` is not below [`RedisCluster::NODES`].
    pub fn node(&self, index: usize) -> &RedisServer {
        check_index(index);
        &self.nodes[index]
    }

    /// Node `index`, to stop, kill, pause or restart it by hand. The cluster's own methods
    /// ([`RedisCluster::kill_primary_and_wait_for_failover`], [`RedisCluster::restart`],
    /// [`RedisCluster::pause`]) also wait for the cluster to take it in.
    ///
    /// # Panics
    /// If `index` is not below [`RedisCluster::NODES`].
    pub fn node_mut(&mut self, index: usize) -> &mut RedisServer {
        check_index(index);
        &mut self.nodes[index]
    }

    /// Runs one command on node `index` (a new connection, no redirection followed) and returns
    /// the reply as text, as [`RedisServer::command`] does.
    ///
    /// ```no_run
    /// # let cluster = idempotent_test_support::RedisCluster::start();
    /// assert_eq!(cluster.command(0, &["CLUSTER", "KEYSLOT", "foo"]), "12182");
    /// ```
    ///
    /// # Panics
    /// If the node cannot be reached or the reply is an error (`MOVED 12182 127.0.0.1:PORT`
    /// for a key of another node's slot): see [`RedisCluster::try_command`].
    pub fn command(&self, index: usize, args: &[&str]) -> String {
        self.node(index).command(args)
    }

    /// Like [`RedisCluster::command`], but returns failures: an I/O error when the node cannot
    /// be reached, an error of kind `Other` with the message of an error reply (`MOVED ...`,
    /// `CLUSTERDOWN ...`).
    pub fn try_command(&self, index: usize, args: &[&str]) -> io::Result<String> {
        self.node(index).try_command(args)
    }

    /// The index of the replica of the primary `primary`, as the running nodes see it (the
    /// primary first, if it runs). A paused replica is still its primary's replica.
    ///
    /// # Panics
    /// If `primary` is not a primary with a replica now (after a failover, the new primary has
    /// none until the old one is [restarted](RedisCluster::restart)).
    pub fn replica_of(&self, primary: usize) -> usize {
        check_index(primary);
        let (_, lines) = self.view_from(primary);
        let port = self.nodes[primary].port();
        let id = lines
            .iter()
            .find(|line| line.port == port)
            .map(|line| &line.id);
        let replicas: Vec<usize> = lines
            .iter()
            .filter(|line| id.is_some() && line.primary_id.as_ref() == id)
            .filter_map(|line| self.index_of_port(line.port))
            .collect();
        match replicas.iter().min() {
            Some(&replica) => replica,
            None => panic!(
                "node {primary} (port {port}) has no replica; the cluster's nodes:\n{}",
                self.describe(&lines)
            ),
        }
    }

    /// Kills the primary `primary` (SIGKILL: a crash), waits until its replica is elected in
    /// its place and every running node says `cluster_state:ok` and agrees on the new
    /// primaries, and returns the index of the new primary. Writes the replica had received
    /// survive (to be sure of them, [`RedisCluster::wait_until_replicated`] before the kill);
    /// the ones it had not are lost (see [`RedisCluster::hold_back_replica`]).
    ///
    /// While the cluster has no primary for those slots (about 2–3 s), every node answers
    /// `CLUSTERDOWN`.
    ///
    /// ```no_run
    /// # let mut cluster = idempotent_test_support::RedisCluster::start();
    /// let primary = cluster.node_for_key("k");
    /// let replica = cluster.replica_of(primary);
    /// assert_eq!(cluster.kill_primary_and_wait_for_failover(primary), replica);
    /// assert_eq!(cluster.node_for_key("k"), replica);
    /// ```
    ///
    /// # Panics
    /// If `primary` is not a primary, its replica is paused (see
    /// [`RedisCluster::kill_primary_with_lagging_replica_and_wait_for_failover`]), or the
    /// failover does not complete within 30 s.
    pub fn kill_primary_and_wait_for_failover(&mut self, primary: usize) -> usize {
        self.check_primary(primary);
        let replica = self.replica_of(primary);
        if self.nodes[replica].is_paused() {
            panic!(
                "node {replica}, the replica of node {primary}, is paused and cannot be elected: \
                 resume it, or use kill_primary_with_lagging_replica_and_wait_for_failover"
            );
        }
        self.nodes[primary].kill();
        self.wait_for_promotion(primary, replica)
    }

    /// Makes sure the replica of `primary` has every write so far
    /// ([`RedisCluster::wait_until_replicated`]), then holds it
    /// back so that the writes that follow are acknowledged by the primary and never reach the
    /// replica; returns the replica's index. Follow with writes to `primary`, then
    /// [`RedisCluster::kill_primary_with_lagging_replica_and_wait_for_failover`]: the replica is
    /// elected without those writes, which are lost, though their clients saw `OK`.
    ///
    /// The replica is paused (SIGSTOP), so it cannot reconnect, and its replication connection
    /// is closed by the primary (`CLIENT KILL TYPE replica`), so the writes cannot even wait in
    /// its socket's buffer (a paused process's kernel still accepts bytes for it, which it would
    /// read and apply once resumed). A paused replica cannot be elected: the other nodes see it
    /// fail after [`RedisCluster::NODE_TIMEOUT`], and it is elected only once it runs again
    /// (with `cluster-replica-validity-factor 0`, however far behind it is).
    ///
    /// ```no_run
    /// # let mut cluster = idempotent_test_support::RedisCluster::start();
    /// let primary = cluster.node_for_key("{k}:kept");
    /// cluster.command(primary, &["SET", "{k}:kept", "1"]);
    /// let replica = cluster.hold_back_replica(primary);
    /// assert_eq!(cluster.command(primary, &["SET", "{k}:lost", "1"]), "OK");
    /// assert_eq!(cluster.kill_primary_with_lagging_replica_and_wait_for_failover(primary), replica);
    /// assert_eq!(cluster.command(replica, &["GET", "{k}:kept"]), "1");
    /// assert_eq!(cluster.command(replica, &["GET", "{k}:lost"]), "(nil)");
    /// ```
    ///
    /// # Panics
    /// If `primary` is not a primary with a running replica, the replica does not have the
    /// writes so far within 30 s, or its connection cannot be closed.
    pub fn hold_back_replica(&mut self, primary: usize) -> usize {
        let replica = self.wait_until_replicated(primary);
        self.nodes[replica].pause();
        let closed = self.command(primary, &["CLIENT", "KILL", "TYPE", "replica"]);
        if closed != "1" {
            self.nodes[replica].resume();
            panic!(
                "node {primary} closed {closed} replication connections instead of the one of \
                 node {replica}; its replication:\n{}",
                self.command(primary, &["INFO", "replication"])
            );
        }
        replica
    }

    /// Waits until the replica of `primary` has applied every write `primary` has applied so
    /// far (its `slave_repl_offset` reaches the primary's `master_repl_offset`), and returns
    /// the replica's index. Such writes survive a failover.
    ///
    /// (`WAIT` does this for the writes of its own connection only; [`RedisCluster::command`]
    /// opens a new connection for each command, on which `WAIT` returns at once.)
    ///
    /// ```no_run
    /// # let mut cluster = idempotent_test_support::RedisCluster::start();
    /// let primary = cluster.node_for_key("k");
    /// cluster.command(primary, &["SET", "k", "v"]);
    /// let replica = cluster.wait_until_replicated(primary);
    /// assert_eq!(cluster.kill_primary_and_wait_for_failover(primary), replica);
    /// assert_eq!(cluster.command(replica, &["GET", "k"]), "v");
    /// ```
    ///
    /// # Panics
    /// If `primary` is not a primary with a replica, the replica is paused, or it does not
    /// catch up within 30 s.
    pub fn wait_until_replicated(&self, primary: usize) -> usize {
        self.check_primary(primary);
        let replica = self.replica_of(primary);
        if self.nodes[replica].is_paused() {
            panic!(
                "node {replica}, the replica of node {primary}, is paused: it can replicate \
                 nothing until it is resumed"
            );
        }
        let info = self.command(primary, &["INFO", "replication"]);
        let Some(offset) =
            field(&info, "master_repl_offset").and_then(|text| text.parse::<u64>().ok())
        else {
            panic!("node {primary}'s INFO replication has no master_repl_offset: {info}");
        };
        self.wait_for(
            &format!("replicate node {primary}'s writes up to offset {offset} to node {replica}"),
            |cluster| {
                let info = cluster.nodes[replica]
                    .try_command(&["INFO", "replication"])
                    .map_err(|error| format!("node {replica}: INFO replication failed: {error}"))?;
                let applied =
                    field(&info, "slave_repl_offset").and_then(|text| text.parse::<u64>().ok());
                match applied {
                    Some(applied) if applied >= offset => Ok(replica),
                    _ => Err(format!(
                        "node {replica} is at slave_repl_offset {}",
                        applied.map_or("?".to_owned(), |applied| applied.to_string())
                    )),
                }
            },
        )
    }

    /// After [`RedisCluster::hold_back_replica`]`(primary)` and the writes that are to be lost:
    /// kills `primary` (SIGKILL), resumes its replica, waits until the replica is elected and
    /// every running node says `cluster_state:ok`, and returns the replica's index, the new
    /// primary. Example: [`RedisCluster::hold_back_replica`].
    ///
    /// # Panics
    /// If `primary` is not a primary, its replica is not held back, or the failover does not
    /// complete within 30 s.
    pub fn kill_primary_with_lagging_replica_and_wait_for_failover(
        &mut self,
        primary: usize,
    ) -> usize {
        self.check_primary(primary);
        let replica = self.replica_of(primary);
        if !self.nodes[replica].is_paused() {
            panic!(
                "node {replica}, the replica of node {primary}, is not held back: call \
                 hold_back_replica({primary}) before the writes that are to be lost"
            );
        }
        self.nodes[primary].kill();
        self.nodes[replica].resume();
        self.wait_for_promotion(primary, replica)
    }

    /// Starts node `index` again (on its port, with its cluster configuration, without data)
    /// and waits until every running node says `cluster_state:ok` and agrees on its place; a
    /// running node is stopped first. A primary killed and replaced rejoins as the replica of
    /// the node elected in its place, and takes the data from it.
    ///
    /// ```no_run
    /// # let mut cluster = idempotent_test_support::RedisCluster::start();
    /// let primary = cluster.primaries()[0];
    /// let promoted = cluster.kill_primary_and_wait_for_failover(primary);
    /// cluster.restart(primary);
    /// assert_eq!(cluster.replica_of(promoted), primary);
    /// ```
    ///
    /// # Panics
    /// If the node does not start, or the cluster does not take it back within 30 s.
    pub fn restart(&mut self, index: usize) {
        check_index(index);
        self.nodes[index].restart();
        self.wait_for(&format!("take node {index} back"), |cluster| {
            cluster.settled().map(drop)
        });
    }

    /// Pauses node `index` (SIGSTOP), as when its host freezes: it answers nothing, to clients
    /// or to the other nodes, until [`RedisCluster::resume`]. A paused primary is failed over
    /// after about [`RedisCluster::NODE_TIMEOUT`] (plus an election) if its replica runs; a
    /// paused replica cannot be elected while paused. To lose writes on purpose, see
    /// [`RedisCluster::hold_back_replica`].
    ///
    /// ```no_run
    /// # let mut cluster = idempotent_test_support::RedisCluster::start();
    /// let primary = cluster.node_for_key("k");
    /// let replica = cluster.replica_of(primary);
    /// cluster.pause(replica);
    /// cluster.command(primary, &["SET", "k", "1"]); // acknowledged: nothing waits for replicas
    /// cluster.resume(replica); // catches up
    /// cluster.wait_until_replicated(primary);
    /// ```
    ///
    /// # Panics
    /// If the node is not running.
    pub fn pause(&mut self, index: usize) {
        self.node_mut(index).pause();
    }

    /// Resumes node `index` after [`RedisCluster::pause`] (SIGCONT). Does not wait for the
    /// cluster: see [`RedisCluster::wait_until_ok`].
    pub fn resume(&mut self, index: usize) {
        self.node_mut(index).resume();
    }

    /// Waits until every running, unpaused node says `cluster_state:ok` with all slots served,
    /// they agree on who serves what, and every replica among them has its replication link
    /// up; e.g. after [`RedisCluster::resume`].
    ///
    /// # Panics
    /// If that takes over 30 s.
    pub fn wait_until_ok(&self) {
        self.wait_for("settle", |cluster| cluster.settled().map(drop));
    }

    /// Joins the six running nodes with `redis-cli --cluster create`.
    fn create(&self) {
        let cli = redis_cli_binary();
        let output_path = self.nodes[0].dir().join("cluster-create.log");
        let output = fs::File::create(&output_path)
            .unwrap_or_else(|error| panic!("cannot create {}: {error}", output_path.display()));
        let errors = output
            .try_clone()
            .unwrap_or_else(|error| panic!("cannot duplicate a file handle: {error}"));
        let mut command = Command::new(&cli);
        command.args(["--cluster", "create"]);
        command.args(
            self.nodes
                .iter()
                .map(|node| format!("127.0.0.1:{}", node.port())),
        );
        command
            .args(["--cluster-replicas", "1", "--cluster-yes"])
            .stdin(Stdio::null())
            .stdout(output)
            .stderr(errors);
        let mut child = command
            .spawn()
            .unwrap_or_else(|error| panic!("cannot run {}: {error}", cli.display()));
        let status = wait_timeout(&mut child, WAIT);
        let output = fs::read_to_string(&output_path).unwrap_or_default();
        match status {
            Some(status) if status.success() => {}
            Some(status) => panic!(
                "`redis-cli --cluster create` failed ({status}); its output:\n{}\n{}",
                tail(&output, 40),
                self.logs()
            ),
            None => {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "`redis-cli --cluster create` did not finish within {WAIT:?}; its output:\n{}\n{}",
                    tail(&output, 40),
                    self.logs()
                )
            }
        }
    }

    /// Waits until the cluster has settled with `replica` serving the slots `primary` served.
    fn wait_for_promotion(&self, primary: usize, replica: usize) -> usize {
        self.wait_for(
            &format!("elect node {replica} in place of node {primary}"),
            |cluster| {
                let shape = cluster.settled()?;
                if shape.primaries().contains(&replica) {
                    Ok(replica)
                } else {
                    Err(format!("node {replica} is not a primary yet: {shape}"))
                }
            },
        )
    }

    /// Polls `check` until it succeeds; panics after [`WAIT`] with what it saw last, and the
    /// nodes' logs. `what` completes "the Redis Cluster did not ...".
    fn wait_for<T>(&self, what: &str, mut check: impl FnMut(&Self) -> Result<T, String>) -> T {
        let deadline = Instant::now() + WAIT;
        loop {
            match check(self) {
                Ok(value) => return value,
                Err(seen) if Instant::now() >= deadline => panic!(
                    "the Redis Cluster did not {what} within {WAIT:?}; last seen: {seen}\n{}",
                    self.logs()
                ),
                Err(_) => thread::sleep(POLL),
            }
        }
    }

    /// The cluster as every running, unpaused node sees it, if they all say it is `ok` and
    /// agree; otherwise what is not so yet.
    fn settled(&self) -> Result<Shape, String> {
        let live = self.live();
        let mut agreed: Option<(usize, Shape)> = None;
        for &index in &live {
            let info = self.nodes[index]
                .try_command(&["CLUSTER", "INFO"])
                .map_err(|error| format!("node {index}: CLUSTER INFO failed: {error}"))?;
            let state = field(&info, "cluster_state");
            let slots_ok = field(&info, "cluster_slots_ok");
            if state != Some("ok") || slots_ok != Some("16384") {
                return Err(format!(
                    "node {index} says cluster_state:{} and cluster_slots_ok:{}",
                    state.unwrap_or("?"),
                    slots_ok.unwrap_or("?")
                ));
            }
            let lines = self
                .view(index)
                .map_err(|error| format!("node {index}: CLUSTER NODES failed: {error}"))?;
            let shape = self
                .shape(&lines, &live)
                .map_err(|error| format!("node {index} sees {error}"))?;
            match &agreed {
                Some((first, seen)) if *seen != shape => {
                    return Err(format!(
                        "the nodes disagree: node {first} sees {seen}; node {index} sees {shape}"
                    ));
                }
                Some(_) => {}
                None => agreed = Some((index, shape)),
            }
        }
        let Some((_, shape)) = agreed else {
            return Err("no node runs".to_owned());
        };
        for (replica, _) in shape.replicas() {
            let replication = self.nodes[replica]
                .try_command(&["INFO", "replication"])
                .map_err(|error| format!("node {replica}: INFO replication failed: {error}"))?;
            if field(&replication, "master_link_status") != Some("up") {
                return Err(format!(
                    "node {replica}'s replication link is not up: {}",
                    replication
                        .lines()
                        .map(str::trim)
                        .collect::<Vec<_>>()
                        .join(" ")
                ));
            }
        }
        Ok(shape)
    }

    /// The roles of the nodes of `live` in one node's `lines`, if it sees them all connected,
    /// none failing, every replica's primary among them, and every slot served.
    fn shape(&self, lines: &[NodeLine], live: &[usize]) -> Result<Shape, String> {
        let mut roles = Vec::new();
        for &index in live {
            let port = self.nodes[index].port();
            let Some(line) = lines.iter().find(|line| line.port == port) else {
                return Err(format!("no node {index} (port {port})"));
            };
            if line.failing || !(line.myself || line.connected) {
                return Err(format!("node {index} as {}", line.describe()));
            }
            let role = if line.primary {
                Role::Primary(line.slots.clone())
            } else {
                let primary = line
                    .primary_id
                    .as_ref()
                    .and_then(|id| lines.iter().find(|other| &other.id == id))
                    .and_then(|other| self.index_of_port(other.port))
                    .filter(|primary| live.contains(primary));
                match primary {
                    Some(primary) => Role::Replica(primary),
                    None => {
                        return Err(format!(
                            "node {index} as the replica of a node that does not run: {}",
                            line.describe()
                        ));
                    }
                }
            };
            roles.push((index, role));
        }
        let shape = Shape { roles };
        let served: u32 = shape
            .roles
            .iter()
            .filter_map(|(_, role)| match role {
                Role::Primary(slots) => Some(
                    slots
                        .iter()
                        .map(|&(first, last)| u32::from(last) - u32::from(first) + 1)
                        .sum::<u32>(),
                ),
                Role::Replica(_) => None,
            })
            .sum();
        if served != SLOTS {
            return Err(format!(
                "{served} of {SLOTS} slots served by running nodes: {shape}"
            ));
        }
        Ok(shape)
    }

    /// The nodes that run and are not paused.
    fn live(&self) -> Vec<usize> {
        (0..self.nodes.len())
            .filter(|&index| self.nodes[index].pid().is_some() && !self.nodes[index].is_paused())
            .collect()
    }

    /// `CLUSTER NODES` of node `index`, parsed.
    fn view(&self, index: usize) -> io::Result<Vec<NodeLine>> {
        let text = self.nodes[index].try_command(&["CLUSTER", "NODES"])?;
        text.lines()
            .filter(|line| !line.trim().is_empty())
            .map(|line| NodeLine::parse(line).map_err(io::Error::other))
            .collect()
    }

    /// `CLUSTER NODES` of `first` if it answers, else of the first running node that does.
    fn view_from(&self, first: usize) -> (usize, Vec<NodeLine>) {
        let mut candidates = self.live();
        candidates.sort_by_key(|&index| index != first);
        let mut errors = Vec::new();
        for index in candidates {
            match self.view(index) {
                Ok(lines) => return (index, lines),
                Err(error) => errors.push(format!("node {index}: {error}")),
            }
        }
        panic!(
            "no node of the Redis Cluster answers CLUSTER NODES: {}\n{}",
            errors.join("; "),
            self.logs()
        )
    }

    fn any_view(&self) -> (usize, Vec<NodeLine>) {
        self.view_from(0)
    }

    fn index_of_port(&self, port: u16) -> Option<usize> {
        self.nodes.iter().position(|node| node.port() == port)
    }

    fn check_primary(&self, primary: usize) {
        check_index(primary);
        let primaries = self.primaries();
        if !primaries.contains(&primary) {
            panic!("node {primary} is not a primary now; the primaries are nodes {primaries:?}");
        }
    }

    /// `lines` with node indexes, for a message.
    fn describe(&self, lines: &[NodeLine]) -> String {
        lines
            .iter()
            .map(|line| match self.index_of_port(line.port) {
                Some(index) => format!("node {index}: {}", line.describe()),
                None => format!("unknown node: {}", line.describe()),
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// The tail of every node's log, for a panic message.
    fn logs(&self) -> String {
        self.nodes
            .iter()
            .enumerate()
            .map(|(index, node)| {
                format!(
                    "--- node {index} (port {}) log ---\n{}",
                    node.port(),
                    tail(&node.log(), 15)
                )
            })
            .collect::<Vec<_>>()
            .join("\n")
    }
}

impl Drop for RedisCluster {
    /// Kills every node (their data is of no further use, and a graceful stop of a primary
    /// would wait for its replica), which also ends a paused one; each node's folder is then
    /// removed as the node is dropped.
    fn drop(&mut self) {
        for node in &mut self.nodes {
            node.kill();
        }
    }
}

/// Starts one cluster node; tries again with another bus port when that one was taken.
fn start_node() -> RedisServer {
    let mut last_failure = None;
    for _ in 0..3 {
        let options = RedisOptions {
            appendonly: false,
            extra_args: node_args(free_port()),
        };
        match panic::catch_unwind(AssertUnwindSafe(|| RedisServer::start_with(options))) {
            Ok(node) => return node,
            Err(failure) => {
                let message = failure
                    .downcast_ref::<String>()
                    .map(String::as_str)
                    .unwrap_or_default();
                // The bus port is in every try of RedisServer's own: all fail alike.
                if !message.contains("port taken") {
                    panic::resume_unwind(failure);
                }
                last_failure = Some(failure);
            }
        }
    }
    panic::resume_unwind(last_failure.unwrap_or_else(|| Box::new("no try was made")))
}

/// The arguments of a cluster node whose bus listens on `bus_port` (see the module's
/// documentation).
fn node_args(bus_port: u16) -> Vec<String> {
    [
        "--cluster-enabled",
        "yes",
        "--cluster-port",
        &bus_port.to_string(),
        "--cluster-config-file",
        "nodes.conf",
        "--cluster-node-timeout",
        &RedisCluster::NODE_TIMEOUT.as_millis().to_string(),
        "--cluster-replica-validity-factor",
        "0",
        "--cluster-allow-replica-migration",
        "no",
        "--cluster-announce-ip",
        "127.0.0.1",
        "--repl-diskless-sync-delay",
        "0",
    ]
    .into_iter()
    .map(str::to_owned)
    .collect()
}

/// `redis-cli`: beside the `redis-server` that runs, else on `PATH`.
fn redis_cli_binary() -> PathBuf {
    let beside = redis_server_binary().with_file_name("redis-cli");
    if beside.is_file() {
        return beside;
    }
    std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .map(|dir| dir.join("redis-cli"))
        .find(|candidate| candidate.is_file())
        .unwrap_or_else(|| {
            panic!(
                "redis-cli is not installed (not beside redis-server, nor on PATH): run \
                 scripts/install-test-deps, or set {REDIS_SERVER_ENV} to a redis-server with \
                 redis-cli in its folder"
            )
        })
}

fn check_index(index: usize) {
    if index >= RedisCluster::NODES {
        panic!(
            "there is no node {index}: a RedisCluster has nodes 0 to {}",
            RedisCluster::NODES - 1
        );
    }
}

/// The value of `name:value` in the text of `INFO` or `CLUSTER INFO`.
fn field<'a>(info: &'a str, name: &str) -> Option<&'a str> {
    info.lines()
        .find_map(|line| line.trim().strip_prefix(name)?.strip_prefix(':'))
}

/// The part of `key` that is hashed: the hash tag, if any.
fn hash_tag(key: &[u8]) -> &[u8] {
    if let Some(open) = key.iter().position(|&byte| byte == b'{') {
        let rest = &key[open + 1..];
        if let Some(length) = rest.iter().position(|&byte| byte == b'}')
            && length > 0
        {
            return &rest[..length];
        }
    }
    key
}

/// CRC16/XMODEM (polynomial 0x1021, initial value 0), as Redis Cluster hashes keys.
fn crc16(bytes: &[u8]) -> u16 {
    let mut crc: u16 = 0;
    for &byte in bytes {
        crc ^= u16::from(byte) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc
}

/// What one node is, in a [`Shape`].
#[derive(Debug, Clone, PartialEq, Eq)]
enum Role {
    /// A primary serving these slot ranges.
    Primary(Vec<(u16, u16)>),
    /// A replica of the node of this index.
    Replica(usize),
}

/// The roles of the running nodes, by index, as one node sees them.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Shape {
    roles: Vec<(usize, Role)>,
}

impl Shape {
    fn primaries(&self) -> Vec<usize> {
        self.roles
            .iter()
            .filter(|(_, role)| matches!(role, Role::Primary(slots) if !slots.is_empty()))
            .map(|(index, _)| *index)
            .collect()
    }

    /// `(replica, its primary)`.
    fn replicas(&self) -> Vec<(usize, usize)> {
        self.roles
            .iter()
            .filter_map(|(index, role)| match role {
                Role::Replica(primary) => Some((*index, *primary)),
                Role::Primary(_) => None,
            })
            .collect()
    }
}

impl fmt::Display for Shape {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let roles: Vec<String> = self
            .roles
            .iter()
            .map(|(index, role)| match role {
                Role::Primary(slots) => {
                    let slots: Vec<String> = slots
                        .iter()
                        .map(|(first, last)| format!("{first}-{last}"))
                        .collect();
                    format!("node {index} primary of [{}]", slots.join(" "))
                }
                Role::Replica(primary) => format!("node {index} replica of node {primary}"),
            })
            .collect();
        write!(f, "{}", roles.join(", "))
    }
}

/// One line of `CLUSTER NODES`:
/// `<id> <ip:port@cport[,hostname]> <flags> <primary id or -> <ping-sent> <pong-recv>
/// <config-epoch> <link-state> <slot or range> ...`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct NodeLine {
    id: String,
    port: u16,
    flags: String,
    myself: bool,
    primary: bool,
    /// Flagged `fail`, `fail?`, `handshake` or `noaddr`.
    failing: bool,
    primary_id: Option<String>,
    epoch: u64,
    connected: bool,
    slots: Vec<(u16, u16)>,
}

impl NodeLine {
    fn parse(line: &str) -> Result<NodeLine, String> {
        let bad = |what: &str| format!("a CLUSTER NODES line with {what}: {line:?}");
        let fields: Vec<&str> = line.split_whitespace().collect();
        if fields.len() < 8 {
            return Err(bad("fewer than 8 fields"));
        }
        let address = fields[1].split([',', '@']).next().unwrap_or_default();
        let port = address
            .rsplit_once(':')
            .and_then(|(_, port)| port.parse().ok())
            .ok_or_else(|| bad("no port"))?;
        let flags: Vec<&str> = fields[2].split(',').collect();
        let mut slots = Vec::new();
        for slot in &fields[8..] {
            // `[slot->-id]` and `[slot-<-id]`: a slot being migrated or imported.
            if slot.starts_with('[') {
                continue;
            }
            let (first, last) = slot.split_once('-').unwrap_or((slot, slot));
            match (first.parse(), last.parse()) {
                (Ok(first), Ok(last)) => slots.push((first, last)),
                _ => return Err(bad("a slot that is not a number")),
            }
        }
        Ok(NodeLine {
            id: fields[0].to_owned(),
            port,
            flags: fields[2].to_owned(),
            myself: flags.contains(&"myself"),
            primary: flags.contains(&"master"),
            failing: flags
                .iter()
                .any(|flag| ["fail", "fail?", "handshake", "noaddr"].contains(flag)),
            primary_id: Some(fields[3]).filter(|id| *id != "-").map(str::to_owned),
            epoch: fields[6]
                .parse()
                .map_err(|_| bad("an epoch that is not a number"))?,
            connected: fields[7] == "connected",
            slots,
        })
    }

    /// Port, flags, link state and slots, for a message.
    fn describe(&self) -> String {
        let slots: Vec<String> = self
            .slots
            .iter()
            .map(|(first, last)| format!("{first}-{last}"))
            .collect();
        format!(
            "port {} {} {} slots [{}]",
            self.port,
            self.flags,
            if self.connected {
                "connected"
            } else {
                "disconnected"
            },
            slots.join(" ")
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc16_is_xmodem() {
        // The check value of CRC-16/XMODEM.
        assert_eq!(crc16(b"123456789"), 0x31C3);
        assert_eq!(crc16(b""), 0);
    }

    #[test]
    fn slots_follow_redis() {
        // Values from CLUSTER KEYSLOT of Redis 7.0.
        assert_eq!(RedisCluster::slot_of("foo"), 12182);
        assert_eq!(RedisCluster::slot_of("bar"), 5061);
        assert_eq!(RedisCluster::slot_of(""), 0);
        assert_eq!(
            RedisCluster::slot_of("{user1000}.following"),
            RedisCluster::slot_of("user1000")
        );
        // An empty tag hashes the whole key; only the first `{` opens a tag.
        assert_eq!(
            RedisCluster::slot_of("foo{}{bar}"),
            crc16(b"foo{}{bar}") % 16384
        );
        assert_eq!(
            RedisCluster::slot_of("foo{{bar}}zap"),
            RedisCluster::slot_of("{bar")
        );
        assert_eq!(
            RedisCluster::slot_of("foo{bar}{zap}"),
            RedisCluster::slot_of("bar")
        );
        assert_eq!(RedisCluster::slot_of("no}{tag"), crc16(b"no}{tag") % 16384);
    }

    #[test]
    fn parses_cluster_nodes_lines() {
        let line = "07c37dfeb235213a872192d90877d0cd55635b91 127.0.0.1:30004@31004,host \
                    slave e7d1eecce10fd6bb5eb35b9f99a514335d9ba9ca 0 1426238317239 4 connected";
        let replica = NodeLine::parse(line).unwrap();
        assert_eq!(replica.port, 30004);
        assert!(!replica.primary && !replica.myself && !replica.failing && replica.connected);
        assert_eq!(
            replica.primary_id.as_deref(),
            Some("e7d1eecce10fd6bb5eb35b9f99a514335d9ba9ca")
        );
        let line = "e7d1eecce10fd6bb5eb35b9f99a514335d9ba9ca 127.0.0.1:30001@31001 \
                    myself,master - 0 0 1 connected 0-5460 5462 [5461->-67ed2db8d677e59ec4a4cefb06858cf2a1a89fa1]";
        let primary = NodeLine::parse(line).unwrap();
        assert!(primary.primary && primary.myself && primary.primary_id.is_none());
        assert_eq!(primary.epoch, 1);
        assert_eq!(primary.slots, vec![(0, 5460), (5462, 5462)]);
        let line = "6ec23923021cf3ffec47632106199cb7f496ce01 127.0.0.1:30005@31005 \
                    master,fail - 1426238316232 1426238315232 5 disconnected";
        let failed = NodeLine::parse(line).unwrap();
        assert!(failed.failing && !failed.connected && failed.slots.is_empty());
        assert!(NodeLine::parse("garbage").is_err());
        assert!(NodeLine::parse("id :0@0 noaddr - 0 0 x connected").is_err());
    }
}
