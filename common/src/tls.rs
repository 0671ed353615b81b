//! TLS for the connections to PostgreSQL and RabbitMQ, on rustls with the
//! aws-lc-rs crypto provider (no OpenSSL at run time).
//!
//! Both services name a CA file in their URL (`sslrootcert=` for
//! PostgreSQL, `cacertfile=` for RabbitMQ; parsed in `database::ssl` and
//! `topology::tls`). Only the certificates of that file are trusted then,
//! never the system's store besides: a private CA is the usual set-up, and
//! a public CA that issued some certificate for the same name must not be
//! able to stand in for the server. How much of the server's certificate is
//! checked is a [`Verify`], chosen from the URL as docs/security.md says.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme,
};

/// How much of the server's certificate a TLS connection checks.
#[derive(Clone, Debug)]
pub enum Verify {
    /// Nothing: the connection is encrypted, but anyone in the middle can
    /// present any certificate (PostgreSQL `sslmode=prefer`, or `require`
    /// without a CA file, as libpq does).
    Nothing,
    /// The chain up to one of these CAs, not the host name (`verify-ca`).
    Chain(Arc<RootCertStore>),
    /// The chain up to one of these CAs and the host name the client
    /// connected to (`verify-full`, and every `amqps://` connection).
    Full(Arc<RootCertStore>),
}

/// A CA file or TLS setting that cannot be used: a setting to fix, never
/// worth a retry. Names the file, never a secret.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read the CA file {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the CA file {path} holds no PEM certificate (-----BEGIN CERTIFICATE-----)")]
    NoCertificate { path: PathBuf },
    #[error("the CA file {path} is not valid: {reason}")]
    Invalid { path: PathBuf, reason: String },
    #[error("setting up TLS failed: {0}")]
    Setup(String),
}

/// The certificates of the PEM file `path`, as the only trust anchors.
pub fn load_roots(path: &Path) -> Result<Arc<RootCertStore>, TlsError> {
    let pem = std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.to_owned(),
        source,
    })?;
    let invalid = |reason: String| TlsError::Invalid {
        path: path.to_owned(),
        reason,
    };
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| invalid(e.to_string()))?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate {
            path: path.to_owned(),
        });
    }
    let mut roots = RootCertStore::empty();
    for cert in certs {
        roots
            .add(cert)
            .map_err(|e| invalid(format!("a certificate cannot be a trust anchor: {e}")))?;
    }
    Ok(Arc::new(roots))
}

/// What a refused certificate means, in words, when `error` (or an error
/// in its source chain, including inside an `io::Error`) is one rustls
/// raised while checking the server's certificate.
pub fn explain(error: &(dyn std::error::Error + 'static)) -> Option<&'static str> {
    let mut next = Some(error);
    while let Some(e) = next {
        let found = e.downcast_ref::<rustls::Error>().or_else(|| {
            e.downcast_ref::<std::io::Error>()
                .and_then(|io| io.get_ref())
                .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        });
        if let Some(rustls::Error::InvalidCertificate(c)) = found {
            return Some(match c {
                CertificateError::UnknownIssuer => {
                    "the server's certificate was not issued by a CA of the CA file"
                }
                CertificateError::NotValidForName
                | CertificateError::NotValidForNameContext { .. } => {
                    "the server's certificate was issued for other names than the host connected to"
                }
                CertificateError::Expired | CertificateError::ExpiredContext { .. } => {
                    "the server's certificate has expired"
                }
                CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => {
                    "the server's certificate is not valid yet (or this machine's clock is wrong)"
                }
                _ => "the server's certificate did not pass the checks",
            });
        }
        next = e.source();
    }
    None
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// A client configuration that checks what `verify` says (no client certificate).
pub fn client_config(verify: &Verify) -> Result<ClientConfig, TlsError> {
    let provider = provider();
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Setup(e.to_string()))?;
    let webpki = |roots: &Arc<RootCertStore>| {
        WebPkiServerVerifier::builder_with_provider(roots.clone(), provider.clone())
            .build()
            .map_err(|e| TlsError::Setup(e.to_string()))
    };
    let config = match verify {
        Verify::Full(roots) => builder
            .with_webpki_verifier(webpki(roots)?)
            .with_no_client_auth(),
        Verify::Chain(roots) => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(ChainOnly(webpki(roots)?)))
            .with_no_client_auth(),
        Verify::Nothing => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AnyCertificate(provider.clone())))
            .with_no_client_auth(),
    };
    Ok(config)
}

/// `verify-ca`: the full WebPKI check, except that a certificate valid for
/// another name is accepted. rustls checks the chain (signatures, validity
/// dates, usage) before the name, so a name error means the chain passed.
#[derive(Debug)]
struct ChainOnly(Arc<WebPkiServerVerifier>);

impl ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self
            .0
            .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
        {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

/// `require` without a CA file: any certificate, as libpq does. The
/// handshake's signatures are still checked (the server holds the key of the
/// certificate it shows), which says nothing about who the server is.
#[derive(Debug)]
struct AnyCertificate(Arc<CryptoProvider>);

impl ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ca_files_that_cannot_be_used_are_named() {
        let dir = std::env::temp_dir().join(format!("holdfast-tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();

        let missing = dir.join("missing.pem");
        let e = load_roots(&missing).unwrap_err().to_string();
        assert!(
            e.contains("cannot read the CA file") && e.contains("missing.pem"),
            "{e}"
        );

        let empty = dir.join("empty.pem");
        std::fs::write(&empty, "not a certificate\n").unwrap();
        let e = load_roots(&empty).unwrap_err().to_string();
        assert!(
            e.contains("holds no PEM certificate") && e.contains("empty.pem"),
            "{e}"
        );

        let garbage = dir.join("garbage.pem");
        std::fs::write(
            &garbage,
            "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
        )
        .unwrap();
        let e = load_roots(&garbage).unwrap_err().to_string();
        assert!(e.contains("garbage.pem") && e.contains("not valid"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
