"""``make bench-net``: rounds on shaped links against their floor, and a soak (root, Linux).

On the multi-host harness (``bench/netns.py``: coordinator and 3 hospitals each in a network
namespace of its own, h1/h2 on 20 Mbit/s, h3 on 5 Mbit/s, tbf both ways):

* **shaped rounds**, one run per wire format (fp32, fp16, int8) of the same model: bytes each
  hospital's link carried per round are *measured* from the kernel's tbf counters (``tc -s``:
  its eth0 for the upload, its bridge port for the download, over the run's rounds; they include
  Flower's heartbeats and TLS); a hospital's floor in a round = its bytes / its link rate + its
  reported compute (train-seconds + eval-seconds); the round's floor = the slowest hospital's.
  Figure: sum of the coordinator's round seconds / sum of the round floors, rounds after the
  first (round 1 carries imports and the slice cache).
* **soak**: many rounds of a small model; per round, RSS (sum of VmRSS) and open file
  descriptors of every process in the coordinator's namespace and in each hospital's namespace.
  Bound: RSS growth from round 5 to the end <= 50 MB per host, fds flat (growth <= 5), no round
  lost (rounds 1..N each once, every hospital replied).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

from .localdeploy import metrics_rows, wait_for
from .netns import COORD, TC, Federation, Harness, HarnessError, _run

RATES = {"h1": 20.0, "h2": 20.0, "h3": 5.0}


def tbf_bytes(net: Harness, name: str) -> tuple[int, int]:
    """(uploaded, downloaded) bytes through the host's tbf qdiscs so far."""
    host = net.hosts[name]

    def sent(ns: str, dev: str) -> int:
        out = _run([TC, "-n", ns, "-s", "qdisc", "show", "dev", dev]).stdout
        m = re.search(r"Sent (\d+) bytes", out)
        return int(m.group(1)) if m else 0

    return sent(host.ns, "eth0"), sent(net.wan, host.wan_port)


def host_usage(net: Harness, name: str) -> tuple[float, int]:
    """(RSS MB, open fds) summed over every process in the host's namespace."""
    rss_kb, fds = 0, 0
    for pid in net.pids(name):
        try:
            status = Path(f"/proc/{pid}/status").read_text()
            m = re.search(r"VmRSS:\s+(\d+) kB", status)
            rss_kb += int(m.group(1)) if m else 0
            fds += len(os.listdir(f"/proc/{pid}/fd"))
        except OSError:
            continue
    return rss_kb / 1024, fds


def shaped_run(fed: Federation, wire: str, rounds: int, tag: str = "", **run: object) -> dict:
    """One run in ``wire``; tbf counters read as each round's row lands, so every round has the
    bytes each hospital moved in it (round 1 also carries the run's start, the last round its
    separate evaluate message)."""
    net = fed.harness
    marks = [{h: tbf_bytes(net, h) for h in RATES}]
    folder = fed.launch(f"shaped-{wire}{tag}", rounds=rounds, wire_dtype=wire, **run)
    deadline = time.monotonic() + 300 + 90 * rounds
    while len(marks) <= rounds:
        if time.monotonic() > deadline or not all(p.popen.poll() is None for p in fed.procs()):
            raise AssertionError(f"{wire}: {len(marks) - 1}/{rounds} rounds")
        if len(metrics_rows(folder)) >= len(marks):
            marks.append({h: tbf_bytes(net, h) for h in RATES})
        time.sleep(0.2)
    rows = metrics_rows(folder)
    names = {n: node for r in rows for node, n in r.get("names", {}).items()}
    out: dict = {"wire": wire + tag, "rounds": []}
    for i, r in enumerate(rows):
        floors, moved = {}, {}
        for h, mbit in RATES.items():
            up = marks[i + 1][h][0] - marks[i][h][0]
            down = marks[i + 1][h][1] - marks[i][h][1]
            m = r["hospitals"].get(names.get(h, ""), {})
            compute = float(m.get("train-seconds", 0.0)) + float(m.get("eval-seconds", 0.0))
            floors[h] = (up + down) * 8 / (mbit * 1e6) + compute
            moved[h] = {"up": up, "down": down, "compute": compute}
        out["rounds"].append({"round": r["round"], "seconds": r["seconds"],
                              "floor": max(floors.values()),
                              "slowest": max(floors, key=floors.get), "floors": floors,
                              "moved": moved, "replied": r["replied"]})
    later = out["rounds"][1:]
    out["ratio"] = sum(x["seconds"] for x in later) / sum(x["floor"] for x in later)
    return out


TCP_PROBE = """
import socket, sys, time
mode, addr, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
if mode == "server":
    s = socket.create_server((addr, 9555)); c, _ = s.accept(); got = 0
    while got < n:
        b = c.recv(1 << 16)
        if not b: break
        got += len(b)
    c.sendall(b"k"); c.close()
else:
    c = socket.create_connection((addr, 9555), 10); t = time.monotonic()
    c.sendall(b"\\0" * n); c.shutdown(socket.SHUT_WR); c.recv(1)
    print(time.monotonic() - t)
"""


def tcp_probe(net: Harness, name: str, nbytes: int) -> float:
    """Seconds one plain TCP stream takes to push ``nbytes`` from ``name`` to the coordinator
    (what the link itself gives a single connection, without TLS, HTTP or Flower)."""
    import subprocess

    server = subprocess.Popen([*net.hosts[COORD].exec(), sys.executable, "-c", TCP_PROBE,
                               "server", net.coordinator.address, str(nbytes)])
    try:
        time.sleep(1.0)
        out = subprocess.run([*net.hosts[name].exec(), sys.executable, "-c", TCP_PROBE,
                              "client", net.coordinator.address, str(nbytes)],
                             capture_output=True, text=True, timeout=300, check=True)
        return float(out.stdout.strip())
    finally:
        server.wait(timeout=30)


def soak(fed: Federation, rounds: int, **run: object) -> dict:
    net = fed.harness
    folder = fed.launch("soak", rounds=rounds, **run)
    samples: list[dict] = []
    seen = 0
    deadline = time.monotonic() + 120 + 60 * rounds
    while seen < rounds:
        if time.monotonic() > deadline:
            raise AssertionError(f"soak: {seen}/{rounds} rounds before the deadline")
        n = len(metrics_rows(folder))
        if n > seen:
            seen = n
            samples.append({"round": n, **{h: host_usage(net, h) for h in [COORD, *RATES]}})
        time.sleep(0.5)
    rows = metrics_rows(folder)
    first = next((s for s in samples if s["round"] >= 5), samples[0])
    last = samples[-1]
    growth = {h: (last[h][0] - first[h][0], last[h][1] - first[h][1]) for h in [COORD, *RATES]}
    return {"rounds": rounds, "samples": samples, "growth": growth,
            "each_once": [r["round"] for r in rows] == list(range(1, rounds + 1)),
            "all_replied": all(r["replied"] == len(RATES) for r in rows),
            "round_seconds_median": statistics.median(r["seconds"] for r in rows)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--family", default="dcgan")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--shaped-rounds", type=int, default=3)
    p.add_argument("--local-steps", type=int, default=5)
    p.add_argument("--soak-rounds", type=int, default=120)
    p.add_argument("--soak-image-size", type=int, default=32)
    p.add_argument("--soak-wire", default="int8")
    p.add_argument("--wires", default="float32,float16,int8")
    p.add_argument("--secure-aggregation", action="store_true",
                   help="also a float32 run under SecAgg+ (issue 26): its round seconds and "
                        "bytes on the links against the plain float32 run's")
    p.add_argument("--json", type=Path, help="write every figure and sample here")
    args = p.parse_args(argv)
    folder = Path(tempfile.mkdtemp(prefix="fedsynth-net-"))
    net = Harness(folder, dict(RATES))
    for sig in (signal.SIGTERM, signal.SIGHUP):  # through ``finally``: nothing left behind
        signal.signal(sig, lambda *_: sys.exit(143))
    try:
        net.up()
    except HarnessError as exc:
        print(f"bench-net: {exc}", file=sys.stderr)
        return 2
    result: dict = {"shaped": [], "soak": None}
    try:
        fed = Federation(net).prepare(matrix=args.image_size)
        fed.start_all()
        if args.wires:
            n = 5_000_000
            for h in RATES:
                sec = tcp_probe(net, h, n)
                result.setdefault("tcp", {})[h] = sec
                print(f"tcp_probe_{h}: {n * 8 / sec / 1e6:.2f} Mbit/s of {RATES[h]:g} "
                      f"({n / 1e6:.0f} MB up in {sec:.2f} s, one plain TCP stream)", flush=True)
        for wire in [w for w in args.wires.split(",") if w]:
            res = shaped_run(fed, wire, args.shaped_rounds, family=args.family,
                             image_size=args.image_size, local_steps=args.local_steps,
                             batch_size=4)
            result["shaped"].append(res)
            print(f"net_round_over_floor_{wire}_{args.family}{args.image_size}: "
                  f"{res['ratio']:.3f}  (rounds 2..{args.shaped_rounds})", flush=True)
            for x in res["rounds"]:
                b = x["moved"]["h3"]
                print(f"  round {x['round']}: {x['seconds']:.1f} s, floor {x['floor']:.1f} s "
                      f"({x['slowest']}); h3 moved {b['up'] / 1e6:.2f} MB up, "
                      f"{b['down'] / 1e6:.2f} MB down, computed {b['compute']:.1f} s; "
                      f"replied {x['replied']}", flush=True)
        if args.secure_aggregation:
            shape = dict(family=args.family, image_size=args.image_size,
                         local_steps=args.local_steps, batch_size=4)
            plain = next((r for r in result["shaped"] if r["wire"] == "float32"), None) or \
                shaped_run(fed, "float32", args.shaped_rounds, **shape)
            secure = shaped_run(fed, "float32", args.shaped_rounds, tag="-secagg",
                                secure_aggregation=True, min_hospitals=len(RATES), **shape)
            result["secure"] = {"plain": plain, "secure": secure}

            def totals(res: dict) -> tuple[float, float]:  # rounds 2.. (round 1 starts the run)
                later = res["rounds"][1:]
                return (sum(x["seconds"] for x in later),
                        sum(m["up"] + m["down"] for x in later for m in x["moved"].values()))
            (ps, pb), (ss, sb) = totals(plain), totals(secure)
            print(f"secagg_round_seconds_over_plain_{args.family}{args.image_size}: {ss / ps:.3f} "
                  f"({ss:.1f} s vs {ps:.1f} s, rounds 2..{args.shaped_rounds}); "
                  f"secagg_link_bytes_over_plain: {sb / pb:.3f} ({sb / 1e6:.1f} MB vs "
                  f"{pb / 1e6:.1f} MB, 3 hospitals up + down); replied "
                  f"{[x['replied'] for x in secure['rounds']]}", flush=True)
        if args.soak_rounds:
            s = soak(fed, args.soak_rounds, family=args.family,
                     image_size=args.soak_image_size, local_steps=2, batch_size=4,
                     round_timeout=120, wire_dtype=args.soak_wire, evaluate_every=10)
            result["soak"] = s
            print(f"soak {s['rounds']} rounds: each once {s['each_once']}, all replied "
                  f"{s['all_replied']}, median round {s['round_seconds_median']:.1f} s", flush=True)
            for h, (rss, fds) in s["growth"].items():
                a, z = s["samples"][0][h], s["samples"][-1][h]
                print(f"  {h}: RSS {a[0]:.0f} -> {z[0]:.0f} MB (growth from round 5: "
                      f"{rss:+.1f} MB), fds {a[1]} -> {z[1]} ({fds:+d})", flush=True)
    finally:
        net.down()
        if args.json:
            args.json.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
