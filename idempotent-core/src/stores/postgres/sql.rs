//! The SQL of the PostgreSQL store: shared with the sqlx store (`stores/postgres_sql.rs`).

pub(crate) use crate::stores::postgres_sql::*;
