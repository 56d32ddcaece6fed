//! Retained messages, in a trie keyed by topic level so that wildcard subscriptions find
//! theirs without scanning every retained topic.

use std::collections::HashMap;
use std::sync::{Arc, RwLock, RwLockReadGuard};

use prometheus::IntGauge;

use crate::message::Message;

/// The node's retained messages, shared by the cluster's state machine (which applies the
/// replicated ones) and the broker (which reads them for SUBSCRIBE and keeps the node's own
/// `$SYS` topics in it). Every change updates the two gauges.
pub struct SharedRetained {
    store: RwLock<RetainedStore>,
    count: IntGauge,
    bytes: IntGauge,
}

impl Default for SharedRetained {
    /// With gauges that no registry reports (tests).
    fn default() -> SharedRetained {
        let gauge = || IntGauge::new("unregistered", "unregistered").expect("valid name");
        SharedRetained::new(gauge(), gauge())
    }
}

impl SharedRetained {
    pub fn new(count: IntGauge, bytes: IntGauge) -> SharedRetained {
        SharedRetained {
            store: RwLock::new(RetainedStore::default()),
            count,
            bytes,
        }
    }

    /// Reads the store (never held across an await).
    pub fn read(&self) -> RwLockReadGuard<'_, RetainedStore> {
        self.store.read().unwrap_or_else(|e| e.into_inner())
    }

    /// Changes the store, then updates the gauges.
    pub fn update<R>(&self, f: impl FnOnce(&mut RetainedStore) -> R) -> R {
        let mut store = self.store.write().unwrap_or_else(|e| e.into_inner());
        let r = f(&mut store);
        self.count.set(store.len() as i64);
        self.bytes.set(store.bytes() as i64);
        r
    }
}

#[derive(Default)]
struct Node {
    children: HashMap<Box<str>, Node>,
    message: Option<Arc<Message>>,
}

impl Node {
    fn is_empty(&self) -> bool {
        self.children.is_empty() && self.message.is_none()
    }
}

#[derive(Default)]
pub struct RetainedStore {
    root: Node,
    count: usize,
    /// Topic and payload bytes of the messages held ([`weight`]).
    bytes: usize,
    /// Count and bytes of the node's own `$SYS` topics, which no cap applies to.
    sys: (usize, usize),
}

fn is_sys(topic: &str) -> bool {
    topic.starts_with("$SYS/")
}

/// What a retained message weighs against `limits.max_retained_bytes`.
pub fn weight(msg: &Message) -> usize {
    msg.topic.len() + msg.payload.len()
}

/// Caps on what the store holds; 0: no cap.
#[derive(Clone, Copy, Debug, Default)]
pub struct RetainedLimits {
    pub max_messages: usize,
    pub max_bytes: usize,
}

impl RetainedStore {
    /// Stores a message under its topic; an empty payload clears the topic instead.
    pub fn set(&mut self, msg: Arc<Message>) {
        let topic = msg.topic.clone();
        if msg.payload.is_empty() {
            self.remove(&topic);
            return;
        }
        let mut node = &mut self.root;
        for level in topic.split('/') {
            node = node.children.entry(level.into()).or_default();
        }
        let (w, sys) = (weight(&msg), is_sys(&topic));
        let old = node.message.replace(msg);
        let old_w = old.as_deref().map_or(0, weight);
        self.bytes = self.bytes + w - old_w;
        self.count += old.is_none() as usize;
        if sys {
            self.sys.0 += old.is_none() as usize;
            self.sys.1 = self.sys.1 + w - old_w;
        }
    }

    /// Which cap retaining `payload_len` bytes under `topic` would break, if any (clearing
    /// never breaks one).
    pub fn over_limit(
        &self,
        topic: &str,
        payload_len: usize,
        limits: RetainedLimits,
    ) -> Option<&'static str> {
        if payload_len == 0 || is_sys(topic) {
            return None;
        }
        let (count, bytes) = (self.count - self.sys.0, self.bytes - self.sys.1);
        let old = self.get(topic);
        if old.is_none() && limits.max_messages > 0 && count >= limits.max_messages {
            return Some("max_retained_messages");
        }
        let old = old.map_or(0, |m| weight(m));
        if limits.max_bytes > 0 && bytes - old + topic.len() + payload_len > limits.max_bytes {
            return Some("max_retained_bytes");
        }
        None
    }

    pub fn bytes(&self) -> usize {
        self.bytes
    }

    pub fn remove(&mut self, topic: &str) -> bool {
        fn rm<'a>(node: &mut Node, mut levels: impl Iterator<Item = &'a str>) -> Option<usize> {
            match levels.next() {
                None => node.message.take().map(|m| weight(&m)),
                Some(l) => {
                    let child = node.children.get_mut(l)?;
                    let found = rm(child, levels);
                    if child.is_empty() {
                        node.children.remove(l);
                    }
                    found
                }
            }
        }
        let Some(w) = rm(&mut self.root, topic.split('/')) else {
            return false;
        };
        self.count -= 1;
        self.bytes -= w;
        if is_sys(topic) {
            self.sys.0 -= 1;
            self.sys.1 -= w;
        }
        true
    }

    pub fn get(&self, topic: &str) -> Option<&Arc<Message>> {
        let mut node = &self.root;
        for level in topic.split('/') {
            node = node.children.get(level)?;
        }
        node.message.as_ref()
    }

    pub fn len(&self) -> usize {
        self.count
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Appends every retained message whose topic matches `filter` (not shared).
    pub fn collect(&self, filter: &str, out: &mut Vec<Arc<Message>>) {
        walk(&self.root, filter.split('/'), true, out);
    }

    /// Every message the cluster replicates: all but the node's own `$SYS` topics.
    pub fn replicated(&self) -> Vec<Arc<Message>> {
        let mut out = Vec::with_capacity(self.count - self.sys.0);
        for (name, child) in &self.root.children {
            if &**name != "$SYS" {
                out.extend(child.message.iter().cloned());
                all(child, false, &mut out);
            }
        }
        out
    }

    /// Forgets every replicated message (a snapshot replaces them); `$SYS` stays.
    pub fn clear_replicated(&mut self) {
        self.root.children.retain(|name, _| &**name == "$SYS");
        self.root.message = None;
        (self.count, self.bytes) = self.sys;
    }
}

fn walk<'a>(
    node: &Node,
    mut levels: std::str::Split<'a, char>,
    root: bool,
    out: &mut Vec<Arc<Message>>,
) {
    match levels.next() {
        None => out.extend(node.message.iter().cloned()),
        Some("#") => {
            // "a/#" matches "a" itself and everything below it.
            if !root {
                out.extend(node.message.iter().cloned());
            }
            all(node, root, out);
        }
        Some("+") => {
            for (name, child) in &node.children {
                if root && name.starts_with('$') {
                    continue;
                }
                walk(child, levels.clone(), false, out);
            }
        }
        Some(level) => {
            if let Some(child) = node.children.get(level) {
                walk(child, levels, false, out);
            }
        }
    }
}

fn all(node: &Node, root: bool, out: &mut Vec<Arc<Message>>) {
    for (name, child) in &node.children {
        if root && name.starts_with('$') {
            continue;
        }
        out.extend(child.message.iter().cloned());
        all(child, false, out);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn topics(s: &RetainedStore, filter: &str) -> Vec<String> {
        let mut out = Vec::new();
        s.collect(filter, &mut out);
        let mut v: Vec<String> = out.iter().map(|m| m.topic.to_string()).collect();
        v.sort();
        v
    }

    #[test]
    fn set_replace_clear_and_match() {
        let mut s = RetainedStore::default();
        for t in ["a", "a/b", "a/b/c", "x/b", "$SYS/up"] {
            s.set(Message::for_test(t, b"v"));
        }
        assert_eq!(s.len(), 5);
        assert_eq!(topics(&s, "a/#"), vec!["a", "a/b", "a/b/c"]);
        assert_eq!(topics(&s, "+/b"), vec!["a/b", "x/b"]);
        assert_eq!(topics(&s, "#"), vec!["a", "a/b", "a/b/c", "x/b"]);
        assert_eq!(topics(&s, "$SYS/#"), vec!["$SYS/up"]);
        assert_eq!(topics(&s, "+/+"), vec!["a/b", "x/b"]);
        s.set(Message::for_test("a/b", b"w"));
        assert_eq!(s.len(), 5);
        assert_eq!(&s.get("a/b").expect("kept").payload[..], b"w");
        s.set(Message::for_test("a/b", b""));
        assert_eq!(s.len(), 4);
        assert!(s.get("a/b").is_none());
        assert_eq!(topics(&s, "a/+/c"), vec!["a/b/c"]);
    }

    #[test]
    fn replicated_leaves_out_sys_and_clearing_keeps_it() {
        let mut s = RetainedStore::default();
        for t in ["a", "a/b", "$SYS/up", "$other/x", "/lead"] {
            s.set(Message::for_test(t, b"v"));
        }
        let mut got: Vec<String> = s.replicated().iter().map(|m| m.topic.to_string()).collect();
        got.sort();
        assert_eq!(got, vec!["$other/x", "/lead", "a", "a/b"]);
        s.clear_replicated();
        assert_eq!((s.len(), s.bytes()), (1, "$SYS/up".len() + 1));
        assert!(s.replicated().is_empty());
        assert!(s.get("$SYS/up").is_some());
        s.set(Message::for_test("a", b"w"));
        assert_eq!(s.len(), 2);
    }

    #[test]
    fn quota_counts_new_topics_and_bytes() {
        let mut s = RetainedStore::default();
        let limits = RetainedLimits {
            max_messages: 2,
            max_bytes: 20,
        };
        s.set(Message::for_test("a", b"12345"));
        s.set(Message::for_test("b", b"12345"));
        assert_eq!((s.len(), s.bytes()), (2, 12));
        let c = Message::for_test("c", b"1");
        assert_eq!(
            s.over_limit(&c.topic, c.payload.len(), limits),
            Some("max_retained_messages")
        );
        // Replacing is not a new topic; only its bytes count, net of the old ones.
        let a = Message::for_test("a", b"1234567890");
        assert_eq!(s.over_limit(&a.topic, a.payload.len(), limits), None);
        let a = Message::for_test("a", b"123456789012345");
        assert_eq!(
            s.over_limit(&a.topic, a.payload.len(), limits),
            Some("max_retained_bytes")
        );
        assert_eq!(s.over_limit("c", 0, limits), None);
        s.set(Message::for_test("a", b""));
        assert_eq!((s.len(), s.bytes()), (1, 6));
        assert_eq!(s.over_limit(&c.topic, c.payload.len(), limits), None);
        // The node's own $SYS topics count in the totals but not against the caps.
        s.set(Message::for_test("$SYS/broker/uptime", b"1 seconds"));
        s.set(Message::for_test("$SYS/broker/version", b"petrel"));
        assert_eq!(s.len(), 3);
        assert_eq!(s.over_limit(&c.topic, c.payload.len(), limits), None);
        s.set(Message::for_test("$SYS/broker/uptime", b""));
        assert_eq!((s.len(), s.bytes()), (2, 6 + 19 + 6));
    }
}
