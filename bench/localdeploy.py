"""fedsynth's deployment commands as real processes on 127.0.0.1 (deployment tests, round bench)."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from fedsynth.deployment import BIN_DIR, child_env
from fedsynth.processes import kill_tree

# the console script (``python -m fedsynth.cli`` would load cli.py twice: two UserError classes)
FEDSYNTH = [str(BIN_DIR / "fedsynth")]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Proc:
    """A fedsynth command running in the background, its output in ``log``."""

    name: str
    popen: subprocess.Popen
    log: Path

    def text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def stop(self, sig: int = signal.SIGTERM) -> int:
        if self.popen.poll() is None:
            kill_tree(self.popen, sig, grace=15)
        return self.popen.wait()


def start(name: str, args: list[str], folder: Path, env: dict[str, str] | None = None) -> Proc:
    log = folder / f"{name}.log"
    fh = log.open("a")
    popen = subprocess.Popen([*FEDSYNTH, *args], cwd=folder, stdout=fh, stderr=subprocess.STDOUT,
                             stdin=subprocess.DEVNULL, env=child_env(env),
                             start_new_session=True)
    return Proc(name, popen, log)


def run(args: list[str], folder: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([*FEDSYNTH, *args], cwd=folder, capture_output=True, text=True,
                          timeout=timeout, env=child_env(), check=False)


def wait_for(what: str, predicate: Callable[[], bool], timeout: float,
             procs: tuple[Proc, ...] = ()) -> None:
    """Poll ``predicate``; on timeout, fail with the tail of every process log."""
    deadline = time.monotonic() + timeout
    why = f"timed out after {timeout:.0f} s"
    while time.monotonic() < deadline:
        if predicate():
            return
        dead = [p.name for p in procs if p.popen.poll() is not None]
        if dead:  # a daemon that exited will not make it happen: say so now
            why = f"{', '.join(dead)} exited"
            break
        time.sleep(1.0)
    tails = "\n".join(f"--- {p.name} ---\n" + "\n".join(p.text().splitlines()[-25:])
                      for p in procs)
    raise AssertionError(f"{why} waiting for {what}\n{tails}")


def metrics_rows(run_folder: Path) -> list[dict]:
    path = run_folder / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def hospital_toml(path: Path, address: str, keys: Path, name: str, data: Path,
                  port: int, executor: str = "warm") -> Path:
    path.write_text(f"""\
[coordinator]
address = "{address}"
root-certificates = "{keys / 'ca.pem'}"

[node]
key = "{keys / 'nodes' / name}"
port = {port}
executor = "{executor}"

[hospital]
name = "{name}"
data-dir = "{data}"
cache-dir = "{path.parent / 'cache' / name}"
device = "cpu"
threads = 1
model-public-key = "{keys / 'model-signing.pub'}"
""")
    return path


def launch_toml(path: Path, address: str, ca_cert: Path, **run: object) -> Path:
    """``fedsynth launch`` settings: the coordinator's address and CA, then ``[run]`` keys
    (underscores become dashes: ``local_steps=3`` → ``local-steps = 3``; ``rounds`` is the field
    name of ``num-server-rounds``, the one key a launch file accepts for it)."""
    keys = {"rounds": "num-server-rounds"}

    def value(v: object) -> str:
        return f'"{v}"' if isinstance(v, (str, Path)) else str(v).lower() \
            if isinstance(v, bool) else str(v)

    lines = [f'{keys.get(k, k.replace("_", "-"))} = {value(v)}' for k, v in run.items()]
    path.write_text(f'[coordinator]\naddress = "{address}"\nroot-certificates = "{ca_cert}"\n\n'
                    "[run]\n" + "\n".join(lines) + "\n")
    return path
