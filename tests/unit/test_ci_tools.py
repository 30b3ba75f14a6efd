"""#16: a fresh machine runs every test. ``make test`` installs the Debian tools (root with apt) or
names what is missing in one line; under CI=true a test skipped for a missing tool is a failure."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

SKIPPING = '''
from tools import needs, skip_unless

@needs("no-such-tool-fedsynth", "no-such-package")
def test_marked():
    pass

def test_called():
    skip_unless("no-such-tool-fedsynth", "no-such-package")

def test_other_skip():
    import pytest
    pytest.skip("not a tool: stays a skip")
'''


def _pytest(folder: Path, ci: str | None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    if ci is not None:
        env["CI"] = ci
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           "--rootdir", str(folder), str(folder)], cwd=folder, env=env,
                          capture_output=True, text=True, timeout=120)


def test_a_skip_for_a_missing_tool_fails_under_ci(tmp_path: Path) -> None:
    for name in ("conftest.py", "tools.py"):
        shutil.copy(ROOT / "tests" / name, tmp_path / name)
    (tmp_path / "test_skipping.py").write_text(SKIPPING)

    local = _pytest(tmp_path, None)
    assert local.returncode == 0, local.stdout
    assert "3 skipped" in local.stdout

    ci = _pytest(tmp_path, "true")
    assert ci.returncode == 1, ci.stdout
    # a marker's skip happens at set-up, so it reports as an error; both fail the run
    assert "1 failed, 1 skipped, 1 error" in ci.stdout, ci.stdout
    assert "apt-get install no-such-package" in ci.stdout


def test_make_names_missing_tools_in_one_line_when_it_cannot_install() -> None:
    """Not root: nothing is installed, one line names the package and the command."""
    folder = Path(tempfile.mkdtemp(prefix="fedsynth-make-"))  # pytest's tmp is root-only
    folder.chmod(0o755)
    makefile = folder / "Makefile"
    shutil.copy(ROOT / "Makefile", makefile)
    makefile.chmod(0o644)
    cmd = ["make", "-s", "-f", str(makefile), "tools",
           "TOOLS=sh:coreutils no-such-tool-fedsynth:no-such-package"]
    if os.geteuid() == 0:
        cmd = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", *cmd]
    try:
        proc = subprocess.run(cmd, cwd="/", capture_output=True, text=True, timeout=60)
    finally:
        shutil.rmtree(folder)
    assert proc.returncode != 0
    lines = [line for line in (proc.stdout + proc.stderr).splitlines() if "no-such" in line]
    assert len(lines) == 1, proc.stdout + proc.stderr
    assert "missing Debian packages: no-such-package" in lines[0]
    assert "apt-get install no-such-package" in lines[0]
    assert "coreutils" not in lines[0]


def test_every_tool_the_tests_need_is_in_the_makefile_and_ci() -> None:
    makefile = (ROOT / "Makefile").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    for package in ("dcmtk", "dicom3tools", "prometheus", "chromium", "nginx", "iproute2",
                    "systemd"):
        assert f":{package}" in makefile, package
        assert package in ci, package
