//! When the day's limit will be reached at the current pace, from the day's requests per
//! 15-minute slot. Pure arithmetic on what [`super::Usage`] read; no clock of its own.

use crate::store::Period;
use std::time::Duration;

/// The length of one slot of the day's use.
pub const SLOT_MS: u64 = 15 * 60 * 1000;

/// How far back the pace is measured: the last hour (or the day so far, if shorter).
const PACE_MS: u64 = 60 * 60 * 1000;

/// Below this much of the day, there is no pace to speak of yet.
const MIN_PACE_MS: u64 = 60 * 1000;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Forecast {
    /// The limit is already reached.
    Reached,
    /// At this pace the limit is reached at this time (Unix ms), before the day ends.
    At(u64),
    /// At this pace (or with no pace yet) the day ends first.
    NotToday,
}

/// Project when `limit` is reached, from `used` (the day so far) and `slots` (requests per
/// slot of `day`, for the pace) at `now`.
///
/// The pace is the rate of the last hour — the slots it covers, the slot at its start in
/// proportion to its overlap, the current slot as far as it has run — so a quiet morning does
/// not hide a busy afternoon.
pub fn forecast(slots: &[u64], day: &Period, used: u64, limit: u64, now: u64) -> Forecast {
    if used >= limit {
        return Forecast::Reached;
    }
    let now = now.clamp(day.start_ms, day.end_ms);
    let from = now.saturating_sub(PACE_MS).max(day.start_ms);
    if now - from < MIN_PACE_MS {
        return Forecast::NotToday;
    }
    let mut recent = 0.0;
    for (i, n) in slots.iter().enumerate() {
        let start = day.start_ms + i as u64 * SLOT_MS;
        // The part of the slot that has run, and the part of that within the pace window.
        let end = (start + SLOT_MS).min(now);
        if end <= start || end <= from {
            continue;
        }
        let within = end - start.max(from);
        recent += *n as f64 * within as f64 / (end - start) as f64;
    }
    let per_ms = recent / (now - from) as f64;
    if per_ms <= 0.0 {
        return Forecast::NotToday;
    }
    let at = now as f64 + (limit - used) as f64 / per_ms;
    if at >= day.end_ms as f64 {
        Forecast::NotToday
    } else {
        Forecast::At(at.round() as u64)
    }
}

/// The forecast in words: "at this pace the limit is reached at 16:40 UTC", "not today".
pub fn describe(forecast: Option<Forecast>) -> String {
    match forecast {
        None => "no daily limit".into(),
        Some(Forecast::Reached) => "the limit is reached".into(),
        Some(Forecast::NotToday) => "at this pace the limit is not reached today".into(),
        Some(Forecast::At(ms)) => {
            let time = humantime::format_rfc3339_seconds(
                std::time::UNIX_EPOCH + Duration::from_millis(ms),
            )
            .to_string();
            // 2026-12-02T16:40:00Z → 16:40 UTC
            format!("at this pace the limit is reached at {} UTC", &time[11..16])
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOUR: u64 = 60 * 60 * 1000;

    fn day() -> Period {
        let start = 20_416 * 86_400_000;
        Period::new(start, start + 24 * HOUR)
    }

    #[test]
    fn a_steady_pace_projects_the_time() {
        // 100 requests per slot (400 an hour) from 00:00 to 08:00: 3,200 used of 8,000; the
        // 4,800 left take 12 more hours: 20:00.
        let slots = vec![100; 32];
        let now = day().start_ms + 8 * HOUR;
        assert_eq!(
            forecast(&slots, &day(), 3_200, 8_000, now),
            Forecast::At(day().start_ms + 20 * HOUR)
        );
        // With 10,000 a day it would take 17 more hours: past midnight.
        assert_eq!(
            forecast(&slots, &day(), 3_200, 10_000, now),
            Forecast::NotToday
        );
    }

    #[test]
    fn the_pace_is_the_last_hour_and_the_slot_in_progress_counts_as_far_as_it_ran() {
        // Quiet until 09:00, then 300 in 09:00–09:15 and 150 in the 7.5 minutes of the slot
        // in progress: 450 in the last hour, so 450/h; 550 left of 1,000 → 1 h 13 m 20 s.
        let mut slots = vec![0; 38];
        slots[36] = 300;
        slots[37] = 150;
        let now = day().start_ms + 9 * HOUR + SLOT_MS + SLOT_MS / 2;
        let at = now + 550 * HOUR / 450;
        assert_eq!(forecast(&slots, &day(), 450, 1_000, now), Forecast::At(at));
    }

    #[test]
    fn an_idle_day_a_fresh_day_and_a_spent_day() {
        let now = day().start_ms + 10 * HOUR;
        assert_eq!(
            forecast(&[5; 8], &day(), 40, 100, now),
            Forecast::NotToday,
            "idle for the last hour"
        );
        assert_eq!(
            forecast(&[50], &day(), 50, 100, day().start_ms + 30_000),
            Forecast::NotToday
        );
        assert_eq!(
            forecast(&[60, 40], &day(), 100, 100, now),
            Forecast::Reached
        );
        // The quota counts more than the tally (a crashed replica's lease): reached all the same.
        assert_eq!(forecast(&[60], &day(), 100, 100, now), Forecast::Reached);
    }

    #[test]
    fn the_forecast_in_words() {
        let at = 20_416 * 86_400_000 + 16 * HOUR + 40 * 60_000;
        assert_eq!(
            describe(Some(Forecast::At(at))),
            "at this pace the limit is reached at 16:40 UTC"
        );
        assert_eq!(
            describe(Some(Forecast::NotToday)),
            "at this pace the limit is not reached today"
        );
    }
}
