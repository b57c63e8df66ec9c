//! Placeholder: filled in by the sqlx store work.
fn main() {}
