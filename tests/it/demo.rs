//! `tollgate demo` as a newcomer runs it: the lines it prints work when pasted — the config
//! file it writes serves `tollgate status` and `tollgate login --no-browser`, and the POST line
//! really shows a replay.

use std::io::{BufRead, BufReader, Read};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

#[test]
fn the_demo_prints_lines_that_work() {
    let mut demo = Killed(
        Command::new(env!("CARGO_BIN_EXE_tollgate"))
            .arg("demo")
            .env("RUST_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let demo = &mut demo.0;
    let mut stderr = demo.stderr.take().unwrap();
    let logs = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = stderr.read_to_string(&mut text);
        text
    });
    let mut printed = String::new();
    let mut lines = BufReader::new(demo.stdout.take().unwrap()).lines();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !printed.contains("Press Ctrl-C to stop.") {
        assert!(
            Instant::now() < deadline,
            "the demo did not start:\n{printed}"
        );
        let line = lines.next().expect("the demo exited").unwrap();
        printed.push_str(&line);
        printed.push('\n');
    }
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
    let status = Command::new(env!("CARGO_BIN_EXE_tollgate"))
        .args(["status", "-c", &file])
        .env("RUST_LOG", "off")
        .output()
        .unwrap();
    let table = String::from_utf8_lossy(&status.stdout);
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

    // `tollgate login beproduct --no-browser`: open the URL it prints (the simulated identity
    // server signs in without asking), and the login lands in the demo's state.
    let mut login = Command::new(env!("CARGO_BIN_EXE_tollgate"))
        .args(["login", "beproduct", "--no-browser", "-c", &file])
        .env("RUST_LOG", "off")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut said = BufReader::new(login.stderr.take().unwrap()).lines();
    let url = loop {
        let line = said.next().expect("login printed its URL").unwrap();
        if let Some(url) = line.trim().strip_prefix("http://") {
            break format!("http://{url}");
        }
    };
    let page = Command::new("curl").args(["-sL", &url]).output().unwrap();
    assert!(String::from_utf8_lossy(&page.stdout).contains("Logged in"));
    let rest: Vec<String> = said.map_while(Result::ok).collect();
    assert!(login.wait().unwrap().success(), "{rest:?}");
    assert!(rest.iter().any(|l| l.contains("Logged in")), "{rest:?}");

    terminate(demo.id());
    let _ = demo.wait();
    let logs = logs.join().unwrap();
    assert!(logs.contains("refreshing and replaying once"), "{logs}");
}

/// A child killed when the test ends, passed or failed.
struct Killed(std::process::Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// SIGTERM, as Ctrl-C would stop it.
fn terminate(pid: u32) {
    let _ = Command::new("kill").arg(pid.to_string()).status();
}
