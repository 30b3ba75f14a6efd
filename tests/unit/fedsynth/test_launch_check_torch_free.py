"""`fedsynth launch` checks its run file without importing torch (issue 24 item 8: launch took
3-7 s, most of it torch's import through the run configuration); the names and family traits
that check reads are declared torch-free, and must agree with what they describe."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]


def test_launchs_run_file_check_imports_no_torch(tmp_path: Path) -> None:
    (tmp_path / "run.toml").write_text(
        '[coordinator]\naddress = "127.0.0.1:9"\ninsecure = true\n'
        '[run]\nfamily = "pix2pix"\npreset = "fedbn"\nreducer = "median"\n'
        'augment = "translation,cutout"\ngradient-loss = 1.0\nnum-server-rounds = 2\n')
    (tmp_path / "bad.toml").write_text(
        '[coordinator]\naddress = "127.0.0.1:9"\ninsecure = true\n'
        '[run]\nfamily = "wgan-gp"\nr1-gamma = 1.0\n')
    code = textwrap.dedent(f"""
        import sys
        from pathlib import Path
        from fedsynth.deployment import run_config_arg, write_launch_app
        from fedsynth.errors import UserError
        from fedsynth.launch_file import load_launch_file
        cfg = load_launch_file(Path({str(tmp_path / "run.toml")!r}))
        run_config_arg(dict(cfg.run))  # launch's check, as `fedsynth launch` makes it
        write_launch_app(Path({str(tmp_path / "app")!r}))
        try:
            load_launch_file(Path({str(tmp_path / "bad.toml")!r}))
        except UserError as exc:
            print("refused:", exc)
        else:
            sys.exit("bad.toml was accepted")
        heavy = sorted(m for m in ("torch", "numpy", "monai", "shared_models.family")
                       if m in sys.modules)
        sys.exit(f"imported {{heavy}}" if heavy else 0)
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "r1-gamma is for" in proc.stdout + proc.stderr, proc.stdout + proc.stderr


def test_declared_family_traits_are_the_families_own() -> None:
    from shared_models.registry import FAMILIES, get_family
    from shared_models.traits import TRAITS

    assert set(TRAITS) == set(FAMILIES), "add the new family's line to shared_models/traits.py"
    for name, traits in TRAITS.items():
        family = get_family(name)
        assert (traits.name, traits.data_layout, traits.supports, dict(traits.lacks)) == \
            (family.name, family.data_layout, frozenset(family.supports), dict(family.lacks)), name


def test_declared_preset_names_are_the_preset_tables() -> None:
    from server.presets import POLICY_PRESETS, PRESETS
    from server.run_rules import POLICY_PRESET_NAMES
    from server.secure_aggregation import SECURE_PRESETS

    assert tuple(POLICY_PRESETS) == POLICY_PRESET_NAMES and PRESETS[-1] == "ua-gan"
    assert set(SECURE_PRESETS) <= set(POLICY_PRESET_NAMES)


@pytest.mark.parametrize("name", ["translation", "cutout"])
def test_augment_reexports_the_torch_free_policy(name: str) -> None:
    from shared_models import augment, augment_policy

    assert augment.parse_policy is augment_policy.parse_policy and name in augment.OPS


def test_traits_spell_the_capabilities_names() -> None:
    from shared_models import capabilities, traits

    for name in ("AUGMENT", "R1", "DP", "UA_GAN", "GRADIENT_LOSS", "LESION_CYCLE"):
        assert getattr(traits, name) == getattr(capabilities, name)
