"""MR phantom slices from ``phantominator``: the Shepp-Logan head's proton-density, T1 and T2 maps
pushed through the spin-echo signal equation with a scanner profile's settings.

Pure numpy/scipy (no Flower, no DICOM): the demo hospitals write these slices as DICOM
(``fedsynth.demo_data``), and the coordinator uses them as the synthetic inputs of a translation
family's sample grid (``server.federation.fixed_inputs``): it holds no patient image.
``phantominator`` is the optional ``demo`` dependency, imported when a slice is made.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from scipy import ndimage

__all__ = ["ScannerProfile", "default_profiles", "phantom_pair", "slice_z", "tissue_maps"]

# Slices are taken from the central part of the head (phantom units).
_Z_RANGE = (-0.45, 0.45)

# (field T, TR1, TE1, TR2, TE2, noise, fov, rotation deg, slices): archetypes
# of real fleets (1.5 T workhorse, 3 T research, 0.55 T low-field, 7 T).
_ARCHETYPES: tuple[tuple[float, float, float, float, float, float, float, float, int], ...] = (
    (1.5, 500.0, 15.0, 4000.0, 100.0, 0.020, 1.00, 0.0, 16),
    (3.0, 700.0, 10.0, 5000.0, 90.0, 0.010, 0.85, 8.0, 20),
    (0.55, 400.0, 20.0, 3000.0, 120.0, 0.045, 1.15, -6.0, 12),
    (7.0, 900.0, 8.0, 6000.0, 80.0, 0.015, 0.90, 3.0, 18),
)


@dataclass(frozen=True)
class ScannerProfile:
    """Acquisition settings of one hospital's scanner; the source of non-IID-ness."""

    name: str
    field_strength_t: float
    tr_t1w_ms: float
    te_t1w_ms: float
    tr_t2w_ms: float
    te_t2w_ms: float
    noise_sigma: float
    fov_scale: float
    rotation_deg: float
    slices: int


def default_profiles(n_hospitals: int, seed: int = 0) -> list[ScannerProfile]:
    """Distinct scanner profiles: archetypes cycled, jittered so no two are equal.

    The seed only changes the jitter, so hospital-1 stays a 1.5 T site etc.
    """
    if n_hospitals < 1:
        raise ValueError("n_hospitals must be >= 1")
    rng = np.random.default_rng([seed, 0xFED])
    profiles: list[ScannerProfile] = []
    for i in range(n_hospitals):
        b0, tr1, te1, tr2, te2, noise, fov, rot, slices = _ARCHETYPES[i % len(_ARCHETYPES)]
        j = rng.uniform(-1.0, 1.0, size=8)
        cycle = i // len(_ARCHETYPES)  # later cycles drift further from the archetype
        spread = 1.0 + cycle
        profiles.append(
            ScannerProfile(
                name=f"hospital-{i + 1}",
                field_strength_t=b0,
                tr_t1w_ms=round(float(tr1 * (1 + 0.08 * spread * j[0])), 1),
                te_t1w_ms=round(float(te1 * (1 + 0.08 * spread * j[1])), 2),
                tr_t2w_ms=round(float(tr2 * (1 + 0.08 * spread * j[2])), 1),
                te_t2w_ms=round(float(te2 * (1 + 0.08 * spread * j[3])), 2),
                noise_sigma=round(float(noise * (1 + 0.15 * j[4])), 4),
                fov_scale=round(float(np.clip(fov + 0.03 * spread * j[5], 0.8, 1.2)), 3),
                rotation_deg=round(float(rot + 2.0 * spread * j[6] + 5.0 * cycle), 2),
                slices=int(np.clip(slices + round(j[7]) + cycle, 12, 20)),
            )
        )
    return profiles


def _slice_z(profile: ScannerProfile, slice_index: int) -> float:
    """Phantom z coordinate of a slice; same for both contrasts, so pairs align."""
    if not 0 <= slice_index < profile.slices:
        raise IndexError(f"slice_index {slice_index} outside 0..{profile.slices - 1}")
    return float(np.linspace(*_Z_RANGE, profile.slices)[slice_index])


@lru_cache(maxsize=256)
def _tissue_maps(matrix: int, z: float, b0: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(M0, T1 s, T2 s) for one axial slice; cached because both contrasts reuse it.

    phantominator applies the Gach et al. field model T1 = A*B0^C per tissue
    (C ~ 0.14-0.38, i.e. roughly B0^(1/3)); CSF T1 is field independent.
    """
    from phantominator import shepp_logan  # local: optional "demo" dependency

    m0, t1, t2 = shepp_logan((matrix, matrix, 1), MR=True, zlims=(z, z), B0=b0)
    out = tuple(np.ascontiguousarray(a[..., 0], dtype=np.float64) for a in (m0, t1, t2))
    for a in out:
        a.setflags(write=False)
    return out  # type: ignore[return-value]


def _spin_echo(m0: np.ndarray, t1: np.ndarray, t2: np.ndarray, tr_ms: float, te_ms: float) -> np.ndarray:
    """S = M0 (1 - exp(-TR/T1)) exp(-TE/T2); zero where there is no tissue."""
    tissue = (m0 > 0) & (t1 > 0) & (t2 > 0)
    s = np.zeros_like(m0)
    tr, te = tr_ms / 1000.0, te_ms / 1000.0
    s[tissue] = m0[tissue] * (1.0 - np.exp(-tr / t1[tissue])) * np.exp(-te / t2[tissue])
    return s


def _geometry(img: np.ndarray, fov_scale: float, rotation_deg: float) -> np.ndarray:
    """Apply FOV zoom (fov_scale > 1 shows more space, object smaller) and rotation."""
    if fov_scale == 1.0 and rotation_deg == 0.0:
        return img
    th = math.radians(rotation_deg)
    rot = np.array([[math.cos(th), -math.sin(th)], [math.sin(th), math.cos(th)]])
    mat = fov_scale * rot  # output pixel -> input pixel, about the centre
    centre = (np.asarray(img.shape, dtype=np.float64) - 1.0) / 2.0
    offset = centre - mat @ centre
    return ndimage.affine_transform(img, mat, offset=offset, order=1, mode="constant", cval=0.0)


def _rician(signal: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    """Magnitude of complex Gaussian noise added to a real signal (MR magnitude noise)."""
    n_re = rng.normal(0.0, sigma, signal.shape)
    n_im = rng.normal(0.0, sigma, signal.shape)
    return np.sqrt((signal + n_re) ** 2 + n_im**2)


def phantom_pair(
    profile: ScannerProfile, slice_index: int, matrix: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """(T1w, T2w) float32 magnitude images of the same anatomy at one slice.

    Units: fully relaxed signal of M0 = 1 is 1.0, so ``noise_sigma`` is
    relative to the largest possible signal.  Noise is drawn from ``rng``
    (T1w first, then T2w), so a seeded generator reproduces the pair exactly.
    """
    z = _slice_z(profile, slice_index)
    m0, t1, t2 = _tissue_maps(int(matrix), round(z, 6), float(profile.field_strength_t))
    images = []
    for tr, te in (
        (profile.tr_t1w_ms, profile.te_t1w_ms),
        (profile.tr_t2w_ms, profile.te_t2w_ms),
    ):
        clean = _geometry(_spin_echo(m0, t1, t2, tr, te), profile.fov_scale, profile.rotation_deg)
        images.append(_rician(clean, profile.noise_sigma, rng).astype(np.float32))
    return images[0], images[1]


slice_z = _slice_z
tissue_maps = _tissue_maps
geometry = _geometry
