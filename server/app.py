"""The Flower ServerApp: a thin adapter from Flower's run config to ``run_federation``."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from protocol.keys import COORDINATOR_METRICS_HOST_ENV, COORDINATOR_METRICS_PORT_ENV

from .federation import run_federation
from .run_config import FederationConfig
from .grid import PromptGrid
from .metrics import CoordinatorMetrics, HospitalNames, MeteredGrid, start_exporter


def make_server_app(cfg: FederationConfig | None = None) -> ServerApp:
    """A ServerApp for ``cfg``; without one, the run config of the Flower run decides."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        from protocol import flower_private

        flower_private.fast_object_pulls()  # replies' objects land just after the reply
        grid = PromptGrid(grid)
        run_cfg = cfg or FederationConfig.from_run_config(context.run_config)
        # The ServerApp process lives for the whole run: it serves the coordinator's metrics,
        # on the run's metrics-port, else on `fedsynth coordinator --metrics-port`'s.
        if run_cfg.metrics_port <= 0 and os.environ.get(COORDINATOR_METRICS_PORT_ENV):
            run_cfg = dataclasses.replace(
                run_cfg, metrics_port=int(os.environ[COORDINATOR_METRICS_PORT_ENV]),
                metrics_host=os.environ.get(COORDINATOR_METRICS_HOST_ENV, run_cfg.metrics_host))
        if run_cfg.metrics_port <= 0:
            run_federation(grid, run_cfg)
            return
        names = run_cfg.hospital_names  # node id -> name JSON
        metrics = CoordinatorMetrics(
            names=HospitalNames.from_file(Path(names)) if names else HospitalNames())
        metrics.set_run(run_cfg.model.family, run_cfg.preset, run_cfg.rounds)
        server = start_exporter(metrics, run_cfg.metrics_port, run_cfg.metrics_host)
        try:
            run_federation(MeteredGrid(grid, metrics), run_cfg, (metrics.observe,))
        finally:
            server.shutdown()

    return app


app = make_server_app()
