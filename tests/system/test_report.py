"""``fedsynth report``: the page is self-contained and renders in a real browser.

Headless Chromium (Debian's ``chromium``) opens report.html from disk with the network off; the
page's own script marks ``<body data-render="ok">`` only when every image decoded and no script
error happened. A screenshot is kept in the test's tmp dir and copied to
``runs/test-artifacts/report-<name>.png``.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from fedsynth.cli import main as cli_main
from server.report import ReportError, build_report, line_chart
from server.run_folder import RunFolder
from tools import missing_tool

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / "runs" / "test-artifacts"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--hide-scrollbars", "--virtual-time-budget=5000")


def render_in_chromium(page: Path, tmp: Path, name: str) -> str:
    """DOM after load (asserted rendered), and a screenshot kept under tmp and ARTIFACTS."""
    if CHROMIUM is None:
        pytest.skip(missing_tool("chromium", "chromium"))
    profile = tmp / "chromium-profile"
    base = [CHROMIUM, *FLAGS, f"--user-data-dir={profile}"]
    url = page.resolve().as_uri()
    dom = subprocess.run([*base, "--dump-dom", url], capture_output=True, text=True,
                         timeout=60).stdout
    body = re.search(r"<body[^>]*>", dom)
    assert body, f"no DOM from chromium: {dom[:500]}"
    assert 'data-render="ok"' in body.group(0), f"page did not render cleanly: {body.group(0)}"
    shot = tmp / f"report-{name}.png"
    subprocess.run([*base, f"--screenshot={shot}", "--window-size=1280,2200", url],
                   capture_output=True, timeout=60)
    assert shot.is_file() and shot.stat().st_size > 10_000, "no screenshot"
    from PIL import Image

    pixels = np.asarray(Image.open(shot).convert("L"), dtype=np.float64)
    assert pixels.std() > 10, "screenshot is blank"
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shutil.copy(shot, ARTIFACTS / shot.name)
    return dom


@pytest.fixture()
def run_folder(tmp_path: Path) -> Path:
    """A run folder as run_federation writes it: 4 rounds, one NaN loss, a hospital dropping out."""
    folder = RunFolder(tmp_path / "runs" / "r1")
    folder.write_config({"run_id": "r1", "model": {"family": "dcgan", "image_size": 32},
                         "preset": "fedgan", "rounds": 4})
    rng = np.random.default_rng(0)
    for rnd in range(0, 5):
        folder.save_samples(rnd, rng.uniform(-1, 1, (16, 1, 32, 32)).astype(np.float32))
    (folder.root / "node-names").mkdir()
    (folder.root / "node-names" / "111.name").write_text("hospital-1")
    for rnd in range(1, 5):
        hospitals = {"111": {"images-per-second": 100.0 + rnd}}
        if rnd < 3:
            hospitals["222"] = {"images-per-second": 50.0}
        folder.append_metrics({
            "round": rnd, "seconds": 2.0 + rnd, "selected": 2, "replied": len(hospitals),
            "failed": 2 - len(hospitals), "rejected": 0, "hospitals": hospitals,
            "train": {"loss-g": float("nan") if rnd == 2 else 1.0 + rnd, "loss-d": 0.7 / rnd,
                      "d-real": 0.6, "d-fake": 0.4},
            "evaluate": {"eval-frechet": 10.0 / rnd, "eval-mmd": 0.1 / rnd, "eval-frd": 5.0 / rnd,
                         "eval-precision": 0.5, "eval-recall": 0.2 * rnd,
                         "eval-density": 0.6, "eval-coverage": 0.1 * rnd},
            "server": {"sample-diversity": 0.5},
        })
    return folder.root


def test_report_holds_curves_table_and_every_grid(run_folder: Path) -> None:
    page = build_report(run_folder)
    assert page.count('<svg class="chart"') == 9
    assert "Fréchet Radiomics Distance" in page and "coverage" in page
    assert page.count("data:image/png;base64,") == 5
    assert "hospital-1" in page and "node …222" in page  # unnamed node shown by a short id
    assert 'class="miss"' in page  # hospital 222 missing from rounds 3 and 4
    no_ns = page.replace('xmlns="http://www.w3.org/2000/svg"', "")
    assert "http://" not in no_ns and "https://" not in no_ns  # nothing fetched from a network
    assert str(run_folder) not in page  # no local path in a page that may be shared


def test_chart_leaves_gaps_for_nan_and_scales_to_the_data() -> None:
    svg = line_chart("t", {"a": [(1, 1.0), (2, math.nan), (3, 3.0), (4, 4.0)]})
    assert svg.count("<polyline") == 1  # 1 | gap | 3-4
    assert svg.count("<circle") == 3
    assert ">4<" in svg and ">1<" in svg  # y axis spans the data
    assert "no finite values" in line_chart("t", {"a": [(1, math.nan)]})


def test_cli_writes_report_and_names_a_bad_folder(run_folder: Path, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["report", str(run_folder)]) == 0
    assert (run_folder / "report.html").is_file()
    assert cli_main(["report", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert "no metrics.jsonl" in err and len(err.strip().splitlines()) == 1
    with pytest.raises(ReportError):
        build_report(tmp_path)


@pytest.mark.slow
def test_report_renders_in_headless_chromium(run_folder: Path, tmp_path: Path) -> None:
    assert cli_main(["report", str(run_folder)]) == 0
    dom = render_in_chromium(run_folder / "report.html", tmp_path, "synthetic")
    assert 'data-images="5"' in dom and 'data-charts="9"' in dom


@pytest.mark.slow
def test_broken_image_is_caught(run_folder: Path, tmp_path: Path) -> None:
    """The check can fail: a corrupt PNG makes the page report broken images."""
    (run_folder / "samples" / "round-003.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    page = run_folder / "report.html"
    page.write_text(build_report(run_folder))
    with pytest.raises(AssertionError, match="broken-images"):
        render_in_chromium(page, tmp_path, "broken")


@pytest.fixture(scope="module")
def two_hospitals(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    from fedsynth.demo_data import build_demo_hospitals

    root = tmp_path_factory.mktemp("families")
    return build_demo_hospitals(root, 2, matrix=32, include_real=False)


@pytest.mark.slow
@pytest.mark.parametrize("family,size", [("cdcgan", 16), ("wgan-gp", 16), ("cyclegan", 16)])
def test_the_report_of_each_family_shows_a_score(two_hospitals: list[Path], tmp_path: Path,
                                                 family: str, size: int) -> None:
    """One round of the family in-process (the families whose other tests run no federation;
    dcgan: test_small_data, pix2pix: test_inprocess, maskgan and aae: test_maskgan). CycleGAN's
    second hospital holds one domain (its T2w pattern matches nothing): it evaluates nothing,
    and the pairs of the first must still score (a NaN at weight 0 made the mean NaN)."""
    from fedsynth.inprocess import run_inprocess
    from server.federation import FederationConfig
    from shared_models import ModelConfig, TrainConfig

    from tests.harness.report_checks import assert_report_scores

    hospitals = [{"data-dir": str(f), "cache-dir": str(tmp_path / "cache" / f.name),
                  "device": "cpu", "holdout-every": 4} for f in two_hospitals]
    if family == "cyclegan":
        hospitals[1]["label-patterns"] = "T1w=T1w;T2w=^no-such-series$"
    cfg = FederationConfig(model=ModelConfig(family=family, image_size=size, width=4,
                                             latent_dim=8),
                           train=TrainConfig(local_steps=1, batch_size=2,
                                             eval_classifier_steps=5),
                           run_dir=str(tmp_path / "runs"), run_id=f"report-{family}",
                           num_samples=2, rounds=1)
    folder, _ = run_inprocess(cfg, hospitals)
    (row,) = [json.loads(x) for x in (folder / "metrics.jsonl").read_text().splitlines()]
    assert (row["replied"], row["failed"]) == (2, 0), row
    titles = assert_report_scores(folder)
    if family == "cyclegan":
        examples = sorted(m["eval-examples"] for m in row["evaluated"].values())
        assert examples[0] == 0 < examples[1], row["evaluated"]  # one-domain site: nothing
        assert math.isfinite(row["evaluate"]["eval-ssim"]), row["evaluate"]
        assert any(t.startswith("SSIM") for t in titles), titles
        assert not any("Fréchet" in t for t in titles)  # a measure cyclegan does not make
    else:
        assert any(t.startswith("Fréchet distance") for t in titles), titles


def test_a_translation_run_shows_its_scores_and_says_when_nothing_was_scored(
        tmp_path: Path) -> None:
    """No panel for a measure the family does not make; SSIM/PSNR/MAE charted; a run whose
    hospitals all had nothing to score says so instead of drawing empty panels."""
    folder = RunFolder(tmp_path / "cyc")
    folder.write_config({"run_id": "cyc", "model": {"family": "cyclegan", "image_size": 16}})
    for rnd in (1, 2):
        folder.append_metrics({"round": rnd, "seconds": 1.0, "hospitals": {},
                               "train": {"loss-g": 1.0, "loss-d": 0.5},
                               "evaluate": {"eval-ssim": 0.1 * rnd, "eval-psnr": 9.0 + rnd,
                                            "eval-mae": 0.5, "eval-examples": 4.0}})
    page = build_report(folder.root)
    assert "no finite values" not in page and "Fréchet" not in page and "MMD" not in page
    for name in ("SSIM", "PSNR in dB", "MAE"):
        assert f"<title>{name} (held-out; G_AB(A) vs its held-out paired B" in page, name
    assert "no hospital had anything to score" not in page

    empty = RunFolder(tmp_path / "cyc0")
    empty.write_config({"run_id": "cyc0", "model": {"family": "cyclegan", "image_size": 16}})
    empty.append_metrics({"round": 1, "seconds": 1.0, "hospitals": {},
                          "train": {"loss-g": 1.0}, "evaluate": {"eval-examples": 0.0}})
    page = build_report(empty.root)
    assert "no hospital had anything to score" in page and "SSIM" not in page
    assert "no finite values" not in page
