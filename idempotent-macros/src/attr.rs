//! Parsing `#[idempotent(...)]`'s options. Every mistake is recorded and parsing goes on, so
//! that all of them are reported together.

use std::time::Duration;

use proc_macro2::{Span, TokenStream};
use quote::ToTokens;
use syn::meta::ParseNestedMeta;
use syn::{Expr, Ident, LitStr, Path, Token};

use crate::errors::Errors;
use crate::suggest::closest;

const OPTIONS: &[&str] = &[
    "key",
    "ttl",
    "lease",
    "store",
    "skip",
    "scope",
    "name",
    "on_conflict",
    "on_lease_loss",
    "cache_errors",
    "crate",
    "tx",
];

/// The runtime's defaults, needed here only to check `lease` against an unset `ttl` (and the
/// reverse) at compile time; `idempotent_core::Options` has the same values.
pub(crate) const DEFAULT_TTL: Duration = Duration::from_secs(24 * 60 * 60);
pub(crate) const DEFAULT_LEASE: Duration = Duration::from_secs(30);

/// `idempotent_core::MAX_DURATION`, which this crate cannot name (the runtime depends on it);
/// the ui test `ttl_too_long` and the runtime's `Options::validate` hold the same limit.
const MAX_DURATION: std::time::Duration = std::time::Duration::from_secs(36_500 * 24 * 60 * 60);

/// A `ttl` or `lease`: a humantime string checked now, or a `Duration` expression.
pub(crate) enum DurationOption {
    Literal { value: Duration, literal: LitStr },
    Expr(Box<Expr>),
}

#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum OnConflict {
    Wait,
    Reject,
}

/// The attribute's options, as written.
#[derive(Default)]
pub(crate) struct Attr {
    pub(crate) key: Option<Expr>,
    pub(crate) ttl: Option<DurationOption>,
    pub(crate) lease: Option<DurationOption>,
    pub(crate) store: Option<Expr>,
    pub(crate) skip: Vec<Ident>,
    pub(crate) scope: Option<Expr>,
    pub(crate) name: Option<LitStr>,
    pub(crate) on_conflict: Option<OnConflict>,
    /// `on_lease_loss = "cancel"`: drop the body once its lease can no longer be renewed.
    pub(crate) cancel_on_lease_loss: bool,
    pub(crate) cache_errors: bool,
    pub(crate) krate: Option<Path>,
    /// The argument holding the caller's PostgreSQL transaction (transactional mode).
    pub(crate) tx: Option<Ident>,
    seen: Vec<String>,
}

impl Attr {
    /// Parses the attribute's arguments, recording mistakes in `errors`.
    pub(crate) fn parse(args: TokenStream, errors: &Errors) -> Attr {
        let mut attr = Attr::default();
        let parser = syn::meta::parser(|meta| {
            attr.parse_option(&meta, errors)?;
            Ok(())
        });
        if let Err(error) = syn::parse::Parser::parse2(parser, args) {
            errors.push(error);
        }
        attr.check_lease_within_ttl(errors);
        attr
    }

    fn parse_option(&mut self, meta: &ParseNestedMeta<'_>, errors: &Errors) -> syn::Result<()> {
        let name = meta
            .path
            .get_ident()
            .map(ToString::to_string)
            .unwrap_or_else(|| meta.path.to_token_stream().to_string().replace(' ', ""));
        if OPTIONS.contains(&name.as_str()) {
            if self.seen.contains(&name) {
                errors.error_spanned_by(
                    &meta.path,
                    format!("duplicate option `{name}`: give each option once"),
                );
                return skip_value(meta);
            }
            self.seen.push(name.clone());
        }
        match name.as_str() {
            "key" => self.key = Some(meta.value()?.parse()?),
            "store" => self.store = Some(meta.value()?.parse()?),
            "scope" => self.scope = Some(meta.value()?.parse()?),
            "ttl" => self.ttl = parse_duration(meta, "ttl", errors)?,
            "lease" => self.lease = parse_duration(meta, "lease", errors)?,
            "cache_errors" => {
                if meta.input.peek(Token![=]) || meta.input.peek(syn::token::Paren) {
                    errors.error_spanned_by(
                        &meta.path,
                        "`cache_errors` is a flag: write it alone, without a value",
                    );
                    skip_value(meta)?;
                }
                self.cache_errors = true;
            }
            "skip" => meta.parse_nested_meta(|inner| {
                match inner.path.get_ident() {
                    Some(ident) => self.skip.push(ident.clone()),
                    None => {
                        errors.error_spanned_by(&inner.path, "`skip(...)` takes argument names")
                    }
                }
                Ok(())
            })?,
            "name" => {
                let name: LitStr = meta.value()?.parse()?;
                if name.value().trim().is_empty() {
                    errors.error_spanned_by(
                        &name,
                        "`name` must not be empty: it is the namespace of this function's keys",
                    );
                }
                self.name = Some(name);
            }
            "on_conflict" => {
                let value: LitStr = meta.value()?.parse()?;
                self.on_conflict = match value.value().as_str() {
                    "wait" => Some(OnConflict::Wait),
                    "reject" => Some(OnConflict::Reject),
                    other => {
                        let hint = closest(other, &["wait", "reject"])
                            .map(|s| format!("; did you mean \"{s}\"?"))
                            .unwrap_or_default();
                        errors.error_spanned_by(
                            &value,
                            format!("unknown on_conflict value \"{other}\": expected \"wait\" or \"reject\"{hint}"),
                        );
                        None
                    }
                };
            }
            "on_lease_loss" => {
                let value: LitStr = meta.value()?.parse()?;
                match value.value().as_str() {
                    "continue" => self.cancel_on_lease_loss = false,
                    "cancel" => self.cancel_on_lease_loss = true,
                    other => {
                        let hint = closest(other, &["continue", "cancel"])
                            .map(|s| format!("; did you mean \"{s}\"?"))
                            .unwrap_or_default();
                        errors.error_spanned_by(
                            &value,
                            format!("unknown on_lease_loss value \"{other}\": expected \"continue\" or \"cancel\"{hint}"),
                        );
                    }
                }
            }
            "tx" => {
                let value: Expr = meta.value()?.parse()?;
                match &value {
                    Expr::Path(path) if path.path.get_ident().is_some() => {
                        self.tx = path.path.get_ident().cloned();
                    }
                    _ => errors.error_spanned_by(
                        &value,
                        "`tx` takes the name of the argument that holds the transaction, e.g. `tx = tx`",
                    ),
                }
            }
            "crate" => {
                let value = meta.value()?;
                self.krate = Some(if value.peek(LitStr) {
                    value.parse::<LitStr>()?.parse()?
                } else {
                    value.call(Path::parse_mod_style)?
                });
            }
            unknown => {
                let hint = closest(unknown, OPTIONS)
                    .map(|s| format!("did you mean `{s}`? "))
                    .unwrap_or_default();
                errors.error_spanned_by(
                    &meta.path,
                    format!(
                        "unknown option `{unknown}`; {hint}expected one of: {}",
                        OPTIONS.join(", ")
                    ),
                );
                skip_value(meta)?;
            }
        }
        Ok(())
    }

    fn check_lease_within_ttl(&self, errors: &Errors) {
        fn literal(option: &Option<DurationOption>, default: Duration) -> Option<Duration> {
            match option {
                None => Some(default),
                Some(DurationOption::Literal { value, .. }) => Some(*value),
                Some(DurationOption::Expr(_)) => None,
            }
        }
        let (Some(ttl), Some(lease)) = (
            literal(&self.ttl, DEFAULT_TTL),
            literal(&self.lease, DEFAULT_LEASE),
        ) else {
            return;
        };
        if lease > ttl {
            let message = format!(
                "lease ({}) is longer than ttl ({}): a claim would outlive the record it protects",
                humantime::format_duration(lease),
                humantime::format_duration(ttl),
            );
            match (&self.lease, &self.ttl) {
                (Some(DurationOption::Literal { literal, .. }), _) => {
                    errors.error_spanned_by(literal, message)
                }
                (_, Some(DurationOption::Literal { literal, .. })) => {
                    errors.error_spanned_by(literal, message)
                }
                _ => errors.push(syn::Error::new(Span::call_site(), message)),
            }
        }
    }
}

fn parse_duration(
    meta: &ParseNestedMeta<'_>,
    option: &str,
    errors: &Errors,
) -> syn::Result<Option<DurationOption>> {
    let value = meta.value()?;
    if !value.peek(LitStr) {
        return Ok(Some(DurationOption::Expr(Box::new(value.parse()?))));
    }
    let literal: LitStr = value.parse()?;
    match humantime::parse_duration(&literal.value()) {
        Ok(duration) if duration.is_zero() => {
            errors.error_spanned_by(&literal, format!("{option} must be longer than zero"));
            Ok(None)
        }
        Ok(duration) if duration > MAX_DURATION => {
            errors.error_spanned_by(
                &literal,
                format!(
                    "{option} is longer than 36500 days (idempotent_core::MAX_DURATION), the longest any store can hold"
                ),
            );
            Ok(None)
        }
        Ok(duration) => Ok(Some(DurationOption::Literal {
            value: duration,
            literal,
        })),
        Err(error) => {
            errors.error_spanned_by(
                &literal,
                format!(
                    "invalid {option} \"{}\": {error}; write a duration such as \"30s\", \"15min\" or \"24h\"",
                    literal.value()
                ),
            );
            Ok(None)
        }
    }
}

/// Consumes an option's value (`= expr` or `(...)`) so parsing can go on after a mistake.
fn skip_value(meta: &ParseNestedMeta<'_>) -> syn::Result<()> {
    if meta.input.peek(Token![=]) {
        meta.value()?.parse::<Expr>()?;
    } else if meta.input.peek(syn::token::Paren) {
        let content;
        syn::parenthesized!(content in meta.input);
        content.parse::<TokenStream>()?;
    }
    Ok(())
}
