"""Where the coordinator is and how its TLS certificate is trusted: the ``[coordinator]`` table.

The same three settings in a hospital's settings file (``fedsynth hospital``) and in a launch
file (``fedsynth launch``), declared once with the settings toolkit (shared_models/settings.py).
Who reads a file checks what is missing in its own words and resolves ``root-certificates``
against the file's folder.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from shared_models.settings import Codec, setting


@dataclass(frozen=True)
class CoordinatorSettings:
    address: str = setting("", "the coordinator's HOST:PORT")
    root_certificates: Path | None = setting(None, "the federation's CA file (ca.pem) the "
                                             "coordinator's certificate is checked against")
    insecure: bool = setting(False, "no TLS: only for a local test")


COORDINATOR = Codec(CoordinatorSettings, "[coordinator] setting", lenient=True, plain=True)
COORDINATOR_KEYS = COORDINATOR.keys()
