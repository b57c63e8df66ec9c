//! TLS for the store's connections: `sslmode` and `sslrootcert` read from the connection
//! string as libpq reads them, and the connector every connection of the store uses (the
//! pooled ones, the listening one and the cancel requests).
//!
//! tokio-postgres knows only `disable`, `prefer` and `require`, and refuses `sslrootcert`, so
//! both are taken out of the string before tokio-postgres parses it; the driver is then told
//! `disable`, `prefer` or `require`, and the verification is the rustls configuration's.

use std::fmt;
use std::path::{Path, PathBuf};

use deadpool_postgres::{Manager, ManagerConfig};
use tokio_postgres::config::SslMode;
use tokio_postgres::tls::NoTls;
use tokio_postgres::{CancelToken, Client};

use crate::error::StoreError;

/// The TLS a connection string asks for (`sslmode`, libpq's names).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Mode {
    /// Plain text.
    Disable,
    /// TLS when the server offers it (without the `postgres-tls` feature: plain text), with no
    /// certificate verification; plain text otherwise. tokio-postgres' and libpq's default.
    Prefer,
    /// TLS or no connection; the certificate is not verified (unless a CA file is given, which
    /// makes it `VerifyCa`, as in libpq).
    Require,
    /// TLS, the server's certificate chain verified against the roots; the host name is not
    /// checked.
    VerifyCa,
    /// TLS, the chain and the host name verified.
    VerifyFull,
}

impl Mode {
    fn parse(value: &str) -> Result<Mode, String> {
        Ok(match value {
            "disable" => Mode::Disable,
            "prefer" => Mode::Prefer,
            "require" => Mode::Require,
            "verify-ca" => Mode::VerifyCa,
            "verify-full" => Mode::VerifyFull,
            other => {
                return Err(format!(
                    "sslmode={other:?} is not supported: write disable, prefer, require, verify-ca or verify-full"
                ));
            }
        })
    }

    /// What tokio-postgres is told: whether TLS is tried, and whether it is required.
    fn driver_mode(self) -> SslMode {
        match self {
            Mode::Disable => SslMode::Disable,
            Mode::Prefer => SslMode::Prefer,
            Mode::Require | Mode::VerifyCa | Mode::VerifyFull => SslMode::Require,
        }
    }

    /// Whether this mode refuses a plain-text connection.
    #[cfg(not(feature = "postgres-tls"))]
    fn requires_tls(self) -> bool {
        matches!(self, Mode::Require | Mode::VerifyCa | Mode::VerifyFull)
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Mode::Disable => "disable",
            Mode::Prefer => "prefer",
            Mode::Require => "require",
            Mode::VerifyCa => "verify-ca",
            Mode::VerifyFull => "verify-full",
        })
    }
}

/// A connection string split in what tokio-postgres parses and the TLS settings we read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct ConnectionString {
    /// The string without `sslmode` and `sslrootcert`.
    pub(super) rest: String,
    /// `sslmode`, `prefer` when absent.
    pub(super) mode: Mode,
    /// `sslrootcert`: a PEM file of CA certificates.
    pub(super) root_certificate_file: Option<PathBuf>,
}

impl ConnectionString {
    /// Splits `text`, a URL (`postgres://…?sslmode=verify-full&sslrootcert=/ca.pem`) or
    /// libpq's `key=value` form. An error names the setting, never the rest of the string.
    pub(super) fn parse(text: &str) -> Result<ConnectionString, String> {
        let mut parts = ConnectionString {
            rest: String::new(),
            mode: Mode::Prefer,
            root_certificate_file: None,
        };
        let mut take = |key: &str, value: String| -> Result<bool, String> {
            match key {
                "sslmode" => parts.mode = Mode::parse(&value)?,
                "sslrootcert" => parts.root_certificate_file = Some(PathBuf::from(value)),
                _ => return Ok(false),
            }
            Ok(true)
        };
        let rest = if text.starts_with("postgres://") || text.starts_with("postgresql://") {
            split_url(text, &mut take)?
        } else {
            split_key_values(text, &mut take)?
        };
        parts.rest = rest;
        Ok(parts)
    }

    /// The driver's configuration: the rest of the string, parsed by tokio-postgres, with the
    /// driver's `sslmode`.
    pub(super) fn config(&self) -> Option<tokio_postgres::Config> {
        let mut config: tokio_postgres::Config = self.rest.parse().ok()?;
        config.ssl_mode(self.mode.driver_mode());
        Some(config)
    }
}

type Take<'a> = dyn FnMut(&str, String) -> Result<bool, String> + 'a;

/// The URL without the query parameters `take` keeps (their values percent-decoded).
fn split_url(url: &str, take: &mut Take<'_>) -> Result<String, String> {
    let Some((base, query)) = url.split_once('?') else {
        return Ok(url.to_owned());
    };
    let mut kept = Vec::new();
    for pair in query.split('&') {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        if !take(&percent_decode(key), percent_decode(value))? {
            kept.push(pair);
        }
    }
    Ok(if kept.is_empty() {
        base.to_owned()
    } else {
        format!("{base}?{}", kept.join("&"))
    })
}

fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| char::from(b).to_digit(16);
        if bytes[i] == b'%'
            && i + 2 < bytes.len()
            && let (Some(high), Some(low)) = (hex(bytes[i + 1]), hex(bytes[i + 2]))
        {
            out.push((high * 16 + low) as u8);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// libpq's `key=value` form without the pairs `take` keeps: values are bare (up to white
/// space) or quoted with `'`, with `\` escaping the next character in either.
fn split_key_values(text: &str, take: &mut Take<'_>) -> Result<String, String> {
    let mut rest = String::with_capacity(text.len());
    let mut chars = text.char_indices().peekable();
    let skip_space = |chars: &mut std::iter::Peekable<std::str::CharIndices<'_>>| {
        while chars.next_if(|(_, c)| c.is_whitespace()).is_some() {}
    };
    loop {
        skip_space(&mut chars);
        let Some(&(start, _)) = chars.peek() else {
            break;
        };
        let mut key = String::new();
        while let Some((_, c)) = chars.next_if(|(_, c)| *c != '=' && !c.is_whitespace()) {
            key.push(c);
        }
        skip_space(&mut chars);
        if chars.next_if(|(_, c)| *c == '=').is_none() {
            // Not a pair: left for tokio-postgres to refuse.
            return Ok(text.to_owned());
        }
        skip_space(&mut chars);
        let mut value = String::new();
        if chars.next_if(|(_, c)| *c == '\'').is_some() {
            loop {
                match chars.next() {
                    None => return Ok(text.to_owned()),
                    Some((_, '\'')) => break,
                    Some((_, '\\')) => value.extend(chars.next().map(|(_, c)| c)),
                    Some((_, c)) => value.push(c),
                }
            }
        } else {
            while let Some((_, c)) = chars.next_if(|(_, c)| !c.is_whitespace()) {
                if c == '\\' {
                    value.extend(chars.next().map(|(_, c)| c));
                } else {
                    value.push(c);
                }
            }
        }
        let end = chars.peek().map_or(text.len(), |&(i, _)| i);
        if !take(&key, value)? {
            if !rest.is_empty() {
                rest.push(' ');
            }
            rest.push_str(text[start..end].trim_end());
        }
    }
    Ok(rest)
}

/// How the store's connections are made: plain, or with rustls.
#[derive(Clone)]
pub(super) enum Connector {
    Plain,
    #[cfg(feature = "postgres-tls")]
    Rustls(tokio_postgres_rustls::MakeRustlsConnect),
}

impl Connector {
    /// The connector for `mode`, with the CA certificates of `root_certificate_file` (PEM) or
    /// else the webpki roots.
    pub(super) fn new(
        mode: Mode,
        root_certificate_file: Option<&Path>,
    ) -> Result<Connector, StoreError> {
        #[cfg(feature = "postgres-tls")]
        {
            if mode == Mode::Disable {
                return Ok(Connector::Plain);
            }
            rustls_config::client_config(mode, root_certificate_file).map(|config| {
                Connector::Rustls(tokio_postgres_rustls::MakeRustlsConnect::new(config))
            })
        }
        #[cfg(not(feature = "postgres-tls"))]
        {
            if mode.requires_tls() || root_certificate_file.is_some() {
                let what = if mode.requires_tls() {
                    format!("sslmode={mode}")
                } else {
                    "a CA file (sslrootcert)".to_owned()
                };
                return Err(StoreError::Backend {
                    message: format!(
                        "the connection string asks for TLS ({what}), which this build cannot make: enable the feature postgres-tls of idempotent-core"
                    ),
                    source: None,
                });
            }
            Ok(Connector::Plain)
        }
    }

    /// deadpool-postgres' manager for `config` with this connector.
    pub(super) fn manager(
        &self,
        config: tokio_postgres::Config,
        manager: ManagerConfig,
    ) -> Manager {
        match self {
            Connector::Plain => Manager::from_config(config, NoTls, manager),
            #[cfg(feature = "postgres-tls")]
            Connector::Rustls(tls) => Manager::from_config(config, tls.clone(), manager),
        }
    }

    /// A connection to `config`, its messages handed to `messages` on a task of its own, then
    /// `None` once the connection has ended.
    pub(super) async fn connect<F>(
        &self,
        config: &tokio_postgres::Config,
        messages: F,
    ) -> Result<(Client, tokio::task::JoinHandle<()>), tokio_postgres::Error>
    where
        F: FnMut(Option<tokio_postgres::AsyncMessage>) + Send + 'static,
    {
        match self {
            Connector::Plain => {
                let (client, connection) = config.connect(NoTls).await?;
                Ok((client, tokio::spawn(poll_messages(connection, messages))))
            }
            #[cfg(feature = "postgres-tls")]
            Connector::Rustls(tls) => {
                let (client, connection) = config.connect(tls.clone()).await?;
                Ok((client, tokio::spawn(poll_messages(connection, messages))))
            }
        }
    }

    /// Asks the server to cancel what the connection of `token` runs.
    pub(super) async fn cancel(&self, token: &CancelToken) -> Result<(), tokio_postgres::Error> {
        match self {
            Connector::Plain => token.cancel_query(NoTls).await,
            #[cfg(feature = "postgres-tls")]
            Connector::Rustls(tls) => token.cancel_query(tls.clone()).await,
        }
    }
}

/// Hands every message of `connection` to `handle` until the connection ends, then `None`.
async fn poll_messages<S, T, F>(mut connection: tokio_postgres::Connection<S, T>, mut handle: F)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    F: FnMut(Option<tokio_postgres::AsyncMessage>),
{
    use futures_util::StreamExt;
    let mut messages = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
    while let Some(Ok(message)) = messages.next().await {
        handle(Some(message));
    }
    handle(None);
}

/// A connection that failed in its TLS handshake, as a store error naming `mode` and what to
/// do; `None` for any other failure.
pub(super) fn tls_failure(mode: Mode, error: &tokio_postgres::Error) -> Option<StoreError> {
    let mut text = error.to_string();
    if !text.starts_with("error performing TLS handshake") {
        return None;
    }
    // tokio-postgres does not show the cause: the handshake's own error.
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        text.push_str(&format!(": {cause}"));
        source = cause.source();
    }
    let advice = if text.contains("server does not support TLS") {
        "the server does not accept TLS connections, and this sslmode never falls back to plain text: turn TLS on in the server (ssl = on with a certificate), or, on a trusted private network only, use sslmode=prefer or disable"
    } else if text.contains("invalid peer certificate") {
        match mode {
            Mode::VerifyFull => {
                "the server's certificate was refused: it must be signed by a CA of the roots (the CA file given as sslrootcert= or root_certificate_file, else the webpki roots) and name the host connected to; give the CA that signed it, and connect by a name on the certificate"
            }
            _ => {
                "the server's certificate was refused: it must be signed by a CA of the roots (the CA file given as sslrootcert= or root_certificate_file, else the webpki roots); give the CA that signed it"
            }
        }
    } else {
        "check that the server accepts TLS and the store's TLS settings"
    };
    Some(StoreError::Backend {
        message: format!("TLS with the database failed (sslmode={mode}): {text}; {advice}"),
        source: None,
    })
}

#[cfg(feature = "postgres-tls")]
mod rustls_config {
    //! The rustls configuration of each mode (the ring provider).

    use std::path::Path;
    use std::sync::Arc;

    use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
    use rustls::crypto::{CryptoProvider, verify_tls12_signature, verify_tls13_signature};
    use rustls::pki_types::pem::{self, PemObject};
    use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
    use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};

    use super::Mode;
    use crate::error::StoreError;

    fn backend(message: String) -> StoreError {
        StoreError::Backend {
            message,
            source: None,
        }
    }

    pub(super) fn client_config(
        mode: Mode,
        root_certificate_file: Option<&Path>,
    ) -> Result<ClientConfig, StoreError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = ClientConfig::builder_with_provider(Arc::clone(&provider))
            .with_safe_default_protocol_versions()
            .map_err(|error| backend(format!("could not set up TLS (sslmode={mode}): {error}")))?;
        let roots = match root_certificate_file {
            Some(path) => Some(read_roots(mode, path)?),
            None => None,
        };
        // As libpq: `require` with a CA file verifies the chain, as `verify-ca` does.
        let mode = match (mode, &roots) {
            (Mode::Require, Some(_)) => Mode::VerifyCa,
            (mode, _) => mode,
        };
        let roots = || {
            roots.clone().unwrap_or_else(|| RootCertStore {
                roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
            })
        };
        let config = match mode {
            Mode::VerifyFull => builder.with_root_certificates(roots()),
            Mode::VerifyCa => builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(NameUnchecked {
                    roots: Some(roots()),
                    provider,
                })),
            Mode::Disable | Mode::Prefer | Mode::Require => builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(NameUnchecked {
                    roots: None,
                    provider,
                })),
        };
        Ok(config.with_no_client_auth())
    }

    /// The CA certificates of the PEM file at `path`.
    fn read_roots(mode: Mode, path: &Path) -> Result<RootCertStore, StoreError> {
        let shown = path.display();
        let unreadable = |error: pem::Error| {
            backend(format!(
                "could not read the CA file {shown} (sslmode={mode}): {error}; name a readable PEM file of CA certificates (sslrootcert= in the URL, or root_certificate_file)"
            ))
        };
        let mut roots = RootCertStore::empty();
        for certificate in CertificateDer::pem_file_iter(path).map_err(unreadable)? {
            let certificate = certificate.map_err(unreadable)?;
            roots.add(certificate).map_err(|error| {
                backend(format!(
                    "the CA file {shown} (sslmode={mode}) holds a certificate that is not a usable CA certificate: {error}"
                ))
            })?;
        }
        if roots.is_empty() {
            return Err(backend(format!(
                "the CA file {shown} (sslmode={mode}) holds no certificate: it must hold the PEM (-----BEGIN CERTIFICATE-----) of the CA that signed the server's certificate"
            )));
        }
        Ok(roots)
    }

    /// A verifier that never checks the server's name: `verify-ca` (`roots`: the chain must
    /// lead to one of them), or `prefer` and `require` (no roots: libpq's meaning, the
    /// certificate not verified). Either way the handshake's signatures are checked against
    /// the certificate presented.
    #[derive(Debug)]
    struct NameUnchecked {
        roots: Option<RootCertStore>,
        provider: Arc<CryptoProvider>,
    }

    impl ServerCertVerifier for NameUnchecked {
        fn verify_server_cert(
            &self,
            end_entity: &CertificateDer<'_>,
            intermediates: &[CertificateDer<'_>],
            _server_name: &ServerName<'_>,
            _ocsp_response: &[u8],
            now: UnixTime,
        ) -> Result<ServerCertVerified, rustls::Error> {
            if let Some(roots) = &self.roots {
                let certificate = rustls::server::ParsedCertificate::try_from(end_entity)?;
                rustls::client::verify_server_cert_signed_by_trust_anchor(
                    &certificate,
                    roots,
                    intermediates,
                    now,
                    self.provider.signature_verification_algorithms.all,
                )?;
            }
            Ok(ServerCertVerified::assertion())
        }

        fn verify_tls12_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            verify_tls12_signature(
                message,
                cert,
                dss,
                &self.provider.signature_verification_algorithms,
            )
        }

        fn verify_tls13_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            verify_tls13_signature(
                message,
                cert,
                dss,
                &self.provider.signature_verification_algorithms,
            )
        }

        fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
            self.provider
                .signature_verification_algorithms
                .supported_schemes()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> ConnectionString {
        ConnectionString::parse(text).unwrap()
    }

    #[test]
    fn takes_the_tls_settings_out_of_a_url() {
        let parts = parse(
            "postgres://app:pw@db.example:5432/shop?sslmode=verify-full&application_name=x&sslrootcert=%2Fetc%2Fca.pem",
        );
        assert_eq!(
            parts.rest,
            "postgres://app:pw@db.example:5432/shop?application_name=x"
        );
        assert_eq!(parts.mode, Mode::VerifyFull);
        assert_eq!(
            parts.root_certificate_file,
            Some(PathBuf::from("/etc/ca.pem"))
        );
        let plain = parse("postgresql://app@db/shop");
        assert_eq!(plain.rest, "postgresql://app@db/shop");
        assert_eq!(plain.mode, Mode::Prefer);
        assert_eq!(
            parse("postgres://db/shop?sslmode=verify-ca").rest,
            "postgres://db/shop"
        );
        assert!(
            parse("postgres://db/shop?sslmode=require")
                .config()
                .is_some()
        );
    }

    #[test]
    fn takes_the_tls_settings_out_of_key_values() {
        let parts = parse(
            "host=db port=5432 sslmode = verify-ca password='a b\\'c' sslrootcert='/etc/my ca.pem' dbname=shop",
        );
        assert_eq!(
            parts.rest,
            "host=db port=5432 password='a b\\'c' dbname=shop"
        );
        assert_eq!(parts.mode, Mode::VerifyCa);
        assert_eq!(
            parts.root_certificate_file,
            Some(PathBuf::from("/etc/my ca.pem"))
        );
        let config = parts.config().unwrap();
        assert_eq!(config.get_password(), Some(&b"a b'c"[..]));
        assert_eq!(config.get_ssl_mode(), SslMode::Require);
    }

    #[test]
    fn refuses_unknown_modes_without_quoting_the_string() {
        let error = ConnectionString::parse("postgres://u:secret@db/x?sslmode=allow").unwrap_err();
        assert!(
            error.contains("sslmode=\"allow\" is not supported"),
            "{error}"
        );
        assert!(!error.contains("secret"), "{error}");
    }

    #[cfg(not(feature = "postgres-tls"))]
    #[test]
    fn without_the_feature_tls_is_refused_not_dropped() {
        for mode in [Mode::Require, Mode::VerifyCa, Mode::VerifyFull] {
            let Err(StoreError::Backend { message, .. }) = Connector::new(mode, None) else {
                panic!("sslmode={mode} must be refused without the feature");
            };
            assert!(
                message.contains("enable the feature postgres-tls"),
                "{message}"
            );
            assert!(message.contains(&format!("sslmode={mode}")), "{message}");
        }
        assert!(matches!(
            Connector::new(Mode::Prefer, None),
            Ok(Connector::Plain)
        ));
    }
}
