//! The subscription trie: one node per filter level, `+` and `#` stored as ordinary children.
//!
//! Read-mostly: the broker keeps it behind a sync `RwLock` that is never held across `.await`.
//! Matching walks the topic's levels once and never allocates besides the caller's output
//! vector, which connections reuse between publishes.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use crate::codec::{QoS, SubscriptionOptions};
use crate::session::{Session, SessionId};

/// One subscription of one session.
#[derive(Clone)]
pub struct Subscriber {
    pub session: Arc<Session>,
    pub options: SubscriptionOptions,
    pub subscription_id: Option<u32>,
    /// The ACL allows part of what the filter matches: check each message before delivery.
    pub acl_filtered: bool,
    /// The ACL generation the decision was taken under ([`ACL_UNDECIDED`] for subscriptions
    /// recovered from the store): after a reload, each message is checked.
    pub acl_gen: u64,
}

/// The ACL's word on a subscription, and the ACL generation it was given under.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AclStamp {
    /// Allowed in part: each message is checked at delivery.
    pub filtered: bool,
    pub generation: u64,
}

impl AclStamp {
    /// Not decided (a subscription recovered from the store): every message is checked.
    pub const UNDECIDED: AclStamp = AclStamp {
        filtered: true,
        generation: ACL_UNDECIDED,
    };

    /// Whether a message matched under this stamp must be checked when the ACL is at
    /// `current`.
    pub fn must_check(filtered: bool, generation: u64, current: u64) -> bool {
        filtered || generation != current
    }
}

/// `acl_gen` of a subscription whose ACL decision is not known (recovered at start): every
/// message is checked at delivery, with the identity of the connection that receives it.
pub const ACL_UNDECIDED: u64 = u64::MAX;

/// A subscriber selected for one publish.
#[derive(Clone)]
pub struct Match {
    pub session: Arc<Session>,
    pub qos: QoS,
    pub no_local: bool,
    pub retain_as_published: bool,
    pub subscription_id: Option<u32>,
    pub shared: bool,
    pub acl_filtered: bool,
    pub acl_gen: u64,
    /// The share group that picked this session (`None`: an ordinary subscription), so a
    /// copy that finds the session ended can go to another member.
    pub share: Option<Arc<ShareKey>>,
}

/// A share group: its name and the filter its members subscribed to.
#[derive(Debug, PartialEq, Eq)]
pub struct ShareKey {
    pub group: Box<str>,
    pub filter: Box<str>,
}

#[derive(Default)]
struct Node {
    children: HashMap<Box<str>, Node>,
    subs: HashMap<SessionId, Subscriber>,
    shared: Vec<SharedGroup>,
}

struct SharedGroup {
    name: Box<str>,
    key: Arc<ShareKey>,
    members: Vec<Subscriber>,
    next: AtomicUsize,
}

impl Node {
    fn is_empty(&self) -> bool {
        self.children.is_empty() && self.subs.is_empty() && self.shared.is_empty()
    }

    fn add_to(&self, out: &mut Vec<Match>, shared: bool) {
        for s in self.subs.values() {
            out.push(Match {
                session: s.session.clone(),
                qos: s.options.qos,
                no_local: s.options.no_local,
                retain_as_published: s.options.retain_as_published,
                subscription_id: s.subscription_id,
                shared: false,
                acl_filtered: s.acl_filtered,
                acl_gen: s.acl_gen,
                share: None,
            });
        }
        if shared {
            for g in &self.shared {
                g.pick_into(out);
            }
        }
    }
}

impl SharedGroup {
    /// Appends the member [`SharedGroup::pick`] chooses.
    fn pick_into(&self, out: &mut Vec<Match>) {
        if let Some(s) = self.pick() {
            out.push(Match {
                session: s.session.clone(),
                qos: s.options.qos,
                no_local: false,
                retain_as_published: s.options.retain_as_published,
                subscription_id: s.subscription_id,
                shared: true,
                acl_filtered: s.acl_filtered,
                acl_gen: s.acl_gen,
                share: Some(self.key.clone()),
            });
        }
    }

    /// Round robin over the members, skipping those that are not connected; if none is
    /// connected the message goes to the queue of the next member that has not ended. If
    /// every member has ended (their subscriptions leave the router a moment later), the
    /// next one is picked all the same: its copy finds it ended and goes to another member
    /// of the group, on another node if need be (`Broker::share_elsewhere`).
    fn pick(&self) -> Option<&Subscriber> {
        let n = self.members.len();
        if n == 0 {
            return None;
        }
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        let mut offline = None;
        for i in 0..n {
            let s = &self.members[(start + i) % n];
            if s.session.is_ended() {
                continue;
            }
            if s.session.is_connected() {
                return Some(s);
            }
            offline.get_or_insert(s);
        }
        offline.or(Some(&self.members[start % n]))
    }
}

/// All subscriptions of the node's local sessions.
#[derive(Default)]
pub struct SubscriptionTrie {
    root: Node,
}

impl SubscriptionTrie {
    /// Adds or replaces a session's subscription. Returns whether it already existed and
    /// whether it is the first subscriber to this filter (in this share group): the node's
    /// route to the filter starts.
    pub fn subscribe(
        &mut self,
        filter: &str,
        group: Option<&str>,
        sub: Subscriber,
    ) -> (bool, bool) {
        let mut node = &mut self.root;
        for level in filter.split('/') {
            node = node.children.entry(level.into()).or_default();
        }
        let id = sub.session.id();
        match group {
            None => {
                let existed = node.subs.insert(id, sub).is_some();
                (existed, node.subs.len() == 1 && !existed)
            }
            Some(name) => {
                let mut first = false;
                let g = match node.shared.iter().position(|g| &*g.name == name) {
                    Some(i) => &mut node.shared[i],
                    None => {
                        first = true;
                        node.shared.push(SharedGroup {
                            name: name.into(),
                            key: Arc::new(ShareKey {
                                group: name.into(),
                                filter: filter.into(),
                            }),
                            members: Vec::new(),
                            next: AtomicUsize::new(0),
                        });
                        node.shared.last_mut().expect("just pushed")
                    }
                };
                match g.members.iter_mut().find(|m| m.session.id() == id) {
                    Some(m) => {
                        *m = sub;
                        (true, false)
                    }
                    None => {
                        g.members.push(sub);
                        (false, first)
                    }
                }
            }
        }
    }

    /// Removes a session's subscription. Returns whether it existed and whether it was the
    /// last subscriber to this filter (in this share group): the node's route ends.
    pub fn unsubscribe(
        &mut self,
        filter: &str,
        group: Option<&str>,
        session: SessionId,
    ) -> (bool, bool) {
        fn remove<'a>(
            node: &mut Node,
            mut levels: impl Iterator<Item = &'a str>,
            group: Option<&str>,
            session: SessionId,
        ) -> (bool, bool) {
            match levels.next() {
                Some(level) => {
                    let Some(child) = node.children.get_mut(level) else {
                        return (false, false);
                    };
                    let found = remove(child, levels, group, session);
                    if child.is_empty() {
                        node.children.remove(level);
                    }
                    found
                }
                None => match group {
                    None => {
                        let found = node.subs.remove(&session).is_some();
                        (found, found && node.subs.is_empty())
                    }
                    Some(name) => {
                        let Some(gi) = node.shared.iter().position(|g| &*g.name == name) else {
                            return (false, false);
                        };
                        let g = &mut node.shared[gi];
                        let before = g.members.len();
                        g.members.retain(|m| m.session.id() != session);
                        let found = g.members.len() != before;
                        let last = g.members.is_empty();
                        if last {
                            node.shared.swap_remove(gi);
                        }
                        (found, found && last)
                    }
                },
            }
        }
        remove(&mut self.root, filter.split('/'), group, session)
    }

    /// The node's routes: every (share group, filter) with at least one subscriber.
    pub fn routes(&self) -> Vec<(Option<String>, String)> {
        fn walk(node: &Node, path: &mut String, out: &mut Vec<(Option<String>, String)>) {
            if !node.subs.is_empty() {
                out.push((None, path.clone()));
            }
            for g in &node.shared {
                out.push((Some(g.name.to_string()), path.clone()));
            }
            for (level, child) in &node.children {
                let at = path.len();
                path.push('/');
                path.push_str(level);
                walk(child, path, out);
                path.truncate(at);
            }
        }
        let mut out = Vec::new();
        for (level, child) in &self.root.children {
            let mut path = level.to_string();
            walk(child, &mut path, &mut out);
        }
        out
    }

    /// Appends every subscription matching `topic` to `out`, one entry per subscription
    /// (and one chosen member per shared group).
    /// Whether some session subscribes to `filter` (in `group`): its route exists.
    pub fn has_route(&self, filter: &str, group: Option<&str>) -> bool {
        let mut node = &self.root;
        for level in filter.split('/') {
            match node.children.get(level) {
                Some(child) => node = child,
                None => return false,
            }
        }
        match group {
            None => !node.subs.is_empty(),
            Some(name) => node
                .shared
                .iter()
                .any(|g| &*g.name == name && !g.members.is_empty()),
        }
    }

    pub fn collect(&self, topic: &str, out: &mut Vec<Match>) {
        let dollar = topic.starts_with('$');
        walk(&self.root, topic.split('/'), !dollar, true, out);
    }

    /// As [`SubscriptionTrie::collect`] for a message another node forwarded: the ordinary
    /// subscriptions matching `topic` if `plain`, and one member of each share group in
    /// `shared` ((group, filter): the sending node chose this node for it).
    pub fn collect_forwarded<'a>(
        &self,
        topic: &str,
        plain: bool,
        shared: impl IntoIterator<Item = (&'a str, &'a str)>,
        out: &mut Vec<Match>,
    ) {
        if plain {
            let dollar = topic.starts_with('$');
            walk(&self.root, topic.split('/'), !dollar, false, out);
        }
        for (group, filter) in shared {
            let mut node = Some(&self.root);
            for level in filter.split('/') {
                node = node.and_then(|n| n.children.get(level));
            }
            if let Some(g) = node.and_then(|n| n.shared.iter().find(|g| &*g.name == group)) {
                g.pick_into(out);
            }
        }
    }

    pub fn is_empty(&self) -> bool {
        self.root.is_empty()
    }
}

fn walk<'a>(
    node: &Node,
    mut levels: std::str::Split<'a, char>,
    wildcards: bool,
    shared: bool,
    out: &mut Vec<Match>,
) {
    match levels.next() {
        None => {
            node.add_to(out, shared);
            // "a/#" also matches "a".
            if let Some(hash) = node.children.get("#") {
                hash.add_to(out, shared);
            }
        }
        Some(level) => {
            if wildcards {
                if let Some(hash) = node.children.get("#") {
                    hash.add_to(out, shared);
                }
                if let Some(plus) = node.children.get("+") {
                    walk(plus, levels.clone(), true, shared, out);
                }
            }
            if let Some(child) = node.children.get(level) {
                walk(child, levels, true, shared, out);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::session::Session;

    fn sub(s: &Arc<Session>, qos: QoS) -> Subscriber {
        Subscriber {
            session: s.clone(),
            options: SubscriptionOptions {
                qos,
                ..Default::default()
            },
            subscription_id: None,
            acl_filtered: false,
            acl_gen: 0,
        }
    }

    fn ids(t: &SubscriptionTrie, topic: &str) -> Vec<SessionId> {
        let mut out = Vec::new();
        t.collect(topic, &mut out);
        let mut v: Vec<_> = out.iter().map(|m| m.session.id()).collect();
        v.sort();
        v
    }

    #[test]
    fn wildcards_and_dollar() {
        let a = Session::new_for_test("a");
        let b = Session::new_for_test("b");
        let mut t = SubscriptionTrie::default();
        t.subscribe("x/#", None, sub(&a, QoS::AtMostOnce));
        t.subscribe("x/+/z", None, sub(&b, QoS::AtLeastOnce));
        t.subscribe("#", None, sub(&b, QoS::AtMostOnce));
        assert_eq!(ids(&t, "x"), vec![a.id(), b.id()]);
        assert_eq!(ids(&t, "x/y/z"), vec![a.id(), b.id(), b.id()]);
        assert_eq!(ids(&t, "$SYS/x"), Vec::<SessionId>::new());
        t.subscribe("$SYS/#", None, sub(&a, QoS::AtMostOnce));
        assert_eq!(ids(&t, "$SYS/x"), vec![a.id()]);
        assert!(t.unsubscribe("x/#", None, a.id()).0);
        assert!(!t.unsubscribe("x/#", None, a.id()).0);
        assert_eq!(ids(&t, "x/y/z"), vec![b.id(), b.id()]);
        assert!(t.unsubscribe("x/+/z", None, b.id()).0);
        assert!(t.unsubscribe("#", None, b.id()).0);
        assert!(t.unsubscribe("$SYS/#", None, a.id()).0);
        assert!(t.is_empty(), "empty nodes are pruned");
    }

    #[test]
    fn shared_round_robin() {
        let a = Session::new_for_test("a");
        let b = Session::new_for_test("b");
        a.set_connected(true);
        b.set_connected(true);
        let mut t = SubscriptionTrie::default();
        t.subscribe("s/+", Some("g"), sub(&a, QoS::AtMostOnce));
        t.subscribe("s/+", Some("g"), sub(&b, QoS::AtMostOnce));
        let mut seen = Vec::new();
        for _ in 0..4 {
            let got = ids(&t, "s/1");
            assert_eq!(got.len(), 1);
            seen.push(got[0]);
        }
        assert_eq!(seen.iter().filter(|&&id| id == a.id()).count(), 2);
        b.set_connected(false);
        for _ in 0..3 {
            assert_eq!(ids(&t, "s/1"), vec![a.id()], "disconnected member skipped");
        }
        // Ended (its subscriptions not out of the trie yet), its link still set: passed
        // over; an offline member that has not ended comes before it.
        let _ = a.end();
        for _ in 0..3 {
            assert_eq!(ids(&t, "s/1"), vec![b.id()], "ended member skipped");
        }
        // Every member ended: one is picked all the same (its copy finds it ended and is
        // given to another member, maybe on another node).
        let _ = b.end();
        assert_eq!(ids(&t, "s/1").len(), 1);
    }

    #[test]
    fn first_and_last_subscriber_of_a_filter_start_and_end_its_route() {
        let (a, b) = (Session::new_for_test("a"), Session::new_for_test("b"));
        let mut t = SubscriptionTrie::default();
        assert_eq!(
            t.subscribe("r/+", None, sub(&a, QoS::AtMostOnce)),
            (false, true)
        );
        assert_eq!(
            t.subscribe("r/+", None, sub(&b, QoS::AtMostOnce)),
            (false, false)
        );
        assert_eq!(
            t.subscribe("r/+", None, sub(&b, QoS::AtLeastOnce)),
            (true, false)
        );
        assert_eq!(
            t.subscribe("r/+", Some("g"), sub(&a, QoS::AtMostOnce)),
            (false, true)
        );
        assert_eq!(
            t.subscribe("/lead", None, sub(&a, QoS::AtMostOnce)),
            (false, true)
        );
        let mut routes = t.routes();
        routes.sort();
        let want = vec![
            (None, "/lead".to_owned()),
            (None, "r/+".to_owned()),
            (Some("g".to_owned()), "r/+".to_owned()),
        ];
        assert_eq!(routes, want);
        assert!(t.has_route("r/+", None) && t.has_route("r/+", Some("g")));
        assert!(!t.has_route("r/+", Some("h")) && !t.has_route("r", None));
        assert_eq!(t.unsubscribe("r/+", None, a.id()), (true, false));
        assert_eq!(t.unsubscribe("r/+", None, b.id()), (true, true));
        assert_eq!(t.unsubscribe("r/+", None, b.id()), (false, false));
        assert_eq!(t.unsubscribe("r/+", Some("g"), a.id()), (true, true));
        assert_eq!(t.routes(), vec![(None, "/lead".to_owned())]);
        assert!(!t.has_route("r/+", None) && !t.has_route("r/+", Some("g")));
    }
}
