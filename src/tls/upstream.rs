//! Which certificates an upstream's TLS connections accept, for the API and for its token
//! endpoint alike: the public roots and the upstream's `ca_file`, checked by webpki as any TLS
//! client checks them; or, with `pin_sha256`, exactly one key for the host of the upstream's
//! `url` (like curl's `--pinnedpubkey`).
//!
//! A pinned host's certificate is accepted when the SHA-256 of its public key (the DER of its
//! SubjectPublicKeyInfo) is the pin, and only then: its issuer, its names and its dates are
//! not looked at, because the pin already names the one key trusted. The handshake's
//! signature is still checked against that key, so a server that shows the certificate
//! without holding its private key is refused. Other hosts are checked as without a pin.
//!
//! Every refusal says in words what is wrong and what to do, and names the pin of the key
//! the server presented, so a user who trusts that certificate can pin it.
//!
//! Must not: trust anything when a certificate cannot be parsed.

use crate::config::ClientCert;
use base64::Engine;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::WebPkiSupportedAlgorithms;
use rustls::{CertificateError, DigitallySignedStruct, OtherError, SignatureScheme};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};
use sha2::{Digest, Sha256};
use std::sync::Arc;

/// The SHA-256 of a certificate's public key, written `sha256//BASE64` (curl's form).
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Pin([u8; 32]);

impl Pin {
    /// `sha256//BASE64`, plain BASE64, or 64 hex digits.
    pub fn parse(text: &str) -> Result<Pin, String> {
        let text = text.trim();
        let body = text.strip_prefix("sha256//").unwrap_or(text);
        let bytes = if body.len() == 64 && body.bytes().all(|b| b.is_ascii_hexdigit()) {
            (0..32)
                .map(|i| u8::from_str_radix(&body[2 * i..2 * i + 2], 16))
                .collect::<Result<Vec<u8>, _>>()
                .ok()
        } else {
            base64::engine::general_purpose::STANDARD.decode(body).ok()
        };
        match bytes.map(<[u8; 32]>::try_from) {
            Some(Ok(bytes)) => Ok(Pin(bytes)),
            _ => Err(format!(
                "`{text}` is not a SHA-256 pin: write sha256//BASE64 (44 characters of base64, as curl --pinnedpubkey takes it), \
                 the hash of the certificate's public key: openssl x509 -in cert.pem -pubkey -noout | \
                 openssl pkey -pubin -outform der | openssl dgst -sha256 -binary | base64"
            )),
        }
    }

    /// The pin of `cert`'s public key, when it can be parsed.
    pub fn of(cert: &CertificateDer<'_>) -> Option<Pin> {
        let parsed = rustls::server::ParsedCertificate::try_from(cert).ok()?;
        Some(Pin(Sha256::digest(parsed.subject_public_key_info()).into()))
    }
}

impl std::fmt::Display for Pin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let b64 = base64::engine::general_purpose::STANDARD.encode(self.0);
        write!(f, "sha256//{b64}")
    }
}

impl std::fmt::Debug for Pin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Display::fmt(self, f)
    }
}

/// TLS client settings for an upstream whose url names `host` (a name, or an IP address
/// without brackets): `extra_roots` (PEM, from `ca_file`) trusted beside the public roots,
/// and `pin` for `host`. No ALPN: each user sets its own.
pub fn client_config(
    extra_roots: Option<&[u8]>,
    host: &str,
    pin: Option<Pin>,
    certificate: Option<&ClientCert>,
) -> Result<rustls::ClientConfig, String> {
    let verifier = Verifier::new(extra_roots, host, pin)?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier));
    match certificate {
        Some(certificate) => {
            let (chain, key) = client_identity(certificate)?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(|e| format!("the client certificate and key cannot be used together: {e}"))
        }
        None => Ok(builder.with_no_client_auth()),
    }
}

/// The certificate chain (leaf first) and the private key of `certificate`, parsed.
pub fn client_identity(
    certificate: &ClientCert,
) -> Result<
    (
        Vec<CertificateDer<'static>>,
        rustls_pki_types::PrivateKeyDer<'static>,
    ),
    String,
> {
    use rustls_pki_types::pem::PemObject;
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&certificate.chain)
        .collect::<Result<_, _>>()
        .map_err(|e| format!("client_cert is not valid PEM: {e}"))?;
    if chain.is_empty() {
        return Err("client_cert holds no PEM certificate".into());
    }
    let key = rustls_pki_types::PrivateKeyDer::from_pem_slice(certificate.key.expose())
        .map_err(|_| "client_key holds no PEM private key (PKCS#8, PKCS#1 or SEC1)".to_owned())?;
    let provider = rustls::crypto::ring::default_provider();
    let signing = provider
        .key_provider
        .load_private_key(key.clone_key())
        .map_err(|e| format!("client_key cannot sign: {e}"))?;
    let certified = rustls::sign::CertifiedKey::new(chain.clone(), signing);
    certified
        .keys_match()
        .map_err(|_| "client_key is not the key of client_cert's certificate".to_owned())?;
    Ok((chain, key))
}

impl Verifier {
    fn new(extra_roots: Option<&[u8]>, host: &str, pin: Option<Pin>) -> Result<Verifier, String> {
        let host = ServerName::try_from(host.to_owned())
            .map_err(|e| format!("the upstream's host {host} is not a TLS server name: {e}"))?;
        let mut roots = rustls::RootCertStore {
            roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
        };
        if let Some(pem) = extra_roots {
            add_pem_roots(&mut roots, pem)?;
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let webpki =
            WebPkiServerVerifier::builder_with_provider(Arc::new(roots), Arc::clone(&provider))
                .build()
                .map_err(|e| format!("cannot build the certificate verifier: {e}"))?;
        Ok(Verifier {
            webpki,
            host,
            pin,
            algorithms: provider.signature_verification_algorithms,
        })
    }
    /// Whether `name` is the upstream's host (names compared without regard to case).
    fn is_upstream(&self, name: &ServerName<'_>) -> bool {
        match (&self.host, name) {
            (ServerName::DnsName(ours), ServerName::DnsName(theirs)) => {
                ours.as_ref().eq_ignore_ascii_case(theirs.as_ref())
            }
            (ServerName::IpAddress(ours), ServerName::IpAddress(theirs)) => ours == theirs,
            _ => false,
        }
    }
}

/// Parse PEM certificates into `roots`; an empty or unreadable file is an error.
pub fn add_pem_roots(roots: &mut rustls::RootCertStore, pem: &[u8]) -> Result<(), String> {
    use rustls_pki_types::pem::PemObject;
    let mut added = 0;
    for cert in CertificateDer::pem_slice_iter(pem) {
        let cert = cert.map_err(|e| format!("ca_file is not valid PEM: {e}"))?;
        roots
            .add(cert)
            .map_err(|e| format!("ca_file holds a certificate rustls cannot use: {e}"))?;
        added += 1;
    }
    if added == 0 {
        return Err("ca_file holds no PEM certificate".into());
    }
    Ok(())
}

/// `error` as a rustls error, also when I/O errors wrap it (one in another, at times).
fn rustls_error<'a>(error: &'a (dyn std::error::Error + 'static)) -> Option<&'a rustls::Error> {
    if let Some(tls) = error.downcast_ref::<rustls::Error>() {
        return Some(tls);
    }
    let inner: &(dyn std::error::Error + 'static) =
        error.downcast_ref::<std::io::Error>()?.get_ref()?;
    rustls_error(inner)
}

/// webpki's checks, or the pin for the upstream's host; refusals explained.
#[derive(Debug)]
struct Verifier {
    webpki: Arc<WebPkiServerVerifier>,
    /// The host of the upstream's url: the one the pin is for.
    host: ServerName<'static>,
    pin: Option<Pin>,
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for Verifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let upstream = self.is_upstream(server_name);
        let name = server_name.to_str();
        if let (Some(pin), true) = (&self.pin, upstream) {
            return match Pin::of(end_entity) {
                Some(p) if p == *pin => Ok(ServerCertVerified::assertion()),
                Some(p) => Err(refused(format!(
                    "the certificate of {name} is not the pinned one: its public key is {p}, pin_sha256 is {pin}. \
                     If the server's certificate was replaced on purpose, set pin_sha256 = \"{p}\""
                ))),
                None => Err(refused(format!(
                    "the certificate of {name} cannot be parsed, so its key cannot be compared with pin_sha256"
                ))),
            };
        }
        self.webpki
            .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
            .map_err(|e| {
                // Only the upstream's host can be pinned: offer it for no other.
                let pin = if upstream { Pin::of(end_entity) } else { None };
                explain(e, &name, pin)
            })
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// A certificate refused, for the reason given in words.
fn refused(reason: String) -> rustls::Error {
    rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(Explained(
        reason,
    )))))
}

/// A refusal in words (rustls would show its `Debug`: [`describe`] shows this).
#[derive(Debug)]
struct Explained(String);

/// A TLS failure found in `error` or its causes, in words: a refusal explained here, or
/// rustls's own reason. `None` when no cause is a TLS error.
pub fn describe(error: &(dyn std::error::Error + 'static)) -> Option<String> {
    let tls = crate::error::causes(error).find_map(rustls_error)?;
    if let rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(inner))) = tls {
        if let Some(Explained(text)) = inner.downcast_ref::<Explained>() {
            return Some(format!("invalid peer certificate: {text}"));
        }
    }
    Some(tls.to_string())
}

impl std::fmt::Display for Explained {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Explained {}

/// webpki's refusal of `name`'s certificate, with what to do about it and, for the
/// upstream's host, the pin that would trust it.
fn explain(error: rustls::Error, name: &str, presented: Option<Pin>) -> rustls::Error {
    let rustls::Error::InvalidCertificate(kind) = &error else {
        return error;
    };
    let ca_as_leaf = matches!(kind, CertificateError::Other(OtherError(e))
        if matches!(e.downcast_ref::<webpki::Error>(), Some(webpki::Error::CaUsedAsEndEntity)));
    let hint = if ca_as_leaf {
        format!("the certificate of {name} is a CA certificate used as its own server certificate (what `openssl req -x509` makes by default), which TLS clients refuse. Give the server a certificate signed by that CA (a leaf without CA:TRUE) and put the CA in the upstream's ca_file")
    } else {
        match kind {
            CertificateError::UnknownIssuer => format!(
                "the certificate of {name} is not signed by a CA this machine trusts: put the CA that signed it (PEM) in the upstream's ca_file"
            ),
            CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. } => format!(
                "the certificate of {name} is not issued for that name: use the name it was issued for in the url"
            ),
            CertificateError::Expired | CertificateError::ExpiredContext { .. } => format!(
                "the certificate of {name} has expired (or this machine's clock is wrong)"
            ),
            _ => return error,
        }
    };
    let pin = match presented {
        Some(pin) => format!(
            "; or, to trust exactly this certificate, set pin_sha256 = \"{pin}\" in the upstream"
        ),
        None => String::new(),
    };
    if ca_as_leaf {
        refused(format!("{hint}{pin}"))
    } else {
        refused(format!("{kind}: {hint}{pin}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pins_are_read_in_curls_form_plain_base64_or_hex() {
        let bytes = [7u8; 32];
        let b64 = base64::engine::general_purpose::STANDARD.encode(bytes);
        let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
        for text in [
            format!("sha256//{b64}"),
            b64.clone(),
            hex.to_uppercase(),
            hex,
        ] {
            assert_eq!(Pin::parse(&text).unwrap(), Pin(bytes), "{text}");
        }
        assert_eq!(Pin(bytes).to_string(), format!("sha256//{b64}"));
        for bad in [
            "",
            "sha256//",
            "sha256//abc",
            "not base64!",
            &"ab".repeat(31),
        ] {
            let e = Pin::parse(bad).unwrap_err();
            assert!(e.contains("sha256//BASE64") && e.contains("openssl"), "{e}");
        }
    }

    /// A self-signed certificate (CA:TRUE, as `openssl req -x509` makes) for `names`.
    fn self_signed(names: &[&str]) -> CertificateDer<'static> {
        let names: Vec<String> = names.iter().map(|n| (*n).to_owned()).collect();
        let mut params = rcgen::CertificateParams::new(names).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let key = rcgen::KeyPair::generate().unwrap();
        params.self_signed(&key).unwrap().der().clone()
    }

    fn verify(v: &Verifier, cert: &CertificateDer<'_>, name: &str) -> Result<(), String> {
        let name = ServerName::try_from(name.to_owned()).unwrap();
        v.verify_server_cert(cert, &[], &name, &[], UnixTime::now())
            .map(|_| ())
            .map_err(|e| describe(&e).unwrap())
    }

    /// The pin holds for the url's host, a name in any case or an IP address (IPv6
    /// written without brackets too), and for no other host, where the usual checks apply
    /// and no pin is offered.
    #[test]
    fn the_pin_is_for_the_upstreams_host_only() {
        let cert = self_signed(&["api.example", "::1"]);
        let other = self_signed(&["api.example"]);
        let pin = Pin::of(&cert).unwrap();
        for host in ["api.example", "::1"] {
            let v = Verifier::new(None, host, Some(pin)).unwrap();
            let shown = if host == "::1" { "::1" } else { "API.Example" };
            assert_eq!(verify(&v, &cert, shown), Ok(()), "{host}");
            let refused = verify(&v, &other, shown).unwrap_err();
            assert!(refused.contains("not the pinned one"), "{refused}");
            assert!(
                refused.contains(&Pin::of(&other).unwrap().to_string()),
                "{refused}"
            );
        }
        let v = Verifier::new(None, "api.example", Some(pin)).unwrap();
        let elsewhere = verify(&v, &cert, "id.example").unwrap_err();
        assert!(
            elsewhere.contains("the certificate of id.example"),
            "{elsewhere}"
        );
        assert!(!elsewhere.contains("pin_sha256"), "{elsewhere}");
        // Without a pin, the upstream's own host is offered the pin of what it presented.
        let v = Verifier::new(None, "api.example", None).unwrap();
        let offered = verify(&v, &cert, "api.example").unwrap_err();
        assert!(
            offered.contains(&format!("pin_sha256 = \"{pin}\"")),
            "{offered}"
        );
    }
}
