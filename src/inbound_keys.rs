//! Inbound keys (`[upstream.inbound] keys`): who may use a listener. A client sends
//! `Authorization: Bearer KEY` (or `Proxy-Authorization: Bearer KEY`); the key is compared in
//! constant time with every configured key and never forwarded (both headers are replaced or
//! removed before the request goes upstream).
//!
//! The listener keeps SHA-256 digests of the keys and compares digests: the comparison takes
//! the same time whatever the key's length. A key that matched is known by its index and its
//! label ([`Keys::label`]: its name, or `#N` for the Nth plain key), never by its value.

use crate::config::InboundKey;
use http::header::{AUTHORIZATION, PROXY_AUTHORIZATION};
use http::HeaderMap;
use sha2::{Digest, Sha256};
use std::sync::Arc;

/// The keys one listener accepts; empty means the listener is open (loopback only).
#[derive(Default)]
pub struct Keys {
    digests: Vec<[u8; 32]>,
    labels: Vec<Arc<str>>,
}

/// How attribution shows a request that presented no key (an open listener).
pub const NO_KEY: &str = "-";

/// Why a request was not let in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Denied {
    /// No `Bearer` credential in `Authorization` or `Proxy-Authorization`.
    Missing,
    /// A credential that matches no key.
    Wrong,
}

impl Keys {
    pub fn new(keys: &[InboundKey]) -> Keys {
        Keys {
            digests: keys
                .iter()
                .map(|k| digest(k.key.expose().as_bytes()))
                .collect(),
            labels: keys.iter().enumerate().map(|(i, k)| k.label(i)).collect(),
        }
    }

    /// How many keys the listener accepts.
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// The label of the key at `index`: its name, or `#N` for the Nth key (a plain string).
    pub fn label(&self, index: usize) -> &Arc<str> {
        &self.labels[index]
    }

    /// Let the request in, or say why not; the index of the key it presented (`None` when
    /// the listener is open).
    pub fn check(&self, headers: &HeaderMap) -> Result<Option<usize>, Denied> {
        if self.digests.is_empty() {
            return Ok(None);
        }
        let presented = [AUTHORIZATION, PROXY_AUTHORIZATION]
            .iter()
            .flat_map(|name| headers.get_all(name))
            .filter_map(|value| bearer(value.as_bytes()))
            .collect::<Vec<_>>();
        if presented.is_empty() {
            return Err(Denied::Missing);
        }
        let (mut matched, mut index) = (false, 0usize);
        for key in presented {
            let d = digest(key);
            // Every configured key is compared, match or not, and the index is selected
            // without a branch on the comparison.
            for (i, known) in self.digests.iter().enumerate() {
                let same = equal(&d, known);
                let mask = usize::from(same).wrapping_neg();
                index = (index & !mask) | (i & mask);
                matched |= same;
            }
        }
        if matched {
            Ok(Some(index))
        } else {
            Err(Denied::Wrong)
        }
    }
}

/// The credential of a `Bearer` authorization value (the scheme is case-insensitive).
pub(crate) fn bearer(value: &[u8]) -> Option<&[u8]> {
    let (scheme, rest) = value.split_at_checked(7)?;
    (scheme.eq_ignore_ascii_case(b"bearer ") && !rest.is_empty()).then(|| rest.trim_ascii())
}

pub(crate) fn digest(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

/// Constant-time equality of two digests.
pub(crate) fn equal(a: &[u8; 32], b: &[u8; 32]) -> bool {
    let diff = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    std::hint::black_box(diff) == 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::secret::Secret;
    use http::HeaderValue;

    fn headers(name: http::HeaderName, value: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(name, HeaderValue::from_str(value).unwrap());
        h
    }

    fn plain(key: &str) -> InboundKey {
        InboundKey {
            name: None,
            key: Secret::from(key),
            budget: None,
            identity: None,
        }
    }

    #[test]
    fn keys_are_required_compared_and_either_header_works() {
        let named = InboundKey {
            name: Some("etl".into()),
            ..plain("second-key")
        };
        let keys = Keys::new(&[plain("first-key"), named]);
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
            Ok(Some(1))
        );
        assert_eq!(
            keys.check(&headers(PROXY_AUTHORIZATION, "Bearer first-key")),
            Ok(Some(0))
        );
        assert_eq!((&**keys.label(0), &**keys.label(1)), ("#1", "etl"));
        assert_eq!(Keys::default().check(&HeaderMap::new()), Ok(None));
    }
}
