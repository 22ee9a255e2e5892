//! One entry of `[upstream.inbound] keys`: a plain key, or a named key with a daily budget
//! of its own (`per_day`, or a `share` of the upstream's day), and how it reads from TOML.
//!
//! Must not: print a key (it is a [`Secret`]) or check anything across keys (that is
//! [`super::validate`]).

use crate::secret::Secret;
use serde::Deserialize;
use std::sync::Arc;

/// One entry of `[upstream.inbound] keys`: a plain string, or a table that names the key and
/// may give it a daily budget: `{ name = "etl", key = "${ETL_KEY}", per_day = 500 }` or
/// `{ …, share = "20%" }` (of the upstream's daily limit).
#[derive(Debug, Clone, PartialEq)]
pub struct InboundKey {
    /// How logs, `/status` and `/metrics` call the key; `None` for a plain string.
    pub name: Option<String>,
    pub key: Secret<String>,
    pub budget: Option<Budget>,
    /// The `[[upstream.identity]]` this key reaches the API as; `None`: `[upstream.auth]`.
    pub identity: Option<String>,
}

/// A key's daily budget, counted against it beside the upstream's own day.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Budget {
    PerDay(u64),
    /// A share of the upstream's daily limit, in hundredths of a percent (`"20%"` is 2000;
    /// above 0, at most 10,000).
    Share(u64),
}

impl InboundKey {
    /// How logs, `/status` and `/metrics` call the key at `index` of its list: its name, or
    /// `#N` for the Nth key (a plain string).
    pub fn label(&self, index: usize) -> Arc<str> {
        match &self.name {
            Some(name) => Arc::from(name.as_str()),
            None => Arc::from(format!("#{}", index + 1)),
        }
    }
}

impl Budget {
    /// The requests a day this budget allows, given the upstream's daily limit.
    pub fn per_day(self, daily_limit: Option<u64>) -> Option<u64> {
        match self {
            Budget::PerDay(n) => Some(n),
            Budget::Share(basis) => daily_limit.map(|l| l * basis / 10_000),
        }
    }
}

impl std::fmt::Display for Budget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Budget::PerDay(n) => write!(f, "{n} a day"),
            Budget::Share(basis) if basis % 100 == 0 => write!(f, "{}% of the day", basis / 100),
            Budget::Share(basis) => {
                let fraction = format!("{:02}", basis % 100);
                write!(
                    f,
                    "{}.{}% of the day",
                    basis / 100,
                    fraction.trim_end_matches('0')
                )
            }
        }
    }
}

impl<'de> Deserialize<'de> for InboundKey {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Named {
            name: String,
            key: Secret<String>,
            per_day: Option<u64>,
            share: Option<String>,
            identity: Option<String>,
        }
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Entry {
            Plain(Secret<String>),
            Named(Named),
        }
        use serde::de::Error;
        // Untagged errors say only that nothing matched: name what a key may be.
        let entry = Entry::deserialize(deserializer).map_err(|_| {
            D::Error::custom("a key is a string, or a table { name = \"…\", key = \"…\" } with optionally per_day = N or share = \"N%\", and identity = \"…\" (and no other keys)")
        })?;
        Ok(match entry {
            Entry::Plain(key) => InboundKey {
                name: None,
                key,
                budget: None,
                identity: None,
            },
            Entry::Named(n) => {
                let budget = match (n.per_day, n.share) {
                    (Some(_), Some(_)) => {
                        return Err(D::Error::custom(format!(
                            "key `{}` has both per_day and share: give it one budget",
                            n.name
                        )))
                    }
                    (Some(per_day), None) => Some(Budget::PerDay(per_day)),
                    (None, Some(share)) => Some(Budget::Share(
                        parse_share(&share).map_err(D::Error::custom)?,
                    )),
                    (None, None) => None,
                };
                InboundKey {
                    name: Some(n.name),
                    key: n.key,
                    budget,
                    identity: n.identity,
                }
            }
        })
    }
}

/// `"20%"` → 2000, `"2.5%"` → 250: a percentage above 0 and at most 100, with at most two
/// decimals, in hundredths of a percent (so shares are computed in integers).
fn parse_share(text: &str) -> Result<u64, String> {
    let basis = (|| {
        let number = text.trim().strip_suffix('%')?.trim();
        let (whole, fraction) = number.split_once('.').unwrap_or((number, ""));
        let digits = |d: &str| !d.is_empty() && d.bytes().all(|b| b.is_ascii_digit());
        if !digits(whole) || !(fraction.is_empty() || digits(fraction)) || fraction.len() > 2 {
            return None;
        }
        let fraction: u64 = format!("{fraction:0<2}").parse().ok()?;
        let basis = whole.parse::<u64>().ok()?.checked_mul(100)? + fraction;
        (1..=10_000).contains(&basis).then_some(basis)
    })();
    basis.ok_or_else(|| format!("share = {text:?}: write a percentage of the upstream's daily limit above 0 and at most 100, with at most two decimals, like \"20%\" or \"2.5%\""))
}
