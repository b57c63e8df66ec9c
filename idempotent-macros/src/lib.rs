//! The `#[idempotent]` attribute. Use it through `idempotent_core`
//! (`use idempotent_core::idempotent;`), which documents it and holds everything it expands to.

mod attr;
mod errors;
mod expand;
mod item;
mod suggest;
mod validate;

use proc_macro::TokenStream;
use quote::quote;

/// Makes an async function safe to retry. See `idempotent_core::idempotent` for the options.
#[proc_macro_attribute]
pub fn idempotent(args: TokenStream, item: TokenStream) -> TokenStream {
    let item = proc_macro2::TokenStream::from(item);
    let errors = errors::Errors::new();
    let attr = attr::Attr::parse(args.into(), &errors);
    let function = match syn::parse2::<item::MaybeItemFn>(item.clone()) {
        Ok(function) => function,
        Err(_) => {
            errors.push(validate::not_a_function(&item));
            return unchanged_with(item, errors.check());
        }
    };
    let checked = validate::check(&attr, &function.sig, &errors);
    match (checked, errors.check()) {
        (Some(checked), Ok(())) => expand::expand(&attr, function, &checked).into(),
        (_, result) => unchanged_with(item, result),
    }
}

/// On a mistake, the item is emitted as written beside the errors, so that its callers do not
/// fail too ("cannot find function") and hide the one error that matters.
fn unchanged_with(item: proc_macro2::TokenStream, result: syn::Result<()>) -> TokenStream {
    let error = result.err().map(|error| error.to_compile_error());
    quote!(#item #error).into()
}
