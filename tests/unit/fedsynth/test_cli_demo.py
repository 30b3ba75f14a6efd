"""The demo command refuses unknown families and presets with one line, before building anything."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedsynth.cli import main


@pytest.mark.parametrize("flag, value", [("--family", "stylegan9"), ("--preset", "fedmagic")])
def test_unknown_choice_is_one_line_and_exit_2(flag: str, value: str, tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["demo", flag, value, "--data-dir", str(tmp_path / "data"),
                 "--run-dir", str(tmp_path / "runs")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and value in err[0] and "known:" in err[0]
    assert not (tmp_path / "data").exists()  # nothing written before the check
