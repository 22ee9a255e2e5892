//! Every example in `config/` loads, and `tollgate check` reports errors by file, line and key.

use crate::common::Tollgate;
use tollgate::config::Config;

/// Each file in config/ parses and validates (environment variables stand in as placeholders).
#[test]
fn every_example_config_loads() {
    let mut seen = 0;
    for entry in std::fs::read_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/config")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "toml") {
            let text = std::fs::read_to_string(&path).unwrap();
            let name = path.display().to_string();
            let placeholder = |var: &str| {
                Some(if var.ends_with("_URL") {
                    "https://placeholder.example/api".to_owned()
                } else if var.ends_with("STATE_KEY") {
                    "c2VhbGluZyBrZXkgb2YgdGhpcnR5LXR3byBieXRlcyE=".to_owned()
                } else {
                    format!("placeholder-{var}")
                })
            };
            let config = Config::parse(&text, &name, placeholder).unwrap_or_else(|e| panic!("{e}"));
            assert!(!config.upstreams.is_empty(), "{name}");
            seen += 1;
        }
    }
    assert!(seen >= 2, "found {seen} example configs");
}

/// `tollgate ARGS` with `env` set, logging as by default: (exit code, stdout, stderr).
fn tollgate(args: &[&str], env: &[(&str, &str)]) -> (Option<i32>, String, String) {
    let mut command = Tollgate::new(args).env_remove("RUST_LOG");
    for (key, value) in env {
        command = command.env(key, value);
    }
    let out = command.run();
    (out.code(), out.stdout, out.stderr)
}

/// `check` prints the resolved settings with secrets redacted and exits 0.
#[test]
fn check_prints_settings_without_secrets() {
    let env = [
        ("BEPRODUCT_CLIENT_ID", "my-client"),
        ("BEPRODUCT_CLIENT_SECRET", "super-secret-value-1"),
        ("BEPRODUCT_REFRESH_TOKEN", "super-secret-seed-2"),
    ];
    let (code, out, err) = tollgate(&["check", "-c", "config/tollgate.toml"], &env);
    assert_eq!(code, Some(0), "{err}");
    assert!(
        out.contains("auth.client_secret") && out.contains("[redacted]"),
        "{out}"
    );
    assert!(out.contains("my-client"), "{out}");
    assert!(!out.contains("super-secret") && !err.contains("super-secret"));
}

/// A missing variable makes `check` fail with file, line, key and the variable's name.
#[test]
fn check_names_file_line_key_and_variable() {
    let (code, _, err) = tollgate(&["check", "-c", "config/tollgate.toml"], &[]);
    assert_eq!(code, Some(2));
    assert!(
        err.contains("config/tollgate.toml:21: upstream[0].auth.client_id"),
        "{err}"
    );
    assert!(err.contains("BEPRODUCT_CLIENT_ID"), "{err}");
}

/// A missing config file says how to point at one.
#[test]
fn check_without_a_file_says_what_to_do() {
    let (code, _, err) = tollgate(&["check", "-c", "/nonexistent/tollgate.toml"], &[]);
    assert_eq!(code, Some(2));
    assert!(
        err.contains("-c FILE") && err.contains("TOLLGATE_CONFIG"),
        "{err}"
    );
}

/// `check` shows a token URL's query value that came from `${NAME}` as `[redacted]`, never
/// the variable's value.
#[test]
fn check_redacts_a_token_url_query_value_from_the_environment() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tollgate.toml");
    let config = format!(
        "[state]\nstore = \"file:{}\"\n\n[[upstream]]\nname = \"api\"\n\
         listen = \"127.0.0.1:8080\"\nurl = \"https://api.example.com\"\n\n\
         [upstream.auth]\ngrant = \"client_credentials\"\n\
         token_url = \"https://id.example/token?tenant=${{TG_TEST_TENANT}}&region=eu\"\n\
         client_id = \"app\"\nclient_secret = \"client-secret-value\"\n",
        dir.path().join("state").display()
    );
    std::fs::write(&path, config).unwrap();
    let env = [("TG_TEST_TENANT", "tenant-value-7f3a")];
    let (code, out, err) = tollgate(&["check", "-c", path.to_str().unwrap()], &env);
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains("region=eu"), "{out}");
    assert!(out.contains("tenant=[redacted]"), "{out}");
    assert!(
        !out.contains("tenant-value") && !err.contains("tenant-value"),
        "{out}{err}"
    );
}
