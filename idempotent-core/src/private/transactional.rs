//! The transactional mode as `#[idempotent(tx = tx, store = ...)]` calls it, for every store
//! that has one.
//!
//! The generated code puts the transaction argument in a [`TxCell`]; the store's ledger locks
//! the cell for its claim and for its record, and the body holds it while it runs, seeing the
//! transaction as the function declared it ([`Reborrow`]): a `&mut` transaction stays `&mut`
//! (sqlx executes on `&mut`), a `&` one stays shared. The engine never writes while the body
//! runs (a transaction needs no lease), so the two never wait for each other.

use std::future::Future;
use std::sync::Arc;

use serde::Serialize;
use serde::de::DeserializeOwned;

use super::{IsResult, run_over};
use crate::engine::Prepared;
use crate::error::Error;
use crate::options::Options;
use crate::recorded::OkOnly;

/// The transaction argument, shared in turns between the store's ledger and the body.
pub struct TxCell<T>(pub(crate) tokio::sync::Mutex<T>);

impl<T> TxCell<T> {
    pub fn new(tx: T) -> Self {
        Self(tokio::sync::Mutex::new(tx))
    }

    pub async fn lock(&self) -> tokio::sync::MutexGuard<'_, T> {
        self.0.lock().await
    }
}

/// The transaction as the body sees it, from the cell's guard: as the function declared it.
pub trait Reborrow {
    type Out<'g>
    where
        Self: 'g;

    fn reborrow(&mut self) -> Self::Out<'_>;
}

impl<'a, T: ?Sized> Reborrow for &'a T {
    type Out<'g>
        = &'a T
    where
        Self: 'g;

    fn reborrow(&mut self) -> &'a T {
        self
    }
}

impl<T: ?Sized> Reborrow for &mut T {
    type Out<'g>
        = &'g mut T
    where
        Self: 'g;

    fn reborrow(&mut self) -> &mut T {
        self
    }
}

/// What `store = ...` accepts in the transactional mode: a store that has one, or an `Arc` or
/// reference to one.
#[diagnostic::on_unimplemented(
    message = "`tx = ...` needs `store = ...` to be a store with a transactional mode, found `{Self}`",
    label = "not a `PostgresStore`, `SqlxPgStore`, `SqlxSqliteStore` or `SqliteStore` (or an `Arc` or reference to one)"
)]
pub trait TransactionalStoreHandle {
    type Store: ?Sized;

    fn transactional_store(&self) -> &Self::Store;
}

impl<S: TransactionalStoreHandle + ?Sized> TransactionalStoreHandle for &S {
    type Store = S::Store;

    fn transactional_store(&self) -> &S::Store {
        (**self).transactional_store()
    }
}

impl<S: TransactionalStoreHandle + ?Sized> TransactionalStoreHandle for Arc<S> {
    type Store = S::Store;

    fn transactional_store(&self) -> &S::Store {
        (**self).transactional_store()
    }
}

pub fn transactional_store<S: TransactionalStoreHandle + ?Sized>(store: &S) -> &S::Store {
    store.transactional_store()
}

/// A store whose transactional mode writes in transactions of type `T`.
#[diagnostic::on_unimplemented(
    message = "the store `{Self}` cannot write its records in a transaction of type `{T}`",
    label = "`tx = ...` names an argument of type `{T}`",
    note = "a `PostgresStore` writes in a tokio-postgres or deadpool-postgres transaction, a `SqlxPgStore` in a `&mut sqlx::Transaction<'_, Postgres>`, a `SqlxSqliteStore` in a `&mut sqlx::Transaction<'_, Sqlite>`, a `SqliteStore` in a `&` or `&mut rusqlite::Transaction<'_>`"
)]
pub trait TransactionalStore<T>: TransactionalMode {
    /// The ledger that writes the claim and the record in the cell's transaction. Its type
    /// does not depend on `T`: the future of a generic function whose state holds a type that
    /// needs `T`'s trait bounds is not seen to be `Send` (rust-lang/rust#100013).
    fn in_transaction<'a>(&'a self, cell: &'a TxCell<T>) -> Self::Ledger<'a>;
}

/// The ledger type of a store's transactional mode, named by the store alone. A call's future
/// holds only the ledger of its own store, so the rusqlite ledger, which is neither `Send` nor
/// `Sync`, leaves the other stores' calls `Send`: a `match` over one enum of every ledger would
/// hold each variant's future, and be `Send` only if all were.
pub trait TransactionalMode {
    type Ledger<'a>: RunInTransaction;
}

/// A ledger that runs a call in its transaction.
pub trait RunInTransaction {
    fn run<R, F>(self, options: &Options, call: Prepared, body: F) -> impl Future<Output = R>
    where
        R: IsResult,
        R::Ok: Serialize + DeserializeOwned,
        R::Err: From<Error>,
        F: Future<Output = R>;
}

/// The ledgers of the stores' transactional modes whose calls are `Send`.
#[cfg(any(
    feature = "postgres",
    feature = "sqlx-postgres",
    feature = "sqlx-sqlite"
))]
pub enum TxLedger<'a> {
    #[cfg(feature = "postgres")]
    Postgres(crate::stores::postgres::InTransaction<'a>),
    #[cfg(feature = "sqlx-postgres")]
    SqlxPostgres(crate::stores::sqlx_postgres::InSqlxPgTransaction<'a>),
    #[cfg(feature = "sqlx-sqlite")]
    SqlxSqlite(crate::stores::sqlx_sqlite::InSqlxSqliteTransaction<'a>),
}

#[cfg(any(
    feature = "postgres",
    feature = "sqlx-postgres",
    feature = "sqlx-sqlite"
))]
impl RunInTransaction for TxLedger<'_> {
    async fn run<R, F>(self, options: &Options, call: Prepared, body: F) -> R
    where
        R: IsResult,
        R::Ok: Serialize + DeserializeOwned,
        R::Err: From<Error>,
        F: Future<Output = R>,
    {
        match self {
            #[cfg(feature = "postgres")]
            TxLedger::Postgres(ledger) => {
                run_over::<OkOnly, R, F>(&ledger, options, call, body).await
            }
            #[cfg(feature = "sqlx-postgres")]
            TxLedger::SqlxPostgres(ledger) => {
                run_over::<OkOnly, R, F>(&ledger, options, call, body).await
            }
            #[cfg(feature = "sqlx-sqlite")]
            TxLedger::SqlxSqlite(ledger) => {
                run_over::<OkOnly, R, F>(&ledger, options, call, body).await
            }
        }
    }
}

pub async fn run_in_transaction<S, T, R, F>(
    store: &S,
    cell: &TxCell<T>,
    options: &Options,
    call: Prepared,
    body: F,
) -> R
where
    S: TransactionalStore<T> + ?Sized,
    R: IsResult,
    R::Ok: Serialize + DeserializeOwned,
    R::Err: From<Error>,
    F: Future<Output = R>,
{
    store.in_transaction(cell).run(options, call, body).await
}

#[cfg(feature = "postgres")]
mod postgres {
    use super::*;
    use crate::stores::postgres::{InTransaction, PostgresStore, PostgresTransaction};

    impl TransactionalMode for PostgresStore {
        type Ledger<'a> = TxLedger<'a>;
    }

    impl TransactionalStoreHandle for PostgresStore {
        type Store = PostgresStore;

        fn transactional_store(&self) -> &PostgresStore {
            self
        }
    }

    impl<T: PostgresTransaction + Send> TransactionalStore<T> for PostgresStore {
        fn in_transaction<'a>(&'a self, cell: &'a TxCell<T>) -> TxLedger<'a> {
            TxLedger::Postgres(InTransaction::new(self, &cell.0))
        }
    }
}

#[cfg(feature = "sqlx-postgres")]
mod sqlx_postgres {
    use super::*;
    use crate::stores::sqlx_postgres::{InSqlxPgTransaction, SqlxPgStore};
    use sqlx::{Postgres, Transaction};

    impl TransactionalMode for SqlxPgStore {
        type Ledger<'a> = TxLedger<'a>;
    }

    impl TransactionalStoreHandle for SqlxPgStore {
        type Store = SqlxPgStore;

        fn transactional_store(&self) -> &SqlxPgStore {
            self
        }
    }

    impl<'c> TransactionalStore<&mut Transaction<'c, Postgres>> for SqlxPgStore {
        fn in_transaction<'a>(
            &'a self,
            cell: &'a TxCell<&mut Transaction<'c, Postgres>>,
        ) -> TxLedger<'a> {
            TxLedger::SqlxPostgres(InSqlxPgTransaction::new(self, &cell.0))
        }
    }
}

#[cfg(feature = "sqlx-sqlite")]
mod sqlx_sqlite {
    use super::*;
    use crate::stores::sqlx_sqlite::{InSqlxSqliteTransaction, SqlxSqliteStore};
    use sqlx::{Sqlite, Transaction};

    impl TransactionalMode for SqlxSqliteStore {
        type Ledger<'a> = TxLedger<'a>;
    }

    impl TransactionalStoreHandle for SqlxSqliteStore {
        type Store = SqlxSqliteStore;

        fn transactional_store(&self) -> &SqlxSqliteStore {
            self
        }
    }

    impl<'c> TransactionalStore<&mut Transaction<'c, Sqlite>> for SqlxSqliteStore {
        fn in_transaction<'a>(
            &'a self,
            cell: &'a TxCell<&mut Transaction<'c, Sqlite>>,
        ) -> TxLedger<'a> {
            TxLedger::SqlxSqlite(InSqlxSqliteTransaction::new(self, &cell.0))
        }
    }
}

#[cfg(feature = "sqlite")]
mod sqlite {
    use super::*;
    use crate::stores::sqlite::{InSqliteTransaction, SqliteStore};
    use rusqlite::Transaction;

    impl TransactionalMode for SqliteStore {
        type Ledger<'a> = InSqliteTransaction<'a>;
    }

    impl RunInTransaction for InSqliteTransaction<'_> {
        async fn run<R, F>(self, options: &Options, call: Prepared, body: F) -> R
        where
            R: IsResult,
            R::Ok: Serialize + DeserializeOwned,
            R::Err: From<Error>,
            F: Future<Output = R>,
        {
            run_over::<OkOnly, R, F>(&self, options, call, body).await
        }
    }

    impl TransactionalStoreHandle for SqliteStore {
        type Store = SqliteStore;

        fn transactional_store(&self) -> &SqliteStore {
            self
        }
    }

    impl<'c> TransactionalStore<&Transaction<'c>> for SqliteStore {
        fn in_transaction<'a>(
            &'a self,
            cell: &'a TxCell<&Transaction<'c>>,
        ) -> InSqliteTransaction<'a> {
            InSqliteTransaction::new(self, &cell.0)
        }
    }

    impl<'c> TransactionalStore<&mut Transaction<'c>> for SqliteStore {
        fn in_transaction<'a>(
            &'a self,
            cell: &'a TxCell<&mut Transaction<'c>>,
        ) -> InSqliteTransaction<'a> {
            InSqliteTransaction::new(self, &cell.0)
        }
    }
}
