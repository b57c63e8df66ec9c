//! `#[idempotent]` on functions whose return type is an alias of `Result`, whatever its name:
//! the attribute names `T` and `E` through the type itself, not through how it is spelt. Each
//! function's first call runs its body and a retry replays it.

use std::sync::atomic::{AtomicU32, Ordering};

use idempotent_core::{Error, idempotent};

#[derive(Debug)]
pub struct AppError(#[allow(dead_code)] Error);

impl From<Error> for AppError {
    fn from(error: Error) -> Self {
        AppError(error)
    }
}

/// An alias whose last segment is not named `Result`.
type Res<T> = Result<T, AppError>;

/// The shape of `anyhow::Result<T>` (`Result<T, E = anyhow::Error>`). anyhow is not a
/// dependency of this workspace, so this module stands in for it: an alias with a defaulted
/// error parameter, and an error type that, like `anyhow::Error`, converts from any error
/// (here only from the library's).
mod anyhow {
    pub type Result<T, E = Error> = core::result::Result<T, E>;

    #[derive(Debug)]
    pub struct Error(#[allow(dead_code)] String);

    impl From<idempotent_core::Error> for Error {
        fn from(error: idempotent_core::Error) -> Self {
            Error(error.to_string())
        }
    }
}

static RES_RUNS: AtomicU32 = AtomicU32::new(0);

#[idempotent(key = order)]
async fn with_res_alias(order: &str, amount: u64) -> Res<u64> {
    RES_RUNS.fetch_add(1, Ordering::SeqCst);
    Ok(amount * 2)
}

#[tokio::test]
async fn an_alias_not_named_result_runs_once_then_replays() {
    assert_eq!(with_res_alias("res-1", 21).await.unwrap(), 42);
    assert_eq!(
        RES_RUNS.load(Ordering::SeqCst),
        1,
        "the first call runs the body"
    );
    assert_eq!(with_res_alias("res-1", 21).await.unwrap(), 42);
    assert_eq!(RES_RUNS.load(Ordering::SeqCst), 1, "the retry replays");
}

static ANYHOW_RUNS: AtomicU32 = AtomicU32::new(0);

#[idempotent(key = order)]
async fn with_anyhow_like_alias(order: &str) -> anyhow::Result<String> {
    ANYHOW_RUNS.fetch_add(1, Ordering::SeqCst);
    Ok(format!("receipt for {order}"))
}

#[tokio::test]
async fn an_alias_with_a_defaulted_error_runs_once_then_replays() {
    let first = with_anyhow_like_alias("anyhow-1").await.unwrap();
    assert_eq!(
        ANYHOW_RUNS.load(Ordering::SeqCst),
        1,
        "the first call runs the body"
    );
    assert_eq!(with_anyhow_like_alias("anyhow-1").await.unwrap(), first);
    assert_eq!(ANYHOW_RUNS.load(Ordering::SeqCst), 1, "the retry replays");
}

/// A generic alias whose parameters are in the other order than `Result`'s: only the type it
/// stands for tells which is the output.
type Swapped<E, T> = Result<T, E>;

static SWAPPED_RUNS: AtomicU32 = AtomicU32::new(0);

#[idempotent(key = order)]
async fn with_swapped_alias(order: u64) -> Swapped<AppError, Vec<u64>> {
    SWAPPED_RUNS.fetch_add(1, Ordering::SeqCst);
    Ok(vec![order, order + 1])
}

#[tokio::test]
async fn an_alias_with_swapped_parameters_runs_once_then_replays() {
    assert_eq!(with_swapped_alias(7).await.unwrap(), vec![7, 8]);
    assert_eq!(
        SWAPPED_RUNS.load(Ordering::SeqCst),
        1,
        "the first call runs the body"
    );
    assert_eq!(with_swapped_alias(7).await.unwrap(), vec![7, 8]);
    assert_eq!(SWAPPED_RUNS.load(Ordering::SeqCst), 1, "the retry replays");
}

static IO_RUNS: AtomicU32 = AtomicU32::new(0);

/// `std::io::Result<T>`: its error, `std::io::Error`, takes the library's errors through
/// `From<idempotent_core::Error>` (as `ErrorKind::Other` with the error as its source).
#[idempotent(key = path)]
async fn with_io_result(path: &str) -> std::io::Result<u64> {
    IO_RUNS.fetch_add(1, Ordering::SeqCst);
    Ok(path.len() as u64)
}

#[tokio::test]
async fn std_io_result_runs_once_then_replays() {
    assert_eq!(with_io_result("io-1/report.csv").await.unwrap(), 15);
    assert_eq!(
        IO_RUNS.load(Ordering::SeqCst),
        1,
        "the first call runs the body"
    );
    assert_eq!(with_io_result("io-1/report.csv").await.unwrap(), 15);
    assert_eq!(IO_RUNS.load(Ordering::SeqCst), 1, "the retry replays");
    // The library's own errors reach the caller as an io::Error that keeps them.
    let error = with_io_result("").await.unwrap_err();
    assert_eq!(error.kind(), std::io::ErrorKind::Other);
    let inner = error.get_ref().and_then(|e| e.downcast_ref::<Error>());
    assert!(matches!(inner, Some(Error::InvalidKey(_))), "{error:?}");
}
