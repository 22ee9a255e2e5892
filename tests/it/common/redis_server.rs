//! A real `redis-server` for one test: its own loopback port and data directory, so the test
//! can stop it, start it again with its data, and flush it.

use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct RedisServer {
    child: Option<Child>,
    pub port: u16,
    dir: tempfile::TempDir,
    /// TLS only (`rediss://`), with a password: the CA's PEM that signed its certificate.
    tls_ca: Option<String>,
    /// Persists only by snapshots the test takes ([`RedisServer::snapshot`]), not every write.
    snapshots_only: bool,
}

/// The password of a server started with [`RedisServer::start_tls`].
pub const PASSWORD: &str = "s3cret-redis-pw";

impl RedisServer {
    /// Start `redis-server` from `PATH`; fails the test, saying how to install it, when there
    /// is none.
    pub fn start() -> RedisServer {
        RedisServer::start_with(false)
    }

    /// Like [`RedisServer::start`], but TLS only, with a certificate from a private CA
    /// ([`RedisServer::ca_file`]) and a password ([`PASSWORD`]).
    pub fn start_tls() -> RedisServer {
        RedisServer::start_with(true)
    }

    /// Like [`RedisServer::start`], but persisting only the snapshots the test takes: a
    /// restart comes back with the last one ([`RedisServer::restart_from_snapshot`]).
    pub fn start_with_snapshots() -> RedisServer {
        let mut server = RedisServer::start();
        server.stop();
        server.snapshots_only = true;
        let _ = std::fs::remove_dir_all(server.dir.path().join("appendonlydir"));
        server.run();
        server
    }

    /// Write the data to disk now (`SAVE`).
    pub fn snapshot(&self) {
        assert!(self.snapshots_only, "start_with_snapshots");
        self.command(&["SAVE"]);
    }

    /// Kill the server and start it again with the last snapshot: what was written since is
    /// lost, the rest comes back.
    pub fn restart_from_snapshot(&mut self) {
        assert!(self.snapshots_only, "start_with_snapshots");
        self.restart();
    }

    /// Like [`RedisServer::start`], on `port` (one a test held for something else first).
    pub fn start_at(port: u16) -> RedisServer {
        RedisServer::start_on(port, false)
    }

    fn start_with(tls: bool) -> RedisServer {
        RedisServer::start_on(super::free_port(), tls)
    }

    fn start_on(port: u16, tls: bool) -> RedisServer {
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
            port,
            dir: tempfile::tempdir().unwrap(),
            tls_ca: None,
            snapshots_only: false,
        };
        if tls {
            let ca = super::certs::make_ca("redis");
            std::fs::write(server.dir.path().join("ca.pem"), &ca.ca_pem).unwrap();
            std::fs::write(server.dir.path().join("cert.pem"), &ca.cert_pem).unwrap();
            std::fs::write(server.dir.path().join("key.pem"), &ca.key_pem).unwrap();
            server.tls_ca = Some(ca.ca_pem);
        }
        server.run();
        server
    }

    fn run(&mut self) {
        assert!(self.child.is_none(), "already running");
        let dir = self.dir.path();
        let port = self.port.to_string();
        let mut command = Command::new("redis-server");
        command.args(["--bind", "127.0.0.1"]);
        if self.tls_ca.is_some() {
            let file = |name: &str| dir.join(name).display().to_string();
            command
                .args(["--port", "0", "--tls-port", &port])
                .args(["--tls-cert-file", &file("cert.pem")])
                .args(["--tls-key-file", &file("key.pem")])
                .args(["--tls-ca-cert-file", &file("ca.pem")])
                .args(["--tls-auth-clients", "no", "--requirepass", PASSWORD]);
        } else {
            command.args(["--port", &port]);
        }
        command.args(["--dir", &dir.display().to_string()]);
        if self.snapshots_only {
            command.args(["--appendonly", "no", "--save", ""]);
        } else {
            // Persist every write, so a restart keeps the data (as tollgate asks of Redis).
            command.args([
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
                "--save",
                "",
            ]);
        }
        let child = command
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

    /// `redis://127.0.0.1:PORT/0`, or `rediss://:PASSWORD@localhost:PORT/0` for TLS.
    pub fn url(&self) -> String {
        match self.tls_ca {
            Some(_) => format!("rediss://:{PASSWORD}@localhost:{}/0", self.port),
            None => format!("redis://127.0.0.1:{}/0", self.port),
        }
    }

    /// The CA that signed a TLS server's certificate, as a file for `[state] ca_file`.
    pub fn ca_file(&self) -> std::path::PathBuf {
        self.dir.path().join("ca.pem")
    }

    fn client(&self) -> redis::RedisResult<redis::Client> {
        match &self.tls_ca {
            Some(ca) => redis::Client::build_with_tls(
                self.url(),
                redis::TlsCertificates {
                    client_tls: None,
                    root_cert: Some(ca.clone().into_bytes()),
                },
            ),
            None => redis::Client::open(self.url()),
        }
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

    /// Start it again on the same port with nothing: a restart without persistence.
    pub fn restart_empty(&mut self) {
        self.stop();
        let dir = self.dir.path();
        let _ = std::fs::remove_dir_all(dir.join("appendonlydir"));
        let _ = std::fs::remove_file(dir.join("appendonly.aof"));
        let _ = std::fs::remove_file(dir.join("dump.rdb"));
        self.run();
    }

    /// `rediss://` with a password other than the server's (TLS only).
    pub fn url_with_wrong_password(&self) -> String {
        assert!(
            self.tls_ca.is_some(),
            "only a TLS server asks for a password"
        );
        format!("rediss://:not-the-password@localhost:{}/0", self.port)
    }

    /// Run one command, e.g. `["FLUSHALL"]`, and return its answer.
    pub fn command(&self, args: &[&str]) -> redis::Value {
        let mut conn = self.client().unwrap().get_connection().unwrap();
        let mut cmd = redis::cmd(args[0]);
        for a in &args[1..] {
            cmd.arg(*a);
        }
        cmd.query(&mut conn).unwrap()
    }

    fn ping(&self) -> std::io::Result<()> {
        TcpStream::connect(("127.0.0.1", self.port))?;
        let client = self.client().map_err(std::io::Error::other)?;
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
