//! [`TlsFiles`]: a certificate authority and a server certificate, made for one test server.

use std::fs;
use std::path::{Path, PathBuf};

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose};

/// The PEM files of a server's TLS, in the server's own folder: a CA (`ca.pem`), a certificate
/// for `localhost` and `127.0.0.1` signed by it (`server.pem`, its key `server.key`), and a
/// second CA that signed nothing (`other-ca.pem`), for the tests of a wrong CA.
///
/// Made fresh for each server with rcgen (ECDSA P-256), valid from 2020 to 2100.
///
/// ```no_run
/// let server = idempotent_test_support::PostgresServer::start_tls();
/// let tls = server.tls().expect("started with TLS");
/// let url = format!("{}?sslmode=verify-full&sslrootcert={}", server.url(), tls.ca_file().display());
/// # let _ = url;
/// ```
#[derive(Debug, Clone)]
pub struct TlsFiles {
    ca: PathBuf,
    other_ca: PathBuf,
    certificate: PathBuf,
    key: PathBuf,
}

impl TlsFiles {
    /// Makes the certificates and writes them in `dir`; the key file is readable by its owner
    /// only (as PostgreSQL requires).
    ///
    /// # Panics
    /// If a certificate cannot be made or a file written.
    pub fn generate(dir: &Path) -> TlsFiles {
        let ca_key = KeyPair::generate().expect("an ECDSA key pair");
        let params = ca_params("idempotent test CA");
        let ca_certificate = params.self_signed(&ca_key).expect("the CA certificate");
        let ca = Issuer::new(params, ca_key);

        let other_key = KeyPair::generate().expect("an ECDSA key pair");
        let other_certificate = ca_params("idempotent unrelated CA")
            .self_signed(&other_key)
            .expect("the other CA certificate");

        let server_key = KeyPair::generate().expect("an ECDSA key pair");
        let mut server_params =
            CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()])
                .expect("the server's names");
        server_params
            .distinguished_name
            .push(DnType::CommonName, "localhost");
        server_params.not_before = rcgen::date_time_ymd(2020, 1, 1);
        server_params.not_after = rcgen::date_time_ymd(2100, 1, 1);
        let server_certificate = server_params
            .signed_by(&server_key, &ca)
            .expect("the server certificate");

        let files = TlsFiles {
            ca: dir.join("ca.pem"),
            other_ca: dir.join("other-ca.pem"),
            certificate: dir.join("server.pem"),
            key: dir.join("server.key"),
        };
        write(&files.ca, &ca_certificate.pem());
        write(&files.other_ca, &other_certificate.pem());
        write(&files.certificate, &server_certificate.pem());
        write(&files.key, &server_key.serialize_pem());
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(&files.key, fs::Permissions::from_mode(0o600))
            .unwrap_or_else(|error| panic!("cannot restrict {}: {error}", files.key.display()));
        files
    }

    /// The CA that signed the server's certificate (PEM).
    pub fn ca_file(&self) -> &Path {
        &self.ca
    }

    /// A CA that signed nothing the server has (PEM): verification against it fails.
    pub fn other_ca_file(&self) -> &Path {
        &self.other_ca
    }

    /// The server's certificate (PEM), for `localhost` and `127.0.0.1`.
    pub fn certificate_file(&self) -> &Path {
        &self.certificate
    }

    /// The server certificate's private key (PEM).
    pub fn key_file(&self) -> &Path {
        &self.key
    }

    /// Gives every file to `uid:gid` (the server's user when the tests run as root).
    pub(crate) fn chown(&self, uid: u32, gid: u32) {
        for file in [&self.ca, &self.other_ca, &self.certificate, &self.key] {
            std::os::unix::fs::chown(file, Some(uid), Some(gid))
                .unwrap_or_else(|error| panic!("cannot give {} away: {error}", file.display()));
        }
    }
}

fn ca_params(name: &str) -> CertificateParams {
    let mut params = CertificateParams::default();
    params.distinguished_name.push(DnType::CommonName, name);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params.not_before = rcgen::date_time_ymd(2020, 1, 1);
    params.not_after = rcgen::date_time_ymd(2100, 1, 1);
    params
}

fn write(path: &Path, contents: &str) {
    fs::write(path, contents)
        .unwrap_or_else(|error| panic!("cannot write {}: {error}", path.display()));
}
