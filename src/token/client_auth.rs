//! How the client proves who it is at the token endpoint (RFC 6749 §2.3): its secret in the
//! form (`post`) or in HTTP Basic (`basic`), a JWT it signs (`private_key_jwt`,
//! `client_secret_jwt`, RFC 7523, see [`super::assertion`]), its certificate (`tls`, RFC 8705:
//! the TLS layer presents it and the form names the client), nothing (`none`, a public client),
//! or WinBooks' `Basic base64(e-mail)`. Made once per token endpoint; an identity's shares the
//! upstream's private key.
//!
//! Must not: send anything (that is [`super::grant`]), or show a secret.

use super::answer::GrantError;
use super::assertion::{self, Assertions, Signer};
use crate::config::{AuthConfig, ClientAuth, Grant, UpstreamFiles};
use crate::secret::Secret;
use base64::Engine;
use std::path::Path;
use std::sync::Arc;

/// `auth.private_key_file` made ready to sign, and the thumbprints of `auth.certificate_file`.
#[derive(Clone, Default)]
struct PrivateKey {
    signer: Option<Arc<Signer>>,
    thumbprints: Option<(String, String)>,
}

/// One client's way of proving itself.
pub(super) struct ClientProof {
    method: ClientAuth,
    /// WinBooks authenticates with the e-mail (`username`), whatever `method` says.
    winbooks: bool,
    client_id: String,
    client_secret: Option<Secret<String>>,
    email: Option<String>,
    /// The upstream's private key for assertions, shared with its identities.
    key: PrivateKey,
    /// What signs the client assertions, with `private_key_jwt` or `client_secret_jwt`.
    assertions: Option<Assertions>,
}

impl ClientProof {
    /// The proof `auth` asks for, its key and certificate read from `files`.
    pub(super) fn new(auth: &AuthConfig, files: &UpstreamFiles) -> Result<Self, String> {
        let shown = |path: &Option<std::path::PathBuf>| {
            path.as_deref()
                .unwrap_or(Path::new(""))
                .display()
                .to_string()
        };
        let signer = match (auth.client_auth, &files.private_key) {
            (ClientAuth::PrivateKeyJwt, Some(pem)) => {
                let signer = Signer::private_key(pem.expose())
                    .map_err(|e| {
                        format!(
                            "auth.private_key_file {}: {e}",
                            shown(&auth.private_key_file)
                        )
                    })?
                    .with_alg(auth.assertion_alg.as_deref())?;
                Some(Arc::new(signer))
            }
            (ClientAuth::PrivateKeyJwt, None) => {
                return Err("client_auth = \"private_key_jwt\" needs auth.private_key_file".into())
            }
            _ => None,
        };
        let thumbprints = match &files.certificate {
            Some(pem) => Some(assertion::thumbprints(pem).map_err(|e| {
                format!(
                    "auth.certificate_file {}: {e}",
                    shown(&auth.certificate_file)
                )
            })?),
            None => None,
        };
        let key = PrivateKey {
            signer,
            thumbprints,
        };
        ClientProof::of(auth, key)
    }

    /// The proof `auth` (an identity's) asks for, with this one's private key.
    pub(super) fn sharing(&self, auth: &AuthConfig) -> Result<Self, String> {
        ClientProof::of(auth, self.key.clone())
    }

    fn of(auth: &AuthConfig, key: PrivateKey) -> Result<Self, String> {
        let audience = match &auth.assertion_audience {
            Some(audience) => audience.clone(),
            None => auth.token_url.to_string(),
        };
        let key_id = auth.key_id.as_deref();
        let assertions = match (auth.client_auth, &key.signer) {
            (ClientAuth::PrivateKeyJwt, Some(signer)) => {
                let thumbprints = key.thumbprints.as_ref();
                let signer = Arc::clone(signer);
                Some(Assertions::new(signer, key_id, thumbprints, &audience))
            }
            (ClientAuth::ClientSecretJwt, _) => {
                let secret = auth.client_secret.as_ref().map(|s| s.expose().as_str());
                let signer = Arc::new(Signer::secret(secret.unwrap_or_default())?);
                Some(Assertions::new(signer, key_id, None, &audience))
            }
            _ => None,
        };
        Ok(ClientProof {
            method: auth.client_auth,
            winbooks: auth.grant == Grant::WinbooksExchange,
            client_id: auth.client_id.clone(),
            client_secret: auth.client_secret.clone(),
            email: auth.username.clone(),
            key,
            assertions,
        })
    }

    /// A fresh assertion for one request, with the methods that send one.
    pub(super) fn assertion(&self) -> Result<Option<Secret<String>>, GrantError> {
        let Some(assertions) = &self.assertions else {
            return Ok(None);
        };
        let made = assertions.make(&self.client_id, assertion::unix_now());
        made.map(Some).map_err(GrantError::transient)
    }

    /// Prove the client on `request` and its form `fields` (exactly one method), with
    /// `assertion` from [`ClientProof::assertion`].
    pub(super) fn apply<'a>(
        &'a self,
        request: reqwest::RequestBuilder,
        fields: &mut Vec<(&'a str, &'a str)>,
        assertion: Option<&'a Secret<String>>,
    ) -> Result<reqwest::RequestBuilder, GrantError> {
        let secret = self.secret().unwrap_or_default();
        if self.winbooks {
            // WinBooks: Basic base64(e-mail), no colon, no password.
            let email = self.email.as_deref().unwrap_or_default();
            let mut value = http::HeaderValue::from_str(&format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode(email)
            ))
            .map_err(|_| GrantError::Refused {
                code: "invalid_username".into(),
                description: Some("the e-mail cannot be sent in a header".into()),
            })?;
            value.set_sensitive(true);
            return Ok(request.header(http::header::AUTHORIZATION, value));
        }
        match self.method {
            ClientAuth::Post => {
                fields.push(("client_id", &self.client_id));
                fields.push(("client_secret", secret));
            }
            ClientAuth::Basic => {
                let value = basic_credentials(&self.client_id, secret);
                return Ok(request.header(http::header::AUTHORIZATION, value));
            }
            // The certificate proves the client (RFC 8705 §2).
            ClientAuth::None | ClientAuth::Tls => fields.push(("client_id", &self.client_id)),
            // RFC 7523 §2.2; client_id too, which RFC 7521 §4.2 allows and some servers
            // (Entra ID) want.
            ClientAuth::PrivateKeyJwt | ClientAuth::ClientSecretJwt => {
                fields.push(("client_id", &self.client_id));
                fields.push(("client_assertion_type", assertion::JWT_BEARER));
                let jwt = assertion.map(|a| a.expose().as_str());
                fields.push(("client_assertion", jwt.unwrap_or_default()));
            }
        }
        Ok(request)
    }

    /// The client secret, for the scrubber: identity servers echo what they were sent.
    pub(super) fn secret(&self) -> Option<&str> {
        self.client_secret.as_ref().map(|s| s.expose().as_str())
    }

    /// The id and secret as HTTP Basic sent them, for the scrubber.
    pub(super) fn basic(&self) -> Option<(&str, &str)> {
        let basic = !self.winbooks && self.method == ClientAuth::Basic;
        basic.then(|| (self.client_id.as_str(), self.secret().unwrap_or_default()))
    }
}

/// `Authorization: Basic` value per RFC 6749 §2.3.1: form-encode id and secret, then base64.
pub fn basic_credentials(id: &str, secret: &str) -> http::HeaderValue {
    let user: String = form_urlencoded::byte_serialize(id.as_bytes()).collect();
    let pass: String = form_urlencoded::byte_serialize(secret.as_bytes()).collect();
    let encoded = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pass}"));
    let mut value = http::HeaderValue::from_str(&format!("Basic {encoded}"))
        .expect("base64 is always a valid header value");
    value.set_sensitive(true);
    value
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn basic_credentials_form_encode_before_base64() {
        let v = basic_credentials("my.app/first", "a+b/c%d&e=f g");
        let b64 = v.to_str().unwrap().strip_prefix("Basic ").unwrap();
        let raw = base64::engine::general_purpose::STANDARD
            .decode(b64)
            .unwrap();
        assert_eq!(
            String::from_utf8(raw).unwrap(),
            "my.app%2Ffirst:a%2Bb%2Fc%25d%26e%3Df+g"
        );
        assert!(v.is_sensitive());
    }
}
