"""Keep a daemon's child running: restart it when it dies, and when it is alive but stopped trying.

A child that exits is restarted with exponential backoff. A child can also stay alive and do
nothing: Flower 1.42's SuperNode gives up reconnecting on any error whose text mentions SSL/TLS
(``flwr.supercore.retry.http_retry``: ``_should_giveup``), which is what a coordinator's proxy
that closes connections during a TLS handshake causes (issue 25 item 2: a flood filled nginx's
connections, the SuperNode logged ``Giving up reconnection`` and sat there, process alive, until
someone restarted it). ``gave_up_markers`` are the lines that say so; once the child prints one,
it gets ``gave_up_grace`` seconds to end by itself, then its process tree is ended and it is
restarted on the same backoff as a child that died. Each restart is logged with its reason and
reported to ``on_restart(reason)`` (the hospital daemon counts it on its ``/metrics``:
``fedsynth_supernode_restarts_total``).

Reasons: ``exited`` (the child ended), ``gave-up`` (it printed one of ``gave_up_markers``).

A ``before_start`` that raises ``CoordinatorUnreachable`` (nothing answers at the coordinator's
address) is retried on the same backoff and counts against ``max_restarts`` like a restart: once
they are spent, ``run_forever`` returns 1 with the reason in ``unreachable``.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from fedsynth.deployment import CoordinatorUnreachable, child_env
from fedsynth.processes import descendants, spawn, stop

log = logging.getLogger("fedsynth.deployment")  # the name operators' log filters already use

# Flower 1.42's SuperNode, when its connection retries end for good (http_retry / grpc_retry)
SUPERNODE_GAVE_UP = ("Giving up reconnection", "SSL/TLS handshake error detected")
RESTART_REASONS = ("exited", "gave-up")


@dataclass
class Supervisor:
    """Keep one child running: restart it with exponential backoff when it dies or gives up.

    The child's output is copied line by line to ``sink`` (our log or a file); ``on_line`` lets the
    caller recognise Flower's messages (e.g. the node-refused exit code) without parsing twice.
    """

    name: str
    command: list[str]
    env: dict[str, str] = field(default_factory=child_env)
    cwd: Path | None = None
    min_backoff: float = 1.0
    max_backoff: float = 60.0
    healthy_after: float = 60.0  # a child that lived this long resets the backoff
    max_restarts: int | None = None  # None: restart forever (a daemon); 0: run once
    on_line: Callable[[str], None] | None = None
    sink: Callable[[str], None] | None = None
    gave_up_markers: tuple[str, ...] = ()  # a line containing one: the child stopped trying
    gave_up_grace: float = 5.0  # seconds it gets to exit by itself after such a line
    on_restart: Callable[[str], None] | None = None  # called with the reason of each restart
    proc: subprocess.Popen | None = None
    restarts: int = 0
    unreachable: str | None = None  # why the last try failed, when --max-restarts ended them
    _stop: threading.Event = field(default_factory=threading.Event)
    _gave_up: threading.Event = field(default_factory=threading.Event)

    def start(self) -> subprocess.Popen:
        self._gave_up.clear()
        # spawn: the child (and whatever it starts) dies with this daemon, however it dies
        self.proc = spawn(self.command, env=self.env, cwd=self.cwd, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, text=True,
                          bufsize=1, start_new_session=True)
        threading.Thread(target=self._pump, args=(self.proc,), daemon=True).start()
        log.info("%s started (pid %d)", self.name, self.proc.pid)
        return self.proc

    def _pump(self, proc: subprocess.Popen) -> None:
        assert proc.stdout is not None  # noqa: S101 - set by Popen above
        for line in proc.stdout:
            line = line.rstrip("\n")
            if self.sink is not None:
                self.sink(line)
            else:
                sys.stderr.write(f"[{self.name}] {line}\n")
            if self.on_line is not None:
                self.on_line(line)
            if proc is self.proc and any(m in line for m in self.gave_up_markers):
                self._gave_up.set()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def _wait(self, proc: subprocess.Popen) -> str | None:
        """Until the child ends (``exited``), gives up (``gave-up``) or we stop (None)."""
        while proc.poll() is None and not self._stop.is_set():
            if self._gave_up.is_set():
                deadline = time.monotonic() + self.gave_up_grace
                while (proc.poll() is None and not self._stop.is_set()
                       and time.monotonic() < deadline):
                    self._stop.wait(0.1)
                if self._stop.is_set():
                    return None
                if proc.poll() is None:
                    log.warning("%s (pid %d) stopped trying to reach the coordinator (it logged "
                                "that it gave up reconnecting) but is still running: ending it",
                                self.name, proc.pid)
                    stop(proc)
                return "gave-up"
            self._stop.wait(0.5)
        return None if self._stop.is_set() else "exited"

    def run_forever(self, before_start: Callable[[], None] | None = None) -> int:
        """Start, wait, restart with backoff until ``stop()``; returns the last exit code."""
        backoff = self.min_backoff
        code = 0
        while not self._stop.is_set():
            if before_start is not None:
                try:
                    before_start()
                except CoordinatorUnreachable as exc:
                    # a try that never got as far as starting the child counts like a restart:
                    # else a wrong coordinator address retried forever under --max-restarts
                    if self.max_restarts is not None and self.restarts >= self.max_restarts:
                        self.unreachable = str(exc)
                        code = 1
                        break
                    self.restarts += 1
                    log.warning("%s; retrying in %.0f s (try %d)", exc, backoff,
                                self.restarts + 1)
                    self._stop.wait(backoff)
                    backoff = min(backoff * 2, self.max_backoff)
                    continue
            t0 = time.monotonic()
            proc = self.start()
            reason = self._wait(proc)
            if reason is None:
                break
            code = proc.returncode
            if time.monotonic() - t0 >= self.healthy_after:
                backoff = self.min_backoff
            what = ("gave up reconnecting" if reason == "gave-up"
                    else f"exited with code {code}")
            if self.max_restarts is not None and self.restarts >= self.max_restarts:
                log.error("%s %s; not restarting (--max-restarts %d)",
                          self.name, what, self.max_restarts)
                break
            self.restarts += 1
            log.warning("%s %s; restarting in %.1f s (restart %d, reason %s)",
                        self.name, what, backoff, self.restarts, reason)
            if self.on_restart is not None:
                try:
                    self.on_restart(reason)
                except Exception:  # noqa: BLE001 - a metrics problem never stops a restart
                    log.warning("%s: recording the restart failed", self.name, exc_info=True)
            self._stop.wait(backoff)
            backoff = min(backoff * 2, self.max_backoff)
        self.terminate()
        return code

    def stop(self) -> None:
        self._stop.set()

    def stopping(self) -> bool:
        return self._stop.is_set()

    def sleep(self, seconds: float) -> None:
        """Sleep, waking early when the supervisor is stopped."""
        self._stop.wait(seconds)

    def terminate(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            stop(self.proc)  # through its guard: one SIGTERM reaches the child (issue 24)
        elif self.proc is not None:
            for pid in descendants(self.proc.pid):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass


def stop_on_signals(stop: Callable[[], None]) -> None:
    """SIGTERM/SIGINT end the daemon cleanly (systemd, docker stop, Ctrl-C)."""
    def handler(signum: int, _frame: Any) -> None:
        log.info("received %s, stopping", signal.Signals(signum).name)
        stop()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
