//! Presets for the providers in docs/providers.md: `beproduct`, `erpnet`, `winbooks`, `spring`.
//!
//! A preset fills the keys a user would otherwise copy from the provider's documentation —
//! token URL, grant, client authentication, scope, login URLs — into the upstream's TOML table
//! before it is read, and only where the user did not set them: every key stays overridable.
//! It returns the keys it filled, so `tollgate check` can show them.
//! Quota defaults come from here too (ERP.net: 600/minute, 1 in flight, a queue of 5 per
//! session, so per identity when the upstream has identities); the quota module enforces them.

use toml::{Table, Value};
use url::Url;

/// The presets a config may name.
pub const PRESETS: &[&str] = &["beproduct", "erpnet", "winbooks", "spring"];

const BEPRODUCT_SCOPE: &str = "openid profile email roles offline_access BeProductPublicApi";
const ERPNET_LOGIN_SCOPE: &str = "openid profile offline_access DomainApi";

/// Fill the missing keys of one `[[upstream]]` table from its `preset`. Returns the filled
/// keys as paths relative to the upstream (`auth.token_url`), or why the preset cannot apply.
pub fn apply(upstream: &mut Table) -> Result<Vec<String>, String> {
    let Some(preset) = upstream.get("preset") else {
        return Ok(Vec::new());
    };
    let preset = preset
        .as_str()
        .ok_or("must be a string: one of beproduct, erpnet, winbooks, spring")?
        .to_owned();
    let mut filled = Filled::default();
    match preset.as_str() {
        "beproduct" => beproduct(upstream, &mut filled)?,
        "erpnet" => erpnet(upstream, &mut filled)?,
        "winbooks" => winbooks(upstream, &mut filled)?,
        "spring" => spring(upstream, &mut filled)?,
        other => {
            return Err(format!(
                "`{other}` is not a preset; use one of {}",
                PRESETS.join(", ")
            ))
        }
    }
    Ok(filled.0)
}

/// The keys a preset filled, as paths relative to the upstream.
#[derive(Default)]
struct Filled(Vec<String>);

impl Filled {
    /// Set `key` of `table` (the upstream's `section`, "" for the upstream itself) to `value`,
    /// unless the user set it.
    fn fill(&mut self, table: &mut Table, section: &str, key: &str, value: impl Into<Value>) {
        if !table.contains_key(key) {
            table.insert(key.to_owned(), value.into());
            self.0.push(if section.is_empty() {
                key.to_owned()
            } else {
                format!("{section}.{key}")
            });
        }
    }
}

fn beproduct(upstream: &mut Table, filled: &mut Filled) -> Result<(), String> {
    filled.fill(upstream, "", "url", "https://developers.beproduct.com");
    let auth = section(upstream, "auth")?;
    filled.fill(auth, "auth", "grant", "refresh_token");
    let token_url = "https://id.winks.io/ids/connect/token";
    filled.fill(auth, "auth", "token_url", token_url);
    filled.fill(auth, "auth", "client_auth", "post");
    filled.fill(auth, "auth", "scope", BEPRODUCT_SCOPE);
    login(
        upstream,
        filled,
        "https://id.winks.io/ids/connect/authorize",
    )?;
    Ok(())
}

fn erpnet(upstream: &mut Table, filled: &mut Filled) -> Result<(), String> {
    let origin = origin_of(upstream, "erpnet")?;
    let auth = section(upstream, "auth")?;
    filled.fill(auth, "auth", "grant", "refresh_token");
    let token_url = format!("{origin}/id/connect/token");
    filled.fill(auth, "auth", "token_url", token_url);
    filled.fill(auth, "auth", "client_auth", "post");
    let scope = match auth.get("grant").and_then(Value::as_str) {
        Some("client_credentials") => "read update",
        _ => ERPNET_LOGIN_SCOPE,
    };
    filled.fill(auth, "auth", "scope", scope);
    login(upstream, filled, &format!("{origin}/id/connect/authorize"))?;
    // Per session, answered with 429 past them (docs/providers.md). Each identity is a
    // session of its own: with identities, the limits hold for each one, not for their sum.
    let identities = upstream.get("identity").and_then(Value::as_array);
    let sessions = identities.is_some_and(|a| !a.is_empty());
    let quota = section(upstream, "quota")?;
    let (table, at) = match sessions {
        false => (quota, "quota"),
        true => (section(quota, "per_identity")?, "quota.per_identity"),
    };
    for (key, n) in [("per_minute", 600), ("concurrency", 1), ("queue", 5)] {
        filled.fill(table, at, key, Value::Integer(n));
    }
    Ok(())
}

fn winbooks(upstream: &mut Table, filled: &mut Filled) -> Result<(), String> {
    filled.fill(upstream, "", "url", "https://rapi.winbooksonweb.be");
    let auth = section(upstream, "auth")?;
    filled.fill(auth, "auth", "grant", "winbooks_exchange");
    let token_url = "https://rapi.winbooksonweb.be/OAuth20/Token";
    filled.fill(auth, "auth", "token_url", token_url);
    Ok(())
}

fn spring(upstream: &mut Table, filled: &mut Filled) -> Result<(), String> {
    let origin = origin_of(upstream, "spring")?;
    let auth = section(upstream, "auth")?;
    filled.fill(auth, "auth", "grant", "password");
    filled.fill(auth, "auth", "token_url", format!("{origin}/oauth/token"));
    filled.fill(auth, "auth", "client_auth", "basic");
    filled.fill(auth, "auth", "scope", "read write");
    Ok(())
}

/// The redirect URI a preset fills for `tollgate login`: register it for your client.
pub const DEFAULT_REDIRECT_URI: &str = "http://127.0.0.1:8765/callback";

/// `[upstream.login]` for `tollgate login`, whenever the grant is `refresh_token` (the login
/// is how the first refresh token is got): the provider's authorize URL, and a loopback
/// redirect URI unless one is set.
fn login(upstream: &mut Table, filled: &mut Filled, authorize_url: &str) -> Result<(), String> {
    let auth = section(upstream, "auth")?;
    if auth.get("grant").and_then(Value::as_str) != Some("refresh_token") {
        return Ok(());
    }
    let login = section(upstream, "login")?;
    filled.fill(login, "login", "authorize_url", authorize_url);
    filled.fill(login, "login", "redirect_uri", DEFAULT_REDIRECT_URI);
    Ok(())
}

/// `[upstream.NAME]`, created empty when missing so the preset can fill it.
fn section<'a>(upstream: &'a mut Table, name: &str) -> Result<&'a mut Table, String> {
    upstream
        .entry(name.to_owned())
        .or_insert_with(|| Value::Table(Table::new()))
        .as_table_mut()
        .ok_or_else(|| format!("`{name}` must be a table ([upstream.{name}])"))
}

/// `scheme://host[:port]` of the upstream's `url`, which these presets derive URLs from.
fn origin_of(upstream: &Table, preset: &str) -> Result<String, String> {
    let url = upstream
        .get("url")
        .and_then(Value::as_str)
        .ok_or_else(|| format!("preset `{preset}` needs `url`, the address of your instance"))?;
    let url = Url::parse(url).map_err(|e| format!("`url` is not a URL ({e})"))?;
    Ok(url.origin().ascii_serialization())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(text: &str) -> Table {
        toml::from_str(text).unwrap()
    }

    #[test]
    fn beproduct_fills_and_keeps_what_is_set() {
        let mut t = table("preset = \"beproduct\"\n[auth]\nclient_auth = \"basic\"\n");
        let filled = apply(&mut t).unwrap();
        assert_eq!(t["url"].as_str(), Some("https://developers.beproduct.com"));
        assert_eq!(
            t["auth"]["token_url"].as_str(),
            Some("https://id.winks.io/ids/connect/token")
        );
        assert_eq!(
            t["auth"]["client_auth"].as_str(),
            Some("basic"),
            "user value kept"
        );
        assert!(filled.contains(&"auth.token_url".to_owned()));
        assert!(!filled.contains(&"auth.client_auth".to_owned()));
    }

    #[test]
    fn erpnet_and_spring_derive_from_the_instance_url() {
        let mut t = table("preset = \"erpnet\"\nurl = \"https://acme.my.erp.net/api/domain/odata\"\n[auth]\ngrant = \"client_credentials\"\n");
        apply(&mut t).unwrap();
        assert_eq!(
            t["auth"]["token_url"].as_str(),
            Some("https://acme.my.erp.net/id/connect/token")
        );
        assert_eq!(t["auth"]["scope"].as_str(), Some("read update"));
        let mut t = table("preset = \"spring\"\nurl = \"http://127.0.0.1:9000/api\"\n");
        apply(&mut t).unwrap();
        assert_eq!(
            t["auth"]["token_url"].as_str(),
            Some("http://127.0.0.1:9000/oauth/token")
        );
        assert_eq!(t["auth"]["grant"].as_str(), Some("password"));
        assert_eq!(t["auth"]["client_auth"].as_str(), Some("basic"));
    }

    /// With grant = refresh_token the preset fills [upstream.login], so `tollgate login` works
    /// without an empty table added by hand; with another grant it adds none.
    #[test]
    fn a_refresh_token_grant_gets_the_login_table() {
        let url = "url = \"https://acme.my.erp.net/api/domain/odata\"\n";
        let mut t = table(&format!(
            "preset = \"erpnet\"\n{url}[auth]\ngrant = \"refresh_token\"\n"
        ));
        let filled = apply(&mut t).unwrap();
        assert_eq!(
            t["login"]["authorize_url"].as_str(),
            Some("https://acme.my.erp.net/id/connect/authorize")
        );
        assert_eq!(
            t["login"]["redirect_uri"].as_str(),
            Some(DEFAULT_REDIRECT_URI)
        );
        assert!(filled.contains(&"login.redirect_uri".to_owned()));
        let mut t = table(&format!(
            "preset = \"erpnet\"\n{url}[auth]\ngrant = \"client_credentials\"\n"
        ));
        apply(&mut t).unwrap();
        assert!(t.get("login").is_none());
        // BeProduct's grant is refresh_token by default; a redirect URI set is kept.
        let mut t =
            table("preset = \"beproduct\"\n[login]\nredirect_uri = \"http://127.0.0.1:9/cb\"\n");
        apply(&mut t).unwrap();
        assert_eq!(
            t["login"]["redirect_uri"].as_str(),
            Some("http://127.0.0.1:9/cb")
        );
        assert!(t["login"]["authorize_url"]
            .as_str()
            .unwrap()
            .starts_with("https://id.winks.io/"));
    }

    #[test]
    fn unknown_preset_and_missing_url_are_explained() {
        assert!(apply(&mut table("preset = \"sap\""))
            .unwrap_err()
            .contains("beproduct, erpnet"));
        assert!(apply(&mut table("preset = \"erpnet\""))
            .unwrap_err()
            .contains("needs `url`"));
    }
}
