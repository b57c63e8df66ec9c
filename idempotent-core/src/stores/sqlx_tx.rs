//! The caller's sqlx transaction in the transactional mode, which the store's ledger and the
//! body take in turns: the ledger locks it for each of its statements, the body holds it while
//! it runs (sqlx executes only on `&mut`).
//!
//! The ledger reaches the transaction through [`LockConnection`], which erases how it is held
//! down to the connection it runs on: the ledger's type then names neither the transaction's
//! lifetimes nor its type, so the `#[idempotent(tx = tx)]` runner, which is generic over the
//! transaction, holds a ledger of one type (see `private/transactional.rs`).

use std::future::Future;
use std::ops::{Deref, DerefMut};
use std::pin::Pin;

use sqlx::{Database, Transaction};

/// The connection of a locked transaction.
pub(crate) type Locked<'g, C> = Box<dyn DerefMut<Target = C> + Send + 'g>;

/// A lock around the caller's transaction on a connection `C`.
pub(crate) trait LockConnection<C: ?Sized>: Sync {
    /// Waits for the transaction, and holds it until the answer is dropped.
    fn lock(&self) -> Pin<Box<dyn Future<Output = Locked<'_, C>> + Send + '_>>;
}

struct Guard<'g, 'x, 'c, DB: Database>(tokio::sync::MutexGuard<'g, &'x mut Transaction<'c, DB>>);

impl<DB: Database> Deref for Guard<'_, '_, '_, DB> {
    type Target = DB::Connection;

    fn deref(&self) -> &DB::Connection {
        &self.0
    }
}

impl<DB: Database> DerefMut for Guard<'_, '_, '_, DB> {
    fn deref_mut(&mut self) -> &mut DB::Connection {
        &mut self.0
    }
}

impl<'x, 'c, DB: Database> LockConnection<DB::Connection>
    for tokio::sync::Mutex<&'x mut Transaction<'c, DB>>
{
    fn lock(&self) -> Pin<Box<dyn Future<Output = Locked<'_, DB::Connection>> + Send + '_>> {
        Box::pin(async move { Box::new(Guard(self.lock().await)) as Locked<'_, DB::Connection> })
    }
}
