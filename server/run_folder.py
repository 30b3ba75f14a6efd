"""The run folder a person opens: ``runs/<run-id>/`` with config, metrics, samples, checkpoints.

Every write is atomic (temp file + ``os.replace``), so a coordinator killed mid-write leaves the
previous state, and ``metrics.jsonl`` holds each round at most once even across a resume.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from .images import save_grid

from .run_rules import RUN_ID_PATTERN, check_run_id  # noqa: F401 (re-exported; torch-free)

CHECKPOINT_NAME = re.compile(r"round-[0-9]{3,9}\.npz")


def _atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class RunFolder:
    """Paths and writers of one run. ``keep`` is how many round checkpoints are kept."""

    def __init__(self, root: Path, keep: int = 3) -> None:
        self.root = Path(root)
        self.keep = keep
        for sub in ("samples", "checkpoints"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)

    @classmethod
    def for_run(cls, run_dir: Path | str, run_id: str, keep: int = 3) -> "RunFolder":
        """``run_dir/run_id``, refusing a run id that is not a plain name (``check_run_id``)."""
        return cls(Path(run_dir) / check_run_id(run_id), keep=keep)

    @property
    def metrics_path(self) -> Path:
        return self.root / "metrics.jsonl"

    def sample_path(self, server_round: int) -> Path:
        return self.root / "samples" / f"round-{server_round:03d}.png"

    def checkpoint_path(self, server_round: int) -> Path:
        return self.root / "checkpoints" / f"round-{server_round:03d}.npz"

    def write_config(self, config: Mapping[str, Any]) -> Path:
        path = self.root / "config.json"
        _atomic_write(path, json.dumps(config, indent=2, sort_keys=True).encode())
        return path

    def read_metrics(self) -> list[dict[str, Any]]:
        if not self.metrics_path.exists():
            return []
        lines = self.metrics_path.read_text().splitlines()
        return [json.loads(line) for line in lines if line.strip()]

    def append_metrics(self, row: Mapping[str, Any]) -> None:
        """Add one round's row; an existing row of the same round is replaced, never doubled."""
        rows = [r for r in self.read_metrics() if r.get("round") != row["round"]]
        rows.append(dict(row))
        rows.sort(key=lambda r: r["round"])
        text = "".join(json.dumps(r, sort_keys=True, allow_nan=True) + "\n" for r in rows)
        _atomic_write(self.metrics_path, text.encode())

    def save_samples(self, server_round: int, images: np.ndarray) -> Path:
        return save_grid(images, self.sample_path(server_round))

    def save_checkpoint(self, server_round: int, arrays: Mapping[str, np.ndarray],
                        meta: Mapping[str, Any]) -> Path:
        """Arrays + JSON meta in one ``.npz``; older rounds beyond ``keep`` are pruned."""
        import io

        buf = io.BytesIO()
        np.savez(buf, __meta__=np.frombuffer(json.dumps(dict(meta)).encode(), dtype=np.uint8),
                 **arrays)
        path = self.checkpoint_path(server_round)
        _atomic_write(path, buf.getvalue())
        _atomic_write(self.root / "checkpoints" / "latest.json",
                      json.dumps({"round": server_round, "file": path.name}).encode())
        for old in sorted((self.root / "checkpoints").glob("round-*.npz"))[: -self.keep]:
            old.unlink(missing_ok=True)
        return path

    def latest_checkpoint(self) -> Path | None:
        """The checkpoint ``latest.json`` names, or None when there is none yet.

        The marker may only name a ``round-NNN.npz`` file directly inside this run's
        ``checkpoints/`` (no path, no link out of it): anything else raises ``ValueError`` rather
        than resuming from, or silently restarting over, some other file.
        """
        folder = self.root / "checkpoints"
        marker = folder / "latest.json"
        if not marker.exists():
            return None
        try:
            name = json.loads(marker.read_text())["file"]
        except (OSError, ValueError, KeyError, TypeError):
            raise ValueError(f"{marker}: not a checkpoint marker ({{\"round\": N, \"file\": "
                             f"\"round-NNN.npz\"}})") from None
        if not isinstance(name, str) or not CHECKPOINT_NAME.fullmatch(name):
            raise ValueError(f"{marker}: 'file' must name a round-NNN.npz in {folder}, "
                             f"got {str(name)[:80]!r}")
        path = folder / name
        if path.is_symlink() or (path.exists() and path.resolve().parent != folder.resolve()):
            raise ValueError(f"{marker}: {name} is not a file inside {folder}")
        return path if path.is_file() else None


def load_checkpoint(path: Path, *, ema: bool = False, with_ema: bool = False
                    ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Arrays and meta of a checkpoint written by ``RunFolder.save_checkpoint``.

    The raw weights (what a resumed run continues from); with ``ema`` the coordinator's moving
    average of the generator (``server/ema.py``) in place of the generator where the checkpoint
    has one (what ``fedsynth sample`` draws from); ``with_ema`` keeps the ``ema:`` keys as stored.
    """
    from .ema import split_ema

    with np.load(path, allow_pickle=False) as data:
        meta = json.loads(data["__meta__"].tobytes().decode())
        arrays = {k: data[k] for k in data.files if k != "__meta__"}
    if with_ema:
        return arrays, meta
    raw, average = split_ema(arrays)
    if ema:
        raw.update({k: v for k, v in average.items() if k in raw})
    return raw, meta
