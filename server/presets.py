"""Named aggregation presets: which strategy a consortium picks, by name.

Each preset is a set of ``ComponentPolicy`` per component of the one component-aware
``GanStrategy`` (``ua-gan`` is the exception: its coordinator trains the generator itself, see
``ua_gan.py``). Generators are the components named ``generator`` or ``g_*``; discriminators
``discriminator`` or ``d_*``.

| preset     | generator(s)            | discriminator(s)        | norm layers   |
| ---------- | ----------------------- | ----------------------- | ------------- |
| fedgan     | shared, example-weighted| shared, example-weighted| shared        |
| fedmed-gan | shared, example-weighted| kept at each hospital   | shared        |
| local-d    | shared, example-weighted| kept at each hospital   | shared        |
| fedbn      | shared, example-weighted| shared, example-weighted| kept locally  |
| ua-gan     | trained by coordinator  | kept at each hospital   | —             |

The adversarial autoencoder (``aae``) counts its ``encoder`` and ``decoder`` as generators and its
``latent_discriminator`` as a discriminator.

``fedmed-gan`` (Wang et al. 2022, for CycleGAN's two generators) and ``local-d`` share the same
policy; both names are kept because the literature and the consortium's papers use both.
``overrides`` (e.g. ``reducer="median"``, ``server_opt="adam"``, ``sync_every=2``) replace
fields of every *shared* component's policy.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Callable, Mapping

from shared_models import ModelConfig, TrainConfig

from .aggregation import ComponentPolicy
from .strategy import GanStrategy

PolicyTable = Callable[[tuple[str, ...]], dict[str, ComponentPolicy]]


def is_generator(component: str) -> bool:
    """Generators, and the adversarial autoencoder's encoder and decoder (aae)."""
    return component in ("generator", "encoder", "decoder") or component.startswith("g_")


def is_discriminator(component: str) -> bool:
    """Discriminators, and the adversarial autoencoder's ``latent_discriminator`` (aae)."""
    return (component == "discriminator" or component.startswith("d_")
            or component.endswith("_discriminator"))


def _fedgan(components: tuple[str, ...]) -> dict[str, ComponentPolicy]:
    """FedGAN (Rasouli et al. 2020): every component averaged, weighted by its examples."""
    return {c: ComponentPolicy() for c in components}


def _local_d(components: tuple[str, ...]) -> dict[str, ComponentPolicy]:
    """Generators shared, discriminators private (FedMed-GAN; 'local-d')."""
    return {c: ComponentPolicy(shared=not is_discriminator(c)) for c in components}


def _fedbn(components: tuple[str, ...]) -> dict[str, ComponentPolicy]:
    """FedBN (Li et al. 2021): all shared but normalisation parameters and statistics."""
    return {c: ComponentPolicy(local_norm=True) for c in components}


POLICY_PRESETS: dict[str, PolicyTable] = {
    "fedgan": _fedgan,
    "fedmed-gan": _local_d,
    "local-d": _local_d,
    "fedbn": _fedbn,
}
PRESETS: tuple[str, ...] = (*POLICY_PRESETS, "ua-gan")


def preset_policies(preset: str, components: tuple[str, ...],
                    overrides: Mapping[str, Any] | None = None) -> dict[str, ComponentPolicy]:
    """The per-component policies of a policy preset (all presets but ``ua-gan``)."""
    if preset not in POLICY_PRESETS:
        raise ValueError(f"unknown strategy preset {preset!r}; known: {', '.join(PRESETS)}")
    policies = POLICY_PRESETS[preset](components)
    if overrides:
        unknown = set(overrides) - set(ComponentPolicy.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown policy field(s) {sorted(unknown)}; known: "
                             f"{', '.join(ComponentPolicy.__dataclass_fields__)}")
        policies = {c: replace(p, **overrides) if p.shared else p for c, p in policies.items()}
    return policies


def make_strategy(
    preset: str,
    components: tuple[str, ...],
    *,
    overrides: Mapping[str, Any] | None = None,
    model: ModelConfig | None = None,
    train: TrainConfig | None = None,
    **kw: Any,
) -> GanStrategy:
    """The strategy of ``preset`` for a family with ``components``.

    ``kw`` goes to the strategy (``norm_keys``, ``signer``, ``fraction_train``, ...). ``ua-gan``
    also needs the ``model`` and ``train`` configs, because its coordinator trains the generator.
    """
    if preset == "ua-gan":
        from .ua_gan import UaGanStrategy

        if model is None or train is None:
            raise ValueError("preset 'ua-gan' needs the model and train configs")
        kw.pop("norm_keys", None)
        return UaGanStrategy(model, train, **kw)
    return GanStrategy(components, policies=preset_policies(preset, components, overrides), **kw)
