//! `file:<dir>` — the embedded state store. One JSON document per upstream, replaced atomically:
//! written to a temp file (0600), fsynced, renamed over the old one, then the directory fsynced,
//! so after a crash the file is either the old record or the new one, never a torn mix.
//! `flock` on `<name>.lock` serialises refreshes across processes on the same directory.

use super::{Period, RefreshLock, Relation, Reservation, Seen, StateStore, StoreError, Used};
use super::{Place, TokenRecord};
use crate::seal::Keys;
use arc_swap::ArcSwap;
use async_trait::async_trait;
use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions, TryLockError};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The file store rooted at one directory.
#[derive(Debug, Clone)]
pub struct FileStore {
    dir: PathBuf,
    /// What token records are sealed and opened with (`[state] key`).
    keys: Arc<ArcSwap<Keys>>,
}

impl FileStore {
    /// Create the directory (0700) if needed and tighten it if it is readable by others.
    pub fn open(dir: &Path) -> Result<FileStore, StoreError> {
        let io = |source| StoreError::Io {
            path: dir.display().to_string(),
            source,
        };
        let existed = dir.is_dir();
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(io)?;
        if !existed {
            // Make the new directory's own entry durable, or a power cut could lose it with
            // the first rotated refresh token inside.
            let parent = dir
                .parent()
                .filter(|p| !p.as_os_str().is_empty())
                .unwrap_or(Path::new("."));
            File::open(parent).and_then(|d| d.sync_all()).map_err(io)?;
        }
        let mode = fs::metadata(dir).map_err(io)?.permissions().mode();
        if mode & 0o077 != 0 {
            tracing::warn!(dir = %dir.display(), "state directory was readable by others; setting it to 0700");
            fs::set_permissions(dir, fs::Permissions::from_mode(0o700)).map_err(io)?;
        }
        Ok(FileStore {
            dir: dir.to_path_buf(),
            keys: Arc::default(),
        })
    }

    /// Whether the token record of `upstream` in `dir` is sealed (`None`: there is none), or
    /// why it does not open with `keys`; read without opening the store (which creates and
    /// tightens the directory): what `tollgate check` looks at.
    pub fn peek(dir: &Path, upstream: &str, keys: &Keys) -> Result<Option<bool>, StoreError> {
        let path = dir.join(format!("{upstream}.token.json"));
        let Some(bytes) = read_bytes(&path)? else {
            return Ok(None);
        };
        TokenRecord::decode(&bytes, &place(upstream), keys)
            .map_err(|e| StoreError::unread(upstream, path.display().to_string(), e))?;
        Ok(Some(TokenRecord::is_sealed(&bytes)))
    }

    fn token_path(&self, upstream: &str) -> PathBuf {
        self.dir.join(format!("{upstream}.token.json"))
    }

    fn quota_path(&self, upstream: &str) -> PathBuf {
        self.dir.join(format!("{upstream}.quota.json"))
    }

    fn lock_path(&self, upstream: &str, what: &str) -> PathBuf {
        self.dir.join(format!("{upstream}.{what}.lock"))
    }

    /// Under the quota lock, apply `change` to the stored counts of `upstream` seen from
    /// `period`, and write them back if it changed them.
    async fn update_quota<T: Send + 'static>(
        &self,
        upstream: &str,
        period: &Period,
        change: impl FnOnce(&mut Counts) -> T + Send + 'static,
    ) -> Result<T, StoreError> {
        let lock = flock(
            self.lock_path(upstream, "quota"),
            "quota",
            upstream,
            Duration::from_secs(10),
        )
        .await?;
        let path = self.quota_path(upstream);
        let period = *period;
        blocking(move || {
            let stored: BTreeMap<String, u64> = read_json(&path)?.unwrap_or_default();
            let mut counts = Counts {
                by_key: stored.clone(),
                period,
            };
            let out = change(&mut counts);
            if counts.by_key != stored {
                let bytes =
                    serde_json::to_vec_pretty(&counts.by_key).expect("a map always serialises");
                write_durably(&path, &bytes)?;
            }
            drop(lock);
            Ok(out)
        })
        .await
    }
}

/// `<name>.usage.json`: the day (its period key) and its use, `slot/key` → requests.
#[derive(Default, serde::Serialize, serde::Deserialize)]
struct DayUse {
    day: String,
    counts: BTreeMap<String, u64>,
}

/// The entry of `<name>.quota.json` that holds the version of its counts.
const VERSION: &str = "version";

/// The stored counts of one upstream (`<name>.quota.json`: period key → count), seen from the
/// period being counted.
struct Counts {
    by_key: BTreeMap<String, u64>,
    period: Period,
}

impl Counts {
    fn relation(&self, key: &str) -> Option<Relation> {
        Period::parse(key, &self.period).map(|p| self.period.relation(&p))
    }

    /// Whether a later period has started: this one is over.
    fn over(&self) -> bool {
        self.by_key
            .keys()
            .any(|k| self.relation(k) == Some(Relation::After))
    }

    /// What the period has counted: its own count and those of periods overlapping it.
    fn count(&self) -> u64 {
        self.by_key
            .iter()
            .filter(|(k, _)| matches!(self.relation(k), Some(Relation::Same | Relation::Overlaps)))
            .map(|(_, n)| n)
            .sum()
    }

    /// Move the counts of overlapping periods into this one, so they are never counted
    /// again by a later period they overlap too, and forget periods that ended before it.
    fn gather(&mut self) -> u64 {
        let count = self.count();
        let period = self.period;
        self.by_key.retain(|k, _| {
            let relation = Period::parse(k, &period).map(|p| period.relation(&p));
            matches!(relation, Some(Relation::After) | None)
        });
        self.set(count);
        count
    }

    /// Bump the version of the counts (see [`Seen`]); returns the new one.
    fn bump(&mut self) -> u64 {
        let version = self.by_key.entry(VERSION.to_owned()).or_insert(0);
        *version += 1;
        *version
    }

    fn set(&mut self, count: u64) {
        self.by_key.insert(self.period.key(), count);
    }

    /// Take `n` off what the period has counted, wherever it is kept (its own entry first).
    fn take(&mut self, mut n: u64) {
        let mut keys: Vec<String> = self
            .by_key
            .keys()
            .filter(|k| matches!(self.relation(k), Some(Relation::Same | Relation::Overlaps)))
            .cloned()
            .collect();
        keys.sort_by_key(|k| self.relation(k) != Some(Relation::Same));
        for key in keys {
            let count = self.by_key.get_mut(&key).expect("listed above");
            let taken = n.min(*count);
            *count -= taken;
            n -= taken;
        }
    }
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> StoreError + '_ {
    move |source| StoreError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// Where a record of this store lives: a state directory has no namespace of its own.
fn place(name: &str) -> Place<'_> {
    Place::of("", name)
}

/// Read a file; `None` when it does not exist.
fn read_bytes(path: &Path) -> Result<Option<Vec<u8>>, StoreError> {
    match fs::read(path) {
        Ok(b) => Ok(Some(b)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io_err(path)(e)),
    }
}

/// Read and parse a JSON document; `None` when it does not exist.
fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<Option<T>, StoreError> {
    let Some(bytes) = read_bytes(path)? else {
        return Ok(None);
    };
    serde_json::from_slice(&bytes)
        .map(Some)
        .map_err(|e| StoreError::Corrupt {
            path: path.display().to_string(),
            reason: e.to_string(),
        })
}

/// Replace `path` with `bytes` so that a crash leaves either the old or the new content.
fn write_durably(path: &Path, bytes: &[u8]) -> Result<(), StoreError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("state");
    let tmp = dir.join(format!(
        ".{name}.{}.{}.tmp",
        std::process::id(),
        rand::random::<u32>()
    ));
    let result = (|| {
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        owned_like_dir(&file, dir);
        file.write_all(bytes)?;
        file.sync_all()?;
        fs::rename(&tmp, path)?;
        File::open(dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result.map_err(io_err(path))
}

/// A file made in the state directory belongs to the directory's owner: `tollgate login`,
/// `token` or `rekey` run as root beside a service that runs as its own user must not leave
/// records or locks that user cannot read. Only root can give a file away; for anyone else it
/// is theirs already (their directory), or stays theirs.
fn owned_like_dir(file: &File, dir: &Path) {
    if let Ok(meta) = fs::metadata(dir) {
        let _ = std::os::unix::fs::fchown(file, Some(meta.uid()), Some(meta.gid()));
    }
}

/// Take an exclusive flock on `path`, polling until `wait` runs out.
async fn flock(
    path: PathBuf,
    what: &'static str,
    upstream: &str,
    wait: Duration,
) -> Result<File, StoreError> {
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .open(&path)
        .map_err(io_err(&path))?;
    owned_like_dir(&file, path.parent().unwrap_or(Path::new(".")));
    let start = Instant::now();
    loop {
        match file.try_lock() {
            Ok(()) => return Ok(file),
            Err(TryLockError::WouldBlock) if start.elapsed() < wait => {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(TryLockError::WouldBlock) => {
                return Err(StoreError::LockTimeout {
                    what,
                    upstream: upstream.to_owned(),
                    waited: wait,
                })
            }
            Err(TryLockError::Error(e)) => return Err(io_err(&path)(e)),
        }
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, StoreError> + Send + 'static,
) -> Result<T, StoreError> {
    tokio::task::spawn_blocking(f)
        .await
        .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()))
}

#[async_trait]
impl StateStore for FileStore {
    async fn load_token(&self, upstream: &str) -> Result<Option<TokenRecord>, StoreError> {
        let path = self.token_path(upstream);
        let read = blocking({
            let path = path.clone();
            move || read_bytes(&path)
        })
        .await?;
        let Some(bytes) = read else {
            return Ok(None);
        };
        TokenRecord::decode(&bytes, &place(upstream), &self.keys.load())
            .map(Some)
            .map_err(|e| StoreError::unread(upstream, path.display().to_string(), e))
    }

    async fn save_token(
        &self,
        upstream: &str,
        record: &TokenRecord,
        lock: &RefreshLock,
    ) -> Result<(), StoreError> {
        let path = self.token_path(upstream);
        let bytes = record
            .encode(&place(upstream), &self.keys.load())
            .into_bytes();
        let held = lock.share();
        blocking(move || {
            let written = write_durably(&path, &bytes);
            drop(held);
            written
        })
        .await
    }

    fn set_keys(&self, keys: Keys) {
        self.keys.store(Arc::new(keys));
    }

    async fn lock_refresh(
        &self,
        upstream: &str,
        wait: Duration,
        _hold: Duration,
    ) -> Result<RefreshLock, StoreError> {
        let file = flock(
            self.lock_path(upstream, "refresh"),
            "refresh",
            upstream,
            wait,
        )
        .await?;
        Ok(RefreshLock::new(0, None, Box::new(file)))
    }

    async fn reserve_quota(
        &self,
        upstream: &str,
        period: &Period,
        limit: u64,
        want: u64,
        seen: Seen,
    ) -> Result<Reservation, StoreError> {
        self.update_quota(upstream, period, move |counts| {
            let version = counts.bump();
            // Once a later period has started, this one is over: it grants nothing more.
            if counts.over() {
                let used = counts.count();
                return Reservation {
                    granted: 0,
                    used,
                    version,
                };
            }
            let mut spent = counts.gather();
            if version <= seen.version {
                // The file went back in time: take back what this process saw.
                spent = spent.max(seen.count);
            }
            let granted = want.min(limit.saturating_sub(spent));
            counts.set(spent + granted);
            Reservation {
                granted,
                used: spent + granted,
                version,
            }
        })
        .await
    }

    async fn release_quota(
        &self,
        upstream: &str,
        period: &Period,
        count: u64,
    ) -> Result<(), StoreError> {
        self.update_quota(upstream, period, move |counts| {
            counts.bump();
            counts.take(count)
        })
        .await
    }

    async fn add_usage(
        &self,
        upstream: &str,
        day: &Period,
        added: &[Used],
    ) -> Result<Vec<Used>, StoreError> {
        let wait = Duration::from_secs(10);
        let lock = flock(self.lock_path(upstream, "usage"), "usage", upstream, wait).await?;
        let path = self.dir.join(format!("{upstream}.usage.json"));
        let (day, added) = (day.key(), added.to_vec());
        blocking(move || {
            let mut stored: DayUse = read_json(&path)?.unwrap_or_default();
            if stored.day != day {
                stored = DayUse {
                    day,
                    counts: BTreeMap::new(),
                };
            }
            for used in &added {
                *stored.counts.entry(used.field()).or_insert(0) += used.count;
            }
            if !added.is_empty() {
                let bytes = serde_json::to_vec_pretty(&stored).expect("a map always serialises");
                write_durably(&path, &bytes)?;
            }
            drop(lock);
            let counts = stored.counts.iter();
            Ok(counts.filter_map(|(f, n)| Used::parse(f, *n)).collect())
        })
        .await
    }

    async fn quota_used(&self, upstream: &str, period: &Period) -> Result<u64, StoreError> {
        let path = self.quota_path(upstream);
        let period = *period;
        blocking(move || {
            let by_key: BTreeMap<String, u64> = read_json(&path)?.unwrap_or_default();
            Ok(Counts { by_key, period }.count())
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::secret::Secret;

    fn record(generation: u64) -> TokenRecord {
        TokenRecord {
            seed_hash: "h".into(),
            dpop_key: None,
            refresh_token: Some(Secret::from(format!("rt-{generation}"))),
            access_token: Some(Secret::from("at")),
            issued_at_ms: 1,
            expires_at_ms: 2,
            generation,
            login_at_ms: 0,
        }
    }

    #[tokio::test]
    async fn saves_atomically_with_private_permissions() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("state");
        let store = FileStore::open(&dir).unwrap();
        assert_eq!(
            fs::metadata(&dir).unwrap().permissions().mode() & 0o777,
            0o700
        );
        assert!(store.load_token("api").await.unwrap().is_none());

        let lock = store
            .lock_refresh("api", Duration::from_secs(1), Duration::MAX)
            .await
            .unwrap();
        store.save_token("api", &record(1), &lock).await.unwrap();
        store.save_token("api", &record(2), &lock).await.unwrap();
        let back = store.load_token("api").await.unwrap().unwrap();
        assert_eq!(back, record(2));
        let file = dir.join("api.token.json");
        assert_eq!(
            fs::metadata(&file).unwrap().permissions().mode() & 0o777,
            0o600
        );
        // No temp files left behind.
        let names: Vec<_> = fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert!(
            names.iter().all(|n| !n.to_string_lossy().ends_with(".tmp")),
            "{names:?}"
        );
    }

    #[tokio::test]
    async fn tightens_a_world_readable_directory() {
        let tmp = tempfile::tempdir().unwrap();
        fs::set_permissions(tmp.path(), fs::Permissions::from_mode(0o755)).unwrap();
        FileStore::open(tmp.path()).unwrap();
        assert_eq!(
            fs::metadata(tmp.path()).unwrap().permissions().mode() & 0o777,
            0o700
        );
    }

    #[tokio::test]
    async fn a_damaged_record_is_an_error_not_a_silent_reset() {
        let tmp = tempfile::tempdir().unwrap();
        let store = FileStore::open(tmp.path()).unwrap();
        fs::write(tmp.path().join("api.token.json"), b"{not json").unwrap();
        let err = store.load_token("api").await.unwrap_err();
        assert!(matches!(err, StoreError::Corrupt { .. }), "{err}");
    }

    #[tokio::test]
    async fn refresh_lock_excludes_a_second_holder_until_dropped() {
        let tmp = tempfile::tempdir().unwrap();
        let a = FileStore::open(tmp.path()).unwrap();
        let b = FileStore::open(tmp.path()).unwrap();
        let held = a
            .lock_refresh("api", Duration::from_secs(1), Duration::MAX)
            .await
            .unwrap();
        let err = b
            .lock_refresh("api", Duration::from_millis(100), Duration::MAX)
            .await
            .err()
            .unwrap();
        assert!(matches!(err, StoreError::LockTimeout { .. }));
        // Another upstream is independent.
        b.lock_refresh("other", Duration::from_millis(100), Duration::MAX)
            .await
            .unwrap();
        drop(held);
        b.lock_refresh("api", Duration::from_millis(500), Duration::MAX)
            .await
            .unwrap();
    }

    const DAY: u64 = 86_400_000;
    const HOUR: u64 = 3_600_000;

    fn day(n: u64, starts_h: u64) -> Period {
        let start = n * DAY + starts_h * HOUR;
        Period::new(start, start + DAY)
    }

    #[tokio::test]
    async fn quota_reservations_never_exceed_the_limit() {
        let tmp = tempfile::tempdir().unwrap();
        let store = FileStore::open(tmp.path()).unwrap();
        let granted = |granted: u64, used: u64| (granted, used);
        let (first, second) = (day(20_416, 0), day(20_417, 0));
        for (expected, used) in [(10, 10), (10, 20), (5, 25), (0, 25)] {
            assert_eq!(
                store
                    .reserve_quota("api", &first, 25, 10, Seen::default())
                    .await
                    .map(|r| (r.granted, r.used))
                    .unwrap(),
                granted(expected, used)
            );
        }
        assert_eq!(store.quota_used("api", &first).await.unwrap(), 25);
        // Unspent counts given back can be reserved again, by this process or another.
        store.release_quota("api", &first, 3).await.unwrap();
        assert_eq!(
            store
                .reserve_quota("api", &first, 25, 10, Seen::default())
                .await
                .map(|r| (r.granted, r.used))
                .unwrap(),
            granted(3, 25)
        );
        // A new day starts from zero and forgets the old one, which grants nothing more.
        assert_eq!(
            store
                .reserve_quota("api", &second, 25, 10, Seen::default())
                .await
                .map(|r| (r.granted, r.used))
                .unwrap(),
            granted(10, 10)
        );
        assert_eq!(store.quota_used("api", &first).await.unwrap(), 0);
        assert_eq!(
            store
                .reserve_quota("api", &first, 25, 10, Seen::default())
                .await
                .map(|r| (r.granted, r.used))
                .unwrap(),
            granted(0, 0)
        );
    }

    /// `day_starts` moved from 00:00 to 07:00 at 03:00, and back: the day in progress under
    /// either schedule carries what the other counted, and the next day starts afresh.
    #[tokio::test]
    async fn an_overlapping_day_of_another_schedule_carries_its_count() {
        let tmp = tempfile::tempdir().unwrap();
        let store = FileStore::open(tmp.path()).unwrap();
        let granted = |granted: u64, used: u64| (granted, used);
        let midnight = day(20_416, 0);
        let seven = day(20_415, 7); // 07:00 yesterday to 07:00 today: the day at 03:00
        assert_eq!(
            store
                .reserve_quota("api", &midnight, 100, 40, Seen::default())
                .await
                .map(|r| (r.granted, r.used))
                .unwrap(),
            granted(40, 40)
        );
        assert_eq!(store.quota_used("api", &seven).await.unwrap(), 40);
        assert_eq!(
            store
                .reserve_quota("api", &seven, 100, 70, Seen::default())
                .await
                .map(|r| (r.granted, r.used))
                .unwrap(),
            granted(60, 100),
            "never past the limit"
        );
        store.release_quota("api", &midnight, 10).await.unwrap();
        assert_eq!(store.quota_used("api", &seven).await.unwrap(), 90);
        assert_eq!(store.quota_used("api", &midnight).await.unwrap(), 90);
        // At 07:00 the next day of the new schedule is whole.
        let next = day(20_416, 7);
        assert_eq!(
            store
                .reserve_quota("api", &next, 100, 10, Seen::default())
                .await
                .map(|r| (r.granted, r.used))
                .unwrap(),
            granted(10, 10)
        );
    }

    /// A count an earlier version kept under the date its day started on is carried into
    /// that day, not forgotten.
    #[tokio::test]
    async fn an_earlier_versions_day_name_is_read() {
        let tmp = tempfile::tempdir().unwrap();
        fs::write(
            tmp.path().join("api.quota.json"),
            br#"{"day:2025-11-24": 30}"#,
        )
        .unwrap();
        let store = FileStore::open(tmp.path()).unwrap();
        assert_eq!(store.quota_used("api", &day(20_416, 7)).await.unwrap(), 30);
        assert_eq!(store.quota_used("api", &day(20_417, 7)).await.unwrap(), 0);
    }

    /// Records and locks belong to the state directory's owner whoever writes them: root
    /// running `tollgate token` beside a service user leaves nothing that user cannot read.
    #[tokio::test]
    async fn files_belong_to_the_directory_owner() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("state");
        let store = FileStore::open(&dir).unwrap();
        // Only root can give the directory away; then the files follow it.
        let nobody = 65534;
        let given = std::os::unix::fs::chown(&dir, Some(nobody), Some(nobody)).is_ok();
        let lock = store
            .lock_refresh("api", Duration::from_secs(1), Duration::from_secs(1))
            .await
            .unwrap();
        store.save_token("api", &record(1), &lock).await.unwrap();
        let owner = fs::metadata(&dir).unwrap().uid();
        for name in ["api.token.json", "api.refresh.lock"] {
            let uid = fs::metadata(dir.join(name)).unwrap().uid();
            assert_eq!(uid, owner, "{name}");
            if given {
                assert_eq!(uid, nobody, "{name}");
            }
        }
    }
}
