//! How durations (`"30s"`), sizes (`"1MiB"`), URLs and times of day (`"06:30"`) are written
//! in the config, and the serde adapters that read them; each error says how to write it.

use bytesize::ByteSize;
use serde::{Deserialize, Deserializer};
use std::time::Duration;
use url::Url;

pub(super) fn de_duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let text = d.deserialize_any(Written {
        what: "a duration",
        unit: "s",
        units: "ms, s, m, h",
    })?;
    parse_duration(&text).map_err(serde::de::Error::custom)
}

/// A duration or a size as written: a string. A bare number is refused saying how to write
/// it, with the unit it lacks.
struct Written {
    what: &'static str,
    unit: &'static str,
    units: &'static str,
}

impl Written {
    /// `number` as written, and the example to write instead (never negative).
    fn no_unit<E: serde::de::Error>(&self, number: impl std::fmt::Display, example: f64) -> E {
        E::custom(format!(
            "{number} has no unit: write {} as a string with one, like \"{example}{}\" ({})",
            self.what, self.unit, self.units
        ))
    }
}

impl serde::de::Visitor<'_> for Written {
    type Value = String;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        write!(
            f,
            "{} written as a string, like \"30{}\"",
            self.what, self.unit
        )
    }

    fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<String, E> {
        Ok(v.to_owned())
    }

    fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<String, E> {
        Err(self.no_unit(v, v.unsigned_abs() as f64))
    }

    fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<String, E> {
        Err(self.no_unit(v, v as f64))
    }

    fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<String, E> {
        Err(self.no_unit(v, v.abs()))
    }
}

pub(super) fn de_opt_duration<'de, D: Deserializer<'de>>(
    d: D,
) -> Result<Option<Duration>, D::Error> {
    de_duration(d).map(Some)
}

pub(super) fn de_size<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    let text = d.deserialize_any(Written {
        what: "a size",
        unit: "B",
        units: "B, KiB, MiB, GiB",
    })?;
    parse_size(&text).map_err(serde::de::Error::custom)
}

pub(super) fn de_http_url<'de, D: Deserializer<'de>>(d: D) -> Result<Url, D::Error> {
    let text = String::deserialize(d)?;
    parse_http_url(&text).map_err(serde::de::Error::custom)
}

/// `"30s"`, `"5m"`, `"1h 30m"`.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    humantime::parse_duration(text).map_err(|e| {
        format!("`{text}` is not a duration ({e}); write a number and a unit, like \"30s\", \"5m\" or \"1h\"")
    })
}

/// `"1MiB"`, `"512KiB"`, `"100000"` (bytes).
pub fn parse_size(text: &str) -> Result<u64, String> {
    text.trim()
        .parse::<ByteSize>()
        .map(|s| s.as_u64())
        .map_err(|e| {
            format!("`{text}` is not a size ({e}); write a number and a unit, like \"1MiB\" or \"512KiB\"")
        })
}

/// A size as a person writes it: `1 MiB`, `64 KiB`, `2 MB`, or bytes — the unit that divides
/// it exactly, binary first (what [`parse_size`] read, in the form it was most likely written).
pub fn show_size(bytes: u64) -> String {
    const UNITS: [(u64, &str); 6] = [
        (1 << 30, "GiB"),
        (1 << 20, "MiB"),
        (1 << 10, "KiB"),
        (1_000_000_000, "GB"),
        (1_000_000, "MB"),
        (1_000, "KB"),
    ];
    match UNITS
        .iter()
        .find(|(unit, _)| bytes > 0 && bytes.is_multiple_of(*unit))
    {
        Some((unit, name)) => format!("{} {name}", bytes / unit),
        None => format!("{bytes} bytes"),
    }
}

/// An absolute `http` or `https` URL with a host.
pub fn parse_http_url(text: &str) -> Result<Url, String> {
    let url = Url::parse(text).map_err(|e| {
        format!(
            "`{text}` is not a URL ({e}); write it in full, like \"https://api.example.com/base\""
        )
    })?;
    if url.scheme() != "http" && url.scheme() != "https" {
        return Err(format!(
            "`{text}` has scheme `{}`; only http and https are supported",
            url.scheme()
        ));
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err(format!("`{text}` has no host"));
    }
    if !url.username().is_empty() || url.password().is_some() {
        // Credentials in a URL end up in logs, in `check` output and in Host headers.
        return Err("must not contain user:password@; use the auth keys for credentials".into());
    }
    Ok(url)
}

pub(super) fn de_day_starts<'de, D: Deserializer<'de>>(d: D) -> Result<u32, D::Error> {
    let text = String::deserialize(d)?;
    parse_day_starts(&text).map_err(serde::de::Error::custom)
}

/// `HH:MM` (UTC) as seconds after midnight.
pub fn parse_day_starts(text: &str) -> Result<u32, String> {
    let bad = || format!("`{text}` is not a time of day; write it as HH:MM in UTC, e.g. \"00:00\"");
    let (h, m) = text.split_once(':').ok_or_else(bad)?;
    if h.len() != 2 || m.len() != 2 {
        return Err(bad());
    }
    let h: u32 = h.parse().map_err(|_| bad())?;
    let m: u32 = m.parse().map_err(|_| bad())?;
    if h > 23 || m > 59 {
        return Err(bad());
    }
    Ok(h * 3600 + m * 60)
}

#[cfg(test)]
mod tests {
    use super::super::test_support::{error_of, GOOD};
    use super::{parse_size, show_size};

    #[test]
    fn sizes_are_shown_as_written() {
        for text in ["1 MiB", "64 KiB", "2 MB", "1 GiB", "1500 bytes", "3 KB"] {
            let written = text.replace(' ', "").replace("bytes", "");
            assert_eq!(show_size(parse_size(&written).unwrap()), text, "{written}");
        }
    }

    #[test]
    fn bad_duration_names_key() {
        let err = error_of(&GOOD.replace("\"30s\"", "\"thirty seconds\""));
        assert!(err.contains("upstream[0].timeout"), "{err}");
        assert!(err.contains("not a duration"), "{err}");
        let line = GOOD.lines().position(|l| l.starts_with("timeout")).unwrap() + 1;
        assert!(err.starts_with(&format!("t.toml:{line}:")), "{err}");
    }

    #[test]
    fn bad_url_names_key() {
        let err = error_of(&GOOD.replace("https://id.example.com/connect/token", "id.example.com"));
        assert!(err.contains("upstream[0].auth.token_url"), "{err}");
        assert!(err.contains("not a URL"), "{err}");
        let err = error_of(&GOOD.replace("https://api.example.com/v1", "ftp://x/"));
        assert!(err.contains("upstream[0].url"), "{err}");
    }
}
