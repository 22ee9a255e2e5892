//! The four providers of docs/providers.md as simulators: an identity server configured with the
//! provider's token path, client authentication, rotation and error dialect, and an API on the
//! same origin. Used by `tollgate demo` and the preset tests.

use super::api::{ApiLimits, ApiSim};
use super::identity::{ClientAuthRule, IdentityConfig, IdentitySim, Rotation};
use super::{serve_together, SimServer};
use std::time::Duration;
use tokio::net::TcpListener;

/// A simulated provider on one loopback origin.
pub struct SimProvider {
    pub preset: &'static str,
    pub identity: IdentitySim,
    pub api: ApiSim,
    pub server: SimServer,
    /// What the config needs besides the preset: `url`, credentials, and where the real
    /// provider's token host differs from the API host, `token_url` (TOML lines).
    pub auth_toml: String,
    pub url: String,
}

/// The presets with a simulator, in the order the demo lists them.
pub const PROVIDERS: [&str; 4] = ["beproduct", "erpnet", "winbooks", "spring"];

/// The identity server of `preset`, per docs/providers.md, with access tokens living `lifetime`.
pub fn identity_config(preset: &str, lifetime: Duration) -> IdentityConfig {
    let base = IdentityConfig {
        access_lifetime: lifetime,
        ..IdentityConfig::default()
    };
    match preset {
        // Client secret in the body; rotation is a switch (documented both ways): strict here.
        "beproduct" => IdentityConfig {
            client_id: "beproduct-client".into(),
            client_secret: "beproduct-secret".into(),
            client_auth: ClientAuthRule::Post,
            token_path: "/ids/connect/token".into(),
            authorize_path: "/ids/connect/authorize".into(),
            rotation: Rotation::Strict,
            ..base
        },
        // Client id with '/', strict rotation, every token error is HTTP 400.
        "erpnet" => IdentityConfig {
            client_id: "my.trusted.app/first".into(),
            client_secret: "erp+secret/with%odd&chars=".into(),
            client_auth: ClientAuthRule::Post,
            token_path: "/id/connect/token".into(),
            authorize_path: "/id/connect/authorize".into(),
            rotation: Rotation::Strict,
            all_errors_400: true,
            ..base
        },
        // Basic(e-mail), exchange token, `code` fields, expires_in as a string.
        "winbooks" => IdentityConfig {
            client_id: "accounting@example.com".into(),
            token_path: "/OAuth20/Token".into(),
            winbooks: true,
            ..base
        },
        // Basic only, password grant, the same refresh token back, 401 when it expires.
        "spring" => IdentityConfig {
            client_id: "spring-client".into(),
            client_secret: "spring-secret".into(),
            client_auth: ClientAuthRule::Basic,
            token_path: "/oauth/token".into(),
            rotation: Rotation::Reuse,
            spring_errors: true,
            token_type: "bearer".into(),
            users: vec![("ann@example.com".into(), "correct horse battery".into())],
            refresh_lifetime: Some(Duration::from_secs(30 * 24 * 3600)),
            ..base
        },
        other => panic!("no simulator for preset {other}"),
    }
}

impl SimProvider {
    /// Start the simulator of `preset` on `listener`.
    pub async fn start(
        preset: &'static str,
        lifetime: Duration,
        listener: TcpListener,
    ) -> SimProvider {
        let config = identity_config(preset, lifetime);
        let identity = IdentitySim::new(config.clone());
        // ERP.net limits each session: 600 a minute, one request in flight, five waiting.
        let api = match preset {
            "erpnet" => ApiSim::with_limits(identity.clone(), ApiLimits::ERPNET),
            _ => ApiSim::new(identity.clone()),
        };
        let server = serve_together(&identity, &api, listener).await;
        let origin = server.url();
        let (url, auth_toml) = match preset {
            "beproduct" => (
                origin.clone(),
                format!(
                    "token_url = \"{}\"\nclient_id = \"{}\"\nclient_secret = \"{}\"\nrefresh_token = \"{}\"",
                    identity.token_url(),
                    config.client_id,
                    config.client_secret,
                    identity.issue_refresh_token()
                ),
            ),
            "erpnet" => (
                format!("{origin}/api/domain/odata"),
                format!(
                    "client_id = \"{}\"\nclient_secret = \"{}\"\nrefresh_token = \"{}\"",
                    config.client_id,
                    config.client_secret,
                    identity.issue_refresh_token()
                ),
            ),
            "winbooks" => (
                origin.clone(),
                format!(
                    "token_url = \"{}\"\nusername = \"{}\"\nexchange_token = \"{}\"",
                    identity.token_url(),
                    config.client_id,
                    identity.issue_exchange_token()
                ),
            ),
            "spring" => (
                format!("{origin}/api"),
                format!(
                    "client_id = \"{}\"\nclient_secret = \"{}\"\nusername = \"{}\"\npassword = \"{}\"",
                    config.client_id, config.client_secret, config.users[0].0, config.users[0].1
                ),
            ),
            other => panic!("no simulator for preset {other}"),
        };
        SimProvider {
            preset,
            identity,
            api,
            server,
            auth_toml,
            url,
        }
    }

    /// The `[[upstream]]` block for this provider, listening on `listen`.
    pub fn upstream_toml(&self, name: &str, listen: &str) -> String {
        format!(
            "[[upstream]]\nname = \"{name}\"\npreset = \"{}\"\nlisten = \"{listen}\"\nurl = \"{}\"\n\n[upstream.auth]\n{}\n",
            self.preset, self.url, self.auth_toml
        )
    }
}
