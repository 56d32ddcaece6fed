use std::collections::HashSet;

use super::*;

fn track(seqs: &[u64]) -> (SeqTracker, Vec<Arrival>) {
    let mut t = SeqTracker::default();
    let arrivals = seqs.iter().map(|&s| t.record(s)).collect();
    (t, arrivals)
}

/// The obvious model: a set of seen numbers and the highest so far.
fn naive(seqs: &[u64], expected: u64) -> StreamCounts {
    let mut seen = HashSet::new();
    let mut end = 0;
    let mut c = StreamCounts {
        expected: Some(expected),
        ..StreamCounts::default()
    };
    for &s in seqs {
        c.received += 1;
        if !seen.insert(s) {
            c.duplicates += 1;
            continue;
        }
        if s + 1 < end {
            c.out_of_order += 1;
        }
        end = end.max(s + 1);
    }
    c.distinct = seen.len() as u64;
    c.lost = expected.max(end) - c.distinct;
    c
}

/// A deterministic pseudo-random sequence (xorshift), so failures reproduce.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

#[test]
fn a_stream_with_known_gaps_duplicates_and_reordering_gives_exactly_those_counts() {
    use Arrival::*;
    let (t, arrivals) = track(&[0, 1, 2, 4, 3, 5, 5, 7, 9, 8, 8, 1]);
    assert_eq!(
        arrivals,
        [
            InOrder, InOrder, InOrder, InOrder, OutOfOrder, InOrder, Duplicate, InOrder, InOrder,
            OutOfOrder, Duplicate, Duplicate
        ]
    );
    let c = t.counts(Some(12));
    // Lost: 6 (a gap never filled), 10 and 11 (the tail never sent on).
    let want = StreamCounts {
        expected: Some(12),
        received: 12,
        distinct: 9,
        lost: 3,
        duplicates: 3,
        out_of_order: 2,
        out_of_range: 0,
    };
    assert_eq!(c, want);
    assert_eq!(
        t.counts(None).lost,
        1,
        "without an expected count only the inner gap is lost"
    );
}

#[test]
fn an_in_order_stream_is_complete_and_compacts_to_one_word() {
    let seqs: Vec<u64> = (0..100_000).collect();
    let (t, _) = track(&seqs);
    assert_eq!(t.counts(Some(100_000)), naive(&seqs, 100_000));
    assert_eq!(t.counts(Some(100_000)).lost, 0);
    assert!(
        t.words.len() <= 1,
        "full prefix forgotten, {} words kept",
        t.words.len()
    );
}

#[test]
fn late_fills_and_duplicates_below_the_forgotten_prefix_are_counted() {
    // Every 1000th message held back and delivered at the end; then replays of old ones.
    let mut seqs: Vec<u64> = (0..50_000).filter(|s| s % 1000 != 999).collect();
    seqs.extend((0..50_000).filter(|s| s % 1000 == 999));
    seqs.extend([0, 1, 63, 64, 49_999]);
    let (t, _) = track(&seqs);
    let c = t.counts(Some(50_000));
    assert_eq!(c, naive(&seqs, 50_000));
    assert_eq!((c.lost, c.duplicates, c.out_of_order), (0, 5, 49));
}

#[test]
fn random_streams_match_the_naive_model() {
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    for round in 0..50 {
        let n = 1 + rng.next() % 5000;
        let mut seqs = Vec::new();
        for s in 0..n {
            match rng.next() % 100 {
                0..=4 => {}                   // lost
                5..=9 => seqs.extend([s, s]), // duplicated
                10..=14 if !seqs.is_empty() => {
                    // reordered: goes before a random earlier arrival
                    let at = (rng.next() % seqs.len() as u64) as usize;
                    seqs.insert(at, s);
                }
                _ => seqs.push(s),
            }
        }
        let expected = n + rng.next() % 3; // sometimes a lost tail
        let (t, _) = track(&seqs);
        assert_eq!(
            t.counts(Some(expected)),
            naive(&seqs, expected),
            "round {round}, n {n}"
        );
    }
}

#[test]
fn merged_members_of_a_shared_group_count_the_union() {
    // Two members share 0..10_000 round-robin; both were given 10 and 5000 (duplicates
    // across the group), and nobody got 7777.
    let a: Vec<u64> = (0..10_000)
        .filter(|s| s % 2 == 0 && *s != 7777)
        .chain([5001])
        .collect();
    let b: Vec<u64> = (0..10_000)
        .filter(|s| s % 2 == 1 && *s != 7777)
        .chain([10])
        .collect();
    let (mut ta, _) = track(&a);
    let (tb, _) = track(&b);
    ta.merge(&tb);
    let c = ta.counts(Some(10_000));
    assert_eq!(
        (c.received, c.distinct, c.lost, c.duplicates),
        (10_001, 9_999, 1, 2)
    );

    // A member that saw everything (fully compacted) merged with one that saw a little.
    let (mut full, _) = track(&(0..4096).collect::<Vec<_>>());
    let (some, _) = track(&[3, 4000, 5000]);
    full.merge(&some);
    let c = full.counts(Some(5001));
    assert_eq!((c.distinct, c.duplicates, c.lost), (4097, 2, 5001 - 4097));
}

#[test]
fn sequence_numbers_far_ahead_are_not_tracked() {
    let (t, arrivals) = track(&[0, MAX_SPAN + 5]);
    assert_eq!(arrivals[1], Arrival::OutOfRange);
    let c = t.counts(Some(1));
    assert_eq!((c.distinct, c.lost, c.out_of_range), (1, 0, 1));
}

#[test]
fn counts_add_up() {
    let mut total = StreamCounts::default();
    let (t, _) = track(&[0, 2, 2]);
    total.add(&t.counts(Some(3)));
    total.add(&t.counts(Some(3)));
    assert_eq!(
        (total.expected, total.received, total.lost, total.duplicates),
        (Some(6), 6, 2, 2)
    );
    total.add(&t.counts(None));
    assert_eq!(
        total.expected,
        Some(6),
        "an unknown expectation adds nothing"
    );
}

#[test]
fn latency_percentiles_come_from_the_histogram() {
    let mut a = Latency::new();
    let mut b = Latency::new();
    for us in 1..=1000u64 {
        if us % 2 == 0 {
            a.record(us * 1000)
        } else {
            b.record(us * 1000)
        }
    }
    a.merge(&b);
    let s = a.summary();
    assert_eq!(s.count, 1000);
    let close = |got: f64, want: f64| (got - want).abs() <= want * 0.002;
    assert!(close(s.p50_us, 500.0), "{s:?}");
    assert!(close(s.p90_us, 900.0), "{s:?}");
    assert!(close(s.p99_us, 990.0), "{s:?}");
    assert!(close(s.p999_us, 999.0), "{s:?}");
    assert!(close(s.max_us, 1000.0), "{s:?}");
    assert!(close(s.min_us, 1.0), "{s:?}");
    assert_eq!(Latency::new().summary(), LatencySummary::default());
}
