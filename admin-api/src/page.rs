//! Pagination: every list takes `limit` and an opaque `cursor`, and answers with the items
//! and the cursor of the next page.
//!
//! Lists are ordered by a key (a client id, a topic, ...) and a cursor is the last key of
//! the page before, encoded. A page starts after that key, whatever was added or removed in
//! between: a cursor stays valid for ever, and an item that exists for the whole walk is
//! seen exactly once.

use serde::Deserialize;
use utoipa::IntoParams;

use crate::error::AdminError;

/// Items per page when the request does not say.
pub const DEFAULT_LIMIT: usize = 100;
/// The most items a page holds.
pub const MAX_LIMIT: usize = 1000;

const CURSOR_PREFIX: &str = "k1.";

/// The `limit` and `cursor` query parameters.
#[derive(Debug, Default, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct PageParams {
    /// How many items to return, 1 to 1000 (default 100).
    pub limit: Option<usize>,
    /// `next_cursor` of the page before; absent for the first page.
    pub cursor: Option<String>,
}

/// Where a page starts and how long it is, as the backend needs it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PageRequest {
    /// Return only items whose key is greater than this one.
    pub after: Option<String>,
    /// Return at most this many items, plus one more if there is one (the backend may
    /// return `limit + 1`: the extra tells that a next page exists and is not shown).
    pub limit: usize,
}

impl PageParams {
    pub fn request(&self) -> Result<PageRequest, AdminError> {
        let limit = match self.limit {
            None => DEFAULT_LIMIT,
            Some(0) => {
                return Err(AdminError::bad_request(
                    "bad_request",
                    "limit must be at least 1",
                ))
            }
            Some(n) if n > MAX_LIMIT => {
                return Err(AdminError::bad_request(
                    "bad_request",
                    format!("limit must be at most {MAX_LIMIT}"),
                ))
            }
            Some(n) => n,
        };
        let after = match &self.cursor {
            None => None,
            Some(c) => Some(decode_cursor(c)?),
        };
        Ok(PageRequest { after, limit })
    }
}

/// Encodes a key as a cursor (hex, so that any key is safe in a URL).
pub fn encode_cursor(key: &str) -> String {
    let mut out = String::with_capacity(CURSOR_PREFIX.len() + key.len() * 2);
    out.push_str(CURSOR_PREFIX);
    for b in key.as_bytes() {
        out.push_str(&format!("{b:02x}"));
    }
    out
}

/// The key a cursor holds; `bad_cursor` if it is not one this API made.
pub fn decode_cursor(cursor: &str) -> Result<String, AdminError> {
    let bad = || AdminError::bad_request("bad_cursor", "cursor is not one this API returned");
    let hex = cursor.strip_prefix(CURSOR_PREFIX).ok_or_else(bad)?;
    if hex.len() % 2 != 0 {
        return Err(bad());
    }
    let bytes: Result<Vec<u8>, _> = (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(hex.get(i..i + 2).ok_or_else(bad)?, 16).map_err(|_| bad()))
        .collect();
    String::from_utf8(bytes?).map_err(|_| bad())
}

/// Cuts a backend's answer (sorted by key, maybe one longer than asked) into a page and
/// the cursor of the next one.
pub fn paginate<T>(
    mut items: Vec<T>,
    limit: usize,
    key: impl Fn(&T) -> String,
) -> (Vec<T>, Option<String>) {
    if items.len() <= limit {
        return (items, None);
    }
    items.truncate(limit);
    let next = items.last().map(|last| encode_cursor(&key(last)));
    (items, next)
}

/// Takes from `sorted` (ascending by `key`) the items after `req.after`, at most
/// `req.limit + 1`: what a backend with the whole list at hand returns.
pub fn window<T>(
    sorted: impl IntoIterator<Item = T>,
    req: &PageRequest,
    key: impl Fn(&T) -> &str,
) -> Vec<T> {
    sorted
        .into_iter()
        .filter(|t| req.after.as_deref().is_none_or(|a| key(t) > a))
        .take(req.limit.saturating_add(1))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_round_trip_any_key() {
        for key in ["", "a", "client/with space/ü", "\u{0}x"] {
            assert_eq!(decode_cursor(&encode_cursor(key)).unwrap(), key);
        }
    }

    #[test]
    fn foreign_cursors_are_refused() {
        for bad in ["", "abc", "k1.4", "k1.zz", "k2.61", "k1.ff"] {
            let e = decode_cursor(bad).unwrap_err();
            assert_eq!(e.code, "bad_cursor", "{bad}");
        }
    }

    #[test]
    fn a_walk_sees_each_item_once_while_items_come_and_go() {
        let mut items: Vec<String> = (0..10).map(|i| format!("c{i:02}")).collect();
        let mut seen = Vec::new();
        let mut cursor: Option<String> = None;
        loop {
            let params = PageParams {
                limit: Some(3),
                cursor: cursor.clone(),
            };
            let req = params.request().unwrap();
            let got = window(items.iter().cloned(), &req, |s| s.as_str());
            let (page, next) = paginate(got, req.limit, |s| s.clone());
            seen.extend(page);
            // Between pages: one item added behind the walk, one ahead, one removed ahead.
            items.push("a-behind".into());
            items.retain(|s| s != "c07");
            items.sort();
            match next {
                Some(n) => cursor = Some(n),
                None => break,
            }
        }
        let expected: Vec<String> = (0..10)
            .filter(|i| *i != 7)
            .map(|i| format!("c{i:02}"))
            .collect();
        assert_eq!(seen, expected);
    }

    #[test]
    fn limits_are_checked() {
        assert_eq!(
            PageParams::default().request().unwrap().limit,
            DEFAULT_LIMIT
        );
        assert!(PageParams {
            limit: Some(0),
            cursor: None
        }
        .request()
        .is_err());
        assert!(PageParams {
            limit: Some(MAX_LIMIT + 1),
            cursor: None
        }
        .request()
        .is_err());
    }
}
