"""What a hospital trains on: its cached DICOM slices turned into the tensors a family needs.

The family's ``data_layout`` says which tensors:

- ``image`` (DCGAN, WGAN-GP): every slice, key ``image``;
- ``labelled`` (conditional DCGAN): ``image`` + int64 ``label``; the class of a slice comes from a
  DICOM attribute (``series_description`` by default, or ``modality``...) matched against one regular
  expression per class. The class ORDER is the federation's (index k must mean the same class at
  every hospital); the patterns may be local (a site names its series its own way);
- ``paired`` (pix2pix): ``a``/``b`` slices of domain A and B matched by study and slice position;
- ``unpaired`` (CycleGAN): all A slices as ``a``, all B slices as ``b``, independently; either may be
  empty (a hospital holding one domain only); with ``lesion_masks`` (``lesion-cycle-weight``) also
  ``mask_a`` / ``mask_b`` (N, K, ...) beside them, read as for ``masked`` (all 0 where none);
- ``masked`` (mask-conditioned families): ``image`` + float ``mask`` (N, K, ...) in {0, 1}, channel
  k = the run's mask label k (``DataConfig.mask_labels``), from the DICOM SEG / RTSTRUCT files of
  the folder (:mod:`client.segmentation`); only slices of a series some segmentation covers.

With ``spatial_dims`` 3 the unit is a volume: the cached slices of one series, with the slice
geometry the cache keeps (positions, pixel spacing, orientation), assembled by
:func:`client.volumes.volume_from_slices` -- turned to one anatomical frame, resampled to
isotropic voxels with MONAI and fitted into the ``image_size`` cube by its longest physical
extent, the rest padded (proportions kept: a sphere stays round). A series whose geometry does
not make a volume (no pixel spacing, mixed orientation, a missing slice) is left out and logged.
Pairs are the A and B series of one study, resampled to one voxel size so they stay aligned.

Held-out units (every ``holdout_every``-th) never train; they feed the local evaluation (pairs for
translation families, so SSIM/PSNR/MAE have ground truth). Everything here stays at the hospital.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from shared_models import DataConfig, ModelConfig, get_family
from shared_models.patterns import compile_pattern, literal

from . import volumes
from .cache import load_slices
from .dicom import DicomSettings, ScanReport
from .segmentation import SliceMasks
from .settings import HospitalSettings

log = logging.getLogger(__name__)

POSITION_DECIMALS = 2  # slice positions (mm) that agree to 0.01 mm are the same slice
MIN_VOLUME_SLICES = 8  # 3D: a series with fewer slices is no volume (a lone radiograph, a scout)


class DataSelectionError(ValueError):
    """The hospital's slices do not give what the family needs; the message says what is missing."""


@dataclass
class LocalData:
    """Training and held-out tensors by batch key (``image`` for DCGAN), plus the scan report."""

    train: dict[str, torch.Tensor]
    holdout: dict[str, torch.Tensor]
    report: ScanReport

    @property
    def num_train(self) -> int:
        return max((len(v) for v in self.train.values()), default=0)


@dataclass(frozen=True)
class Selector:
    """Which slices belong to which class (or domain): ``patterns[k]`` searched in ``attribute``."""

    attribute: str
    names: tuple[str, ...]
    patterns: tuple[str, ...]

    def classify(self, meta: Mapping[str, np.ndarray]) -> np.ndarray:
        """Class index per slice; -1 where no pattern (or more than one) matches."""
        if self.attribute not in meta:
            raise DataSelectionError(f"label attribute {self.attribute!r} is not one of "
                                     f"{sorted(meta)}")
        values = meta[self.attribute]
        regexes = [compile_pattern(p) for p in self.patterns]  # RE2: linear time, run-sent
        hits = np.array([[bool(r.search(str(v))) for r in regexes] for v in values],
                        dtype=bool).reshape(len(values), len(regexes))
        out = np.where(hits.sum(1) == 1, hits.argmax(1), -1)
        ambiguous = int((hits.sum(1) > 1).sum())
        if ambiguous:
            log.warning("%d slices match more than one of %s: left out", ambiguous, self.names)
        return out.astype(np.int64)


def _selector(hospital: HospitalSettings, attribute: str, names: tuple[str, ...],
              patterns: Sequence[str]) -> Selector:
    """The federation's names, with the hospital's own rule where it has one.

    ``[hospital] label-attribute`` replaces the run's attribute and ``label-patterns``
    (``name=regex;name=regex``) the run's pattern of a name: the federation fixes what the
    classes/domains ARE and their order; a site says how ITS series are called.
    """
    local = dict(hospital.label_patterns)
    chosen = tuple(local.get(n) or p or literal(n) for n, p in zip(names, patterns))
    return Selector(hospital.label_attribute or attribute, names, chosen)


def class_selector(hospital: HospitalSettings, model: ModelConfig,
                   data: DataConfig | None = None) -> Selector:
    """Classes of a conditional family: their order fixes the label indices federation-wide."""
    data = data or DataConfig()
    names = data.class_names
    if len(names) != model.num_classes:
        raise DataSelectionError(f"model num_classes is {model.num_classes} but the class list "
                                 f"{list(names)} has {len(names)} names")
    patterns = data.class_pattern_list or ("",) * len(names)
    return _selector(hospital, data.class_attribute, names, patterns)


def domain_selector(hospital: HospitalSettings, model: ModelConfig,
                    data: DataConfig | None = None) -> Selector:
    """Domains A and B of a translation family (e.g. T1w -> T2w, or MR -> CT by modality)."""
    data = data or DataConfig()
    return _selector(hospital, data.domain_attribute, (data.domain_a, data.domain_b),
                     (data.domain_a_pattern, data.domain_b_pattern))


# ----------------------------------------------------------------------------- units


def units(meta: Mapping[str, np.ndarray], rows: np.ndarray, spatial_dims: int
          ) -> dict[tuple, np.ndarray]:
    """Training units among slice ``rows``, keyed so that A and B units of one pair share a key.

    2D: one slice, key (study, position); a repeated key keeps the first slice, a slice without a
    position gets a key of its own (it can never pair). 3D: the slices of one series sorted by
    position, key (study,) for the study's first series (further series of the same study get
    their own keys); series of fewer than ``MIN_VOLUME_SLICES`` slices are left out, and, where
    ``meta`` has the cache's slice geometry, series that make no volume
    (:func:`client.volumes.series_geometry`; sorted along the normal otherwise).
    """
    out: dict[tuple, np.ndarray] = {}
    study, pos = meta["study_uid"], meta["position"]
    if spatial_dims == 2:
        for i in rows:
            p = float(pos[i])
            key = ((str(study[i]), round(p, POSITION_DECIMALS)) if math.isfinite(p)
                   else (str(study[i]), "no-position", int(i)))
            out.setdefault(key, np.array([i]))
        return out
    series: dict[str, list[int]] = {}
    for i in rows:
        series.setdefault(str(meta["series_uid"][i]), []).append(int(i))
    geometry = volumes.has_geometry(meta)
    skipped: dict[str, int] = {}
    for uid, members in series.items():
        if len(members) < MIN_VOLUME_SLICES:
            continue
        if geometry:
            try:
                members = volumes.series_geometry(meta, members).rows.tolist()
            except ValueError as exc:
                skipped[str(exc)] = skipped.get(str(exc), 0) + 1
                continue
        else:
            members.sort(key=lambda j: (math.isnan(pos[j]), pos[j]))
        key: tuple = (str(study[members[0]]),)
        if key in out:
            key = (str(study[members[0]]), uid)
        out[key] = np.array(members)
    if skipped:
        log.warning("series left out of the 3D volumes: %s",
                    ", ".join(f"{n} {reason}" for reason, n in sorted(skipped.items())))
    return out


def stack(images: np.ndarray, groups: Sequence[np.ndarray], spatial_dims: int, size: int,
          meta: Mapping[str, np.ndarray] | None = None,
          voxel_mm: Sequence[float | None] | None = None) -> torch.Tensor:
    """(N, 1, S, S) slices, or (N, 1, S, S, S) volumes.

    3D with ``meta`` holding the cache's slice geometry (the hospital's path): each group (a
    series, from :func:`units`) becomes :func:`client.volumes.volume_from_slices` of its slices,
    isotropic, at ``voxel_mm[i]`` mm when given (pairs) else fitted by its longest extent.
    Without geometry (a caller holding a bare :func:`client.dicom.scan_folder` scan), the
    slices are only interpolated to the cube, which stretches the physical shape.
    """
    if spatial_dims == 2:
        if not groups:
            return torch.empty((0, 1, size, size))
        return torch.from_numpy(np.ascontiguousarray(images[np.concatenate(groups)]))
    vols = []
    spatial = meta is not None and volumes.has_geometry(meta)
    if not spatial and groups:
        log.warning("no slice geometry: %d volumes interpolated to the %d^3 cube, proportions "
                    "not kept", len(groups), size)
    for i, g in enumerate(groups):
        if spatial:
            assert meta is not None
            cube = volumes.volume_from_slices(images, volumes.series_geometry(meta, g), size,
                                              voxel_mm[i] if voxel_mm is not None else None)
            vols.append(torch.from_numpy(cube)[None])
            continue
        vol = torch.from_numpy(np.ascontiguousarray(images[g]))[:, 0]  # (D, S, S)
        vol = F.interpolate(vol[None, None], size=(size, size, size), mode="trilinear",
                            align_corners=False)[0]
        vols.append(vol)
    return torch.stack(vols) if vols else torch.empty((0, 1, size, size, size))


def pair_voxels(images: np.ndarray, meta: Mapping[str, np.ndarray],
                groups_a: Sequence[np.ndarray], groups_b: Sequence[np.ndarray], size: int
                ) -> list[float | None]:
    """One isotropic voxel size (mm) per A/B pair: the coarser of the two series' fits, so both
    volumes of a pair share the physical scale and neither is cropped (None without geometry)."""
    if not volumes.has_geometry(meta):
        return [None] * len(groups_a)
    shape = images.shape[-2:]
    return [max(volumes.fit_spacing(volumes.series_geometry(meta, a).extent(shape), size),
                volumes.fit_spacing(volumes.series_geometry(meta, b).extent(shape), size))
            for a, b in zip(groups_a, groups_b)]


def _held(n: int, every: int) -> np.ndarray:
    """Every ``every``-th unit held out, only when at least two would be."""
    held = np.zeros(n, dtype=bool)
    if every > 0 and n >= 2 * every:
        held[::every] = True
    return held


# ----------------------------------------------------------------------------- layouts


def build_tensors(images: np.ndarray, meta: Mapping[str, np.ndarray], layout: str,
                  model: ModelConfig, holdout_every: int,
                  selector: Selector | None = None, masks: SliceMasks | None = None
                  ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(train, holdout) tensors of ``layout`` from slices ``images`` (N, 1, S, S) and their meta."""
    dims, size = model.spatial_dims, model.image_size
    every_row = np.arange(len(images))
    if layout == "masked":
        if masks is None:
            raise ValueError("layout 'masked' needs the slices' masks")
        return _masked_tensors(images, meta, model, holdout_every, masks)
    if layout == "image":
        groups = list(units(meta, every_row, dims).values()) if dims == 3 else [
            np.array([i]) for i in every_row]
        held = _held(len(groups), holdout_every)
        train = stack(images, [g for g, h in zip(groups, held) if not h], dims, size, meta)
        hold = stack(images, [g for g, h in zip(groups, held) if h], dims, size, meta)
        return {"image": train}, {"image": hold if held.any() else train}

    if selector is None:
        raise ValueError(f"layout {layout!r} needs a class/domain selector")
    cls = selector.classify(meta)

    if layout == "labelled":
        groups, labels = [], []
        for k in range(len(selector.names)):
            rows = np.flatnonzero(cls == k)
            found = list(units(meta, rows, dims).values()) if dims == 3 else [
                np.array([i]) for i in rows]
            groups += found
            labels += [k] * len(found)
        if not groups:
            raise DataSelectionError(f"no slice matches any class of {list(selector.names)} in "
                                     f"attribute {selector.attribute!r}")
        order = np.argsort([int(g[0]) for g in groups], kind="stable")  # scan order, mixed classes
        groups = [groups[i] for i in order]
        y = torch.tensor([labels[i] for i in order], dtype=torch.int64)
        held = torch.from_numpy(_held(len(groups), holdout_every))
        x = stack(images, groups, dims, size, meta)
        train = {"image": x[~held], "label": y[~held]}
        hold = {"image": x[held], "label": y[held]} if held.any() else dict(train)
        return train, hold

    units_a = units(meta, np.flatnonzero(cls == 0), dims)
    units_b = units(meta, np.flatnonzero(cls == 1), dims)
    paired = [k for k in units_a if k in units_b]
    held = _held(len(paired), holdout_every)
    held_keys = {k for k, h in zip(paired, held) if h}

    def pairs(keys: Sequence[tuple]) -> dict[str, torch.Tensor]:
        """A and B units of ``keys``, in one order; 3D pairs at one voxel size per pair."""
        ga, gb = [units_a[k] for k in keys], [units_b[k] for k in keys]
        voxel = pair_voxels(images, meta, ga, gb, size) if dims == 3 else None
        out = {"a": stack(images, ga, dims, size, meta, voxel),
               "b": stack(images, gb, dims, size, meta, voxel)}
        if masks is not None:  # lesion-cycle-weight: held-out pairs keep their masks (bench)
            out |= {f"mask_{k}": _mask_stack(masks, g, dims, size, meta, voxel)
                    for k, g in (("a", ga), ("b", gb))}
        return out

    hold = pairs([k for k in paired if k in held_keys])

    if layout == "paired":
        if not paired:
            raise DataSelectionError(
                f"no {selector.names[0]}/{selector.names[1]} pairs (same study and slice "
                f"position) among {len(units_a)} {selector.names[0]} and {len(units_b)} "
                f"{selector.names[1]} units")
        train = pairs([k for k in paired if k not in held_keys])
        return train, (hold if held_keys else dict(train))

    if layout == "unpaired":
        if not units_a and not units_b:
            raise DataSelectionError(f"no slice of domain {selector.names[0]} or "
                                     f"{selector.names[1]} in attribute {selector.attribute!r}")
        chosen = {k: [g for u, g in found.items() if u not in held_keys]
                  for k, found in (("a", units_a), ("b", units_b))}
        train = {k: stack(images, groups, dims, size, meta) for k, groups in chosen.items()}
        if masks is not None:  # lesion-cycle-weight: each domain's masks, unit for unit
            train |= {f"mask_{k}": _mask_stack(masks, groups, dims, size, meta)
                      for k, groups in chosen.items()}
        if not held_keys:  # evaluate on the training pairs when too few to hold any out
            hold = pairs(paired)
        return train, hold
    raise ValueError(f"unknown data layout {layout!r}")


def _masked_tensors(images: np.ndarray, meta: Mapping[str, np.ndarray], model: ModelConfig,
                    holdout_every: int, masks: SliceMasks
                    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """``image`` + ``mask`` units of the slices some segmentation covers (3D: their series)."""
    dims, size = model.spatial_dims, model.image_size
    rows = np.flatnonzero(masks.covered)
    groups = list(units(meta, rows, dims).values()) if dims == 3 else [np.array([i]) for i in rows]
    if not groups:
        raise DataSelectionError(
            f"no slice has a mask of {list(masks.labels)}: {masks.report.summary()}")
    held = _held(len(groups), holdout_every)

    def tensors(chosen: Sequence[np.ndarray]) -> dict[str, torch.Tensor]:
        return {"image": stack(images, chosen, dims, size, meta),
                "mask": _mask_stack(masks, chosen, dims, size, meta)}

    train = tensors([g for g, h in zip(groups, held) if not h])
    hold = tensors([g for g, h in zip(groups, held) if h]) if held.any() else dict(train)
    return train, hold


def _mask_stack(masks: SliceMasks, chosen: Sequence[np.ndarray], dims: int, size: int,
                meta: Mapping[str, np.ndarray],
                voxel_mm: Sequence[float | None] | None = None) -> torch.Tensor:
    """(N, K, ...) masks of the units ``chosen``: each channel resampled like the image, as -1/1
    (background is the -1 padding), then cut at 0."""
    chans = [stack(masks.masks[:, k:k + 1] * 2.0 - 1.0, chosen, dims, size, meta, voxel_mm) > 0
             for k in range(len(masks.labels))]
    return torch.cat(chans, dim=1).float()


_DATA: dict[tuple, LocalData] = {}  # warm per process and run: a Ray actor or the executor
MAX_DATA_PER_HOSPITAL = 2  # model configs kept warm per hospital (image size, family, ...)


def clear_local_data() -> None:
    """Forget every loaded data set (``client.app.run_state`` calls it when a new run starts)."""
    _DATA.clear()


def local_data(hospital: HospitalSettings, model: ModelConfig,
               data: DataConfig | None = None, lesion_masks: bool = False) -> LocalData:
    """Load (once per process) the slices for ``model`` and build the family's tensors.

    ``lesion_masks`` (the run's ``lesion-cycle-weight`` > 0, unpaired layout): also the domain
    slices' masks of ``data.mask_labels``; a hospital holding none trains without them (logged)."""
    data = data or DataConfig()
    family = get_family(model.family)
    lesion_masks = lesion_masks and family.data_layout == "unpaired"
    key = (hospital, model, data, lesion_masks)
    if key in _DATA:
        return _DATA[key]
    settings = DicomSettings(image_size=model.image_size, modalities=hospital.modalities,
                             max_decoded_mb=hospital.max_decoded_mb, channels=model.channels)
    slices = load_slices(hospital.data_dir, settings, hospital.cache_dir)
    log.info("%s: %s", hospital.name, slices.report.summary())
    images = np.asarray(slices.images, dtype=np.float32)
    if images.ndim == 3:
        images = images[:, None]
    selector = None
    if family.data_layout == "labelled":
        selector = class_selector(hospital, model, data)
    elif family.data_layout in ("paired", "unpaired"):
        selector = domain_selector(hospital, model, data)
    masks = None
    if family.data_layout == "masked" or lesion_masks:
        from .segmentation import LabelRule, load_masks

        masks = load_masks(hospital.data_dir, slices, settings,
                           LabelRule.from_config(data.mask_labels, data.mask_label_patterns))
        log.info("%s: %s", hospital.name, masks.report.summary())
        if lesion_masks and not masks.masks.any():
            log.warning("%s: lesion-cycle-weight is on but no slice here has a mask of %s "
                        "(%s): this hospital trains the plain cycle and identity terms",
                        hospital.name, list(masks.labels), masks.report.summary())
    train, holdout = build_tensors(images, slices.meta, family.data_layout, model,
                                   hospital.holdout_every, selector, masks)
    log.info("%s: %s training tensors %s, held out %s", hospital.name, family.name,
             {k: len(v) for k, v in train.items()}, {k: len(v) for k, v in holdout.items()})
    mine = [k for k in _DATA if k[0] == hospital]
    for stale in mine[:max(0, len(mine) - MAX_DATA_PER_HOSPITAL + 1)]:
        del _DATA[stale]  # oldest first: dicts keep insertion order
    _DATA[key] = LocalData(train=train, holdout=holdout, report=slices.report)
    return _DATA[key]
