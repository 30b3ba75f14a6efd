"""Every family and setting through `fedsynth launch`, on a real deployment (issue 12).

One coordinator (SuperLink behind the Fleet proxy, TLS + node auth) and three hospital daemons
on 127.0.0.1, as a new consortium would have them: one with only MR, one with only CT, one with
both (``fedsynth.demo_data.build_mr_ct_hospitals``: phantom MR/CT of the same anatomy plus
pydicom's real slices of that modality). On it:

- a run with a non-default value for EVERY run setting (pix2pix, 3D, MR -> CT pairs): the
  ServerApp's config.json holds each value the launch file gave;
- a CycleGAN MR -> CT run: the MR-only site trains what needs MR, the CT-only site what needs CT,
  none fails a round, and ``fedsynth sample --input`` translates from its checkpoint;
- a conditional DCGAN with two classes of the run file's choosing (MR and CT, by modality):
  every site contributes the class it holds; ``fedsynth sample --class`` works.
"""

from __future__ import annotations

import json
import re
import urllib.request
from pathlib import Path

import pytest

from fedsynth.certs import init_federation, new_node_key

from tests.harness.deploy_helpers import (free_port, hospital_toml, launch_toml, metrics_rows, run,
                                          start, wait_for)

SITES = ("mr-only", "ct-only", "mr-and-ct")


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory):
    from fedsynth.demo_data import build_mr_ct_hospitals

    root = tmp_path_factory.mktemp("families")
    keys = init_federation(root / "keys")
    for name in SITES:
        new_node_key(keys.root, name)
    data = dict(zip(SITES, build_mr_ct_hospitals(root / "data", matrix=32)))
    port = free_port()
    address = f"127.0.0.1:{port}"
    coord_metrics = free_port()  # `fedsynth coordinator --metrics-port`: every run's default
    coord = start("coordinator", ["coordinator", "--keys", str(keys.root), "--address", address,
                                  "--state", str(root / "state"), "--rescan", "2",
                                  "--metrics-port", str(coord_metrics)], root)
    hospitals = {name: start(name, ["hospital", str(hospital_toml(
        root / f"{name}.toml", address, keys.root, name, data[name], free_port()))], root)
        for name in SITES}
    procs = (coord, *hospitals.values())
    try:
        wait_for("3 hospitals connected", lambda: all(
            "warm executor polling" in h.text() and "SuperNode ID" in h.text()
            for h in hospitals.values()), 240, procs)
        # node id -> site name, from the coordinator's registration lines
        nodes = dict(re.findall(r"hospital key (\S+)\.pub registered \(node (\d+)\)",
                                coord.text()))
        names_file = root / "hospital-names.json"
        names_file.write_text(json.dumps({node: name for name, node in nodes.items()}))
        yield {"root": root, "keys": keys, "address": address, "coord": coord,
               "hospitals": hospitals, "procs": procs, "data": data, "nodes": nodes,
               "names_file": names_file, "coord_metrics": coord_metrics}
    finally:
        for p in procs:
            p.stop()


def _launch(dep: dict, run_id: str, **settings) -> Path:
    root = dep["root"]
    launch = launch_toml(root / f"{run_id}.toml", dep["address"], dep["keys"].ca_cert,
                         run_id=run_id, run_dir=root / "runs", signing_key=dep["keys"].signing_key,
                         **settings)
    out = run(["launch", str(launch), "--flwr-home", str(root / "flwr")], root)
    assert out.returncode == 0, out.stderr[-3000:]
    return root / "runs" / run_id


def _by_site(dep: dict, row: dict) -> dict[str, dict]:
    site_of = {node: name for name, node in dep["nodes"].items()}
    return {site_of.get(node, node): m for node, m in row["hospitals"].items()}


def _no_errors(dep: dict) -> None:
    for name, proc in dep["hospitals"].items():
        text = proc.text()
        assert "round failed at this hospital" not in text, f"{name} failed a round"
        assert "REFUSED" not in text, name


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_every_run_setting_reaches_the_serverapp(deployment) -> None:
    """Non-default values for every key of the run configuration, through `fedsynth launch`."""
    from server.run_config import SETTINGS

    dep = deployment
    metrics_port = free_port()
    given = {
        "family": "pix2pix", "image_size": 16, "latent_dim": 17, "width": 8, "spatial_dims": 3,
        "local_steps": 2, "batch_size": 2, "lr_g": 3e-4, "lr_d": 3e-4, "beta1": 0.4,
        "beta2": 0.99, "prox_mu": 0.01, "wire_dtype": "float16", "seed": 7, "lesion_weight": 3.0,
        "dp_noise_multiplier": 0.0, "dp_max_grad_norm": 2.0,
        "augment": "translation,cutout", "r1_gamma": 0.5, "ema_decay": 0.9,
        "conditioning": "projection,acgan", "class_balanced": True, "eval_classifier_steps": 10,
        "max_update_norm": 1000.0,
        "classes": "MR,CT", "class_attribute": "modality", "class_patterns": "^MR$;^CT$",
        "domain_a": "MR", "domain_b": "CT", "domain_attribute": "modality",
        "domain_a_pattern": "^MR$", "domain_b_pattern": "^CT$",
        "mask_labels": "liver,lesion", "mask_label_patterns": "^liver;GTV|lesion",
        "num_server_rounds": 2, "preset": "local-d", "reducer": "median", "server_opt": "avgm",
        "server_lr": 0.5, "sync_every": 2, "ua_fake_batch": 8, "min_hospitals": 3,
        "fraction_train": 0.99, "round_timeout": 300.0, "evaluate_every": 2,
        "server_ema_decay": 0.5,
        "resume": True, "num_samples": 4, "keep_checkpoints": 2, "examples_ratio": 2.5,
        "max_examples": 1e6, "update_norm_ratio": 20.0, "norm_floor_rms": 2.0,
        "metrics_port": metrics_port, "metrics_host": "127.0.0.2",
        "hospital_names": str(dep["names_file"]),
        "pgan_rounds_per_stage": 3, "gradient_loss": 0.5, "gradient_loss_power": 1,
        "cascade": 2, "cascade_training": "stagewise", "cascade_stage_rounds": 1,
        # off here, each for its reason: cyclegan's, a hospital file's, 2D colour's, and
        # secure aggregation / client-level DP refuse the median reducer this run exercises
        "lesion_cycle_weight": 0.0, "perceptual_loss": 0.0, "channels": 1,
        "secure_aggregation": False, "secure_aggregation_clip": 0.25,
        "secure_aggregation_max_examples": 500.0, "client_dp_noise_multiplier": 0.0,
        "client_dp_clip": 0.3, "client_dp_delta": 1e-6,
        # pix2pix has no per-class parameters and the median ignores weights: refused if on
        # (tests/unit/server/test_class_weighted.py runs it in-process)
        "class_weighted_aggregation": False,
    }
    keys = {k.replace("_", "-") for k in given} | {"run-id", "run-dir", "signing-key"}
    assert keys == {s.key for s in SETTINGS}, "a run setting was added: give it a value here"
    folder = _launch(dep, "every-setting", **given)
    scraped = {}

    def finished() -> bool:
        if not scraped:
            try:
                scraped["body"] = urllib.request.urlopen(
                    f"http://127.0.0.2:{metrics_port}/metrics", timeout=2).read().decode()
            except OSError:
                pass
        return len(metrics_rows(folder)) >= 2

    wait_for("2 rounds of the every-setting run", finished, 600, dep["procs"])
    config = json.loads((folder / "config.json").read_text())
    for s in SETTINGS:
        node = config
        for part in s.path:
            node = node[part]
        expected = {"run-dir": str(dep["root"] / "runs"), "run-id": "every-setting",
                    "signing-key": str(dep["keys"].signing_key)}.get(
            s.key, given.get(s.key.replace("-", "_")))
        assert node == expected, f"{s.key}: the ServerApp got {node!r}, launch gave {expected!r}"
    assert "fedsynth_" in scraped.get("body", ""), \
        "the coordinator's metrics endpoint did not answer on metrics-host:metrics-port"
    rows = metrics_rows(folder)
    assert all(r["failed"] == 0 for r in rows), rows
    sites = _by_site(dep, rows[-1])
    assert set(sites) == set(SITES), rows  # named by the hospital-names file
    assert set(rows[-1]["names"].values()) == set(SITES)  # and by the coordinator: key names
    assert sites["mr-and-ct"]["num-examples-generator"] > 0  # the one site with MR/CT pairs
    assert sites["mr-only"]["num-examples-generator"] == 0  # holds no pair: trains nothing
    _no_errors(dep)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_cyclegan_mr_to_ct_with_single_modality_sites(deployment, tmp_path: Path) -> None:
    dep = deployment
    folder = _launch(dep, "cyclegan-mr-ct", family="cyclegan", image_size=32, width=8,
                     domain_attribute="modality", domain_a="MR", domain_b="CT", rounds=2,
                     local_steps=2, batch_size=2, min_hospitals=3, round_timeout=300)
    scraped: dict[str, str] = {}

    def done() -> bool:  # the run sets no metrics-port: the coordinator's --metrics-port serves
        # (from the coordinator's start on: scrape until the run's own series are there)
        if 'family="cyclegan"' not in scraped.get("body", ""):
            try:
                scraped["body"] = urllib.request.urlopen(
                    f"http://127.0.0.1:{dep['coord_metrics']}/metrics", timeout=2).read().decode()
            except OSError:
                pass
        return len(metrics_rows(folder)) >= 2

    wait_for("2 CycleGAN rounds", done, 600, dep["procs"])
    assert 'family="cyclegan"' in scraped.get("body", ""), "no metrics on --metrics-port"
    rows = metrics_rows(folder)
    assert all(r["failed"] == 0 and r["replied"] == 3 for r in rows), rows
    sites = _by_site(dep, rows[-1])
    # A one-modality site trains the generators on its own slices (cycle and identity losses:
    # MR -> CT -> MR at the MR-only site) and no discriminator (a discriminator of A needs fakes
    # made from B); the site with both trains all four. Nobody fails a round.
    for site in ("mr-only", "ct-only"):
        assert sites[site]["num-examples-g_ab"] == sites[site]["num-examples-g_ba"] > 0, site
        assert sites[site]["num-examples-d_a"] == sites[site]["num-examples-d_b"] == 0, site
    assert sites["mr-and-ct"]["num-examples-d_a"] > 0
    assert sites["mr-and-ct"]["num-examples-d_b"] > 0
    _no_errors(dep)
    ckpt = sorted((folder / "checkpoints").glob("round-*.npz"))[-1]
    out_dir = tmp_path / "synthetic-ct"
    sample = run(["sample", str(ckpt), "--n", "4", "--out", str(out_dir), "--format", "dicom",
                  "--input", str(dep["data"]["mr-only"])], tmp_path)
    assert sample.returncode == 0, sample.stderr[-3000:]
    assert len(list(out_dir.rglob("*.dcm"))) >= 4
    no_input = run(["sample", str(ckpt), "--n", "2", "--out", str(tmp_path / "x")], tmp_path)
    assert no_input.returncode == 2 and "Traceback" not in no_input.stderr
    assert "--input" in no_input.stderr


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_conditional_dcgan_with_the_run_files_classes(deployment, tmp_path: Path) -> None:
    dep = deployment
    folder = _launch(dep, "cdcgan-mr-ct", family="cdcgan", image_size=32, width=8,
                     latent_dim=16, classes="MR,CT", class_attribute="modality", rounds=2,
                     local_steps=2, batch_size=2, min_hospitals=3, round_timeout=300)
    wait_for("2 cDCGAN rounds", lambda: len(metrics_rows(folder)) >= 2, 600, dep["procs"])
    rows = metrics_rows(folder)
    assert all(r["failed"] == 0 and r["replied"] == 3 for r in rows), rows
    sites = _by_site(dep, rows[-1])
    assert all(sites[s]["num-examples"] > 0 for s in SITES), sites
    config = json.loads((folder / "config.json").read_text())
    assert config["model"]["num_classes"] == 2 and config["data"]["classes"] == "MR,CT"
    # the hospital holding both classes scores the generated slices' intended class (the
    # one-class sites leave it out); the coordinator's evaluation carries it
    intended = [r["evaluate"]["eval-intended-class-accuracy"] for r in rows
                if "eval-intended-class-accuracy" in (r.get("evaluate") or {})]
    assert intended and all(0.0 <= v <= 1.0 for v in intended), rows
    _no_errors(dep)
    ckpt = sorted((folder / "checkpoints").glob("round-*.npz"))[-1]
    sample = run(["sample", str(ckpt), "--n", "4", "--out", str(tmp_path / "ct"),
                  "--format", "png", "--class", "CT"], tmp_path)
    assert sample.returncode == 0, sample.stderr[-3000:]
    assert list((tmp_path / "ct").rglob("*.png"))


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_mask_conditioned_family_with_dicom_seg_at_the_hospitals(deployment, tmp_path: Path
                                                                   ) -> None:
    """maskgan (issue 15): each hospital's phantom series gets a DICOM SEG (written by
    highdicom) beside it; the hospitals pair their slices with the masks and train label map ->
    image, every site contributes, and `fedsynth sample --input` draws images for a folder's
    masks."""
    from tests.harness.seg_helpers import add_phantom_segs

    dep = deployment
    for name in SITES:
        assert add_phantom_segs(dep["data"][name] / "phantom"), name
    folder = _launch(dep, "maskgan-lesion", family="maskgan", image_size=32, width=8,
                     mask_labels="lesion", lesion_weight=4.0, rounds=2, local_steps=2,
                     batch_size=2, min_hospitals=3, round_timeout=300)
    wait_for("2 maskgan rounds", lambda: len(metrics_rows(folder)) >= 2, 600, dep["procs"])
    rows = metrics_rows(folder)
    assert all(r["failed"] == 0 and r["replied"] == 3 for r in rows), rows
    sites = _by_site(dep, rows[-1])
    assert all(sites[s]["num-examples-generator"] > 0 for s in SITES), sites
    config = json.loads((folder / "config.json").read_text())
    assert config["model"]["num_classes"] == 1 and config["train"]["lesion_weight"] == 4.0
    _no_errors(dep)
    ckpt = sorted((folder / "checkpoints").glob("round-*.npz"))[-1]
    sample = run(["sample", str(ckpt), "--n", "4", "--out", str(tmp_path / "masked"),
                  "--input", str(dep["data"]["mr-and-ct"])], tmp_path)
    assert sample.returncode == 0, sample.stderr[-3000:]
    assert len(list((tmp_path / "masked").glob("mask-synthetic-*.png"))) == 4
