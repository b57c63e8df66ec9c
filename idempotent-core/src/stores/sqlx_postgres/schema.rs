//! The store's tables and their schema version: the same tables, version and migration as
//! `PostgresStore`'s (`stores/postgres/schema.rs`), with the statements of `postgres_sql.rs`.

use sqlx::postgres::PgConnection;
use sqlx::{AssertSqlSafe, Connection};

use super::SqlxPgStore;
use super::error::{from_sqlx, timed_out};
use crate::error::StoreError;
use crate::stores::postgres_sql::{self, SCHEMA_VERSION};

/// A timeout as the server's `statement_timeout` and `lock_timeout` take it: whole ms rounded
/// up, at least 1 (0 would mean no limit), at most `i32::MAX`.
pub(super) fn timeout_ms(timeout: std::time::Duration) -> i32 {
    i32::try_from(crate::store::held_millis(timeout)).unwrap_or(i32::MAX)
}

impl SqlxPgStore {
    /// The schema version recorded in `<table>_schema`, or `None` when the tables are missing
    /// or hold no version. Takes no lock on the records' table.
    async fn schema_version(
        &self,
        connection: &mut PgConnection,
    ) -> Result<Option<i32>, StoreError> {
        let exists: bool = sqlx::query_scalar(postgres_sql::SCHEMA_TABLE_EXISTS)
            .bind(format!("{}_schema", self.table))
            .fetch_one(&mut *connection)
            .await
            .map_err(|error| from_sqlx("could not look for the schema table", error))?;
        if !exists {
            return Ok(None);
        }
        sqlx::query_scalar(AssertSqlSafe(postgres_sql::schema_version_query(
            &self.table,
        )))
        .fetch_one(&mut *connection)
        .await
        .map_err(|error| from_sqlx("could not read the schema version", error))
    }

    fn newer_schema(&self, version: i32) -> StoreError {
        StoreError::Backend {
            message: format!(
                "table {} has schema version {version}, newer than this release knows ({SCHEMA_VERSION}): upgrade the library",
                self.table
            ),
            source: None,
        }
    }

    /// Brings the tables to [`SCHEMA_VERSION`] if they are not there yet, as `PostgresStore`
    /// does: the version is read first, with no lock on the records' table; when a migration is
    /// due, starters take turns on an advisory lock, and the migration waits for table locks
    /// no longer than the store's timeout (`SET LOCAL lock_timeout`), then fails the start
    /// rather than stall the table.
    pub(super) async fn migrate(&self) -> Result<(), StoreError> {
        let budget = self.timeout * 5;
        let work = async {
            let mut pooled = self
                .pool
                .acquire()
                .await
                .map_err(|error| from_sqlx("no database connection", error))?;
            match self.schema_version(&mut pooled).await? {
                Some(version) if version == SCHEMA_VERSION => return Ok(()),
                Some(version) if version > SCHEMA_VERSION => {
                    return Err(self.newer_schema(version));
                }
                _ => {}
            }
            let mut transaction = pooled
                .begin()
                .await
                .map_err(|error| from_sqlx("could not begin the schema transaction", error))?;
            // Processes starting together take turns; the lock ends with the transaction.
            sqlx::query(postgres_sql::SCHEMA_LOCK)
                .bind(&*self.table)
                .execute(&mut *transaction)
                .await
                .map_err(|error| from_sqlx("could not lock the schema", error))?;
            sqlx::raw_sql(AssertSqlSafe(format!(
                "SET LOCAL lock_timeout = {}; SET LOCAL statement_timeout = {}",
                timeout_ms(self.timeout),
                timeout_ms(budget)
            )))
            .execute(&mut *transaction)
            .await
            .map_err(|error| from_sqlx("could not set the schema's timeouts", error))?;
            // Another starter may have migrated while this one waited for its turn.
            match self.schema_version(&mut transaction).await? {
                Some(version) if version > SCHEMA_VERSION => {
                    return Err(self.newer_schema(version));
                }
                Some(version) if version == SCHEMA_VERSION => {}
                // New tables, or older ones the schema statements bring up to date.
                _ => {
                    sqlx::raw_sql(self.statements.schema.clone())
                        .execute(&mut *transaction)
                        .await
                        .map_err(|error| {
                            from_sqlx(
                                "could not create or upgrade the tables (a transaction holding \
                                 them longer than the store's timeout makes the upgrade give up: \
                                 start again when it has ended)",
                                error,
                            )
                        })?;
                    sqlx::query(AssertSqlSafe(postgres_sql::schema_version_insert(
                        &self.table,
                    )))
                    .bind(SCHEMA_VERSION)
                    .execute(&mut *transaction)
                    .await
                    .map_err(|error| from_sqlx("could not record the schema version", error))?;
                }
            }
            transaction
                .commit()
                .await
                .map_err(|error| from_sqlx("could not commit the schema", error))
        };
        // Out of time, the transaction's connection is dropped mid-statement: sqlx rolls the
        // transaction back when the statement ends, which `statement_timeout` bounds.
        tokio::time::timeout(budget, work)
            .await
            .map_err(|_| timed_out("creating the tables", budget))?
    }
}
