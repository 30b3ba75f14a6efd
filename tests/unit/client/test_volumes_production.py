"""The hospital's 3D path (issue 12): volumes keep their physical proportions.

Series are written with pydicom here: a sphere (radius 15 mm) scanned at 1 x 1 mm pixels and
3 mm slices (12 slices, 36 mm). Interpolating the 12 slices to the cube (the old path) stretches
the sphere 1.8x along the slice axis; the spacing-aware assembly keeps it round.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from client import cache, volumes
from client.cache import GEOMETRY_KEYS, load_slices
from client.datasets import Selector, build_tensors, clear_local_data, local_data, stack, units
from client.dicom import DicomSettings
from client.settings import HospitalSettings
from shared_models import DataConfig, ModelConfig

MR = "1.2.840.10008.5.1.4.1.1.4"
SIZE = 16
AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
SAGITTAL = (0.0, 1.0, 0.0, 0.0, 0.0, -1.0)


def _write_series(folder: Path, *, study: str, description: str, protocol: str = "",
                  slices: int = 12, dz: float = 3.0, pixel: float = 1.0, matrix: int = 64,
                  radius: float | tuple[float, float, float] = 15.0, centre: tuple[float, float, float] = (0.0, 0.0, 0.0),
                  orientation: tuple[float, ...] = AXIAL, bright: bool = True,
                  shuffle: bool = True) -> None:
    """One series of a ball (``radius`` mm, or radii along LPS x, y, z, around ``centre``)."""
    folder.mkdir(parents=True, exist_ok=True)
    row_dir, col_dir = np.array(orientation[:3]), np.array(orientation[3:])
    normal = np.cross(row_dir, col_dir)
    series = generate_uid()
    half = (matrix - 1) / 2 * pixel
    offsets = (np.arange(slices) - (slices - 1) / 2) * dz
    idx = np.arange(matrix) * pixel
    order = np.random.default_rng(0).permutation(slices) if shuffle else np.arange(slices)
    for n, k in enumerate(order):  # files in shuffled order: the positions must sort them
        origin = -half * row_dir - half * col_dir + offsets[k] * normal  # centre of pixel (0, 0)
        pts = (origin[None, None] + idx[:, None, None] * col_dir[None, None]
               + idx[None, :, None] * row_dir[None, None])  # (rows, cols, 3)
        inside = np.linalg.norm((pts - np.asarray(centre)) / np.asarray(radius), axis=-1) <= 1.0
        pixels = np.where(inside, 3000, 200) if bright else np.where(inside, 1500, 700)
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = MR
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = MR, meta.MediaStorageSOPInstanceUID
        ds.Modality = "MR"
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.SeriesDescription, ds.ProtocolName = description, protocol
        ds.ImageOrientationPatient = [f"{v:g}" for v in orientation]
        ds.ImagePositionPatient = [f"{v:.4f}" for v in origin]
        ds.PixelSpacing = [f"{pixel:g}", f"{pixel:g}"]
        ds.SliceThickness = f"{dz:g}"
        ds.InstanceNumber = n + 1
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.Rows = ds.Columns = matrix
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.PixelData = np.ascontiguousarray(pixels, dtype="<u2").tobytes()
        ds.save_as(folder / f"{n:03d}.dcm", enforce_file_format=True)


def _moments(cube: torch.Tensor | np.ndarray) -> np.ndarray:
    """Standard deviation (voxels) of the foreground along each axis of a (D, H, W) cube."""
    v = np.asarray(cube, dtype=np.float64)
    w = v > 0.0
    coords = np.stack(np.nonzero(w), axis=1).astype(np.float64)
    assert len(coords) > 20, "no foreground"
    return coords.std(axis=0)


def _ratio(cube: torch.Tensor | np.ndarray) -> float:
    """Extent along the slice axis / in-plane extent: 1 for a ball shown round."""
    s = _moments(cube)
    return float(s[0] / np.mean(s[1:]))


@pytest.fixture(scope="module")
def sphere_hospital(tmp_path_factory: pytest.TempPathFactory) -> HospitalSettings:
    root = tmp_path_factory.mktemp("spheres")
    data = root / "data"
    # two studies: each a T1w and a T2w series of the same ball; the second study's T2w has
    # 2 mm slices (18 of them, the same 36 mm) and its ball sits off centre
    for s, (centre, radius) in enumerate([((0.0, 0.0, 0.0), 15.0), ((-12.0, 8.0, 6.0), 10.0)]):
        study = generate_uid()
        _write_series(data / f"s{s}" / "t1", study=study, description="AX T1w SE",
                      protocol=f"site_t1_{s}", centre=centre, radius=radius)
        _write_series(data / f"s{s}" / "t2", study=study, description="AX T2w TSE",
                      protocol=f"site_t2_{s}", centre=centre, radius=radius, bright=False,
                      **({"slices": 18, "dz": 2.0} if s == 1 else {}))
    return HospitalSettings(data_dir=data, cache_dir=root / "cache", holdout_every=0)


def _slices(hospital: HospitalSettings):
    return load_slices(hospital.data_dir, DicomSettings(image_size=SIZE), hospital.cache_dir)


def test_cache_keeps_slice_geometry(sphere_hospital: HospitalSettings,
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    built = _slices(sphere_hospital)
    monkeypatch.setattr(cache, "slice_geometry", None)  # a hit must not read the files again
    hit = _slices(sphere_hospital)
    for meta in (built.meta, hit.meta):
        assert set(GEOMETRY_KEYS) <= set(meta)
        # 64 px at 1 mm cached as 16 px: 4 mm per cached pixel
        np.testing.assert_allclose(meta["pixel_spacing"], 4.0)
        np.testing.assert_allclose(meta["orientation"], np.broadcast_to(AXIAL, (len(meta["orientation"]), 6)))
    assert cache.CACHE_FORMAT >= 4


def test_anisotropic_ball_stays_round(sphere_hospital: HospitalSettings) -> None:
    slices = _slices(sphere_hospital)
    meta, images = slices.meta, np.asarray(slices.images)
    images = images[:, None] if images.ndim == 3 else images
    (group,) = units(meta, np.flatnonzero(meta["protocol_name"] == "site_t1_0"), 3).values()
    assert len(group) == 12
    new = stack(images, [group], 3, SIZE, meta)[0, 0]
    old = stack(images, [group], 3, SIZE)[0, 0]  # no geometry: the old interpolate-to-cube
    assert new.shape == old.shape == (SIZE,) * 3
    r_new, r_old = _ratio(new), _ratio(old)
    print(f"ball extent ratio (slice axis / in-plane): spacing-aware {r_new:.3f}, "
          f"interpolated to the cube {r_old:.3f}")
    assert abs(r_new - 1.0) < 0.12
    assert r_old > 1.5  # the old path stretches 36 mm of slices over the 64 mm cube
    # the 64 mm field of view spans the cube: isotropic 4 mm voxels, 36 mm of slices = 9 voxels
    rows_with_data = np.flatnonzero((new > -0.99).any(dim=(1, 2)).numpy())
    assert 8 <= len(rows_with_data) <= 10
    # ball diameter 30 mm / 4 mm = 7.5 voxels on every axis
    for axis in range(3):
        extent = int(((new > 0).sum(dim=tuple(a for a in range(3) if a != axis)) > 0).sum())
        assert 6 <= extent <= 9, (axis, extent)


def test_pix2pix_3d_pairs_pair_at_one_scale(sphere_hospital: HospitalSettings) -> None:
    """Pairs are the A and B series of one study, aligned although B's slices are 2 mm."""
    clear_local_data()
    data = local_data(sphere_hospital, ModelConfig(family="pix2pix", image_size=SIZE,
                                                   spatial_dims=3))
    a, b = data.train["a"], data.train["b"]
    assert a.shape == b.shape == (2, 1, SIZE, SIZE, SIZE)
    # A and B (other values, study 1: other slice spacing): same ball, same place, same scale
    masks_a, masks_b = a[:, 0] > 0, b[:, 0] > 0
    for i in range(2):
        dice = 2 * (masks_a[i] & masks_b[i]).sum() / (masks_a[i].sum() + masks_b[i].sum())
        other = 2 * (masks_a[i] & masks_b[1 - i]).sum() / (masks_a[i].sum() + masks_b[1 - i].sum())
        assert dice > 0.8 and dice > other + 0.2, (i, float(dice), float(other))
        # study 1's ball is 5 voxels across: a voxel of partial volume moves its ratio ~0.15
        tol = 0.12 if i == 0 else 0.25
        print(f"pair {i}: ratio A {_ratio(a[i, 0]):.3f} B {_ratio(b[i, 0]):.3f} dice {dice:.3f}")
        assert abs(_ratio(a[i, 0]) - 1.0) < tol and abs(_ratio(b[i, 0]) - 1.0) < tol


def test_domain_and_class_selection_in_3d(sphere_hospital: HospitalSettings) -> None:
    slices = _slices(sphere_hospital)
    images = np.asarray(slices.images)
    images = images[:, None] if images.ndim == 3 else images
    # domains by the run's DataConfig on another attribute, with regexes
    cfg = DataConfig(domain_attribute="protocol_name", domain_a="T1", domain_b="T2",
                     domain_a_pattern="^site_t1", domain_b_pattern="^site_t2")
    clear_local_data()
    data = local_data(sphere_hospital, ModelConfig(family="pix2pix", image_size=SIZE,
                                                   spatial_dims=3), cfg)
    assert data.train["a"].shape == data.train["b"].shape == (2, 1, SIZE, SIZE, SIZE)
    assert (data.train["a"][:, 0].amax(dim=(1, 2, 3)) > 0.5).all()
    # classes (labelled layout) per volume
    sel = Selector("series_description", ("T1w", "T2w"), ("T1w", "T2w"))
    train, _ = build_tensors(images, slices.meta, "labelled",
                             ModelConfig(family="cdcgan", image_size=SIZE, num_classes=2,
                                         spatial_dims=3), 0, sel)
    assert train["image"].shape == (4, 1, SIZE, SIZE, SIZE)
    assert sorted(train["label"].tolist()) == [0, 0, 1, 1]
    # an unconditional 3D family takes every series
    train, _ = build_tensors(images, slices.meta, "image",
                             ModelConfig(family="dcgan", image_size=SIZE, spatial_dims=3), 0)
    assert train["image"].shape == (4, 1, SIZE, SIZE, SIZE)


def test_series_without_volume_geometry_is_left_out(tmp_path: Path,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    study = generate_uid()
    _write_series(tmp_path / "d" / "ok", study=study, description="T1w")
    _write_series(tmp_path / "d" / "gap", study=generate_uid(), description="T1w", shuffle=False)
    (tmp_path / "d" / "gap" / "005.dcm").unlink()  # a missing slice (the 6th of 12): uneven
    hospital = HospitalSettings(data_dir=tmp_path / "d", cache_dir=tmp_path / "c",
                                holdout_every=0)
    clear_local_data()
    with caplog.at_level(logging.WARNING, logger="client.datasets"):
        data = local_data(hospital, ModelConfig(family="dcgan", image_size=SIZE, spatial_dims=3))
    assert data.train["image"].shape == (1, 1, SIZE, SIZE, SIZE)
    assert "inconsistent-geometry" in caplog.text


def test_sagittal_series_lands_in_the_axial_frame(tmp_path: Path) -> None:
    # an ellipsoid long along the patient's head-foot axis, scanned axially and sagitally
    # (sagittal: 3 mm slices along x); both cubes must show it long along axis 0 (S)
    def ellipsoid(folder: Path, orientation: tuple[float, ...]) -> torch.Tensor:
        _write_series(folder, study=generate_uid(), description="T1w", orientation=orientation,
                      slices=20, dz=3.0, radius=(10.0, 14.0, 24.0))
        s = load_slices(folder, DicomSettings(image_size=SIZE), tmp_path / "c")
        imgs = np.asarray(s.images)
        imgs = imgs[:, None] if imgs.ndim == 3 else imgs
        (group,) = units(s.meta, np.arange(len(imgs)), 3).values()
        return stack(imgs, [group], 3, SIZE, s.meta)[0, 0]

    axial, sagittal = ellipsoid(tmp_path / "ax", AXIAL), ellipsoid(tmp_path / "sag", SAGITTAL)
    for cube in (axial, sagittal):  # std along (S, P, L) ~ radii 24 : 14 : 10
        s = _moments(cube)
        np.testing.assert_allclose(s / s[0], [1.0, 14 / 24, 10 / 24], atol=0.08)
    # canonical axes: unit test on an index volume
    vol = np.arange(2 * 3 * 4, dtype=np.float32).reshape(2, 3, 4)
    out, spacing = volumes.to_canonical(vol, (3.0, 1.0, 2.0), SAGITTAL)
    # sagittal: slices along -x (R), rows along -z (I), columns along +y (P)
    assert out.shape == (3, 4, 2) and spacing == (1.0, 2.0, 3.0)
    np.testing.assert_array_equal(out, np.flip(np.transpose(vol, (1, 2, 0)), axis=(0, 2)))
    same, sp = volumes.to_canonical(vol, (3.0, 1.0, 2.0), AXIAL)
    assert same is vol or np.array_equal(same, vol)
    assert sp == (3.0, 1.0, 2.0)


def test_2d_path_unchanged_by_geometry(sphere_hospital: HospitalSettings) -> None:
    slices = _slices(sphere_hospital)
    images = np.asarray(slices.images)
    images = images[:, None] if images.ndim == 3 else images
    bare = {k: v for k, v in slices.meta.items() if k not in GEOMETRY_KEYS}
    model = ModelConfig(family="dcgan", image_size=SIZE)
    with_geo, _ = build_tensors(images, slices.meta, "image", model, 4)
    without, _ = build_tensors(images, bare, "image", model, 4)
    assert torch.equal(with_geo["image"], without["image"])
    assert with_geo["image"].shape == (len(images) - len(images[::4]), 1, SIZE, SIZE)


def test_pydicom_files_decode(sphere_hospital: HospitalSettings) -> None:
    f = sorted(Path(sphere_hospital.data_dir).rglob("*.dcm"))[0]
    assert pydicom.dcmread(f).pixel_array.shape == (64, 64)
