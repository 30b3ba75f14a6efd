"""DP-SGD at the hospital (shared_models.dp, client.privacy): accounting, clipping, noise, budget.

The accountant's epsilon is checked against Opacus's RDP analysis called directly; clipping by a
neighbouring-dataset test with one outlier record; the noise by its measured spread and by not
being reproducible from the run's seed; the budget by an in-process federation in which one
hospital runs out and the run goes on without it.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import pytest
import torch
from flwr.app import Context, RecordDict
from torch import nn

from client.privacy import PrivacyBudgetExhausted, PrivacyRefused, plan_round
from client.settings import HospitalSettings, SettingsError
from client.trainer import LocalTrainer
from fedsynth.demo_data import build_demo_hospitals
from fedsynth.inprocess import run_inprocess
from server.federation import FederationConfig
from shared_models import ModelConfig, TrainConfig, get_family
from shared_models.dp import Accountant, PrivacyError, PrivateSteps, sample_rate

CPU = torch.device("cpu")


# ------------------------------------------------------------------------------ accounting

def test_epsilon_matches_opacus_rdp_analysis_computed_independently() -> None:
    from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent
    from opacus.accountants.rdp import RDPAccountant

    sigma, q, steps, delta = 1.1, 256 / 60000, 3000, 1e-5
    orders = RDPAccountant.DEFAULT_ALPHAS
    expected, _ = get_privacy_spent(orders=orders, rdp=compute_rdp(
        q=q, noise_multiplier=sigma, steps=steps, orders=orders), delta=delta)
    ledger = Accountant()
    for _ in range(3):  # three rounds of 1000 releases compose to one entry of 3000
        ledger.add(sigma, q, 1000)
    assert ledger.history == [(sigma, q, 3000)]
    assert ledger.epsilon(delta) == pytest.approx(float(expected), rel=1e-9)
    # a projection is the same as having spent it; an entry at another rate composes
    assert Accountant().epsilon(delta, (sigma, q, 3000)) == pytest.approx(float(expected))
    ledger.add(2.0, 0.1, 50)
    rdp = (compute_rdp(q=q, noise_multiplier=sigma, steps=3000, orders=orders)
           + compute_rdp(q=0.1, noise_multiplier=2.0, steps=50, orders=orders))
    both, _ = get_privacy_spent(orders=orders, rdp=rdp, delta=delta)
    assert ledger.epsilon(delta) == pytest.approx(float(both), rel=1e-9)
    assert ledger.epsilon(delta) > float(expected) > 0
    # the ledger a hospital persists round-trips, and a forged one is refused
    assert Accountant.from_json(ledger.to_json()).history == ledger.history
    with pytest.raises(ValueError):
        Accountant.from_json("[[0.0, 0.5, 10]]")  # sigma 0: no DP
    assert Accountant().epsilon(delta) == 0.0


def test_each_real_data_backward_counts() -> None:
    """dcgan: 1 release per step (D's real term); pix2pix: 2 (D and G see real pixels);
    wgan-gp: n_critic; cyclegan: 2 with both domains, 1 with one."""
    x = torch.zeros(40, 1, 16, 16)
    assert get_family("dcgan").dp_plan({"image": x}, 8) == (0.2, 1)
    assert get_family("pix2pix").dp_plan({"a": x, "b": x}, 8) == (0.2, 2)
    assert get_family("wgan-gp").dp_plan({"image": x}, 8) == (0.2, 5)
    assert get_family("cyclegan").dp_plan({"a": x, "b": x[:20]}, 8) == (0.4, 2)
    assert get_family("cyclegan").dp_plan({"a": x}, 8) == (0.2, 1)
    assert sample_rate(64, 10) == 1.0


# ------------------------------------------------------------------------------ mechanism

def _linear_step(records: torch.Tensor, seed: int, sigma: float = 1e-3, clip: float = 1.0
                 ) -> torch.Tensor:
    """One DP step of a linear model on ``records`` with a fixed noise draw; the weight change."""
    torch.manual_seed(0)
    net = nn.Linear(records.shape[1], 1)
    before = torch.cat([p.detach().flatten().clone() for p in net.parameters()])
    opt = torch.optim.SGD(net.parameters(), lr=1.0)
    dp = PrivateSteps({"x": records}, batch_size=4, sample_rate=0.5, noise_multiplier=sigma,
                      max_grad_norm=clip, device=CPU,
                      generator=torch.Generator().manual_seed(seed))
    dp.step({"net": net}, [(lambda ex: net(ex["x"]).pow(2).mean(), {"x": records})], [opt])
    assert dp.releases == 1
    return torch.cat([p.detach().flatten() for p in net.parameters()]) - before


def test_one_outlier_moves_the_model_by_at_most_the_clipping_norm() -> None:
    torch.manual_seed(1)
    normal = torch.randn(3, 10) * 0.1
    outlier = torch.full((1, 10), 1e4)
    with_outlier = _linear_step(torch.cat([normal, outlier]), seed=5)
    without = _linear_step(normal, seed=5)  # the neighbouring dataset, same noise draw
    clip, batch = 1.0, 4
    # the outlier's own gradient is huge: clipping is what bounds its influence
    net = nn.Linear(10, 1)
    torch.manual_seed(0)
    net = nn.Linear(10, 1)
    net(outlier).pow(2).mean().backward()
    raw = math.sqrt(sum(float(p.grad.pow(2).sum()) for p in net.parameters()))
    assert raw > 1e6 * clip
    influence = float((with_outlier - without).norm())
    assert influence <= clip / batch * (1 + 1e-4)
    assert influence > 0.5 * clip / batch  # and it is clipped to C, not dropped


def test_noise_has_the_stated_spread_and_comes_from_secret_randomness() -> None:
    sigma, clip, batch = 2.0, 0.5, 8
    net = nn.Linear(4000, 1, bias=False)
    nn.init.zeros_(net.weight)
    opt = torch.optim.SGD(net.parameters(), lr=1.0)
    dp = PrivateSteps({"x": torch.zeros(10, 4000)}, batch_size=batch, sample_rate=0.8,
                      noise_multiplier=sigma, max_grad_norm=clip, device=CPU)
    # an empty Poisson draw: the update is the noise alone, std sigma * C / batch
    dp.step({"net": net}, [(lambda ex: net(ex["x"]).sum(), {"x": torch.zeros(0, 4000)})], [opt])
    assert float(net.weight.detach().std()) == pytest.approx(sigma * clip / batch, rel=0.1)
    # the same run seed twice: DP weights differ (noise the coordinator can't reproduce), while
    # without DP the round is deterministic in the seed
    data = {"image": torch.rand(12, 1, 16, 16) * 2 - 1}
    model = ModelConfig(image_size=16, width=4, latent_dim=8, norm="group")

    def trained(dp_on: bool) -> torch.Tensor:
        t = LocalTrainer(model, CPU, "off")
        t.reset(0)
        t.fit(data, TrainConfig(local_steps=1, batch_size=4,
                                dp_noise_multiplier=1.0 if dp_on else 0.0), seed=3)
        return torch.cat([p.detach().flatten() for p in t.nets["discriminator"].parameters()])

    assert torch.equal(trained(False), trained(False))
    assert not torch.equal(trained(True), trained(True))


def test_batch_norm_nets_are_refused_and_dp_runs_build_group_norm() -> None:
    cfg = FederationConfig(train=TrainConfig(dp_noise_multiplier=1.0))
    assert cfg.model.norm == "group" and FederationConfig().model.norm == "batch"
    for family in ("dcgan", "pix2pix"):
        nets = get_family(family).build(ModelConfig(family=family, image_size=16, width=4,
                                                    norm="group"))
        assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm)
                       for n in nets.values() for m in n.modules())
    nets = get_family("dcgan").build(ModelConfig(image_size=16, width=4))
    dp = PrivateSteps({"image": torch.zeros(4, 1, 16, 16)}, 2, 0.5, 1.0, 1.0, CPU)
    with pytest.raises(PrivacyError, match="batch norm"):
        dp.step({"discriminator": nets["discriminator"]},
                [(lambda ex: nets["discriminator"](ex["image"]).sum(), dp.poisson(("image",)))],
                [torch.optim.SGD(nets["discriminator"].parameters(), lr=0.1)])


# every family that declares DP-SGD (test below): its DP step reports no real-data statistic
DP_CASES = [("dcgan", 3), ("pix2pix", 3), ("cdcgan", 1), ("wgan-gp", 1), ("cyclegan", 1),
            ("lapgan", 1), ("pgan", 1)]


def test_every_dp_family_is_checked_for_real_data_statistics() -> None:
    from shared_models.capabilities import DP, supporting

    assert {f for f, _ in DP_CASES} == set(supporting(DP))


@pytest.mark.parametrize("family, steps", DP_CASES)
def test_dp_training_moves_weights_and_reports_no_real_data_statistic(family: str,
                                                                      steps: int) -> None:
    model = ModelConfig(family=family, image_size=16, width=4, latent_dim=8, norm="group",
                        num_classes=2 if family == "cdcgan" else 0)
    x = torch.rand(12, 1, 16, 16) * 2 - 1
    data = ({"image": x} if get_family(family).task == "generation"
            else {"a": x, "b": x.flip(-1)})
    if family == "cdcgan":
        data["label"] = torch.arange(12) % 2
    t = LocalTrainer(model, CPU, "off")
    t.reset(0)
    before = {c: torch.cat([p.detach().flatten().clone() for p in n.parameters()])
              for c, n in t.nets.items()}
    train = TrainConfig(local_steps=steps, batch_size=4, dp_noise_multiplier=0.8,
                        dp_max_grad_norm=1.0)
    result = t.fit(data, train, seed=1)
    _, per_step = t.family.dp_plan(data, 4)
    assert result.dp_releases == steps * per_step
    assert result.dp_sample_rate == pytest.approx(4 / 12)
    for c, n in t.nets.items():
        after = torch.cat([p.detach().flatten() for p in n.parameters()])
        assert torch.isfinite(after).all() and not torch.equal(after, before[c]), c
    # losses on the sampled records are non-private statistics: none is reported
    assert not {"loss-d", "d-real", "loss-l1"} & set(result.metrics)
    if family in ("pix2pix", "cyclegan"):
        assert "loss-g" not in result.metrics


# ------------------------------------------------------------------------------ the hospital

def _context(run_id: int = 9) -> Context:
    return Context(run_id=run_id, node_id=1, node_config={}, state=RecordDict(), run_config={})


def test_hospital_settings_and_refusals(tmp_path: Path) -> None:
    h = HospitalSettings.from_mapping({"data-dir": str(tmp_path), "require-dp": True,
                                       "dp-epsilon": 4.0, "dp-delta": 1e-6,
                                       "cache-dir": str(tmp_path / "c"),
                                       "state-dir": str(tmp_path / "s")})
    # require-dp without a budget would accept any noise level the coordinator picks
    with pytest.raises(SettingsError, match="require-dp needs a finite dp-epsilon"):
        HospitalSettings.from_mapping({"data-dir": ".", "require-dp": True})
    # a budget needs a ledger that survives a restart (and a cleaned cache)
    with pytest.raises(SettingsError, match="need a state-dir"):
        HospitalSettings.from_mapping({"data-dir": str(tmp_path), "dp-epsilon": 4.0,
                                       "cache-dir": str(tmp_path / "c")}).check_local()
    assert h.needs_dp and HospitalSettings.from_mapping(h.to_node_config()) == h
    with pytest.raises(SettingsError, match="dp-epsilon"):
        HospitalSettings.from_mapping({"data-dir": ".", "dp-epsilon": -1})
    with pytest.raises(SettingsError, match="dp-delta"):
        HospitalSettings.from_mapping({"data-dir": ".", "dp-delta": 1})
    fam = get_family("dcgan")
    with pytest.raises(PrivacyRefused, match="without differential privacy"):
        plan_round(h, _context(), fam, TrainConfig(), {"image": torch.zeros(4, 1, 16, 16)}, 1)
    free = HospitalSettings(data_dir=tmp_path)
    assert plan_round(free, _context(), fam, TrainConfig(), None, 1) is None
    budget = HospitalSettings(data_dir=tmp_path, dp_epsilon=0.5, state_dir=tmp_path / "s")
    with pytest.raises(PrivacyBudgetExhausted, match="past this hospital's dp-epsilon = 0.5"):
        plan_round(budget, _context(), fam, TrainConfig(dp_noise_multiplier=0.5),
                   {"image": torch.zeros(16, 1, 16, 16)}, 1)
    from client.ua_gan import ua_train  # noqa: F401 - UA-GAN refuses too (client.privacy)
    from client.privacy import refuse_ua_gan

    with pytest.raises(PrivacyRefused, match="UA-GAN"):
        refuse_ua_gan(budget)


def _hospitals(root: Path, n: int = 2) -> list[dict]:
    folders = build_demo_hospitals(root / "data", n, matrix=16, include_real=False)
    return [{"data-dir": str(f), "cache-dir": str(root / "cache" / f.name),
             "state-dir": str(root / "state" / f.name), "device": "cpu",
             "holdout-every": 4, "threads": 1} for f in folders]


def _cfg(root: Path, run_id: str, dp: float) -> FederationConfig:
    return FederationConfig(model=ModelConfig(family="pix2pix", image_size=16, width=4),
                            train=TrainConfig(local_steps=1, batch_size=2,
                                              dp_noise_multiplier=dp),
                            run_dir=str(root / "runs"), run_id=run_id, num_samples=2, rounds=3)


@pytest.mark.slow
def test_a_hospital_at_its_budget_refuses_and_the_run_goes_on(tmp_path: Path, caplog) -> None:
    hospitals = _hospitals(tmp_path)
    hospitals[1]["name"] = "tight"
    # what one round costs at the tight hospital: its budget admits round 1 and not round 2
    from client.datasets import local_data
    from shared_models import DataConfig

    cfg = _cfg(tmp_path, "dp", 1.0)
    settings = HospitalSettings.from_mapping(hospitals[1])
    pairs = local_data(settings, cfg.model, DataConfig()).train
    q, per_step = get_family("pix2pix").dp_plan(pairs, 2)
    one = Accountant().epsilon(1e-5, (1.0, q, per_step))
    two = Accountant().epsilon(1e-5, (1.0, q, 2 * per_step))
    hospitals[1]["dp-epsilon"] = (one + two) / 2
    from server.metrics import CoordinatorMetrics, HospitalNames
    from server.report import build_report

    names = {str(1001 + i): h.get("name", f"hospital-{i + 1}") for i, h in enumerate(hospitals)}
    prom = CoordinatorMetrics(names=HospitalNames(names))
    with caplog.at_level(logging.INFO):
        folder, grid = run_inprocess(cfg, hospitals, observers=(prom,))
    rows = [json.loads(x) for x in (folder / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2, 3]
    assert (rows[0]["replied"], rows[0]["failed"]) == (2, 0)
    for r in rows[1:]:  # refused by name; the other hospital goes on training
        assert (r["replied"], r["failed"]) == (1, 1)
        assert r["failed_hospitals"] == {"tight": "dp-budget"}  # its reason, not "error"
        # the model bytes of the round are in its row: one reply fewer than round 1
        assert 0 < r["server"]["received-bytes"] < rows[0]["server"]["received-bytes"]
        assert r["server"]["wire-bytes"] == (r["server"]["sent-bytes"]
                                             + r["server"]["received-bytes"])
    eps = {name: [r["hospitals"][node]["dp-epsilon"] for r in rows
                  for node in r["hospitals"] if r["names"].get(node, node) == name]
           for name in ("hospital-1", "tight")}
    assert eps["tight"] == [pytest.approx(one)]
    assert len(eps["hospital-1"]) == 3 and eps["hospital-1"] == sorted(eps["hospital-1"])
    assert eps["hospital-1"][0] > 0
    # ... and reaches the coordinator's Prometheus gauge and the report
    gauge = prom.registry.get_sample_value
    assert gauge("fedsynth_hospital_dp_epsilon", {"hospital": "tight"}) == pytest.approx(one)
    assert gauge("fedsynth_hospital_dp_epsilon", {"hospital": "hospital-1"}) == pytest.approx(
        eps["hospital-1"][-1])
    report = build_report(folder)
    assert "Privacy spent per hospital" in report and "<td>tight</td>" in report
    # ... and the report says who failed in which round, and why
    failed = report[report.index("<h2>Failed hospitals</h2>"):]
    assert "<td>2</td><td>tight</td><td>train</td><td>dp-budget</td>" in failed
    assert "<td>3</td><td>tight</td><td>train</td><td>dp-budget</td>" in failed
    # the coordinator's log names the run's strategy once, at its start
    starts = [r.getMessage() for r in caplog.records if "strategy: family" in r.getMessage()]
    assert len(starts) == 1 and starts[0].startswith("run dp (Flower run "), starts
    assert starts[0].split("), ", 1)[1] == ("3 rounds, strategy: family pix2pix, preset fedgan, "
                                            "wire float32; discriminator: mean/avg; "
                                            "generator: mean/avg"), starts
    refusals = [r for r in caplog.records if "REFUSED" in r.getMessage()]
    assert len(refusals) == 2  # one line per refused round
    assert "past this hospital's dp-epsilon" in refusals[0].getMessage()
    assert not [r for r in caplog.records if "round failed at this hospital" in r.getMessage()]
    # the coordinator learns the kind of refusal, nothing more
    assert any("refused by the hospital's privacy settings (PrivacyBudgetExhausted)"
               in r.getMessage() for r in caplog.records)
    # the ledger is on disk, in the state folder, so a restarted daemon does not forget the spend
    ledgers = list((tmp_path / "state").glob("*/run-state/*/dp-ledger.json"))
    assert len(ledgers) == 2
    # the DP reply carries epsilon and nothing else new (a run without DP, same hospitals)
    plain, _ = run_inprocess(_cfg(tmp_path, "plain", 0.0), _hospitals(tmp_path / "p"))
    plain_row = json.loads((plain / "metrics.jsonl").read_text().splitlines()[0])
    keys_plain = set().union(*(set(m) for m in plain_row["hospitals"].values()))
    keys_dp = set().union(*(set(m) for m in rows[0]["hospitals"].values()))
    assert keys_dp - keys_plain == {"dp-epsilon"}


def test_the_hospital_exports_its_epsilon_and_a_budget_refusal_series() -> None:
    from prometheus_client import CollectorRegistry

    import client.metrics as hm

    registry = CollectorRegistry()
    saved, hm._SERIES = hm._SERIES, hm._Series(registry)
    try:
        hm.record_train("north", 3, {"steps": 2, "train-seconds": 1.0, "dp-epsilon": 1.25},
                        None, CPU)
    finally:
        hm._SERIES = saved
    v = registry.get_sample_value
    assert v("fedsynth_hospital_dp_epsilon_spent", {"hospital": "north"}) == 1.25
    # exists at 0 from the first round, so the alert's series is there before any refusal
    assert v("fedsynth_hospital_refused_messages_total",
             {"hospital": "north", "reason": "dp-budget"}) == 0


def test_one_budget_over_every_run_and_no_ledger_without_a_state_folder(tmp_path: Path) -> None:
    """A coordinator starting run after run must not get a fresh dp-epsilon each time: the
    ledger is the hospital's, over all runs on its slices (review finding: it was per run)."""
    from client.privacy import charge

    fam = get_family("dcgan")
    data = {"image": torch.zeros(64, 1, 16, 16)}
    train = TrainConfig(dp_noise_multiplier=1.0, local_steps=20, batch_size=16)
    probe = HospitalSettings(data_dir=tmp_path, state_dir=tmp_path / "probe")
    plan = plan_round(probe, _context(1), fam, train, data, 1)
    one_round = charge(probe, _context(1), plan, plan.releases, plan.sample_rate)
    hospital = HospitalSettings(data_dir=tmp_path, state_dir=tmp_path / "s",
                                dp_epsilon=one_round * 1.05)  # epsilon grows sublinearly
    first = plan_round(hospital, _context(run_id=1), fam, train, data, 1)
    charge(hospital, _context(run_id=1), first, first.releases, first.sample_rate)
    with pytest.raises(PrivacyBudgetExhausted, match="every run"):
        plan_round(hospital, _context(run_id=2), fam, train, data, 1)  # a new run, same slices
    no_state = HospitalSettings(data_dir=tmp_path, cache_dir=tmp_path / "c", dp_epsilon=100.0)
    with pytest.raises(PrivacyRefused, match="no state-dir"):
        plan_round(no_state, _context(), fam, train, data, 1)
