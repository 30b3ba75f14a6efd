"""The Flower ServerApp: a thin adapter from Flower's run config to ``run_federation``."""

from __future__ import annotations

from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from .federation import run_federation
from .run_config import FederationConfig
from .grid import PromptGrid
from .metrics import (CoordinatorMetrics, HospitalNames, MeteredGrid, multiprocess_mode,
                      start_exporter)


def make_server_app(cfg: FederationConfig | None = None) -> ServerApp:
    """A ServerApp for ``cfg``; without one, the run config of the Flower run decides."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        from protocol import flower_private

        flower_private.fast_object_pulls()  # replies' objects land just after the reply
        grid = PromptGrid(grid)
        run_cfg = cfg or FederationConfig.from_run_config(context.run_config)
        # Metrics are recorded when someone serves them: `fedsynth coordinator --metrics-port`
        # (this process then writes into the daemon's multiprocess folder and the daemon serves
        # them after the run too: server/metrics.py) and/or the run's own metrics-port (served
        # from here, so only while the run lasts).
        own_port = run_cfg.metrics_port > 0
        if not own_port and not multiprocess_mode():
            run_federation(grid, run_cfg)
            return
        # a run's hospital-names file first, then the names the hospitals' keys were registered
        # under (the same ones metrics.jsonl's rows carry)
        names = HospitalNames.from_file(Path(run_cfg.hospital_names), lookup=grid.node_name) \
            if run_cfg.hospital_names else HospitalNames(lookup=grid.node_name)
        metrics = CoordinatorMetrics(names=names)
        metrics.set_run(run_cfg.model.family, run_cfg.preset, run_cfg.rounds)
        server = start_exporter(metrics, run_cfg.metrics_port, run_cfg.metrics_host) \
            if own_port else None
        try:
            run_federation(MeteredGrid(grid, metrics), run_cfg, (metrics.observe,))
        finally:
            if server is not None:
                server.shutdown()

    return app


app = make_server_app()
