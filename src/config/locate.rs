//! Where in the file a problem is: key paths (`upstream[0].auth.grant`) built while loading,
//! and the line of the file each path points at, found in the TOML's spans.

use super::Problem;

pub(super) fn join_path(path: &[String]) -> String {
    let mut out = String::new();
    for seg in path {
        if !seg.starts_with('[') && !out.is_empty() {
            out.push('.');
        }
        out.push_str(seg);
    }
    out
}

pub(super) fn render_path(path: &serde_path_to_error::Path) -> String {
    use serde_path_to_error::Segment;
    let segs: Vec<String> = path
        .iter()
        .filter_map(|seg| match seg {
            Segment::Seq { index } => Some(format!("[{index}]")),
            Segment::Map { key } => Some(if key == "upstreams" {
                "upstream".to_owned()
            } else {
                key.clone()
            }),
            Segment::Enum { variant } => Some(variant.clone()),
            Segment::Unknown => None,
        })
        .collect();
    join_path(&segs)
}

/// Fill in the line of each problem from the key path.
pub(super) fn locate(text: &str, mut problems: Vec<Problem>) -> Vec<Problem> {
    let doc = toml_edit::ImDocument::parse(text).ok();
    for p in &mut problems {
        if p.line.is_none() {
            p.line = doc
                .as_ref()
                .and_then(|d| key_offset(d.as_table(), &split_path(&p.key)))
                .map(|off| line_of_offset(text, off));
        }
    }
    // In the order of the file, as an editor shows it; those without a line last.
    problems.sort_by_key(|p| p.line.unwrap_or(usize::MAX));
    problems
}

enum Seg<'a> {
    Key(&'a str),
    Index(usize),
}

fn split_path(path: &str) -> Vec<Seg<'_>> {
    let mut segs = Vec::new();
    for part in path.split('.') {
        let (key, mut rest) = match part.find('[') {
            Some(at) => (&part[..at], &part[at..]),
            None => (part, ""),
        };
        if !key.is_empty() {
            segs.push(Seg::Key(key));
        }
        while let Some(end) = rest.find(']') {
            if let Ok(i) = rest[1..end].parse() {
                segs.push(Seg::Index(i));
            }
            rest = &rest[end + 1..];
        }
    }
    segs
}

/// Byte offset of the deepest key of `path` that exists in the document.
fn key_offset(table: &dyn toml_edit::TableLike, path: &[Seg<'_>]) -> Option<usize> {
    let Some((Seg::Key(name), rest)) = path.split_first() else {
        return None;
    };
    let (key, item) = table.get_key_value(name)?;
    let here = key.span().map(|s| s.start);
    let deeper = match rest.first() {
        None => None,
        Some(Seg::Index(i)) => {
            let tail = &rest[1..];
            if let Some(aot) = item.as_array_of_tables() {
                aot.get(*i)
                    .and_then(|t| key_offset(t, tail).or_else(|| t.span().map(|s| s.start)))
            } else if let Some(arr) = item.as_array() {
                arr.get(*i).and_then(|v| {
                    v.as_inline_table()
                        .and_then(|t| key_offset(t, tail))
                        .or_else(|| v.span().map(|s| s.start))
                })
            } else {
                None
            }
        }
        Some(Seg::Key(_)) => item.as_table_like().and_then(|t| key_offset(t, rest)),
    };
    deeper.or(here)
}

pub(super) fn line_of_offset(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())].matches('\n').count() + 1
}

#[cfg(test)]
mod tests {
    use super::super::test_support::{error_of, GOOD};

    #[test]
    fn unknown_key_names_key_and_line() {
        let text = GOOD.replace("timeout = \"30s\"", "timeout = \"30s\"\ncolour = \"red\"");
        let err = error_of(&text);
        assert!(
            err.contains("unknown key `colour`; the keys here are name, listen"),
            "{err}"
        );
        assert!(err.starts_with("t.toml:"), "{err}");
        assert!(err.contains("upstream[0]"), "{err}");
    }
}
