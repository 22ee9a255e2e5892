//! Token records in Redis: the `token` hash of an upstream, its `record` written and read
//! through [`TokenRecord::encode`] and [`TokenRecord::decode`] (sealed with the store's keys
//! when `[state] key` is set, bound to the store's prefix), saved by `save.lua` only under the
//! lock's fence and only forward in the lineage.

use super::RedisStore;
use crate::store::{Place, RefreshLock, StoreError, TokenRecord};
use redis::AsyncCommands;

impl RedisStore {
    /// Where the record kept under `name` lives: under this store's prefix.
    fn place<'a>(&'a self, name: &'a str) -> Place<'a> {
        Place::of(&self.prefix, name)
    }

    /// `upstream`'s record, opened with the store's keys; remembered for a write-back.
    pub(super) async fn read_record(
        &self,
        upstream: &str,
    ) -> Result<Option<TokenRecord>, StoreError> {
        let key = self.key(upstream, "token");
        let (json, fence): (Option<String>, Option<u64>) = self
            .run(|mut c| {
                let key = &key;
                async move { c.hmget(key, &["record", "fence"]).await }
            })
            .await?;
        let record: Option<TokenRecord> = json
            .map(|json| {
                let keys = self.keys.load();
                TokenRecord::decode(json.as_bytes(), &self.place(upstream), &keys).map_err(|e| {
                    let at = format!("{} key {}", self.shown, self.key(upstream, "token"));
                    StoreError::unread(upstream, at, e)
                })
            })
            .transpose()?;
        if let Some(record) = &record {
            self.recovery
                .saw_record(upstream, record, fence.unwrap_or(0));
        }
        Ok(record)
    }

    /// `save.lua`: `record` as `upstream`'s, saved under the lock of `fence` (`save`), sealed
    /// again at the same place (`reseal`), or written back after a loss (`restore`: `fence`
    /// is the one it was saved under). Its answer: `ok`, or why not.
    pub(super) async fn write_record(
        &self,
        upstream: &str,
        record: &TokenRecord,
        fence: u64,
        mode: &str,
    ) -> Result<String, StoreError> {
        let json = record.encode(&self.place(upstream), &self.keys.load());
        let mut invocation = self.scripts.save.key(self.key(upstream, "token"));
        invocation
            .key(self.key(upstream, "fence"))
            .arg(fence)
            .arg(record.generation)
            .arg(&record.seed_hash)
            .arg(json)
            .arg(self.key(upstream, "generation"))
            .arg(record.login_at_ms)
            .arg(mode);
        self.run(|mut c| {
            let invocation = &invocation;
            async move { invocation.invoke_async(&mut c).await }
        })
        .await
    }

    /// [`RedisStore::write_record`] under `lock`: a later holder's record wins over it.
    pub(super) async fn write_under_lock(
        &self,
        upstream: &str,
        record: &TokenRecord,
        lock: &RefreshLock,
        mode: &str,
    ) -> Result<(), StoreError> {
        match self
            .write_record(upstream, record, lock.fence, mode)
            .await?
            .as_str()
        {
            "ok" => Ok(()),
            _ => Err(StoreError::Superseded {
                upstream: upstream.to_owned(),
            }),
        }
    }
}
