"""One run configuration (server/run_config.py): the single source of every run setting.

Issue 12: ``[run] metrics-port`` and seven other keys were refused by launch although the
ServerApp read them; ``cdcgan`` failed in the ServerApp (nothing set num_classes); a guessed
``[run.preset]`` table passed launch; there was no example file and ``launch --help`` listed no
settings.
"""

from __future__ import annotations

import subprocess
import tomllib
from pathlib import Path

import pytest

from server.run_config import (SETTINGS, FederationConfig, defaults_flat, example_toml,
                               from_flat, settings_help)

ROOT = Path(__file__).resolve().parents[3]


def test_every_declaration_is_generated_from_the_run_configuration(tmp_path: Path) -> None:
    from fedsynth.deployment import write_launch_app

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert project["tool"]["flwr"]["app"]["config"] == defaults_flat()
    launch_app = tomllib.loads((write_launch_app(tmp_path) / "pyproject.toml").read_text())
    assert launch_app["tool"]["flwr"]["app"]["config"] == defaults_flat()
    assert (ROOT / "examples" / "run.toml").read_text() == example_toml(), \
        "examples/run.toml is stale: python -m server.run_config > examples/run.toml"
    example = tomllib.loads(example_toml())
    assert set(example["run"]) == {s.key for s in SETTINGS}


def test_launch_help_lists_every_setting() -> None:
    out = subprocess.run([str(ROOT / ".venv" / "bin" / "fedsynth"), "launch", "--help"],
                         capture_output=True, text=True, timeout=120, check=True).stdout
    for s in SETTINGS:
        assert f"  {s.key} " in out, s.key
    assert settings_help().splitlines()[1] in out


def test_non_default_values_round_trip_through_the_flat_form() -> None:
    values = {
        "family": "pix2pix", "image-size": 64, "latent-dim": 17, "width": 9, "spatial-dims": 3,
        "conditioning": "projection,acgan,cbn", "eval-classifier-steps": 50,
        "pgan-rounds-per-stage": 3,
        "local-steps": 3, "batch-size": 5, "lr-g": 1e-3, "lr-d": 3e-3, "beta1": 0.1,
        "beta2": 0.9, "prox-mu": 0.01, "wire-dtype": "float16", "seed": 11, "lesion-weight": 4.0,
        "dp-noise-multiplier": 1.3, "dp-max-grad-norm": 0.7,
        "gradient-loss": 0.5, "gradient-loss-power": 1, "lesion-cycle-weight": 0.0,
        "cascade": 2, "cascade-training": "stagewise", "cascade-stage-rounds": 3,
        "perceptual-loss": 0.5,
        "augment": "", "r1-gamma": 0.0, "ema-decay": 0.9, "class-balanced": False,
        "classes": "cyst,metastasis,haemangioma", "class-attribute": "protocol_name",
        "class-patterns": "cyst;meta;haem", "domain-a": "MR", "domain-b": "CT",
        "domain-attribute": "modality", "domain-a-pattern": "^MR$", "domain-b-pattern": "^CT$",
        "mask-labels": "liver,lesion", "mask-label-patterns": "^liver;GTV|lesion",
        "num-server-rounds": 7, "preset": "local-d", "reducer": "median", "server-opt": "avgm",
        "server-lr": 0.5, "sync-every": 2, "ua-fake-batch": 8, "min-hospitals": 2,
        "fraction-train": 0.5, "round-timeout": 99.0, "evaluate-every": 3,
        "server-ema-decay": 0.5, "run-dir": "/r",
        "run-id": "abc", "resume": True, "signing-key": "/k", "num-samples": 4,
        "keep-checkpoints": 2, "examples-ratio": 2.0, "max-examples": 1000.0,
        "update-norm-ratio": 5.0, "norm-floor-rms": 0.5, "max-update-norm": 2.5,
        "metrics-port": 9111,
        "metrics-host": "0.0.0.0", "hospital-names": "/n.json",
        # secure-aggregation = true refuses median and float16 (test_secure_aggregation.py)
        "secure-aggregation": False, "secure-aggregation-clip": 0.25,
        "secure-aggregation-max-examples": 500.0, "channels": 1,
        # client-level DP (server/client_dp.py) refuses median: its noise is in the third run
        "client-dp-noise-multiplier": 0.0, "client-dp-clip": 0.3, "client-dp-delta": 1e-6,
        # the median refuses class-weighted-aggregation: it is on in the fifth run
        "class-weighted-aggregation": False,
    }
    # DP-SGD excludes augment and R1 (shared_models.config): those two in a second, non-DP run
    small_data = {**values, "dp-noise-multiplier": 0.0, "augment": "translation,cutout",
                  "r1-gamma": 0.5, "class-balanced": True, "secure-aggregation": True,
                  "reducer": "mean", "wire-dtype": "float32", "sync-every": 0,
                  "max-update-norm": 0.0, "min-hospitals": 3}
    # lesion-cycle-weight is cyclegan's (2D here): a third run
    cycle = {**values, "family": "cyclegan", "spatial-dims": 2, "gradient-loss": 0.0, "cascade": 1,
             "perceptual-loss": 0.0,
             "lesion-cycle-weight": 3.0, "reducer": "mean", "client-dp-noise-multiplier": 1.2}
    # channels = 3 (colour) is 2D only: a fourth run
    colour = {**small_data, "spatial-dims": 2, "channels": 3}
    # class-weighted-aggregation: a conditional family, the mean, no secure aggregation (a fifth)
    conditional = {**small_data, "family": "cdcgan", "spatial-dims": 2, "cascade": 1,
                   "gradient-loss": 0.0, "perceptual-loss": 0.0, "secure-aggregation": False,
                   "class-weighted-aggregation": True}
    assert set(values) == {s.key for s in SETTINGS}, "a setting was added: add it here"
    for s in SETTINGS:
        assert any(d[s.key] != s.default
                   for d in (values, small_data, cycle, colour, conditional)), \
            f"{s.key}: pick a non-default value"
    cfg = from_flat(values)
    assert cfg.to_flat() == values
    assert from_flat(small_data).to_flat() == small_data
    assert from_flat(cycle).to_flat() == cycle
    assert from_flat(colour).to_flat() == colour
    assert from_flat(conditional).to_flat() == conditional
    with pytest.raises(ValueError, match="not supported with DP-SGD"):
        from_flat({**small_data, "dp-noise-multiplier": 1.3})
    assert cfg.model.num_classes == 0  # pix2pix is not conditional
    assert from_flat({**values, "family": "cdcgan", "spatial-dims": 2, "cascade": 1,
                      "gradient-loss": 0.0, "perceptual-loss": 0.0}).model.num_classes == 3
    assert cfg.data.class_names == ("cyst", "metastasis", "haemangioma")


@pytest.mark.parametrize("values,match", [
    ({"local-stpes": 3}, "unknown run setting 'local-stpes': did you mean 'local-steps'\\?$"),
    ({"zzqq": 3}, "unknown run setting 'zzqq'; known: family"),
    ({"preset": {"generator": "shared"}}, "not a table"),
    ({"local-steps": "3"}, "'local-steps' must be a int"),
    ({"resume": 1}, "'resume' must be a bool"),
    ({"family": "stylegan"}, "stylegan"),
    ({"preset": "fedsgd"}, "preset 'fedsgd' is not one of"),
    ({"rounds": 3}, "did you mean 'num-server-rounds'"),
    ({"run-id": "../../x"}, "not a plain name"),
    ({"classes": "a,b", "class-patterns": "x"}, "1 patterns for 2 classes"),
    ({"domain-attribute": "PatientName"}, "not one of"),
    ({"class-patterns": "(;x"}, "not a regular expression"),
])
def test_mistakes_are_refused_by_name(values: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        from_flat(values)


def test_lists_become_strings() -> None:
    cfg = from_flat({"num-server-rounds": 3, "classes": ["cyst", "metastasis"],
                     "family": "cdcgan"})
    assert cfg.rounds == 3 and cfg.data.classes == "cyst,metastasis"
    assert cfg.model.num_classes == 2
    assert FederationConfig().model.num_classes == 0  # dcgan: unconditional


def test_launch_file_is_checked_before_submission(tmp_path: Path) -> None:
    from fedsynth.launch_file import LaunchConfig

    def launch(text: str) -> Path:
        path = tmp_path / "run.toml"
        path.write_text('[coordinator]\naddress = "127.0.0.1:9"\ninsecure = true\n' + text)
        return path

    cfg = LaunchConfig.load(launch('[run]\nmetrics-port = 9100\nreducer = "median"\n'
                                   'server-opt = "avgm"\nsync-every = 2\nua-fake-batch = 8\n'
                                   'hospital-names = "names.json"\nmetrics-host = "0.0.0.0"\n'
                                   'server-lr = 0.5\nclasses = ["cyst", "meta"]\n'))
    assert cfg.run["metrics-port"] == 9100 and cfg.run["classes"] == "cyst,meta"
    assert Path(cfg.run["hospital-names"]).is_absolute()
    for bad, match in [('[run.preset]\ngenerator = "shared"\n', "not a table"),
                       ("[coordinator]\n", "Cannot declare|not valid TOML"),
                       ("[hospital]\nx = 1\n", r"unknown section\(s\) \[hospital\]"),
                       ('[run]\nnum-server-rounds = "five"\n', "must be a int")]:
        with pytest.raises(ValueError, match=match):
            LaunchConfig.load(launch(bad))
    path = tmp_path / "c.toml"
    path.write_text('[coordinator]\naddress = "127.0.0.1:9"\ninsecure = true\nmetrics-port = 1\n')
    with pytest.raises(ValueError, match=r"unknown \[coordinator\] key.*metrics-port.*\[run\]"):
        LaunchConfig.load(path)


def test_hospital_settings_refuse_unknown_keys(tmp_path: Path) -> None:
    """Issue 12: `[hospital] domain-a = ...` was silently ignored."""
    from client.settings import DaemonSettings, SettingsError

    (tmp_path / "data").mkdir()
    toml = tmp_path / "h.toml"
    base = '[coordinator]\naddress = "127.0.0.1:9"\ninsecure = true\n'
    toml.write_text(base + f'[hospital]\ndata-dir = "{tmp_path / "data"}"\ndomain-a = "MR"\n')
    with pytest.raises(SettingsError, match=r"unknown \[hospital\] setting\(s\) domain-a; known"):
        DaemonSettings.load(toml)
    toml.write_text(base + f'[hospital]\ndata-dir = "{tmp_path / "data"}"\n'
                    'label-attribute = "modality"\nlabel-patterns = "MR=^MR$;CT=^CT$"\n'
                    '[node]\nexecuter = "warm"\n')
    with pytest.raises(SettingsError, match=r"unknown \[node\] setting\(s\) executer"):
        DaemonSettings.load(toml)
    toml.write_text(base + f'[hospital]\ndata-dir = "{tmp_path / "data"}"\n'
                    'label-attribute = "modality"\n[hospital.label-patterns]\nMR = "^MR$"\n')
    settings = DaemonSettings.load(toml)
    assert settings.hospital.label_patterns == (("MR", "^MR$"),)
    assert settings.hospital.to_node_config()["label-patterns"] == "MR=^MR$"


@pytest.mark.parametrize("pattern", [r"(MR)\1", "(?P<s>MR)(?P=s)", "MR(?=w)", "(?<!x)MR",
                                     "a" * 300])
@pytest.mark.parametrize("key", ["class-patterns", "domain-a-pattern", "mask-label-patterns"])
def test_run_sent_patterns_the_hospital_cannot_match_in_linear_time_are_refused(
        key: str, pattern: str) -> None:
    """A coordinator's pattern runs in the hospital's daemon on its slices' text. It is matched
    by RE2, which takes linear time whatever the pattern
    (tests/unit/shared_models/test_patterns_re2.py); what RE2 cannot compile (backreferences,
    lookaround) and patterns over 256 characters are refused at launch, in one line, and again by
    the hospital (it rebuilds DataConfig from the signed record). Nested repetition such as
    ``(a+)+`` was refused here before RE2; it is accepted now, and the timing test shows it ends
    at once."""
    import time

    from shared_models import DataConfig

    flat = {"class-patterns": f"{pattern};b", "domain-a-pattern": pattern,
            "mask-label-patterns": pattern}[key]
    extra = {"class-patterns": {"classes": "a,b"}, "mask-label-patterns": {"mask-labels": "a"},
             "domain-a-pattern": {}}[key]
    why = "RE2|at most"
    t0 = time.monotonic()
    with pytest.raises(ValueError, match=why) as info:
        from_flat({key: flat, **extra})
    assert "\n" not in str(info.value)  # one line
    with pytest.raises(ValueError, match=why):
        DataConfig(**{k.replace("-", "_"): v for k, v in {key: flat, **extra}.items()})
    assert time.monotonic() - t0 < 5


def test_ordinary_label_patterns_still_pass() -> None:
    from shared_models import DataConfig

    DataConfig(classes="cyst,meta,haem", class_patterns="^cyst$;meta|metastasis;haem.*oma",
               domain_a_pattern="^(T1|T2)w?$", mask_label_patterns="GTV|lesion")
