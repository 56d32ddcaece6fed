//! Topic-name and topic-filter rules.

/// Prefix of a shared subscription: `$share/<group>/<filter>`.
pub const SHARE_PREFIX: &str = "$share/";

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum FilterError {
    #[error("empty topic filter")]
    Empty,
    #[error("'#' must be the last level and alone in it")]
    BadMultiLevel,
    #[error("'+' must be alone in its level")]
    BadSingleLevel,
    #[error("malformed shared subscription")]
    BadShare,
    #[error("topic filter has more levels than allowed")]
    TooDeep,
}

/// A validated subscription filter, with its share group split off.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParsedFilter<'a> {
    pub group: Option<&'a str>,
    pub filter: &'a str,
}

/// Checks a filter's syntax and splits a `$share/<group>/` prefix off.
pub fn parse_filter(raw: &str, max_levels: usize) -> Result<ParsedFilter<'_>, FilterError> {
    let (group, filter) = match raw.strip_prefix(SHARE_PREFIX) {
        Some(rest) => {
            let (group, filter) = rest.split_once('/').ok_or(FilterError::BadShare)?;
            if group.is_empty() || group.contains(['+', '#']) || filter.is_empty() {
                return Err(FilterError::BadShare);
            }
            (Some(group), filter)
        }
        None => (None, raw),
    };
    validate_filter(filter, max_levels)?;
    Ok(ParsedFilter { group, filter })
}

/// Validates wildcard placement and depth of a (non-shared) filter.
pub fn validate_filter(filter: &str, max_levels: usize) -> Result<(), FilterError> {
    if filter.is_empty() {
        return Err(FilterError::Empty);
    }
    let mut levels = filter.split('/').peekable();
    let mut depth = 0;
    while let Some(level) = levels.next() {
        depth += 1;
        if level.contains('#') && (level != "#" || levels.peek().is_some()) {
            return Err(FilterError::BadMultiLevel);
        }
        if level.contains('+') && level != "+" {
            return Err(FilterError::BadSingleLevel);
        }
    }
    if depth > max_levels {
        return Err(FilterError::TooDeep);
    }
    Ok(())
}

/// Number of levels in a topic name.
pub fn depth(topic: &str) -> usize {
    topic.bytes().filter(|&b| b == b'/').count() + 1
}

/// Whether `filter` (not shared) matches the topic name `topic`.
/// Topics starting with `$` are not matched by a leading wildcard.
pub fn matches(filter: &str, topic: &str) -> bool {
    if topic.starts_with('$') && (filter.starts_with('+') || filter.starts_with('#')) {
        return false;
    }
    let mut f = filter.split('/');
    let mut t = topic.split('/');
    loop {
        match (f.next(), t.next()) {
            (Some("#"), _) => return true,
            (Some("+"), Some(_)) => {}
            (Some(a), Some(b)) if a == b => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filter_syntax() {
        let ok = [
            "a", "a/b", "#", "+", "a/#", "a/+/c", "+/+", "/", "a//b", "$SYS/#", "a/+",
        ];
        for f in ok {
            assert_eq!(validate_filter(f, 128), Ok(()), "{f}");
        }
        let bad = [
            ("", FilterError::Empty),
            ("a/#/b", FilterError::BadMultiLevel),
            ("a#", FilterError::BadMultiLevel),
            ("a/b#", FilterError::BadMultiLevel),
            ("a+", FilterError::BadSingleLevel),
            ("a/+b/c", FilterError::BadSingleLevel),
        ];
        for (f, e) in bad {
            assert_eq!(validate_filter(f, 128), Err(e), "{f}");
        }
        assert_eq!(validate_filter("a/b/c", 2), Err(FilterError::TooDeep));
    }

    #[test]
    fn shared_filters() {
        assert_eq!(
            parse_filter("$share/g/a/+", 8),
            Ok(ParsedFilter {
                group: Some("g"),
                filter: "a/+"
            })
        );
        assert_eq!(
            parse_filter("$share/g/#", 8),
            Ok(ParsedFilter {
                group: Some("g"),
                filter: "#"
            })
        );
        assert_eq!(parse_filter("$share//a", 8), Err(FilterError::BadShare));
        assert_eq!(parse_filter("$share/g", 8), Err(FilterError::BadShare));
        assert_eq!(parse_filter("$share/g/", 8), Err(FilterError::BadShare));
        assert_eq!(parse_filter("$share/g+/a", 8), Err(FilterError::BadShare));
        assert_eq!(
            parse_filter("$shared/g/a", 8),
            Ok(ParsedFilter {
                group: None,
                filter: "$shared/g/a"
            })
        );
    }

    #[test]
    fn matching_table() {
        let table = [
            ("a/b", "a/b", true),
            ("a/+", "a/b", true),
            ("a/+", "a/b/c", false),
            ("a/#", "a", true),
            ("a/#", "a/b/c", true),
            ("#", "a/b", true),
            ("+/+", "a/b", true),
            ("+", "/a", false),
            ("+/a", "/a", true),
            ("a/b", "a/b/", false),
            ("a/+/", "a/b/", true),
            ("#", "$SYS/x", false),
            ("+/x", "$SYS/x", false),
            ("$SYS/#", "$SYS/x", true),
            ("$SYS/+", "$SYS/x", true),
            ("a/+/c", "a//c", true),
        ];
        for (f, t, want) in table {
            assert_eq!(matches(f, t), want, "{f} vs {t}");
        }
    }
}
