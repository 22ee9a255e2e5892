//! What serde's words about a config mistake mean, said so the user knows what to write: the
//! key closest to an unknown one, the grant a login gives, how a duration or a size is
//! written.

/// `message` (serde's, about the key at `key`) with a hint of what to write instead.
pub(super) fn explain(key: &str, message: &str) -> String {
    // toml ends its messages with "\nin `table.key`", which the key in front already says.
    let message = message.split("\nin `").next().unwrap_or(message);
    if let Some((wrong, choices)) = unknown(message, "unknown field").filter(|(_, c)| !c.is_empty())
    {
        return match closest(wrong, &choices) {
            Some(near) => format!("unknown key `{wrong}`; did you mean `{near}`?"),
            None => format!(
                "unknown key `{wrong}`; the keys here are {}",
                choices.join(", ")
            ),
        };
    }
    if let Some((wrong, choices)) =
        unknown(message, "unknown variant").filter(|(_, c)| !c.is_empty())
    {
        if key.ends_with("auth.grant") && wrong == "authorization_code" {
            return "`authorization_code` is not a grant tollgate runs on its own: set grant = \"refresh_token\", configure [upstream.login], and run `tollgate login NAME` once; it does the authorization-code login and tollgate then keeps the refresh token it got".to_owned();
        }
        let expected = choices.join(", ");
        return match closest(wrong, &choices) {
            Some(near) => format!("`{wrong}` is not one of {expected}; did you mean `{near}`?"),
            None => format!("`{wrong}` is not one of {expected}"),
        };
    }
    message.to_owned()
}

/// The name in serde's "`what` `name`, expected one of `a`, `b`" and the choices.
fn unknown<'m>(message: &'m str, what: &str) -> Option<(&'m str, Vec<&'m str>)> {
    let rest = message.strip_prefix(what)?.trim_start();
    let rest = rest.strip_prefix('`')?;
    let (wrong, rest) = rest.split_once('`')?;
    let choices = rest.split('`').skip(1).step_by(2).collect::<Vec<_>>();
    Some((wrong, choices))
}

/// The choice at most a third of its letters away from `wrong` (a typo, a swapped pair, a
/// missing letter), if one alone is nearest.
fn closest<'c>(wrong: &str, choices: &[&'c str]) -> Option<&'c str> {
    let mut by_distance: Vec<(usize, &str)> =
        choices.iter().map(|c| (edits(wrong, c), *c)).collect();
    by_distance.sort_unstable();
    let (distance, near) = *by_distance.first()?;
    let tied = by_distance.get(1).is_some_and(|(d, _)| *d == distance);
    (distance <= (wrong.len() / 3).max(1) && !tied).then_some(near)
}

/// Edits (insert, delete, substitute, swap two neighbours) from `a` to `b`.
fn edits(a: &str, b: &str) -> usize {
    let (a, b): (Vec<char>, Vec<char>) = (a.chars().collect(), b.chars().collect());
    let mut d = vec![vec![0usize; b.len() + 1]; a.len() + 1];
    for (i, row) in d.iter_mut().enumerate() {
        row[0] = i;
    }
    for (j, cell) in d[0].iter_mut().enumerate() {
        *cell = j;
    }
    for i in 1..=a.len() {
        for j in 1..=b.len() {
            let cost = usize::from(a[i - 1] != b[j - 1]);
            let mut best = (d[i - 1][j] + 1)
                .min(d[i][j - 1] + 1)
                .min(d[i - 1][j - 1] + cost);
            if i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1] {
                best = best.min(d[i - 2][j - 2] + 1);
            }
            d[i][j] = best;
        }
    }
    d[a.len()][b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unknown_key_gets_the_closest_one() {
        let serde = "unknown field `client_secert`, expected one of `grant`, `client_id`, `client_secret`, `scope`";
        assert_eq!(
            explain("upstream[0].auth.client_secert", serde),
            "unknown key `client_secert`; did you mean `client_secret`?"
        );
        let serde = "unknown field `colour`, expected one of `grant`, `scope`";
        assert_eq!(
            explain("upstream[0].auth.colour", serde),
            "unknown key `colour`; the keys here are grant, scope"
        );
    }

    #[test]
    fn no_choices_or_a_tie_suggests_nothing() {
        assert_eq!(
            explain("x", "unknown field `a`, there are no fields"),
            "unknown field `a`, there are no fields"
        );
        assert_eq!(
            explain("x", "unknown variant `ab`, expected one of `ac`, `ad`"),
            "`ab` is not one of ac, ad"
        );
    }

    #[test]
    fn the_table_toml_appends_is_left_to_the_key_in_front() {
        assert_eq!(
            explain(
                "upstream[0].timeout",
                "30 has no unit\nin `upstream.timeout`\n"
            ),
            "30 has no unit"
        );
    }

    #[test]
    fn authorization_code_is_explained_and_other_variants_suggested() {
        let serde = "unknown variant `authorization_code`, expected one of `refresh_token`, `client_credentials`";
        let hint = explain("upstream[0].auth.grant", serde);
        assert!(hint.contains("grant = \"refresh_token\""), "{hint}");
        assert!(hint.contains("tollgate login"), "{hint}");
        let serde = "unknown variant `client_credential`, expected one of `refresh_token`, `client_credentials`";
        assert_eq!(
            explain("upstream[0].auth.grant", serde),
            "`client_credential` is not one of refresh_token, client_credentials; did you mean `client_credentials`?"
        );
    }
}
