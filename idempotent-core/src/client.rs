//! A reqwest-middleware middleware that keys POST and PATCH requests and retries them safely.
