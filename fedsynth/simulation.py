"""Many virtual hospitals on Flower's simulation engine, with the same ServerApp/ClientApp code.

Each virtual hospital gets its settings (data folder, threads) by partition id from a JSON file
named in ``FEDSYNTH_SIM_HOSPITALS``: the simulation engine's node config carries only the id.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

from client.settings import SIM_ENV
from server.federation import FederationConfig, Observer, run_federation

if TYPE_CHECKING:
    from server.metrics import CoordinatorMetrics

log = logging.getLogger(__name__)


def run_simulated_federation(
    cfg: FederationConfig,
    hospitals: Sequence[Mapping[str, Any]],
    *,
    observers: tuple[Observer, ...] = (),
    cpus: int | None = None,
    metrics: "CoordinatorMetrics | None" = None,
    ray_address: str | None = None,
) -> Path:
    """Run ``cfg`` with one virtual hospital per entry of ``hospitals``; returns the run folder.

    Each entry is a hospital settings mapping (``data-dir``, optional ``cache-dir``, ``threads``…).
    Every hospital trains with one torch thread: on a small machine several simulated hospitals
    contend badly otherwise. With ``metrics``, the coordinator's series are exported (bytes
    counted on the Grid, rounds observed) and per-hospital series carry the hospitals' names.

    ``ray_address`` (``HOST:PORT`` of a running ``ray start --head``) runs the virtual hospitals on
    that Ray cluster's nodes instead of a Ray started here; see :func:`_join_ray_cluster`.
    """
    from flwr.app import Context
    from flwr.serverapp import Grid, ServerApp
    from flwr.simulation import run_simulation

    from client.app import app as client_app

    # Flower's import sets its logger to DEBUG; keep the person's terminal to our progress lines.
    if not log.isEnabledFor(logging.DEBUG):
        logging.getLogger("flwr").setLevel(logging.WARNING)
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")  # silences a Ray FutureWarning

    cfg = replace(cfg, run_id=cfg.resolved_run_id())
    run_root = Path(cfg.run_dir) / cfg.run_id
    run_root.mkdir(parents=True, exist_ok=True)
    # Simulation runs coordinator and hospitals in one process: nothing crosses a trust boundary,
    # so the virtual hospitals accept the (unsigned) messages unless a key is given.
    entries = [{"threads": 1, "name": f"hospital-{i + 1}", "accept-unsigned-models": True,
                **dict(h)} for i, h in enumerate(hospitals)]
    sim_file = run_root / "simulation-hospitals.json"
    sim_file.write_text(json.dumps(entries, indent=2, default=str))
    os.environ[SIM_ENV] = str(sim_file.resolve())
    if metrics is not None:
        from client.metrics import SIM_NAMES_ENV
        from server.metrics import MeteredGrid

        names_dir = run_root / "node-names"
        names_dir.mkdir(exist_ok=True)
        os.environ[SIM_NAMES_ENV] = str(names_dir.resolve())
        metrics.names.watch(names_dir)
        metrics.set_run(cfg.model.family, cfg.preset, cfg.rounds)
        observers = (*observers, metrics.observe)

    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        if metrics is not None:
            grid = MeteredGrid(grid, metrics)
        run_federation(grid, replace(cfg, min_hospitals=max(cfg.min_hospitals, len(entries))),
                       observers)

    backend_config: dict[str, Any] = {"client_resources": {"num_cpus": 1, "num_gpus": 0.0}}
    if ray_address:
        _join_ray_cluster(ray_address)
    else:
        cpus = cpus or os.cpu_count() or 1
        backend_config["init_args"] = {"num_cpus": cpus, "include_dashboard": False,
                                       "logging_level": "ERROR", "log_to_driver": True}
    try:
        run_simulation(server_app=server_app, client_app=client_app,
                       num_supernodes=len(entries), backend_config=backend_config)
    finally:
        if ray_address:
            import ray

            ray.shutdown()  # disconnects this driver; the cluster's nodes keep running
    return run_root


def _join_ray_cluster(address: str) -> None:
    """Connect this driver to a running Ray cluster before Flower's backend would start its own.

    Flower's Ray backend calls ``ray.init`` only when Ray is not initialised, and passes its own
    ``runtime_env`` (so ``init_args`` cannot carry one). The actors of a cluster run in worker
    processes its raylets start, whose environment is the one ``ray start`` had, not this driver's:
    the virtual hospitals' settings file (``FEDSYNTH_SIM_HOSPITALS``), the hospital-name folder and
    the import path must reach them through the job's runtime environment, set here. Paths in the
    hospital entries (data-dir, cache-dir) must exist on every node: here the nodes share a disk.
    """
    import ray

    from client.metrics import SIM_NAMES_ENV

    pythonpath = os.pathsep.join([p for p in sys.path if p] +
                                 ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else []))
    env = {"PYTHONPATH": pythonpath}
    for key in (SIM_ENV, SIM_NAMES_ENV, "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO"):
        if os.environ.get(key):
            env[key] = os.environ[key]
    host, _, port = address.rpartition(":")
    try:  # ray.init retries an absent head for minutes; a closed port is known at once
        socket.create_connection((host or "127.0.0.1", int(port)), timeout=10).close()
    except (OSError, ValueError) as exc:
        raise ConnectionError(f"no Ray cluster answers at {address} ({exc}); start one with "
                              f"`ray start --head --port {port}`") from None
    if ray.is_initialized():
        ray.shutdown()
    try:
        ray.init(address=address, runtime_env={"env_vars": env}, logging_level="ERROR",
                 log_to_driver=True)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise ConnectionError(f"no Ray cluster answers at {address} ({exc}); start one with "
                              f"`ray start --head --port {address.rsplit(':', 1)[-1]}`") from None
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    log.info("joined the Ray cluster at %s: %d node(s), %.0f CPUs", address, len(nodes),
             sum(n.get("Resources", {}).get("CPU", 0) for n in nodes))
