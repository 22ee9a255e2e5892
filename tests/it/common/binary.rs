//! The tollgate binary, run as a user runs it: [`Tollgate`] builds the command line,
//! [`Tollgate::run`] runs it to its end, [`Tollgate::spawn`] leaves it running.

use std::io::{BufRead, BufReader, Read};
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::time::{Duration, Instant};

/// `tollgate ARGS`, to run or to spawn.
pub struct Tollgate {
    command: Command,
    /// Holds the file [`Tollgate::config`] wrote.
    dir: Option<tempfile::TempDir>,
}

impl Tollgate {
    /// `tollgate ARGS`, with `RUST_LOG=off` (unless set otherwise) and no `TOLLGATE_CONFIG`.
    pub fn new(args: &[&str]) -> Tollgate {
        let mut command = Command::new(env!("CARGO_BIN_EXE_tollgate"));
        command
            .args(args)
            .env("RUST_LOG", "off")
            .env_remove("TOLLGATE_CONFIG");
        Tollgate { command, dir: None }
    }

    /// Add `-c FILE`.
    pub fn config_file(mut self, path: impl AsRef<Path>) -> Tollgate {
        self.command.arg("-c").arg(path.as_ref());
        self
    }

    /// Add `-c FILE`, with `text` written to a file of its own.
    pub fn config(mut self, text: &str) -> Tollgate {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tollgate.toml");
        std::fs::write(&path, text).unwrap();
        self.dir = Some(dir);
        self.config_file(path)
    }

    pub fn env(mut self, key: &str, value: &str) -> Tollgate {
        self.command.env(key, value);
        self
    }

    pub fn env_remove(mut self, key: &str) -> Tollgate {
        self.command.env_remove(key);
        self
    }

    /// Run it to its end.
    pub fn run(mut self) -> Output {
        let out = self.command.output().expect("run tollgate");
        Output {
            status: out.status,
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    /// [`Tollgate::run`] off the async runtime, so an in-process proxy keeps serving.
    pub async fn run_async(self) -> Output {
        tokio::task::spawn_blocking(move || self.run())
            .await
            .unwrap()
    }

    /// Start it, its stdout and stderr read line by line.
    pub fn spawn(mut self) -> Running {
        let mut child = self
            .command
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn tollgate");
        Running {
            stdout: Lines::read(child.stdout.take().unwrap()),
            stderr: Lines::read(child.stderr.take().unwrap()),
            child,
            _dir: self.dir,
        }
    }
}

/// What a finished run printed.
#[derive(Debug)]
pub struct Output {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl Output {
    pub fn code(&self) -> Option<i32> {
        self.status.code()
    }
}

/// A spawned tollgate, killed when dropped (passed or failed).
pub struct Running {
    pub child: Child,
    pub stdout: Lines,
    pub stderr: Lines,
    _dir: Option<tempfile::TempDir>,
}

impl Running {
    /// Send signal `name` (`TERM`, `HUP`, `STOP`, ...).
    pub fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .arg(format!("-{name}"))
            .arg(self.child.id().to_string())
            .status()
            .unwrap();
        assert!(status.success(), "kill -{name}");
    }

    /// Wait up to `within` for it to exit.
    pub async fn exit_within(&mut self, within: Duration) -> ExitStatus {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(Instant::now() < deadline, "tollgate did not exit");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// The next JSON log line on stderr whose message is `message` (others are skipped).
    pub fn wait_for_log(&self, message: &str) -> serde_json::Value {
        let line = self.stderr.until(Duration::from_secs(20), |line| {
            serde_json::from_str::<serde_json::Value>(line)
                .is_ok_and(|v| v["fields"]["message"] == message)
        });
        serde_json::from_str(line.last().unwrap()).unwrap()
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A child's output, read line by line by a thread of its own (so the child never blocks on a
/// full pipe).
pub struct Lines(mpsc::Receiver<String>);

impl Lines {
    fn read(from: impl Read + Send + 'static) -> Lines {
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(from).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        Lines(rx)
    }

    /// The lines up to the first that `found` holds for, that one last; fails the test when the
    /// output ends first or `within` passes.
    pub fn until(&self, within: Duration, mut found: impl FnMut(&str) -> bool) -> Vec<String> {
        let deadline = Instant::now() + within;
        let mut read = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.0.recv_timeout(left) {
                Ok(line) => {
                    let done = found(&line);
                    read.push(line);
                    if done {
                        return read;
                    }
                }
                Err(RecvTimeoutError::Timeout) => {
                    panic!("no such line within {within:?}; read:\n{}", read.join("\n"))
                }
                Err(RecvTimeoutError::Disconnected) => {
                    panic!("tollgate exited first; read:\n{}", read.join("\n"))
                }
            }
        }
    }

    /// The lines left, to the end of the output.
    pub fn rest(&self) -> Vec<String> {
        self.0.iter().collect()
    }
}

/// `tollgate serve` (JSON logs at `info`), once it listens.
pub struct Spawned {
    pub process: Running,
    /// Where upstream `api` listens.
    pub addr: String,
}

impl std::ops::Deref for Spawned {
    type Target = Running;
    fn deref(&self) -> &Running {
        &self.process
    }
}

impl std::ops::DerefMut for Spawned {
    fn deref_mut(&mut self) -> &mut Running {
        &mut self.process
    }
}

/// Spawn `tollgate serve -c config` and wait for it to listen.
pub fn spawn_serve(config: &Path) -> Spawned {
    spawn_serve_with(config, &[])
}

/// [`spawn_serve`] with more arguments to `serve`.
pub fn spawn_serve_with(config: &Path, more: &[&str]) -> Spawned {
    let args: Vec<&str> = ["serve", "--log-format", "json"]
        .iter()
        .chain(more)
        .copied()
        .collect();
    let process = Tollgate::new(&args)
        .config_file(config)
        .env("RUST_LOG", "info")
        .spawn();
    let listening = process.wait_for_log("listening");
    let addr = listening["fields"]["listen"].as_str().unwrap().to_owned();
    Spawned { process, addr }
}

/// `tollgate status -c config`, run off the async runtime.
pub async fn status_command(config: &Path) -> Output {
    Tollgate::new(&["status"])
        .config_file(config)
        .run_async()
        .await
}
