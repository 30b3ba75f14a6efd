"""The SuperLink's Control API, spoken in-process: what ``fedsynth launch`` / ``status`` ask.

Each ``flwr`` CLI start costs 1.5-5 s (a Python interpreter importing Flower's whole CLI, then
its exit), and ``status`` made two, ``launch`` one plus ``flwr ls`` per poll; the requests
themselves take milliseconds on loopback (BENCHMARKS.md, "launch and status"). ``Control`` opens
one client from the ``fedsynth`` connection of ``FLWR_HOME/config.toml``
(``fedsynth.deployment.write_flwr_home``) and answers with the same fields ``flwr ... --format
json`` gives, plus each run's run config (which names its run folder).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
from pathlib import Path
from typing import Any

from fedsynth.deployment import CONNECTION, DeploymentError


class Control:
    """``with Control(flwr_home) as c: c.runs(); c.nodes(); c.start_run(app, config)``."""

    def __init__(self, flwr_home: Path) -> None:
        self.flwr_home = Path(flwr_home)
        self._client: Any = None
        self._old_home: str | None = None

    def __enter__(self) -> "Control":
        from protocol.flower_private import (init_http_client_from_connection,
                                             read_superlink_connection)

        self._old_home = os.environ.get("FLWR_HOME")
        os.environ["FLWR_HOME"] = str(self.flwr_home)
        try:
            with contextlib.redirect_stdout(io.StringIO()):  # "Using SuperLink: ..." is not ours
                self._client = init_http_client_from_connection(
                    read_superlink_connection(CONNECTION))
        except BaseException:
            self._restore()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            if self._client is not None:
                self._client.close()
        finally:
            self._restore()

    def _restore(self) -> None:
        if self._old_home is None:
            os.environ.pop("FLWR_HOME", None)
        else:
            os.environ["FLWR_HOME"] = self._old_home

    def _call(self, what: str, method: str, request: Any) -> Any:
        try:
            return getattr(self._client, method)(request=request)
        except Exception as exc:  # noqa: BLE001 - Flower raises its own API / HTTP error types
            raise DeploymentError(f"flwr {what} failed: {' '.join(str(exc).split())[:300]}"
                                  ) from None

    def runs(self, run_id: int | str | None = None) -> list[dict[str, Any]]:
        """Runs, newest first, as ``flwr ls --format json`` lists them (``run-id``, ``status``
        such as ``finished:completed``, ``status-details``, ``elapsed``, ...) with ``run-config``:
        the settings the run was launched with (``run-id`` and ``run-dir`` name its folder)."""
        from protocol.flower_private import ListRunsRequest, format_runs, run_from_proto

        request = ListRunsRequest(run_id=int(run_id)) if run_id is not None else \
            ListRunsRequest()
        res = self._call("ls", "ListRuns", request)
        runs = {r.run_id: r for r in (run_from_proto(p) for p in res.run_dict.values())}
        out = []
        for row in format_runs(list(runs.values()), res.now):
            details = row.details if row.details != "N/A" else ""
            out.append({"run-id": str(row.run_id), "status": row.status_text,
                        "status-details": details, "elapsed": float(row.elapsed),
                        "pending-at": row.pending_at, "finished-at": row.finished_at,
                        "run-config": dict(runs[row.run_id].override_config)})
        return out

    def nodes(self) -> list[dict[str, Any]]:
        """Registered nodes: ``node-id``, ``name`` (the key's registered name), ``status``."""
        from protocol.flower_private import ListNodesRequest

        res = self._call("supernode ls", "ListNodes", ListNodesRequest())
        return [{"node-id": str(n.node_id), "name": str(n.name), "status": str(n.status)}
                for n in res.nodes_info]

    def start_run(self, app: Path, run_config: str) -> str:
        """``flwr run APP --run-config RUN_CONFIG``; the Flower run id."""
        from protocol.flower_private import (Fab, StartRunRequest, build_fab_from_disk,
                                             fab_to_proto, parse_config_args,
                                             user_config_to_proto)

        try:
            fab_bytes = build_fab_from_disk(Path(app))
        except Exception as exc:  # noqa: BLE001 - Flower's build errors are its own types
            raise DeploymentError(f"flwr run failed: cannot build the app bundle: {exc}") \
                from None
        fab = Fab(hashlib.sha256(fab_bytes).hexdigest(), fab_bytes, {})
        request = StartRunRequest(fab=fab_to_proto(fab),
                                  override_config=user_config_to_proto(
                                      parse_config_args([run_config])),
                                  federation="")
        res = self._call("run", "StartRun", request)
        if not res.HasField("run_id"):
            raise DeploymentError("flwr run failed: the SuperLink started no run"
                                  + (f" ({res.note})" if res.HasField("note") else ""))
        return str(res.run_id)
