//! The request-target rewrite on arbitrary bytes: whatever it accepts goes to the upstream's
//! host, under its base path.
#![no_main]

use http::{Method, Uri, Version};
use libfuzzer_sys::fuzz_target;
use tollgate::forward::Target;

fuzz_target!(|bytes: &[u8]| {
    let Ok(uri) = Uri::try_from(bytes) else { return };
    let target = Target::new(&"https://api.example/base".parse().unwrap()).unwrap();
    let local = "127.0.0.1:8080".parse().unwrap();
    if let Ok(rewritten) = target.rewrite(&Method::GET, &uri, Version::HTTP_11, local) {
        assert_eq!(rewritten.authority().map(|a| a.as_str()), Some("api.example"));
        let path = rewritten.path();
        assert!(path == "/base" || path.starts_with("/base/"), "{path}");
        tollgate::forward::check_path(path).expect("a rewritten path passes the check");
    }
});
