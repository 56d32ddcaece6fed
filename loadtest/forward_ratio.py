#!/usr/bin/env python3
"""The cross-node CPU cost of issue 12, measured in turns so that a noisy machine shows.

    python3 loadtest/forward_ratio.py [--rounds 5] [--secs 10] [--nodes 3] [--paced]

One single-node broker and one cluster of --nodes are started side by side and kept up.
Each round runs the p2p QoS 1 row of `cluster_bench.py --only forward` (8 pairs, flat out)
once on the single node (publishers and subscribers on it) and once across two cluster
nodes (publishers on node 0, subscribers on node 1), in alternating order: the brokers'
CPU seconds per million delivered messages, summed over every node of the system measured.
With --paced, the 10,000 msg/s row instead (its p99 too).

Prints each round and then the medians, with the ratio cross/same per round and of the
medians. The goal of issue 12 is a ratio of at most 2.5 (CPU) and 2 (p99, paced).
Binaries as cluster_bench.py (PETREL_BIN, PETREL_BENCH). Measurements, not assertions.
"""

import argparse
import json
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import cluster_bench as cb  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--secs", type=int, default=10)
    ap.add_argument("--nodes", type=int, default=3)
    ap.add_argument("--paced", action="store_true", help="the 10,000 msg/s row, with p99")
    a = ap.parse_args()

    dur = ["--duration", f"{a.secs}s"]
    row = ["p2p", "-c", "8", "--qos", "1"] + dur
    if a.paced:
        row += ["--rate", "1250"]
    one = cb.Cluster(1)
    many = None
    try:
        many = cb.Cluster(a.nodes)
        same, cross = [], []
        for r in range(a.rounds):
            order = [("same", one), ("cross", many)]
            if r % 2:
                order.reverse()
            got = {}
            for name, c in order:
                if name == "same":
                    got[name] = cb.traffic(c, row + ["--placement", "same"])
                else:
                    got[name] = cb.traffic(c, row + ["--placement", "spread"], [0, 1])
            same.append(got["same"])
            cross.append(got["cross"])
            s, x = got["same"], got["cross"]
            print(f"round {r + 1}: same {s['broker_cpu_s_per_million']:.2f} s/M "
                  f"({s['per_s']:.0f}/s, p99 {s['p99_ms']:.2f} ms), "
                  f"cross {x['broker_cpu_s_per_million']:.2f} s/M "
                  f"({x['per_s']:.0f}/s, p99 {x['p99_ms']:.2f} ms), "
                  f"CPU ratio {x['broker_cpu_s_per_million'] / s['broker_cpu_s_per_million']:.2f}, "
                  f"p99 ratio {x['p99_ms'] / max(s['p99_ms'], 1e-9):.2f}, "
                  f"lost {s['lost'] + x['lost']}, dup {s['duplicated'] + x['duplicated']}",
                  flush=True)

        def med(rows, key):
            return statistics.median(r[key] for r in rows)

        cpu_s, cpu_x = med(same, "broker_cpu_s_per_million"), med(cross, "broker_cpu_s_per_million")
        p99_s, p99_x = med(same, "p99_ms"), med(cross, "p99_ms")
        ratios = [x["broker_cpu_s_per_million"] / s["broker_cpu_s_per_million"]
                  for s, x in zip(same, cross)]
        summary = {
            "rounds": a.rounds, "paced": a.paced,
            "same_cpu_s_per_million": cpu_s, "cross_cpu_s_per_million": cpu_x,
            "cpu_ratio_of_medians": cpu_x / cpu_s,
            "cpu_ratio_per_round": [round(r, 2) for r in ratios],
            "same_p99_ms": p99_s, "cross_p99_ms": p99_x,
            "p99_ratio_of_medians": p99_x / max(p99_s, 1e-9),
            "same_per_s": med(same, "per_s"), "cross_per_s": med(cross, "per_s"),
            "lost": sum(r["lost"] for r in same + cross),
            "duplicated": sum(r["duplicated"] for r in same + cross),
        }
        print(f"median: same {cpu_s:.2f} s/M, cross {cpu_x:.2f} s/M, "
              f"CPU ratio {cpu_x / cpu_s:.2f} (rounds {summary['cpu_ratio_per_round']}); "
              f"p99 same {p99_s:.2f} ms, cross {p99_x:.2f} ms, "
              f"ratio {summary['p99_ratio_of_medians']:.2f}")
        print(json.dumps(summary))
    finally:
        one.close()
        if many:
            many.close()


if __name__ == "__main__":
    main()
