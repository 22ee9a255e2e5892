//! The files an upstream's settings name, read together at start and on every reload: the CA
//! (`ca_file`), and the key that signs client assertions with its certificate
//! (`auth.private_key_file`, `auth.certificate_file`). A change in a file's contents is a
//! change of its setting: the parts built from it are built again.
//!
//! Must not: show what a key file holds (it is a [`Secret`]).

use super::UpstreamConfig;
use crate::secret::Secret;
use std::path::Path;

/// The contents of the files `[[upstream]]` names.
#[derive(Clone, PartialEq, Default)]
pub struct UpstreamFiles {
    /// `ca_file`: roots trusted beside the public ones, PEM.
    pub ca: Option<Vec<u8>>,
    /// `auth.private_key_file`, PEM.
    pub private_key: Option<Secret<Vec<u8>>>,
    /// `auth.certificate_file`, PEM.
    pub certificate: Option<Vec<u8>>,
}

impl UpstreamConfig {
    /// Read every file the upstream names; an error names the key and the file.
    pub fn read_files(&self) -> Result<UpstreamFiles, String> {
        let auth = &self.auth;
        Ok(UpstreamFiles {
            ca: read("ca_file", self.ca_file.as_deref())?,
            private_key: read("auth.private_key_file", auth.private_key_file.as_deref())?
                .map(Secret::new),
            certificate: read("auth.certificate_file", auth.certificate_file.as_deref())?,
        })
    }
}

fn read(key: &str, path: Option<&Path>) -> Result<Option<Vec<u8>>, String> {
    let Some(path) = path else {
        return Ok(None);
    };
    std::fs::read(path)
        .map(Some)
        .map_err(|e| format!("cannot read {key} {}: {e}", path.display()))
}
