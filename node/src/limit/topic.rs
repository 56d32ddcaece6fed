//! Length and depth limits on topic names.

use crate::config::LimitsConfig;
use crate::router::topic;

/// The limit a topic name (of a PUBLISH or a will) breaks, as a `petrel_limit_hits_total`
/// label. Filters are checked by the subscribe path, which parses them anyway.
pub fn topic_over_limit(name: &str, limits: &LimitsConfig) -> Option<&'static str> {
    if name.len() > limits.max_topic_length_bytes {
        Some("max_topic_length_bytes")
    } else if topic::depth(name) > limits.max_topic_levels {
        Some("max_topic_levels")
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn length_then_depth() {
        let limits = LimitsConfig {
            max_topic_length_bytes: 8,
            max_topic_levels: 3,
            ..LimitsConfig::default()
        };
        assert_eq!(topic_over_limit("a/b/c", &limits), None);
        assert_eq!(
            topic_over_limit("a/b/c/d", &limits),
            Some("max_topic_levels")
        );
        assert_eq!(
            topic_over_limit("abcdefghi", &limits),
            Some("max_topic_length_bytes")
        );
        assert_eq!(topic_over_limit("12345678", &limits), None);
    }
}
