//! `[[upstream.identity]]`: another user the API is reached as, beside the upstream's own
//! (`[upstream.auth]`). An identity names itself and gives credentials of its own; everything
//! else (grant, token endpoint, client auth, timeouts) it takes from `[upstream.auth]`. A named
//! inbound key with `identity = "…"` reaches the API as that identity.
//!
//! Must not: check anything of `[upstream.auth]` itself (that is [`super::validate`]).

use super::{AuthConfig, Grant, QuotaConfig, UpstreamConfig};
use crate::secret::Secret;
use crate::store::OWN_IDENTITY;
use serde::Deserialize;
use std::collections::BTreeMap;

/// One `[[upstream.identity]]` table.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IdentityConfig {
    /// `[a-z0-9][a-z0-9-]*`, unique within the upstream: it names the identity's lineage in the
    /// store (`api@alice`), in logs and in `tollgate login api --identity alice`.
    pub name: String,
    pub client_id: Option<String>,
    pub client_secret: Option<Secret<String>>,
    /// The identity's seed refresh token (grant = refresh_token).
    pub refresh_token: Option<Secret<String>>,
    pub username: Option<String>,
    pub password: Option<Secret<String>>,
    pub exchange_token: Option<Secret<String>>,
    /// Form fields added to (or replacing) `auth.params` for this identity's token requests.
    #[serde(default)]
    pub params: BTreeMap<String, String>,
    /// Limits of this identity's own requests, before the upstream's (else
    /// `[upstream.quota.per_identity]`'s).
    pub per_minute: Option<u32>,
    pub concurrency: Option<u32>,
    pub queue: Option<u32>,
}

/// `[upstream.quota.per_identity]`: the limits of each identity's own requests — the upstream's
/// own identity and every `[[upstream.identity]]` that does not set them itself — enforced
/// before the upstream's, which count every identity's. ERP.net counts these per user session.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IdentityLimits {
    pub per_minute: Option<u32>,
    pub concurrency: Option<u32>,
    pub queue: Option<u32>,
}

impl UpstreamConfig {
    /// The identity named `name`, if the upstream has one.
    pub fn identity(&self, name: &str) -> Option<&IdentityConfig> {
        self.identities.iter().find(|i| i.name == name)
    }

    /// `[upstream.auth]` with `identity`'s credentials in place of its own.
    pub fn identity_auth(&self, identity: &IdentityConfig) -> AuthConfig {
        let mut auth = self.auth.clone();
        let own = identity.clone();
        if let Some(id) = own.client_id {
            auth.client_id = id;
        }
        // A credential of the identity replaces the upstream's; one it does not give is not
        // inherited where it names a user (the upstream's user is not this identity's).
        auth.client_secret = own.client_secret.or(auth.client_secret);
        auth.refresh_token = own.refresh_token;
        auth.username = own.username;
        auth.password = own.password;
        auth.exchange_token = own.exchange_token;
        auth.params.extend(own.params);
        auth
    }

    /// The limits of each identity's own requests, by label ([`OWN_IDENTITY`] for the
    /// upstream's own): a quota of `per_minute`, `concurrency` and `queue` alone, for each
    /// identity that has any.
    pub fn identity_limits(&self) -> Vec<(String, QuotaConfig)> {
        let default = self.quota.as_ref().and_then(|q| q.per_identity.as_ref());
        let default = default.cloned().unwrap_or_default();
        let own = (OWN_IDENTITY.to_owned(), default.clone());
        let each = self.identities.iter().map(|i| {
            let limits = IdentityLimits {
                per_minute: i.per_minute.or(default.per_minute),
                concurrency: i.concurrency.or(default.concurrency),
                queue: i.queue.or(default.queue),
            };
            (i.name.clone(), limits)
        });
        let queue_timeout = self.quota.as_ref().map(|q| q.queue_timeout);
        std::iter::once(own)
            .chain(each)
            .filter(|(_, l)| *l != IdentityLimits::default())
            .map(|(name, l)| {
                let mut quota = QuotaConfig::limits(l.per_minute, l.concurrency, l.queue);
                quota.queue_timeout = queue_timeout.unwrap_or(quota.queue_timeout);
                (name, quota)
            })
            .collect()
    }
}

/// What is wrong with the identities of `up`, as (key below the upstream, message).
pub(super) fn check(up: &UpstreamConfig, report: &mut impl FnMut(&str, String)) {
    for (i, identity) in up.identities.iter().enumerate() {
        let at = format!("identity[{i}]");
        let name = &identity.name;
        let valid = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-';
        let starts = name.bytes().next().is_some_and(|b| b != b'-');
        if name.len() > 64 || !starts || !name.bytes().all(valid) {
            report(
                &format!("{at}.name"),
                format!("`{name}` is not a valid identity name: 1 to 64 lowercase letters, digits and '-', not starting with '-'"),
            );
        }
        if up.identities[..i].iter().any(|other| &other.name == name) {
            report(
                &format!("{at}.name"),
                format!(
                    "`{name}` names two identities of upstream `{}`: give each its own name",
                    up.name
                ),
            );
        }
        for (field, problem) in missing(up.auth.grant, identity) {
            report(&format!("{at}.{field}"), problem);
        }
        let proof = up.auth.client_auth;
        if identity.client_secret.is_some()
            && matches!(
                proof,
                super::ClientAuth::PrivateKeyJwt | super::ClientAuth::Tls
            )
        {
            report(
                &format!("{at}.client_secret"),
                format!("is not sent with client_auth = \"{}\" (the upstream's key or certificate proves the client); remove it", proof.as_str()),
            );
        }
        let jwt = matches!(
            proof,
            super::ClientAuth::PrivateKeyJwt | super::ClientAuth::ClientSecretJwt
        );
        for name in ["client_assertion", "client_assertion_type"] {
            if jwt && identity.params.contains_key(name) {
                report(
                    &format!("{at}.params.{name}"),
                    format!(
                        "is made by tollgate with client_auth = \"{}\"; remove it from params",
                        proof.as_str()
                    ),
                );
            }
        }
        let own_secret = identity.client_secret.as_ref().map(|s| s.expose().as_str());
        if let (super::ClientAuth::ClientSecretJwt, Some(secret)) =
            (up.auth.client_auth, own_secret)
        {
            if let Err(e) = crate::token::assertion::Signer::secret(secret) {
                report(&format!("{at}.client_secret"), e);
            }
        }
        let own = (identity.per_minute, identity.concurrency, identity.queue);
        if own != (None, None, None) {
            let limits = up.identity_limits();
            let merged = limits.iter().find(|(n, _)| n == name).map(|(_, q)| q);
            for (field, problem) in merged.map(QuotaConfig::problems).unwrap_or_default() {
                report(&format!("{at}.{field}"), problem);
            }
        }
    }
    let default = up.quota.as_ref().and_then(|q| q.per_identity.as_ref());
    if let Some(l) = default {
        let quota = QuotaConfig::limits(l.per_minute, l.concurrency, l.queue);
        for (field, problem) in quota.problems() {
            report(&format!("quota.per_identity.{field}"), problem);
        }
    }
    // Two lineages redeeming one seed would spend each other's refresh token: a server that
    // rotates strictly then revokes the grant under both.
    let seed = |auth: &AuthConfig| {
        let seed = auth.refresh_token.as_ref().or(auth.exchange_token.as_ref());
        seed.map(|s| s.expose().clone())
    };
    let mut seeds = vec![("[upstream.auth]".to_owned(), seed(&up.auth))];
    for (i, identity) in up.identities.iter().enumerate() {
        let own = seed(&up.identity_auth(identity));
        if let Some(first) = seeds.iter().find(|(_, s)| own.is_some() && *s == own) {
            report(
                &format!("identity[{i}]"),
                format!("identity `{}` has the same refresh_token (or exchange_token) as {}: each user needs a login of its own (`tollgate login {} --identity {}`), or two lineages would spend one refresh token", identity.name, first.0, up.name, identity.name),
            );
        }
        seeds.push((format!("identity `{}`", identity.name), own));
    }
    let keys = up.inbound.iter().flat_map(|i| i.keys.iter());
    for (j, key) in keys.enumerate() {
        let Some(identity) = &key.identity else {
            continue;
        };
        if up.identity(identity).is_none() {
            report(
                &format!("inbound.keys[{j}].identity"),
                format!("upstream `{}` has no identity `{identity}`: add [[upstream.identity]] name = \"{identity}\" with its credentials, or remove identity from the key", up.name),
            );
        }
    }
}

/// The credentials `grant` needs that `identity` does not give.
fn missing(grant: Grant, identity: &IdentityConfig) -> Vec<(&'static str, String)> {
    let name = &identity.name;
    let need = |field: &'static str, why: &str| {
        (
            field,
            format!("identity `{name}` needs its own {field} {why}"),
        )
    };
    let mut out = Vec::new();
    match grant {
        // A refresh token may come from `tollgate login … --identity` instead.
        Grant::RefreshToken => {}
        Grant::Password => {
            if identity.username.is_none() {
                out.push(need("username", "for the password grant"));
            }
            if identity.password.is_none() {
                out.push(need("password", "for the password grant"));
            }
        }
        Grant::ClientCredentials => {
            if identity.client_id.is_none() {
                out.push(need(
                    "client_id",
                    "for the client_credentials grant (the client is the identity)",
                ));
            }
        }
        Grant::WinbooksExchange => {
            if identity.username.is_none() {
                out.push(need(
                    "username",
                    "(the WinBooks e-mail) for the winbooks_exchange grant",
                ));
            }
            if identity.exchange_token.is_none() {
                out.push(need("exchange_token", "for the winbooks_exchange grant"));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::super::test_support::{env, error_of, GOOD};
    use crate::config::Config;

    fn with(lines: &str) -> String {
        format!("{GOOD}\n{lines}\n")
    }

    const TWO: &str = r#"
[upstream.quota]
queue_timeout = "5s"
[upstream.quota.per_identity]
per_minute = 600
concurrency = 1
queue = 5

[[upstream.identity]]
name = "alice"
refresh_token = "alice-seed"
concurrency = 2

[[upstream.identity]]
name = "bob"
refresh_token = "bob-seed"
"#;

    #[test]
    fn an_identity_takes_the_per_identity_limits_it_does_not_set() {
        let config = Config::parse(&with(TWO), "t.toml", env).unwrap();
        let up = &config.upstreams[0];
        let limits: Vec<_> = up
            .identity_limits()
            .into_iter()
            .map(|(name, q)| (name, q.per_minute, q.concurrency, q.queue, q.queue_timeout))
            .collect();
        let s5 = std::time::Duration::from_secs(5);
        assert_eq!(
            limits,
            [
                ("-".to_owned(), Some(600), Some(1), Some(5), s5),
                ("alice".to_owned(), Some(600), Some(2), Some(5), s5),
                ("bob".to_owned(), Some(600), Some(1), Some(5), s5),
            ]
        );
        let shown = config.describe();
        assert!(
            shown.contains(
                "quota.per_identity       600/minute, 1 in flight, 5 waiting (each identity)"
            ),
            "{shown}"
        );
        assert!(
            shown.contains("limits of its own: 600/minute, 2 in flight, 5 waiting"),
            "{shown}"
        );
        // Without limits anywhere, no identity has any.
        let bare = TWO
            .split("[[upstream.identity]]")
            .skip(1)
            .collect::<Vec<_>>();
        let bare = format!(
            "[[upstream.identity]]{}",
            bare.join("[[upstream.identity]]")
        );
        let bare = bare.replace("concurrency = 2\n", "");
        let config = Config::parse(&with(&bare), "t.toml", env).unwrap();
        assert!(config.upstreams[0].identity_limits().is_empty());
    }

    #[test]
    fn bad_identity_limits_are_named() {
        let err = error_of(&with(&TWO.replace("concurrency = 2", "per_minute = 0")));
        assert!(
            err.contains("upstream[0].identity[0].per_minute: must be at least 1"),
            "{err}"
        );
        let err = error_of(&with(&TWO.replace("concurrency = 1\n", "")));
        assert!(
            err.contains("upstream[0].quota.per_identity.queue: is the wait line of `concurrency`"),
            "{err}"
        );
        let err = error_of(&with(&TWO.replace("queue = 5", "wait = 5")));
        assert!(err.contains("wait"), "{err}");
    }
}
