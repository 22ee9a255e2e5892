//! Inbound keys (`[upstream.inbound] keys`): who may use a listener. A client sends
//! `Authorization: Bearer KEY` (or `Proxy-Authorization: Bearer KEY`); the key is compared in
//! constant time with every configured key and never forwarded (both headers are replaced or
//! removed before the request goes upstream).
//!
//! The listener keeps SHA-256 digests of the keys and compares digests: the comparison takes
//! the same time whatever the key's length.

use crate::secret::Secret;
use http::header::{AUTHORIZATION, PROXY_AUTHORIZATION};
use http::HeaderMap;
use sha2::{Digest, Sha256};

/// The keys one listener accepts; empty means the listener is open (loopback only).
#[derive(Default)]
pub struct Keys {
    digests: Vec<[u8; 32]>,
}

/// Why a request was not let in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Denied {
    /// No `Bearer` credential in `Authorization` or `Proxy-Authorization`.
    Missing,
    /// A credential that matches no key.
    Wrong,
}

impl Keys {
    pub fn new(keys: &[Secret<String>]) -> Keys {
        Keys {
            digests: keys.iter().map(|k| digest(k.expose().as_bytes())).collect(),
        }
    }

    /// Let the request in, or say why not. Open when no key is configured.
    pub fn check(&self, headers: &HeaderMap) -> Result<(), Denied> {
        if self.digests.is_empty() {
            return Ok(());
        }
        let presented = [AUTHORIZATION, PROXY_AUTHORIZATION]
            .iter()
            .flat_map(|name| headers.get_all(name))
            .filter_map(|value| bearer(value.as_bytes()))
            .collect::<Vec<_>>();
        if presented.is_empty() {
            return Err(Denied::Missing);
        }
        let mut matched = false;
        for key in presented {
            let d = digest(key);
            // Every configured key is compared, match or not.
            for known in &self.digests {
                matched |= equal(&d, known);
            }
        }
        if matched {
            Ok(())
        } else {
            Err(Denied::Wrong)
        }
    }
}

/// The credential of a `Bearer` authorization value (the scheme is case-insensitive).
fn bearer(value: &[u8]) -> Option<&[u8]> {
    let (scheme, rest) = value.split_at_checked(7)?;
    (scheme.eq_ignore_ascii_case(b"bearer ") && !rest.is_empty()).then(|| rest.trim_ascii())
}

fn digest(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

/// Constant-time equality of two digests.
fn equal(a: &[u8; 32], b: &[u8; 32]) -> bool {
    let diff = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    std::hint::black_box(diff) == 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn headers(name: http::HeaderName, value: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(name, HeaderValue::from_str(value).unwrap());
        h
    }

    #[test]
    fn keys_are_required_compared_and_either_header_works() {
        let keys = Keys::new(&[Secret::from("first-key"), Secret::from("second-key")]);
        assert_eq!(keys.check(&HeaderMap::new()), Err(Denied::Missing));
        assert_eq!(
            keys.check(&headers(AUTHORIZATION, "Basic Zmlyc3Qta2V5")),
            Err(Denied::Missing)
        );
        assert_eq!(
            keys.check(&headers(AUTHORIZATION, "Bearer first-kex")),
            Err(Denied::Wrong)
        );
        assert_eq!(
            keys.check(&headers(AUTHORIZATION, "Bearer first-key-and-more")),
            Err(Denied::Wrong)
        );
        assert_eq!(
            keys.check(&headers(AUTHORIZATION, "bearer second-key")),
            Ok(())
        );
        assert_eq!(
            keys.check(&headers(PROXY_AUTHORIZATION, "Bearer first-key")),
            Ok(())
        );
        assert_eq!(Keys::default().check(&HeaderMap::new()), Ok(()));
    }
}
