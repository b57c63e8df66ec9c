//! The annotated function, parsed leniently (as tracing-attributes' `MaybeItemFn` does): its
//! attributes, visibility and signature are parsed, its body is kept as the tokens written. A
//! body that does not parse then gets the compiler's own error, where it is, and nothing from
//! the attribute.

use proc_macro2::{Delimiter, Group, TokenStream, TokenTree};
use quote::{ToTokens, TokenStreamExt};
use syn::parse::{Parse, ParseStream};
use syn::{Attribute, Signature, Visibility};

pub(crate) struct MaybeItemFn {
    pub(crate) outer_attrs: Vec<Attribute>,
    pub(crate) vis: Visibility,
    pub(crate) sig: Signature,
    /// The body's inner attributes (`#![allow(..)]`), which stay on the function.
    pub(crate) inner_attrs: Vec<Attribute>,
    /// The body's statements, unparsed, in braces with the body's span.
    pub(crate) body: Group,
}

impl Parse for MaybeItemFn {
    fn parse(input: ParseStream<'_>) -> syn::Result<Self> {
        let outer_attrs = input.call(Attribute::parse_outer)?;
        let vis = input.parse()?;
        let sig = input.parse()?;
        let body = match input.parse::<TokenTree>()? {
            TokenTree::Group(group) if group.delimiter() == Delimiter::Brace => group,
            other => return Err(syn::Error::new(other.span(), "expected a function body")),
        };
        if !input.is_empty() {
            return Err(input.error("expected nothing after the function body"));
        }
        let (inner_attrs, statements) =
            syn::parse::Parser::parse2(inner_attributes_then_tokens, body.stream())?;
        let mut statements = Group::new(Delimiter::Brace, statements);
        statements.set_span(body.span());
        Ok(Self {
            outer_attrs,
            vis,
            sig,
            inner_attrs,
            body: statements,
        })
    }
}

/// Splits a body into its inner attributes and the rest, which is not parsed.
fn inner_attributes_then_tokens(
    input: ParseStream<'_>,
) -> syn::Result<(Vec<Attribute>, TokenStream)> {
    Ok((input.call(Attribute::parse_inner)?, input.parse()?))
}

impl MaybeItemFn {
    /// The function with `body` (a block's contents) in place of its own.
    pub(crate) fn with_body(&self, body: TokenStream) -> TokenStream {
        let mut tokens = TokenStream::new();
        tokens.append_all(&self.outer_attrs);
        self.vis.to_tokens(&mut tokens);
        self.sig.to_tokens(&mut tokens);
        let mut contents = TokenStream::new();
        contents.append_all(&self.inner_attrs);
        contents.extend(body);
        tokens.append(Group::new(Delimiter::Brace, contents));
        tokens
    }
}
