"""Family tensors from a hospital's slices: pairs by study + position, labels, unpaired domains."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("phantominator")

from client.datasets import (  # noqa: E402
    DataSelectionError, Selector, build_tensors, domain_selector, local_data)
from client.cache import load_slices  # noqa: E402
from client.dicom import DicomSettings  # noqa: E402
from client.settings import HospitalSettings  # noqa: E402
from fedsynth.demo_data import build_demo_hospitals  # noqa: E402
from shared_models import ModelConfig  # noqa: E402


@pytest.fixture(scope="module")
def hospital(tmp_path_factory: pytest.TempPathFactory) -> HospitalSettings:
    root = tmp_path_factory.mktemp("demo")
    path = build_demo_hospitals(root / "data", 1, seed=0, matrix=32, include_real=False)[0]
    return HospitalSettings(data_dir=path, cache_dir=root / "cache", holdout_every=4)


def test_pix2pix_pairs_are_the_same_slice_in_both_contrasts(hospital: HospitalSettings) -> None:
    data = local_data(hospital, ModelConfig(family="pix2pix", image_size=32))
    a, b = data.train["a"], data.train["b"]
    assert a.shape == b.shape and a.shape[1:] == (1, 32, 32) and len(a) >= 8
    assert len(data.holdout["a"]) >= 2  # every 4th pair held out, never trained on
    # which slices were paired: build again from images that hold their own row number
    slices = load_slices(hospital.data_dir, DicomSettings(image_size=32), hospital.cache_dir)
    meta = slices.meta
    rows = np.broadcast_to(np.arange(len(meta["position"]), dtype=np.float32)[:, None, None, None],
                           (len(meta["position"]), 1, 2, 2))
    sel = domain_selector(hospital, ModelConfig(family="pix2pix"))
    train, hold = build_tensors(rows, meta, "paired", ModelConfig(family="pix2pix"), 4, sel)
    ra = torch.cat([train["a"], hold["a"]])[:, 0, 0, 0].long().numpy()
    rb = torch.cat([train["b"], hold["b"]])[:, 0, 0, 0].long().numpy()
    assert len(ra) == len(set(ra)) == len(a) + len(data.holdout["a"])
    assert all("T1w" in d for d in meta["series_description"][ra])
    assert all("T2w" in d for d in meta["series_description"][rb])
    np.testing.assert_allclose(meta["position"][ra], meta["position"][rb], atol=0.01)
    assert (meta["study_uid"][ra] == meta["study_uid"][rb]).all()
    assert len(np.unique(meta["position"][ra])) == len(ra)


def test_cyclegan_domains_unpaired_with_paired_holdout(hospital: HospitalSettings) -> None:
    data = local_data(hospital, ModelConfig(family="cyclegan", image_size=32))
    n_pairs = len(local_data(hospital, ModelConfig(family="pix2pix", image_size=32)).train["a"])
    assert len(data.train["a"]) == len(data.train["b"]) == n_pairs
    assert len(data.holdout["a"]) == len(data.holdout["b"]) >= 2


def test_cdcgan_labels_follow_series_description(hospital: HospitalSettings) -> None:
    data = local_data(hospital, ModelConfig(family="cdcgan", image_size=32, num_classes=2))
    labels = torch.cat([data.train["label"], data.holdout["label"]])
    assert labels.dtype == torch.int64 and set(labels.tolist()) == {0, 1}
    assert (labels == 0).sum() == (labels == 1).sum()  # one T1w and one T2w series, same length
    with pytest.raises(DataSelectionError, match="num_classes is 3"):
        local_data(hospital, ModelConfig(family="cdcgan", image_size=32, num_classes=3))


def test_3d_pix2pix_pairs_volumes(hospital: HospitalSettings) -> None:
    data = local_data(hospital, ModelConfig(family="pix2pix", image_size=16, spatial_dims=3))
    assert data.train["a"].shape == (1, 1, 16, 16, 16) == data.train["b"].shape


def _meta(desc: list[str], pos: list[float], study: str = "s1") -> dict[str, np.ndarray]:
    n = len(desc)
    return {"modality": np.array(["MR"] * n), "series_description": np.array(desc),
            "study_uid": np.array([study] * n), "series_uid": np.array(desc),
            "position": np.array(pos, dtype=np.float64), "file_index": np.arange(n)}


def test_hospital_with_one_domain_gets_an_empty_b() -> None:
    images = np.random.default_rng(0).uniform(-1, 1, (5, 1, 16, 16)).astype(np.float32)
    meta = _meta(["T1w"] * 5, [0, 1, 2, 3, 4])
    sel = Selector("series_description", ("T1w", "T2w"), ("T1w", "T2w"))
    cfg = ModelConfig(family="cyclegan", image_size=16)
    train, hold = build_tensors(images, meta, "unpaired", cfg, 10, sel)
    assert train["a"].shape == (5, 1, 16, 16) and train["b"].shape == (0, 1, 16, 16)
    assert len(hold["a"]) == 0
    with pytest.raises(DataSelectionError, match="no T1w/T2w pairs"):
        build_tensors(images, meta, "paired", cfg, 10, sel)


def test_pairs_need_the_same_position_and_study() -> None:
    rng = np.random.default_rng(0)
    images = rng.uniform(-1, 1, (6, 1, 16, 16)).astype(np.float32)
    meta = _meta(["T1w", "T1w", "T1w", "T2w", "T2w", "T2w"], [0, 5, 10, 10, 0, 7.5])
    sel = Selector("series_description", ("T1w", "T2w"), ("T1w", "T2w"))
    train, _ = build_tensors(images, meta, "paired", ModelConfig(family="pix2pix", image_size=16),
                             10, sel)
    # pairs (pos 0: rows 0-4) and (pos 10: rows 2-3); pos 5 and 7.5 have no partner
    assert torch.equal(train["a"], torch.from_numpy(images[[0, 2]]))
    assert torch.equal(train["b"], torch.from_numpy(images[[4, 3]]))


def test_local_patterns_map_site_names_to_federation_classes() -> None:
    site = HospitalSettings.from_mapping({"data-dir": ".",
                                          "label-patterns": "T1w=mprage|t1;T2w=t2_tse"})
    sel = domain_selector(site, ModelConfig(family="pix2pix"))
    meta = _meta(["MPRAGE sag", "t2_tse ax", "FLAIR"], [0, 0, 0])
    assert sel.classify(meta).tolist() == [0, 1, -1]

