//! Retained messages, in a trie keyed by topic level so that wildcard subscriptions find
//! theirs without scanning every retained topic.

use std::collections::HashMap;
use std::sync::Arc;

use crate::message::Message;

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
        if node.message.replace(msg).is_none() {
            self.count += 1;
        }
    }

    pub fn remove(&mut self, topic: &str) -> bool {
        fn rm<'a>(node: &mut Node, mut levels: impl Iterator<Item = &'a str>) -> bool {
            match levels.next() {
                None => node.message.take().is_some(),
                Some(l) => {
                    let Some(child) = node.children.get_mut(l) else {
                        return false;
                    };
                    let found = rm(child, levels);
                    if child.is_empty() {
                        node.children.remove(l);
                    }
                    found
                }
            }
        }
        let found = rm(&mut self.root, topic.split('/'));
        if found {
            self.count -= 1;
        }
        found
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
}
