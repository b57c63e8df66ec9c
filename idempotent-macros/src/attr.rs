//! Parsing `#[idempotent(...)]`'s options. Every mistake is recorded and parsing goes on, so
//! that all of them are reported together.

use std::time::Duration;

use proc_macro2::TokenStream;
use quote::ToTokens;
use syn::meta::ParseNestedMeta;
use syn::{Expr, Ident, LitInt, LitStr, Path, Token};

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
    "max_output_bytes",
    "crate",
    "tx",
];

// The defaults (`Options::DEFAULT_TTL`, ...) and the limit `idempotent_core::MAX_DURATION`
// are not copied here (this crate cannot name them: the runtime depends on it). A check that
// needs one is emitted as a constant assertion that names it (see `expand::const_checks`).

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
    /// The largest recorded output, in bytes.
    pub(crate) max_output_bytes: Option<LitInt>,
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
            "max_output_bytes" => {
                let value = meta.value()?;
                if !value.peek(LitInt) {
                    let expr: Expr = value.parse()?;
                    errors.error_spanned_by(
                        &expr,
                        "`max_output_bytes` takes an integer literal, the largest recorded output in bytes, e.g. `max_output_bytes = 65536`",
                    );
                    return Ok(());
                }
                let limit: LitInt = value.parse()?;
                match limit.base10_parse::<usize>() {
                    Ok(0) => errors.error_spanned_by(
                        &limit,
                        "max_output_bytes must be more than zero: no output could be recorded",
                    ),
                    Ok(_) => self.max_output_bytes = Some(limit),
                    Err(error) => errors.error_spanned_by(
                        &limit,
                        format!("invalid max_output_bytes: {error}; write a number of bytes, e.g. `65536`"),
                    ),
                }
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

    /// Checks a literal `lease` against a literal `ttl`. Against a default (one of them not
    /// given), the check is a constant assertion in the expansion, which names the default.
    fn check_lease_within_ttl(&self, errors: &Errors) {
        let (
            Some(DurationOption::Literal { value: ttl, .. }),
            Some(DurationOption::Literal {
                value: lease,
                literal,
            }),
        ) = (&self.ttl, &self.lease)
        else {
            return;
        };
        if lease > ttl {
            errors.error_spanned_by(
                literal,
                format!(
                    "lease ({}) is longer than ttl ({}): a claim would outlive the record it protects",
                    humantime::format_duration(*lease),
                    humantime::format_duration(*ttl),
                ),
            );
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
