"""A hospital's install: the built wheel, plain ``pip install`` into a clean virtualenv, no Makefile.

A cached wheel once hid a broken build step (pyradiomics' sdist needs its own build requirements),
and the Makefile used to add pyradiomics by hand, so a plain ``pip install`` left FRD failing at
the first evaluation. This test builds fedsynth's wheel from the checkout, installs it the way a
hospital's IT would, and runs the commands a hospital runs from outside the checkout (so nothing
is imported from the source tree), including FRD on a few real slices.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow


def _run(args: list[str], cwd: Path, timeout: float) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    out = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, f"{' '.join(map(str, args))} -> {out.returncode}\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out


FRD_SNIPPET = r"""
import json, sys
from pathlib import Path
import numpy as np, pydicom
import shared_models.quality as q
slices = []
for f in sorted(Path(sys.argv[1]).rglob("*.dcm")):
    ds = pydicom.dcmread(f)
    if "PixelData" not in ds or int(ds.get("SamplesPerPixel", 1)) != 1:
        continue
    a = ds.pixel_array.astype(np.float32)
    if a.ndim != 2 or a.max() <= a.min():
        continue
    slices.append((a - a.min()) / (a.max() - a.min()) * 2 - 1)
shape = min(s.shape for s in slices)
x = np.stack([s[:shape[0], :shape[1]] for s in slices])[:, None]
half = len(x) // 2
frd = q.frechet_radiomics_distance(q.radiomics_features(x[:half]), q.radiomics_features(x[half:]))
print(json.dumps({"module": q.__file__, "slices": len(x), "frd": frd}))
"""


def test_wheel_installs_into_clean_venv_and_runs_hospital_commands(
        tmp_path: Path, demo_hospitals: list[Path]) -> None:
    dist = tmp_path / "dist"
    # The tracked files copied out first: pip builds in-tree, and setuptools' build/ folder in the
    # checkout would both be written by this test and leak stale modules into the wheel.
    src = tmp_path / "src"
    files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True,
                           check=True).stdout.decode().split("\0")
    for name in filter(None, files):
        if (ROOT / name).is_file():
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, src / name)
    # pip's isolated build, as `pip wheel .` or a release build would make it
    _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(dist), str(src)],
         tmp_path, 600)
    wheels = list(dist.glob("fedsynth-*.whl"))
    assert len(wheels) == 1, wheels
    env_dir = tmp_path / "clean-venv"
    venv.EnvBuilder(with_pip=True, clear=True).create(env_dir)
    bin_dir = env_dir / "bin"
    # Plain pip, nothing before it: every dependency, pyradiomics' sdist build included, comes
    # from the wheel's own metadata (torch resolves to the CPU build where pip is pointed at it).
    # --no-compile: pip's byte-compiling of every installed module (torch, scipy, MONAI: tens of
    # seconds of CPU on 2 busy cores) is a cache Python rebuilds at first import, and pip logs
    # rather than fails its errors; it can hide no install step, the commands below still import.
    _run([str(bin_dir / "pip"), "install", "-q", "--no-compile", str(wheels[0])], tmp_path, 1500)

    work = tmp_path / "elsewhere"  # not the checkout: nothing imports from the source tree
    work.mkdir()
    out = _run([str(bin_dir / "fedsynth"), "--help"], work, 120).stdout
    assert "hospital" in out and "launch" in out
    out = _run([str(bin_dir / "fedsynth"), "hospital", "--help"], work, 120).stdout
    assert "--coordinator" in out and "--node-key" in out
    out = _run([str(bin_dir / "fedsynth"), "data", "scan", str(demo_hospitals[0])], work, 300)
    assert "usable" in (out.stdout + out.stderr).lower(), out.stdout
    snippet = work / "frd.py"
    snippet.write_text(FRD_SNIPPET)
    got = json.loads(_run([str(bin_dir / "python"), str(snippet), str(demo_hospitals[0])],
                          work, 300).stdout.strip().splitlines()[-1])
    assert Path(got["module"]).resolve().is_relative_to(env_dir.resolve()), got  # the wheel's
    assert got["slices"] >= 4, got
    assert got["frd"] == got["frd"] and 0 <= got["frd"] < float("inf"), got  # finite, not NaN
