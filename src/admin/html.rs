//! Text made safe inside HTML: every dynamic string on the status page and in its chart
//! (upstream and key names, unready reasons, refusal reasons not known to the page) goes
//! through [`escape`]. For tests, the text a reader sees of a page ([`visible_text`]) and the
//! identifiers left in it ([`snake_case_words`]).

/// `text` made safe inside HTML text and attribute values.
pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// The text a reader sees of `html`: without its `<style>` and its tags, entities decoded
/// (for tests of the page: a word it must or must not show).
pub fn visible_text(html: &str) -> String {
    let mut rest = html;
    let mut text = String::new();
    while let Some(open) = rest.find('<') {
        text.push_str(&rest[..open]);
        rest = &rest[open..];
        let end = if rest.starts_with("<style") {
            rest.find("</style>")
                .map_or(rest.len(), |e| e + "</style>".len())
        } else {
            rest.find('>').map_or(rest.len(), |e| e + 1)
        };
        rest = &rest[end..];
    }
    text.push_str(rest);
    [
        ("&lt;", "<"),
        ("&gt;", ">"),
        ("&quot;", "\""),
        ("&#39;", "'"),
        ("&amp;", "&"),
    ]
    .iter()
    .fold(text, |text, (entity, c)| text.replace(entity, c))
}

/// The words of `text` that are identifiers joined by `_` (`key_budget`, `per_day`): what a
/// page meant for people must not show.
pub fn snake_case_words(text: &str) -> Vec<String> {
    text.split(|c: char| !(c.is_alphanumeric() || c == '_'))
        .filter(|w| {
            let parts: Vec<&str> = w.split('_').collect();
            parts.len() > 1 && parts.iter().all(|p| !p.is_empty())
        })
        .map(str::to_owned)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Markup characters in a dynamic string come out as entities, other text as it was.
    #[test]
    fn escape_replaces_markup_characters() {
        assert_eq!(
            escape(r#"<script>alert("x") & 'y'</script>"#),
            "&lt;script&gt;alert(&quot;x&quot;) &amp; &#39;y&#39;&lt;/script&gt;"
        );
        assert_eq!(
            escape("token endpoint: 503 — ça"),
            "token endpoint: 503 — ça"
        );
    }

    #[test]
    fn visible_text_drops_tags_and_style_and_finds_identifiers() {
        let html = "<style>td{x_y:1}</style><p class=\"a_b\">2 &lt; 3, per_day &amp; _x</p>";
        let text = visible_text(html);
        assert_eq!(text, "2 < 3, per_day & _x");
        assert_eq!(snake_case_words(&text), ["per_day"]);
    }
}
