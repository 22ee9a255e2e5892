//! `[upstream.auth]`: how tokens are obtained from the identity server — the grant, the token
//! endpoint, and how the client proves who it is there (a secret, a signed assertion, a
//! certificate).
//!
//! Must not: check anything that spans several keys (that is [`super::validate`]).

use super::values::{de_duration, de_http_url, de_opt_duration};
use crate::secret::Secret;
use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;
use url::Url;

/// How tokens are obtained from the identity server.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthConfig {
    pub grant: Grant,
    #[serde(deserialize_with = "de_http_url")]
    pub token_url: Url,
    /// The client id; for `winbooks_exchange` it is not used (the e-mail authenticates).
    #[serde(default)]
    pub client_id: String,
    pub client_secret: Option<Secret<String>>,
    #[serde(default)]
    pub client_auth: ClientAuth,
    /// `private_key_jwt`: the key that signs the client assertions, PKCS#8 PEM (EC P-256,
    /// RSA or Ed25519). Read at start and on every reload.
    pub private_key_file: Option<PathBuf>,
    /// `private_key_jwt`: the assertion header's `kid`, when the server registered several keys.
    pub key_id: Option<String>,
    /// `private_key_jwt`: the certificate of the key, whose thumbprints go in the header
    /// (`x5t`, `x5t#S256`), as Entra ID wants for a certificate credential.
    pub certificate_file: Option<PathBuf>,
    /// The assertions' `aud`: the token endpoint unless set (some servers want their issuer).
    pub assertion_audience: Option<String>,
    /// `private_key_jwt` with an RSA key: `PS256` instead of `RS256` (Entra ID's current form).
    pub assertion_alg: Option<String>,
    /// RFC 9449: tokens bound to a key of tollgate's (one per lineage, kept in its record),
    /// with a DPoP proof on every token request and every API request.
    #[serde(default)]
    pub dpop: bool,
    /// `client_auth = "tls"` (RFC 8705): the certificate (PEM, leaf first) and key presented
    /// to the token endpoint.
    pub client_cert: Option<PathBuf>,
    pub client_key: Option<PathBuf>,
    /// The seed refresh token (grant = refresh_token). The state store keeps its descendants.
    pub refresh_token: Option<Secret<String>>,
    /// The user for `password`; the e-mail for `winbooks_exchange`.
    pub username: Option<String>,
    /// The password for `password`.
    pub password: Option<Secret<String>>,
    /// The long-lived exchange token for `winbooks_exchange`.
    pub exchange_token: Option<Secret<String>>,
    pub scope: Option<String>,
    /// Refresh this long before expiry, if that comes before 80% of the lifetime.
    #[serde(default, deserialize_with = "de_opt_duration")]
    pub refresh_before: Option<Duration>,
    /// Extra form fields sent on every token request (`resource`, `audience`, ...).
    #[serde(default)]
    pub params: BTreeMap<String, String>,
    /// Lifetime assumed when a token response has no `expires_in`.
    #[serde(default = "default_expires_in", deserialize_with = "de_duration")]
    pub default_expires_in: Duration,
    /// How long a client request waits for a token (a refresh in the air, or retries while
    /// the identity server fails), before 503.
    #[serde(default = "default_refresh_wait", deserialize_with = "de_duration")]
    pub refresh_wait: Duration,
    /// How long connecting to the token endpoint may take; and the whole of a token request
    /// that spends nothing (client credentials, a password login).
    #[serde(default = "default_token_timeout", deserialize_with = "de_duration")]
    pub timeout: Duration,
    /// How long a request that spends a refresh token (or a login code) waits for its answer
    /// once it is sent: the identity server may have rotated already, so it stays in the air
    /// while its connection lives, up to this ceiling.
    #[serde(default = "default_answer_timeout", deserialize_with = "de_duration")]
    pub answer_timeout: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Grant {
    RefreshToken,
    ClientCredentials,
    /// Resource-owner password; refreshes while the refresh token works, then logs in again.
    Password,
    /// WinBooks on Web: an exchange token traded for tokens, Basic(e-mail) client auth.
    WinbooksExchange,
}

impl Grant {
    pub fn as_str(self) -> &'static str {
        match self {
            Grant::RefreshToken => "refresh_token",
            Grant::ClientCredentials => "client_credentials",
            Grant::Password => "password",
            Grant::WinbooksExchange => "winbooks_exchange",
        }
    }
}

/// RFC 6749 §2.3.1 client authentication.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ClientAuth {
    /// `client_id` and `client_secret` in the form body (client_secret_post).
    #[default]
    Post,
    /// HTTP Basic with form-encoded id and secret (client_secret_basic).
    Basic,
    /// A public client: only `client_id` in the form body.
    None,
    /// A JWT signed with the client's private key (RFC 7523, `private_key_jwt`).
    PrivateKeyJwt,
    /// A JWT signed with HS256 and the client secret (`client_secret_jwt`).
    ClientSecretJwt,
    /// A client certificate at the token endpoint, `client_id` in the form (RFC 8705
    /// `tls_client_auth`).
    Tls,
}

impl ClientAuth {
    pub fn as_str(self) -> &'static str {
        match self {
            ClientAuth::Post => "post",
            ClientAuth::Basic => "basic",
            ClientAuth::None => "none",
            ClientAuth::PrivateKeyJwt => "private_key_jwt",
            ClientAuth::ClientSecretJwt => "client_secret_jwt",
            ClientAuth::Tls => "tls",
        }
    }
}

fn default_expires_in() -> Duration {
    Duration::from_secs(3600)
}
fn default_refresh_wait() -> Duration {
    Duration::from_secs(10)
}
fn default_token_timeout() -> Duration {
    Duration::from_secs(30)
}
fn default_answer_timeout() -> Duration {
    Duration::from_secs(120)
}

#[cfg(test)]
mod tests {
    use super::super::test_support::{error_of, GOOD};

    #[test]
    fn assertion_settings_are_checked_against_client_auth() {
        let auth = |lines: &str| GOOD.replace("params = {", &format!("{lines}\nparams = {{"));
        let err = error_of(&auth("client_auth = \"private_key_jwt\""));
        assert!(err.contains("auth.private_key_file: is required"), "{err}");
        assert!(err.contains("auth.client_secret: is not sent"), "{err}");
        let err = error_of(&auth("key_id = \"k1\"\nassertion_audience = \"x\""));
        assert!(
            err.contains("auth.key_id: is only used with client_auth = \"private_key_jwt\""),
            "{err}"
        );
        assert!(
            err.contains("auth.assertion_audience: is only used"),
            "{err}"
        );
        let err = error_of(&auth("client_auth = \"client_secret_jwt\""));
        assert!(
            err.contains("auth.client_secret: client_secret_jwt signs with HS256"),
            "{err}"
        );
        assert!(!err.contains("s3cr3t-value"), "{err}");
        let err = error_of(&auth(
            "client_auth = \"private_key_jwt\"\nprivate_key_file = \"/nonexistent/key.pem\"",
        ));
        assert!(
            err.contains("/nonexistent/key.pem: cannot be read"),
            "{err}"
        );
        let err = error_of(
            &auth("client_auth = \"client_secret_jwt\"")
                .replace("params = {", "params = { client_assertion = \"x\", "),
        );
        assert!(
            err.contains("auth.params.client_assertion: is made by tollgate"),
            "{err}"
        );
    }
}
