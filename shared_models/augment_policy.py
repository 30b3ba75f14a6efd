"""DiffAugment's policy: its op names and their parser, without torch (``shared_models.augment``
applies them). ``TrainConfig`` checks an ``augment`` setting with ``parse_policy``, and
``fedsynth launch`` checks run files without importing torch (issue 24 item 8)."""

from __future__ import annotations

OPS = ("translation", "cutout", "brightness", "contrast")


def parse_policy(policy: str) -> tuple[str, ...]:
    """``"translation,cutout,brightness"`` -> the ops in that order; ``""`` -> none.

    Unknown names raise ``ValueError`` naming the known ones (``color`` / ``saturation`` too: grey
    images have no saturation)."""
    ops = tuple(p.strip() for p in policy.split(",") if p.strip())
    for op in ops:
        if op in ("color", "colour", "saturation"):
            raise ValueError(f"augment op {op!r}: grey-level images have no colour saturation; "
                             f"use {', '.join(OPS)}")
        if op not in OPS:
            raise ValueError(f"unknown augment op {op!r}; known: {', '.join(OPS)}")
    if len(set(ops)) != len(ops):
        raise ValueError(f"augment policy {policy!r} repeats an op")
    return ops
