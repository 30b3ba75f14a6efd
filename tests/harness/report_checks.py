"""What every family's report must show: charts with finite values, a score among them, and no
panel for a measure that came out empty ("the report shows a score for every family")."""

from __future__ import annotations

import re
from pathlib import Path

from server.report import build_report

# Charts that score the model on the hospitals' held-out data (not losses, timings, throughput).
SCORE_TITLES = ("Fréchet", "MMD", "Precision", "SSIM", "PSNR", "MAE", "reconstruction error",
                "Intended-class")


def chart_titles(page: str) -> list[str]:
    """Title of each chart of the page that has at least one drawn point."""
    out = []
    for svg in re.findall(r'<svg class="chart".*?</svg>', page, flags=re.S):
        title = re.search(r"<title>([^<]*)</title>", svg).group(1)
        assert "no finite values" not in svg, f"panel {title!r} has no finite values"
        if "<circle" in svg:
            out.append(title)
    return out


def assert_report_scores(folder: Path) -> list[str]:
    """The report of run folder ``folder``: every panel drawn, at least one score; its titles."""
    page = build_report(folder)
    assert "no finite values" not in page
    titles = chart_titles(page)
    scores = [t for t in titles if any(s in t for s in SCORE_TITLES)]
    assert scores, f"no score panel with finite values among {titles}"
    return titles
