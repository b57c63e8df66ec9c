//! Checks the annotated item: an async fn with a body and a return type, whose `skip`ped
//! names are its arguments. Finds what expansion needs: the arguments and the output types.

use proc_macro2::{Span, TokenStream};
use syn::spanned::Spanned;
use syn::{FnArg, GenericArgument, Ident, Pat, PathArguments, ReturnType, Signature, Type};

use crate::attr::Attr;
use crate::errors::Errors;
use crate::suggest::closest;

/// One typed argument of the function (the receiver is never one).
pub(crate) struct Argument {
    /// The name the generated code uses: the user's own identifier, or a generated one for a
    /// pattern argument.
    pub(crate) binding: Ident,
    /// For a pattern argument, the pattern to destructure `binding` into inside the body.
    pub(crate) pattern: Option<Box<Pat>>,
    /// Its type, whose span fingerprint errors point at.
    pub(crate) ty: Box<Type>,
    /// Left out of the fingerprint (`skip(..)`).
    pub(crate) skipped: bool,
}

/// What expansion needs to know of the signature.
pub(crate) struct Checked {
    pub(crate) arguments: Vec<Argument>,
    /// The declared return type. Its `Ok` and `Err` types are named through
    /// `__private::IsResult`, so any alias of `Result` works, whatever its name.
    pub(crate) output: Box<Type>,
    /// The written `T` and `E` of `Result<T, E>` (or of an alias named `Result`), where errors
    /// about the `Ok` and `Err` types point. Only spans: the types themselves always come from
    /// `IsResult`.
    pub(crate) ok_span: Option<Span>,
    pub(crate) err_span: Option<Span>,
}

/// Tells the user what the attribute was put on, when that is not a function with a body.
pub(crate) fn not_a_function(item: &TokenStream) -> syn::Error {
    if let Ok(method) = syn::parse2::<syn::TraitItemFn>(item.clone())
        && method.default.is_none()
    {
        return syn::Error::new_spanned(
            &method.sig,
            "#[idempotent] needs a function body: put it on the method in each impl, not on the trait's declaration",
        );
    }
    let what = match syn::parse2::<syn::Item>(item.clone()) {
        Ok(syn::Item::Struct(item)) => Some(("a struct", item.struct_token.span())),
        Ok(syn::Item::Enum(item)) => Some(("an enum", item.enum_token.span())),
        Ok(syn::Item::Const(item)) => Some(("a const", item.const_token.span())),
        Ok(syn::Item::Static(item)) => Some(("a static", item.static_token.span())),
        Ok(syn::Item::Impl(item)) => Some(("an impl block", item.impl_token.span())),
        Ok(syn::Item::Trait(item)) => Some(("a trait", item.trait_token.span())),
        Ok(syn::Item::Mod(item)) => Some(("a module", item.mod_token.span())),
        Ok(syn::Item::Type(item)) => Some(("a type alias", item.type_token.span())),
        _ => None,
    };
    match what {
        Some((what, span)) => syn::Error::new(
            span,
            format!("#[idempotent] goes on an async fn, not on {what}"),
        ),
        None => syn::Error::new(Span::call_site(), "#[idempotent] goes on an async fn"),
    }
}

/// Checks `function` against `attr`, recording every problem in `errors`.
pub(crate) fn check(attr: &Attr, sig: &Signature, errors: &Errors) -> Option<Checked> {
    if sig.asyncness.is_none() {
        errors.error_spanned_by(
            sig.fn_token,
            "#[idempotent] needs an `async fn`: the key is claimed in a store before the body runs",
        );
    }
    if let Some(constness) = &sig.constness {
        errors.error_spanned_by(constness, "#[idempotent] cannot be used on a `const fn`");
    }
    if let Some(variadic) = &sig.variadic {
        errors.error_spanned_by(
            variadic,
            "#[idempotent] cannot be used on a variadic function",
        );
    }

    let arguments = arguments(sig);
    for skipped in &attr.skip {
        if skipped == "self" {
            errors.error_spanned_by(
                skipped,
                "`self` is never part of the fingerprint: remove it from `skip`",
            );
            continue;
        }
        if !arguments
            .iter()
            .any(|arg| arg.pattern.is_none() && arg.binding == *skipped)
        {
            let names: Vec<String> = arguments
                .iter()
                .filter(|arg| arg.pattern.is_none())
                .map(|arg| arg.binding.to_string())
                .collect();
            let names: Vec<&str> = names.iter().map(String::as_str).collect();
            let hint = closest(&skipped.to_string(), &names)
                .map(|name| format!("; did you mean `{name}`?"))
                .unwrap_or_default();
            errors.error_spanned_by(
                skipped,
                format!("cannot skip `{skipped}`: the function has no argument of that name{hint}"),
            );
        }
    }
    if let Some(tx) = &attr.tx {
        if !arguments
            .iter()
            .any(|arg| arg.pattern.is_none() && arg.binding == *tx)
        {
            errors.error_spanned_by(
                tx,
                format!(
                    "`tx = {tx}`: the function has no argument named `{tx}` to hold the transaction"
                ),
            );
        }
        if attr.store.is_none() {
            errors.error_spanned_by(
                tx,
                "`tx = ...` needs `store = ...` naming the store the records are kept in (a `PostgresStore`, `SqlxPgStore`, `SqlxSqliteStore` or `SqliteStore`)",
            );
        }
        if attr.cache_errors {
            errors.error_spanned_by(
                tx,
                "`cache_errors` cannot be combined with `tx`: an error's transaction is rolled back, and its record with it",
            );
        }
    }
    let arguments = arguments
        .into_iter()
        .map(|mut arg| {
            // The transaction is how the call runs, not what it is: never fingerprinted.
            arg.skipped = arg.pattern.is_none()
                && (attr.skip.contains(&arg.binding) || attr.tx.as_ref() == Some(&arg.binding));
            arg
        })
        .collect();

    let output = match &sig.output {
        ReturnType::Type(_, ty) => ty.clone(),
        ReturnType::Default => {
            errors.error_spanned_by(
                &sig.ident,
                "an #[idempotent] function must return `Result<T, E>`: its `Ok` value is what is recorded and replayed",
            );
            return None;
        }
    };
    // Whether the type is a `Result` at all is left to the compiler (`IsResult` reports it,
    // spanned on the return type): only it can see through aliases.
    let (ok_span, err_span) = result_argument_spans(&output);
    Some(Checked {
        arguments,
        ok_span,
        err_span,
        output,
    })
}

/// The spans of `T` and `E` where the return type is written `Result<T, E>` (or `Result<T>`,
/// an alias), so that an unmet bound on either is reported on it.
fn result_argument_spans(ty: &Type) -> (Option<Span>, Option<Span>) {
    let Type::Path(path) = ty else {
        return (None, None);
    };
    let Some(last) = path.path.segments.last() else {
        return (None, None);
    };
    let PathArguments::AngleBracketed(args) = &last.arguments else {
        return (None, None);
    };
    if last.ident != "Result" {
        return (None, None);
    }
    let mut types = args.args.iter().filter_map(|arg| match arg {
        GenericArgument::Type(ty) => Some(ty.span()),
        _ => None,
    });
    (types.next(), types.next())
}

fn arguments(sig: &Signature) -> Vec<Argument> {
    sig.inputs
        .iter()
        .enumerate()
        .filter_map(|(index, input)| match input {
            FnArg::Receiver(_) => None,
            FnArg::Typed(typed) => Some(match &*typed.pat {
                Pat::Ident(pat) if pat.subpat.is_none() => Argument {
                    binding: pat.ident.clone(),
                    pattern: None,
                    ty: typed.ty.clone(),
                    skipped: false,
                },
                pattern => Argument {
                    binding: Ident::new(&format!("__idempotent_arg{index}"), Span::mixed_site()),
                    pattern: Some(Box::new(pattern.clone())),
                    ty: typed.ty.clone(),
                    skipped: false,
                },
            }),
        })
        .collect()
}
