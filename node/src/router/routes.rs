//! The replicated route table as the publish path reads it: for every (share group, filter)
//! the nodes with at least one subscriber to it, in a trie like the subscription trie's, so a
//! publish finds the nodes it must be forwarded to in one walk of its topic's levels.
//!
//! ```text
//!  Raft apply (RouteAdd / RouteDel / MemberRemove / snapshot) ──> RouteTable::add/remove/..
//!  Broker::publish ──> RouteTable::collect(topic) ──> [Target{node, plain, shared}] ──> forward
//! ```
//!
//! The cluster's state machine writes it (only there: it is a copy of `ClusterState::routes`
//! kept for matching); the broker reads it on every publish, under a read lock held for the
//! walk only. A node that holds no route of another node (a single node, or a cluster whose
//! subscribers are all here) skips the walk: `has_remote` is one atomic load.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::RwLock;

/// The nodes of one route: almost always one, so one is held inline (a `BTreeSet` would
/// allocate a whole tree node for it).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum NodeSet {
    #[default]
    Empty,
    One(u64),
    /// Sorted, two or more.
    Many(Vec<u64>),
}

impl NodeSet {
    pub fn as_slice(&self) -> &[u64] {
        match self {
            NodeSet::Empty => &[],
            NodeSet::One(n) => std::slice::from_ref(n),
            NodeSet::Many(v) => v,
        }
    }

    pub fn contains(&self, n: &u64) -> bool {
        self.as_slice().contains(n)
    }

    pub fn is_empty(&self) -> bool {
        matches!(self, NodeSet::Empty)
    }

    pub fn iter(&self) -> std::slice::Iter<'_, u64> {
        self.as_slice().iter()
    }

    pub fn insert(&mut self, n: u64) {
        *self = match std::mem::take(self) {
            NodeSet::Empty => NodeSet::One(n),
            NodeSet::One(m) if m == n => NodeSet::One(m),
            NodeSet::One(m) => NodeSet::Many(if m < n { vec![m, n] } else { vec![n, m] }),
            NodeSet::Many(mut v) => {
                if let Err(at) = v.binary_search(&n) {
                    v.insert(at, n);
                }
                NodeSet::Many(v)
            }
        };
    }

    pub fn remove(&mut self, n: &u64) {
        *self = match std::mem::take(self) {
            NodeSet::One(m) if m == *n => NodeSet::Empty,
            NodeSet::Many(mut v) => {
                v.retain(|m| m != n);
                match v.as_slice() {
                    [one] => NodeSet::One(*one),
                    _ => NodeSet::Many(v),
                }
            }
            other => other,
        };
    }
}

impl<'a> IntoIterator for &'a NodeSet {
    type Item = &'a u64;
    type IntoIter = std::slice::Iter<'a, u64>;

    fn into_iter(self) -> Self::IntoIter {
        self.iter()
    }
}

/// Where one publish goes on one other node.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Target {
    pub node: u64,
    /// To the node's ordinary subscriptions matching the topic.
    pub plain: bool,
    /// To one member of each of these (group, filter) share groups on the node.
    pub shared: Vec<(Box<str>, Box<str>)>,
}

#[derive(Default)]
struct RouteNode {
    children: HashMap<Box<str>, RouteNode>,
    plain: NodeSet,
    shared: Vec<SharedRoute>,
}

struct SharedRoute {
    group: Box<str>,
    nodes: NodeSet,
    /// Round robin over `nodes` when no member is on the publishing node.
    next: AtomicUsize,
}

impl RouteNode {
    fn is_empty(&self) -> bool {
        self.children.is_empty() && self.plain.is_empty() && self.shared.is_empty()
    }
}

/// The route table for matching (see the module docs).
pub struct RouteTable {
    me: u64,
    root: RwLock<RouteNode>,
    /// (group, filter, node) entries whose node is not this one.
    remote: AtomicUsize,
}

impl RouteTable {
    /// An empty table of node `me` (whose own routes are kept but never forwarded to).
    pub fn new(me: u64) -> RouteTable {
        RouteTable {
            me,
            root: RwLock::new(RouteNode::default()),
            remote: AtomicUsize::new(0),
        }
    }

    /// Whether another node has any route: if not, nothing is ever forwarded.
    pub fn has_remote(&self) -> bool {
        self.remote.load(Ordering::Relaxed) > 0
    }

    fn count(&self, node: u64, added: bool) {
        if node != self.me {
            match added {
                true => self.remote.fetch_add(1, Ordering::Relaxed),
                false => self.remote.fetch_sub(1, Ordering::Relaxed),
            };
        }
    }

    /// Node `node` has subscribers to `filter` (in share group `group`, "" for none).
    pub fn add(&self, group: &str, filter: &str, node: u64) {
        let mut root = self.root.write().unwrap_or_else(|e| e.into_inner());
        let mut at = &mut *root;
        for level in filter.split('/') {
            at = at.children.entry(level.into()).or_default();
        }
        let set = match group {
            "" => &mut at.plain,
            g => match at.shared.iter().position(|s| &*s.group == g) {
                Some(i) => &mut at.shared[i].nodes,
                None => {
                    at.shared.push(SharedRoute {
                        group: g.into(),
                        nodes: NodeSet::Empty,
                        next: AtomicUsize::new(0),
                    });
                    &mut at.shared.last_mut().expect("just pushed").nodes
                }
            },
        };
        if !set.contains(&node) {
            set.insert(node);
            self.count(node, true);
        }
    }

    /// Node `node` has no subscriber to `filter` (in `group`) any more.
    pub fn remove(&self, group: &str, filter: &str, node: u64) {
        fn walk<'a>(
            at: &mut RouteNode,
            mut levels: impl Iterator<Item = &'a str>,
            group: &str,
            node: u64,
        ) -> bool {
            match levels.next() {
                Some(level) => {
                    let Some(child) = at.children.get_mut(level) else {
                        return false;
                    };
                    let found = walk(child, levels, group, node);
                    if child.is_empty() {
                        at.children.remove(level);
                    }
                    found
                }
                None => {
                    if group.is_empty() {
                        let found = at.plain.contains(&node);
                        at.plain.remove(&node);
                        return found;
                    }
                    let Some(i) = at.shared.iter().position(|s| &*s.group == group) else {
                        return false;
                    };
                    let found = at.shared[i].nodes.contains(&node);
                    at.shared[i].nodes.remove(&node);
                    if at.shared[i].nodes.is_empty() {
                        at.shared.swap_remove(i);
                    }
                    found
                }
            }
        }
        let mut root = self.root.write().unwrap_or_else(|e| e.into_inner());
        if walk(&mut root, filter.split('/'), group, node) {
            self.count(node, false);
        }
    }

    /// Replaces the whole table (a snapshot was installed or loaded).
    pub fn replace<'a>(&self, routes: impl IntoIterator<Item = (&'a str, &'a str, &'a NodeSet)>) {
        *self.root.write().unwrap_or_else(|e| e.into_inner()) = RouteNode::default();
        self.remote.store(0, Ordering::Relaxed);
        for (group, filter, nodes) in routes {
            for &n in nodes {
                self.add(group, filter, n);
            }
        }
    }

    /// Where a publish to `topic` must be forwarded, one entry per other node, appended to
    /// `out` (sorted by node). A share group with a member on this node is served here
    /// (local first); one without gets one node of those that have members, in turn.
    pub fn collect(&self, topic: &str, out: &mut Vec<Target>) {
        let root = self.root.read().unwrap_or_else(|e| e.into_inner());
        let mut path = Vec::new();
        let wildcards = !topic.starts_with('$');
        walk(&root, topic.split('/'), wildcards, &mut path, self.me, out);
        drop(root);
        if out.len() > 1 {
            out.sort_by_key(|t| t.node);
            // One target per node: merge.
            let mut merged: Vec<Target> = Vec::with_capacity(out.len());
            for t in out.drain(..) {
                match merged.last_mut() {
                    Some(last) if last.node == t.node => {
                        last.plain |= t.plain;
                        last.shared.extend(t.shared);
                    }
                    _ => merged.push(t),
                }
            }
            *out = merged;
        }
    }

    /// Every route, as (group, filter, node), for tests and the admin API.
    pub fn entries(&self) -> Vec<(String, String, u64)> {
        fn walk(at: &RouteNode, path: &mut String, out: &mut Vec<(String, String, u64)>) {
            for &n in &at.plain {
                out.push((String::new(), path.clone(), n));
            }
            for s in &at.shared {
                for &n in &s.nodes {
                    out.push((s.group.to_string(), path.clone(), n));
                }
            }
            for (level, child) in &at.children {
                let len = path.len();
                path.push('/');
                path.push_str(level);
                walk(child, path, out);
                path.truncate(len);
            }
        }
        let root = self.root.read().unwrap_or_else(|e| e.into_inner());
        let mut out = Vec::new();
        for (level, child) in &root.children {
            let mut path = level.to_string();
            walk(child, &mut path, &mut out);
        }
        out.sort();
        out
    }
}

fn add_targets(at: &RouteNode, path: &[&str], me: u64, out: &mut Vec<Target>) {
    for &n in &at.plain {
        if n == me {
            continue;
        }
        match out.iter_mut().find(|t| t.node == n) {
            Some(t) => t.plain = true,
            None => out.push(Target {
                node: n,
                plain: true,
                shared: Vec::new(),
            }),
        }
    }
    for s in &at.shared {
        if s.nodes.contains(&me) {
            continue;
        }
        let nodes = s.nodes.as_slice();
        let Some(&n) = nodes.get(s.next.fetch_add(1, Ordering::Relaxed) % nodes.len().max(1))
        else {
            continue;
        };
        let target = (s.group.clone(), path.join("/").into_boxed_str());
        match out.iter_mut().find(|t| t.node == n) {
            Some(t) => t.shared.push(target),
            None => out.push(Target {
                node: n,
                plain: false,
                shared: vec![target],
            }),
        }
    }
}

fn walk<'t>(
    at: &'t RouteNode,
    mut levels: std::str::Split<'_, char>,
    wildcards: bool,
    path: &mut Vec<&'t str>,
    me: u64,
    out: &mut Vec<Target>,
) {
    match levels.next() {
        None => {
            add_targets(at, path, me, out);
            // "a/#" also matches "a".
            if let Some((k, hash)) = at.children.get_key_value("#") {
                path.push(k);
                add_targets(hash, path, me, out);
                path.pop();
            }
        }
        Some(level) => {
            if wildcards {
                if let Some((k, hash)) = at.children.get_key_value("#") {
                    path.push(k);
                    add_targets(hash, path, me, out);
                    path.pop();
                }
                if let Some((k, plus)) = at.children.get_key_value("+") {
                    path.push(k);
                    walk(plus, levels.clone(), true, path, me, out);
                    path.pop();
                }
            }
            if let Some((k, child)) = at.children.get_key_value(level) {
                path.push(k);
                walk(child, levels, true, path, me, out);
                path.pop();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nodes(t: &RouteTable, topic: &str) -> Vec<Target> {
        let mut out = Vec::new();
        t.collect(topic, &mut out);
        out
    }

    fn plain(node: u64) -> Target {
        Target {
            node,
            plain: true,
            shared: Vec::new(),
        }
    }

    #[test]
    fn plain_routes_match_like_subscriptions_and_skip_this_node() {
        let t = RouteTable::new(1);
        assert!(!t.has_remote());
        t.add("", "a/#", 1);
        assert!(!t.has_remote(), "this node's own routes are not remote");
        t.add("", "a/+/c", 2);
        t.add("", "a/b/c", 3);
        t.add("", "#", 3);
        assert!(t.has_remote());
        assert_eq!(nodes(&t, "a/b/c"), vec![plain(2), plain(3)]);
        assert_eq!(nodes(&t, "a"), vec![plain(3)]);
        assert_eq!(nodes(&t, "$SYS/x"), vec![], "no wildcard matches $ topics");
        t.remove("", "#", 3);
        assert_eq!(nodes(&t, "a"), vec![]);
        t.remove("", "a/b/c", 3);
        t.remove("", "a/+/c", 2);
        assert!(!t.has_remote());
        t.remove("", "a/#", 1);
        assert!(t.entries().is_empty());
        assert!(t.root.read().unwrap().is_empty(), "empty levels pruned");
    }

    #[test]
    fn share_groups_prefer_this_node_then_take_turns() {
        let t = RouteTable::new(1);
        t.add("g", "s/+", 2);
        t.add("g", "s/+", 3);
        t.add("h", "s/#", 1);
        let mut seen = Vec::new();
        for _ in 0..4 {
            let got = nodes(&t, "s/x");
            assert_eq!(got.len(), 1, "one node per group: {got:?}");
            assert_eq!(got[0].shared, vec![("g".into(), "s/+".into())]);
            assert!(!got[0].plain);
            seen.push(got[0].node);
        }
        seen.sort();
        assert_eq!(seen, vec![2, 2, 3, 3]);
        t.add("g", "s/+", 1);
        assert_eq!(nodes(&t, "s/x"), vec![], "a member here: served here");
        t.add("", "s/x", 2);
        t.remove("g", "s/+", 1);
        let got = nodes(&t, "s/x");
        let g2 = got.iter().any(|x| x.node == 2 && x.plain);
        assert!(g2, "{got:?}");
        assert_eq!(got.iter().map(|x| x.shared.len()).sum::<usize>(), 1);
    }

    #[test]
    fn replace_rebuilds_and_counts() {
        let t = RouteTable::new(1);
        t.add("", "old", 2);
        let (a, b) = (NodeSet::One(2), NodeSet::Many(vec![1, 3]));
        t.replace([("", "x/y", &a), ("g", "x/+", &b)]);
        assert_eq!(
            t.entries(),
            vec![
                ("".into(), "x/y".into(), 2),
                ("g".into(), "x/+".into(), 1),
                ("g".into(), "x/+".into(), 3),
            ]
        );
        assert!(t.has_remote());
        assert_eq!(nodes(&t, "old"), vec![]);
    }
}
