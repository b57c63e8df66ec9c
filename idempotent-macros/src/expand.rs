//! Code generation: the function, rewritten to claim its key before running its body.

use proc_macro2::{Span, TokenStream};
use quote::{ToTokens, quote, quote_spanned};
use syn::spanned::Spanned;
use syn::{FnArg, Ident, Pat, PatIdent, PatType, Path, Signature};

use crate::attr::{Attr, DurationOption, OnConflict};
use crate::item::MaybeItemFn;
use crate::validate::Checked;

/// A name for generated code that user code can neither see nor shadow.
fn generated(name: &str) -> Ident {
    Ident::new(name, Span::mixed_site())
}

pub(crate) fn expand(attr: &Attr, mut function: MaybeItemFn, checked: &Checked) -> TokenStream {
    let krate: Path = attr
        .krate
        .clone()
        .unwrap_or_else(|| syn::parse_quote!(::idempotent_core));
    let private = quote!(#krate::__private);

    let arguments = generated("__idempotent_arguments");
    let prepared = generated("__idempotent_call");
    let key_bytes = generated("__idempotent_key");
    let scope_bytes = generated("__idempotent_scope");
    let store = generated("__idempotent_store");
    let options = generated("__idempotent_options");
    let fake_return = generated("__idempotent_fake_return");
    let namespace = generated("__IDEMPOTENT_NAMESPACE");

    let pushes = checked
        .arguments
        .iter()
        .filter(|arg| !arg.skipped)
        .map(|arg| {
            let binding = &arg.binding;
            quote_spanned! {arg.ty.span()=>
                #private::push_argument(&mut #arguments, &#binding);
            }
        });

    let name = match &attr.name {
        Some(name) => name.to_token_stream(),
        None => {
            let ident = &function.sig.ident;
            quote!(::core::concat!(
                ::core::module_path!(),
                "::",
                ::core::stringify!(#ident)
            ))
        }
    };
    // The key and scope are computed as a `match` scrutinee: temporaries there (`key =
    // format!(..)`) live until the match ends, and `&(expr)` keeps the user's span, so a type
    // that is not a key is reported on the expression.
    let key_bytes_of = |option: &Option<syn::Expr>| match option {
        Some(expr) => quote_spanned! {expr.span()=>
            ::core::option::Option::Some(#private::IdempotencyKey::key_bytes(&(#expr)))
        },
        None => quote!(::core::option::Option::<#private::Cow<'_, [u8]>>::None),
    };
    let key = key_bytes_of(&attr.key);
    let scope = key_bytes_of(&attr.scope);

    let store_init = match (&attr.store, &attr.tx) {
        (Some(expr), Some(_)) => quote_spanned! {expr.span()=>
            let #store = #private::transactional_store(&(#expr));
        },
        (Some(expr), None) => {
            // The value is bound first, so that a temporary (`store = make_store()`) lives to
            // the end, under a name located at the expression, so that a type that is no
            // store is reported there.
            let store_value = Ident::new(
                "__idempotent_store_value",
                Span::mixed_site().located_at(expr.span()),
            );
            quote_spanned! {expr.span()=>
                let #store_value = &(#expr);
                let #store = #private::store_handle(#store_value);
            }
        }
        (None, _) => quote!(let #store = #private::default_store();),
    };

    let ttl = attr
        .ttl
        .as_ref()
        .map(|ttl| duration_call(&private, "with_ttl", ttl));
    let lease = attr
        .lease
        .as_ref()
        .map(|lease| duration_call(&private, "with_lease", lease));
    let on_conflict = match attr.on_conflict {
        Some(OnConflict::Reject) => Some(quote!(.with_on_conflict(#private::OnConflict::Reject))),
        Some(OnConflict::Wait) | None => None,
    };
    let max_output_bytes = attr.max_output_bytes.as_ref().map(|limit| {
        let limit = syn::LitInt::new(&format!("{}usize", limit.base10_digits()), limit.span());
        quote_spanned!(limit.span()=> .with_max_output_bytes(#limit))
    });
    let const_checks = const_checks(attr, &private);
    let on_lease_loss = attr
        .cancel_on_lease_loss
        .then(|| quote!(.with_on_lease_loss(#private::OnLeaseLoss::Cancel)));

    // In the transactional mode the transaction goes into a cell that the store's ledger and
    // the body take in turns: the body holds it while it runs, under the user's own name and
    // as the function declared it (`&mut` stays `&mut`), and the ledger writes the claim
    // before and the record after.
    let tx_cell = Ident::new("__idempotent_tx", Span::mixed_site());
    let tx_guard = Ident::new("__idempotent_tx_guard", Span::mixed_site());
    let (runner, tx_arg, tx_cell_init, tx_take) = match &attr.tx {
        Some(tx) => (
            quote!(run_in_transaction),
            quote!(#tx_cell,),
            quote! {
                let #tx_cell = #private::TxCell::new(#tx);
                let #tx_cell = &#tx_cell;
            },
            quote! {
                let mut #tx_guard = #tx_cell.lock().await;
                let #tx = #private::Reborrow::reborrow(&mut *#tx_guard);
            },
        ),
        None if attr.cache_errors => (quote!(run_caching_errors), quote!(), quote!(), quote!()),
        None => (quote!(run), quote!(), quote!(), quote!()),
    };
    let output = &checked.output;
    let private_at_output = respan(private.clone(), output.span());
    let destructure = checked.arguments.iter().filter_map(|arg| {
        let pattern = arg.pattern.as_ref()?;
        let binding = &arg.binding;
        Some(quote!(let #pattern = #binding;))
    });
    let block = &function.body;
    // The fake return edge (as in tracing-attributes) gives the async block the function's
    // return type, so `?` and `return` in the body infer as they did in the function.
    // The runner takes the return type as written and names `T` and `E` through `IsResult`,
    // which works for any alias of `Result` and reports any other type on the return type.
    let run = quote_spanned! {output.span()=>
        #private_at_output::#runner(#store, #tx_arg &#options, #prepared, async move {
            #[allow(
                unknown_lints,
                unreachable_code,
                clippy::diverging_sub_expression,
                clippy::empty_loop,
                clippy::let_unit_value,
                clippy::needless_return
            )]
            if false {
                let #fake_return: #output = loop {};
                return #fake_return;
            }
            #tx_take
            #(#destructure)*
            #block
        })
        .await
    };

    let assertions = assertions(attr, checked, &private);
    let body = quote! {
            #const_checks
            #assertions
            let #prepared = {
                // The function's namespace hashes its part of every storage key once.
                static #namespace: #private::Namespace = #private::Namespace::new(#name);
                let mut #arguments = #private::ArgumentCollector::new();
                #(#pushes)*
                match (#key, #scope) {
                    (#key_bytes, #scope_bytes) => #private::prepare(
                        &#namespace,
                        #private::finish(#arguments),
                        #key_bytes.as_deref(),
                        #scope_bytes.as_deref(),
                    ),
                }
            };
            #store_init
            #tx_cell_init
            let #options = #private::Options::new() #ttl #lease #on_conflict #on_lease_loss #max_output_bytes;
            #run
    };
    rename_pattern_arguments(&mut function.sig, checked);
    function.with_body(body)
}

/// Where `T` and `E` are written out (`Result<T, E>`, `Result<T>`), their bounds are checked
/// on those tokens too, so that an unmet one is reported on the type the user wrote rather
/// than only on the whole return type.
fn assertions(attr: &Attr, checked: &Checked, private: &TokenStream) -> TokenStream {
    let output = &checked.output;
    let ok = checked.ok_span.map(|span| {
        quote_spanned!(span=> #private::assert_output::<<#output as #private::IsResult>::Ok>();)
    });
    let err = checked.err_span.map(|span| {
        let err = quote_spanned!(span=> <#output as #private::IsResult>::Err);
        let recorded = attr
            .cache_errors
            .then(|| quote_spanned!(span=> #private::assert_recorded_error::<#err>();));
        quote_spanned! {span=>
            #private::assert_error::<#err>();
            #recorded
        }
    });
    quote!(#ok #err)
}

/// The checks of literal durations that need a default or a limit of the runtime: constant
/// assertions naming `Options::DEFAULT_TTL`, `Options::DEFAULT_LEASE` and `MAX_DURATION`, so
/// that their values are stated once, in `idempotent_core`, and a mistake is still a compile
/// error on the literal.
fn const_checks(attr: &Attr, private: &TokenStream) -> TokenStream {
    fn literal(option: &Option<DurationOption>) -> Option<(u128, &syn::LitStr)> {
        match option {
            Some(DurationOption::Literal { value, literal }) => Some((value.as_nanos(), literal)),
            _ => None,
        }
    }
    let ttl = literal(&attr.ttl);
    let lease = literal(&attr.lease);
    let mut checks = TokenStream::new();
    for (option, given) in [("ttl", ttl), ("lease", lease)] {
        if let Some((nanos, literal)) = given {
            let message = format!(
                "{option} \"{}\" is longer than idempotent_core::MAX_DURATION (about 100 years), the longest any store can hold; use at most that",
                literal.value()
            );
            checks.extend(quote_spanned! {literal.span()=>
                const _: () = ::core::assert!(#nanos <= #private::MAX_DURATION.as_nanos(), #message);
            });
        }
    }
    match (ttl, lease, &attr.ttl, &attr.lease) {
        (None, Some((lease, literal)), None, _) => {
            let message = format!(
                "lease \"{}\" is longer than the default ttl (idempotent_core::Options::DEFAULT_TTL): a claim would outlive the record it protects; set a longer ttl or a shorter lease",
                literal.value()
            );
            checks.extend(quote_spanned! {literal.span()=>
                const _: () = ::core::assert!(#lease <= #private::Options::DEFAULT_TTL.as_nanos(), #message);
            });
        }
        (Some((ttl, literal)), None, _, None) => {
            let message = format!(
                "the default lease (idempotent_core::Options::DEFAULT_LEASE) is longer than ttl \"{}\": a claim would outlive the record it protects; set a shorter lease or a longer ttl",
                literal.value()
            );
            checks.extend(quote_spanned! {literal.span()=>
                const _: () = ::core::assert!(#private::Options::DEFAULT_LEASE.as_nanos() <= #ttl, #message);
            });
        }
        _ => {}
    }
    checks
}

fn duration_call(private: &TokenStream, setter: &str, option: &DurationOption) -> TokenStream {
    let setter = Ident::new(setter, Span::call_site());
    match option {
        DurationOption::Literal { value, literal } => {
            let secs = value.as_secs();
            let nanos = value.subsec_nanos();
            quote_spanned!(literal.span()=> .#setter(#private::Duration::new(#secs, #nanos)))
        }
        DurationOption::Expr(expr) => quote_spanned!(expr.span()=> .#setter(#expr)),
    }
}

/// Pattern arguments become plain bindings in the signature (so they can be fingerprinted
/// whole), and are destructured again at the top of the body.
fn rename_pattern_arguments(sig: &mut Signature, checked: &Checked) {
    let mut renamed = checked
        .arguments
        .iter()
        .filter(|arg| arg.pattern.is_some())
        .map(|arg| arg.binding.clone());
    for input in sig.inputs.iter_mut() {
        let FnArg::Typed(PatType { pat, .. }) = input else {
            continue;
        };
        if matches!(&**pat, Pat::Ident(ident) if ident.subpat.is_none()) {
            continue;
        }
        if let Some(binding) = renamed.next() {
            **pat = Pat::Ident(PatIdent {
                attrs: Vec::new(),
                by_ref: None,
                mutability: None,
                ident: binding,
                subpat: None,
            });
        }
    }
}

/// The same tokens, all placed at `span`: errors about them are reported there.
fn respan(tokens: TokenStream, span: Span) -> TokenStream {
    tokens
        .into_iter()
        .map(|mut token| {
            if let proc_macro2::TokenTree::Group(group) = &token {
                let mut inner =
                    proc_macro2::Group::new(group.delimiter(), respan(group.stream(), span));
                inner.set_span(span);
                token = proc_macro2::TokenTree::Group(inner);
            } else {
                token.set_span(span);
            }
            token
        })
        .collect()
}
