//! The files an upstream's settings name, read together at start and on every reload: the CA
//! (`ca_file`), the key that signs client assertions with its certificate
//! (`auth.private_key_file`, `auth.certificate_file`), and the client certificates tollgate
//! presents over TLS (`client_cert` / `client_key`, of the upstream and of `[upstream.auth]`). A change in a file's contents is a
//! change of its setting: the parts built from it are built again.
//!
//! Must not: show what a key file holds (it is a [`Secret`]).

use super::{ClientAuth, UpstreamConfig};
use crate::secret::Secret;
use std::path::Path;

/// The contents of the files `[[upstream]]` names.
#[derive(Clone, PartialEq, Default)]
pub struct UpstreamFiles {
    /// `ca_file`: roots trusted beside the public ones, PEM.
    pub ca: Option<Vec<u8>>,
    /// What tollgate presents to the API: `[upstream] client_cert` and `client_key`, else
    /// with `client_auth = "tls"` the token endpoint's (RFC 8705 §3: the API checks that a
    /// token is used with the certificate it was issued to).
    pub api_cert: Option<ClientCert>,
    /// What tollgate presents to the token endpoint with `client_auth = "tls"`.
    pub token_cert: Option<ClientCert>,
    /// `auth.private_key_file`, PEM.
    pub private_key: Option<Secret<Vec<u8>>>,
    /// `auth.certificate_file`, PEM.
    pub certificate: Option<Vec<u8>>,
}

impl UpstreamFiles {
    /// Whether `other` holds what the token endpoint's side uses alike: its TLS settings and
    /// its client proof (the API's certificate is not among them).
    pub fn same_for_tokens(&self, other: &UpstreamFiles) -> bool {
        self.ca == other.ca
            && self.token_cert == other.token_cert
            && self.private_key == other.private_key
            && self.certificate == other.certificate
    }
}

/// A client certificate (PEM, leaf first) and its private key (PEM).
#[derive(Clone, PartialEq)]
pub struct ClientCert {
    pub chain: Vec<u8>,
    pub key: Secret<Vec<u8>>,
}

impl UpstreamConfig {
    /// Read every file the upstream names; an error names the key and the file.
    pub fn read_files(&self) -> Result<UpstreamFiles, String> {
        let auth = &self.auth;
        let token_cert = match auth.client_auth {
            ClientAuth::Tls => pair(
                "auth.",
                auth.client_cert.as_deref(),
                auth.client_key.as_deref(),
            )?,
            _ => None,
        };
        let own = pair("", self.client_cert.as_deref(), self.client_key.as_deref())?;
        Ok(UpstreamFiles {
            ca: read("ca_file", self.ca_file.as_deref())?,
            api_cert: own.or_else(|| token_cert.clone()),
            token_cert,
            private_key: read("auth.private_key_file", auth.private_key_file.as_deref())?
                .map(Secret::new),
            certificate: read("auth.certificate_file", auth.certificate_file.as_deref())?,
        })
    }
}

/// `client_cert` and `client_key` (below `prefix`), both or neither.
fn pair(
    prefix: &str,
    cert: Option<&Path>,
    key: Option<&Path>,
) -> Result<Option<ClientCert>, String> {
    let chain = read(&format!("{prefix}client_cert"), cert)?;
    let key = read(&format!("{prefix}client_key"), key)?;
    Ok(match (chain, key) {
        (Some(chain), Some(key)) => Some(ClientCert {
            chain,
            key: Secret::new(key),
        }),
        _ => None,
    })
}

fn read(key: &str, path: Option<&Path>) -> Result<Option<Vec<u8>>, String> {
    let Some(path) = path else {
        return Ok(None);
    };
    std::fs::read(path)
        .map(Some)
        .map_err(|e| format!("cannot read {key} {}: {e}", path.display()))
}
