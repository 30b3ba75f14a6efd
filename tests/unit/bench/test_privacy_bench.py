"""``make bench-privacy`` at reduced size: it runs the three arms side by side, the DP arms spend
what they target (the hospital's accountant), and the last line carries the numbers."""

from __future__ import annotations

import json
from pathlib import Path

from bench.privacy import main


def test_privacy_bench_reduced(tmp_path: Path, capsys) -> None:
    out = tmp_path / "privacy.json"
    assert main(["--seeds", "1", "--members", "8", "--size", "32", "--width", "4",
                 "--latent", "8", "--steps", "3", "--batch", "4", "--generated", "8",
                 "--json", str(out)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-1].startswith("at eps=8: LOGAN AUC ") and "utility ratio to no DP" in lines[-1]
    result = json.loads(out.read_text())["summary"]
    assert set(result) == {"no DP", "eps=8", "eps=1"}
    for arm, target in (("eps=8", 8.0), ("eps=1", 1.0)):
        assert 0.8 * target < result[arm]["epsilon"] <= target * 1.001
    assert result["eps=1"]["sigma"] > result["eps=8"]["sigma"] > 0 == result["no DP"]["sigma"]
    for arm in result.values():
        assert 0 <= arm["logan_auc"] <= 1 and 0 <= arm["ganleaks_auc"] <= 1
    assert result["no DP"]["utility_ratio"] == 1.0
