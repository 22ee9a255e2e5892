//! The config loader on arbitrary text: it returns a config or an error, never panics, and
//! an error never echoes an environment value.
#![no_main]

use libfuzzer_sys::fuzz_target;

const SECRET: &str = "fuzz-secret-value-0123456789";

fuzz_target!(|text: &str| {
    let env = |name: &str| (name == "SECRET").then(|| SECRET.to_owned());
    if let Err(e) = tollgate::config::Config::parse(text, "fuzz.toml", env) {
        assert!(!e.to_string().contains(SECRET), "{e}");
    }
});
