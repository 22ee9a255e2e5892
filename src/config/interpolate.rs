//! `${NAME}` in any string of the config is replaced by that environment variable (`$$` is a
//! literal `$`). A missing variable is an error naming it and the key; the values taken are
//! remembered so that no later message quotes them (they are usually secrets).

use super::locate::join_path;
use super::Problem;

/// Replace every `${NAME}` in `value`; returns the values taken from the environment (to be
/// kept out of error messages), or every variable that is missing.
pub(super) fn interpolated(
    value: &mut toml::Value,
    env: &impl Fn(&str) -> Option<String>,
) -> Result<Vec<String>, Vec<Problem>> {
    let mut secrets = Vec::new();
    let mut problems = Vec::new();
    interpolate(value, &mut Vec::new(), env, &mut secrets, &mut problems);
    if problems.is_empty() {
        Ok(secrets)
    } else {
        Err(problems)
    }
}

/// Replace `${NAME}` in every string of the document, recording where it failed.
fn interpolate(
    value: &mut toml::Value,
    path: &mut Vec<String>,
    env: &impl Fn(&str) -> Option<String>,
    secrets: &mut Vec<String>,
    problems: &mut Vec<Problem>,
) {
    match value {
        toml::Value::String(s) => match expand(s, env, secrets) {
            Ok(expanded) => *s = expanded,
            Err(message) => problems.push(Problem {
                key: join_path(path),
                line: None,
                message,
            }),
        },
        toml::Value::Array(items) => {
            for (i, item) in items.iter_mut().enumerate() {
                path.push(format!("[{i}]"));
                interpolate(item, path, env, secrets, problems);
                path.pop();
            }
        }
        toml::Value::Table(table) => {
            for (k, item) in table.iter_mut() {
                path.push(k.clone());
                interpolate(item, path, env, secrets, problems);
                path.pop();
            }
        }
        _ => {}
    }
}

/// Expand `${NAME}` references in one string. `$$` stands for a literal `$`.
fn expand(
    text: &str,
    env: &impl Fn(&str) -> Option<String>,
    secrets: &mut Vec<String>,
) -> Result<String, String> {
    if !text.contains('$') {
        return Ok(text.to_owned());
    }
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find('$') {
        out.push_str(&rest[..at]);
        let after = &rest[at + 1..];
        if let Some(tail) = after.strip_prefix('$') {
            out.push('$');
            rest = tail;
        } else if let Some(tail) = after.strip_prefix('{') {
            let end = tail
                .find('}')
                .ok_or("`${` without a closing `}`; write `$${` for a literal `${`")?;
            let name = &tail[..end];
            if name.is_empty() || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
                return Err(format!(
                    "`${{{name}}}` is not a valid variable name (letters, digits and '_')"
                ));
            }
            let found = env(name).ok_or_else(|| {
                format!("environment variable {name} is not set; export it or remove `${{{name}}}`")
            })?;
            if !found.is_empty() {
                secrets.push(found.clone());
            }
            out.push_str(&found);
            rest = &tail[end + 1..];
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    Ok(out)
}

/// Serde messages quote the offending value; a value that came from the environment may be a
/// secret, so it is cut out.
pub(super) fn redact(message: &str, secrets: &[String]) -> String {
    let mut out = message.to_owned();
    for s in secrets {
        out = out.replace(s.as_str(), "[redacted]");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::super::test_support::{env, error_of, GOOD};
    use super::*;

    #[test]
    fn missing_env_var_names_variable_key_and_line() {
        let text = GOOD.replace("${SEED}", "${NOT_SET_ANYWHERE}");
        let err = error_of(&text);
        assert!(err.contains("NOT_SET_ANYWHERE"), "{err}");
        assert!(err.contains("upstream[0].auth.refresh_token"), "{err}");
        let line = GOOD.lines().position(|l| l.contains("${SEED}")).unwrap() + 1;
        assert!(err.starts_with(&format!("t.toml:{line}:")), "{err}");
    }

    #[test]
    fn wrong_type_never_echoes_an_env_secret() {
        let text = GOOD.replace(
            "timeout = \"30s\"",
            "timeout = \"30s\"\nretry_on = \"${SECRET}\"",
        );
        let err = error_of(&text);
        assert!(err.contains("retry_on"), "{err}");
        assert!(!err.contains("s3cr3t-value"), "{err}");
    }

    #[test]
    fn dollar_escapes() {
        let mut s = Vec::new();
        assert_eq!(expand("a$$b$c", &env, &mut s).unwrap(), "a$b$c");
        assert!(expand("${OPEN", &env, &mut s).is_err());
    }
}
