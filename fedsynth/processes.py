"""Children that die with their daemon: the guard process, spawn and kill helpers.

``fedsynth.supervisor`` keeps a child running with these; ``fedsynth.deployment`` builds the
command lines. Split out of fedsynth/deployment.py (issue 23: one idea to a module).
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Sequence

log = logging.getLogger("fedsynth.deployment")  # the name operators' log filters already use

# Children die with their daemon. A daemon killed hard (SIGKILL, OOM killer, `kill -9` of its
# process group) runs no cleanup, and its children live in sessions of their own (so that a
# terminal's Ctrl-C reaches only the daemon). Each child therefore runs under a *guard*: a small
# process of ours (``python -m fedsynth.processes guard DAEMON_PID -- COMMAND``) that
#
# * gets SIGTERM from the kernel when the daemon dies (``prctl(PR_SET_PDEATHSIG)``; the kernel
#   sends it when the *thread* that forked the guard ends, so every guard is forked by one
#   long-lived thread, ``_SPAWNER``, never by a supervisor's own thread), and checks once that
#   the daemon is still its parent (the daemon may have died before the prctl);
# * is a child subreaper (``PR_SET_CHILD_SUBREAPER``): whatever its child leaves behind (Flower's
#   flower-superexec and flwr-serverapp, nginx's worker) is re-parented to the guard, which reaps
#   it (Flower's own parent monitors then notice their parent is gone, even where PID 1 reaps
#   nothing) and, when the daemon dies or the child exits, ends it: SIGTERM, then SIGKILL;
# * starts its child with PDEATHSIG SIGKILL, in case the guard itself is killed.
#
# SIGTERM first matters: a SuperNode that gets SIGTERM tells the SuperLink it leaves
# (DeactivateNode), so the coordinator gives up on that hospital at once instead of waiting for
# two missed heartbeats (60 s).

PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36
GUARD_GRACE_S = 5.0  # SIGTERM → SIGKILL for what a guard ends
_libc_handle: Any = None


def _libc() -> Any:
    """libc for ``prctl`` (Linux only; ``None`` elsewhere). Loaded before any fork: a forked child
    must not take the loader's locks."""
    global _libc_handle  # noqa: PLW0603 - one handle per process
    if _libc_handle is None and sys.platform.startswith("linux"):
        import ctypes

        _libc_handle = ctypes.CDLL(None, use_errno=True)
    return _libc_handle


def set_parent_death_signal(sig: int) -> bool:
    """Ask the kernel to send ``sig`` to this process when its parent (thread) dies."""
    libc = _libc()
    return libc is not None and libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0


def _die_with(parent_pid: int, sig: int = signal.SIGKILL) -> Callable[[], None] | None:
    """A ``preexec_fn``: the child gets ``sig`` when ``parent_pid`` (the forking thread) dies."""
    if _libc() is None:
        return None

    def preexec() -> None:
        set_parent_death_signal(sig)
        if os.getppid() != parent_pid:  # the parent died before the prctl
            os.kill(os.getpid(), signal.SIGKILL)

    return preexec


class _Spawner:
    """One long-lived thread forks every supervised child (see the section's comment): a child
    forked by a supervisor's thread would get its death signal when that thread ends."""

    def __init__(self) -> None:
        import queue

        self._jobs: Any = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def popen(self, args: Sequence[str], **kwargs: Any) -> subprocess.Popen:
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._serve, name="fedsynth-spawner",
                                                daemon=True)
                self._thread.start()
        if threading.current_thread() is self._thread:
            return subprocess.Popen(args, **kwargs)
        done = threading.Event()
        box: dict[str, Any] = {}
        self._jobs.put((args, kwargs, box, done))
        done.wait()
        if "error" in box:
            raise box["error"]
        return box["proc"]

    def _serve(self) -> None:
        while True:
            args, kwargs, box, done = self._jobs.get()
            try:
                box["proc"] = subprocess.Popen(args, **kwargs)
            except BaseException as exc:  # noqa: BLE001 - handed to the caller
                box["error"] = exc
            finally:
                done.set()


_SPAWNER = _Spawner()


def guarded(command: Sequence[str], daemon_pid: int | None = None) -> list[str]:
    """``command`` under a guard that ends it (and what it started) when the daemon dies."""
    return [sys.executable, "-m", "fedsynth.processes", "guard",
            str(daemon_pid or os.getpid()), "--", *command]


def spawn(command: Sequence[str], **kwargs: Any) -> subprocess.Popen:
    """Start a child that dies with this process: forked by the spawner thread, guarded on Linux
    (the guard is started with PDEATHSIG SIGTERM and checks it is still our child)."""
    if _libc() is not None:
        command = guarded(command)
    return _SPAWNER.popen(list(command), **kwargs)


def _end_descendants(root: int, grace: float) -> None:
    """SIGTERM every descendant of ``root``, SIGKILL what is left after ``grace``, reap."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, grace)):
        pids = descendants(root)
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            _reap_any()
            if not any(_alive(p) for p in pids):
                break
            time.sleep(0.05)
    _reap_any()


def _alive(pid: int) -> bool:
    """A process that exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def _reap_any() -> list[tuple[int, int]]:
    """Reap every child that has exited (a subreaper's adopted orphans included)."""
    out = []
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return out
        if pid == 0:
            return out
        out.append((pid, status))


def guard_main(daemon_pid: int, command: Sequence[str], grace: float = GUARD_GRACE_S) -> int:
    """The guard process (see the section's comment); returns the child's exit status."""
    stop = {"why": ""}

    def on_signal(signum: int, _frame: Any) -> None:
        stop["why"] = signal.Signals(signum).name

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT):
        signal.signal(sig, on_signal)
    set_parent_death_signal(signal.SIGTERM)
    if os.getppid() != daemon_pid:
        return 1  # the daemon is already gone: start nothing
    libc = _libc()
    if libc is not None:
        libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    try:
        child = subprocess.Popen(list(command), preexec_fn=_die_with(os.getpid()))
    except OSError as exc:
        sys.stderr.write(f"cannot start {command[0]}: {exc}\n")
        return 127
    code: int | None = None
    while code is None and not stop["why"]:
        for pid, status in _reap_any():
            if pid == child.pid:
                code = os.waitstatus_to_exitcode(status)
                child.returncode = code
        if code is None and os.getppid() != daemon_pid:
            stop["why"] = "daemon gone"
        if code is None and not stop["why"]:
            time.sleep(0.1)
    _end_descendants(os.getpid(), grace)
    if code is None:
        code = child.returncode if child.returncode is not None else 128 + signal.SIGTERM
    return code if code >= 0 else 128 - code


def descendants(pid: int) -> list[int]:
    """All descendants of ``pid`` (Linux /proc); Flower detaches its helpers into new sessions."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def kill_tree(proc: subprocess.Popen, sig: int = signal.SIGTERM, grace: float = 5.0) -> None:
    """Signal a process and everything under it; SIGKILL what is left after ``grace``."""
    pids = [proc.pid, *descendants(proc.pid)]
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        pass
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()
    for pid in pids[1:]:  # reap helpers that are ours (others get reaped by init)
        try:
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass


def stop_guarded(proc: subprocess.Popen, grace: float = GUARD_GRACE_S + 2.0) -> None:
    """End a child started by ``spawn``: SIGTERM to the guard only, which sends its child one
    SIGTERM and SIGKILLs what is left after its own grace; ``kill_tree`` if it is still there.

    Never SIGTERM the guard and its child together: the guard forwards a second SIGTERM, and
    Flower's SuperNode, whose exit handler resets SIGTERM to the default action, dies of it
    before it tells the SuperLink it leaves (DeactivateNode); the coordinator then holds the
    hospital as online and refuses its restart until the heartbeat patience ends (issue 24)."""
    try:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=grace)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        pass
    kill_tree(proc, signal.SIGKILL, grace=1.0)


def stop(proc: subprocess.Popen) -> None:
    """End a child that ``spawn`` started, the way it was started: through its guard where
    ``spawn`` put one (Linux), else its whole tree."""
    if _libc() is not None:
        stop_guarded(proc)
    else:
        kill_tree(proc)


def _main(argv: Sequence[str]) -> int:
    """``python -m fedsynth.processes guard DAEMON_PID -- COMMAND...`` (see ``spawn``)."""
    if len(argv) >= 4 and argv[0] == "guard" and argv[1].isdigit() and argv[2] == "--":
        return guard_main(int(argv[1]), argv[3:])
    sys.stderr.write("usage: python -m fedsynth.processes guard DAEMON_PID -- COMMAND...\n")
    return 2


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
