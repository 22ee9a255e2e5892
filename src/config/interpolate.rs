//! `${NAME}` in any string of the config is replaced by that environment variable, and
//! `${file:PATH}` by the content of that file, one trailing newline removed (`$$` is a literal
//! `$`). PATH may itself hold `${NAME}`: `${file:${CREDENTIALS_DIRECTORY}/client-secret}`. A
//! missing variable or an unreadable file is an error naming it and the key; the values taken
//! are remembered so that no later message quotes them (they are usually secrets).

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

/// Expand `${NAME}` and `${file:PATH}` references in one string. `$$` stands for a literal `$`.
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
            let end = closing_brace(tail)
                .ok_or("`${` without a closing `}`; write `$${` for a literal `${`")?;
            let inner = &tail[..end];
            let found = match inner.strip_prefix("file:") {
                Some(path) => read_secret_file(&expand(path, env, secrets)?)?,
                None => variable(inner, env)?,
            };
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

/// Where the `}` that closes a `${` ends `text` (what follows the `${`), past any `${…}`
/// nested in it: `${file:${CREDENTIALS_DIRECTORY}/secret}`.
fn closing_brace(text: &str) -> Option<usize> {
    let mut depth = 0usize;
    let bytes = text.as_bytes();
    for (i, b) in bytes.iter().enumerate() {
        match b {
            b'{' if i > 0 && bytes[i - 1] == b'$' => depth += 1,
            b'}' if depth == 0 => return Some(i),
            b'}' => depth -= 1,
            _ => {}
        }
    }
    None
}

fn variable(name: &str, env: &impl Fn(&str) -> Option<String>) -> Result<String, String> {
    if name.is_empty() || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
        return Err(format!(
            "`${{{name}}}` is not a valid variable name (letters, digits and '_'), nor `${{file:PATH}}`"
        ));
    }
    env(name).ok_or_else(|| {
        format!("environment variable {name} is not set; export it or remove `${{{name}}}`")
    })
}

/// The content of the file at `path` (a systemd credential, a Docker or Kubernetes secret),
/// one trailing newline removed. An error names the path, never what the file holds.
fn read_secret_file(path: &str) -> Result<String, String> {
    if path.is_empty() {
        return Err("`${file:}` names no file; write `${file:/path/to/secret}`".into());
    }
    let mut text = std::fs::read_to_string(path).map_err(|e| {
        let why = match e.kind() {
            std::io::ErrorKind::NotFound => "there is no such file".to_owned(),
            std::io::ErrorKind::PermissionDenied => {
                "permission denied: give the user tollgate runs as read access to it".to_owned()
            }
            std::io::ErrorKind::InvalidData => "it is not UTF-8 text".to_owned(),
            std::io::ErrorKind::IsADirectory => "it is a directory".to_owned(),
            _ => e.to_string(),
        };
        format!("cannot read the secret file {path} named by `${{file:…}}`: {why}")
    })?;
    if text.ends_with('\n') {
        text.pop();
        if text.ends_with('\r') {
            text.pop();
        }
    }
    Ok(text)
}

/// The keys whose values are secrets wherever they are written: a type error quotes the
/// value, so it is cut out of the message even when it was written in the file itself.
const SECRET_KEYS: [&str; 8] = [
    "key",
    "keys",
    "previous_keys",
    "client_secret",
    "password",
    "refresh_token",
    "exchange_token",
    "store",
];

/// Every string (or string in an array) under a key of [`SECRET_KEYS`], long enough not to
/// be mistaken for ordinary words of a message.
pub(super) fn written_secrets(value: &toml::Value) -> Vec<String> {
    fn walk(value: &toml::Value, secret: bool, out: &mut Vec<String>) {
        match value {
            toml::Value::String(s) if secret && s.len() >= 6 => out.push(s.clone()),
            toml::Value::Array(items) => items.iter().for_each(|v| walk(v, secret, out)),
            toml::Value::Table(table) => table
                .iter()
                .for_each(|(k, v)| walk(v, SECRET_KEYS.contains(&k.as_str()), out)),
            _ => {}
        }
    }
    let mut out = Vec::new();
    walk(value, false, &mut out);
    out
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
    use super::super::Config;
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

    /// `${file:PATH}` reads a secret from a file, one trailing newline removed; PATH may hold
    /// `${NAME}`, as systemd's `LoadCredential=` needs.
    #[test]
    fn file_references_read_the_file_and_drop_one_trailing_newline() {
        let dir = tempfile::tempdir().unwrap();
        let write = |name: &str, content: &[u8]| {
            let path = dir.path().join(name);
            std::fs::write(&path, content).unwrap();
            path.display().to_string()
        };
        let plain = write("plain", b"s3cret");
        let newline = write("newline", b"s3cret\n");
        let crlf = write("crlf", b"s3cret\r\n");
        let two = write("two", b"s3cret\n\n");
        let mut secrets = Vec::new();
        for (path, want) in [
            (&plain, "s3cret"),
            (&newline, "s3cret"),
            (&crlf, "s3cret"),
            (&two, "s3cret\n"),
        ] {
            let got = expand(&format!("a-${{file:{path}}}-b"), &env, &mut secrets).unwrap();
            assert_eq!(got, format!("a-{want}-b"));
        }
        assert!(
            secrets.iter().all(|s| s.starts_with("s3cret")),
            "remembered for redaction"
        );

        let dir_env = |name: &str| {
            (name == "CREDENTIALS_DIRECTORY").then(|| dir.path().display().to_string())
        };
        let got = expand(
            "${file:${CREDENTIALS_DIRECTORY}/newline}",
            &dir_env,
            &mut secrets,
        );
        assert_eq!(got.unwrap(), "s3cret");
        let err = expand("${file:${NOT_SET}/newline}", &env, &mut secrets).unwrap_err();
        assert!(err.contains("NOT_SET"), "{err}");
    }

    /// A missing or unreadable file is an error naming the path and the key, never content.
    #[test]
    fn unreadable_secret_files_are_errors_that_name_the_path_and_key() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing");
        let text = GOOD.replace("${SECRET}", &format!("${{file:{}}}", missing.display()));
        let err = error_of(&text);
        assert!(err.contains(&missing.display().to_string()), "{err}");
        assert!(err.contains("no such file"), "{err}");
        assert!(err.contains("upstream[0].auth.client_secret"), "{err}");

        let text = GOOD.replace("${SECRET}", &format!("${{file:{}}}", dir.path().display()));
        let err = error_of(&text);
        assert!(err.contains("is a directory"), "{err}");

        let binary = dir.path().join("binary");
        std::fs::write(&binary, b"\xffs3cr3t-in-a-file\xfe").unwrap();
        let text = GOOD.replace("${SECRET}", &format!("${{file:{}}}", binary.display()));
        let err = error_of(&text);
        assert!(err.contains("not UTF-8"), "{err}");
        assert!(!err.contains("s3cr3t-in-a-file"), "{err}");

        // Permissions stop everyone but root: as root, the file is read.
        let locked = dir.path().join("locked");
        std::fs::write(&locked, b"s3cr3t-in-a-file").unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&locked, std::fs::Permissions::from_mode(0o000)).unwrap();
        let text = GOOD.replace("${SECRET}", &format!("${{file:{}}}", locked.display()));
        match std::fs::read(&locked) {
            Err(_) => {
                let err = error_of(&text);
                assert!(err.contains("permission denied"), "{err}");
                assert!(err.contains(&locked.display().to_string()), "{err}");
            }
            Ok(_) => assert!(Config::parse(&text, "t.toml", env).is_ok()),
        }

        let err = error_of(&GOOD.replace("${SECRET}", "${file:}"));
        assert!(err.contains("names no file"), "{err}");
    }

    /// A secret written in the file itself is cut out of a type error that quotes it.
    #[test]
    fn a_secret_written_in_the_file_is_cut_from_errors() {
        let key = "c2VhbGluZyBrZXkgb2YgdGhpcnR5LXR3byBieXRlcyE=";
        let text = GOOD.replace(
            "[[upstream]]",
            &format!("previous_keys = \"{key}\"\n\n[[upstream]]"),
        );
        let err = error_of(&text);
        assert!(err.contains("previous_keys"), "{err}");
        assert!(!err.contains(key), "{err}");
        let text = GOOD.replace("${SECRET}", "written-secret").replace(
            "client_secret = \"written-secret\"",
            "client_secret = [\"written-secret\"]",
        );
        let err = error_of(&text);
        assert!(!err.contains("written-secret"), "{err}");
    }
}
