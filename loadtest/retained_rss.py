#!/usr/bin/env python3
"""RSS of retained messages, measured from outside (issue 10, point 3).

    python3 loadtest/retained_rss.py [--count N] [--payload BYTES] [--filler BYTES] [--bin PATH]

Starts a fresh `petrel` on free ports with an empty data directory, then N devices each
connect, set one retained message (`status/<i>`, PAYLOAD bytes, QoS 0) from their own
connection, and disconnect, the way a fleet sets its status. Prints the node's RSS before and
after (read from /proc once the node reports N retained messages and the RSS is steady) and
the difference per message. Needs only the standard library.

With --filler BYTES, one busy connection (a gateway) sets all N retained messages instead,
each after BYTES of QoS 0 telemetry to a topic nobody subscribes to: its read buffer grows to
64 KiB, so a retained message that kept a slice of it would keep a whole buffer chunk.
"""

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def varint(n):
    out = bytearray()
    while True:
        b = n % 128
        n //= 128
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def mqtt_str(s):
    b = s.encode()
    return len(b).to_bytes(2, "big") + b


def connect_packet(client_id):
    body = mqtt_str("MQTT") + bytes([4, 0x02]) + (30).to_bytes(2, "big") + mqtt_str(client_id)
    return b"\x10" + varint(len(body)) + body


def publish_packet(topic, payload):
    body = mqtt_str(topic) + payload
    return b"\x31" + varint(len(body)) + body


def metric(admin, name):
    text = urllib.request.urlopen(f"http://{admin}/metrics", timeout=5).read().decode()
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return None


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--count", type=int, default=20000)
    ap.add_argument("--payload", type=int, default=16)
    ap.add_argument("--filler", type=int, default=0)
    target = os.environ.get("CARGO_TARGET_DIR", os.path.expanduser("~/.cache/petrel-target"))
    ap.add_argument("--bin", default=os.environ.get("PETREL_BIN", f"{target}/release/petrel"))
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        ready = os.path.join(tmp, "ready.json")
        env = {k: v for k, v in os.environ.items() if not k.startswith("PETREL_")}
        env["PETREL_LOG"] = "warn"
        # Binaries from before the cluster have no gRPC listener (and no flag for it).
        helptext = subprocess.run([args.bin, "--help"], capture_output=True, text=True).stdout
        grpc = ["--grpc-addr", "127.0.0.1:0"] if "--grpc-addr" in helptext else []
        node = subprocess.Popen(
            [args.bin, "--mqtt-addr", "127.0.0.1:0", "--admin-addr", "127.0.0.1:0", *grpc,
             "--data-dir", os.path.join(tmp, "data"), "--ready-file", ready],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            deadline = time.time() + 30
            while not os.path.exists(ready):
                if time.time() > deadline or node.poll() is not None:
                    sys.exit("petrel did not start")
                time.sleep(0.05)
            info = json.load(open(ready))
            host, port = info["mqtt"].rsplit(":", 1)
            admin = info["admin"]
            # Warm the allocator and the listener with a few connections first.
            for i in range(200):
                with socket.create_connection((host, int(port))) as s:
                    s.sendall(connect_packet(f"warm-{i}"))
                    s.recv(4)
            time.sleep(1)
            before = rss_kib(node.pid)
            payload = b"x" * args.payload
            if args.filler:
                tele = b"\x30" + varint(2 + 11 + 200) + mqtt_str("telemetry/x") + b"t" * 200
                filler = tele * max(1, args.filler // len(tele))
                with socket.create_connection((host, int(port))) as s:
                    s.sendall(connect_packet("gateway"))
                    s.recv(4)
                    for i in range(args.count):
                        s.sendall(filler + publish_packet(f"status/{i}", payload))
                    s.sendall(b"\xe0\x00")
            for i in range(0 if args.filler else args.count):
                with socket.create_connection((host, int(port))) as s:
                    s.sendall(connect_packet(f"dev-{i}"))
                    s.recv(4)  # CONNACK
                    s.sendall(publish_packet(f"status/{i}", payload) + b"\xe0\x00")
            while metric(admin, "petrel_retained_messages") < args.count:
                time.sleep(0.1)
            # Let closing connections finish, then read a steady RSS.
            last = None
            for _ in range(50):
                time.sleep(0.2)
                now = rss_kib(node.pid)
                if now == last:
                    break
                last = now
            after = rss_kib(node.pid)
            per = (after - before) * 1024 / args.count
            how = (f"from one connection, each after {args.filler} bytes of telemetry"
                   if args.filler else "each from its own connection")
            print(f"retained messages: {args.count} x {args.payload}-byte payloads, "
                  f"topic status/<i>, {how}")
            print(f"RSS before: {before} KiB, after: {after} KiB, "
                  f"per retained message: {per:.0f} bytes")
        finally:
            node.terminate()
            node.wait(timeout=30)


if __name__ == "__main__":
    main()
