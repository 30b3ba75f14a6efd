"""DiffAugment's policy: its op names and their parser, without torch (``shared_models.augment``
applies them). ``TrainConfig`` checks an ``augment`` setting with ``parse_policy``, and
``fedsynth launch`` checks run files without importing torch (issue 24 item 8)."""

from __future__ import annotations

OPS = ("translation", "cutout", "brightness", "contrast", "saturation")
COLOUR_OPS = ("saturation",)  # need 3 channels
COLOUR_POLICY = ("brightness", "saturation", "contrast")  # Zhao et al. 2020's ``color``


def parse_policy(policy: str, channels: int = 1) -> tuple[str, ...]:
    """``"translation,cutout,brightness"`` -> the ops in that order; ``""`` -> none.

    ``color``/``colour`` stands for brightness, saturation, contrast. Unknown names raise
    ``ValueError`` naming the known ones; with ``channels`` 1, ``saturation`` and ``color`` too
    (grey images have no saturation)."""
    named = tuple(p.strip() for p in policy.split(",") if p.strip())
    ops: tuple[str, ...] = ()
    for op in named:
        if op in ("color", "colour", "saturation") and channels != 3:
            grey = tuple(o for o in OPS if o not in COLOUR_OPS)
            raise ValueError(f"augment op {op!r}: grey-level images have no colour saturation; "
                             f"use {', '.join(grey)} (or channels = 3)")
        if op in ("color", "colour"):
            ops += COLOUR_POLICY
            continue
        if op not in OPS:
            raise ValueError(f"unknown augment op {op!r}; known: {', '.join(OPS)}, color")
        ops += (op,)
    if len(set(ops)) != len(ops):
        raise ValueError(f"augment policy {policy!r} repeats an op")
    return ops
