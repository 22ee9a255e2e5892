//! The counts of an upstream's windows on Redis (`days.lua`): reserving a lease, giving it
//! back, reading a window's count, and the day's tally by key (`usage.lua`). A reservation
//! names the epoch its replica knows, so that none is granted from a count the store lost
//! (see [`super::recovery`]); what each returns is remembered to be written back.
//!
//! Must not: grant past a limit (the scripts never do), or ask a give-back or a tally twice.

use super::RedisStore;
use crate::store::{Period, Reservation, Seen, StoreError, Used};
use std::time::Duration;

impl RedisStore {
    /// The hash that counts `upstream`'s windows as long as `period`: windows of different
    /// lengths never share a count.
    pub(super) fn counts_key(&self, upstream: &str, period: &Period) -> String {
        match (period.end_ms - period.start_ms) / 1000 {
            86_400 => self.key(upstream, "days"),
            length_s => self.key(upstream, &format!("per:{length_s}")),
        }
    }

    /// One operation of `days.lua` on the counts hash `counts`; `epoch` is what a reservation
    /// names (see [`recovery`]).
    pub(super) async fn days<T: redis::FromRedisValue>(
        &self,
        counts: &str,
        operation: &str,
        period: &Period,
        args: &[u64],
        epoch: &str,
    ) -> Result<T, StoreError> {
        let mut invocation = self.scripts.days.key(counts);
        invocation
            .key(self.store_key("epoch"))
            .key(self.store_key("recovery:counts"))
            .arg(operation)
            .arg(period.start_ms)
            .arg(period.end_ms);
        for a in args {
            invocation.arg(*a);
        }
        invocation.arg(epoch);
        let run = |mut c| {
            let invocation = &invocation;
            async move { invocation.invoke_async(&mut c).await }
        };
        // A give-back asked twice would free its counts twice.
        if operation == "release" {
            self.run_once(run).await
        } else {
            self.run(run).await
        }
    }

    /// [`StateStore::reserve_quota`]: a lease of `upstream`'s window `period`, under the epoch
    /// this replica knows.
    pub(super) async fn reserve(
        &self,
        upstream: &str,
        period: &Period,
        limit: u64,
        want: u64,
        seen: Seen,
    ) -> Result<Reservation, StoreError> {
        let counts = self.counts_key(upstream, period);
        let args = [limit, want, seen.count, seen.version];
        let mut looked = false;
        loop {
            let epoch = self.recovery.epoch();
            let (granted, used, version): (i64, i64, i64) =
                self.days(&counts, "reserve", period, &args, &epoch).await?;
            match granted {
                // Not the epoch this replica knows: look at it (a loss is written back), then
                // ask again, once.
                -1 if !looked => {
                    looked = true;
                    self.check_epoch().await?;
                }
                -1 => {
                    return Err(self.unreachable(
                        "the store's epoch changed again at once; asking again shortly".into(),
                    ))
                }
                -2 => {
                    let left = Duration::from_millis(used.max(0) as u64);
                    self.recovery.recovering_for(left);
                    return Err(StoreError::Recovering {
                        why: "the state store lost its data a moment ago; no count is reserved while the replicas write back what they know",
                        left,
                    });
                }
                _ => {
                    let (granted, used, version) = (granted as u64, used as u64, version as u64);
                    self.recovery.saw_count(&counts, period, used, version);
                    return Ok(Reservation {
                        granted,
                        used,
                        version,
                    });
                }
            }
        }
    }

    /// [`StateStore::release_quota`]: counts given back, unless the store lost its data since.
    pub(super) async fn release(
        &self,
        upstream: &str,
        period: &Period,
        count: u64,
    ) -> Result<(), StoreError> {
        let counts = self.counts_key(upstream, period);
        let epoch = self.recovery.epoch();
        let released: i64 = self
            .days(&counts, "release", period, &[count], &epoch)
            .await?;
        if released < 0 {
            // The store lost its data since these counts were reserved: the count written
            // back may not hold them, so they stay spent (under-admission, never over).
            tracing::info!(%upstream, count, "not given back: the state store lost its data since they were reserved");
        }
        Ok(())
    }

    /// [`StateStore::add_usage`]: the day's tally by key and slot.
    pub(super) async fn tally(
        &self,
        upstream: &str,
        day: &Period,
        added: &[Used],
    ) -> Result<Vec<Used>, StoreError> {
        let key = self.key(upstream, &format!("use:{}", day.start_ms));
        let mut invocation = self.scripts.usage.key(key);
        invocation.arg(2 * (day.end_ms - day.start_ms));
        for used in added {
            invocation.arg(used.field()).arg(used.count);
        }
        // Asked twice, the tally would count these requests twice.
        let fields: std::collections::BTreeMap<String, u64> = self
            .run_once(|mut c| {
                let invocation = &invocation;
                async move { invocation.invoke_async(&mut c).await }
            })
            .await?;
        Ok(fields
            .iter()
            .filter_map(|(f, n)| Used::parse(f, *n))
            .collect())
    }
}
