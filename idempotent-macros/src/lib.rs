//! The `#[idempotent]` attribute. Use it through `idempotent_core`
//! (`use idempotent_core::idempotent;`), which documents it and holds everything it expands to.

mod attr;
mod errors;
mod expand;
mod suggest;
mod validate;

use proc_macro::TokenStream;
use quote::quote;

/// Makes an async function safe to retry. See `idempotent_core::idempotent` for the options.
#[proc_macro_attribute]
pub fn idempotent(args: TokenStream, item: TokenStream) -> TokenStream {
    let item = proc_macro2::TokenStream::from(item);
    let errors = errors::Errors::default();
    let attr = attr::Attr::parse(args.into(), &errors);
    let function = match syn::parse2::<syn::ItemFn>(item.clone()) {
        Ok(function) => function,
        Err(_) => {
            errors.push(validate::not_a_function(&item));
            return with_errors(item, errors);
        }
    };
    let checked = validate::check(&attr, &function, &errors);
    match (checked, errors.finish()) {
        (Some(checked), Ok(())) => expand::expand(&attr, function, &checked).into(),
        (_, result) => {
            let error = result.err().map(|error| error.to_compile_error());
            quote!(#item #error).into()
        }
    }
}

/// On a mistake, the item is still emitted as written, so that its callers do not fail too
/// ("cannot find function") and hide the one error that matters.
fn with_errors(item: proc_macro2::TokenStream, errors: errors::Errors) -> TokenStream {
    let error = errors.finish().err().map(|error| error.to_compile_error());
    quote!(#item #error).into()
}
