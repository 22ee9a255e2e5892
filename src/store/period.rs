//! [`Period`]: the stretch of time a quota lease counts over (a day of `per_day`), and how a
//! store names it.
//!
//! A period is named by its span, not by the date it starts on, so that a day under one
//! `day_starts` is never mistaken for a day under another. Two periods of one upstream that
//! overlap are the same count seen through two schedules (a `day_starts` changed by a reload
//! or a restart): stores carry the count of one into the other ([`Period::relation`]), so the
//! change neither forgets what was spent (over-admitting) nor leaves a later day looking
//! spent (refusing a fresh day).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

const DAY_MS: u64 = 86_400_000;

/// `[start, end)` in Unix milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Period {
    pub start_ms: u64,
    pub end_ms: u64,
}

/// Where a stored period lies against the one being counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Relation {
    Same,
    /// Ended before this one started: over, and forgotten.
    Before,
    /// Started after this one ended: this one is over too.
    After,
    /// Overlaps it under another schedule: its count is carried into this one.
    Overlaps,
}

impl Period {
    pub fn new(start_ms: u64, end_ms: u64) -> Period {
        Period { start_ms, end_ms }
    }

    /// The number of the window that holds `unix_ms`, counting windows of `length_ms` from
    /// the first that starts `offset_ms` after the epoch (a day starting at `day_starts`).
    pub fn number(unix_ms: u64, length_ms: u64, offset_ms: u64) -> u64 {
        unix_ms.saturating_sub(offset_ms) / length_ms
    }

    /// Window number `n` of those [`Period::number`] counts.
    pub fn nth(n: u64, length_ms: u64, offset_ms: u64) -> Period {
        let start = n * length_ms + offset_ms;
        Period::new(start, start + length_ms)
    }

    /// The period of the same length and schedule that holds `unix_ms` (this one, or a later
    /// or earlier one).
    pub fn holding(&self, unix_ms: u64) -> Period {
        let length = self.end_ms - self.start_ms;
        Period::nth(
            Period::number(unix_ms, length, self.start_ms % length),
            length,
            self.start_ms % length,
        )
    }

    /// The name a store keeps the period under: its span in RFC 3339 (ISO 8601 interval).
    pub fn key(&self) -> String {
        format!("{}/{}", rfc3339(self.start_ms), rfc3339(self.end_ms))
    }

    /// A period back from its [`Period::key`]. Also reads the names earlier versions gave
    /// days, `day:YYYY-MM-DD`: the UTC date a day started on, at an hour not recorded, taken
    /// to be that of `like` (the schedule in force), as those versions compared days.
    pub fn parse(key: &str, like: &Period) -> Option<Period> {
        if let Some(date) = key.strip_prefix("day:") {
            let start = unix_ms(&format!("{date}T00:00:00Z"))? + like.start_ms % DAY_MS;
            return Some(Period::new(start, start + (like.end_ms - like.start_ms)));
        }
        let (start, end) = key.split_once('/')?;
        let period = Period::new(unix_ms(start)?, unix_ms(end)?);
        (period.start_ms < period.end_ms).then_some(period)
    }

    /// Where `other` lies against this period.
    pub fn relation(&self, other: &Period) -> Relation {
        if other == self {
            Relation::Same
        } else if other.end_ms <= self.start_ms {
            Relation::Before
        } else if other.start_ms >= self.end_ms {
            Relation::After
        } else {
            Relation::Overlaps
        }
    }
}

fn rfc3339(unix_ms: u64) -> humantime::Rfc3339Timestamp {
    humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_millis(unix_ms))
}

fn unix_ms(text: &str) -> Option<u64> {
    let at = humantime::parse_rfc3339(text).ok()?;
    at.duration_since(SystemTime::UNIX_EPOCH)
        .ok()
        .map(|d| d.as_millis() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    const H: u64 = 3_600_000;

    #[test]
    fn named_by_the_span_and_read_back() {
        // 2025-11-24 07:00 UTC to the next day.
        let start = 20_416 * DAY_MS + 7 * H;
        let day = Period::new(start, start + DAY_MS);
        assert_eq!(day.key(), "2025-11-24T07:00:00Z/2025-11-25T07:00:00Z");
        assert_eq!(Period::parse(&day.key(), &day), Some(day));
        let backwards = "2025-11-25T07:00:00Z/2025-11-24T07:00:00Z";
        assert_eq!(Period::parse(backwards, &day), None);
        assert_eq!(Period::parse("tomorrow", &day), None);
        // An earlier version's name: the day of the schedule in force that starts that date.
        assert_eq!(Period::parse("day:2025-11-24", &day), Some(day));
        let before = Period::parse("day:2025-11-23", &day).unwrap();
        assert_eq!(day.relation(&before), Relation::Before);
    }

    /// A day of a schedule moves on to the day of the same schedule that holds a later time.
    #[test]
    fn the_period_holding_a_time_keeps_the_schedule() {
        let start = 20_416 * DAY_MS + 7 * H;
        let day = Period::new(start, start + DAY_MS);
        assert_eq!(day.holding(start + 3 * H), day);
        let next = day.holding(start + DAY_MS + 20 * H);
        assert_eq!(next, Period::new(start + DAY_MS, start + 2 * DAY_MS));
        let minute = Period::new(60_000 * 5, 60_000 * 6);
        assert_eq!(
            minute.holding(60_000 * 9 + 1),
            Period::new(540_000, 600_000)
        );
    }

    #[test]
    fn days_of_two_schedules_overlap_and_consecutive_days_do_not() {
        let midnight = 20_416 * DAY_MS;
        let day = Period::new(midnight, midnight + DAY_MS);
        let next = Period::new(midnight + DAY_MS, midnight + 2 * DAY_MS);
        let seven = Period::new(midnight - 17 * H, midnight + 7 * H);
        assert_eq!(day.relation(&day), Relation::Same);
        assert_eq!(next.relation(&day), Relation::Before);
        assert_eq!(day.relation(&next), Relation::After);
        assert_eq!(day.relation(&seven), Relation::Overlaps);
        assert_eq!(seven.relation(&day), Relation::Overlaps);
    }
}
