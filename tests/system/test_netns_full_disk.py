"""Fault on the multi-host harness (bench/netns.py, fixture in tests/harness/netns_helpers.py).

A hospital whose disk fills mid-round (its cache on a tiny tmpfs) fails that round cleanly and
trains again once there is room.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from bench.localdeploy import metrics_rows, wait_for
from bench.netns import Federation
from tests.harness.netns_helpers import netns_federation, unavailable  # noqa: F401


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_full_disk_at_a_hospital_costs_its_cache_not_its_rounds(
        netns_federation: Federation, tmp_path: Path) -> None:
    """h3's cache folder on a 256 KiB tmpfs, filled to the last byte before the run: its slice
    cache and replay record cannot be written. It trains every round anyway (the cache is an
    optimisation; the replay record is also kept in memory), leaves no partial file behind, and
    once there is room again the next run writes its cache."""
    fed = netns_federation
    net = fed.harness
    mount = tmp_path / "h3-cache"
    mount.mkdir()
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k,mode=0700", "tmpfs",
                           str(mount)], capture_output=True, text=True)
    if made.returncode != 0:
        unavailable(f"cannot mount a tmpfs: {made.stderr.strip()}")
    try:
        filler = mount / "filler"
        fd = os.open(filler, os.O_WRONLY | os.O_CREAT)  # fill it to the last byte: ENOSPC at
        try:                                            # the first write the hospital makes
            while os.write(fd, b"\0" * 4096):
                pass
        except OSError:
            pass
        finally:
            os.close(fd)
        net.procs["h3"].stop()
        h3 = fed.harness.start("h3", "h3-tmpfs", ["hospital", str(fed.hospital_config(
            "h3", cache_dir=mount))])
        net.procs["h3"] = h3
        wait_for("h3 on its full disk connected", lambda: "SuperNode ID" in h3.text(), 300,
                 fed.procs())
        folder = fed.launch("full-disk", rounds=2, local_steps=10)
        wait_for("2 rounds", lambda: len(metrics_rows(folder)) >= 2, 300, fed.procs())
        rows = metrics_rows(folder)
        assert all(r["replied"] == 3 and not r["failed_hospitals"] for r in rows), rows
        assert "could not write slice cache" in h3.text()
        # nothing half-written: no partial cache entry, no temp file of the replay record
        files = sorted(str(p.relative_to(mount)) for p in mount.rglob("*") if not p.is_dir())
        assert files == ["filler"], files
        assert h3.popen.poll() is None

        filler.unlink()  # room again: the next run writes the cache
        folder = fed.launch("disk-room", rounds=1, local_steps=5)
        wait_for("1 round", lambda: len(metrics_rows(folder)) >= 1, 300, fed.procs())
        assert metrics_rows(folder)[0]["replied"] == 3
        assert list(mount.glob("*.json")), sorted(p.name for p in mount.iterdir())
    finally:
        # the file's only test: h3 (on the tmpfs, if it was started) just stops, so that the
        # tmpfs can be unmounted; the fixture then takes the harness down
        net.procs.pop("h3-tmpfs", None)
        net.procs["h3"].stop()
        subprocess.run(["umount", "-l", str(mount)], capture_output=True)
