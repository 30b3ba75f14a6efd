"""The hospital's warm task executor: runs every ClientApp task in one long-lived process.

Why: with Flower's default isolation the SuperNode's SuperExec starts a fresh ``flwr-clientapp``
process for every message, which imports Flower, torch and MONAI, rebuilds the networks and reloads
the slice cache before it trains (8-9 s of CPU on the demo box, per message, per hospital), and the
SuperExec itself polls for tasks once a second. On a localhost deployment that was most of a
round's overhead (BENCHMARKS.md, "deployed rounds").

What: the hospital daemon starts its SuperNode with ``--isolation process`` (so the SuperNode
starts no SuperExec of its own) and runs this executor beside it. The executor speaks Flower's own
Runtime API on the SuperNode's loopback port, exactly as ``flower-superexec`` + ``flwr-clientapp``
do: acquire a task, pull its message and context, run the ClientApp, push the reply and the
updated context (where ``context.state`` keeps the hospital's local components, and secure
aggregation's ``secaggplus_mod`` its keys, shares and next stage between the protocol's four
messages; the app's mods run as under Flower). The difference is
only that the process, its imports and the trainer/data caches of ``client.app`` survive between
tasks. Tasks pull in their own threads but train one at a time (``RUN_LOCK``).

The ClientApp is always the installed ``client.app``: the run's app bundle (FAB) is checked by
``client.bundle.check_bundle`` (fedsynth's code-free launch bundle, or the run is refused with one
log line, a metric and an error reply) and is never extracted, installed or imported. This is why
``[node] executor = "flower"`` (Flower's own SuperExec and ``flwr-clientapp``, which import the
bundle's code) is no longer offered.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import logging
import os
import re
import signal
import threading
import time
from dataclasses import dataclass

log = logging.getLogger("fedsynth.executor")

POLL_S = 0.1  # an AcquireTask on loopback costs about a millisecond
RUN_LOCK = threading.Lock()  # one task at a time trains: the device is the hospital's one GPU/CPU


M_ARENA_MAX = -8  # glibc's mallopt parameter (malloc.h)
MALLOC_ARENAS = 2  # tasks run in threads of their own: without a cap glibc gives each its arena


def _libc() -> "ctypes.CDLL | None":
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.malloc_trim, libc.mallopt  # noqa: B018 - glibc only (not musl, not macOS)
        return libc
    except (OSError, AttributeError):
        return None


def limit_malloc_arenas(arenas: int = MALLOC_ARENAS) -> bool:
    """Cap glibc's malloc arenas (as ``MALLOC_ARENA_MAX`` would) before task threads start.

    Every task runs in a fresh thread (``WarmExecutor.serve``), and glibc hands a new thread an
    arena of its own, up to 8 per core: the training tensors of round after round were spread
    over up to 16 arenas whose freed pages glibc rarely gives back, the slow RSS drift of the
    120-round soak (BENCHMARKS.md, "Hospital memory"). True where glibc took the setting."""
    libc = _libc()
    return bool(libc is not None and libc.mallopt(M_ARENA_MAX, int(arenas)))


def release_memory() -> bool:
    """After a task: collect cycles and hand freed heap pages back to the OS (``malloc_trim``).
    A few milliseconds once a round; True where glibc's ``malloc_trim`` ran."""
    gc.collect()
    libc = _libc()
    if libc is None:
        return False
    libc.malloc_trim(0)
    return True


@dataclass
class TaskResult:
    task_id: int
    ok: bool
    seconds: float
    details: str = ""


class WarmExecutor:
    """Acquire ClientApp tasks from a SuperNode's Runtime API and run them in this process."""

    def __init__(self, runtime_api_address: str, poll_s: float = POLL_S,
                 approved_apps: tuple[str, ...] = ()) -> None:
        from protocol.flower_private import AcquireTaskRequest  # noqa: F401 - fail early if gone
        from protocol.flower_private import RuntimeVersionHttpInterceptor
        from protocol.flower_private import make_simple_http_retry_invoker
        from protocol.flower_private import RuntimeHttpClient

        self.address = runtime_api_address
        self.poll_s = poll_s
        self.approved_apps = approved_apps
        self.stop_event = threading.Event()
        self._client = RuntimeHttpClient.from_server_address(
            server_address=runtime_api_address, insecure=True, root_certificates=None,
            interceptors=[RuntimeVersionHttpInterceptor(component_name="SuperExec")],
            retry_invoker=make_simple_http_retry_invoker())

    def acquire(self) -> tuple[str, object] | None:
        """One task and its token, or None when the SuperNode has none."""
        from protocol.flower_private import AcquireTaskRequest
        from protocol.flower_private import TaskType

        res = self._client.AcquireTask(AcquireTaskRequest(
            supported_task_types=[str(TaskType.CLIENT_APP)], agentapp_fab_hashes=[]))
        if res.HasField("task") and res.token:
            return res.token, res.task
        return None

    def serve(self) -> None:
        log.info("warm executor polling the SuperNode at %s every %.2fs", self.address,
                 self.poll_s)
        while not self.stop_event.is_set():
            try:
                got = self.acquire()
            except Exception as exc:  # noqa: BLE001 - the SuperNode may be (re)starting
                log.debug("SuperNode not answering (%s); retrying", type(exc).__name__)
                self.stop_event.wait(1.0)
                continue
            if got is None:
                self.stop_event.wait(self.poll_s)
                continue
            token, task = got
            # Each task in its own thread: a task whose message the SuperNode later drops (its
            # run ended while the objects were in flight) waits in its pull, as a stuck Flower
            # process would, without holding up the next task. Model work is serialised by
            # RUN_LOCK inside run_task.
            threading.Thread(target=run_task,
                             args=(self.address, token, task.task_id, self.approved_apps),
                             name=f"task-{task.task_id}", daemon=True).start()

    def stop(self) -> None:
        self.stop_event.set()

    def close(self) -> None:
        self._client.close()


def run_task(runtime_api_address: str, token: str, task_id: int,
             approved_apps: tuple[str, ...] = ()) -> TaskResult:
    """Flower's ``run_clientapp`` for one task, minus what only a throwaway process needs, and
    minus everything that would run the coordinator's code.

    Kept: the task heartbeat, pulling message + context + run + FAB, an ``Error`` reply when the
    app raises, pushing the reply and then the context with the final status. Replaced: installing
    the FAB and loading the ClientApp it names (``client.bundle`` checks the FAB is fedsynth's
    code-free launch bundle; the app is the installed ``client.app``). Left out: ``flwr_exit``
    (this process stays), the signal handlers (the executor's own handle stopping), runtime
    dependency installation.
    """
    from flwr.app import Error, Message
    from protocol.flower_private import ErrorCode, SubStatus
    from protocol.flower_private import HeartbeatSender, make_task_heartbeat_fn_http
    from protocol.flower_private import RuntimeTokenHttpInterceptor, RuntimeVersionHttpInterceptor
    from protocol.flower_private import make_simple_http_retry_invoker
    from protocol.flower_private import RuntimeHttpClient
    from protocol.flower_private import TaskIdentity
    from protocol.flower_private import pull_task_input, push_message, push_task_output

    from client import metrics as hospital_metrics
    from client.bundle import BundleRefused, check_bundle

    t0 = time.perf_counter()
    client = RuntimeHttpClient.from_server_address(
        server_address=runtime_api_address, insecure=True, root_certificates=None,
        interceptors=[RuntimeVersionHttpInterceptor(component_name="flwr-clientapp"),
                      RuntimeTokenHttpInterceptor(token)],
        retry_invoker=make_simple_http_retry_invoker())
    heartbeat = HeartbeatSender(make_task_heartbeat_fn_http(client))
    message = reply = context = None
    status, details = SubStatus.FAILED, "ClientApp task failed due to unknown reason"
    try:
        heartbeat.start()
        message, context, run, fab = pull_task_input(client)
        t_pulled = time.perf_counter()
        with RUN_LOCK:
            # Flower keeps the running task's identity in process globals, which another task's
            # pull may have overwritten since: set them for this one while it runs.
            TaskIdentity.task_id, TaskIdentity.run_id = task_id, context.run_id
            TaskIdentity.node_id = context.node_id
            try:
                check_bundle(run.fab_id, run.fab_version, fab.hash_str, fab.content,
                             approved_apps)
            except BundleRefused as exc:
                log.error("REFUSED run %d: its app bundle is not the fedsynth app this hospital "
                          "installed (%s); nothing from it was run", context.run_id, exc)
                hospital_metrics.record_refusal(_hospital_name(context), f"bundle-{exc.reason}")
                raise
            from client.app import app  # the installed fedsynth ClientApp, never the bundle's

            t_loaded = time.perf_counter()
            reply = app(message=message, context=context)
            t_ran = time.perf_counter()
        status, details = SubStatus.COMPLETED, ""
    except BundleRefused as exc:
        details = f"refused by the hospital: the run's app bundle is not approved ({exc.reason})"
        if message is not None:
            reply = Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=details),
                            reply_to=message)
    except Exception as exc:  # noqa: BLE001 - reported to the coordinator as Flower does
        # client.app already replaced any local detail with a generic HospitalError, so the
        # reason below carries no path or DICOM attribute (test_client_privacy checks the text).
        if getattr(exc, "already_logged", False):  # a refusal, logged in its one line
            log.debug("task %d refused: %s", task_id, exc)
        else:
            log.error("task %d failed: %s", task_id, type(exc).__name__, exc_info=exc)
        details = f"{type(exc)}:<'{exc}'>"
        if message is not None:
            reply = Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=details),
                            reply_to=message)
    finally:
        try:
            if reply is not None and context is not None:
                push_message(client, reply, context)
        except Exception as exc:  # noqa: BLE001
            log.error("task %d: could not push the reply: %s", task_id, exc)
            status, details = SubStatus.FAILED, "could not push the reply"
        push_task_output(client=client, context=context, sub_status=status, details=details)
        if heartbeat.is_running:
            heartbeat.stop()
        client.close()
    message = reply = context = run = fab = None  # noqa: F841 - freed before the trim below
    release_memory()
    seconds = time.perf_counter() - t0
    ok = status == SubStatus.COMPLETED
    if ok:
        log.info("task %d done in %.2fs: pull %.2fs, load %.2fs, run %.2fs, push %.2fs", task_id,
                 seconds, t_pulled - t0, t_loaded - t_pulled, t_ran - t_loaded,
                 time.perf_counter() - t_ran)
    else:
        log.info("task %d FAILED after %.2fs", task_id, seconds)
    return TaskResult(task_id, ok, seconds, details)


def _hospital_name(context: object) -> str:
    try:
        from client.settings import HospitalSettings

        return HospitalSettings.from_node_config(context.node_config).name  # type: ignore[attr-defined]
    except Exception:  # noqa: BLE001
        return "unknown"


def local_retry_wording(address: str) -> logging.Filter:
    """Flower's retry line names no peer, and reads like the coordinator failing; in this process
    the peer is always this hospital's own SuperNode (starting, or restarting)."""
    from protocol.logs import RewordFilter

    return RewordFilter([(re.compile(r"^Connection attempt failed, retrying in ([\d.]+) seconds"),
                          f"this hospital's SuperNode ({address}) is not answering yet "
                          r"(starting or restarting; not the coordinator): retrying in \1 s")])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m client.executor", description=__doc__.splitlines()[0])
    p.add_argument("--runtime-api-address", required=True, help="the SuperNode's HOST:PORT")
    p.add_argument("--poll", type=float, default=POLL_S, help="seconds between idle polls")
    p.add_argument("--parent-pid", type=int, help="exit when this process (the daemon) is gone")
    p.add_argument("--approved-app", action="append", default=[], metavar="SHA256",
                   help="serve only app bundles with this hash (repeatable; default: any "
                        "code-free fedsynth launch bundle)")
    args = p.parse_args(argv)
    from protocol import logs

    logs.setup(os.environ.get("FEDSYNTH_LOG_LEVEL", "INFO"), datefmt=None)
    if args.parent_pid:
        from protocol.flower_private import start_parent_process_monitor

        start_parent_process_monitor(args.parent_pid)
    from protocol import flower_private

    limit_malloc_arenas()  # before any task thread starts
    flower_private.fast_object_pulls()  # objects arrive just after the task: retry in 20 ms steps
    executor = WarmExecutor(args.runtime_api_address, args.poll, tuple(args.approved_app))
    logs.adopt_flower()  # Flower's logger is set up by now: one plain copy of its lines
    logging.getLogger("flwr").addFilter(local_retry_wording(args.runtime_api_address))
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: executor.stop())
    # Import the ClientApp (torch, MONAI, pydicom) now, while the federation is idle, rather than
    # inside the first round.
    import client.app  # noqa: F401

    try:
        executor.serve()
    finally:
        executor.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
