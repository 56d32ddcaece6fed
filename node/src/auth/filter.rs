//! Set algebra over MQTT topic filters, each filter read as the set of topic names it matches.
//!
//! The matching rules: `+` matches exactly one level (possibly empty), `#` matches any number of
//! levels including none, so `a/#` matches `a`; a filter whose first level is a wildcard never
//! matches a topic whose first level starts with `$`. Filters passed in must be valid
//! ([`check`]); shared-subscription prefixes must already be stripped.

pub(crate) use crate::router::topic::matches;

/// Checks wildcard placement (the router's rule; ACL filters have no depth limit).
pub(crate) fn check(filter: &str) -> Result<(), crate::router::FilterError> {
    crate::router::topic::validate_filter(filter, usize::MAX)
}

/// Whether `a` covers `b`: every topic name `b` matches is matched by `a`.
pub(crate) fn covers(a: &str, b: &str) -> bool {
    if dollar_first(b) && wild_first(a) {
        return false;
    }
    if b == "#" {
        // A topic has at least one level, so `#` alone is `+/#` (only a deeper `#` also
        // matches its parent level).
        return covers(a, "+/#");
    }
    let mut a_levels = a.split('/');
    let mut b_levels = b.split('/');
    loop {
        match (a_levels.next(), b_levels.next()) {
            (Some("#"), _) => return true,
            // `b` has more levels (or, through `#`, fewer) than `a` can match here.
            (Some(_), Some("#")) => return false,
            (Some("+"), Some(_)) => {}
            (Some(x), Some(y)) if x == y => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

/// The filter matching exactly the topic names both `a` and `b` match; `None` if there are none.
pub(crate) fn intersection(a: &str, b: &str) -> Option<String> {
    if (dollar_first(a) && wild_first(b)) || (dollar_first(b) && wild_first(a)) {
        return None;
    }
    let mut a_levels = a.split('/');
    let mut b_levels = b.split('/');
    let mut out: Vec<&str> = Vec::new();
    loop {
        match (a_levels.next(), b_levels.next()) {
            (Some("#"), rest) => {
                out.extend(rest);
                out.extend(b_levels);
                break;
            }
            (rest, Some("#")) => {
                out.extend(rest);
                out.extend(a_levels);
                break;
            }
            (Some("+"), Some(y)) => out.push(y),
            (Some(x), Some("+")) => out.push(x),
            (Some(x), Some(y)) if x == y => out.push(x),
            (None, None) => break,
            _ => return None,
        }
    }
    Some(out.join("/"))
}

fn wild_first(filter: &str) -> bool {
    filter.starts_with('+') || filter.starts_with('#')
}

fn dollar_first(filter: &str) -> bool {
    filter.starts_with('$')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn check_table() {
        for ok in [
            "a", "a/b", "#", "+", "a/#", "a/+/c", "/", "a//b", "$SYS/#", "%u/x",
        ] {
            assert_eq!(check(ok), Ok(()), "{ok}");
        }
        for bad in ["", "a/#/b", "a#", "a/b#", "a+", "a/+b/c", "##"] {
            assert!(check(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn matches_table() {
        let table = [
            ("a/b", "a/b", true),
            ("a/+", "a/b", true),
            ("a/+", "a/b/c", false),
            ("a/+", "a", false),
            ("a/#", "a", true),
            ("a/#", "a/b/c", true),
            ("a/#", "ab", false),
            ("#", "a/b", true),
            ("+", "/a", false),
            ("+/a", "/a", true),
            ("+/+", "/", true),
            ("a/b", "a/b/", false),
            ("#", "$SYS/x", false),
            ("+/x", "$SYS/x", false),
            ("$SYS/#", "$SYS", true),
            ("$SYS/+", "$SYS/x", true),
            ("a/+/c", "a//c", true),
        ];
        for (f, t, want) in table {
            assert_eq!(matches(f, t), want, "{f} vs {t}");
        }
    }

    #[test]
    fn covers_table() {
        let table = [
            ("#", "a/b", true),
            ("#", "#", true),
            ("#", "+/#", true),
            ("#", "$SYS/#", false),
            ("#", "$SYS", false),
            ("+/#", "$SYS/a", false),
            ("$SYS/#", "$SYS/a/+", true),
            ("$SYS/#", "#", false),
            ("a/#", "a", true),
            ("a/#", "a/#", true),
            ("a/#", "a/+/c", true),
            ("a/#", "b/#", false),
            ("a/+", "a/b", true),
            ("a/+", "a/+", true),
            ("a/+", "a/#", false),
            ("a/+", "a", false),
            ("a/+/#", "a/#", false),
            ("a/+/#", "a/b", true),
            ("a/b", "a/+", false),
            ("a/b", "a/b", true),
            ("a", "a/#", false),
            ("+", "#", false),
            ("+/#", "#", true),
            ("+/+/#", "#", false),
            ("+/#", "a/#", true),
            ("+/+", "+/b", true),
            ("a/b/#", "a/+/c", false),
        ];
        for (a, b, want) in table {
            assert_eq!(covers(a, b), want, "covers({a}, {b})");
        }
    }

    #[test]
    fn intersection_table() {
        let table = [
            ("a/b", "a/b", Some("a/b")),
            ("a/b", "a/c", None),
            ("a/+", "+/b", Some("a/b")),
            ("a/#", "a", Some("a")),
            ("a/#", "a/+/c", Some("a/+/c")),
            ("a/b/#", "a", None),
            ("a/+", "a", None),
            ("a/+", "a/#", Some("a/+")),
            ("#", "#", Some("#")),
            ("#", "+/x", Some("+/x")),
            ("+/#", "a/#", Some("a/#")),
            ("#", "$SYS/x", None),
            ("+/x", "$SYS/+", None),
            ("$SYS/#", "$SYS/+", Some("$SYS/+")),
            ("a/+/c/#", "+/b/#", Some("a/b/c/#")),
            ("+", "+/+", None),
        ];
        for (a, b, want) in table {
            assert_eq!(intersection(a, b).as_deref(), want, "{a} ∩ {b}");
            assert_eq!(intersection(b, a).as_deref(), want, "{b} ∩ {a}");
        }
    }

    /// Every filter up to three levels over a small alphabet, against every topic up to four
    /// levels over that alphabet plus fresh names: `covers` and `intersection` agree with
    /// brute-force matching.
    #[test]
    fn algebra_agrees_with_matching() {
        let filter_levels = ["a", "$s", "", "+"];
        let topic_levels = ["a", "$s", "", "z", "$z"];
        let mut filters = vec![String::from("#")];
        let mut topics = Vec::new();
        let mut frontier = vec![String::new()];
        for depth in 1..=3 {
            let mut next = Vec::new();
            for prefix in &frontier {
                for level in filter_levels {
                    let f = if depth == 1 {
                        level.to_string()
                    } else {
                        format!("{prefix}/{level}")
                    };
                    if !f.is_empty() {
                        filters.push(f.clone());
                    }
                    filters.push(format!("{f}/#"));
                    next.push(f);
                }
            }
            frontier = next;
        }
        frontier = vec![String::new()];
        for depth in 1..=4 {
            let mut next = Vec::new();
            for prefix in &frontier {
                for level in topic_levels {
                    let t = if depth == 1 {
                        level.to_string()
                    } else {
                        format!("{prefix}/{level}")
                    };
                    // The empty topic is not a valid name, but counting it keeps `covers`
                    // exact over strings and on the cautious side for real topics
                    // (`/#` matches it, `/+/#` does not).
                    topics.push(t.clone());
                    next.push(t);
                }
            }
            frontier = next;
        }
        let sets: Vec<Vec<bool>> = filters
            .iter()
            .map(|f| topics.iter().map(|t| matches(f, t)).collect())
            .collect();
        for (i, a) in filters.iter().enumerate() {
            assert_eq!(check(a), Ok(()), "{a}");
            for (j, b) in filters.iter().enumerate() {
                let subset = sets[j]
                    .iter()
                    .zip(&sets[i])
                    .all(|(&in_b, &in_a)| !in_b || in_a);
                assert_eq!(covers(a, b), subset, "covers({a}, {b})");
                let both: Vec<bool> = sets[i]
                    .iter()
                    .zip(&sets[j])
                    .map(|(&x, &y)| x && y)
                    .collect();
                match intersection(a, b) {
                    Some(f) => {
                        let got: Vec<bool> = topics.iter().map(|t| matches(&f, t)).collect();
                        assert_eq!(got, both, "{a} ∩ {b} = {f}");
                    }
                    None => assert!(both.iter().all(|&x| !x), "{a} ∩ {b} is not empty"),
                }
            }
        }
    }
}
