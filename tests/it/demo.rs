//! `tollgate demo` as a newcomer runs it: the lines it prints work when pasted — the config
//! file it writes serves `tollgate status` and `tollgate login --no-browser`, and the POST line
//! really shows a replay.

use crate::common::Tollgate;
use std::process::Command;
use std::time::Duration;

#[test]
fn the_demo_prints_lines_that_work() {
    let mut demo = Tollgate::new(&["demo"]).env("RUST_LOG", "info").spawn();
    let printed = demo
        .stdout
        .until(Duration::from_secs(30), |line| {
            line.contains("Press Ctrl-C to stop.")
        })
        .join("\n");
    let word_after = |marker: &str| -> String {
        let at = printed
            .find(marker)
            .unwrap_or_else(|| panic!("{marker} in\n{printed}"));
        printed[at + marker.len()..]
            .split(|c: char| c.is_whitespace() || c == ';' || c == '"' || c == '\'')
            .next()
            .unwrap()
            .to_owned()
    };
    let exe = env!("CARGO_BIN_EXE_tollgate");
    let file = word_after(&format!("{exe} status -c "));
    let post = word_after("-d '{\"filters\":[]}' \"");
    assert!(post.contains("/Items?sim_refuse_once=$RANDOM"), "{post}");

    // The status command against the config the demo wrote.
    let status = Tollgate::new(&["status"]).config_file(&file).run();
    let table = status.stdout;
    assert!(status.status.success(), "{table}");
    assert!(table.contains("beproduct today: 0 of 2000"), "{table}");

    // The POST line, pasted (with $RANDOM as a shell would expand it): answered by the API's
    // echo of the replay, after the refusal and refresh the log shows.
    let url = post.replace("$RANDOM", "4242");
    let out = Command::new("curl")
        .args(["-s", "-X", "POST", "-H", "Content-Type: application/json"])
        .args(["-d", "{\"filters\":[]}", &url])
        .output()
        .expect("curl is installed");
    let echo = String::from_utf8_lossy(&out.stdout);
    assert!(echo.contains("\"body\":\"{\\\"filters\\\":[]}\""), "{echo}");

    // The signed-client line, pasted: tollgate signed an assertion for the token, and the API
    // echoes the bearer token it was given.
    let signed = printed
        .lines()
        .find(|l| l.contains("/orders?status=open"))
        .unwrap_or_else(|| panic!("the signed line in\n{printed}"))
        .trim()
        .split('\'')
        .nth(1)
        .unwrap()
        .to_owned();
    let out = Command::new("curl").args(["-s", &signed]).output().unwrap();
    let echo = String::from_utf8_lossy(&out.stdout);
    assert!(echo.contains("Bearer at_"), "{echo}");

    // `tollgate login beproduct --no-browser`: open the URL it prints (the simulated identity
    // server signs in without asking), and the login lands in the demo's state.
    let mut login = Tollgate::new(&["login", "beproduct", "--no-browser"])
        .config_file(&file)
        .spawn();
    let said = login.stderr.until(Duration::from_secs(30), |line| {
        line.trim().starts_with("http://")
    });
    let url = said.last().unwrap().trim().to_owned();
    let page = Command::new("curl").args(["-sL", &url]).output().unwrap();
    assert!(String::from_utf8_lossy(&page.stdout).contains("Logged in"));
    let rest = login.stderr.rest();
    assert!(login.child.wait().unwrap().success(), "{rest:?}");
    assert!(rest.iter().any(|l| l.contains("Logged in")), "{rest:?}");

    demo.signal("TERM"); // as Ctrl-C would stop it
    let _ = demo.child.wait();
    let logs = demo.stderr.rest().join("\n");
    assert!(logs.contains("refreshing and replaying once"), "{logs}");
}
