//! The PostgreSQL driver's errors as store errors, with what the server said.

use std::time::Duration;

use crate::error::StoreError;
use crate::stores::postgres_sql::{sqlstate_passes, sqlstate_rolled_back};

/// `error` as a store error with `message` first: [`StoreError::Unavailable`] for what passes
/// (the connection, the server's state, a rolled-back statement), else [`StoreError::Backend`].
pub(super) fn from_pg(message: &str, error: tokio_postgres::Error) -> StoreError {
    // An error the server did not send (a closed connection, I/O, a timeout) passes, as do
    // the server errors `sqlstate_passes` names; any other server error is a real failure.
    let passing = error
        .as_db_error()
        .is_none_or(|db| sqlstate_passes(db.code().code()));
    let message = format!("{message}: {}", describe(&error));
    if passing {
        StoreError::Unavailable {
            message,
            source: Some(Box::new(error)),
        }
    } else {
        StoreError::Backend {
            message,
            source: Some(Box::new(error)),
        }
    }
}

/// What the server said (its message and SQLSTATE, with detail and hint), or the driver's
/// error: tokio-postgres displays every server error as just "db error".
pub(super) fn describe(error: &tokio_postgres::Error) -> String {
    let Some(db) = error.as_db_error() else {
        return error.to_string();
    };
    let mut text = format!(
        "{}: {} (SQLSTATE {})",
        db.severity(),
        db.message(),
        db.code().code()
    );
    if let Some(detail) = db.detail() {
        text.push_str(&format!("; detail: {detail}"));
    }
    if let Some(hint) = db.hint() {
        text.push_str(&format!("; hint: {hint}"));
    }
    text
}

/// Whether `error` is a serialization failure or a deadlock (SQLSTATE 40001, 40P01): the
/// server rolled the statement's transaction back.
pub(super) fn is_rolled_back(error: &StoreError) -> bool {
    let StoreError::Unavailable {
        source: Some(source),
        ..
    } = error
    else {
        return false;
    };
    source
        .downcast_ref::<tokio_postgres::Error>()
        .and_then(tokio_postgres::Error::as_db_error)
        .is_some_and(|db| sqlstate_rolled_back(db.code().code()))
}

/// `what` ran out of the store's `timeout`.
pub(super) fn timed_out(what: &str, timeout: Duration) -> StoreError {
    StoreError::Unavailable {
        message: format!("{what} took longer than {timeout:?}"),
        source: None,
    }
}
