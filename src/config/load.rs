//! Reading a config: the file, its TOML, `${NAME}` replaced ([`super::interpolate`]), the
//! presets filled in ([`super::presets`]), the typed structs, then [`Config::validate`]; every
//! problem placed on its line ([`super::locate`]). `tollgate status` reads `[admin]` alone.

use super::interpolate::{interpolated, redact, written_secrets};
use super::locate::{line_of_offset, locate, render_path};
use super::{AdminConfig, Config, ConfigError, Problem};
use serde::Deserialize;
use std::path::Path;

impl Config {
    /// Read, interpolate and validate the file at `path`, with the process environment.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let (text, file) = read(path)?;
        Config::parse(&text, &file, |name| std::env::var(name).ok())
    }

    /// Only the `[admin]` table of the file at `path`, for `tollgate status`. The rest of the
    /// file is neither checked nor interpolated, so the variables it names (secrets) need not be
    /// set in this shell.
    pub fn load_admin(path: &Path) -> Result<Option<AdminConfig>, ConfigError> {
        let (text, file) = read(path)?;
        Config::parse_admin(&text, &file, |name| std::env::var(name).ok())
    }

    /// Parse config text; `file` names it in errors, `env` looks up `${NAME}`.
    pub fn parse(
        text: &str,
        file: &str,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Config, ConfigError> {
        let fail = |problems: Vec<Problem>| ConfigError {
            file: file.to_owned(),
            problems,
        };
        let mut value = parse_toml(text).map_err(|p| fail(vec![p]))?;
        let written = token_urls_as_written(&value);
        let mut secrets = interpolated(&mut value, &env).map_err(|p| fail(locate(text, p)))?;
        secrets.extend(written_secrets(&value));

        let mut problems = Vec::new();
        let filled = apply_presets(&mut value, &mut problems);
        if !problems.is_empty() {
            return Err(fail(locate(text, problems)));
        }

        let mut config: Config = typed(value, &secrets).map_err(|p| fail(locate(text, vec![p])))?;
        for (up, filled) in config.upstreams.iter_mut().zip(filled) {
            up.preset_filled = filled;
            // `export X_REFRESH_TOKEN=` leaves an empty seed: that is no seed at all.
            if up
                .auth
                .refresh_token
                .as_ref()
                .is_some_and(|t| t.expose().trim().is_empty())
            {
                up.auth.refresh_token = None;
            }
        }
        config.token_urls_as_written = config
            .upstreams
            .iter()
            .zip(written)
            .filter_map(|(up, written)| Some((up.name.clone(), written?)))
            .collect();
        let problems = config.validate();
        if problems.is_empty() {
            Ok(config)
        } else {
            Err(fail(locate(text, problems)))
        }
    }

    /// [`Config::load_admin`] on config text.
    pub fn parse_admin(
        text: &str,
        file: &str,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Option<AdminConfig>, ConfigError> {
        /// The file as `tollgate status` sees it.
        #[derive(Deserialize)]
        struct AdminOnly {
            admin: Option<AdminConfig>,
        }
        let fail = |problems: Vec<Problem>| ConfigError {
            file: file.to_owned(),
            problems,
        };
        let value = parse_toml(text).map_err(|p| fail(vec![p]))?;
        let mut only_admin = toml::Table::new();
        if let Some(admin) = value.get("admin") {
            only_admin.insert("admin".to_owned(), admin.clone());
        }
        let mut only_admin = toml::Value::Table(only_admin);
        let secrets = interpolated(&mut only_admin, &env).map_err(|p| fail(locate(text, p)))?;
        let parsed: AdminOnly =
            typed(only_admin, &secrets).map_err(|p| fail(locate(text, vec![p])))?;
        Ok(parsed.admin)
    }
}

/// The text of the config file at `path`, and its name for messages.
fn read(path: &Path) -> Result<(String, String), ConfigError> {
    let file = path.display().to_string();
    match std::fs::read_to_string(path) {
        Ok(text) => Ok((text, file)),
        Err(e) => Err(ConfigError {
            file,
            problems: vec![Problem {
                key: String::new(),
                line: None,
                message: format!(
                    "cannot read the config file: {e} (pass -c FILE or set TOLLGATE_CONFIG)"
                ),
            }],
        }),
    }
}

fn parse_toml(text: &str) -> Result<toml::Value, Problem> {
    toml::from_str(text).map_err(|e| Problem {
        key: String::new(),
        line: e.span().map(|s| line_of_offset(text, s.start)),
        message: format!("not valid TOML: {}", e.message()),
    })
}

/// `value` as the typed `T`, or the key that does not fit, with `secrets` cut out of serde's
/// message.
fn typed<T: serde::de::DeserializeOwned>(
    value: toml::Value,
    secrets: &[String],
) -> Result<T, Problem> {
    serde_path_to_error::deserialize(value).map_err(|e| {
        let key = render_path(e.path());
        let mut message = super::hints::explain(&key, &redact(&e.inner().to_string(), secrets));
        if key == "upstream" && message.contains("expected a sequence") {
            // The README's fragments, pasted on their own, often start with [upstream].
            message.push_str(": write each upstream as [[upstream]] (an array of tables, with double brackets), not [upstream]");
        }
        Problem {
            key,
            line: None,
            message,
        }
    })
}

/// Each upstream's `auth.token_url` as written, before interpolation, when it names a variable.
fn token_urls_as_written(value: &toml::Value) -> Vec<Option<String>> {
    let Some(upstreams) = value.get("upstream").and_then(|u| u.as_array()) else {
        return Vec::new();
    };
    upstreams
        .iter()
        .map(|up| {
            let url = up.get("auth")?.get("token_url")?.as_str()?;
            url.contains("${").then(|| url.to_owned())
        })
        .collect()
}

/// Apply each upstream's `preset`; returns, per upstream, the keys it filled.
fn apply_presets(value: &mut toml::Value, problems: &mut Vec<Problem>) -> Vec<Vec<String>> {
    let Some(upstreams) = value.get_mut("upstream").and_then(|u| u.as_array_mut()) else {
        return Vec::new();
    };
    let mut all = Vec::new();
    for (i, up) in upstreams.iter_mut().enumerate() {
        let filled = match up.as_table_mut() {
            Some(table) => crate::config::presets::apply(table).unwrap_or_else(|message| {
                problems.push(Problem {
                    key: format!("upstream[{i}].preset"),
                    line: None,
                    message,
                });
                Vec::new()
            }),
            None => Vec::new(),
        };
        all.push(filled);
    }
    all
}

#[cfg(test)]
mod tests {
    use super::super::test_support::{env, error_of, GOOD};
    use crate::config::{ClientAuth, Config};
    use std::time::Duration;

    #[test]
    fn loads_a_good_file_with_env_and_defaults() {
        let c = Config::parse(GOOD, "t.toml", env).unwrap();
        let up = &c.upstreams[0];
        assert_eq!(up.timeout, Duration::from_secs(30));
        assert_eq!(up.retry_body_limit, 2 * 1024 * 1024);
        assert_eq!(up.retry_on, vec![401]);
        assert_eq!(
            up.auth.client_secret.as_ref().unwrap().expose(),
            "s3cr3t-value"
        );
        assert_eq!(up.auth.client_auth, ClientAuth::Post);
        assert_eq!(up.auth.params["resource"], "urn:x");
        assert!(!format!("{c:?}").contains("s3cr3t-value"));
        assert!(!format!("{c:?}").contains("seed-token-value"));
    }

    #[test]
    fn admin_alone_ignores_the_rest_of_the_file() {
        let text = "[admin]\nlisten = \"127.0.0.1:${PORT}\"\n\n[[upstream]]\n\
                    name = \"api\"\nsecret = \"${NOT_SET}\"\n";
        let env = |name: &str| (name == "PORT").then(|| "9901".to_owned());
        let admin = Config::parse_admin(text, "t.toml", env).unwrap().unwrap();
        assert_eq!(admin.listen, "127.0.0.1:9901".parse().unwrap());

        let none = Config::parse_admin("[state]\nstore = \"file:x\"\n", "t.toml", |_| None);
        assert!(none.unwrap().is_none());

        let bad = Config::parse_admin("\n[admin]\nlisten = \"here\"\n", "t.toml", |_| None);
        let err = bad.unwrap_err().to_string();
        assert!(err.starts_with("t.toml:3: admin.listen: "), "{err}");
    }

    #[test]
    fn a_single_upstream_table_says_to_use_double_brackets() {
        let text = "[upstream]\nname = \"api\"\n";
        let err = Config::parse(text, "t.toml", |_| None)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("upstream: invalid type: map, expected a sequence"),
            "{err}"
        );
        assert!(err.contains("write each upstream as [[upstream]]"), "{err}");
    }

    #[test]
    fn a_number_without_a_unit_says_how_to_write_it() {
        let text = GOOD.replace("timeout = \"30s\"", "timeout = 30");
        let err = error_of(&text);
        assert!(
            err.contains("upstream[0].timeout: 30 has no unit: write a duration as a string with one, like \"30s\""),
            "{err}"
        );
        assert!(!err.contains("\nin `"), "{err}");
        let text = GOOD.replace("retry_body_limit = \"2MiB\"", "retry_body_limit = 1048576");
        let err = error_of(&text);
        assert!(err.contains("like \"1048576B\""), "{err}");
    }

    #[test]
    fn syntax_error_has_a_line() {
        let err = error_of("[state]\nstore = \n");
        assert!(err.starts_with("t.toml:2"), "{err}");
    }
}
