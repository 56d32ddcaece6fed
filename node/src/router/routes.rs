//! The replicated route table as the publish path reads it: for every (share group, filter)
//! the nodes with at least one subscriber to it. A filter without wildcards is found by the
//! topic itself (one hash lookup); the others sit in a trie like the subscription trie's,
//! walked level by level. Matching allocates nothing but the caller's output.
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
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::RwLock;

use crate::config::SharedStrategy;

/// The nodes of one route: almost always one, so one is held inline (a `BTreeSet` would
/// allocate a whole tree node for it), and the rare list is boxed (two words in all).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum NodeSet {
    #[default]
    Empty,
    One(u64),
    /// Sorted, two or more.
    #[allow(clippy::box_collection)] // one word in every route, not three
    Many(Box<Vec<u64>>),
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
            NodeSet::One(m) => NodeSet::Many(Box::new(if m < n { vec![m, n] } else { vec![n, m] })),
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

/// The routes of one filter.
#[derive(Default)]
struct Entry {
    plain: NodeSet,
    /// Share groups, rare: boxed so an entry without any is two words smaller.
    #[allow(clippy::box_collection)] // one word in every entry, not three
    shared: Option<Box<Vec<SharedRoute>>>,
}

struct SharedRoute {
    group: Box<str>,
    /// The filter (named in the forwarded copy).
    filter: Box<str>,
    nodes: NodeSet,
    /// Round robin over `nodes` when no member is on the publishing node.
    next: AtomicUsize,
}

impl Entry {
    fn is_empty(&self) -> bool {
        self.plain.is_empty() && self.shared.is_none()
    }

    /// Takes `node` out of every route here; returns how many it was in.
    fn remove_node(&mut self, node: u64) -> usize {
        let mut n = self.plain.contains(&node) as usize;
        self.plain.remove(&node);
        if let Some(shared) = self.shared.as_mut() {
            for s in shared.iter_mut() {
                n += s.nodes.contains(&node) as usize;
                s.nodes.remove(&node);
            }
            shared.retain(|s| !s.nodes.is_empty());
            if shared.is_empty() {
                self.shared = None;
            }
        }
        n
    }

    /// Each route here: (group, "" for none; nodes).
    fn each(&self, mut f: impl FnMut(&str, &NodeSet)) {
        if !self.plain.is_empty() {
            f("", &self.plain);
        }
        for s in self.shared.iter().flat_map(|v| v.iter()) {
            f(&s.group, &s.nodes);
        }
    }

    /// The node set of (`group`, `filter`) here, made if missing.
    fn set_mut(&mut self, group: &str, filter: &str) -> &mut NodeSet {
        if group.is_empty() {
            return &mut self.plain;
        }
        let shared = self.shared.get_or_insert_with(Default::default);
        let i = match shared.iter().position(|s| &*s.group == group) {
            Some(i) => i,
            None => {
                shared.push(SharedRoute {
                    group: group.into(),
                    filter: filter.into(),
                    nodes: NodeSet::Empty,
                    next: AtomicUsize::new(0),
                });
                shared.len() - 1
            }
        };
        &mut shared[i].nodes
    }

    /// Takes `node` out of (`group`); returns whether it was there.
    fn remove(&mut self, group: &str, node: u64) -> bool {
        if group.is_empty() {
            let found = self.plain.contains(&node);
            self.plain.remove(&node);
            return found;
        }
        let Some(shared) = self.shared.as_mut() else {
            return false;
        };
        let Some(i) = shared.iter().position(|s| &*s.group == group) else {
            return false;
        };
        let found = shared[i].nodes.contains(&node);
        shared[i].nodes.remove(&node);
        if shared[i].nodes.is_empty() {
            shared.swap_remove(i);
        }
        if shared.is_empty() {
            self.shared = None;
        }
        found
    }
}

/// A trie level's name (or a tail's levels): up to `INLINE` bytes held in place, so that
/// the short names most levels have (`+`, `status`, `dev1234`) allocate nothing; longer
/// ones are boxed. Compared and hashed as bytes.
#[derive(Clone)]
enum Level {
    Inline(u8, [u8; INLINE]),
    Heap(Box<str>),
}

const INLINE: usize = 22;

impl Level {
    fn new(s: &str) -> Level {
        match s.len() <= INLINE {
            true => {
                let mut b = [0; INLINE];
                b[..s.len()].copy_from_slice(s.as_bytes());
                Level::Inline(s.len() as u8, b)
            }
            false => Level::Heap(s.into()),
        }
    }

    fn as_bytes(&self) -> &[u8] {
        match self {
            Level::Inline(n, b) => &b[..*n as usize],
            Level::Heap(s) => s.as_bytes(),
        }
    }

    /// As text (made from a `&str`, so always valid UTF-8; only listings read it).
    fn to_text(&self) -> std::borrow::Cow<'_, str> {
        String::from_utf8_lossy(self.as_bytes())
    }

    /// Whether it names the same levels as `levels`.
    fn is_path(&self, levels: &[&str]) -> bool {
        self.as_bytes()
            .split(|&b| b == b'/')
            .eq(levels.iter().map(|l| l.as_bytes()))
    }
}

impl PartialEq for Level {
    fn eq(&self, other: &Level) -> bool {
        self.as_bytes() == other.as_bytes()
    }
}

impl Eq for Level {}

impl std::hash::Hash for Level {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        // As the `[u8]` it borrows as, so that a map finds it by a topic level's bytes.
        self.as_bytes().hash(state)
    }
}

impl std::borrow::Borrow<[u8]> for Level {
    fn borrow(&self) -> &[u8] {
        self.as_bytes()
    }
}

#[derive(Default)]
struct RouteNode {
    children: Children,
    entry: Entry,
}

impl RouteNode {
    fn is_empty(&self) -> bool {
        self.children.is_empty() && self.entry.is_empty()
    }
}

/// The only path below a node, held as one string instead of a chain of nodes: most routes
/// of a big table end in levels no other route shares (`dev1234/+/status`). Its entry is
/// never empty.
struct Tail {
    levels: Level,
    entry: Entry,
}

/// Most trie levels have one child or a few (`+`, `#`, `status`): a short list, searched in
/// order and allocated to its exact length, costs a fraction of a hash table's smallest
/// allocation; a level with many children (`dev<id>`) becomes a table; a node with a single
/// path below it holds that path as a [`Tail`].
enum Children {
    Few(Vec<(Level, RouteNode)>),
    #[allow(clippy::box_collection)] // every trie node holds this enum: 3 words, not 6
    Many(Box<HashMap<Level, RouteNode>>),
    Tail(Box<Tail>),
}

/// Children kept in a list up to this many.
const FEW: usize = 8;

impl Default for Children {
    fn default() -> Self {
        Children::Few(Vec::new())
    }
}

impl Children {
    fn is_empty(&self) -> bool {
        match self {
            Children::Few(v) => v.is_empty(),
            Children::Many(m) => m.is_empty(),
            Children::Tail(_) => false,
        }
    }

    /// The child named `level` (none below a tail: see [`walk`]).
    fn get(&self, level: &str) -> Option<&RouteNode> {
        let level = level.as_bytes();
        match self {
            Children::Few(v) => v
                .iter()
                .find(|(k, _)| k.as_bytes() == level)
                .map(|(_, n)| n),
            Children::Many(m) => m.get(level),
            Children::Tail(_) => None,
        }
    }

    fn get_mut(&mut self, level: &str) -> Option<&mut RouteNode> {
        let level = level.as_bytes();
        match self {
            Children::Few(v) => v
                .iter_mut()
                .find(|(k, _)| k.as_bytes() == level)
                .map(|(_, n)| n),
            Children::Many(m) => m.get_mut(level),
            Children::Tail(_) => None,
        }
    }

    /// A tail becomes a child: the first of its levels, holding the rest.
    fn open_tail(&mut self) {
        if !matches!(self, Children::Tail(_)) {
            return;
        }
        let Children::Tail(t) = std::mem::take(self) else {
            return;
        };
        let Tail { levels, entry } = *t;
        let text = levels.to_text();
        let (first, rest) = match text.split_once('/') {
            Some((first, rest)) => (first, Some(rest)),
            None => (&*text, None),
        };
        let child = match rest {
            Some(rest) => RouteNode {
                children: Children::Tail(Box::new(Tail {
                    levels: Level::new(rest),
                    entry,
                })),
                entry: Entry::default(),
            },
            None => RouteNode {
                children: Children::default(),
                entry,
            },
        };
        *self = Children::Few(vec![(Level::new(first), child)]);
    }

    fn get_or_add(&mut self, level: &str) -> &mut RouteNode {
        self.open_tail();
        if let Children::Few(v) = self {
            if v.len() >= FEW && !v.iter().any(|(k, _)| k.as_bytes() == level.as_bytes()) {
                *self = Children::Many(Box::new(std::mem::take(v).into_iter().collect()));
            }
        }
        match self {
            Children::Few(v) => {
                let i = match v.iter().position(|(k, _)| k.as_bytes() == level.as_bytes()) {
                    Some(i) => i,
                    None => {
                        // Exactly one more: a list grown by doubling would be mostly empty.
                        v.reserve_exact(1);
                        v.push((Level::new(level), RouteNode::default()));
                        v.len() - 1
                    }
                };
                &mut v[i].1
            }
            Children::Many(m) => m.entry(Level::new(level)).or_default(),
            // (Opened above: not reached.)
            Children::Tail(_) => {
                self.open_tail();
                self.get_or_add(level)
            }
        }
    }

    fn remove(&mut self, level: &str) {
        match self {
            Children::Few(v) => {
                v.retain(|(k, _)| k.as_bytes() != level.as_bytes());
                v.shrink_to_fit();
            }
            Children::Many(m) => {
                m.remove(level.as_bytes());
            }
            Children::Tail(_) => {}
        }
    }

    /// The children (not a tail), for listings.
    fn iter(&self) -> Box<dyn Iterator<Item = (&Level, &RouteNode)> + '_> {
        match self {
            Children::Few(v) => Box::new(v.iter().map(|(k, n)| (k, n))),
            Children::Many(m) => Box::new(m.iter()),
            Children::Tail(_) => Box::new(std::iter::empty()),
        }
    }
}

/// The entry of the route whose levels (below `at`) are `levels`, made if missing.
fn entry_at<'n>(at: &'n mut RouteNode, levels: &[&str]) -> &'n mut Entry {
    let Some((first, rest)) = levels.split_first() else {
        return &mut at.entry;
    };
    if at.children.is_empty() {
        // Nothing below: the whole path is one tail.
        at.children = Children::Tail(Box::new(Tail {
            levels: Level::new(&levels.join("/")),
            entry: Entry::default(),
        }));
    }
    let same = matches!(&at.children, Children::Tail(t) if t.levels.is_path(levels));
    if same {
        return match &mut at.children {
            Children::Tail(t) => &mut t.entry,
            _ => &mut at.entry,
        };
    }
    entry_at(at.children.get_or_add(first), rest)
}

/// The entry of the route whose levels (below `at`) are `levels`, if there is one.
fn entry_of<'n>(at: &'n RouteNode, levels: &[&str]) -> Option<&'n Entry> {
    let Some((first, rest)) = levels.split_first() else {
        return Some(&at.entry);
    };
    match &at.children {
        Children::Tail(t) => t.levels.is_path(levels).then_some(&t.entry),
        c => entry_of(c.get(first)?, rest),
    }
}

/// Whether the levels of a tail (`levels`, wildcards allowed) match the rest of a topic;
/// `wildcards`: whether the first may match by a wildcard (not a `$` topic's first level).
fn tail_matches(levels: &Level, mut topic: std::str::Split<'_, char>, mut wildcards: bool) -> bool {
    let mut filter = levels.as_bytes().split(|&b| b == b'/');
    loop {
        match (filter.next(), topic.next()) {
            (None, None) => return true,
            // "a/#" also matches "a".
            (Some(b"#"), _) => return wildcards,
            (Some(b"+"), Some(_)) if wildcards => {}
            (Some(f), Some(t)) if f == t.as_bytes() => {}
            _ => return false,
        }
        wildcards = true;
    }
}

/// Filters without wildcards (most of a fleet's: `cmd/<device>`) are looked up by the topic
/// itself; the others are matched level by level in a trie.
#[derive(Default)]
struct Table {
    exact: HashMap<Box<str>, Entry>,
    wild: RouteNode,
    /// node -> how many (group, filter) routes it is in.
    per_node: HashMap<u64, usize>,
}

/// Takes `node` out of every route at and below `at`, pruning what empties; returns how
/// many it was in.
fn prune_node(at: &mut RouteNode, node: u64) -> usize {
    let mut n = at.entry.remove_node(node);
    match &mut at.children {
        Children::Tail(t) => {
            n += t.entry.remove_node(node);
            if t.entry.is_empty() {
                at.children = Children::default();
            }
        }
        Children::Few(v) => {
            for (_, c) in v.iter_mut() {
                n += prune_node(c, node);
            }
            v.retain(|(_, c)| !c.is_empty());
            v.shrink_to_fit();
        }
        Children::Many(m) => {
            for c in m.values_mut() {
                n += prune_node(c, node);
            }
            m.retain(|_, c| !c.is_empty());
        }
    }
    n
}

/// Calls `f` with (group, filter, nodes) for each route at and below `at`, whose path is
/// `path` (the root: `root`, its path is empty; a level may be empty too).
fn visit_node(
    at: &RouteNode,
    root: bool,
    path: &mut String,
    f: &mut dyn FnMut(&str, &str, &NodeSet),
) {
    if !root {
        at.entry.each(|g, nodes| f(g, path, nodes));
    }
    let below = |level: &Level, path: &mut String| {
        let len = path.len();
        if !root {
            path.push('/');
        }
        path.push_str(&level.to_text());
        len
    };
    if let Children::Tail(t) = &at.children {
        let len = below(&t.levels, path);
        t.entry.each(|g, nodes| f(g, path, nodes));
        path.truncate(len);
    }
    for (level, child) in at.children.iter() {
        let len = below(level, path);
        visit_node(child, false, path, f);
        path.truncate(len);
    }
}

fn has_wildcard(filter: &str) -> bool {
    filter.split('/').any(|l| l == "+" || l == "#")
}

impl Table {
    /// Adds (`group`, `filter`, `node`); returns whether it was new.
    fn add(&mut self, group: &str, filter: &str, node: u64) -> bool {
        let entry = match has_wildcard(filter) {
            false => self.exact.entry(filter.into()).or_default(),
            true => {
                let levels: Vec<&str> = filter.split('/').collect();
                entry_at(&mut self.wild, &levels)
            }
        };
        let set = entry.set_mut(group, filter);
        let new = !set.contains(&node);
        set.insert(node);
        if new {
            *self.per_node.entry(node).or_default() += 1;
        }
        new
    }

    /// Takes `node` out of every route; returns how many it was in.
    fn remove_node(&mut self, node: u64) -> usize {
        let mut n = 0;
        self.exact.retain(|_, e| {
            n += e.remove_node(node);
            !e.is_empty()
        });
        n += prune_node(&mut self.wild, node);
        self.per_node.remove(&node);
        n
    }

    /// Calls `f` with (group, filter, nodes) for each route.
    fn visit(&self, f: &mut dyn FnMut(&str, &str, &NodeSet)) {
        for (filter, e) in &self.exact {
            e.each(|g, nodes| f(g, filter, nodes));
        }
        visit_node(&self.wild, true, &mut String::new(), f);
    }

    /// A route of `node` is gone: counted.
    fn uncount(&mut self, node: u64) {
        if let Some(n) = self.per_node.get_mut(&node) {
            *n -= 1;
            if *n == 0 {
                self.per_node.remove(&node);
            }
        }
    }

    /// The entry of `filter`, if it has one.
    fn entry(&self, filter: &str) -> Option<&Entry> {
        match has_wildcard(filter) {
            false => self.exact.get(filter),
            true => {
                let levels: Vec<&str> = filter.split('/').collect();
                entry_of(&self.wild, &levels)
            }
        }
    }

    /// Removes (`group`, `filter`, `node`); returns whether it was there.
    fn remove(&mut self, group: &str, filter: &str, node: u64) -> bool {
        fn walk(at: &mut RouteNode, levels: &[&str], group: &str, node: u64) -> bool {
            let Some((first, rest)) = levels.split_first() else {
                return at.entry.remove(group, node);
            };
            if let Children::Tail(t) = &mut at.children {
                if !t.levels.is_path(levels) {
                    return false;
                }
                let found = t.entry.remove(group, node);
                if t.entry.is_empty() {
                    at.children = Children::default();
                }
                return found;
            }
            let Some(child) = at.children.get_mut(first) else {
                return false;
            };
            let found = walk(child, rest, group, node);
            if child.is_empty() {
                at.children.remove(first);
            }
            found
        }
        let found = match has_wildcard(filter) {
            true => {
                let levels: Vec<&str> = filter.split('/').collect();
                walk(&mut self.wild, &levels, group, node)
            }
            false => {
                let Some(entry) = self.exact.get_mut(filter) else {
                    return false;
                };
                let found = entry.remove(group, node);
                if entry.is_empty() {
                    self.exact.remove(filter);
                }
                found
            }
        };
        if found {
            self.uncount(node);
        }
        found
    }
}

/// The route table for matching (see the module docs).
pub struct RouteTable {
    me: u64,
    /// Which node serves a share group with members on several (`cluster.shared_strategy`).
    strategy: SharedStrategy,
    table: RwLock<Table>,
    /// (group, filter, node) entries whose node is not this one.
    remote: AtomicUsize,
    /// The Raft log index the table is current up to: every route change of the entries up
    /// to it is in, none of a later one. Changed under the write lock with the routes (so a
    /// publish reads the routes and the index of one state: [`RouteTable::collect`]).
    index: AtomicU64,
    /// Sessions whose routes a claim brought to this node before the session is in its
    /// router ([`RouteTable::expect`]).
    arrivals: std::sync::Mutex<Vec<Arrival>>,
    arriving: AtomicUsize,
    /// Claims of this node proposed and not applied here yet.
    claiming: AtomicUsize,
    /// Woken when the index moves or a session arrives.
    changed: tokio::sync::Notify,
}

/// A table of no node (node 0): one decoded from a snapshot before it is moved into the
/// node's ([`RouteTable::replace_from`]), or a test's.
impl Default for RouteTable {
    fn default() -> RouteTable {
        RouteTable::new(0)
    }
}

impl std::fmt::Debug for RouteTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RouteTable")
            .field("me", &self.me)
            .field("index", &self.index())
            .field("routes_per_node", &self.node_counts())
            .finish()
    }
}

/// See [`RouteTable::claim_proposed`].
pub struct ClaimInFlight<'a>(&'a RouteTable);

impl Drop for ClaimInFlight<'_> {
    fn drop(&mut self) {
        self.0.claiming.fetch_sub(1, Ordering::AcqRel);
        self.0.changed.notify_waiters();
    }
}

/// A session moving to this node: the claim at `index` brought its routes (`filters`).
struct Arrival {
    client_id: std::sync::Arc<str>,
    index: u64,
    filters: Vec<String>,
    since: std::time::Instant,
    /// Messages published on this node for it meanwhile ([`RouteTable::hold_for_arrivals`]).
    held: Vec<std::sync::Arc<crate::message::Message>>,
}

/// Longest a forwarded copy waits for this node to apply what its sender had applied, or for
/// a session it is for to arrive (the claim's hand-over is bounded by the takeover timeout).
pub const ARRIVAL_WAIT: std::time::Duration = std::time::Duration::from_secs(6);

/// One change of the route table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RouteOp {
    /// Node `node` has subscribers to `filter` in `group` ("" for none).
    Add {
        group: String,
        filter: String,
        node: u64,
    },
    /// Node `node` has none any more.
    Del {
        group: String,
        filter: String,
        node: u64,
    },
    /// Node `node` left the cluster: none of its routes stay.
    NodeGone(u64),
}

impl RouteTable {
    /// An empty table of node `me` (whose own routes are kept but never forwarded to).
    pub fn new(me: u64) -> RouteTable {
        RouteTable::with_strategy(me, SharedStrategy::LocalFirst)
    }

    /// As [`RouteTable::new`], share groups served by `strategy`. With any strategy but
    /// `LocalFirst`, [`RouteTable::collect`] also returns a target for this node: the share
    /// groups it serves itself (and only those).
    pub fn with_strategy(me: u64, strategy: SharedStrategy) -> RouteTable {
        RouteTable {
            me,
            strategy,
            table: RwLock::new(Table::default()),
            remote: AtomicUsize::new(0),
            index: AtomicU64::new(0),
            arrivals: Default::default(),
            arriving: AtomicUsize::new(0),
            claiming: AtomicUsize::new(0),
            changed: tokio::sync::Notify::new(),
        }
    }

    /// The node whose table this is.
    pub fn me(&self) -> u64 {
        self.me
    }

    /// `cluster.shared_strategy`.
    pub fn strategy(&self) -> SharedStrategy {
        self.strategy
    }

    /// Whether another node has any route: if not, nothing is ever forwarded.
    pub fn has_remote(&self) -> bool {
        self.remote.load(Ordering::Relaxed) > 0
    }

    /// The log index the table is current up to. Read before [`RouteTable::has_remote`], it
    /// is one the answer holds for (the changes up to it are seen).
    pub fn index(&self) -> u64 {
        self.index.load(Ordering::Acquire)
    }

    /// A claim at `index` brought the routes of `client_id`'s session (its plain
    /// `filters`) to this node, before the session is in the router here: forwarded copies
    /// routed at `index` or later that match them wait for it ([`RouteTable::arrived`]).
    /// Called while the claim is applied, before the index moves.
    pub fn expect(&self, client_id: std::sync::Arc<str>, index: u64, filters: Vec<String>) {
        let mut a = self.arrivals.lock().unwrap_or_else(|e| e.into_inner());
        a.push(Arrival {
            client_id,
            index,
            filters,
            since: std::time::Instant::now(),
            held: Vec::new(),
        });
        self.arriving.store(a.len(), Ordering::Release);
    }

    /// A claim of this node is proposed, until the guard goes (it is applied here, or
    /// failed): a forwarded copy routed at an index this node has not applied yet may be for
    /// a session that claim moves here, and waits for that index.
    pub fn claim_proposed(&self) -> ClaimInFlight<'_> {
        self.claiming.fetch_add(1, Ordering::AcqRel);
        ClaimInFlight(self)
    }

    /// Whether removing this node's route to `filter` (in `group`) must wait: a claim of
    /// this node that may bring routes is in flight, or a session whose claim brought that
    /// route here is not in the router yet (its subscriptions are not counted yet). The
    /// route is then left to the next reconciliation.
    pub fn removal_must_wait(&self, group: Option<&str>, filter: &str) -> bool {
        if group.is_some() {
            return false;
        }
        if self.claiming.load(Ordering::Acquire) > 0 {
            return true;
        }
        self.arriving_filters().iter().any(|f| f == filter)
    }

    /// Whether a claim of this node that may bring routes is in flight.
    pub fn claims_in_flight(&self) -> bool {
        self.claiming.load(Ordering::Acquire) > 0
    }

    /// The plain filters of the sessions on their way here ([`RouteTable::expect`]): this
    /// node's routes to them stay.
    pub fn arriving_filters(&self) -> Vec<String> {
        if self.arriving.load(Ordering::Acquire) == 0 {
            return Vec::new();
        }
        let a = self.arrivals.lock().unwrap_or_else(|e| e.into_inner());
        a.iter()
            .filter(|x| x.since.elapsed() < ARRIVAL_WAIT)
            .flat_map(|x| x.filters.iter().cloned())
            .collect()
    }

    /// `client_id`'s session is in the router here (or will not come). Returns the
    /// messages published here for it meanwhile, to deliver to it.
    pub fn arrived(&self, client_id: &str) -> Vec<std::sync::Arc<crate::message::Message>> {
        if self.arriving.load(Ordering::Acquire) == 0 {
            return Vec::new();
        }
        let mut held = Vec::new();
        let mut a = self.arrivals.lock().unwrap_or_else(|e| e.into_inner());
        a.retain_mut(|x| {
            if &*x.client_id == client_id {
                held.append(&mut x.held);
                return false;
            }
            x.since.elapsed() < ARRIVAL_WAIT
        });
        self.arriving.store(a.len(), Ordering::Release);
        drop(a);
        self.changed.notify_waiters();
        held
    }

    /// Keeps `msg`, published on this node and routed at `routed_at`, for each session
    /// moving here that it is for and that is not in the router yet (its claim is at
    /// `routed_at` or before). Call it before the router is read: a session that arrives
    /// meanwhile is then in the router.
    /// Returns the client ids it held it for (none allocates nothing).
    pub fn hold_for_arrivals(
        &self,
        msg: &std::sync::Arc<crate::message::Message>,
        routed_at: u64,
    ) -> Vec<std::sync::Arc<str>> {
        let mut held = Vec::new();
        if self.arriving.load(Ordering::Acquire) == 0 {
            return held;
        }
        let mut a = self.arrivals.lock().unwrap_or_else(|e| e.into_inner());
        for x in a.iter_mut() {
            if x.index <= routed_at
                && x.since.elapsed() < ARRIVAL_WAIT
                && x.filters
                    .iter()
                    .any(|f| super::topic::matches(f, &msg.topic))
            {
                x.held.push(msg.clone());
                held.push(x.client_id.clone());
            }
        }
        held
    }

    /// Whether a copy of `topic` routed at `routed_at` (for `client_id` only, if not
    /// empty) must wait: this node has not applied that index yet, or it is for a session
    /// still arriving.
    fn must_wait(&self, topic: &str, routed_at: u64, client_id: &str) -> bool {
        if self.index() < routed_at && self.claiming.load(Ordering::Acquire) > 0 {
            return true;
        }
        if self.arriving.load(Ordering::Acquire) == 0 {
            return false;
        }
        let a = self.arrivals.lock().unwrap_or_else(|e| e.into_inner());
        a.iter().any(|x| {
            x.since.elapsed() < ARRIVAL_WAIT
                && match client_id.is_empty() {
                    false => &*x.client_id == client_id,
                    true => {
                        x.index <= routed_at
                            && x.filters.iter().any(|f| super::topic::matches(f, topic))
                    }
                }
        })
    }

    /// Waits (up to [`ARRIVAL_WAIT`]) until a forwarded copy of `topic` routed at
    /// `routed_at` can be delivered here: this node has applied what the sender had (its
    /// routes, and a claim that moved a session here), and a session moving here that the
    /// copy is for is in the router. Returns at once in the common case.
    pub async fn ready_for(&self, topic: &str, routed_at: u64, client_id: &str) {
        if !self.must_wait(topic, routed_at, client_id) {
            return;
        }
        let deadline = tokio::time::Instant::now() + ARRIVAL_WAIT;
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            if !self.must_wait(topic, routed_at, client_id) {
                return;
            }
            if tokio::time::timeout_at(deadline, changed).await.is_err() {
                return;
            }
        }
    }

    /// The changes of one applied log entry (`ops`, maybe none) and its `index`, at once.
    pub fn apply(&self, ops: &[RouteOp], index: u64) {
        if ops.is_empty() {
            // Nothing for a publish to see half-done.
            self.index.fetch_max(index, Ordering::AcqRel);
            self.changed.notify_waiters();
            return;
        }
        let mut t = self.write();
        for op in ops {
            match op {
                RouteOp::Add {
                    group,
                    filter,
                    node,
                } => self.add_in(&mut t, group, filter, *node),
                RouteOp::Del {
                    group,
                    filter,
                    node,
                } => self.remove_in(&mut t, group, filter, *node),
                RouteOp::NodeGone(node) => {
                    let n = t.remove_node(*node);
                    if *node != self.me {
                        self.remote.fetch_sub(n, Ordering::Relaxed);
                    }
                }
            }
        }
        self.index.fetch_max(index, Ordering::AcqRel);
        drop(t);
        self.changed.notify_waiters();
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Table> {
        self.table.write().unwrap_or_else(|e| e.into_inner())
    }

    /// Node `node` has subscribers to `filter` (in share group `group`, "" for none).
    pub fn add(&self, group: &str, filter: &str, node: u64) {
        self.add_in(&mut self.write(), group, filter, node);
    }

    /// Node `node` has no subscriber to `filter` (in `group`) any more.
    pub fn remove(&self, group: &str, filter: &str, node: u64) {
        self.remove_in(&mut self.write(), group, filter, node);
    }

    /// [`RouteTable::add`] in the locked `t`, counting a new remote route.
    fn add_in(&self, t: &mut Table, group: &str, filter: &str, node: u64) {
        if t.add(group, filter, node) && node != self.me {
            self.remote.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// [`RouteTable::remove`] in the locked `t`, counting a remote route gone.
    fn remove_in(&self, t: &mut Table, group: &str, filter: &str, node: u64) {
        if t.remove(group, filter, node) && node != self.me {
            self.remote.fetch_sub(1, Ordering::Relaxed);
        }
    }

    /// Takes the routes of `other` (a table decoded from a snapshot), leaving it empty:
    /// swapped in at once with its index, so a publish sees the old table or the new.
    pub fn replace_from(&self, other: &RouteTable, index: u64) {
        let table = std::mem::take(&mut *other.write());
        other.remote.store(0, Ordering::Relaxed);
        self.install(table, index);
    }

    fn install(&self, table: Table, index: u64) {
        let remote = table
            .per_node
            .iter()
            .filter(|(n, _)| **n != self.me)
            .map(|(_, c)| c)
            .sum();
        let mut t = self.write();
        *t = table;
        self.remote.store(remote, Ordering::Relaxed);
        // A snapshot replaces everything, its index too (it may be behind what this table
        // had only when a node's log was lost; then the lower index is the true one).
        self.index.store(index, Ordering::Release);
        drop(t);
        self.changed.notify_waiters();
    }

    /// Where a publish to `topic` must be forwarded, one entry per other node, appended to
    /// `out` (sorted by node). A share group with a member on this node is served here
    /// (local first); one without gets one node of those that have members, in turn.
    /// Returns the log index the routes were current up to.
    pub fn collect(&self, topic: &str, out: &mut Vec<Target>) -> u64 {
        let t = self.table.read().unwrap_or_else(|e| e.into_inner());
        let index = self.index.load(Ordering::Acquire);
        let pick = Pick {
            me: self.me,
            strategy: self.strategy,
        };
        if let Some(e) = t.exact.get(topic) {
            add_targets(e, pick, out);
        }
        if !t.wild.children.is_empty() {
            let wildcards = !topic.starts_with('$');
            walk(&t.wild, topic.split('/'), wildcards, pick, out);
        }
        drop(t);
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
        index
    }

    /// Another node with a member of share group `group` on `filter` (in turn), if any.
    pub fn shared_node(&self, group: &str, filter: &str) -> Option<u64> {
        let t = self.table.read().unwrap_or_else(|e| e.into_inner());
        let entry = t.entry(filter)?;
        let s = entry.shared.as_ref()?.iter().find(|s| &*s.group == group)?;
        let others: Vec<u64> = s.nodes.iter().copied().filter(|&n| n != self.me).collect();
        let at = s.next.fetch_add(1, Ordering::Relaxed);
        others.get(at % others.len().max(1)).copied()
    }

    /// Calls `f` with (group, "" for none; filter; nodes) for each route, in no particular
    /// order, under the table's read lock (a publish reads alongside; a change waits).
    pub fn visit(&self, mut f: impl FnMut(&str, &str, &NodeSet)) {
        let t = self.table.read().unwrap_or_else(|e| e.into_inner());
        t.visit(&mut f);
    }

    /// How many routes each node is in: (node, routes), by node.
    pub fn node_counts(&self) -> Vec<(u64, usize)> {
        let t = self.table.read().unwrap_or_else(|e| e.into_inner());
        let mut out: Vec<(u64, usize)> = t.per_node.iter().map(|(n, c)| (*n, *c)).collect();
        out.sort_unstable();
        out
    }

    /// The nodes of (`group`, `filter`).
    pub fn nodes_of(&self, group: &str, filter: &str) -> NodeSet {
        let t = self.table.read().unwrap_or_else(|e| e.into_inner());
        let Some(e) = t.entry(filter) else {
            return NodeSet::Empty;
        };
        let mut out = NodeSet::Empty;
        e.each(|g, nodes| {
            if g == group {
                out = nodes.clone();
            }
        });
        out
    }

    /// The routes of `node`: (group, "" for none; filter).
    pub fn routes_of(&self, node: u64) -> Vec<(String, String)> {
        let mut out = Vec::new();
        self.visit(|g, f, nodes| {
            if nodes.contains(&node) {
                out.push((g.to_owned(), f.to_owned()));
            }
        });
        out
    }

    /// Every route, as (group, filter, node), sorted: for tests and the admin API.
    pub fn entries(&self) -> Vec<(String, String, u64)> {
        let mut out = Vec::new();
        self.visit(|g, f, nodes| {
            for &n in nodes {
                out.push((g.to_owned(), f.to_owned(), n));
            }
        });
        out.sort();
        out
    }
}

/// Who matches: this node, and how it picks a share group's node.
#[derive(Clone, Copy)]
struct Pick {
    me: u64,
    strategy: SharedStrategy,
}

impl Pick {
    /// The node that serves share group `s` (`None`: this node, by the local-first rule,
    /// which the caller's own trie applies).
    fn node(self, s: &SharedRoute) -> Option<u64> {
        let nodes = s.nodes.as_slice();
        if nodes.is_empty() {
            return None;
        }
        let at = match self.strategy {
            SharedStrategy::LocalFirst if s.nodes.contains(&self.me) => return None,
            SharedStrategy::LocalFirst | SharedStrategy::RoundRobin => {
                s.next.fetch_add(1, Ordering::Relaxed)
            }
            SharedStrategy::Random => random(),
        };
        Some(nodes[at % nodes.len()])
    }
}

/// A cheap per-thread pseudo-random number (xorshift), for `SharedStrategy::Random`.
fn random() -> usize {
    use std::cell::Cell;
    thread_local! {
        static STATE: Cell<u64> = Cell::new({
            let t = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(0);
            // Distinct per thread even when started in the same nanosecond.
            (t ^ (&t as *const u64 as u64).rotate_left(32)) | 1
        });
    }
    STATE.with(|s| {
        let mut x = s.get();
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        s.set(x);
        x as usize
    })
}

fn add_targets(e: &Entry, pick: Pick, out: &mut Vec<Target>) {
    let me = pick.me;
    for &n in &e.plain {
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
    for s in e.shared.iter().flat_map(|v| v.iter()) {
        let Some(n) = pick.node(s) else {
            continue;
        };
        let target = (s.group.clone(), s.filter.clone());
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

fn walk(
    at: &RouteNode,
    mut levels: std::str::Split<'_, char>,
    wildcards: bool,
    pick: Pick,
    out: &mut Vec<Target>,
) {
    if let Children::Tail(t) = &at.children {
        if levels.clone().next().is_none() {
            add_targets(&at.entry, pick, out);
        }
        if tail_matches(&t.levels, levels, wildcards) {
            add_targets(&t.entry, pick, out);
        }
        return;
    }
    match levels.next() {
        None => {
            add_targets(&at.entry, pick, out);
            // "a/#" also matches "a".
            if let Some(hash) = at.children.get("#") {
                add_targets(&hash.entry, pick, out);
            }
        }
        Some(level) => {
            if wildcards {
                if let Some(hash) = at.children.get("#") {
                    add_targets(&hash.entry, pick, out);
                }
                if let Some(plus) = at.children.get("+") {
                    walk(plus, levels.clone(), true, pick, out);
                }
            }
            if let Some(child) = at.children.get(level) {
                walk(child, levels, true, pick, out);
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
        let table = t.table.read().unwrap();
        assert!(
            table.wild.is_empty() && table.exact.is_empty(),
            "empty levels pruned"
        );
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
    fn round_robin_and_random_count_this_node_as_one_of_the_group_s_nodes() {
        let shared_of = |got: &[Target], node: u64| {
            got.iter()
                .filter(|t| t.node == node)
                .map(|t| t.shared.len())
                .sum::<usize>()
        };
        let t = RouteTable::with_strategy(1, SharedStrategy::RoundRobin);
        t.add("g", "s/+", 1);
        t.add("g", "s/+", 2);
        t.add("g", "s/+", 3);
        let mut per_node = [0; 4];
        for _ in 0..30 {
            let got = nodes(&t, "s/x");
            assert_eq!(got.len(), 1, "one node serves each message: {got:?}");
            assert!(!got[0].plain, "this node's plain routes are never targets");
            per_node[got[0].node as usize] += shared_of(&got, got[0].node);
        }
        assert_eq!(per_node, [0, 10, 10, 10]);
        let r = RouteTable::with_strategy(1, SharedStrategy::Random);
        r.add("g", "s/+", 1);
        r.add("g", "s/+", 2);
        let mut per_node = [0; 3];
        for _ in 0..400 {
            let got = nodes(&r, "s/x");
            assert_eq!(got.len(), 1);
            per_node[got[0].node as usize] += 1;
        }
        assert!(
            per_node[1] > 100 && per_node[2] > 100,
            "both chosen: {per_node:?}"
        );
    }

    #[test]
    fn another_member_node_is_found_for_a_group() {
        let t = RouteTable::new(1);
        assert_eq!(t.shared_node("g", "s/+"), None);
        t.add("g", "s/+", 1);
        assert_eq!(t.shared_node("g", "s/+"), None, "only this node");
        t.add("g", "s/+", 3);
        t.add("g", "exact", 2);
        assert_eq!(t.shared_node("g", "s/+"), Some(3));
        assert_eq!(t.shared_node("g", "exact"), Some(2));
        assert_eq!(t.shared_node("h", "s/+"), None, "another group");
    }

    #[test]
    fn an_entry_s_changes_and_its_index_are_seen_together() {
        let t = RouteTable::new(1);
        let mut out = Vec::new();
        assert_eq!(t.collect("a/b", &mut out), 0);
        let add = |filter: &str, node| RouteOp::Add {
            group: String::new(),
            filter: filter.into(),
            node,
        };
        t.apply(&[add("a/+", 2), add("a/b", 3)], 7);
        assert_eq!(t.index(), 7);
        assert_eq!(t.collect("a/b", &mut out), 7);
        assert_eq!(out.iter().map(|t| t.node).collect::<Vec<_>>(), [2, 3]);
        // An entry without route changes moves the index only.
        t.apply(&[], 9);
        out.clear();
        assert_eq!(t.collect("a/b", &mut out), 9);
        assert_eq!(out.len(), 2);
        t.apply(
            &[RouteOp::Del {
                group: String::new(),
                filter: "a/+".into(),
                node: 2,
            }],
            11,
        );
        out.clear();
        assert_eq!(t.collect("a/b", &mut out), 11);
        assert_eq!(out, [plain(3)]);
        assert!(t.has_remote());
        // A node that leaves takes all its routes, counted.
        t.apply(&[add("x/#", 3), add("y", 4)], 12);
        assert_eq!(t.node_counts(), [(3, 2), (4, 1)]);
        t.apply(&[RouteOp::NodeGone(3)], 13);
        assert_eq!(t.node_counts(), [(4, 1)]);
        assert_eq!(t.entries(), [("".into(), "y".into(), 4)]);
        assert_eq!(nodes(&t, "a/b"), []);
        assert!(t.has_remote(), "node 4's route");
        t.apply(&[RouteOp::NodeGone(4)], 14);
        assert!(!t.has_remote());
        assert!(t.table.read().unwrap().wild.is_empty(), "pruned");
    }

    #[test]
    fn replace_rebuilds_and_counts() {
        let t = RouteTable::new(1);
        t.add("", "old", 2);
        let decoded = RouteTable::default();
        decoded.add("", "x/y", 2);
        decoded.add("g", "x/+", 1);
        decoded.add("g", "x/+", 3);
        t.replace_from(&decoded, 5);
        assert!(decoded.entries().is_empty() && !decoded.has_remote());
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

    #[test]
    fn a_level_with_many_children_still_matches_and_prunes() {
        let t = RouteTable::new(1);
        for i in 0..50 {
            t.add("", &format!("fleet/dev{i}/+/status"), 2 + i % 3);
        }
        assert_eq!(nodes(&t, "fleet/dev7/x/status"), vec![plain(3)]);
        assert_eq!(nodes(&t, "fleet/dev49/y/status"), vec![plain(3)]);
        assert_eq!(nodes(&t, "fleet/dev50/y/status"), vec![]);
        assert_eq!(t.entries().len(), 50);
        for i in 0..50 {
            t.remove("", &format!("fleet/dev{i}/+/status"), 2 + i % 3);
        }
        assert!(!t.has_remote());
        assert!(t.table.read().unwrap().wild.is_empty(), "pruned to nothing");
    }

    #[test]
    fn a_route_costs_few_words() {
        // Every node holds every route: a million of them in a big fleet.
        assert_eq!(std::mem::size_of::<NodeSet>(), 16);
        assert_eq!(std::mem::size_of::<Level>(), 24);
        assert!(std::mem::size_of::<Entry>() <= 24);
        assert!(std::mem::size_of::<RouteNode>() <= 48);
        // A route of its own below a shared prefix is one tail: `+/status` inline.
        let t = RouteTable::new(1);
        t.add("", "fleet/dev1/+/status", 2);
        t.add("", "fleet/dev2/+/status", 2);
        let table = t.table.read().unwrap();
        let fleet = table.wild.children.get("fleet").expect("shared level");
        let dev1 = fleet.children.get("dev1").expect("a level each");
        assert!(matches!(&dev1.children, Children::Tail(t) if t.levels.is_path(&["+", "status"])));
    }

    mod matching {
        use super::*;
        use proptest::prelude::*;
        use std::collections::BTreeSet;

        /// A filter of 1 to 4 levels from a small alphabet (so that routes share prefixes,
        /// tails open and close), `#` only last.
        fn filter() -> impl Strategy<Value = String> {
            let level = prop_oneof![
                Just("a"),
                Just("b"),
                Just("+"),
                Just(""),
                Just("$s"),
                Just("a-level-name-longer-than-inline")
            ];
            (prop::collection::vec(level, 1..4), any::<bool>()).prop_map(|(levels, hash)| {
                let mut f = levels.join("/");
                if hash {
                    f.push_str(if f.is_empty() { "#" } else { "/#" });
                }
                f
            })
        }

        fn topic() -> impl Strategy<Value = String> {
            let level = prop_oneof![
                Just("a"),
                Just("b"),
                Just(""),
                Just("$s"),
                Just("a-level-name-longer-than-inline")
            ];
            prop::collection::vec(level, 1..5).prop_map(|l| l.join("/"))
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(300))]

            /// Whatever routes come and go, the table matches as `topic::matches` does over
            /// the routes it holds, lists them, and prunes to nothing once they are gone.
            #[test]
            fn the_table_matches_as_each_filter_does(
                ops in prop::collection::vec((filter(), 1u64..4, any::<bool>()), 1..40),
                topics in prop::collection::vec(topic(), 1..12),
            ) {
                let t = RouteTable::new(9);
                let mut want: BTreeSet<(String, u64)> = BTreeSet::new();
                for (f, node, add) in &ops {
                    match add {
                        true => {
                            t.add("", f, *node);
                            want.insert((f.clone(), *node));
                        }
                        false => {
                            t.remove("", f, *node);
                            want.remove(&(f.clone(), *node));
                        }
                    }
                }
                for topic in &topics {
                    let mut out = Vec::new();
                    t.collect(topic, &mut out);
                    let got: BTreeSet<u64> = out.iter().filter(|x| x.plain).map(|x| x.node).collect();
                    let expected: BTreeSet<u64> = want
                        .iter()
                        .filter(|(f, _)| crate::router::topic::matches(f, topic))
                        .map(|(_, n)| *n)
                        .collect();
                    prop_assert_eq!(got, expected, "topic {:?}", topic);
                }
                let listed: BTreeSet<(String, u64)> =
                    t.entries().into_iter().map(|(_, f, n)| (f, n)).collect();
                prop_assert_eq!(&listed, &want);
                for (f, node) in &want {
                    t.remove("", f, *node);
                }
                let table = t.table.read().unwrap();
                prop_assert!(table.wild.is_empty() && table.exact.is_empty());
            }
        }
    }
}
