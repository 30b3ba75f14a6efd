"""The export gate: what a hospital checks before a synthetic image leaves as a file.

A checkpoint's images are audited against the training and held-out slices of the hospital's own
data (``shared_models.audit``): a near-copy of a training slice is refused. A DP run's images
carry the run's epsilon (``model_epsilon``). Used by ``fedsynth sample --audit`` and
``fedsynth audit``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np

from protocol.keys import valid_epsilon  # one definition of an epsilon a report may show

def add_data_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--holdout-every", type=int, default=10,
                   help="the hospital's holdout-every setting: every n-th slice is held out "
                        "(default 10, the hospital default)")
    p.add_argument("--modalities", default="",
                   help="the hospital's modalities setting (comma separated; default: all)")


def hospital_split(data_dir: Path, cfg: Any, data: Any, holdout_every: int,
                   modalities: str = "") -> tuple[Any, Any, Any]:
    """(training, held-out, LocalData) of ``data_dir`` as the hospital splits them for ``cfg``:
    generation families their ``image``, translation families their targets (the second of the
    family's ``pair_keys``: pix2pix / cyclegan domain B, maskgan the images of the masks)."""
    from client.datasets import local_data
    from client.settings import HospitalSettings

    if not data_dir.is_dir():
        raise ValueError(f"data folder '{data_dir}' is not a folder")
    if holdout_every < 2:
        raise ValueError(f"--holdout-every must be at least 2, got {holdout_every}")
    hospital = HospitalSettings(
        data_dir=data_dir, holdout_every=holdout_every,
        modalities=tuple(m.strip().upper() for m in modalities.split(",") if m.strip()))
    local = local_data(hospital, cfg, data)
    key = _pair_keys(cfg)[1]
    if key not in local.holdout or not len(local.train.get(key, ())) \
            or not len(local.holdout[key]):
        raise ValueError(f"'{data_dir}' has no training and held-out {key!r} slices for this "
                         f"model (held out: every {holdout_every}-th)")
    return local.train[key], local.holdout[key], local


def _pair_keys(cfg: Any) -> tuple[str, str]:
    """(input, target) tensor keys of ``cfg``'s family at a hospital: translation families their
    ``pair_keys`` (maskgan: mask -> image), generation families (none, image)."""
    from shared_models import get_family

    family = get_family(cfg.family)
    return tuple(family.pair_keys) if family.task == "translation" else ("", "image")


def draw(family: Any, nets: dict, cfg: Any, n: int, seed: int, local: Any) -> np.ndarray:
    """``n`` images from the checkpoint: samples, or translations of held-out inputs (maskgan:
    the images it draws for the held-out slices' masks)."""
    from fedsynth.generation import generate, translate

    if family.task == "translation":
        key = _pair_keys(cfg)[0]
        inputs = local.holdout.get(key)
        if inputs is None or not len(inputs):
            what = "mask" if key == "mask" else "domain-A slice"
            raise ValueError(f"no held-out {what} to translate")
        return translate(family, nets, inputs[:n].numpy())
    return generate(family, nets, cfg, n, seed)


def model_epsilon(checkpoint: Path, round_: int, run: dict) -> dict[str, Any]:
    """The checkpoint's DP record from its run folder: the noise multiplier of the run and the
    largest epsilon any hospital reported up to the checkpoint's round (each at its own delta;
    the weakest guarantee among them). ``dp-epsilon`` None: no DP, or no metrics.jsonl found."""
    train = run.get("train") or {}
    sigma = float(train.get("dp_noise_multiplier", train.get("dp-noise-multiplier", 0)) or 0)
    root = checkpoint.parent.parent if checkpoint.parent.name == "checkpoints" \
        else checkpoint.parent
    eps: list[float] = []
    invalid = 0
    metrics = root / "metrics.jsonl"
    if metrics.is_file():
        for line in metrics.read_text().splitlines():
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if not isinstance(row, dict) or int(row.get("round", 0)) > round_:
                continue
            for m in (row.get("hospitals") or {}).values():
                if not isinstance(m, dict) or "dp-epsilon" not in m:
                    continue
                # a report that cannot be an epsilon (-5, NaN, inf, text) is not one: left out,
                # and said so, since the weakest guarantee may be the one left out
                value = valid_epsilon(m["dp-epsilon"])
                if value is None:
                    invalid += 1
                else:
                    eps.append(value)
    source = ("max over hospitals' reports up to this round" if eps
              else ("no DP in this run" if sigma == 0 else "no hospital report found"))
    if invalid:
        source += f"; {invalid} report(s) not a finite number >= 0 left out"
    return {"dp-noise-multiplier": sigma, "dp-epsilon": max(eps) if eps else None,
            "dp-epsilon-source": source}


def gate(images: np.ndarray, data_dir: Path, cfg: Any, data: Any, holdout_every: int,
         modalities: str, ssim_threshold: float) -> tuple[np.ndarray, dict[str, Any]]:
    """The export gate: (mask of images that may be written, the audit's scalars with the
    number refused). A near-copy of a training slice of ``data_dir`` is refused."""
    import torch

    from shared_models.audit import audit

    train, held, _ = hospital_split(data_dir, cfg, data, holdout_every, modalities)
    result = audit(torch.from_numpy(np.ascontiguousarray(images)), train, held, ssim_threshold)
    keep = np.ones(len(images), dtype=bool)
    keep[result.near_copy_index] = False
    scalars = result.scalars()
    scalars["refused-near-copies"] = int((~keep).sum())
    return keep, scalars
