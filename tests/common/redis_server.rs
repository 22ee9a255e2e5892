//! A real `redis-server` for one test: its own loopback port and data directory, so the test
//! can stop it, start it again with its data, and flush it.

use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct RedisServer {
    child: Option<Child>,
    pub port: u16,
    dir: tempfile::TempDir,
}

impl RedisServer {
    /// Start `redis-server` from `PATH`; fails the test, saying how to install it, when there
    /// is none.
    pub fn start() -> RedisServer {
        let found = Command::new("redis-server")
            .arg("--version")
            .stdout(Stdio::null())
            .status();
        assert!(
            found.is_ok_and(|s| s.success()),
            "this test needs redis-server on PATH: install it with `apt-get install -y redis-server` (or Valkey's valkey-server, linked as redis-server)"
        );
        let mut server = RedisServer {
            child: None,
            port: super::free_port(),
            dir: tempfile::tempdir().unwrap(),
        };
        server.run();
        server
    }

    fn run(&mut self) {
        assert!(self.child.is_none(), "already running");
        let child = Command::new("redis-server")
            .args(["--bind", "127.0.0.1", "--port", &self.port.to_string()])
            .args(["--dir", &self.dir.path().display().to_string()])
            // Persist every write, so a restart keeps the data (as tollgate asks of Redis).
            .args([
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
                "--save",
                "",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start redis-server");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.ping().is_err() {
            assert!(Instant::now() < deadline, "redis-server did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// `redis://127.0.0.1:PORT/0`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    /// Stop the server (its data stays on disk).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Start it again on the same port, with its data.
    pub fn restart(&mut self) {
        self.stop();
        self.run();
    }

    /// Run one command, e.g. `["FLUSHALL"]`, and return its answer.
    pub fn command(&self, args: &[&str]) -> redis::Value {
        let client = redis::Client::open(self.url()).unwrap();
        let mut conn = client.get_connection().unwrap();
        let mut cmd = redis::cmd(args[0]);
        for a in &args[1..] {
            cmd.arg(*a);
        }
        cmd.query(&mut conn).unwrap()
    }

    fn ping(&self) -> std::io::Result<()> {
        TcpStream::connect(("127.0.0.1", self.port))?;
        let client = redis::Client::open(self.url()).map_err(std::io::Error::other)?;
        let mut conn = client.get_connection().map_err(std::io::Error::other)?;
        redis::cmd("PING")
            .query::<String>(&mut conn)
            .map(|_| ())
            .map_err(std::io::Error::other)
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop();
    }
}
