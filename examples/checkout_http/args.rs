//! The command line: `--store`, `--url`, `--seed`, `--customers`, `--listen`, `--serve`,
//! `--slow-ms`, and opening the chosen store.

use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use idempotent_core::{MemoryStore, Store};

const USAGE: &str = "\
usage: checkout_http [--store memory|sqlite|postgres|redis] [--url URL] [--seed N]
                     [--customers N] [--listen ADDR] [--serve] [--slow-ms MS]

  --store NAME     where the idempotency records live (default: memory)
  --url URL        where that store is, also read from IDEMPOTENT_STORE_URL:
                     sqlite    a file path (default: target/checkout_http.sqlite3)
                     postgres  e.g. postgres://postgres@127.0.0.1:5432/postgres
                     redis     e.g. redis://127.0.0.1:6379/
  --seed N         picks the carts and the faults (default: 1): a seed meets the same faults
                   on every run
  --customers N    how many customers check out at once (default: 32, at most 1000)
  --listen ADDR    the server's address (default: 127.0.0.1 on a free port)
  --serve          only serve, until interrupted (e.g. for curl)
  --slow-ms MS     every checkout waits MS milliseconds after charging (default: 0), so that
                   a second request with its key meets it running (409)

The sqlite, postgres and redis stores need the cargo feature of the same name:
  cargo run --example checkout_http --features sqlite -- --store sqlite";

const DEFAULT_SQLITE_PATH: &str = "target/checkout_http.sqlite3";
const DEFAULT_SEED: u64 = 1;
const DEFAULT_CUSTOMERS: usize = 32;
const MAX_CUSTOMERS: usize = 1000;

/// The store named on the command line, and its URL (none for memory).
pub(crate) struct StoreChoice {
    pub(crate) name: String,
    pub(crate) url: Option<String>,
}

pub(crate) struct Args {
    pub(crate) store: StoreChoice,
    pub(crate) seed: u64,
    pub(crate) customers: usize,
    pub(crate) listen: SocketAddr,
    pub(crate) serve: bool,
    pub(crate) slow: Duration,
}

/// Reads the command line (also as `--flag=VALUE`). The error is the text to print before
/// exiting with status 2.
pub(crate) fn parse_args(mut args: impl Iterator<Item = String>) -> Result<Args, String> {
    let usage = |message: String| format!("checkout_http: {message}\n\n{USAGE}");
    let (mut name, mut url, mut seed, mut customers, mut listen, mut slow) =
        (None, None, None, None, None, None);
    let mut serve = false;
    while let Some(arg) = args.next() {
        let (flag, value) = match arg.split_once('=') {
            Some((flag, value)) => (flag.to_owned(), Some(value.to_owned())),
            None => (arg.clone(), None),
        };
        let slot = match flag.as_str() {
            "--store" => &mut name,
            "--url" => &mut url,
            "--seed" => &mut seed,
            "--customers" => &mut customers,
            "--listen" => &mut listen,
            "--slow-ms" => &mut slow,
            "--serve" if value.is_none() => {
                serve = true;
                continue;
            }
            "-h" | "--help" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            _ => return Err(usage(format!("unknown argument {arg:?}"))),
        };
        let value = value.or_else(|| args.next());
        *slot = Some(value.ok_or_else(|| usage(format!("{flag} needs a value")))?);
    }
    let number = |flag: &str, value: Option<String>, default: u64| match value {
        None => Ok(default),
        Some(text) => text
            .parse::<u64>()
            .map_err(|_| usage(format!("{flag} takes a whole number, not {text:?}"))),
    };
    let seed = number("--seed", seed, DEFAULT_SEED)?;
    let slow = Duration::from_millis(number("--slow-ms", slow, 0)?);
    let customers = number("--customers", customers, DEFAULT_CUSTOMERS as u64)?;
    let customers = match usize::try_from(customers) {
        Ok(n @ 1..=MAX_CUSTOMERS) => n,
        _ => return Err(usage(format!("--customers is 1 to {MAX_CUSTOMERS}"))),
    };
    let listen = match listen {
        None => SocketAddr::from(([127, 0, 0, 1], 0)),
        Some(text) => text.parse().map_err(|_| {
            usage(format!(
                "--listen takes an address like 127.0.0.1:3000, not {text:?}"
            ))
        })?,
    };
    Ok(Args {
        store: store_choice(name, url).map_err(usage)?,
        seed,
        customers,
        listen,
        serve,
        slow,
    })
}

fn store_choice(name: Option<String>, url: Option<String>) -> Result<StoreChoice, String> {
    let name = name.unwrap_or_else(|| "memory".to_owned());
    let built = match name.as_str() {
        "memory" => true,
        "sqlite" => cfg!(feature = "sqlite"),
        "postgres" => cfg!(feature = "postgres"),
        "redis" => cfg!(feature = "redis"),
        _ => return Err(format!("unknown store {name:?}")),
    };
    if !built {
        return Err(format!(
            "this build has no {name} store: run with --features {name}"
        ));
    }
    if name == "memory" {
        return match url {
            Some(_) => Err("the memory store takes no --url".to_owned()),
            None => Ok(StoreChoice { name, url }),
        };
    }
    let url = url.or_else(|| std::env::var("IDEMPOTENT_STORE_URL").ok());
    let url = match (name.as_str(), url) {
        (_, Some(url)) => url,
        ("sqlite", None) => DEFAULT_SQLITE_PATH.to_owned(),
        (_, None) => {
            return Err(format!(
                "--store {name} needs --url URL or IDEMPOTENT_STORE_URL"
            ));
        }
    };
    Ok(StoreChoice {
        name,
        url: Some(url),
    })
}

/// Opens the chosen store. `store_choice` only lets through the stores this build has.
pub(crate) async fn open_store(
    choice: &StoreChoice,
) -> Result<Arc<dyn Store>, idempotent_core::StoreError> {
    Ok(match (choice.name.as_str(), choice.url.as_deref()) {
        ("memory", _) => Arc::new(MemoryStore::new()),
        #[cfg(feature = "sqlite")]
        ("sqlite", Some(path)) => {
            if let Some(dir) = std::path::Path::new(path).parent() {
                // A missing directory is reported by the store, with the path.
                let _ = std::fs::create_dir_all(dir);
            }
            Arc::new(idempotent_core::stores::sqlite::SqliteStore::open(path)?)
        }
        #[cfg(feature = "postgres")]
        ("postgres", Some(url)) => {
            let builder = idempotent_core::stores::postgres::PostgresStore::builder(url);
            Arc::new(builder.build().await?) // creates its tables if missing
        }
        #[cfg(feature = "redis")]
        ("redis", Some(url)) => {
            Arc::new(idempotent_core::stores::redis::RedisStore::builder(url).build()?)
        }
        (other, _) => unreachable!("store_choice let through the {other} store"),
    })
}

impl fmt::Display for StoreChoice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let Some(url) = &self.url else {
            return write!(f, "{} (records die with this process)", self.name);
        };
        // Leave a password in the URL out of the output.
        let shown = if let Some((scheme, rest)) = url.split_once("://")
            && let Some((user_info, host)) = rest.split_once('@')
            && let Some((user, _password)) = user_info.split_once(':')
        {
            format!("{scheme}://{user}:***@{host}")
        } else {
            url.clone()
        };
        write!(f, "{} at {shown} (records outlive this run)", self.name)
    }
}
