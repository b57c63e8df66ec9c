//! The Redis client's errors as store errors.

use redis::{ErrorKind, RedisError, ServerErrorKind};

use crate::error::StoreError;

/// Whether `error` says the server the connection reaches is not a primary: demoted to a
/// replica by a failover (`READONLY`), or a replica cut off from its primary (`MASTERDOWN`).
/// A new connection to the same address may reach the new primary.
pub(super) fn is_demoted(error: &RedisError) -> bool {
    matches!(
        error.kind(),
        ErrorKind::Server(ServerErrorKind::ReadOnly | ServerErrorKind::MasterDown)
    )
}

/// Whether `error` is a passing state of the deployment, not of the request: a demoted server,
/// or one loading its data after a restart (`LOADING`).
fn is_passing(error: &RedisError) -> bool {
    is_demoted(error) || error.kind() == ErrorKind::Server(ServerErrorKind::BusyLoading)
}

/// `error` as [`StoreError::Unavailable`], with `message` first.
pub(super) fn unavailable(message: &str, error: RedisError) -> StoreError {
    StoreError::Unavailable {
        message: format!("{message}: {error}{}", hint(&error)),
        source: Some(Box::new(error)),
    }
}

/// What to do about a connection that failed for want of TLS, or in its TLS handshake.
fn hint(error: &RedisError) -> &'static str {
    let text = error.to_string();
    if text.contains("invalid peer certificate") {
        "; the server's TLS certificate was refused: it must be signed by a CA of the roots \
         (RedisStoreBuilder::root_certificate_file, else the webpki roots) and name the URL's host"
    } else if error.is_connection_dropped() || text.contains("reset by peer") {
        "; if the server accepts only TLS connections, use a rediss:// URL (feature redis-tls)"
    } else {
        ""
    }
}

/// `error` as a store error with `message` first: [`StoreError::Unavailable`] for what passes
/// (the connection, a timeout, the deployment's state), else [`StoreError::Backend`].
pub(super) fn from_redis(message: &str, error: RedisError) -> StoreError {
    if error.is_io_error()
        || error.is_timeout()
        || error.is_connection_dropped()
        || error.is_connection_refusal()
        || is_passing(&error)
    {
        unavailable(message, error)
    } else {
        StoreError::Backend {
            message: format!("{message}: {error}"),
            source: Some(Box::new(error)),
        }
    }
}
