//! Who publishes where, who subscribes to what, on which broker, and which streams each
//! receiver (a subscriber, or a shared-subscription group) should get.

use crate::cli::Placement;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PubPlan {
    pub topic: String,
    pub qos: u8,
    pub broker: usize,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubPlan {
    pub filter: String,
    pub qos: u8,
    pub broker: usize,
    /// Index into `Topology::receivers`.
    pub receiver: usize,
}

/// The unit loss is counted for: every message of `publishers` must reach it once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReceiverPlan {
    pub label: String,
    /// Publisher ids whose messages it expects; `None` when they are outside this run.
    pub publishers: Option<Vec<u32>>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Topology {
    /// Indexed by publisher id.
    pub publishers: Vec<PubPlan>,
    /// Indexed by subscriber id.
    pub subscribers: Vec<SubPlan>,
    pub receivers: Vec<ReceiverPlan>,
}

/// Which publishers and subscribers go to which broker.
#[derive(Debug, Clone, Copy)]
pub struct Layout {
    pub brokers: usize,
    pub placement: Placement,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Publisher,
    Subscriber,
}

impl Layout {
    /// The broker index of the `idx`-th client of `role`.
    pub fn broker(&self, role: Role, idx: u32) -> usize {
        let n = self.brokers.max(1);
        let idx = idx as usize;
        match (self.placement, role) {
            (Placement::Same, _) => idx % n,
            (Placement::Spread, _) if n == 1 => 0,
            (Placement::Spread, Role::Publisher) => 2 * (idx % n.div_ceil(2)),
            (Placement::Spread, Role::Subscriber) => 1 + 2 * (idx % (n / 2)),
        }
    }
}

fn pub_topic(prefix: &str, id: u32) -> String {
    format!("{prefix}/p{id}")
}

fn qos_of(qos: &[u8], id: u32) -> u8 {
    qos[id as usize % qos.len()]
}

impl Topology {
    fn add_publishers(&mut self, n: u32, qos: &[u8], prefix: &str, layout: Layout) {
        for id in 0..n {
            let broker = layout.broker(Role::Publisher, id);
            self.publishers.push(PubPlan {
                topic: pub_topic(prefix, id),
                qos: qos_of(qos, id),
                broker,
            });
        }
    }

    fn add_subscriber(&mut self, filter: String, qos: u8, receiver: usize, layout: Layout) {
        let broker = layout.broker(Role::Subscriber, self.subscribers.len() as u32);
        self.subscribers.push(SubPlan {
            filter,
            qos,
            broker,
            receiver,
        });
    }

    fn all_publishers(&self) -> Option<Vec<u32>> {
        Some((0..self.publishers.len() as u32).collect())
    }

    /// `n` publishers, nobody listening.
    pub fn publishers_only(n: u32, qos: &[u8], prefix: &str, layout: Layout) -> Topology {
        let mut t = Topology::default();
        t.add_publishers(n, qos, prefix, layout);
        t
    }

    /// `n` subscribers on `filter`, fed from outside the run.
    pub fn subscribers_only(n: u32, filter: &str, qos: u8, layout: Layout) -> Topology {
        let mut t = Topology::default();
        for i in 0..n {
            t.receivers.push(ReceiverPlan {
                label: format!("s{i}"),
                publishers: None,
            });
            t.add_subscriber(filter.to_owned(), qos, i as usize, layout);
        }
        t
    }

    /// `p` publishers, one subscriber on `<prefix>/+`.
    pub fn fanin(p: u32, qos: &[u8], prefix: &str, layout: Layout) -> Topology {
        Self::many_to_each(p, 1, qos, prefix, layout)
    }

    /// `p` publishers and `s` subscribers each on `<prefix>/+` (every subscriber gets every
    /// message); the `offline` scenario's shape.
    pub fn many_to_each(p: u32, s: u32, qos: &[u8], prefix: &str, layout: Layout) -> Topology {
        let mut t = Topology::default();
        t.add_publishers(p, qos, prefix, layout);
        let max_qos = qos.iter().copied().max().unwrap_or(0);
        for i in 0..s {
            t.receivers.push(ReceiverPlan {
                label: format!("s{i}"),
                publishers: t.all_publishers(),
            });
            t.add_subscriber(format!("{prefix}/+"), max_qos, i as usize, layout);
        }
        t
    }

    /// One publisher, `s` subscribers on its topic.
    pub fn fanout(s: u32, qos: &[u8], prefix: &str, layout: Layout) -> Topology {
        let mut t = Topology::default();
        t.add_publishers(1, qos, prefix, layout);
        for i in 0..s {
            t.receivers.push(ReceiverPlan {
                label: format!("s{i}"),
                publishers: Some(vec![0]),
            });
            t.add_subscriber(pub_topic(prefix, 0), qos_of(qos, 0), i as usize, layout);
        }
        t
    }

    /// `n` pairs: subscriber i listens to publisher i only.
    pub fn p2p(n: u32, qos: &[u8], prefix: &str, layout: Layout) -> Topology {
        let mut t = Topology::default();
        t.add_publishers(n, qos, prefix, layout);
        for i in 0..n {
            t.receivers.push(ReceiverPlan {
                label: format!("s{i}"),
                publishers: Some(vec![i]),
            });
            t.add_subscriber(pub_topic(prefix, i), qos_of(qos, i), i as usize, layout);
        }
        t
    }

    /// `p` publishers, `k` subscribers in the shared group `group` on `<prefix>/+`: each
    /// message must reach the group once.
    pub fn shared(
        p: u32,
        k: u32,
        group: &str,
        qos: &[u8],
        prefix: &str,
        layout: Layout,
    ) -> Topology {
        let mut t = Topology::default();
        t.add_publishers(p, qos, prefix, layout);
        t.receivers.push(ReceiverPlan {
            label: format!("$share/{group} ({k} members)"),
            publishers: t.all_publishers(),
        });
        let max_qos = qos.iter().copied().max().unwrap_or(0);
        for _ in 0..k {
            t.add_subscriber(format!("$share/{group}/{prefix}/+"), max_qos, 0, layout);
        }
        t
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout(brokers: usize, placement: Placement) -> Layout {
        Layout { brokers, placement }
    }

    #[test]
    fn same_placement_round_robins_both_roles_from_the_first_broker() {
        let l = layout(3, Placement::Same);
        let pubs: Vec<_> = (0..4).map(|i| l.broker(Role::Publisher, i)).collect();
        let subs: Vec<_> = (0..4).map(|i| l.broker(Role::Subscriber, i)).collect();
        assert_eq!((pubs, subs), (vec![0, 1, 2, 0], vec![0, 1, 2, 0]));
    }

    #[test]
    fn spread_placement_keeps_publishers_and_subscribers_apart() {
        for n in 2..6 {
            let l = layout(n, Placement::Spread);
            for i in 0..10 {
                let (p, s) = (l.broker(Role::Publisher, i), l.broker(Role::Subscriber, i));
                assert!(
                    p < n && s < n && p % 2 == 0 && s % 2 == 1,
                    "n {n} i {i}: {p} {s}"
                );
            }
        }
        let l = layout(4, Placement::Spread);
        assert_eq!(
            (0..3)
                .map(|i| l.broker(Role::Publisher, i))
                .collect::<Vec<_>>(),
            [0, 2, 0]
        );
        assert_eq!(
            (0..3)
                .map(|i| l.broker(Role::Subscriber, i))
                .collect::<Vec<_>>(),
            [1, 3, 1]
        );
        assert_eq!(layout(1, Placement::Spread).broker(Role::Subscriber, 5), 0);
    }

    #[test]
    fn scenario_shapes() {
        let l = layout(1, Placement::Same);
        let t = Topology::fanin(3, &[0, 1], "x", l);
        assert_eq!(
            t.publishers.iter().map(|p| p.qos).collect::<Vec<_>>(),
            [0, 1, 0]
        );
        assert_eq!(
            (
                t.subscribers.len(),
                t.subscribers[0].filter.as_str(),
                t.subscribers[0].qos
            ),
            (1, "x/+", 1)
        );
        assert_eq!(t.receivers[0].publishers, Some(vec![0, 1, 2]));

        let t = Topology::p2p(2, &[1], "x", l);
        assert_eq!(t.subscribers[1].filter, "x/p1");
        assert_eq!(t.receivers[1].publishers, Some(vec![1]));

        let t = Topology::shared(2, 3, "g", &[2], "x", l);
        assert_eq!(t.receivers.len(), 1);
        assert!(t
            .subscribers
            .iter()
            .all(|s| s.receiver == 0 && s.filter == "$share/g/x/+"));

        let t = Topology::fanout(4, &[1], "x", l);
        assert_eq!((t.publishers.len(), t.receivers.len()), (1, 4));
        assert!(Topology::subscribers_only(2, "a/#", 1, l)
            .receivers
            .iter()
            .all(|r| r.publishers.is_none()));
    }
}
