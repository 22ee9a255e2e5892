//! The one connection a replica keeps to Redis (multiplexed: every operation shares it), how
//! an operation runs on it, and how it is replaced.
//!
//! An operation is bounded by `[state] timeout`, connecting included. A connection that
//! failed is dropped, and the next operation makes a new one: after an I/O error, and also
//! after a timeout, an answer that could not be parsed, a refused authentication, a replica
//! that is read-only (a failover), or a handshake that failed (a wrong password, a server that
//! is not Redis). A store address that answered garbage for a while is therefore used again as
//! soon as Redis answers there. An error reply that says nothing of the connection (out of
//! memory, loading, busy) keeps it: replacing it would only add a handshake to every failing
//! operation of every replica. A failed connect is not tried again for [`RETRY_AFTER`]: the
//! operations meanwhile fail at once with its reason, rather than each waiting its own
//! timeout. An operation that finds the connection in use dead (Redis restarted) is asked
//! again once on a new one, when its caller says it may be.
//!
//! Why an operation failed is said in words that say what to check, without the password a
//! peer may echo back, and cut short.
//!
//! Must not: hide why a connect failed, or ask an operation twice unless its caller allows it.

use crate::secret::Secret;
use redis::aio::MultiplexedConnection;
use redis::{AsyncConnectionConfig, ErrorKind, RedisError};
use std::future::Future;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How long a failed connect answers for itself before the next attempt.
const RETRY_AFTER: Duration = Duration::from_millis(250);

/// The longest error text of a server's that messages repeat.
const SAID_AT_MOST: usize = 300;

pub(super) struct Link {
    client: redis::Client,
    config: AsyncConnectionConfig,
    /// What one operation may take (`[state] timeout`).
    timeout: Duration,
    /// The password of the URL, in the forms it may be written: cut from any text a server
    /// sends back (a peer that is not Redis may echo the AUTH it was sent).
    password: Vec<Secret<String>>,
    state: Mutex<State>,
    /// One connect at a time; the others wait for its outcome.
    connecting: tokio::sync::Mutex<()>,
}

enum State {
    Up {
        id: u64,
        conn: MultiplexedConnection,
        since: Instant,
    },
    Down {
        at: Instant,
        error: RedisError,
    },
    Unused,
}

impl Link {
    pub(super) fn new(
        client: redis::Client,
        timeout: Duration,
        password: Vec<Secret<String>>,
    ) -> Link {
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(timeout))
            .set_response_timeout(Some(timeout));
        Link {
            client,
            config,
            timeout,
            password,
            state: Mutex::new(State::Unused),
            connecting: tokio::sync::Mutex::new(()),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn up(&self) -> Option<(u64, MultiplexedConnection)> {
        match &*self.state() {
            State::Up { id, conn, .. } => Some((*id, conn.clone())),
            _ => None,
        }
    }

    /// How long the connection in use has been up; `None` without one.
    pub(super) fn age(&self) -> Option<Duration> {
        match &*self.state() {
            State::Up { since, .. } => Some(since.elapsed()),
            _ => None,
        }
    }

    /// The connection, made now if there is none (then `true`); its id is what
    /// [`Link::failed`] takes.
    async fn get(&self) -> Result<(u64, MultiplexedConnection, bool), RedisError> {
        if let Some((id, conn)) = self.up() {
            return Ok((id, conn, false));
        }
        let _one = self.connecting.lock().await;
        if let Some((id, conn)) = self.up() {
            return Ok((id, conn, false));
        }
        if let State::Down { at, error } = &*self.state() {
            if at.elapsed() < RETRY_AFTER {
                return Err(error.clone());
            }
        }
        let made = self
            .client
            .get_multiplexed_async_connection_with_config(&self.config)
            .await;
        let mut state = self.state();
        match made {
            Ok(conn) => {
                let id = rand::random();
                *state = State::Up {
                    id,
                    conn: conn.clone(),
                    since: Instant::now(),
                };
                Ok((id, conn, true))
            }
            Err(error) => {
                *state = State::Down {
                    at: Instant::now(),
                    error: error.clone(),
                };
                Err(error)
            }
        }
    }

    /// Run `operation` on the connection (made first if needed), within `[state] timeout` in
    /// all; why it failed, in words. `again`: ask once more on a new connection when the one
    /// in use turns out dead — only for an operation that may be applied twice.
    pub(super) async fn run<T, F>(
        &self,
        operation: impl Fn(MultiplexedConnection) -> F,
        again: bool,
    ) -> Result<T, String>
    where
        F: Future<Output = redis::RedisResult<T>>,
    {
        let deadline = tokio::time::Instant::now() + self.timeout;
        let late = || {
            format!(
                "no answer within {} ([state] timeout)",
                humantime::format_duration(self.timeout)
            )
        };
        let mut again = again;
        loop {
            let (id, conn, made) = match tokio::time::timeout_at(deadline, self.get()).await {
                Ok(Ok(up)) => up,
                Ok(Err(e)) => return Err(self.said(&e)),
                Err(_) => return Err(late()),
            };
            match tokio::time::timeout_at(deadline, operation(conn)).await {
                Ok(Ok(value)) => return Ok(value),
                Ok(Err(e)) => {
                    self.failed(id, Some(&e));
                    // A connection made before and found dead: asked again on a new one.
                    if again && !made && e.is_connection_dropped() {
                        again = false;
                        continue;
                    }
                    return Err(self.said(&e));
                }
                Err(_) => {
                    self.failed(id, None);
                    return Err(late());
                }
            }
        }
    }

    /// What messages say of `e`: its text without the password and no longer than
    /// [`SAID_AT_MOST`], and what to check.
    pub(super) fn said(&self, e: &RedisError) -> String {
        let mut text = e.to_string();
        for form in &self.password {
            text = text.replace(form.expose().as_str(), "[redacted]");
        }
        if let Some((cut, _)) = text.char_indices().nth(SAID_AT_MOST) {
            text.truncate(cut);
            text.push('…');
        }
        describe(e, &text)
    }

    /// An operation on connection `id` failed (`error`), or did not answer in time (`None`):
    /// unless the error says nothing of the connection, it is dropped (when it is still the
    /// one in use) and the next operation makes a new one.
    fn failed(&self, id: u64, error: Option<&RedisError>) {
        if error.is_some_and(|e| !breaks_the_connection(e)) {
            return;
        }
        let mut state = self.state();
        if matches!(&*state, State::Up { id: current, .. } if *current == id) {
            *state = State::Unused;
        }
    }
}

/// Why an operation failed, in words that say what to check; `said` is the error's own text,
/// as it may be shown.
fn describe(e: &RedisError, said: &str) -> String {
    let code = e.code().unwrap_or_default();
    if e.kind() == ErrorKind::AuthenticationFailed || matches!(code, "WRONGPASS" | "NOAUTH") {
        return format!("Redis refused to authenticate this client ({said}); check the user and password in state.store, and `requirepass` (or the ACL user) on the server");
    }
    if e.kind() == ErrorKind::Parse {
        return format!("the server does not answer as Redis does ({said}); check the host and port in state.store");
    }
    said.to_owned()
}

/// Whether `error` means the connection cannot be trusted any more: the peer is not the Redis
/// it was (a parse error, a refused authentication, a read-only replica after a failover) or
/// the connection itself failed. An error reply of Redis's own (out of memory, loading, busy,
/// a script's error) or an answer of another type than asked for does not.
fn breaks_the_connection(error: &RedisError) -> bool {
    match error.kind() {
        ErrorKind::Server(_) | ErrorKind::Extension => {
            matches!(
                error.code(),
                Some("READONLY" | "NOAUTH" | "WRONGPASS" | "MASTERDOWN")
            )
        }
        ErrorKind::UnexpectedReturnType => false,
        _ => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_errors_that_say_something_of_the_connection_replace_it() {
        let io = RedisError::from(std::io::Error::from(std::io::ErrorKind::ConnectionReset));
        assert!(breaks_the_connection(&io));
        let auth = RedisError::from((ErrorKind::AuthenticationFailed, "refused"));
        assert!(breaks_the_connection(&auth));
        let parse = RedisError::from((ErrorKind::Parse, "garbage"));
        assert!(breaks_the_connection(&parse));
        let typed = RedisError::from((ErrorKind::UnexpectedReturnType, "a string"));
        assert!(!breaks_the_connection(&typed));
    }
}
