"""The launch file as ``fedsynth launch`` and ``fedsynth status`` read it.

``LaunchConfig.load`` (fedsynth/deployment.py) checks its sections and keys; the CA file it names
is checked here too, so a missing or unreadable ``root-certificates`` is one line naming the file
rather than a traceback from the TLS probe, or a ``flwr ls`` error, later (issue 24 item 6).
"""

from __future__ import annotations

from pathlib import Path


def load_launch_file(path: Path):  # noqa: ANN201 - fedsynth.deployment.LaunchConfig
    """The parsed launch file; every mistake a person can fix is a ``UserError``."""
    from fedsynth.certs import CertError, load_certificate
    from fedsynth.deployment import LaunchConfig
    from fedsynth.errors import UserError

    try:
        cfg = LaunchConfig.load(path)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    if cfg.root_certificates is not None:
        try:
            load_certificate(cfg.root_certificates, "[coordinator] root-certificates")
        except CertError as exc:
            raise UserError(f"launch file '{path}': {exc}") from None
    return cfg
