//! `idempotent`: the operator's command line for the records of the SQLite, PostgreSQL and
//! Redis stores: see one record, count them all, purge the expired ones, forget one.
//!
//! The store is given by URL (`--store-url`, or `IDEMPOTENT_STORE_URL`): `sqlite://<path>`,
//! `postgres://…` (or `postgresql://`), `redis://…` or `rediss://…`. A record is named as the
//! attribute names it: the function's namespace (`--name`: its `name = …`, or by default
//! `module::path::function`), the scope if it has one (`--scope`), and the key (`--key`).
//!
//! Exit codes: 0 done; 1 the store failed (unreachable, a statement failed, a corrupt record);
//! 2 the command line or the URL is wrong; 3 there is no such record; 4 `forget` was not
//! confirmed.
//!
//! Every record it deletes is in the library's audit trail: `forget` and `purge-expired` print
//! the `forgotten` and `purged` events (target `idempotent::audit`) on standard error, as a
//! service that installs a `tracing` subscriber logs the engine's.

mod stores;

use std::io::{BufRead, IsTerminal, Write};
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use idempotent_core::StorageKey;
use idempotent_core::admin::{self, RecordState, RecordView, StoreStats};
use serde_json::json;

use stores::Opened;

#[derive(Parser)]
#[command(name = "idempotent", version, about = "Inspect, count, purge and forget idempotency records", long_about = None)]
struct Cli {
    /// The store: sqlite://PATH, postgres://…, redis://… or rediss://…
    #[arg(
        long,
        env = "IDEMPOTENT_STORE_URL",
        global = true,
        hide_env_values = true
    )]
    store_url: Option<String>,

    /// The PostgreSQL store's table (as its builder's `table`).
    #[arg(long, default_value = "idempotent_records", global = true)]
    table: String,

    /// The Redis store's key prefix (as its builder's `key_prefix`).
    #[arg(long, default_value = "idempotent:", global = true)]
    key_prefix: String,

    /// Print JSON instead of text.
    #[arg(long, global = true)]
    json: bool,

    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Show one record: its state, fence, lease left or expiry, size and output.
    Inspect(RecordName),
    /// Count the records by state, with their total size and the one nearest its end.
    Stats,
    /// Delete the records whose lease or ttl has ended (in batches; Redis needs none).
    PurgeExpired {
        /// Count them without deleting anything.
        #[arg(long)]
        dry_run: bool,
        /// Records deleted per transaction.
        #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(1..))]
        batch: u64,
    },
    /// Delete one record, whatever its state: the next call with its key runs the body again.
    Forget {
        #[command(flatten)]
        record: RecordName,
        /// Do not ask for confirmation.
        #[arg(long, short = 'y')]
        yes: bool,
    },
}

/// A record, named as the attribute names it.
#[derive(Args)]
struct RecordName {
    /// The function's namespace: its `name = …`, or `module::path::function`.
    #[arg(long)]
    name: String,
    /// The scope, if the function has one.
    #[arg(long)]
    scope: Option<String>,
    /// The idempotency key.
    #[arg(long)]
    key: String,
}

impl RecordName {
    fn storage_key(&self) -> Result<StorageKey, Failure> {
        StorageKey::derive(
            &self.name,
            self.scope.as_deref().map(str::as_bytes),
            self.key.as_bytes(),
        )
        .map_err(|error| Failure::Usage(format!("the key cannot be derived: {error}")))
    }
}

/// Why the command failed, and its exit code.
enum Failure {
    Store(String),
    Usage(String),
    NotFound(String),
    NotConfirmed,
}

impl Failure {
    fn code(&self) -> u8 {
        match self {
            Failure::Store(_) => 1,
            Failure::Usage(_) => 2,
            Failure::NotFound(_) => 3,
            Failure::NotConfirmed => 4,
        }
    }
}

impl From<idempotent_core::StoreError> for Failure {
    fn from(error: idempotent_core::StoreError) -> Self {
        Failure::Store(error.to_string())
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("idempotent: could not start: {error}");
            return ExitCode::from(1);
        }
    };
    audit_to_stderr();
    match runtime.block_on(run(&cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(failure) => {
            match &failure {
                Failure::Store(message) | Failure::Usage(message) | Failure::NotFound(message) => {
                    eprintln!("idempotent: {message}")
                }
                Failure::NotConfirmed => {
                    eprintln!("idempotent: not confirmed; nothing was deleted")
                }
            }
            ExitCode::from(failure.code())
        }
    }
}

/// Prints the audit trail's events (target `idempotent::audit`) on standard error, and nothing
/// else the library logs.
fn audit_to_stderr() {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    use tracing_subscriber::{Layer, filter, fmt};

    let audit = filter::Targets::new().with_target("idempotent::audit", tracing::Level::DEBUG);
    let layer = fmt::layer().with_writer(std::io::stderr).with_filter(audit);
    // Fails only if a subscriber is already installed, which nothing here does.
    let _ = tracing_subscriber::registry().with(layer).try_init();
}

async fn run(cli: &Cli) -> Result<(), Failure> {
    let Some(url) = cli.store_url.as_deref() else {
        return Err(Failure::Usage(
            "no store given: pass --store-url or set IDEMPOTENT_STORE_URL (sqlite://<path>, postgres://…, redis://…)".to_string(),
        ));
    };
    let store = stores::open(url, &cli.table, &cli.key_prefix).await?;
    match &cli.command {
        Command::Inspect(record) => inspect(&store, record, cli.json).await,
        Command::Stats => stats(&store, cli.json).await,
        Command::PurgeExpired { dry_run, batch } => {
            purge_expired(&store, *dry_run, *batch, cli.json).await
        }
        Command::Forget { record, yes } => forget(&store, record, *yes, cli.json).await,
    }
}

async fn inspect(store: &Opened, record: &RecordName, json: bool) -> Result<(), Failure> {
    let key = record.storage_key()?;
    let Some(view) = store.admin().inspect(&key).await? else {
        return Err(not_found(record, &key));
    };
    if json {
        println!("{}", record_json(record, &key, &view));
    } else {
        print!("{}", record_text(record, &key, &view));
    }
    Ok(())
}

fn not_found(record: &RecordName, key: &StorageKey) -> Failure {
    Failure::NotFound(format!(
        "no record for key {:?} of {} (storage key {key})",
        record.key, record.name
    ))
}

/// The recorded output as JSON if it is JSON, else as text (invalid UTF-8 replaced).
fn output_value(view: &RecordView) -> Option<serde_json::Value> {
    let output = view.output.as_ref()?;
    Some(
        serde_json::from_slice(output)
            .unwrap_or_else(|_| serde_json::Value::String(String::from_utf8_lossy(output).into())),
    )
}

fn record_json(record: &RecordName, key: &StorageKey, view: &RecordView) -> serde_json::Value {
    json!({
        "name": record.name,
        "scope": record.scope,
        "key": record.key,
        "storage_key": key.to_hex(),
        "state": view.state.as_str(),
        "fence": view.fence,
        "expired": view.expired,
        "left_ms": millis(view.left),
        "bytes": view.bytes,
        "output_bytes": view.output.as_ref().map(|output| output.len()),
        "output": output_value(view),
    })
}

fn record_text(record: &RecordName, key: &StorageKey, view: &RecordView) -> String {
    let mut text = format!(
        "record:      {} key {:?}{}\nstorage key: {key}\nstate:       {}\nfence:       {}\n",
        record.name,
        record.key,
        record
            .scope
            .as_ref()
            .map(|scope| format!(" scope {scope:?}"))
            .unwrap_or_default(),
        view.state.as_str(),
        view.fence,
    );
    let end = match (view.expired, view.state) {
        (true, _) => "ended: the key is free; purge-expired deletes it".to_string(),
        (false, RecordState::InProgress) => format!("lease left {}", duration(view.left)),
        (false, RecordState::Completed) => format!("expires in {}", duration(view.left)),
        (false, _) => format!("ends in {}", duration(view.left)),
    };
    text.push_str(&format!(
        "ends:        {end}\nsize:        {} bytes\n",
        view.bytes
    ));
    if let (Some(output), Some(value)) = (&view.output, output_value(view)) {
        text.push_str(&format!("output:      {} bytes\n", output.len()));
        let pretty = match &value {
            serde_json::Value::String(text) => text.clone(),
            value => serde_json::to_string_pretty(value).unwrap_or_default(),
        };
        text.push_str(&pretty);
        text.push('\n');
    }
    text
}

async fn stats(store: &Opened, json: bool) -> Result<(), Failure> {
    let stats = store.admin().stats().await?;
    if json {
        println!("{}", stats_json(&stats));
    } else {
        print!("{}", stats_text(&stats));
    }
    Ok(())
}

fn stats_json(stats: &StoreStats) -> serde_json::Value {
    json!({
        "records": stats.records(),
        "in_progress": stats.in_progress,
        "completed": stats.completed,
        "released": stats.released,
        "expired": stats.expired,
        "bytes": stats.bytes,
        "nearest_end_ms": stats.nearest_end.map(millis),
        "oldest": stats.oldest.as_ref().map(|oldest| json!({
            "storage_key": oldest.key.to_hex(),
            "fence": oldest.fence,
            "state": oldest.state.as_str(),
            "left_ms": millis(oldest.left),
        })),
    })
}

fn stats_text(stats: &StoreStats) -> String {
    format!(
        "records:     {}\nin progress: {}\ncompleted:   {}\nreleased:    {}\nexpired:     {} (purge-expired deletes them)\nbytes:       {}\nnearest end: {}\noldest:      {}\n",
        stats.records(),
        stats.in_progress,
        stats.completed,
        stats.released,
        stats.expired,
        stats.bytes,
        stats.nearest_end.map_or_else(|| "-".to_string(), duration),
        stats.oldest.as_ref().map_or_else(
            || "-".to_string(),
            |oldest| format!(
                "{} (fence {}, {}, ends in {})",
                &oldest.key.to_hex()[..16],
                oldest.fence,
                oldest.state.as_str(),
                duration(oldest.left)
            )
        ),
    )
}

async fn purge_expired(
    store: &Opened,
    dry_run: bool,
    batch: u64,
    json: bool,
) -> Result<(), Failure> {
    // Redis deletes each record when it ends: nothing to count (a SCAN of every key) or purge.
    let expired = if store.expires_by_itself() {
        0
    } else {
        store.admin().stats().await?.expired
    };
    if dry_run {
        if json {
            println!("{}", json!({ "dry_run": true, "expired": expired }));
        } else {
            println!("{expired} expired records would be purged (dry run: nothing was deleted)");
        }
        return Ok(());
    }
    let progress = indicatif::ProgressBar::new(expired);
    if !std::io::stderr().is_terminal() || json {
        progress.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    progress.set_style(
        indicatif::ProgressStyle::with_template("{bar:40} {pos}/{len} expired records purged")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let mut purged = 0u64;
    // The transactions that deleted records, each at most `batch` of them.
    let mut batches = 0u64;
    loop {
        let deleted = match store.admin().purge_expired_batch(batch).await {
            Ok(deleted) => deleted,
            Err(error) => {
                // What the batches before deleted stays deleted: it is in the audit trail.
                if purged > 0 {
                    admin::audit_purged(purged);
                }
                return Err(error.into());
            }
        };
        if deleted == 0 {
            break;
        }
        purged += deleted;
        batches += 1;
        // Records that ended since the count make the total grow.
        if purged > progress.length().unwrap_or(0) {
            progress.set_length(purged);
        }
        progress.set_position(purged);
    }
    progress.finish_and_clear();
    if !store.expires_by_itself() {
        admin::audit_purged(purged);
    }
    if json {
        println!(
            "{}",
            json!({ "dry_run": false, "purged": purged, "batches": batches })
        );
    } else if store.expires_by_itself() {
        println!("purged 0 expired records (Redis deletes each record when it ends)");
    } else {
        let unit = if batches == 1 { "batch" } else { "batches" };
        println!("purged {purged} expired records in {batches} {unit} of at most {batch}");
    }
    Ok(())
}

async fn forget(store: &Opened, record: &RecordName, yes: bool, json: bool) -> Result<(), Failure> {
    let key = record.storage_key()?;
    let Some(view) = store.admin().inspect(&key).await? else {
        return Err(not_found(record, &key));
    };
    if !yes && !confirm(record, &view)? {
        return Err(Failure::NotConfirmed);
    }
    let removed = store.admin().remove(&key).await?;
    if !removed {
        // It ended and was purged, or someone else forgot it, after the look.
        return Err(not_found(record, &key));
    }
    admin::audit_forgotten(&record.name, &key);
    if json {
        println!(
            "{}",
            json!({ "forgotten": true, "storage_key": key.to_hex(), "state": view.state.as_str() })
        );
    } else {
        println!(
            "forgot the {} record of {} key {:?}: its next call runs the body again",
            view.state.as_str(),
            record.name,
            record.key
        );
    }
    Ok(())
}

/// Asks on stderr, reads one line from stdin: `y` or `yes` confirms.
fn confirm(record: &RecordName, view: &RecordView) -> Result<bool, Failure> {
    let mut stderr = std::io::stderr();
    let _ = write!(
        stderr,
        "Forget the {} record of {} key {:?}? Its next call will run the body again. [y/N] ",
        view.state.as_str(),
        record.name,
        record.key
    );
    let _ = stderr.flush();
    let mut answer = String::new();
    std::io::stdin()
        .lock()
        .read_line(&mut answer)
        .map_err(|error| Failure::Usage(format!("could not read the confirmation: {error}")))?;
    Ok(matches!(
        answer.trim().to_ascii_lowercase().as_str(),
        "y" | "yes"
    ))
}

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

/// `1h 2m 3s`, `4.5s` or `12ms`.
fn duration(duration: Duration) -> String {
    let ms = millis(duration);
    if ms < 1_000 {
        return format!("{ms}ms");
    }
    if ms < 60_000 {
        return format!("{:.1}s", ms as f64 / 1000.0);
    }
    let seconds = ms / 1000;
    let (hours, minutes, seconds) = (seconds / 3600, seconds / 60 % 60, seconds % 60);
    if hours > 0 {
        format!("{hours}h {minutes}m {seconds}s")
    } else {
        format!("{minutes}m {seconds}s")
    }
}

#[cfg(test)]
mod tests {
    use super::duration;
    use std::time::Duration;

    #[test]
    fn durations_read_at_a_glance() {
        assert_eq!(duration(Duration::from_millis(12)), "12ms");
        assert_eq!(duration(Duration::from_millis(4_500)), "4.5s");
        assert_eq!(duration(Duration::from_secs(62)), "1m 2s");
        assert_eq!(duration(Duration::from_secs(3_723)), "1h 2m 3s");
    }
}
