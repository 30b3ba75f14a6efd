"""The Flower ServerApp: a thin adapter from Flower's run config to ``run_federation``."""

from __future__ import annotations

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from .federation import FederationConfig, run_federation


def make_server_app(cfg: FederationConfig | None = None) -> ServerApp:
    """A ServerApp for ``cfg``; without one, the run config of the Flower run decides."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        run_federation(grid, cfg or FederationConfig.from_run_config(context.run_config))

    return app


app = make_server_app()
