//! sqlx's errors as store errors, with what the server said.

use std::time::Duration;

use sqlx::postgres::PgDatabaseError;

use crate::error::StoreError;
use crate::stores::postgres_sql::{sqlstate_passes, sqlstate_rolled_back};

/// `error` as a store error with `message` first: [`StoreError::Unavailable`] for what passes
/// (the connection, the pool, the server's state, a rolled-back statement), else
/// [`StoreError::Backend`].
pub(crate) fn from_sqlx(message: &str, error: sqlx::Error) -> StoreError {
    let passing = match &error {
        sqlx::Error::Database(db) => db.code().is_some_and(|code| sqlstate_passes(&code)),
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::Protocol(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed => true,
        _ => false,
    };
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

/// What the server said (its message and SQLSTATE, with detail and hint), or sqlx's error.
pub(super) fn describe(error: &sqlx::Error) -> String {
    let sqlx::Error::Database(db) = error else {
        return error.to_string();
    };
    let Some(pg) = db.try_downcast_ref::<PgDatabaseError>() else {
        return error.to_string();
    };
    let severity = format!("{:?}", pg.severity()).to_uppercase();
    let mut text = format!("{severity}: {} (SQLSTATE {})", pg.message(), pg.code());
    if let Some(detail) = pg.detail() {
        text.push_str(&format!("; detail: {detail}"));
    }
    if let Some(hint) = pg.hint() {
        text.push_str(&format!("; hint: {hint}"));
    }
    text
}

/// The SQLSTATE of a server error.
pub(super) fn sqlstate(error: &sqlx::Error) -> Option<String> {
    match error {
        sqlx::Error::Database(db) => db.code().map(|code| code.into_owned()),
        _ => None,
    }
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
        .downcast_ref::<sqlx::Error>()
        .and_then(sqlstate)
        .is_some_and(|code| sqlstate_rolled_back(&code))
}

/// `what` ran out of the store's `timeout`.
pub(super) fn timed_out(what: &str, timeout: Duration) -> StoreError {
    StoreError::Unavailable {
        message: format!("{what} took longer than {timeout:?}"),
        source: None,
    }
}
