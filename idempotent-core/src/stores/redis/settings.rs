//! Whether a Redis server keeps every record: its `maxmemory-policy` (eviction) and its
//! persistence (`appendonly`, `save`), read once per node when the store is made.
//!
//! A record that Redis drops before its time, evicted under memory pressure or lost in a
//! restart, is a key whose body runs again. Every record has a TTL (its `PX`), so every policy
//! but `noeviction` may evict live records, the `volatile-*` ones included. A policy is risky
//! even while `maxmemory` is 0 (no limit): the limit can be set at run time (a managed Redis
//! sets one of its own), and the policy then applies at once. Without an append-only file a
//! crash loses the writes since the last snapshot, and with no snapshots either a restart
//! loses everything. `appendfsync` is not judged: `everysec` loses at most about a second of
//! writes, and only to a crash of the machine.
//!
//! The settings are read with `CONFIG GET`; where that is renamed away or forbidden (a
//! managed Redis often does either), from `INFO memory` and `INFO persistence`, which show the
//! policy and whether the append-only file is on, not the snapshot points. Where neither can
//! be read, that is logged at INFO level and the store works as ever.

use std::collections::HashMap;
use std::time::Duration;

use redis::AsyncConnectionConfig;
use redis::aio::ConnectionLike;

use crate::error::StoreError;
use crate::redact::redact_url;

/// The target of the check's events: the store's own.
const TARGET: &str = "idempotent_core::stores::redis";

/// What to set in place of an evicting policy.
const EVICTION_FIX: &str = "set maxmemory-policy noeviction (CONFIG SET maxmemory-policy noeviction, and in redis.conf or the provider's parameter group, so that it survives a restart)";

/// What to set in place of snapshots alone, or no persistence.
const PERSISTENCE_FIX: &str = "set appendonly yes (CONFIG SET appendonly yes, and in redis.conf or the provider's parameter group, so that it survives a restart)";

/// The settings that decide whether a server keeps every record it acknowledged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Settings {
    /// `maxmemory-policy`.
    pub(super) maxmemory_policy: String,
    /// `maxmemory` in bytes (0: no limit), where it could be read.
    pub(super) maxmemory: Option<u64>,
    /// `appendonly`.
    pub(super) appendonly: bool,
    /// `save`, the snapshot points (`""`: none); `None` where read from `INFO`, which does
    /// not show them.
    pub(super) save: Option<String>,
}

/// A way in which a server's settings may lose records.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Risk {
    /// A `maxmemory-policy` other than `noeviction`.
    Eviction {
        policy: String,
        maxmemory: Option<u64>,
    },
    /// `appendonly no` and `save ""`: nothing is written to disk.
    NothingPersisted,
    /// `appendonly no` with snapshot points: a crash loses the writes since the last snapshot.
    SnapshotsOnly { save: String },
    /// `appendonly no`, the snapshot points unknown (read from `INFO`).
    NoAppendOnlyFile,
}

impl Settings {
    /// Every way in which these settings may lose records, eviction first.
    pub(super) fn risks(&self) -> Vec<Risk> {
        let mut risks = Vec::new();
        if self.maxmemory_policy != "noeviction" {
            risks.push(Risk::Eviction {
                policy: self.maxmemory_policy.clone(),
                maxmemory: self.maxmemory,
            });
        }
        if !self.appendonly {
            risks.push(match &self.save {
                Some(save) if save.trim().is_empty() => Risk::NothingPersisted,
                Some(save) => Risk::SnapshotsOnly { save: save.clone() },
                None => Risk::NoAppendOnlyFile,
            });
        }
        risks
    }
}

impl Risk {
    /// The setting at fault, as `CONFIG GET` names it.
    pub(super) fn setting(&self) -> &'static str {
        match self {
            Risk::Eviction { .. } => "maxmemory-policy",
            Risk::NothingPersisted | Risk::SnapshotsOnly { .. } => "appendonly, save",
            Risk::NoAppendOnlyFile => "appendonly",
        }
    }

    /// The value at fault.
    pub(super) fn value(&self) -> String {
        match self {
            Risk::Eviction { policy, .. } => policy.clone(),
            Risk::NothingPersisted => "appendonly no, save \"\"".to_string(),
            Risk::SnapshotsOnly { save } => format!("appendonly no, save {save:?}"),
            Risk::NoAppendOnlyFile => "no".to_string(),
        }
    }

    /// What to do about it.
    pub(super) fn fix(&self) -> &'static str {
        match self {
            Risk::Eviction { .. } => EVICTION_FIX,
            _ => PERSISTENCE_FIX,
        }
    }

    /// What it risks, in a sentence.
    pub(super) fn consequence(&self) -> String {
        match self {
            Risk::Eviction { policy, maxmemory } => {
                let volatile = if policy.starts_with("volatile-") {
                    " (every record has a TTL, so a volatile-* policy evicts them too)"
                } else {
                    ""
                };
                let unlimited = if *maxmemory == Some(0) {
                    "; maxmemory is 0 (no limit) for now, and the policy applies as soon as a limit is set"
                } else {
                    ""
                };
                format!(
                    "this Redis may evict idempotency records under memory pressure{volatile}, and the key of an evicted record runs its body again{unlimited}: the 'noeviction' maxmemory-policy is recommended (current policy: '{policy}')"
                )
            }
            Risk::NothingPersisted => "this Redis persists nothing (appendonly no, save \"\"): a restart loses every idempotency record, and their keys run their bodies again; appendonly yes is recommended".to_string(),
            Risk::SnapshotsOnly { save } => format!(
                "this Redis persists only snapshots (appendonly no, save {save:?}): a crash loses the idempotency records written since the last snapshot, and their keys run their bodies again; appendonly yes is recommended"
            ),
            Risk::NoAppendOnlyFile => "this Redis writes no append-only file (appendonly no; its snapshot points could not be read): a crash loses the idempotency records written since the last snapshot, or all of them without snapshots, and their keys run their bodies again; appendonly yes is recommended".to_string(),
        }
    }
}

/// How a node's settings were read, or why they could not be.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Reading {
    /// From `CONFIG GET`.
    Config(Settings),
    /// From `INFO`, because `CONFIG GET` failed with `config_error`.
    Info {
        settings: Settings,
        config_error: String,
    },
    /// Neither could be read (nor, maybe, the node reached).
    Unreadable { reason: String },
}

/// Reads the settings over `connection` to one node: `CONFIG GET`, else `INFO`.
pub(super) async fn read_settings(connection: &mut impl ConnectionLike) -> Reading {
    let config_error = match config_get(connection).await {
        Ok(settings) => return Reading::Config(settings),
        Err(error) => error,
    };
    match info(connection).await {
        Ok(settings) => Reading::Info {
            settings,
            config_error,
        },
        Err(info_error) => Reading::Unreadable {
            reason: format!("CONFIG GET failed ({config_error}) and so did INFO ({info_error})"),
        },
    }
}

/// The settings from `CONFIG GET`, one parameter per command (Redis before 7.0 takes one at
/// a time); the first error ends it.
async fn config_get(connection: &mut impl ConnectionLike) -> Result<Settings, String> {
    let mut values = HashMap::new();
    for parameter in ["maxmemory-policy", "maxmemory", "appendonly", "save"] {
        let answer: HashMap<String, String> = redis::cmd("CONFIG")
            .arg("GET")
            .arg(parameter)
            .query_async(connection)
            .await
            .map_err(|error| error.to_string())?;
        values.extend(answer);
    }
    let maxmemory_policy = values
        .remove("maxmemory-policy")
        .ok_or("it did not answer maxmemory-policy")?;
    let appendonly = values
        .remove("appendonly")
        .ok_or("it did not answer appendonly")?;
    Ok(Settings {
        maxmemory_policy,
        maxmemory: values.get("maxmemory").and_then(|value| value.parse().ok()),
        appendonly: appendonly.eq_ignore_ascii_case("yes"),
        save: values.remove("save"),
    })
}

/// The settings from `INFO memory` and `INFO persistence` (the snapshot points are not
/// there).
async fn info(connection: &mut impl ConnectionLike) -> Result<Settings, String> {
    let mut text = String::new();
    for section in ["memory", "persistence"] {
        let answer: String = redis::cmd("INFO")
            .arg(section)
            .query_async(connection)
            .await
            .map_err(|error| error.to_string())?;
        text.push_str(&answer);
        text.push('\n');
    }
    settings_from_info(&text)
}

/// The settings in the text of `INFO memory` and `INFO persistence`.
fn settings_from_info(info: &str) -> Result<Settings, String> {
    let field = |name: &str| {
        info.lines()
            .find_map(|line| line.trim().strip_prefix(name)?.strip_prefix(':'))
    };
    let maxmemory_policy = field("maxmemory_policy").ok_or("it did not show maxmemory_policy")?;
    let aof_enabled = field("aof_enabled").ok_or("it did not show aof_enabled")?;
    Ok(Settings {
        maxmemory_policy: maxmemory_policy.to_string(),
        maxmemory: field("maxmemory").and_then(|value| value.parse().ok()),
        appendonly: aof_enabled == "1",
        save: None,
    })
}

/// One node to check: how it is shown (its URL, the password masked) and its client.
pub(super) struct Node {
    shown: String,
    client: Result<redis::Client, String>,
}

impl Node {
    pub(super) fn new(url: &str, client: Result<redis::Client, String>) -> Self {
        Self {
            shown: redact_url(url),
            client,
        }
    }
}

/// The check of every node the builder named, with the builder's timeouts.
pub(super) struct Check {
    pub(super) nodes: Vec<Node>,
    pub(super) connect_timeout: Duration,
    pub(super) response_timeout: Duration,
}

/// What the check found on one node.
#[derive(Debug)]
pub(super) struct Report {
    node: String,
    reading: Reading,
}

impl Check {
    /// Reads every node's settings, one node after another, each over a connection of its
    /// own that is closed after it: at most the connect timeout plus twice the response
    /// timeout per node (the commands are small, and a server that answers one answers all
    /// at once).
    pub(super) async fn run(mut self) -> Vec<Report> {
        let nodes = std::mem::take(&mut self.nodes);
        let mut reports = Vec::with_capacity(nodes.len());
        for node in nodes {
            let reading = match node.client {
                Ok(client) => self.read_node(client).await,
                Err(reason) => Reading::Unreadable { reason },
            };
            reports.push(Report {
                node: node.shown,
                reading,
            });
        }
        reports
    }

    async fn read_node(&self, client: redis::Client) -> Reading {
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(self.connect_timeout))
            .set_response_timeout(Some(self.response_timeout));
        let read = async {
            match client
                .get_multiplexed_async_connection_with_config(&config)
                .await
            {
                Ok(mut connection) => read_settings(&mut connection).await,
                Err(error) => Reading::Unreadable {
                    reason: format!("could not connect: {error}"),
                },
            }
        };
        let limit = self.connect_timeout + 2 * self.response_timeout;
        tokio::time::timeout(limit, read)
            .await
            .unwrap_or_else(|_| Reading::Unreadable {
                reason: format!("no answer within {limit:?}"),
            })
    }
}

impl Report {
    /// Logs what was found: a WARN per risk; at INFO level, settings that could be read only
    /// from `INFO`, or not at all.
    pub(super) fn log(&self) {
        let node = self.node.as_str();
        let settings = match &self.reading {
            Reading::Config(settings) => settings,
            Reading::Info {
                settings,
                config_error,
            } => {
                tracing::info!(
                    target: TARGET,
                    node,
                    error = config_error.as_str(),
                    "CONFIG GET is not allowed on this Redis: its eviction and persistence settings were read from INFO, which does not show the snapshot points"
                );
                settings
            }
            Reading::Unreadable { reason } => {
                tracing::info!(
                    target: TARGET,
                    node,
                    error = reason.as_str(),
                    "could not read this Redis's eviction and persistence settings: whether it may evict or lose idempotency records is not checked (allow the store's user CONFIG GET or INFO to have it checked)"
                );
                return;
            }
        };
        for risk in settings.risks() {
            tracing::warn!(
                target: TARGET,
                node,
                setting = risk.setting(),
                value = risk.value().as_str(),
                fix = risk.fix(),
                "{}",
                risk.consequence()
            );
        }
    }

    /// Why this node is refused under `require_durable_settings`: each risk with its fix, or
    /// the settings that could not be read; `None` if it keeps every record.
    pub(super) fn refusal(&self) -> Option<String> {
        let settings = match &self.reading {
            Reading::Config(settings) | Reading::Info { settings, .. } => settings,
            Reading::Unreadable { reason } => {
                return Some(format!(
                    "the settings of {} could not be read ({reason}): allow the store's user CONFIG GET or INFO (ACL +config|get or +info)",
                    self.node
                ));
            }
        };
        let risks = settings.risks();
        if risks.is_empty() {
            return None;
        }
        let mut refusal = format!("{} may lose idempotency records:", self.node);
        for risk in risks {
            refusal.push_str(&format!(
                " {} is {} ({}); fix: {}.",
                risk.setting(),
                risk.value(),
                risk.consequence(),
                risk.fix()
            ));
        }
        Some(refusal)
    }
}

/// The error that refuses the store under `require_durable_settings`, if any node is refused.
pub(super) fn refusal(reports: &[Report]) -> Result<(), StoreError> {
    let refusals: Vec<String> = reports.iter().filter_map(Report::refusal).collect();
    if refusals.is_empty() {
        return Ok(());
    }
    Err(StoreError::Backend {
        message: format!(
            "refused by RedisStoreBuilder::require_durable_settings: {} To accept the risk instead, drop require_durable_settings(true) (the store then logs a WARN per unsafe setting and runs).",
            refusals.join(" ")
        ),
        source: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(policy: &str, appendonly: bool, save: Option<&str>) -> Settings {
        Settings {
            maxmemory_policy: policy.to_string(),
            maxmemory: Some(0),
            appendonly,
            save: save.map(str::to_string),
        }
    }

    #[test]
    fn only_noeviction_with_an_append_only_file_keeps_every_record() {
        assert_eq!(settings("noeviction", true, Some("")).risks(), vec![]);
        assert_eq!(settings("noeviction", true, None).risks(), vec![]);
        for policy in [
            "allkeys-lru",
            "volatile-ttl",
            "volatile-lru",
            "allkeys-random",
        ] {
            assert!(
                matches!(
                    settings(policy, true, Some("")).risks()[..],
                    [Risk::Eviction { .. }]
                ),
                "{policy}"
            );
        }
        assert_eq!(
            settings("noeviction", false, Some("")).risks(),
            vec![Risk::NothingPersisted]
        );
        assert_eq!(
            settings("noeviction", false, Some("3600 1 300 100")).risks(),
            vec![Risk::SnapshotsOnly {
                save: "3600 1 300 100".to_string()
            }]
        );
        assert_eq!(
            settings("noeviction", false, None).risks(),
            vec![Risk::NoAppendOnlyFile]
        );
    }

    #[test]
    fn a_volatile_policy_is_said_to_evict_records_with_a_ttl() {
        let risk = &settings("volatile-lru", true, None).risks()[0];
        assert!(risk.consequence().contains("every record has a TTL"));
        assert!(
            risk.consequence()
                .contains("current policy: 'volatile-lru'")
        );
    }

    #[test]
    fn info_shows_the_policy_and_the_append_only_file() {
        let info = "# Memory\r\nused_memory:1\r\nmaxmemory:1048576\r\nmaxmemory_human:1.00M\r\nmaxmemory_policy:allkeys-lru\r\n\n# Persistence\r\nloading:0\r\naof_enabled:1\r\n";
        assert_eq!(
            settings_from_info(info),
            Ok(Settings {
                maxmemory_policy: "allkeys-lru".to_string(),
                maxmemory: Some(1_048_576),
                appendonly: true,
                save: None,
            })
        );
        assert!(settings_from_info("# Memory\r\n").is_err());
    }
}
