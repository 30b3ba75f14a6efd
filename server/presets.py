"""Named aggregation presets: which strategy a consortium picks, by name.

Each preset is a set of ``ComponentPolicy`` per component of the one component-aware
``GanStrategy`` (``ua-gan`` is the exception: its coordinator trains the generator itself, see
``ua_gan.py``). Which components are generators and which discriminators the family declares
(``generators`` / ``discriminators``, a partition of its ``components``).

| preset     | generator(s)            | discriminator(s)        | norm layers   |
| ---------- | ----------------------- | ----------------------- | ------------- |
| fedgan     | shared, example-weighted| shared, example-weighted| shared        |
| fedmed-gan | shared, example-weighted| kept at each hospital   | shared        |
| local-d    | shared, example-weighted| kept at each hospital   | shared        |
| fedbn      | shared, example-weighted| shared, example-weighted| kept locally  |
| ua-gan     | trained by coordinator  | kept at each hospital   | —             |

The adversarial autoencoder (``aae``) declares its ``encoder`` and ``decoder`` generators and its
``latent_discriminator`` a discriminator.

``fedmed-gan`` (Wang et al. 2022, for CycleGAN's two generators) and ``local-d`` share the same
policy; both names are kept because the literature and the consortium's papers use both.
``overrides`` (e.g. ``reducer="median"``, ``server_opt="adam"``, ``sync_every=2``) replace
fields of every *shared* component's policy.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Callable, Mapping

from shared_models import GanFamily, ModelConfig, TrainConfig

from .aggregation import ComponentPolicy
from .strategy import GanStrategy

PolicyTable = Callable[[GanFamily], dict[str, ComponentPolicy]]


def _fedgan(family: GanFamily) -> dict[str, ComponentPolicy]:
    """FedGAN (Rasouli et al. 2020): every component averaged, weighted by its examples."""
    return {c: ComponentPolicy() for c in family.components}


def _local_d(family: GanFamily) -> dict[str, ComponentPolicy]:
    """Generators shared, the family's discriminators private (FedMed-GAN; 'local-d')."""
    return {c: ComponentPolicy(shared=c not in family.discriminators) for c in family.components}


def _fedbn(family: GanFamily) -> dict[str, ComponentPolicy]:
    """FedBN (Li et al. 2021): all shared but normalisation parameters and statistics."""
    return {c: ComponentPolicy(local_norm=True) for c in family.components}


POLICY_PRESETS: dict[str, PolicyTable] = {
    "fedgan": _fedgan,
    "fedmed-gan": _local_d,
    "local-d": _local_d,
    "fedbn": _fedbn,
}
# the names, declared torch-free for `fedsynth launch`'s check (a test checks they agree)
from .run_rules import POLICY_PRESET_NAMES, PRESETS  # noqa: E402,F401


def preset_policies(preset: str, family: GanFamily,
                    overrides: Mapping[str, Any] | None = None) -> dict[str, ComponentPolicy]:
    """The per-component policies of a policy preset (all presets but ``ua-gan``)."""
    if preset not in POLICY_PRESETS:
        raise ValueError(f"unknown strategy preset {preset!r}; known: {', '.join(PRESETS)}")
    policies = POLICY_PRESETS[preset](family)
    if overrides:
        unknown = set(overrides) - set(ComponentPolicy.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown policy field(s) {sorted(unknown)}; known: "
                             f"{', '.join(ComponentPolicy.__dataclass_fields__)}")
        policies = {c: replace(p, **overrides) if p.shared else p for c, p in policies.items()}
    return policies


def make_strategy(
    preset: str,
    family: GanFamily,
    *,
    overrides: Mapping[str, Any] | None = None,
    model: ModelConfig | None = None,
    train: TrainConfig | None = None,
    **kw: Any,
) -> GanStrategy:
    """The strategy of ``preset`` for ``family`` (its components, generators, discriminators).

    ``kw`` goes to the strategy (``norm_keys``, ``signer``, ``fraction_train``, ...). ``ua-gan``
    also needs the ``model`` and ``train`` configs, because its coordinator trains the generator.
    """
    if preset == "ua-gan":
        from .ua_gan import UaGanStrategy

        if model is None or train is None:
            raise ValueError("preset 'ua-gan' needs the model and train configs")
        kw.pop("norm_keys", None)
        return UaGanStrategy(model, train, **kw)
    return GanStrategy(family.components, policies=preset_policies(preset, family, overrides),
                       **kw)
