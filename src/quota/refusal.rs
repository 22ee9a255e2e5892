//! Why tollgate refuses a request itself: which limit ([`Reason`], with a label for metrics
//! and words for the status page), when to come back, and the words that say so — the
//! `detail` of the 429 problem+json.

use super::leased::Leased;
use super::queue::{Queue, Turned};
use super::{ceil_secs, http_date, Window};
use crate::store::StoreError;
use std::time::Duration;

/// Which limit refused a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    PerDay,
    PerSecond,
    PerMinute,
    PerHour,
    QueueFull,
    QueueTimeout,
    UpstreamThrottled,
    KeyBudget,
}

impl Reason {
    pub const ALL: [Reason; 8] = [
        Reason::PerDay,
        Reason::PerSecond,
        Reason::PerMinute,
        Reason::PerHour,
        Reason::QueueFull,
        Reason::QueueTimeout,
        Reason::UpstreamThrottled,
        Reason::KeyBudget,
    ];

    /// The `reason` label of `tollgate_rejected_total`.
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::PerDay => "per_day",
            Reason::PerSecond => "per_second",
            Reason::PerMinute => "per_minute",
            Reason::PerHour => "per_hour",
            Reason::QueueFull => "queue_full",
            Reason::QueueTimeout => "queue_timeout",
            Reason::UpstreamThrottled => "upstream_429",
            Reason::KeyBudget => "key_budget",
        }
    }

    /// The reason in words, after a count on the status page: "3 at the daily limit".
    pub fn words(self) -> &'static str {
        match self {
            Reason::PerDay => "at the daily limit",
            Reason::PerSecond => "at the limit per second",
            Reason::PerMinute => "at the limit per minute",
            Reason::PerHour => "at the limit per hour",
            Reason::QueueFull => "with the wait line full",
            Reason::QueueTimeout => "after waiting too long in line",
            Reason::UpstreamThrottled => "held back after the API answered 429",
            Reason::KeyBudget => "over a key's daily budget",
        }
    }

    /// The reason whose [`Reason::as_str`] label is `label`.
    pub fn of_label(label: &str) -> Option<Reason> {
        Reason::ALL.into_iter().find(|r| r.as_str() == label)
    }

    pub(super) fn of_window(name: &str) -> Reason {
        match name {
            "second" => Reason::PerSecond,
            "minute" => Reason::PerMinute,
            "hour" => Reason::PerHour,
            _ => Reason::PerDay,
        }
    }
}

/// A request tollgate answers with 429 itself.
#[derive(Debug, Clone)]
pub struct Refusal {
    pub reason: Reason,
    /// Whole seconds until a request would be admitted, at least 1.
    pub retry_after: u64,
    /// The window that refused, for the rate-limit headers.
    pub window: Option<Window>,
    pub detail: String,
}

/// Why a request was not admitted.
#[derive(Debug, thiserror::Error)]
pub enum QuotaError {
    #[error("{}", .0.detail)]
    Refused(Refusal),
    /// A count could not be reserved; nothing is sent rather than risk overspending.
    #[error("the quota could not be reserved, so the request was not sent: {0}")]
    Store(#[from] StoreError),
}

/// The upstream answered 429 and is held back for `left` more.
pub(super) fn held(left: Duration) -> Refusal {
    let detail = format!(
        "the upstream answered 429; tollgate holds requests back for {}s more",
        ceil_secs(left)
    );
    refusal(Reason::UpstreamThrottled, ceil_secs(left), None, detail)
}

/// A short window counted in memory (`peek`, as it is now) admits the next request in `wait`.
pub(super) fn rate(peek: Window, wait: Duration) -> Refusal {
    let detail = format!(
        "the limit of {} requests per {} is reached; the next is admitted in {}s",
        peek.policy.limit,
        peek.policy.name,
        ceil_secs(wait)
    );
    let window = Window {
        remaining: 0,
        reset: wait,
        ..peek
    };
    let reason = Reason::of_window(peek.policy.name);
    refusal(reason, ceil_secs(wait), Some(window), detail)
}

/// `window` (the day, or a short window counted in the store) has no count left at `now`.
pub(super) fn spent(window: &Leased, now: u64) -> Refusal {
    let reset = window.reset_in(now);
    let policy = window.policy();
    let detail = if policy.name == "day" {
        format!(
            "the daily quota of {} requests is spent; it resets at {}",
            policy.limit,
            http_date(now, reset)
        )
    } else {
        format!(
            "the limit of {} requests per {} is reached; the next {} starts in {}s",
            policy.limit,
            policy.name,
            policy.name,
            ceil_secs(reset)
        )
    };
    let shown = Window {
        remaining: 0,
        ..window.window(now)
    };
    refusal(
        Reason::of_window(policy.name),
        ceil_secs(reset),
        Some(shown),
        detail,
    )
}

/// Key `name` has spent its budget `day` at `now`.
pub(super) fn budget(name: &str, day: &Leased, now: u64) -> Refusal {
    let reset = day.reset_in(now);
    let detail = format!(
        "the key `{name}` has spent its budget of {} requests today; it resets at {} (other keys go on)",
        day.limit(),
        http_date(now, reset)
    );
    let shown = Window {
        remaining: 0,
        ..day.window(now)
    };
    refusal(Reason::KeyBudget, ceil_secs(reset), Some(shown), detail)
}

/// No place in flight or in line for the request.
pub(super) fn turned(turned: Turned, queue: &Queue) -> Refusal {
    let (reason, detail) = match turned {
        Turned::Full => (
            Reason::QueueFull,
            format!(
                "the limit of {} in flight is reached and all {} places in line are taken; try again shortly",
                queue.concurrency(),
                queue.places()
            ),
        ),
        Turned::TimedOut => (
            Reason::QueueTimeout,
            format!(
                "the request waited in line for {} (queue_timeout) and no request in flight finished",
                humantime::format_duration(queue.timeout())
            ),
        ),
    };
    refusal(reason, 1, None, detail)
}

/// `window` counts no more: the process is shutting down.
pub(super) fn closing(window: &Leased) -> Refusal {
    let detail = "tollgate is shutting down and counts no more requests; try again when it is back"
        .to_owned();
    refusal(Reason::of_window(window.policy().name), 1, None, detail)
}

fn refusal(reason: Reason, retry_after: u64, window: Option<Window>, detail: String) -> Refusal {
    Refusal {
        reason,
        retry_after: retry_after.max(1),
        window,
        detail,
    }
}
