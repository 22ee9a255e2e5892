//! The state store: what must survive a restart. Per upstream, the token record (the newest
//! refresh token of its lineage, the current access token, its expiry and generation), a lock
//! that makes refreshes of one lineage one-at-a-time across processes, and quota leases per
//! [`Period`].
//!
//! The store never decides anything: the token cache and the quota code do, and call it on their
//! slow paths only. `file:` is the embedded default ([`FileStore`]); a shared store for several
//! replicas implements the same trait, using [`RefreshLock::fence`] for compare-and-set.

mod file;
mod period;
mod record;
mod redis;

pub use self::redis::RedisStore;
pub use file::FileStore;
pub use period::{Period, Relation};
pub use record::{
    login_command, record_name, Place, TokenRecord, Unread, IDENTITY_SEPARATOR, OWN_IDENTITY,
};

use crate::config::{StateConfig, StoreLocation};
use crate::seal::Keys;
use async_trait::async_trait;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The outcome of [`StateStore::reserve_quota`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reservation {
    pub granted: u64,
    /// What every process has reserved of the window, this grant included.
    pub used: u64,
    /// The store's version of the upstream's counts after this grant (see [`Seen`]).
    pub version: u64,
}

/// What a process last saw of a period's count: the count, and the version the store gave
/// the counts then. Every reservation and release bumps the version, so a store whose version
/// is below one a process has seen went back in time — it lost data (a Redis flushed, or
/// failed over to a stale replica) — and takes that count back; a count given back since is
/// not mistaken for a loss.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Seen {
    pub count: u64,
    pub version: u64,
}

/// Requests one inbound key (by label) sent in one 15-minute slot of a day.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Used {
    pub key: String,
    pub slot: u32,
    pub count: u64,
}

impl Used {
    /// The field a store keeps it under: `slot/key` (key labels hold no `/`).
    pub fn field(&self) -> String {
        format!("{}/{}", self.slot, self.key)
    }

    /// Read back a [`Used::field`] and its count; `None` for a field no tollgate wrote (a key
    /// label is a key's name, `#N` or `-`).
    pub fn parse(field: &str, count: u64) -> Option<Used> {
        let (slot, key) = field.split_once('/')?;
        let label = |c: char| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '#');
        if key.is_empty() || key.len() > 64 || !key.chars().all(label) {
            return None;
        }
        Some(Used {
            key: key.to_owned(),
            slot: slot.parse().ok()?,
            count,
        })
    }
}

/// Held while one process redeems a refresh token and saves what it got; released when the
/// last share of it is dropped.
pub struct RefreshLock {
    /// Increases every time the lock is taken; a shared store rejects writes with an old fence.
    pub fence: u64,
    /// When a shared store lets the lock go by itself (its TTL); never, for `flock`.
    pub expires: Option<Instant>,
    held: Arc<dyn Send + Sync>,
}

impl RefreshLock {
    pub fn new(fence: u64, expires: Option<Instant>, held: Box<dyn Send + Sync>) -> Self {
        RefreshLock {
            fence,
            expires,
            held: Arc::from(held),
        }
    }

    /// A share of the lock for a write that finishes on its own (a blocking task): the lock
    /// stays held until the write has landed, even if the caller stopped waiting for it.
    pub fn share(&self) -> Arc<dyn Send + Sync> {
        Arc::clone(&self.held)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("state store I/O on {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("state file {path} is damaged ({reason}); restore it from a backup. Without one: remove a damaged <name>.token.json and set a new refresh token in the config; remove a damaged <name>.quota.json only knowing that today's spent count is lost with it")]
    Corrupt { path: String, reason: String },
    #[error("the {what} lock of `{upstream}` is held by another process for more than {waited:?}")]
    LockTimeout {
        what: &'static str,
        upstream: String,
        waited: Duration,
    },
    /// A shared store that does not answer (in time), or refuses an operation.
    #[error("the state store {store} failed: {reason}")]
    Unreachable { store: String, reason: String },
    /// A later holder of the refresh lock saved a newer record: this one is stale.
    #[error("another replica saved a newer token record of `{upstream}`")]
    Superseded { upstream: String },
    /// The store failed this way a moment ago and is not asked again yet, so requests that
    /// would wait for it in turn fail at once.
    #[error("{0} (a moment ago; asked again within a second)")]
    Recently(String),
    /// A shared store lost its data a moment ago, or its connection was just made: `why`
    /// nothing is granted, for `left` at most. Waited out, not a failure of the store.
    #[error("{why} (for {} at most)", humantime::format_duration(*.left))]
    Recovering { why: &'static str, left: Duration },
    /// `state.store` names no store this version can open.
    #[error("state.store: {0}")]
    Location(String),
    /// A sealed token record no configured key opens: its plain fields, and why. Never
    /// overwritten by the proxy, never redeemed.
    #[error("the token record of `{upstream}` in the state store does not open: {why}. Until it opens, tollgate neither redeems nor overwrites it; to start over instead, run `{}` or give the upstream a new seed", login_command(upstream))]
    Sealed {
        upstream: String,
        seed_hash: String,
        generation: u64,
        why: String,
    },
}

impl StoreError {
    /// A record `upstream`'s store could not read at `path`.
    pub(crate) fn unread(upstream: &str, path: String, unread: Unread) -> StoreError {
        match unread {
            Unread::Damaged(reason) => StoreError::Corrupt { path, reason },
            Unread::Sealed {
                seed_hash,
                generation,
                why,
            } => StoreError::Sealed {
                upstream: upstream.to_owned(),
                seed_hash,
                generation,
                why,
            },
        }
    }
}

/// Persistent state shared by every tollgate process that uses the same store.
#[async_trait]
pub trait StateStore: Send + Sync {
    /// The token record of `upstream`, if one was ever saved.
    async fn load_token(&self, upstream: &str) -> Result<Option<TokenRecord>, StoreError>;

    /// Durably replace the token record of `upstream`. Returns only once the record would
    /// survive a crash. Must be called while holding `lock`; a write that goes on after the
    /// caller stopped waiting keeps a [`RefreshLock::share`] until it has landed.
    async fn save_token(
        &self,
        upstream: &str,
        record: &TokenRecord,
        lock: &RefreshLock,
    ) -> Result<(), StoreError>;

    /// Write `record`, read from the store under `lock`, again as it is, sealed with the key
    /// now configured (`tollgate rekey`). A store that only moves forward in a lineage takes
    /// it at the same place.
    async fn reseal_token(
        &self,
        upstream: &str,
        record: &TokenRecord,
        lock: &RefreshLock,
    ) -> Result<(), StoreError> {
        self.save_token(upstream, record, lock).await
    }

    /// Seal and open token records with `keys` from now on (a reload changed `[state] key`
    /// or `previous_keys`).
    fn set_keys(&self, keys: Keys);

    /// Wait (up to `wait`) for the right to redeem `upstream`'s refresh token, for at least
    /// `hold` (a shared store's lock expires after that, in case its holder died).
    async fn lock_refresh(
        &self,
        upstream: &str,
        wait: Duration,
        hold: Duration,
    ) -> Result<RefreshLock, StoreError>;

    /// Reserve up to `want` requests of `period` whose limit is `limit`. Grants 0 when the
    /// period is spent, or over (a later one has started). Counts of an overlapping period (a
    /// changed `day_starts`) are carried into this one first. A store that went back in
    /// time (see [`Seen`]) takes `seen.count` back before granting. Reserved counts are spent even if the process dies, so a
    /// crash can only under-admit.
    async fn reserve_quota(
        &self,
        upstream: &str,
        period: &Period,
        limit: u64,
        want: u64,
        seen: Seen,
    ) -> Result<Reservation, StoreError>;

    /// Return `count` reserved but unspent requests of `period` (on a clean shutdown).
    async fn release_quota(
        &self,
        upstream: &str,
        period: &Period,
        count: u64,
    ) -> Result<(), StoreError>;

    /// How many requests of `period`, and of periods overlapping it, every process has
    /// reserved so far.
    async fn quota_used(&self, upstream: &str, period: &Period) -> Result<u64, StoreError>;

    /// Add `added` — (inbound key label, 15-minute slot of the day, requests sent) — to
    /// `upstream`'s use of `day`, and return the day's use by every process in the same form.
    /// A day's use is forgotten once a later day's is added. Attribution only: nothing is
    /// admitted or refused by it.
    async fn add_usage(
        &self,
        upstream: &str,
        day: &Period,
        added: &[Used],
    ) -> Result<Vec<Used>, StoreError>;

    /// Wait (briefly) for work the store finishes on its own — a lock released as it was
    /// dropped — before the process exits, so another process need not wait for it to expire.
    async fn flush(&self) {}

    /// Whether several replicas share the store (Redis), not this machine alone.
    fn is_shared(&self) -> bool {
        false
    }

    /// How a store shared by several replicas is doing; `None` for one of this machine alone.
    fn health(&self) -> Option<StoreHealth> {
        None
    }

    /// Show this replica to the others, and notice a store that stopped answering, or lost
    /// its data, while nothing else asked it. The proxy calls it every
    /// [`StateStore::heartbeat_every`] while it runs.
    async fn heartbeat(&self) {}

    /// How often [`StateStore::heartbeat`] is called (`[state] heartbeat`).
    fn heartbeat_every(&self) -> Duration {
        HEARTBEAT
    }

    /// A refresh lock of this process may live `hold` (`auth.timeout` and a margin): a shared
    /// store that lost its data grants no lock for the longest of these, so that a holder it
    /// cannot see (paused, cut off) is not overtaken.
    fn lock_life(&self, _hold: Duration) {}

    /// Generations of `upstream`'s token record saved by any process, as they are announced
    /// (a shared store's pub/sub), so a replica switches to a newer token without waiting for
    /// its own refresh; `None` where nothing is announced.
    fn announcements(&self, _upstream: &str) -> Option<tokio::sync::watch::Receiver<u64>> {
        None
    }

    /// Hold every replica back from `upstream` until `until_ms` (Unix ms): it answered 429
    /// to this one. Nothing to do for a store of this machine alone.
    async fn share_hold(&self, _upstream: &str, _until_ms: u64) {}

    /// The holds other replicas share for `upstream` (Unix ms), as they are announced.
    fn holds(&self, _upstream: &str) -> Option<tokio::sync::watch::Receiver<u64>> {
        None
    }

    /// What breaks tollgate's promises on this store, asked once at start: a Redis that does
    /// not answer (a refused password), that does not persist, or that evicts keys.
    async fn startup_warnings(&self) -> Vec<String> {
        Vec::new()
    }
}

/// Wall-clock milliseconds, as records and a shared store's scripts compare them.
pub(crate) fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// How often a replica shows itself to the others on a shared store by default
/// (`[state] heartbeat`); one not seen for six heartbeats is forgotten.
pub const HEARTBEAT: Duration = Duration::from_secs(5);

/// What `/readyz`, `/status` and `/metrics` say of a shared store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreHealth {
    /// The store, as it may be shown (no password).
    pub store: String,
    /// This replica's id.
    pub replica: String,
    /// The replicas seen within the last six heartbeats, by id.
    pub replicas: Vec<String>,
    /// Why the last operation failed, while the store fails.
    pub problem: Option<String>,
    /// Failed operations since the start.
    pub errors: u64,
    /// How many times this replica found that the store had lost its data.
    pub losses: u64,
    /// How much longer no count is reserved after a loss, as far as this replica knows.
    pub recovering: Option<Duration>,
}

/// What `tollgate check` can tell of the store without changing anything: a file store's
/// directory must be writable, or creatable in the nearest directory that exists.
pub fn check(state: &StateConfig) -> Result<(), String> {
    let StoreLocation::File(dir) = state.location()? else {
        return Ok(());
    };
    let mut at = dir.as_path();
    while !at.exists() {
        match at.parent() {
            Some(parent) if !parent.as_os_str().is_empty() => at = parent,
            _ => {
                at = std::path::Path::new(".");
                break;
            }
        }
    }
    let what = if at == dir {
        "state directory"
    } else {
        "directory the state directory would be made in"
    };
    if !at.is_dir() {
        return Err(format!(
            "state.store: the {what}, {}, is not a directory",
            at.display()
        ));
    }
    tempfile::tempfile_in(at).map(drop).map_err(|e| {
        format!(
            "state.store: tollgate cannot write in the {what}, {} ({e}); create {} and give the user tollgate runs as write access to it",
            at.display(),
            dir.display()
        )
    })
}

/// What `tollgate check` can tell of the token records without changing anything: in a state
/// directory, each record of `names` (upstreams', identities') that no configured key opens,
/// that cannot be read, or that is not sealed yet although a key is set. (A shared store is not asked: `/readyz`
/// says the same of it.)
pub fn record_problems<'a>(
    state: &StateConfig,
    names: impl Iterator<Item = &'a str>,
) -> Vec<String> {
    let (Ok(StoreLocation::File(dir)), Ok(keys)) = (state.location(), state.keys()) else {
        return Vec::new();
    };
    let sealing = keys.fingerprint().is_some();
    names
        .filter_map(|name| match FileStore::peek(&dir, name, &keys) {
            Err(e) => Some(e.to_string()),
            Ok(Some(false)) if sealing => Some(format!("the token record of `{name}` is not sealed yet: it is at its next save, or now with `tollgate rekey`")),
            Ok(_) => None,
        })
        .collect()
}

/// Open the store that `state.store` names, sealing with `[state] key`. A Redis store
/// connects on first use.
pub fn open(state: &StateConfig) -> Result<Arc<dyn StateStore>, StoreError> {
    let keys = state.keys().map_err(StoreError::Location)?;
    let store: Arc<dyn StateStore> = match state.location().map_err(StoreError::Location)? {
        StoreLocation::File(dir) => Arc::new(FileStore::open(&dir)?),
        StoreLocation::Redis(url) => Arc::new(RedisStore::open(&url, state)?),
    };
    store.set_keys(keys);
    Ok(store)
}
