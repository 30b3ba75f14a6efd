"""A federation across hosts on one Linux machine: one network namespace per host, shaped links.

The coordinator and each hospital run in a network namespace of their own (``fs<tag>-coord``,
``fs<tag>-h1``, ...), each with one interface (``eth0``) and one address of a private /24
(``10.213.<n>.0/24`` by default). The other end of every host's veth pair sits in a further
namespace, ``fs<tag>-wan``, on a bridge: the WAN between them. Nothing is added to the machine's
own namespace (no address, route or interface), and ``down()`` deletes every namespace it made,
which takes their interfaces and qdiscs with them.

* TLS: the federation's coordinator certificate names the coordinator's WAN address; hospitals
  dial ``<that address>:<port>`` as they would over the internet (the coordinator's nginx passes
  the Fleet API only to them). ``fedsynth launch`` runs inside the coordinator's namespace and
  reaches the coordinator on its own 127.0.0.1, as on a real coordinator host.
* Links: a hospital's rate (Mbit/s) is enforced with ``tc qdisc ... tbf`` in both directions: on
  its own ``eth0`` (upload) and on its port of the bridge (download).
* Faults: ``cut(name)`` / ``restore(name)`` take a host's port of the bridge down / up (as a WAN
  line that goes dead: the host's packets go nowhere, nothing tells its processes);
  ``empty(name)`` SIGKILLs every process in a host's namespace (the host lost power).

Used by the fault tests (tests/system/test_netns_*.py, fixture ``netns_federation`` in
tests/harness/netns_helpers.py), the shaped-link and soak benchmarks (bench/net.py) and by hand:
``deploy/netns-harness.sh`` (root, Linux).
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from fedsynth.deployment import child_env

from .localdeploy import FEDSYNTH, Proc, hospital_toml, launch_toml, metrics_rows, wait_for

IP = shutil.which("ip", path="/usr/sbin:/usr/bin:/sbin:/bin")
TC = shutil.which("tc", path="/usr/sbin:/usr/bin:/sbin:/bin")
COORD = "coord"
PORT = 8443          # the coordinator's public (nginx, TLS) port on its WAN address
LINK_PORT = 9091     # its SuperLink, on the coordinator host's own 127.0.0.1
NODE_PORT = 9094     # each hospital's SuperNode runtime port, on its own 127.0.0.1


class HarnessError(RuntimeError):
    """The harness cannot run here (not root, no iproute2/tc, namespaces refused)."""


def _run(args: list[str], check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess:
    proc = subprocess.run(args, capture_output=True, text=True, timeout=timeout, check=False)
    if check and proc.returncode != 0:
        raise HarnessError(f"`{' '.join(args)}` failed: {proc.stderr.strip()}")
    return proc


def available() -> str | None:
    """None when this machine can run the harness, else why not (one line)."""
    if IP is None or TC is None:
        return "iproute2 (ip, tc) is not installed (apt-get install iproute2)"
    if os.geteuid() != 0:
        return "the multi-host harness needs root (network namespaces, veth, tc)"
    if shutil.which("nginx", path="/usr/sbin:/usr/bin:/sbin:/bin") is None:
        return "nginx is not installed (apt-get install nginx)"
    return None


@dataclass
class Host:
    name: str
    ns: str
    address: str
    wan_port: str            # its veth end on the bridge, in the WAN namespace
    mbit: float | None = None

    def exec(self) -> list[str]:
        return [IP, "netns", "exec", self.ns]


@dataclass
class Harness:
    """Namespaces, bridge, veth pairs and tbf shaping; processes started inside them."""

    folder: Path
    rates: dict[str, float | None]              # hospital name -> Mbit/s (None: unshaped)
    coordinator_mbit: float | None = None
    tag: str = field(default_factory=lambda: f"{random.getrandbits(20):05x}")
    subnet: int = field(default_factory=lambda: random.randrange(1, 255))
    hosts: dict[str, Host] = field(default_factory=dict)
    procs: dict[str, Proc] = field(default_factory=dict)
    made: list[str] = field(default_factory=list)

    # -- network -----------------------------------------------------------------------------
    @property
    def wan(self) -> str:
        return f"fs{self.tag}-wan"

    @property
    def coordinator(self) -> Host:
        return self.hosts[COORD]

    @property
    def public(self) -> str:
        return f"{self.coordinator.address}:{PORT}"

    def _ns(self, name: str) -> str:
        _run([IP, "netns", "add", name])
        self.made.append(name)
        _run([IP, "-n", name, "link", "set", "lo", "up"])
        return name

    def up(self) -> "Harness":
        why = available()
        if why:
            raise HarnessError(why)
        self.folder.mkdir(parents=True, exist_ok=True)
        try:
            self._ns(self.wan)
            _run([IP, "-n", self.wan, "link", "add", "br0", "type", "bridge"])
            _run([IP, "-n", self.wan, "link", "set", "br0", "up"])
            for i, (name, mbit) in enumerate([(COORD, self.coordinator_mbit),
                                               *self.rates.items()]):
                self._add_host(name, i + 1, mbit)
        except BaseException:
            self.down()
            raise
        return self

    def _add_host(self, name: str, index: int, mbit: float | None) -> None:
        ns = self._ns(f"fs{self.tag}-{name}")
        port = f"p{index}"
        # both ends are created inside the WAN namespace, then one moves: nothing in the
        # machine's own namespace, even for an instant
        _run([IP, "-n", self.wan, "link", "add", port, "type", "veth", "peer", "name", "eth0",
              "netns", ns])
        _run([IP, "-n", self.wan, "link", "set", port, "master", "br0"])
        _run([IP, "-n", self.wan, "link", "set", port, "up"])
        address = f"10.213.{self.subnet}.{index}"
        _run([IP, "-n", ns, "addr", "add", f"{address}/24", "dev", "eth0"])
        _run([IP, "-n", ns, "link", "set", "eth0", "up"])
        host = Host(name, ns, address, port, mbit)
        self.hosts[name] = host
        if mbit:
            self.shape(name, mbit)

    def shape(self, name: str, mbit: float) -> None:
        """``mbit`` Mbit/s each way: tbf on the host's eth0 (up) and its bridge port (down)."""
        host = self.hosts[name]
        rate = f"{mbit}mbit"
        # burst: at least rate/HZ plus an MTU; 64 kB keeps tbf exact at these rates
        for ns, dev in ((host.ns, "eth0"), (self.wan, host.wan_port)):
            _run([TC, "-n", ns, "qdisc", "replace", "dev", dev, "root", "tbf", "rate", rate,
                  "burst", "64kb", "latency", "200ms"])
        host.mbit = mbit

    def cut(self, name: str) -> None:
        _run([IP, "-n", self.wan, "link", "set", self.hosts[name].wan_port, "down"])

    def restore(self, name: str) -> None:
        _run([IP, "-n", self.wan, "link", "set", self.hosts[name].wan_port, "up"])

    def pids(self, name: str) -> list[int]:
        out = _run([IP, "netns", "pids", self.hosts[name].ns], check=False).stdout
        return [int(x) for x in out.split()]

    def empty(self, name: str) -> list[int]:
        """SIGKILL every process in the host's namespace (its machine lost power)."""
        killed: list[int] = []
        for _ in range(20):
            pids = self.pids(name)
            if not pids:
                break
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                    killed.append(pid)
                except ProcessLookupError:
                    pass
            time.sleep(0.2)
        for proc in self.procs.values():  # reap our own children among them
            if proc.popen.pid in killed:
                proc.popen.wait(timeout=10)
        return killed

    def down(self) -> None:
        """Stop every process started here, kill what is left in the namespaces, delete them."""
        for proc in list(self.procs.values()):
            try:
                proc.stop()
            except Exception:  # noqa: BLE001 - keep cleaning up
                pass
        for ns in reversed(self.made):
            out = _run([IP, "netns", "pids", ns], check=False).stdout
            for pid in (int(x) for x in out.split()):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        for ns in reversed(self.made):
            _run([IP, "netns", "del", ns], check=False)
        self.made.clear()

    def __enter__(self) -> "Harness":
        return self.up()

    def __exit__(self, *exc: object) -> None:
        self.down()

    # -- processes ---------------------------------------------------------------------------
    def start(self, host: str, label: str, args: list[str],
              env: dict[str, str] | None = None) -> Proc:
        log = self.folder / f"{label}.log"
        fh = log.open("a")
        popen = subprocess.Popen([*self.hosts[host].exec(), *FEDSYNTH, *args], cwd=self.folder,
                                 stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                 env=child_env(env), start_new_session=True)
        fh.close()
        proc = Proc(label, popen, log)
        self.procs[label] = proc
        return proc

    def in_host(self, host: str, args: list[str], timeout: float = 300
                ) -> subprocess.CompletedProcess:
        return subprocess.run([*self.hosts[host].exec(), *FEDSYNTH, *args], cwd=self.folder,
                              capture_output=True, text=True, timeout=timeout,
                              env=child_env(), check=False)


@dataclass
class Federation:
    """A harness with federation keys, demo data, one coordinator and its hospitals."""

    harness: Harness
    keys: object = None
    data: dict[str, Path] = field(default_factory=dict)
    coord_runs: int = 0

    @property
    def folder(self) -> Path:
        return self.harness.folder

    def prepare(self, matrix: int = 32) -> "Federation":
        from fedsynth.certs import init_federation, new_node_key
        from fedsynth.demo_data import build_demo_hospitals

        names = list(self.harness.rates)
        # the coordinator's certificate names its WAN address: hospitals check it against that
        self.keys = init_federation(self.folder / "keys", hosts=[self.harness.coordinator.address])
        for name in names:
            new_node_key(self.keys.root, name)
        folders = build_demo_hospitals(self.folder / "data", len(names), matrix=matrix)
        self.data = dict(zip(names, folders))
        return self

    @property
    def coord_label(self) -> str:
        """The newest coordinator process's label."""
        return "coordinator" if self.coord_runs <= 1 else f"coordinator-{self.coord_runs}"

    def start_coordinator(self) -> Proc:
        self.coord_runs += 1
        return self.harness.start(COORD, self.coord_label, [
            "coordinator", "--keys", str(self.keys.root), "--address", self.harness.public,
            "--superlink-port", str(LINK_PORT), "--state", str(self.folder / "state"),
            "--rescan", "2"])

    def hospital_config(self, name: str, cache_dir: Path | None = None) -> Path:
        path = hospital_toml(self.folder / f"{name}.toml", self.harness.public, self.keys.root,
                             name, self.data[name], NODE_PORT)
        if cache_dir is not None:
            text = path.read_text().replace(f'"{self.folder / "cache" / name}"',
                                            f'"{cache_dir}"')
            path.write_text(text)
        return path

    def start_hospital(self, name: str, cache_dir: Path | None = None) -> Proc:
        return self.harness.start(name, name, ["hospital", str(self.hospital_config(
            name, cache_dir))])

    def start_all(self, timeout: float = 300) -> None:
        self.start_coordinator()
        for name in self.harness.rates:
            self.start_hospital(name)
        self.wait_connected(list(self.harness.rates), timeout)

    def procs(self) -> tuple[Proc, ...]:
        return tuple(p for p in self.harness.procs.values() if p.popen.poll() is None) or \
            tuple(self.harness.procs.values())

    def wait_connected(self, names: list[str], timeout: float = 300) -> None:
        wait_for(f"{', '.join(names)} connected", lambda: all(
            "SuperNode ID" in self.harness.procs[n].text() for n in names), timeout,
            tuple(self.harness.procs[n] for n in [self.coord_label, *names]))

    def launch(self, run_id: str, resume: bool = False, **run: object) -> Path:
        """Submit a run from the coordinator's host; returns its run folder."""
        run_dir = self.folder / "runs"
        cfg = dict(family="dcgan", rounds=3, local_steps=20, batch_size=4, image_size=32,
                   min_hospitals=len(self.harness.rates), round_timeout=60,
                   signing_key=self.keys.signing_key, run_dir=run_dir, run_id=run_id)
        cfg.update(run)
        path = launch_toml(self.folder / f"launch-{run_id}.toml", f"127.0.0.1:{PORT}",
                           self.keys.ca_cert, **cfg)
        args = ["launch", str(path), "--flwr-home", str(self.folder / "flwr")]
        if resume:
            args += ["--resume", run_id]
        out = self.harness.in_host(COORD, args)
        if out.returncode != 0:
            raise AssertionError(f"launch failed: {out.stdout[-1000:]}{out.stderr[-2000:]}")
        return run_dir / run_id


# ---------------------------------------------------------------- by hand

def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="deploy/netns-harness.sh",
        description="Coordinator and hospitals each in a network namespace of their own, on "
                    "shaped links (root, Linux). Runs one federation run and removes everything.")
    p.add_argument("--folder", type=Path, default=Path("netns-harness"))
    p.add_argument("--rates", default="h1=20,h2=20,h3=5",
                   help="hospital=Mbit/s, comma separated (default h1=20,h2=20,h3=5)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--local-steps", type=int, default=20)
    p.add_argument("--wire-dtype", default="float32")
    p.add_argument("--family", default="dcgan")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--hold", action="store_true",
                   help="after the run, keep everything up until Ctrl-C (inspect with "
                        "`ip netns exec fs<tag>-h1 ...`)")
    args = p.parse_args(argv)
    rates = {k: float(v) for k, v in (x.split("=", 1) for x in args.rates.split(","))}
    harness = Harness(args.folder.resolve(), rates)
    # SIGTERM / SIGHUP end the run through ``finally`` like Ctrl-C: nothing is left behind
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, lambda *_: sys.exit(143))
    try:
        harness.up()
    except HarnessError as exc:
        print(f"netns-harness: {exc}", file=sys.stderr)
        return 2
    try:
        fed = Federation(harness).prepare(matrix=args.image_size)
        print(f"hosts: " + ", ".join(f"{h.name} {h.address} ({h.ns}, "
                                      f"{h.mbit or 'unshaped'} Mbit/s)"
                                      for h in harness.hosts.values()), flush=True)
        fed.start_all()
        folder = fed.launch("harness", rounds=args.rounds, local_steps=args.local_steps,
                            wire_dtype=args.wire_dtype, family=args.family,
                            image_size=args.image_size)
        wait_for(f"{args.rounds} rounds", lambda: len(metrics_rows(folder)) >= args.rounds,
                 600 + 120 * args.rounds, fed.procs())
        for row in metrics_rows(folder):
            print(f"round {row['round']}: {row['seconds']:.1f} s, {row['replied']}/"
                  f"{row['selected']} replied, failed {row['failed_hospitals'] or '-'}",
                  flush=True)
        if args.hold:
            print("holding; Ctrl-C removes everything", flush=True)
            while True:
                time.sleep(3600)
        return 0
    finally:
        harness.down()


if __name__ == "__main__":
    sys.exit(main())
