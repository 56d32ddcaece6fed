//! The replicated route table as the publish path reads it: for every (share group, filter)
//! the nodes with at least one subscriber to it. A filter without wildcards is found by the
//! topic itself (one hash lookup); one with wildcards by its literal prefix (the levels
//! before its first wildcard: one lookup per level of the topic), below which a small trie
//! holds the rest of the filters with that prefix. Matching allocates nothing but the
//! caller's output.
//!
//! ```text
//!  Raft apply (RouteAdd / RouteDel / MemberRemove / snapshot) ──> RouteTable::apply
//!        copies the shards it changes, swaps in the new table (one pointer)
//!  Broker::publish ──> RouteTable::collect(topic) ──> [Target{node, plain, shared}] ──> forward
//!        reads whichever table is current, no lock
//! ```
//!
//! The cluster's state machine writes it (only there: it is a copy of `ClusterState::routes`
//! kept for matching); the broker reads it on every publish. A publish never waits for an
//! apply: the table is immutable once published, and an apply builds the next one beside it.
//! Copying a million routes per log entry would be too slow, so the table is cut into
//! shards of a few hundred routes (by hash), each behind its own `Arc`: the next table
//! shares every shard the entry does not touch and copies only those it does (copy on
//! write). A node that holds no route of another node (a single node, or a cluster whose
//! subscribers are all here) skips the walk: `has_remote` is one atomic load.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

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
#[derive(Clone, Default)]
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

impl Clone for SharedRoute {
    fn clone(&self) -> SharedRoute {
        SharedRoute {
            group: self.group.clone(),
            filter: self.filter.clone(),
            nodes: self.nodes.clone(),
            next: AtomicUsize::new(self.next.load(Ordering::Relaxed)),
        }
    }
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

#[derive(Clone, Default)]
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
#[derive(Clone)]
struct Tail {
    levels: Level,
    entry: Entry,
}

/// Most trie levels have one child or a few (`+`, `#`, `status`): a short list, searched in
/// order and allocated to its exact length, costs a fraction of a hash table's smallest
/// allocation; a level with many children (`dev<id>`) becomes a table; a node with a single
/// path below it holds that path as a [`Tail`].
#[derive(Clone)]
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
fn tail_matches<'t>(
    levels: &Level,
    mut topic: impl Iterator<Item = &'t str>,
    mut wildcards: bool,
) -> bool {
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

/// Keys are hashed with FNV-1a, byte by byte, so that one pass over a topic yields the hash
/// of every prefix a wildcard filter may be filed under ([`Table::matches`]); each hash is then
/// mixed (murmur3's finalizer) so that keys differing in their last bytes spread over the
/// shards (picked by the top bits). The offset basis is FNV's xor a per-process random seed:
/// filters made to fall into one shard (whose every change copies it whole) cannot be
/// worked out in advance.
fn fnv0() -> u64 {
    static BASIS: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *BASIS.get_or_init(|| {
        use std::hash::{BuildHasher, Hasher};
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u64(0x5eed);
        0xcbf2_9ce4_8422_2325 ^ h.finish()
    })
}

fn fnv(h: u64, b: u8) -> u64 {
    (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3)
}

fn mix(mut h: u64) -> u64 {
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^ (h >> 33)
}

fn hash_of(key: &[u8]) -> u64 {
    mix(key.iter().fold(fnv0(), |h, &b| fnv(h, b)))
}

/// Routes per shard above which a map doubles its shards: an apply copies each shard it
/// changes, so this bounds the copy per changed route (a few KiB).
const SHARD_ROUTES: usize = 64;

/// One shard of a [`Map`]: its keys sorted by hash, laid out flat (the keys' bytes one
/// after another, not one allocation each), both vectors allocated to their exact length.
#[derive(Clone)]
struct Shard<V> {
    slots: Vec<Slot<V>>,
    keys: Vec<u8>,
}

#[derive(Clone)]
struct Slot<V> {
    hash: u64,
    /// Where the key ends in `keys`.
    end: u32,
    value: V,
}

impl<V> Default for Shard<V> {
    fn default() -> Self {
        Shard {
            slots: Vec::new(),
            keys: Vec::new(),
        }
    }
}

impl<V> Shard<V> {
    fn start(&self, i: usize) -> usize {
        match i {
            0 => 0,
            i => self.slots[i - 1].end as usize,
        }
    }

    fn key(&self, i: usize) -> &[u8] {
        &self.keys[self.start(i)..self.slots[i].end as usize]
    }

    /// The slot of the key with `hash` for which `eq` holds; or where it would go.
    fn find(&self, hash: u64, eq: impl Fn(&[u8]) -> bool) -> Result<usize, usize> {
        let at = self.slots.partition_point(|s| s.hash < hash);
        let mut i = at;
        while i < self.slots.len() && self.slots[i].hash == hash {
            if eq(self.key(i)) {
                return Ok(i);
            }
            i += 1;
        }
        Err(at)
    }

    fn insert(&mut self, i: usize, hash: u64, key: &[u8], value: V) {
        let start = self.start(i);
        self.keys.reserve_exact(key.len());
        self.keys.splice(start..start, key.iter().copied());
        self.slots.reserve_exact(1);
        self.slots.insert(
            i,
            Slot {
                hash,
                end: start as u32,
                value,
            },
        );
        for s in &mut self.slots[i..] {
            s.end += key.len() as u32;
        }
    }

    fn remove(&mut self, i: usize) -> V {
        let start = self.start(i);
        let len = self.slots[i].end as usize - start;
        self.keys.drain(start..start + len);
        let slot = self.slots.remove(i);
        for s in &mut self.slots[i..] {
            s.end -= len as u32;
        }
        slot.value
    }

    /// A copy of this shard with (`hash`, `key`, `value`) inserted at `i`: one allocation
    /// each for the slots and keys, not a copy and then a larger one.
    fn with_inserted(&self, i: usize, hash: u64, key: &[u8], value: V) -> Shard<V>
    where
        V: Clone,
    {
        let start = self.start(i);
        let mut keys = Vec::with_capacity(self.keys.len() + key.len());
        keys.extend_from_slice(&self.keys[..start]);
        keys.extend_from_slice(key);
        keys.extend_from_slice(&self.keys[start..]);
        let mut slots = Vec::with_capacity(self.slots.len() + 1);
        slots.extend_from_slice(&self.slots[..i]);
        slots.push(Slot {
            hash,
            end: (start + key.len()) as u32,
            value,
        });
        slots.extend(self.slots[i..].iter().map(|s| Slot {
            hash: s.hash,
            end: s.end + key.len() as u32,
            value: s.value.clone(),
        }));
        Shard { slots, keys }
    }

    /// A copy of this shard without slot `i`.
    fn without(&self, i: usize) -> Shard<V>
    where
        V: Clone,
    {
        let start = self.start(i);
        let len = self.slots[i].end as usize - start;
        let mut keys = Vec::with_capacity(self.keys.len() - len);
        keys.extend_from_slice(&self.keys[..start]);
        keys.extend_from_slice(&self.keys[start + len..]);
        let mut slots = Vec::with_capacity(self.slots.len() - 1);
        slots.extend_from_slice(&self.slots[..i]);
        slots.extend(self.slots[i + 1..].iter().map(|s| Slot {
            hash: s.hash,
            end: s.end - len as u32,
            value: s.value.clone(),
        }));
        Shard { slots, keys }
    }

    /// A shard of the slots `range` of this one.
    fn slice(&self, range: std::ops::Range<usize>) -> Shard<V>
    where
        V: Clone,
    {
        let start = self.start(range.start);
        let end = self.start(range.end);
        Shard {
            slots: self.slots[range]
                .iter()
                .map(|s| Slot {
                    hash: s.hash,
                    end: s.end - start as u32,
                    value: s.value.clone(),
                })
                .collect(),
            keys: self.keys[start..end].to_vec(),
        }
    }
}

/// A hash map from byte strings that is cheap to copy and change: `clone` shares every
/// shard, and a change copies the one shard it is in if it is shared (`Arc::make_mut`).
#[derive(Clone)]
struct Map<V> {
    /// Shard `i` holds the keys whose hash's top `bits` bits are `i`.
    shards: Vec<std::sync::Arc<Shard<V>>>,
    bits: u32,
    len: usize,
}

impl<V: Clone> Default for Map<V> {
    fn default() -> Self {
        Map {
            shards: vec![Default::default()],
            bits: 0,
            len: 0,
        }
    }
}

impl<V: Clone> Map<V> {
    fn shard(&self, hash: u64) -> usize {
        match self.bits {
            0 => 0,
            b => (hash >> (64 - b)) as usize,
        }
    }

    fn get(&self, hash: u64, eq: impl Fn(&[u8]) -> bool) -> Option<&V> {
        let s = &self.shards[self.shard(hash)];
        s.find(hash, eq).ok().map(|i| &s.slots[i].value)
    }

    fn get_mut(&mut self, key: &[u8]) -> Option<&mut V> {
        let hash = hash_of(key);
        let at = self.shard(hash);
        let i = self.shards[at].find(hash, |k| k == key).ok()?;
        Some(&mut std::sync::Arc::make_mut(&mut self.shards[at]).slots[i].value)
    }

    /// The value of `key`, made by `make` if missing (then the flag is true).
    fn get_or_insert(&mut self, key: &[u8], make: impl FnOnce() -> V) -> (&mut V, bool) {
        let hash = hash_of(key);
        let mut at = self.shard(hash);
        let (i, new) = match self.shards[at].find(hash, |k| k == key) {
            Ok(i) => (i, false),
            Err(i) => {
                match std::sync::Arc::get_mut(&mut self.shards[at]) {
                    Some(s) => s.insert(i, hash, key, make()),
                    None => {
                        let s = self.shards[at].with_inserted(i, hash, key, make());
                        self.shards[at] = std::sync::Arc::new(s);
                    }
                }
                self.len += 1;
                match self.len > self.shards.len() * SHARD_ROUTES {
                    false => (i, true),
                    true => {
                        self.split();
                        at = self.shard(hash);
                        let i = self.shards[at].find(hash, |k| k == key);
                        (i.expect("just inserted"), true)
                    }
                }
            }
        };
        let s = std::sync::Arc::make_mut(&mut self.shards[at]);
        (&mut s.slots[i].value, new)
    }

    fn remove(&mut self, key: &[u8]) -> Option<V> {
        let hash = hash_of(key);
        let at = self.shard(hash);
        let i = self.shards[at].find(hash, |k| k == key).ok()?;
        self.len -= 1;
        match std::sync::Arc::get_mut(&mut self.shards[at]) {
            Some(s) => Some(s.remove(i)),
            None => {
                let value = self.shards[at].slots[i].value.clone();
                let s = self.shards[at].without(i);
                self.shards[at] = std::sync::Arc::new(s);
                Some(value)
            }
        }
    }

    /// Twice the shards, each cut in two by the next bit of the hash (a shard's keys are
    /// sorted by hash, so each half is a slice).
    fn split(&mut self) {
        let bit = 63 - self.bits;
        let mut shards = Vec::with_capacity(self.shards.len() * 2);
        for s in &self.shards {
            let mid = s.slots.partition_point(|x| (x.hash >> bit) & 1 == 0);
            shards.push(std::sync::Arc::new(s.slice(0..mid)));
            shards.push(std::sync::Arc::new(s.slice(mid..s.slots.len())));
        }
        self.shards = shards;
        self.bits += 1;
    }

    /// Calls `f` on each value for which `has` holds, dropping those it returns false for:
    /// copies only the shards that hold such a value.
    fn change_where(&mut self, has: impl Fn(&V) -> bool, mut f: impl FnMut(&[u8], &mut V) -> bool) {
        for s in &mut self.shards {
            if !s.slots.iter().any(|x| has(&x.value)) {
                continue;
            }
            let s = std::sync::Arc::make_mut(s);
            let mut i = 0;
            while i < s.slots.len() {
                let keep = match has(&s.slots[i].value) {
                    false => true,
                    true => {
                        let key = s.key(i).to_vec();
                        f(&key, &mut s.slots[i].value)
                    }
                };
                match keep {
                    true => i += 1,
                    false => {
                        s.remove(i);
                        self.len -= 1;
                    }
                }
            }
        }
    }

    fn iter(&self) -> impl Iterator<Item = (&[u8], &V)> {
        self.shards
            .iter()
            .flat_map(|s| (0..s.slots.len()).map(move |i| (s.key(i), &s.slots[i].value)))
    }

    fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// The wildcard filters of one literal prefix (the levels before the first wildcard): the
/// rest of their levels below it. Most prefixes have one (`fleet/dev1/` + `+/status`), held
/// in place; more make a trie, shared between tables until one of them changes it.
#[derive(Clone)]
enum Group {
    One(Tail),
    Trie(std::sync::Arc<RouteNode>),
}

impl Group {
    /// The entry of the filter whose levels below the prefix are `rest`, made if missing.
    fn entry_mut(&mut self, rest: &[&str]) -> &mut Entry {
        if matches!(self, Group::One(t) if t.levels.is_path(rest)) {
            let Group::One(t) = self else { unreachable!() };
            return &mut t.entry;
        }
        if let Group::One(t) = self {
            let t = std::mem::replace(t, Tail::empty());
            *self = Group::Trie(std::sync::Arc::new(RouteNode {
                children: Children::Tail(Box::new(t)),
                entry: Entry::default(),
            }));
        }
        let Group::Trie(root) = self else {
            unreachable!()
        };
        entry_at(std::sync::Arc::make_mut(root), rest)
    }

    /// Takes (`group`, `node`) out of the filter whose levels below the prefix are `rest`;
    /// returns whether it was there. A trie left with one path becomes that path again.
    fn remove(&mut self, rest: &[&str], group: &str, node: u64) -> bool {
        let found = match self {
            Group::One(t) => t.levels.is_path(rest) && t.entry.remove(group, node),
            Group::Trie(root) => remove_below(std::sync::Arc::make_mut(root), rest, group, node),
        };
        if let Group::Trie(root) = self {
            if let Some((levels, entry)) = single_path(root) {
                *self = Group::One(Tail {
                    levels: Level::new(&levels),
                    entry: entry.clone(),
                });
            }
        }
        found
    }

    fn is_empty(&self) -> bool {
        match self {
            Group::One(t) => t.entry.is_empty(),
            Group::Trie(root) => root.is_empty(),
        }
    }

    /// Adds the targets of the filters here that match the rest of a topic (`rest`: its
    /// levels below the prefix). `wildcards`: whether the first may match by a wildcard.
    fn matches<'t>(
        &self,
        rest: impl Iterator<Item = &'t str> + Clone,
        wildcards: bool,
        pick: Pick,
        out: &mut Vec<Target>,
    ) {
        match self {
            Group::One(t) => {
                if tail_matches(&t.levels, rest, wildcards) {
                    add_targets(&t.entry, pick, out);
                }
            }
            Group::Trie(root) => walk(root, rest, wildcards, pick, out),
        }
    }

    /// Takes `node` out of every route here; returns how many it was in.
    fn remove_node(&mut self, node: u64) -> usize {
        match self {
            Group::One(t) => t.entry.remove_node(node),
            Group::Trie(root) => prune_node(std::sync::Arc::make_mut(root), node),
        }
    }
}

impl Tail {
    fn empty() -> Tail {
        Tail {
            levels: Level::new(""),
            entry: Entry::default(),
        }
    }
}

/// The levels and entry of the one route below `root`, if it holds exactly one.
fn single_path(root: &RouteNode) -> Option<(String, &Entry)> {
    let mut path = String::new();
    let mut at = root;
    loop {
        let top = std::ptr::eq(at, root);
        let has_entry = !at.entry.is_empty();
        let mut below = |level: &Level| {
            if !top {
                path.push('/');
            }
            path.push_str(&level.to_text());
        };
        match &at.children {
            Children::Few(v) if v.is_empty() => {
                return (has_entry && !top).then_some((path, &at.entry))
            }
            _ if has_entry => return None,
            Children::Tail(t) => {
                below(&t.levels);
                return Some((path, &t.entry));
            }
            Children::Few(v) if v.len() == 1 => {
                below(&v[0].0);
                at = &v[0].1;
            }
            _ => return None,
        }
    }
}

/// Removes (`group`, `node`) from the route whose levels below `at` are `levels`, pruning
/// what empties; returns whether it was there.
fn remove_below(at: &mut RouteNode, levels: &[&str], group: &str, node: u64) -> bool {
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
    let found = remove_below(child, rest, group, node);
    if child.is_empty() {
        at.children.remove(first);
    }
    found
}

/// Where a wildcard filter is filed: its literal prefix with a `/` after each level (`a/b/`
/// for `a/b/+/c`; `` for `#`), and the levels from its first wildcard on. `None` for a
/// filter without wildcards.
fn split_wild(filter: &str) -> Option<(&str, Vec<&str>)> {
    let mut at = 0;
    for level in filter.split('/') {
        if level == "+" || level == "#" {
            return Some((&filter[..at], filter[at..].split('/').collect()));
        }
        at += level.len() + 1;
    }
    None
}

/// Filters without wildcards (most of a fleet's: `cmd/<device>`) are looked up by the topic
/// itself; the others by their literal prefix ([`split_wild`]), below which a [`Group`]
/// holds the rest. Cloning a table shares all its shards.
#[derive(Clone, Default)]
struct Table {
    exact: Map<Entry>,
    wild: Map<Group>,
    /// How many prefixes of each depth (levels) `wild` has: a publish looks up only the
    /// depths that have one.
    depths: Vec<u32>,
    /// node -> how many (group, filter) routes it is in.
    per_node: HashMap<u64, usize>,
    /// Routes whose node is not the table's (set by [`RouteTable`]).
    remote: usize,
    /// The log index of the last change in this table.
    index: u64,
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

impl Table {
    /// Whether (`group`, `filter`, `node`) is a route here.
    fn has(&self, group: &str, filter: &str, node: u64) -> bool {
        let mut found = false;
        if let Some(e) = self.entry(filter) {
            e.each(|g, nodes| found |= g == group && nodes.contains(&node));
        }
        found
    }

    /// Adds (`group`, `filter`, `node`); returns whether it was new. One that is there
    /// already copies nothing.
    fn add(&mut self, group: &str, filter: &str, node: u64) -> bool {
        if self.has(group, filter, node) {
            return false;
        }
        let entry = match split_wild(filter) {
            None => {
                self.exact
                    .get_or_insert(filter.as_bytes(), Entry::default)
                    .0
            }
            Some((prefix, rest)) => {
                let (g, new) = self.wild.get_or_insert(prefix.as_bytes(), || {
                    Group::One(Tail {
                        levels: Level::new(&rest.join("/")),
                        entry: Entry::default(),
                    })
                });
                if new {
                    let depth = prefix.matches('/').count();
                    if self.depths.len() <= depth {
                        self.depths.resize(depth + 1, 0);
                    }
                    self.depths[depth] += 1;
                }
                g.entry_mut(&rest)
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

    /// Removes (`group`, `filter`, `node`); returns whether it was there. One that is not
    /// there copies nothing.
    fn remove(&mut self, group: &str, filter: &str, node: u64) -> bool {
        if !self.has(group, filter, node) {
            return false;
        }
        let found = match split_wild(filter) {
            None => {
                let Some(entry) = self.exact.get_mut(filter.as_bytes()) else {
                    return false;
                };
                let found = entry.remove(group, node);
                if entry.is_empty() {
                    self.exact.remove(filter.as_bytes());
                }
                found
            }
            Some((prefix, rest)) => {
                let Some(g) = self.wild.get_mut(prefix.as_bytes()) else {
                    return false;
                };
                let found = g.remove(&rest, group, node);
                if g.is_empty() {
                    self.wild.remove(prefix.as_bytes());
                    self.depths[prefix.matches('/').count()] -= 1;
                }
                found
            }
        };
        if found {
            self.uncount(node);
        }
        found
    }

    /// Takes `node` out of every route; returns how many it was in.
    fn remove_node(&mut self, node: u64) -> usize {
        let mut n = 0;
        self.exact.change_where(
            |e| entry_has_node(e, node),
            |_, e| {
                n += e.remove_node(node);
                !e.is_empty()
            },
        );
        let mut gone = Vec::new();
        self.wild.change_where(
            |g| g_has_node(g, node),
            |key, g| {
                n += g.remove_node(node);
                if g.is_empty() {
                    gone.push(key.iter().filter(|&&b| b == b'/').count());
                }
                !g.is_empty()
            },
        );
        for depth in gone {
            self.depths[depth] -= 1;
        }
        self.per_node.remove(&node);
        n
    }

    /// Calls `f` with (group, filter, nodes) for each route.
    fn visit(&self, f: &mut dyn FnMut(&str, &str, &NodeSet)) {
        for (filter, e) in self.exact.iter() {
            let filter = String::from_utf8_lossy(filter);
            e.each(|g, nodes| f(g, &filter, nodes));
        }
        for (prefix, g) in self.wild.iter() {
            let prefix = String::from_utf8_lossy(prefix);
            match g {
                Group::One(t) => {
                    let filter = format!("{prefix}{}", t.levels.to_text());
                    t.entry.each(|g, nodes| f(g, &filter, nodes));
                }
                Group::Trie(root) => {
                    // The prefix without its last `/`: the trie's levels go below it.
                    let mut path = prefix.strip_suffix('/').unwrap_or("").to_owned();
                    visit_node(root, prefix.is_empty(), &mut path, f);
                }
            }
        }
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
        match split_wild(filter) {
            None => {
                let key = filter.as_bytes();
                self.exact.get(hash_of(key), |k| k == key)
            }
            Some((prefix, rest)) => {
                let key = prefix.as_bytes();
                match self.wild.get(hash_of(key), |k| k == key)? {
                    Group::One(t) => t.levels.is_path(&rest).then_some(&t.entry),
                    Group::Trie(root) => entry_of(root, &rest),
                }
            }
        }
    }

    #[cfg(test)]
    fn is_empty(&self) -> bool {
        self.exact.is_empty() && self.wild.is_empty()
    }

    /// Adds the targets of every route matching `topic`.
    fn matches(&self, topic: &str, pick: Pick, out: &mut Vec<Target>) {
        let bytes = topic.as_bytes();
        let basis = fnv0();
        let mut h = basis;
        // Wildcards do not match a `$` topic's first level.
        let dollar = topic.starts_with('$');
        let mut depth = 0;
        let probe = |depth: usize, end: usize, h: u64, out: &mut Vec<Target>| {
            if self.depths.get(depth).is_none_or(|&n| n == 0) || (depth == 0 && dollar) {
                return;
            }
            // The prefix is `topic[..end]` and a `/` (which `h` has hashed).
            let eq = |k: &[u8]| k.len() == end + 1 && k[..end] == bytes[..end] && k[end] == b'/';
            let Some(g) = self.wild.get(mix(h), eq) else {
                return;
            };
            let wildcards = depth > 0 || !dollar;
            match end < bytes.len() {
                true => g.matches(topic[end + 1..].split('/'), wildcards, pick, out),
                false => g.matches(std::iter::empty(), wildcards, pick, out),
            }
        };
        if !self.wild.is_empty() {
            // The empty prefix: `end` stands before the topic, so a slash is not part of it.
            if self.depths.first().is_some_and(|&n| n > 0) && !dollar {
                let eq = |k: &[u8]| k.is_empty();
                if let Some(g) = self.wild.get(mix(basis), eq) {
                    g.matches(topic.split('/'), true, pick, out);
                }
            }
        }
        for (i, &b) in bytes.iter().enumerate() {
            h = fnv(h, b);
            if b == b'/' && !self.wild.is_empty() {
                depth += 1;
                // `h` has hashed `topic[..i]` and its `/`.
                probe(depth, i, h, out);
            }
        }
        if let Some(e) = self.exact.get(mix(h), |k| k == bytes) {
            add_targets(e, pick, out);
        }
        if !self.wild.is_empty() {
            probe(depth + 1, bytes.len(), fnv(h, b'/'), out);
        }
    }
}

fn entry_has_node(e: &Entry, node: u64) -> bool {
    let mut found = false;
    e.each(|_, nodes| found |= nodes.contains(&node));
    found
}

/// Whether `node` is in any route of `g`.
fn g_has_node(g: &Group, node: u64) -> bool {
    let mut found = false;
    let mut f = |_: &str, _: &str, nodes: &NodeSet| found |= nodes.contains(&node);
    match g {
        Group::One(t) => t.entry.each(|g, nodes| f(g, "", nodes)),
        Group::Trie(root) => visit_node(root, true, &mut String::new(), &mut f),
    }
    found
}

/// The route table for matching (see the module docs).
pub struct RouteTable {
    me: u64,
    /// Which node serves a share group with members on several (`cluster.shared_strategy`).
    strategy: SharedStrategy,
    /// The current table: read without a lock, replaced whole by a change.
    table: arc_swap::ArcSwap<Table>,
    /// Held by whoever changes the table (the state machine's apply; tests), so that two
    /// changes do not build on the same table.
    writer: std::sync::Mutex<()>,
    /// (group, filter, node) entries whose node is not this one (the current table's).
    remote: AtomicUsize,
    /// The Raft log index the table is current up to: every route change of the entries up
    /// to it is in. Moved after the table that holds an entry's changes is in place (so a
    /// publish that reads it, then the table, sees them: [`RouteTable::collect`]).
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

/// See [`RouteTable::bulk`].
pub struct Bulk<'a> {
    of: &'a RouteTable,
    next: Option<Table>,
    /// Held until the additions are in place (released after `drop`).
    _writer: std::sync::MutexGuard<'a, ()>,
}

impl Bulk<'_> {
    /// As [`RouteTable::add`].
    pub fn add(&mut self, group: &str, filter: &str, node: u64) {
        if let Some(t) = self.next.as_mut() {
            add_in(self.of.me, t, group, filter, node);
        }
    }
}

impl Drop for Bulk<'_> {
    fn drop(&mut self) {
        if let Some(next) = self.next.take() {
            self.of.remote.store(next.remote, Ordering::Relaxed);
            self.of.table.store(std::sync::Arc::new(next));
            self.of.changed.notify_waiters();
        }
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
            table: arc_swap::ArcSwap::from_pointee(Table::default()),
            writer: std::sync::Mutex::new(()),
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

    /// The changes of one applied log entry (`ops`, maybe none) and its `index`, at once:
    /// a publish sees all of them or none.
    pub fn apply(&self, ops: &[RouteOp], index: u64) {
        if ops.is_empty() {
            // Nothing for a publish to see half-done.
            self.index.fetch_max(index, Ordering::AcqRel);
            self.changed.notify_waiters();
            return;
        }
        self.change(Some(index), |me, t| {
            for op in ops {
                match op {
                    RouteOp::Add {
                        group,
                        filter,
                        node,
                    } => add_in(me, t, group, filter, *node),
                    RouteOp::Del {
                        group,
                        filter,
                        node,
                    } => remove_in(me, t, group, filter, *node),
                    RouteOp::NodeGone(node) => {
                        let n = t.remove_node(*node);
                        if *node != me {
                            t.remote -= n;
                        }
                    }
                }
            }
        });
    }

    /// Builds the next table from the current one by `f` (which copies the shards it
    /// changes), puts it in place, then moves the index to `index` if given.
    fn change(&self, index: Option<u64>, f: impl FnOnce(u64, &mut Table)) {
        let writer = self.writer.lock().unwrap_or_else(|e| e.into_inner());
        let mut next = Table::clone(&self.table.load());
        f(self.me, &mut next);
        if let Some(index) = index {
            next.index = next.index.max(index);
        }
        self.remote.store(next.remote, Ordering::Relaxed);
        // The table this replaces is freed by the last publish that reads it (the shards it
        // shares with the new one stay).
        self.table.store(std::sync::Arc::new(next));
        if let Some(index) = index {
            self.index.fetch_max(index, Ordering::AcqRel);
        }
        drop(writer);
        self.changed.notify_waiters();
    }

    /// Node `node` has subscribers to `filter` (in share group `group`, "" for none).
    pub fn add(&self, group: &str, filter: &str, node: u64) {
        self.change(None, |me, t| add_in(me, t, group, filter, node));
    }

    /// Node `node` has no subscriber to `filter` (in `group`) any more.
    pub fn remove(&self, group: &str, filter: &str, node: u64) {
        self.change(None, |me, t| remove_in(me, t, group, filter, node));
    }

    /// Many additions made as one change (a snapshot's routes): each shard is copied at
    /// most once, not once per route. They are seen when the returned [`Bulk`] goes.
    /// Other changes wait until then.
    pub fn bulk(&self) -> Bulk<'_> {
        let writer = self.writer.lock().unwrap_or_else(|e| e.into_inner());
        Bulk {
            of: self,
            next: Some(Table::clone(&self.table.load())),
            _writer: writer,
        }
    }

    /// Takes the routes of `other` (a table decoded from a snapshot), leaving it empty:
    /// swapped in at once with its index, so a publish sees the old table or the new.
    pub fn replace_from(&self, other: &RouteTable, index: u64) {
        let taken = {
            let _writer = other.writer.lock().unwrap_or_else(|e| e.into_inner());
            other.remote.store(0, Ordering::Relaxed);
            other.table.swap(std::sync::Arc::new(Table::default()))
        };
        let mut table = std::sync::Arc::unwrap_or_clone(taken);
        table.remote = table
            .per_node
            .iter()
            .filter(|(n, _)| **n != self.me)
            .map(|(_, c)| c)
            .sum();
        table.index = index;
        let writer = self.writer.lock().unwrap_or_else(|e| e.into_inner());
        self.remote.store(table.remote, Ordering::Relaxed);
        self.table.store(std::sync::Arc::new(table));
        // A snapshot replaces everything, its index too (it may be behind what this table
        // had only when a node's log was lost; then the lower index is the true one).
        self.index.store(index, Ordering::Release);
        drop(writer);
        self.changed.notify_waiters();
    }

    /// Where a publish to `topic` must be forwarded, one entry per other node, appended to
    /// `out` (sorted by node). A share group with a member on this node is served here
    /// (local first); one without gets one node of those that have members, in turn.
    /// Returns the log index the routes were current up to.
    pub fn collect(&self, topic: &str, out: &mut Vec<Target>) -> u64 {
        // The index first: the table read after it holds every change up to it (and maybe
        // later ones, whose index it carries).
        let index = self.index.load(Ordering::Acquire);
        let t = self.table.load();
        let index = index.max(t.index);
        let pick = Pick {
            me: self.me,
            strategy: self.strategy,
        };
        t.matches(topic, pick, out);
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
        let t = self.table.load();
        let entry = t.entry(filter)?;
        let s = entry.shared.as_ref()?.iter().find(|s| &*s.group == group)?;
        let others: Vec<u64> = s.nodes.iter().copied().filter(|&n| n != self.me).collect();
        let at = s.next.fetch_add(1, Ordering::Relaxed);
        others.get(at % others.len().max(1)).copied()
    }

    /// Calls `f` with (group, "" for none; filter; nodes) for each route, in no particular
    /// order, of the table current when called (changes meanwhile build the next one).
    pub fn visit(&self, mut f: impl FnMut(&str, &str, &NodeSet)) {
        let t = self.table.load_full();
        t.visit(&mut f);
    }

    /// How many routes each node is in: (node, routes), by node.
    pub fn node_counts(&self) -> Vec<(u64, usize)> {
        let t = self.table.load();
        let mut out: Vec<(u64, usize)> = t.per_node.iter().map(|(n, c)| (*n, *c)).collect();
        out.sort_unstable();
        out
    }

    /// The nodes of (`group`, `filter`).
    pub fn nodes_of(&self, group: &str, filter: &str) -> NodeSet {
        let t = self.table.load();
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

/// [`RouteTable::add`] in `t` (of node `me`), counting a new remote route.
fn add_in(me: u64, t: &mut Table, group: &str, filter: &str, node: u64) {
    if t.add(group, filter, node) && node != me {
        t.remote += 1;
    }
}

/// [`RouteTable::remove`] in `t` (of node `me`), counting a remote route gone.
fn remove_in(me: u64, t: &mut Table, group: &str, filter: &str, node: u64) {
    if t.remove(group, filter, node) && node != me {
        t.remote -= 1;
    }
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

fn walk<'t>(
    at: &RouteNode,
    mut levels: impl Iterator<Item = &'t str> + Clone,
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
        assert!(t.table.load().is_empty(), "empty levels pruned");
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
        assert!(t.table.load().is_empty(), "pruned");
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
        assert!(t.table.load().is_empty(), "pruned to nothing");
    }

    #[test]
    fn a_route_costs_few_words() {
        // Every node holds every route: a million of them in a big fleet.
        assert_eq!(std::mem::size_of::<NodeSet>(), 16);
        assert_eq!(std::mem::size_of::<Level>(), 24);
        assert!(std::mem::size_of::<Entry>() <= 24);
        assert!(std::mem::size_of::<RouteNode>() <= 48);
        assert!(std::mem::size_of::<Group>() <= 48);
        // A route of its own below its prefix is held in place: `+/status` under `fleet/dev1/`.
        let t = RouteTable::new(1);
        t.add("", "fleet/dev1/+/status", 2);
        t.add("", "fleet/dev2/+/status", 2);
        let table = t.table.load();
        let key = b"fleet/dev1/";
        let g = table
            .wild
            .get(hash_of(key), |k| k == key)
            .expect("filed by prefix");
        assert!(matches!(g, Group::One(t) if t.levels.is_path(&["+", "status"])));
        // A second filter of the prefix makes a trie; removing it makes one again.
        t.add("", "fleet/dev1/+/cmd", 3);
        let table = t.table.load();
        let g = table.wild.get(hash_of(key), |k| k == key).unwrap();
        assert!(matches!(g, Group::Trie(_)));
        t.remove("", "fleet/dev1/+/cmd", 3);
        let table = t.table.load();
        let g = table.wild.get(hash_of(key), |k| k == key).unwrap();
        assert!(matches!(g, Group::One(_)));
    }

    #[test]
    fn a_change_copies_the_shards_it_touches_and_shares_the_rest() {
        let t = RouteTable::new(1);
        for i in 0..5_000 {
            t.add("", &format!("cmd/dev{i}"), 2);
            t.add("", &format!("fleet/dev{i}/+/status"), 3);
        }
        let before = t.table.load_full();
        assert!(before.exact.shards.len() >= 16, "split as it grew");
        assert!(before
            .exact
            .shards
            .iter()
            .all(|s| s.slots.len() <= 2 * SHARD_ROUTES));
        t.apply(
            &[RouteOp::Add {
                group: String::new(),
                filter: "cmd/new".into(),
                node: 4,
            }],
            3,
        );
        let after = t.table.load_full();
        /// How many shards two tables' maps share (not copied between them).
        fn shared<V>(a: &Map<V>, b: &Map<V>) -> usize {
            a.shards
                .iter()
                .zip(&b.shards)
                .filter(|(x, y)| std::sync::Arc::ptr_eq(x, y))
                .count()
        }
        assert_eq!(
            shared(&before.exact, &after.exact),
            before.exact.shards.len() - 1
        );
        assert_eq!(shared(&before.wild, &after.wild), before.wild.shards.len());
        // The table a publish still holds is unchanged.
        let mut out = Vec::new();
        let pick = Pick {
            me: 1,
            strategy: SharedStrategy::LocalFirst,
        };
        before.matches("cmd/new", pick, &mut out);
        assert!(out.is_empty());
        after.matches("cmd/new", pick, &mut out);
        assert_eq!(out, [plain(4)]);
        assert_eq!(nodes(&t, "fleet/dev4999/x/status"), [plain(3)]);
        assert_eq!(nodes(&t, "cmd/dev0"), [plain(2)]);
        // A change that changes nothing (a route that is there, one that is not) copies
        // nothing.
        t.apply(
            &[
                RouteOp::Add {
                    group: String::new(),
                    filter: "fleet/dev7/+/status".into(),
                    node: 3,
                },
                RouteOp::Del {
                    group: String::new(),
                    filter: "cmd/dev7".into(),
                    node: 9,
                },
            ],
            4,
        );
        let same = t.table.load_full();
        assert_eq!(shared(&after.exact, &same.exact), after.exact.shards.len());
        assert_eq!(shared(&after.wild, &same.wild), after.wild.shards.len());
        // A node that goes takes its routes, and only the shards holding one are copied.
        t.apply(&[RouteOp::NodeGone(3)], 5);
        let gone = t.table.load_full();
        assert!(gone.wild.is_empty() && gone.depths.iter().all(|&n| n == 0));
        assert_eq!(shared(&after.exact, &gone.exact), after.exact.shards.len());
        assert_eq!(t.node_counts(), [(2, 5_000), (4, 1)]);
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
                prop_assert!(t.table.load().is_empty());
                prop_assert!(t.table.load().depths.iter().all(|&n| n == 0));
            }
        }
    }
}
