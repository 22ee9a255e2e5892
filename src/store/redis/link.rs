//! The one connection a replica keeps to Redis (multiplexed: every operation shares it), and
//! how it is replaced.
//!
//! A connection that failed is dropped, and the next operation makes a new one: after an I/O
//! error, and also after a timeout, an answer that could not be parsed, a refused
//! authentication, a replica that is read-only (a failover), or a handshake that failed (a
//! wrong password, a server that is not Redis). A store address that answered garbage for a
//! while is therefore used again as soon as Redis answers there. An error reply that says
//! nothing of the connection (out of memory, loading, busy) keeps it: replacing it would only
//! add a handshake to every failing operation of every replica. A failed connect is not tried again for [`RETRY_AFTER`]: the operations meanwhile
//! fail at once with its reason, rather than each waiting its own timeout.
//!
//! Must not: retry an operation (the caller decides), or hide why a connect failed.

use redis::aio::MultiplexedConnection;
use redis::{AsyncConnectionConfig, ErrorKind, RedisError};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How long a failed connect answers for itself before the next attempt.
const RETRY_AFTER: Duration = Duration::from_millis(250);

pub(super) struct Link {
    client: redis::Client,
    config: AsyncConnectionConfig,
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
    pub(super) fn new(client: redis::Client, timeout: Duration) -> Link {
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(timeout))
            .set_response_timeout(Some(timeout));
        Link {
            client,
            config,
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
    pub(super) async fn get(&self) -> Result<(u64, MultiplexedConnection, bool), RedisError> {
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

    /// Run `operation` within `timeout` for a task of its own (a lock's release or keep-alive),
    /// replacing a connection that failed; `None` when it did not succeed.
    pub(super) async fn run_detached<T, F>(
        &self,
        timeout: Duration,
        operation: impl FnOnce(MultiplexedConnection) -> F,
    ) -> Option<T>
    where
        F: std::future::Future<Output = redis::RedisResult<T>>,
    {
        let deadline = tokio::time::Instant::now() + timeout;
        let (id, conn, _) = tokio::time::timeout_at(deadline, self.get())
            .await
            .ok()?
            .ok()?;
        match tokio::time::timeout_at(deadline, operation(conn)).await {
            Ok(Ok(value)) => Some(value),
            Ok(Err(e)) => {
                self.failed(id, Some(&e));
                None
            }
            Err(_) => {
                self.failed(id, None);
                None
            }
        }
    }

    /// An operation on connection `id` failed (`error`), or did not answer in time (`None`):
    /// unless the error says nothing of the connection, it is dropped (when it is still the
    /// one in use) and the next operation makes a new one.
    pub(super) fn failed(&self, id: u64, error: Option<&RedisError>) {
        if error.is_some_and(|e| !breaks_the_connection(e)) {
            return;
        }
        let mut state = self.state();
        if matches!(&*state, State::Up { id: current, .. } if *current == id) {
            *state = State::Unused;
        }
    }
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
