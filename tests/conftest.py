"""Shared fixtures: tiny demo hospitals (phantom MR + real packaged DICOM) built once per session."""

from __future__ import annotations

import os
from pathlib import Path

# Under pytest-xdist (make test: 4 workers on 2 cores) one torch thread per process, the test
# worker's and every hospital process it starts: more threads than cores only thrash.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402

from fedsynth.demo_data import build_demo_hospitals
from tools import PREFIX


@pytest.fixture(scope="session")
def demo_hospitals(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Three hospital folders at matrix 32: ~30 DICOM files each, built in about a second."""
    return build_demo_hospitals(tmp_path_factory.mktemp("demo-data"), 3, matrix=32)


@pytest.fixture(scope="module")
def one_torch_thread():  # type: ignore[no-untyped-def]
    """One torch thread for a module's in-process training (``pytestmark = pytest.mark.
    usefixtures("one_torch_thread")``): the CI machine is small and shared."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):  # type: ignore[no-untyped-def]
    """Under ``CI=true`` a test skipped for a missing tool fails: CI must run every test."""
    outcome = yield
    report = outcome.get_result()
    if report.skipped and os.environ.get("CI") == "true" and PREFIX in str(report.longrepr):
        report.outcome = "failed"
        report.longrepr = f"CI=true but the test was skipped: {report.longrepr}"


# The longest files first among files of equal test count: under `-n 4 --dist loadfile` xdist
# orders files by their number of tests (a stable sort), so this order only breaks its ties.
# Order within a file is kept; files not named keep their collection order after these.
LONGEST_FIRST = ("test_deploy.py", "test_netns_link_cut.py", "test_wheel_install.py",
                 "test_process_lifecycle.py", "test_netns_power_loss.py", "test_netns_full_disk.py",
                 "test_deployed_families.py", "test_ua_gan_attack.py",
                 "test_prometheus_e2e.py", "test_stranger.py", "test_ray_cluster.py",
                 "test_hospital_trust.py", "test_simulation.py", "test_evaluate_cli.py")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda it: rank.get(it.path.name, len(rank)))
