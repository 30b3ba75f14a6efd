"""Images out of a checkpoint: load its generator, draw from noise, translate or condition on
real inputs read as a hospital reads them.

``fedsynth sample``, ``audit`` and ``evaluate`` are thin command lines over this module, and the
benches call it too (``bench/segmentation.py``, ``bench/mask_grid.py``).
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger("fedsynth.generation")

TRANSLATE_BATCH = 16  # input slices translated per forward pass


_CS = re.compile(r"[A-Z0-9 _]{1,16}")  # a DICOM code string, e.g. the input's Modality


def load_generator(path: Path) -> tuple[Any, dict[str, Any], dict[str, Any]]:
    """(family, nets, meta) from a checkpoint; ValueError with one line on any problem.

    ``meta["_config"]`` is the ModelConfig, ``meta["_data"]`` the run's DataConfig (from the run
    folder's ``config.json``; the defaults where there is none) and ``meta["_run"]`` that
    config's other entries (``preset``...), ``{}`` without one.
    """
    from server.run_folder import load_checkpoint
    from shared_models import ModelConfig, decode_into, get_family

    if not path.is_file():
        raise ValueError(f"checkpoint '{path}' does not exist")
    try:
        arrays, meta = load_checkpoint(path, ema=True)  # the coordinator's average, if kept
    except Exception as exc:
        raise ValueError(f"checkpoint '{path}' is not a fedsynth checkpoint: "
                         f"{type(exc).__name__}: {exc}") from exc
    if not isinstance(meta, dict) or "family" not in meta or "model" not in meta:
        raise ValueError(f"checkpoint '{path}' has no 'family'/'model' metadata")
    try:
        family = get_family(str(meta["family"]))
        cfg = ModelConfig(**meta["model"])
        nets = family.build(cfg)
        decode_into(nets, arrays, strict_components=family.samplers)
        if "round" in meta:  # pgan: sample at the stage the checkpoint's round reached
            family.at_round(nets, cfg, int(meta["round"]))
    except Exception as exc:
        raise ValueError(f"checkpoint '{path}' does not fit its model: {exc}") from exc
    meta["_config"] = cfg
    meta["_run"], meta["_data"] = run_config(path)
    return family, nets, meta


def run_config(checkpoint: Path) -> tuple[dict[str, Any], Any]:
    """(config.json entries, DataConfig) of the run a checkpoint belongs to.

    The run folder is ``runs/<id>/`` with ``checkpoints/round-NNN.npz`` and ``config.json``;
    a ``config.json`` beside the checkpoint counts too. Keys may be written ``domain_a`` or
    ``domain-a``. No config (or no ``data`` in it): the DataConfig defaults.
    """
    from shared_models import DataConfig
    from shared_models.settings import Codec

    candidates = [checkpoint.parent / "config.json"]
    if checkpoint.parent.name == "checkpoints":
        candidates.insert(0, checkpoint.parent.parent / "config.json")
    for candidate in candidates:
        if candidate.is_file():
            try:
                config = json.loads(candidate.read_text())
            except (OSError, ValueError) as exc:
                raise ValueError(f"run config '{candidate}' is not readable JSON: {exc}") from exc
            if not isinstance(config, dict):
                raise ValueError(f"run config '{candidate}' is not a JSON object")
            break
    else:
        return {}, DataConfig()
    data = config.get("data") or {}
    if not isinstance(data, dict):
        raise ValueError(f"run config '{candidate}': 'data' is not a table")
    codec = Codec(DataConfig, "run config data", lenient=True)  # the one settings codec
    try:  # config.json keeps field names; a hand-written one may use the launch file's keys
        return config, codec.decode({k: v for k, v in data.items()
                                     if k in codec.by_key or k in codec.by_name},
                                    spelling="either")
    except (TypeError, ValueError) as exc:
        raise ValueError(f"run config '{candidate}': data rules unusable: {exc}") from exc


def class_index(cfg: Any, data: Any, wanted: str) -> tuple[int, str]:
    """(label, name) of ``--class``: a name of the run's class list (case-insensitive) or an
    index in [0, num_classes)."""
    names = class_names(cfg, data)
    for k, name in enumerate(names):
        if name.lower() == wanted.strip().lower():
            return k, name
    if wanted.strip().isdigit() and int(wanted) < cfg.num_classes:
        return int(wanted), names[int(wanted)]
    raise ValueError(f"--class {wanted!r} is not a class of this checkpoint; its classes: "
                     + ", ".join(f"{k}={n}" for k, n in enumerate(names)))


def class_names(cfg: Any, data: Any) -> tuple[str, ...]:
    """The run's class names in label order (``0``, ``1``... where the run config has none
    that fit the model)."""
    names = tuple(data.class_names)
    return names if len(names) == cfg.num_classes else tuple(str(k) for k in
                                                            range(cfg.num_classes))


def generate(family: Any, nets: dict[str, Any], cfg: Any, n: int, seed: int,
             label: int | None = None, norm_stats: str = "auto") -> np.ndarray:
    """``n`` samples in [-1, 1] from fixed-seed noise.

    Conditional families: every sample of class ``label``, or the classes in turn. With batch
    statistics (``server.images.sample_images``) at least ``MIN_BATCH_STATS`` rows are drawn
    and the first ``n`` kept, so that a small ``n`` still normalises over a real batch.
    """
    import torch

    from server.images import MIN_BATCH_STATS, resolve_norm_stats, sample_images

    mode = resolve_norm_stats(nets, family.samplers, norm_stats)
    rows = max(n, MIN_BATCH_STATS) if mode == "batch" else n
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn(rows, cfg.latent_dim, generator=gen)
    labels = None
    if cfg.num_classes > 0:
        labels = (torch.full((rows,), int(label), dtype=torch.int64) if label is not None
                  else torch.arange(rows) % cfg.num_classes)
    images = sample_images(family, nets, noise, labels, mode)[:n]
    return images.detach().float().clamp(-1.0, 1.0).cpu().numpy()


def translation_inputs(folder: Path, cfg: Any, data: Any, n: int, attribute: str | None = None,
                       pattern: str | None = None) -> tuple[np.ndarray, list[str], int]:
    """(inputs, notes, N): at most ``n`` domain-A units of ``folder`` (evenly spaced among its
    N), as the hospital path reads them, and a note per input ("input slice k of N, modality
    MR") that names nothing of the file's identity."""
    from client.datasets import domain_selector, stack, units
    from client.dicom import DicomSettings, scan_folder
    from client.settings import HospitalSettings

    settings = DicomSettings(image_size=cfg.image_size, channels=getattr(cfg, "channels", 1))
    slices = scan_folder(folder, settings)
    if cfg.spatial_dims == 3:  # the hospital's spacing-aware volume path (client/volumes.py)
        from client.cache import slice_geometry

        slices.meta.update(slice_geometry(folder, slices.meta, settings))
    hospital = HospitalSettings(data_dir=folder, label_attribute=attribute or "",
                                label_patterns=((data.domain_a, pattern),) if pattern else ())
    selector = domain_selector(hospital, cfg, data)
    domain = selector.classify(slices.meta)
    rows = np.flatnonzero(domain == 0)
    if cfg.spatial_dims == 3:
        groups = list(units(slices.meta, rows, 3).values())
    else:
        groups = [np.array([i]) for i in rows]
    if not groups:
        seen = sorted({str(v) for v in slices.meta[selector.attribute]})
        raise ValueError(
            f"no {'volume' if cfg.spatial_dims == 3 else 'slice'} of domain A "
            f"({data.domain_a}, pattern {selector.patterns[0]!r} in {selector.attribute}) among "
            f"the {len(slices.images)} slices of '{folder}'; {selector.attribute} there: "
            f"{', '.join(repr(v) for v in seen[:6])}{' ...' if len(seen) > 6 else ''} "
            f"(--input-attribute / --input-pattern say how this folder names domain A)")
    total = len(groups)
    chosen = np.unique(np.linspace(0, total - 1, min(n, total)).round().astype(int))
    images = np.asarray(slices.images, dtype=np.float32)
    if images.ndim == 3:
        images = images[:, None]
    x = stack(images, [groups[k] for k in chosen], cfg.spatial_dims, cfg.image_size,
              meta=slices.meta if cfg.spatial_dims == 3 else None).numpy()
    unit = "volume" if cfg.spatial_dims == 3 else "slice"
    notes = []
    for k in chosen:
        modality = str(slices.meta["modality"][groups[k][0]]).strip().upper()
        notes.append(f"input {unit} {k + 1} of {total}"
                     + (f", modality {modality}" if _CS.fullmatch(modality) else ""))
    return x, notes, total


def translate(family: Any, nets: dict[str, Any], inputs: np.ndarray,
              norm_stats: str = "auto") -> np.ndarray:
    """Domain-A inputs in [-1, 1] -> their domain-B translations (cyclegan: ``g_ab``)."""
    import torch

    from server.images import sample_images

    out = []
    for start in range(0, len(inputs), TRANSLATE_BATCH):
        x = torch.from_numpy(np.ascontiguousarray(inputs[start:start + TRANSLATE_BATCH]))
        out.append(sample_images(family, nets, x.float(), None, norm_stats)
                   .detach().float().clamp(-1.0, 1.0).cpu().numpy())
    return np.concatenate(out)


def mask_inputs(folder: Path, cfg: Any, data: Any, n: int) -> tuple[np.ndarray, list[str], int]:
    """(masks, notes, N): at most ``n`` masks of the run's labels from the DICOM SEG / RTSTRUCT
    files of ``folder`` (read as a hospital reads them, :mod:`client.segmentation`), evenly spaced
    among the N slices (3D: volumes) that hold a mask; notes name nothing of the files."""
    from client.cache import slice_geometry
    from client.datasets import build_tensors
    from client.dicom import DicomSettings, scan_folder
    from client.segmentation import LabelRule, load_masks

    settings = DicomSettings(image_size=cfg.image_size, channels=getattr(cfg, "channels", 1))
    slices = scan_folder(folder, settings)
    if cfg.spatial_dims == 3:
        slices.meta.update(slice_geometry(folder, slices.meta, settings))
    masks = load_masks(folder, slices, settings,
                       LabelRule.from_config(data.mask_labels, data.mask_label_patterns))
    images = np.asarray(slices.images, dtype=np.float32)
    if images.ndim == 3:
        images = images[:, None]
    train, _ = build_tensors(images, slices.meta, "masked", cfg, 0, masks=masks)
    m = train["mask"].numpy()
    lit = np.flatnonzero(m.reshape(len(m), -1).max(1) > 0)
    if not len(lit):
        raise ValueError(f"no mask of {list(masks.labels)} in '{folder}': "
                         f"{masks.report.summary()}")
    total = len(lit)
    chosen = lit[np.unique(np.linspace(0, total - 1, min(n, total)).round().astype(int))]
    unit = "volume" if cfg.spatial_dims == 3 else "slice"
    notes = [f"mask of input {unit} {k + 1} of {len(m)} ({', '.join(masks.labels)})"
             for k in chosen]
    return m[chosen], notes, total
