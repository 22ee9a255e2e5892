//! The admin key (`[admin] key`): who may read the status page, `/status` and `/metrics`.
//! A request carries it as `Authorization: Bearer KEY` (a Prometheus scraper, `tollgate
//! status`) or as the password of HTTP Basic with any user name (a browser asks for it after
//! the `WWW-Authenticate: Basic` challenge of the 401). `/healthz` and `/readyz` stay open for
//! load balancers.
//!
//! Only the key's SHA-256 digest is kept, and digests are compared in constant time, as for
//! inbound keys ([`crate::inbound_keys`]). Must not: echo what a request sent.

use crate::inbound_keys::{bearer, digest, equal, Denied};
use crate::secret::Secret;
use base64::Engine;
use http::header::AUTHORIZATION;
use http::HeaderMap;
use std::borrow::Cow;

/// The challenge of a 401: a browser prompts for a user name and password.
pub const CHALLENGE: &str = "Basic realm=\"tollgate admin\", charset=\"UTF-8\"";

/// The key the admin listener asks for.
pub struct AdminKey {
    digest: [u8; 32],
}

impl AdminKey {
    pub fn new(key: &Secret<String>) -> AdminKey {
        AdminKey {
            digest: digest(key.expose().as_bytes()),
        }
    }

    /// Let the request in when one of its `Authorization` headers carries the key.
    pub fn check(&self, headers: &HeaderMap) -> Result<(), Denied> {
        let (mut presented, mut matched) = (false, false);
        for key in headers
            .get_all(AUTHORIZATION)
            .iter()
            .filter_map(|value| credential(value.as_bytes()))
        {
            presented = true;
            matched |= equal(&digest(&key), &self.digest);
        }
        match (presented, matched) {
            (_, true) => Ok(()),
            (false, false) => Err(Denied::Missing),
            (true, false) => Err(Denied::Wrong),
        }
    }
}

/// The key an `Authorization` value carries: a `Bearer` credential, or the password of
/// `Basic` credentials (what follows the first `:`; the user name is not looked at).
fn credential(value: &[u8]) -> Option<Cow<'_, [u8]>> {
    if let Some(key) = bearer(value) {
        return Some(Cow::Borrowed(key));
    }
    let (scheme, rest) = value.split_at_checked(6)?;
    if !scheme.eq_ignore_ascii_case(b"basic ") {
        return None;
    }
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(rest.trim_ascii())
        .ok()?;
    let colon = decoded.iter().position(|&b| b == b':')?;
    Some(Cow::Owned(decoded[colon + 1..].to_vec()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::engine::general_purpose::STANDARD;
    use http::HeaderValue;

    fn with(value: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(AUTHORIZATION, HeaderValue::from_str(value).unwrap());
        headers
    }

    #[test]
    fn the_key_is_taken_as_bearer_or_as_the_basic_password_of_any_user() {
        let key = AdminKey::new(&Secret::from("admin-key-0123456789"));
        let basic = |pair: &str| with(&format!("Basic {}", STANDARD.encode(pair)));
        assert_eq!(key.check(&with("Bearer admin-key-0123456789")), Ok(()));
        assert_eq!(key.check(&with("bearer admin-key-0123456789")), Ok(()));
        assert_eq!(key.check(&basic("anyone:admin-key-0123456789")), Ok(()));
        assert_eq!(key.check(&basic(":admin-key-0123456789")), Ok(()));
        assert_eq!(key.check(&HeaderMap::new()), Err(Denied::Missing));
        assert_eq!(key.check(&with("Basic not base64!")), Err(Denied::Missing));
        assert_eq!(key.check(&with("Digest x")), Err(Denied::Missing));
        assert_eq!(
            key.check(&with("Bearer admin-key-012345678")),
            Err(Denied::Wrong)
        );
        assert_eq!(
            key.check(&basic("admin-key-0123456789:")),
            Err(Denied::Wrong),
            "the key as the user name is not the key as the password"
        );
        assert_eq!(
            key.check(&basic("admin-key-0123456789")),
            Err(Denied::Missing),
            "Basic credentials without a colon carry no password"
        );
    }
}
