"""Many virtual hospitals on Flower's simulation engine, with the same ServerApp/ClientApp code.

Each virtual hospital gets its settings (data folder, threads) by partition id from a JSON file
named in ``FEDSYNTH_SIM_HOSPITALS``: the simulation engine's node config carries only the id.
"""

from __future__ import annotations

import json
import logging
import os
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
) -> Path:
    """Run ``cfg`` with one virtual hospital per entry of ``hospitals``; returns the run folder.

    Each entry is a hospital settings mapping (``data-dir``, optional ``cache-dir``, ``threads``…).
    Every hospital trains with one torch thread: on a small machine several simulated hospitals
    contend badly otherwise. With ``metrics``, the coordinator's series are exported (bytes
    counted on the Grid, rounds observed) and per-hospital series carry the hospitals' names.
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

    cpus = cpus or os.cpu_count() or 1
    backend_config = {
        "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
        "init_args": {"num_cpus": cpus, "include_dashboard": False, "logging_level": "ERROR",
                      "log_to_driver": True},
    }
    run_simulation(server_app=server_app, client_app=client_app,
                   num_supernodes=len(entries), backend_config=backend_config)
    return run_root
