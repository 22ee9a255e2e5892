//! `Secret<T>`: a value that must never be printed. Debug and Display show `[redacted]`, there is
//! no `Serialize`, and the only way to read it is `expose()`, which makes every use easy to find.
//! Tokens that must appear in logs appear as a [`fingerprint`] at most.

use serde::{Deserialize, Deserializer};
use sha2::{Digest, Sha256};
use std::fmt;

/// A secret value (client secret, refresh token, password, inbound key).
#[derive(Clone, PartialEq, Eq, Default)]
pub struct Secret<T>(T);

impl<T> Secret<T> {
    pub fn new(value: T) -> Self {
        Secret(value)
    }

    /// The secret itself. Call it only where the value leaves the process on purpose
    /// (a token request, a header) or is written to the state store.
    pub fn expose(&self) -> &T {
        &self.0
    }
}

impl<T> fmt::Debug for Secret<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

impl<T> fmt::Display for Secret<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Secret<T> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        T::deserialize(deserializer).map(Secret)
    }
}

impl From<String> for Secret<String> {
    fn from(value: String) -> Self {
        Secret(value)
    }
}

impl From<&str> for Secret<String> {
    fn from(value: &str) -> Self {
        Secret(value.to_owned())
    }
}

/// A short, stable, non-reversible name for a token: the first 8 hex digits of its SHA-256.
/// Enough to tell two tokens apart in a log, useless to an attacker.
pub fn fingerprint(token: &str) -> String {
    let digest = Sha256::digest(token.as_bytes());
    let mut out = String::with_capacity(8);
    for byte in &digest[..4] {
        out.push_str(&format!("{byte:02x}"));
    }
    out
}

/// The full SHA-256 of a secret, hex encoded: stored beside a refresh token's descendants so
/// that a new seed in the config can be recognised without storing the seed itself.
pub fn sha256_hex(value: &str) -> String {
    Sha256::digest(value.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_and_display_never_show_the_value() {
        let secret = Secret::from("hunter2-very-secret");
        assert_eq!(format!("{secret:?}"), "[redacted]");
        assert_eq!(format!("{secret}"), "[redacted]");
        #[derive(Debug)]
        #[allow(dead_code)]
        struct Holder {
            password: Secret<String>,
        }
        let holder = Holder {
            password: secret.clone(),
        };
        assert!(!format!("{holder:?}").contains("hunter2"));
        assert!(!format!("{holder:#?}").contains("hunter2"));
        assert_eq!(secret.expose(), "hunter2-very-secret");
    }

    #[test]
    fn fingerprint_is_short_stable_and_distinct() {
        let a = fingerprint("token-a");
        assert_eq!(a.len(), 8);
        assert_eq!(a, fingerprint("token-a"));
        assert_ne!(a, fingerprint("token-b"));
        assert!(!a.contains("token"));
    }
}
