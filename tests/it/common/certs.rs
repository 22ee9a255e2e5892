//! A private test CA and a leaf certificate for `localhost` and 127.0.0.1 (rcgen).

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, SanType};

pub struct TestCa {
    pub ca_pem: String,
    pub cert_pem: String,
    pub key_pem: String,
    pub cert_der: Vec<u8>,
    pub key_der: Vec<u8>,
}

/// A new CA and a leaf it signed; `name` goes in the leaf's common name.
pub fn make_ca(name: &str) -> TestCa {
    make_ca_for(name, &["localhost"])
}

/// A new CA and a leaf it signed for `hosts` (and 127.0.0.1).
pub fn make_ca_for(name: &str, hosts: &[&str]) -> TestCa {
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(DnType::CommonName, "tollgate test CA");
    let ca_key = KeyPair::generate().unwrap();
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let hosts: Vec<String> = hosts.iter().map(|h| (*h).to_owned()).collect();
    let mut leaf = CertificateParams::new(hosts).unwrap();
    leaf.subject_alt_names
        .push(SanType::IpAddress("127.0.0.1".parse().unwrap()));
    leaf.distinguished_name.push(DnType::CommonName, name);
    let leaf_key = KeyPair::generate().unwrap();
    let leaf_cert = leaf.signed_by(&leaf_key, &ca_cert, &ca_key).unwrap();
    TestCa {
        ca_pem: ca_cert.pem(),
        cert_pem: leaf_cert.pem(),
        key_pem: leaf_key.serialize_pem(),
        cert_der: leaf_cert.der().to_vec(),
        key_der: leaf_key.serialize_der(),
    }
}

/// A CA certificate that serves as its own server certificate (what `openssl req -x509` makes
/// by default): `cert_*` and `ca_pem` are the same CA:TRUE certificate.
pub fn make_self_signed_ca() -> TestCa {
    let mut params = CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params
        .subject_alt_names
        .push(SanType::IpAddress("127.0.0.1".parse().unwrap()));
    params
        .distinguished_name
        .push(DnType::CommonName, "localhost");
    let key = KeyPair::generate().unwrap();
    let cert = params.self_signed(&key).unwrap();
    TestCa {
        ca_pem: cert.pem(),
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
        cert_der: cert.der().to_vec(),
        key_der: key.serialize_der(),
    }
}

impl TestCa {
    /// The pin of the served certificate's key, as curl --pinnedpubkey writes it:
    /// sha256// and the base64 of the SHA-256 of its SubjectPublicKeyInfo.
    pub fn pin(&self) -> String {
        use base64::Engine;
        use sha2::Digest;
        let key = KeyPair::from_pem(&self.key_pem).unwrap();
        let hash = sha2::Sha256::digest(key.public_key_der());
        format!(
            "sha256//{}",
            base64::engine::general_purpose::STANDARD.encode(hash)
        )
    }
}
