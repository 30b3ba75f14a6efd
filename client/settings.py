"""A hospital's own settings: where its data is, which device trains. They never leave the site.

In deployment they come from the SuperNode's ``--node-config`` (written by ``fedsynth hospital``
from its TOML file); in simulation each virtual hospital finds its entry, by partition id, in the
JSON list named by ``FEDSYNTH_SIM_HOSPITALS``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

SIM_ENV = "FEDSYNTH_SIM_HOSPITALS"


class SettingsError(ValueError):
    """A hospital setting is missing or wrong; the message names it."""


@dataclass(frozen=True)
class HospitalSettings:
    data_dir: Path
    cache_dir: Path | None = None
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    amp: str = "auto"  # auto (bf16 on a GPU that has it, else fp16 on GPU, fp32 on CPU) | off
    threads: int = 0  # torch CPU threads; 0 leaves torch's default
    modalities: tuple[str, ...] = ()
    holdout_every: int = 10  # every n-th slice is held out for local evaluation
    name: str = "hospital"
    # Pinned Ed25519 public key of the coordinator; when set, unsigned or tampered models are refused.
    model_public_key: Path | None = None

    @classmethod
    def from_mapping(cls, m: Mapping[str, Any]) -> "HospitalSettings":
        if "data-dir" not in m:
            raise SettingsError("hospital setting 'data-dir' is missing")
        mods = m.get("modalities", "")
        if isinstance(mods, str):
            mods = tuple(x.strip().upper() for x in mods.split(",") if x.strip())
        return cls(
            data_dir=Path(str(m["data-dir"])).expanduser(),
            cache_dir=Path(str(m["cache-dir"])).expanduser() if m.get("cache-dir") else None,
            device=str(m.get("device", "auto")),
            amp=str(m.get("amp", "auto")),
            threads=int(m.get("threads", 0)),
            modalities=tuple(mods),
            holdout_every=int(m.get("holdout-every", 10)),
            name=str(m.get("name", "hospital")),
            model_public_key=(Path(str(m["model-public-key"])).expanduser()
                              if m.get("model-public-key") else None),
        )

    @classmethod
    def from_node_config(cls, node_config: Mapping[str, Any]) -> "HospitalSettings":
        """Deployment: node config holds ``data-dir``; simulation: ``partition-id`` + the env list."""
        if "data-dir" in node_config:
            return cls.from_mapping(node_config)
        if "partition-id" in node_config and os.environ.get(SIM_ENV):
            entries = json.loads(Path(os.environ[SIM_ENV]).read_text())
            return cls.from_mapping(entries[int(node_config["partition-id"])])
        raise SettingsError("no hospital settings: node config has no 'data-dir' "
                            f"and {SIM_ENV} is not set")
