//! Cutting a token request's secrets out of what the identity server answers.
//!
//! Identity servers and the gateways in front of them echo what they were sent: Spring puts
//! the refresh token in its `error_description`, others copy the whole form into `error`, or
//! URL-encode it, or quote the `Authorization` header. Every text of an answer that tollgate
//! shows (the error code, its description) passes through [`Scrubber::clean`] first, which
//! replaces each secret of the request in every form it was sent or may be echoed in (raw,
//! form-encoded, percent-encoded, both again, and the Basic credentials in base64), then
//! checks that no secret is left after undoing up to three layers of URL encoding: a text that
//! still holds one is withheld whole. Only then is the text cut to length, so a cut cannot
//! leave half a secret that no longer matches.

use base64::Engine;
use percent_encoding::{utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};

/// What replaces a secret.
const REDACTED: &str = "[redacted]";

/// What replaces a text that still holds a secret in a form not replaced.
const WITHHELD: &str = "[withheld: the identity server's text contained a secret of the request]";

/// Secrets shorter than this are not searched for: they would cut ordinary words.
const SHORTEST: usize = 4;

/// RFC 3986 unreserved characters stay as they are; everything else is `%XX`.
const COMPONENT: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// The secrets of one token request, in every form they may come back in.
pub struct Scrubber {
    /// The secrets as sent, to check a text against after decoding it.
    secrets: Vec<String>,
    /// Every form of every secret, longest first, so a longer form is replaced before a
    /// shorter one it contains.
    forms: Vec<String>,
}

impl Scrubber {
    /// The secrets of a request: the values of its secret form fields, and the Basic
    /// credentials it sent as `(client_id, client_secret)`.
    pub fn new<'a>(
        secrets: impl IntoIterator<Item = &'a str>,
        basic: Option<(&str, &str)>,
    ) -> Self {
        let secrets: Vec<String> = secrets
            .into_iter()
            .filter(|s| s.len() >= SHORTEST)
            .map(str::to_owned)
            .collect();
        let mut forms = Vec::new();
        for secret in &secrets {
            let form: String = form_urlencoded::byte_serialize(secret.as_bytes()).collect();
            let percent = utf8_percent_encode(secret, COMPONENT).to_string();
            for encoded in [form.clone(), percent.clone()] {
                let twice = utf8_percent_encode(&encoded, COMPONENT).to_string();
                let form_twice: String =
                    form_urlencoded::byte_serialize(encoded.as_bytes()).collect();
                forms.extend([lower_hex(&twice), twice, form_twice]);
                forms.push(lower_hex(&encoded));
                forms.push(encoded);
            }
            forms.push(secret.clone());
        }
        if let Some((id, secret)) = basic {
            let encode = |id: &str, secret: &str| {
                let engine = base64::engine::general_purpose::STANDARD;
                let padded = engine.encode(format!("{id}:{secret}"));
                let bare = padded.trim_end_matches('=').to_owned();
                [padded, bare]
            };
            let id_form: String = form_urlencoded::byte_serialize(id.as_bytes()).collect();
            let secret_form: String = form_urlencoded::byte_serialize(secret.as_bytes()).collect();
            forms.extend(encode(&id_form, &secret_form));
            forms.extend(encode(id, secret));
        }
        forms.retain(|f| f.len() >= SHORTEST);
        forms.sort_unstable_by_key(|f| std::cmp::Reverse(f.len()));
        forms.dedup();
        Scrubber { secrets, forms }
    }

    /// `text` without any secret of the request, cut to `max` characters.
    pub fn clean(&self, text: &str, max: usize) -> String {
        let mut clean = text.to_owned();
        for form in &self.forms {
            if clean.contains(form.as_str()) {
                clean = clean.replace(form.as_str(), REDACTED);
            }
        }
        if self.still_holds_a_secret(&clean) {
            return WITHHELD.to_owned();
        }
        let Some((mut cut, _)) = clean.char_indices().nth(max) else {
            return clean;
        };
        // Never through a marker: `[redac…` would hide that something was cut out.
        if let Some(start) = clean[..cut].rfind(REDACTED.as_bytes()[0] as char) {
            if start + REDACTED.len() > cut && clean[start..].starts_with(REDACTED) {
                cut = start;
            }
        }
        format!("{}…", &clean[..cut])
    }

    /// Whether `text`, or `text` with up to three layers of URL encoding undone, contains a
    /// secret.
    fn still_holds_a_secret(&self, text: &str) -> bool {
        let mut layer = text.to_owned();
        for _ in 0..4 {
            if self.secrets.iter().any(|s| layer.contains(s.as_str())) {
                return true;
            }
            let decoded: String = form_urlencoded::parse(layer.as_bytes())
                .flat_map(|(k, v)| {
                    // `parse` splits at `&` and `=`: join the pieces back with both kept, so
                    // a secret containing them is still found whole.
                    let mut piece = k.into_owned();
                    if !v.is_empty() {
                        piece.push('=');
                        piece.push_str(&v);
                    }
                    [piece, "&".to_owned()]
                })
                .collect();
            let percent = percent_encoding::percent_decode_str(&layer)
                .decode_utf8_lossy()
                .into_owned();
            if self.secrets.iter().any(|s| percent.contains(s.as_str())) {
                return true;
            }
            if decoded == layer {
                break;
            }
            layer = decoded;
        }
        false
    }
}

/// `%2F` → `%2f`: servers differ in the case of their hex digits.
fn lower_hex(encoded: &str) -> String {
    let mut out = String::with_capacity(encoded.len());
    let mut chars = encoded.chars();
    while let Some(c) = chars.next() {
        out.push(c);
        if c == '%' {
            out.extend(chars.by_ref().take(2).map(|h| h.to_ascii_lowercase()));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &str = "s3cr/t+v=l&ue x";
    const REFRESH: &str = "rt_AbC/+=&def";

    fn scrubber() -> Scrubber {
        Scrubber::new([SECRET, REFRESH, "ab"], Some(("my client", SECRET)))
    }

    fn form(s: &str) -> String {
        form_urlencoded::byte_serialize(s.as_bytes()).collect()
    }

    fn percent(s: &str) -> String {
        utf8_percent_encode(s, COMPONENT).to_string()
    }

    fn holds_secret(text: &str) -> bool {
        let s = scrubber();
        s.still_holds_a_secret(text)
    }

    #[test]
    fn every_form_of_every_secret_is_redacted() {
        let engine = base64::engine::general_purpose::STANDARD;
        let body = format!(
            "grant_type=refresh_token&refresh_token={}&client_id=my+client&client_secret={}",
            form(REFRESH),
            form(SECRET)
        );
        let echoes = [
            SECRET.to_owned(),
            form(SECRET),
            percent(SECRET),
            lower_hex(&percent(SECRET)),
            lower_hex(&form(SECRET)),
            percent(&form(SECRET)),
            form(&form(SECRET)),
            body.clone(),
            percent(&body),
            form(&body),
            lower_hex(&percent(&body)),
            format!(
                "Authorization: Basic {}",
                engine.encode(format!("my+client:{}", form(SECRET)))
            ),
            format!("Basic {}", engine.encode(format!("my client:{SECRET}"))),
            format!("got {} and {}", REFRESH, form(REFRESH)),
        ];
        for echo in echoes {
            let clean = scrubber().clean(&echo, 10_000);
            assert!(clean.contains(REDACTED), "{echo} → {clean}");
            assert!(!holds_secret(&clean), "{echo} → {clean}");
            for needle in [SECRET, REFRESH, "s3cr", "rt_AbC", "czNjci"] {
                assert!(!clean.contains(needle), "{echo} → {clean}");
            }
        }
    }

    #[test]
    fn a_form_not_replaced_withholds_the_text() {
        // Three layers of encoding are not among the forms replaced; the check finds it.
        let thrice = percent(&percent(&percent(SECRET)));
        assert_eq!(scrubber().clean(&format!("x {thrice} y"), 10_000), WITHHELD);
    }

    #[test]
    fn the_cut_comes_after_the_scrub() {
        let text = format!("{}{SECRET}{}", "a".repeat(185), "b".repeat(20));
        let clean = scrubber().clean(&text, 200);
        assert!(!clean.contains("s3cr"), "{clean}");
        assert!(clean.contains(REDACTED), "{clean}");
        assert_eq!(clean.chars().count(), 201);
        assert!(clean.ends_with('…'));
        // A cut through the marker moves before it.
        let text = format!("{}{SECRET} and more", "a".repeat(195));
        assert_eq!(
            scrubber().clean(&text, 200),
            format!("{}…", "a".repeat(195))
        );
        // Ordinary text and short values are left alone.
        assert_eq!(
            scrubber().clean("ab invalid_grant", 200),
            "ab invalid_grant"
        );
    }
}
