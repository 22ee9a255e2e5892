//! `[upstream.auth]`: how tokens are obtained from the identity server — the grant, the token
//! endpoint, and how the client proves who it is there (a secret, a signed assertion, a
//! certificate).
//!
//! What is wrong with the table is here too (`check_auth`, called by [`super::validate`]):
//! the keys each grant and each way of proving the client needs, and those it would ignore;
//! that a key file holds a key, and a client certificate goes with its key.

use super::validate::Report;
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

/// Form fields that tollgate sets itself; `params` may not override them.
const RESERVED_PARAMS: &[&str] = &[
    "grant_type",
    "client_id",
    "client_secret",
    "refresh_token",
    "scope",
    "code",
    "username",
    "password",
];

/// The keys each grant and client authentication needs, and those it would ignore.
pub(super) fn check_auth(auth: &AuthConfig, report: &mut Report<'_>) {
    let mut require = |set: bool, k: &str, why: &str| {
        if !set {
            report.at(
                k,
                format!(
                    "is required with grant = \"{}\"; {why}",
                    auth.grant.as_str()
                ),
            );
        }
    };
    match auth.grant {
        Grant::WinbooksExchange => {
            require(
                auth.username.is_some(),
                "auth.username",
                "set it to the e-mail of the WinBooks account",
            );
            require(
                auth.exchange_token.is_some(),
                "auth.exchange_token",
                "set it to the exchange token from WinBooks on Web",
            );
        }
        Grant::Password => {
            require(
                auth.username.is_some(),
                "auth.username",
                "set the user to log in as",
            );
            require(
                auth.password.is_some(),
                "auth.password",
                "set it, from the environment: password = \"${VAR}\"",
            );
        }
        Grant::ClientCredentials | Grant::RefreshToken => {}
    }
    if auth.grant != Grant::WinbooksExchange {
        check_client(auth, report);
    }
    if auth.grant == Grant::ClientCredentials {
        if auth.client_auth == ClientAuth::None {
            report.at(
                "auth.client_auth",
                "client_credentials needs a client secret: use \"post\" or \"basic\"".into(),
            );
        }
        if auth.refresh_token.is_some() {
            report.at(
                "auth.refresh_token",
                "is not used by grant = \"client_credentials\"; remove it".into(),
            );
        }
    }
    for name in auth.params.keys() {
        if RESERVED_PARAMS.contains(&name.as_str()) {
            report.at(
                &format!("auth.params.{name}"),
                format!("`{name}` is set by tollgate itself; use the auth key instead"),
            );
        }
    }
    if auth.default_expires_in.is_zero() {
        report.at("auth.default_expires_in", "must be more than 0s".into());
    }
}

/// `client_cert` and `client_key` (below `prefix`): both or neither, readable, a certificate
/// and its own key.
pub(super) fn check_cert_pair(
    prefix: &str,
    cert: Option<&std::path::Path>,
    key: Option<&std::path::Path>,
    report: &mut Report<'_>,
) {
    let (cert, key) = match (cert, key) {
        (Some(cert), Some(key)) => (cert, key),
        (Some(_), None) => {
            return report.at(
                &format!("{prefix}client_key"),
                "is required with client_cert: the certificate's private key (PEM)".into(),
            )
        }
        (None, Some(_)) => {
            return report.at(
                &format!("{prefix}client_cert"),
                "is required with client_key: the certificate (PEM, leaf first)".into(),
            )
        }
        (None, None) => return,
    };
    let read = |path: &std::path::Path| {
        std::fs::read(path).map_err(|e| format!("{}: cannot be read ({e})", path.display()))
    };
    let pair = match (read(cert), read(key)) {
        (Ok(chain), Ok(key)) => crate::config::ClientCert {
            chain,
            key: crate::secret::Secret::new(key),
        },
        (Err(e), _) => return report.at(&format!("{prefix}client_cert"), e),
        (_, Err(e)) => return report.at(&format!("{prefix}client_key"), e),
    };
    if let Err(e) = crate::tls::upstream::client_identity(&pair) {
        report.at(
            &format!("{prefix}client_cert"),
            format!("{} with {}: {e}", cert.display(), key.display()),
        );
    }
}

/// `private_key_file` holds a key tollgate can sign with, `certificate_file` a certificate
/// (their contents are never shown).
fn check_key_files(auth: &AuthConfig, report: &mut Report<'_>) {
    use crate::token::assertion::{thumbprints, Signer};
    if let Some(path) = &auth.private_key_file {
        let problem = match std::fs::read(path) {
            Ok(pem) => match Signer::private_key(&pem) {
                Ok(signer) => {
                    if let Err(e) = signer.with_alg(auth.assertion_alg.as_deref()) {
                        report.at("auth.assertion_alg", e);
                    }
                    None
                }
                Err(e) => Some(e),
            },
            Err(e) => Some(format!("cannot be read ({e})")),
        };
        if let Some(problem) = problem {
            report.at(
                "auth.private_key_file",
                format!("{}: {problem}", path.display()),
            );
        }
    }
    if let Some(path) = &auth.certificate_file {
        let problem = match std::fs::read(path) {
            Ok(pem) => thumbprints(&pem).err(),
            Err(e) => Some(format!("cannot be read ({e})")),
        };
        if let Some(problem) = problem {
            report.at(
                "auth.certificate_file",
                format!("{}: {problem}", path.display()),
            );
        }
    }
}

/// The client's id and secret, as `client_auth` sends them.
fn check_client(auth: &AuthConfig, report: &mut Report<'_>) {
    let has_secret = auth
        .client_secret
        .as_ref()
        .is_some_and(|s| !s.expose().is_empty());
    match auth.client_auth {
        ClientAuth::Post | ClientAuth::Basic if !has_secret => report.at(
            "auth.client_secret",
            format!(
                "is required with client_auth = \"{}\"; set it, or use client_auth = \"none\" for a public client",
                auth.client_auth.as_str()
            ),
        ),
        ClientAuth::None if auth.client_secret.is_some() => report.at(
            "auth.client_secret",
            "is set but client_auth = \"none\" would not send it; use \"post\" or \"basic\""
                .into(),
        ),
        ClientAuth::ClientSecretJwt => {
            let secret = auth.client_secret.as_ref().map(|s| s.expose().as_str());
            if let Err(e) = crate::token::assertion::Signer::secret(secret.unwrap_or_default()) {
                report.at("auth.client_secret", e);
            }
        }
        ClientAuth::Tls => {
            if auth.client_secret.is_some() {
                report.at(
                    "auth.client_secret",
                    "is not sent with client_auth = \"tls\" (the certificate proves the client); remove it".into(),
                );
            }
            let files = [
                ("auth.client_cert", &auth.client_cert),
                ("auth.client_key", &auth.client_key),
            ];
            for (key, path) in files {
                if path.is_none() {
                    report.at(
                        key,
                        format!("is required with client_auth = \"tls\": the PEM file of the client's {}", if key.ends_with("cert") { "certificate (leaf first)" } else { "private key" }),
                    );
                }
            }
            check_cert_pair("auth.", auth.client_cert.as_deref(), auth.client_key.as_deref(), report);
        }
        ClientAuth::PrivateKeyJwt => {
            check_key_files(auth, report);
            if auth.private_key_file.is_none() {
                report.at(
                    "auth.private_key_file",
                    "is required with client_auth = \"private_key_jwt\": the PEM file of the key registered with the identity server".into(),
                );
            }
            if auth.client_secret.is_some() {
                report.at(
                    "auth.client_secret",
                    "is not sent with client_auth = \"private_key_jwt\" (the key proves the client); remove it".into(),
                );
            }
        }
        _ => {}
    }
    let jwt = matches!(
        auth.client_auth,
        ClientAuth::PrivateKeyJwt | ClientAuth::ClientSecretJwt
    );
    let only_with = [
        (
            "private_key_file",
            auth.private_key_file.is_some(),
            ClientAuth::PrivateKeyJwt == auth.client_auth,
        ),
        (
            "key_id",
            auth.key_id.is_some(),
            ClientAuth::PrivateKeyJwt == auth.client_auth,
        ),
        (
            "assertion_alg",
            auth.assertion_alg.is_some(),
            ClientAuth::PrivateKeyJwt == auth.client_auth,
        ),
        (
            "certificate_file",
            auth.certificate_file.is_some(),
            ClientAuth::PrivateKeyJwt == auth.client_auth,
        ),
        ("assertion_audience", auth.assertion_audience.is_some(), jwt),
        (
            "client_cert",
            auth.client_cert.is_some(),
            auth.client_auth == ClientAuth::Tls,
        ),
        (
            "client_key",
            auth.client_key.is_some(),
            auth.client_auth == ClientAuth::Tls,
        ),
    ];
    for name in ["client_assertion", "client_assertion_type"] {
        if jwt && auth.params.contains_key(name) {
            report.at(
                &format!("auth.params.{name}"),
                format!(
                    "is made by tollgate with client_auth = \"{}\"; remove it from params",
                    auth.client_auth.as_str()
                ),
            );
        }
    }
    for (key, set, used) in only_with {
        if set && !used {
            let with = match key {
                "assertion_audience" => "\"private_key_jwt\" or \"client_secret_jwt\"",
                "client_cert" | "client_key" => "\"tls\" (for the API, set them in [[upstream]])",
                _ => "\"private_key_jwt\"",
            };
            report.at(
                &format!("auth.{key}"),
                format!("is only used with client_auth = {with}; set client_auth, or remove it"),
            );
        }
    }
    if auth.client_id.is_empty() {
        report.at(
            "auth.client_id",
            "is required: the client id the identity server issued".into(),
        );
    }
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
