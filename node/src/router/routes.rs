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

/// Most trie levels have one child or a few (`+`, `#`, `status`): a short list, searched in
/// order, costs a fraction of a hash table's smallest allocation; a level with many children
/// (`dev<id>`) becomes a table.
enum Children {
    Few(Vec<(Box<str>, RouteNode)>),
    #[allow(clippy::box_collection)] // every trie node holds this enum: 3 words, not 6
    Many(Box<HashMap<Box<str>, RouteNode>>),
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
        }
    }

    fn get(&self, level: &str) -> Option<&RouteNode> {
        match self {
            Children::Few(v) => v.iter().find(|(k, _)| &**k == level).map(|(_, n)| n),
            Children::Many(m) => m.get(level),
        }
    }

    fn get_mut(&mut self, level: &str) -> Option<&mut RouteNode> {
        match self {
            Children::Few(v) => v.iter_mut().find(|(k, _)| &**k == level).map(|(_, n)| n),
            Children::Many(m) => m.get_mut(level),
        }
    }

    fn get_or_add(&mut self, level: &str) -> &mut RouteNode {
        if let Children::Few(v) = self {
            if v.len() >= FEW && !v.iter().any(|(k, _)| &**k == level) {
                *self = Children::Many(Box::new(std::mem::take(v).into_iter().collect()));
            }
        }
        match self {
            Children::Few(v) => {
                let i = match v.iter().position(|(k, _)| &**k == level) {
                    Some(i) => i,
                    None => {
                        v.push((level.into(), RouteNode::default()));
                        v.len() - 1
                    }
                };
                &mut v[i].1
            }
            Children::Many(m) => m.entry(level.into()).or_default(),
        }
    }

    fn remove(&mut self, level: &str) {
        match self {
            Children::Few(v) => v.retain(|(k, _)| &**k != level),
            Children::Many(m) => {
                m.remove(level);
            }
        }
    }

    fn iter(&self) -> Box<dyn Iterator<Item = (&Box<str>, &RouteNode)> + '_> {
        match self {
            Children::Few(v) => Box::new(v.iter().map(|(k, n)| (k, n))),
            Children::Many(m) => Box::new(m.iter()),
        }
    }
}

/// Filters without wildcards (most of a fleet's: `cmd/<device>`) are looked up by the topic
/// itself; the others are matched level by level in a trie.
#[derive(Default)]
struct Table {
    exact: HashMap<Box<str>, Entry>,
    wild: RouteNode,
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
                let mut at = &mut self.wild;
                for level in filter.split('/') {
                    at = at.children.get_or_add(level);
                }
                &mut at.entry
            }
        };
        let set = entry.set_mut(group, filter);
        let new = !set.contains(&node);
        set.insert(node);
        new
    }

    /// Removes (`group`, `filter`, `node`); returns whether it was there.
    fn remove(&mut self, group: &str, filter: &str, node: u64) -> bool {
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
                None => at.entry.remove(group, node),
            }
        }
        if has_wildcard(filter) {
            return walk(&mut self.wild, filter.split('/'), group, node);
        }
        let Some(entry) = self.exact.get_mut(filter) else {
            return false;
        };
        let found = entry.remove(group, node);
        if entry.is_empty() {
            self.exact.remove(filter);
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

/// One change of the route table: node `node` has (`add`) or no longer has subscribers to
/// `filter` in `group` ("" for none).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RouteOp {
    pub add: bool,
    pub group: String,
    pub filter: String,
    pub node: u64,
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
            let remote = op.node != self.me;
            match op.add {
                true if t.add(&op.group, &op.filter, op.node) && remote => {
                    self.remote.fetch_add(1, Ordering::Relaxed);
                }
                false if t.remove(&op.group, &op.filter, op.node) && remote => {
                    self.remote.fetch_sub(1, Ordering::Relaxed);
                }
                _ => {}
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
        if self.write().add(group, filter, node) && node != self.me {
            self.remote.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Node `node` has no subscriber to `filter` (in `group`) any more.
    pub fn remove(&self, group: &str, filter: &str, node: u64) {
        if self.write().remove(group, filter, node) && node != self.me {
            self.remote.fetch_sub(1, Ordering::Relaxed);
        }
    }

    /// Replaces the whole table (a snapshot was installed or loaded, a member removed):
    /// built aside, then swapped in at once, so a publish sees the old table or the new.
    pub fn replace<'a>(
        &self,
        routes: impl IntoIterator<Item = (&'a str, &'a str, &'a NodeSet)>,
        index: u64,
    ) {
        let mut table = Table::default();
        let mut remote = 0;
        for (group, filter, nodes) in routes {
            for &n in nodes {
                if table.add(group, filter, n) && n != self.me {
                    remote += 1;
                }
            }
        }
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
        let entry = match has_wildcard(filter) {
            false => t.exact.get(filter)?,
            true => {
                let mut at = &t.wild;
                for level in filter.split('/') {
                    at = at.children.get(level)?;
                }
                &at.entry
            }
        };
        let s = entry.shared.as_ref()?.iter().find(|s| &*s.group == group)?;
        let others: Vec<u64> = s.nodes.iter().copied().filter(|&n| n != self.me).collect();
        let at = s.next.fetch_add(1, Ordering::Relaxed);
        others.get(at % others.len().max(1)).copied()
    }

    /// Every route, as (group, filter, node), for tests and the admin API.
    pub fn entries(&self) -> Vec<(String, String, u64)> {
        fn push(e: &Entry, filter: &str, out: &mut Vec<(String, String, u64)>) {
            for &n in &e.plain {
                out.push((String::new(), filter.to_owned(), n));
            }
            for s in e.shared.iter().flat_map(|v| v.iter()) {
                for &n in &s.nodes {
                    out.push((s.group.to_string(), filter.to_owned(), n));
                }
            }
        }
        fn walk(at: &RouteNode, path: &mut String, out: &mut Vec<(String, String, u64)>) {
            push(&at.entry, path, out);
            for (level, child) in at.children.iter() {
                let len = path.len();
                path.push('/');
                path.push_str(level);
                walk(child, path, out);
                path.truncate(len);
            }
        }
        let t = self.table.read().unwrap_or_else(|e| e.into_inner());
        let mut out = Vec::new();
        for (filter, e) in &t.exact {
            push(e, filter, &mut out);
        }
        for (level, child) in t.wild.children.iter() {
            let mut path = level.to_string();
            walk(child, &mut path, &mut out);
        }
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
        let add = |filter: &str, node| RouteOp {
            add: true,
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
            &[RouteOp {
                add: false,
                ..add("a/+", 2)
            }],
            11,
        );
        out.clear();
        assert_eq!(t.collect("a/b", &mut out), 11);
        assert_eq!(out, [plain(3)]);
        assert!(t.has_remote());
    }

    #[test]
    fn replace_rebuilds_and_counts() {
        let t = RouteTable::new(1);
        t.add("", "old", 2);
        let (a, b) = (NodeSet::One(2), NodeSet::Many(vec![1, 3]));
        t.replace([("", "x/y", &a), ("g", "x/+", &b)], 5);
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
}
