"""Bad launch files through the real CLI: one line naming the problem, exit 2, no traceback
(issue 24 item 6)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.harness.deploy_helpers import run


def _launch_file(tmp_path: Path, coordinator: str, run_lines: str) -> Path:
    (tmp_path / "model-signing.key").write_text("not used: the file is refused before\n")
    path = tmp_path / "run.toml"
    path.write_text(f'[coordinator]\naddress = "127.0.0.1:9"\n{coordinator}\n\n[run]\n'
                    f'signing-key = "model-signing.key"\n{run_lines}\n')
    return path


def _one_line_error(done, command: str) -> str:  # noqa: ANN001
    assert done.returncode == 2, done.stdout + done.stderr
    assert "Traceback" not in done.stderr + done.stdout
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith(f"fedsynth {command}: error: ")
    return lines[0]


@pytest.mark.parametrize("command", ["launch", "status"])
def test_missing_root_certificates_is_one_line_naming_the_file(tmp_path: Path,
                                                              command: str) -> None:
    path = _launch_file(tmp_path, 'root-certificates = "nowhere/ca.pem"', "num-server-rounds = 1")
    line = _one_line_error(run([command, str(path), "--flwr-home", str(tmp_path / "flwr")],
                               tmp_path), command)
    assert str(tmp_path / "nowhere" / "ca.pem") in line and "does not exist" in line


def test_rounds_is_refused_naming_num_server_rounds(tmp_path: Path) -> None:
    path = _launch_file(tmp_path, "insecure = true", "rounds = 3")
    line = _one_line_error(run(["launch", str(path)], tmp_path), "launch")
    assert line.endswith("unknown run setting 'rounds': did you mean 'num-server-rounds'?")
    help_text = run(["launch", "--help"], tmp_path).stdout
    keys = [x.split()[0] for x in help_text.splitlines() if " = " in x]
    assert "num-server-rounds" in keys and "rounds" not in keys


def test_a_typo_gets_one_suggestion_and_nonsense_the_list(tmp_path: Path) -> None:
    path = _launch_file(tmp_path, "insecure = true", "local-stpes = 3")
    line = _one_line_error(run(["launch", str(path)], tmp_path), "launch")
    assert line.endswith("unknown run setting 'local-stpes': did you mean 'local-steps'?")
    assert "known:" not in line
    path = _launch_file(tmp_path, "insecure = true", "zzqq = 3")
    line = _one_line_error(run(["launch", str(path)], tmp_path), "launch")
    assert "'zzqq'; known: family, " in line
