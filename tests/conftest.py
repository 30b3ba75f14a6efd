"""Shared fixtures: tiny demo hospitals (phantom MR + real packaged DICOM) built once per session."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedsynth.demo_data import build_demo_hospitals


@pytest.fixture(scope="session")
def demo_hospitals(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Three hospital folders at matrix 32: ~30 DICOM files each, built in about a second."""
    return build_demo_hospitals(tmp_path_factory.mktemp("demo-data"), 3, matrix=32)
