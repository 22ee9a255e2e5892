//! Text made safe inside HTML: every dynamic string on the status page and in its chart
//! (upstream and key names, unready reasons) goes through [`escape`].

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
}
