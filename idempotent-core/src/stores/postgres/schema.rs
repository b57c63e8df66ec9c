//! The store's tables, their schema version, and bringing them to this release's version.
//!
//! ```sql
//! <table>_schema(version integer NOT NULL)  -- the schema versions applied
//! SEQUENCE <table>_fences                   -- where fences come from
//! <table>(key bytea PRIMARY KEY,            -- the 32-byte storage key
//!         fingerprint bytea NOT NULL,       -- 32 bytes
//!         fence bigint NOT NULL,
//!         state smallint NOT NULL,          -- 0 in progress, 1 completed
//!         until timestamptz NOT NULL,       -- the lease end or the expiry
//!         output bytea,                     -- a completed record's output
//!         format smallint NOT NULL,         -- the record format version, 1
//!         waiting boolean NOT NULL DEFAULT false)  -- a waiter asked to be notified
//! INDEX <table>_until ON <table> (until)
//! ```

use super::PostgresStore;
use super::error::{from_pg, timed_out};
use super::pool::{Running, timeout_ms};
use super::sql;
use crate::error::StoreError;

impl PostgresStore {
    /// The schema version recorded in `<table>_schema`, or `None` when the tables are missing
    /// or hold no version. Takes no lock on the records' table.
    async fn schema_version(
        &self,
        client: &impl tokio_postgres::GenericClient,
    ) -> Result<Option<i32>, StoreError> {
        let schema_table = format!("{}_schema", self.table);
        let exists: bool = client
            .query_one(sql::SCHEMA_TABLE_EXISTS, &[&schema_table])
            .await
            .and_then(|row| row.try_get(0))
            .map_err(|error| from_pg("could not look for the schema table", error))?;
        if !exists {
            return Ok(None);
        }
        client
            .query_one(&sql::schema_version_query(&self.table), &[])
            .await
            .and_then(|row| row.try_get(0))
            .map_err(|error| from_pg("could not read the schema version", error))
    }

    fn newer_schema(&self, version: i32) -> StoreError {
        StoreError::Backend {
            message: format!(
                "table {} has schema version {version}, newer than this release knows ({}): upgrade the library",
                self.table,
                sql::SCHEMA_VERSION
            ),
            source: None,
        }
    }

    /// Brings the tables to [`sql::SCHEMA_VERSION`] if they are not there yet.
    ///
    /// The version is read first, with no lock on the records' table: on tables that are up to
    /// date (every start but the first of a release) nothing else runs. `ALTER TABLE` waits for
    /// an exclusive lock on the table, behind any open transaction that touched it, and every
    /// statement on the table then queues behind that wait: run on every start, it let one
    /// server starting stall the calls of the whole fleet. When a migration is due, starters
    /// take turns on an advisory lock, and the migration waits for table locks no longer than
    /// the store's timeout (`lock_timeout`), then fails the start rather than stall the table.
    pub(super) async fn migrate(&self) -> Result<(), StoreError> {
        let budget = self.timeout * 5;
        let pooled = tokio::time::timeout(budget, self.client())
            .await
            .map_err(|_| timed_out("getting a connection", budget))??;
        let mut running = Running::new(pooled, self.timeout, self.connector.clone());
        let work = async {
            let pooled = running.connection();
            match self.schema_version(&**pooled.client()).await? {
                Some(version) if version == sql::SCHEMA_VERSION => return Ok(()),
                Some(version) if version > sql::SCHEMA_VERSION => {
                    return Err(self.newer_schema(version));
                }
                _ => {}
            }
            let transaction = pooled
                .client()
                .transaction()
                .await
                .map_err(|error| from_pg("could not begin the schema transaction", error))?;
            // Processes starting together take turns; the lock ends with the transaction.
            transaction
                .execute(sql::SCHEMA_LOCK, &[&self.table])
                .await
                .map_err(|error| from_pg("could not lock the schema", error))?;
            transaction
                .batch_execute(&format!(
                    "SET LOCAL lock_timeout = {}; SET LOCAL statement_timeout = {}",
                    timeout_ms(self.timeout),
                    timeout_ms(budget)
                ))
                .await
                .map_err(|error| from_pg("could not set the schema's timeouts", error))?;
            // Another starter may have migrated while this one waited for its turn.
            let version = self.schema_version(&*transaction).await?;
            match version {
                Some(version) if version > sql::SCHEMA_VERSION => {
                    return Err(self.newer_schema(version));
                }
                Some(version) if version == sql::SCHEMA_VERSION => {}
                // New tables, or older ones the schema statements bring up to date.
                _ => {
                    transaction
                        .batch_execute(&self.statements.schema)
                        .await
                        .map_err(|error| {
                            from_pg(
                                "could not create or upgrade the tables (a transaction holding \
                                 them longer than the store's timeout makes the upgrade give up: \
                                 start again when it has ended)",
                                error,
                            )
                        })?;
                    let insert = sql::schema_version_insert(&self.table);
                    transaction
                        .execute(&insert, &[&sql::SCHEMA_VERSION])
                        .await
                        .map_err(|error| from_pg("could not record the schema version", error))?;
                }
            }
            transaction
                .commit()
                .await
                .map_err(|error| from_pg("could not commit the schema", error))
        };
        let outcome = tokio::time::timeout(budget, work).await;
        running.end(outcome, "creating the tables", budget).await
    }
}
