"""GAN families: shapes in 2D/3D, training moves the nets, no host sync inside a step."""

from __future__ import annotations

import copy
import sys

import pytest
import torch

from shared_models import ModelConfig, StepContext, TrainConfig, families, get_family
from shared_models.cyclegan import CycleGAN

CASES = [  # (family, spatial_dims, image_size, width)
    ("dcgan", 2, 32, 8), ("dcgan", 3, 16, 4),
    ("cdcgan", 2, 32, 8),
    ("wgan-gp", 2, 32, 8), ("wgan-gp", 3, 16, 4),
    ("pix2pix", 2, 32, 8), ("pix2pix", 3, 16, 4),
    ("cyclegan", 2, 32, 8),
    ("lapgan", 2, 16, 4), ("lapgan", 2, 32, 8), ("lapgan", 3, 16, 4),
    ("pgan", 2, 16, 4), ("pgan", 2, 32, 4), ("pgan", 3, 16, 4),
]


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


def _cfg(name: str, dims: int, size: int, width: int) -> ModelConfig:
    return ModelConfig(family=name, image_size=size, width=width, latent_dim=16, spatial_dims=dims,
                       num_classes=3 if name == "cdcgan" else 0)


def _data(cfg: ModelConfig, n: int = 8, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    shape = (n, cfg.channels) + (cfg.image_size,) * cfg.spatial_dims
    # structured targets: b is a fixed function of a, so paired losses can fall
    a = torch.rand(shape, generator=g) * 2 - 1
    return {"image": a, "label": torch.randint(3, (n,), generator=g), "a": a, "b": -a}


def test_registry_lists_every_family() -> None:
    assert set(families()) >= {"dcgan", "cdcgan", "wgan-gp", "pix2pix", "cyclegan"}
    with pytest.raises(ValueError, match="unknown GAN family 'nope'"):
        get_family("nope")


def test_gan_components_named_alike_for_generic_strategies() -> None:
    for name in ("dcgan", "cdcgan", "wgan-gp", "pix2pix"):
        assert get_family(name).components == ("generator", "discriminator")
    assert get_family("cyclegan").components == ("g_ab", "g_ba", "d_a", "d_b")


@pytest.mark.parametrize("name,dims,size,width", CASES)
def test_build_shapes_and_sample(name: str, dims: int, size: int, width: int) -> None:
    fam = get_family(name)
    cfg = _cfg(name, dims, size, width)
    nets = fam.build(cfg)
    assert set(nets) == set(fam.components)
    data = _data(cfg, 3)
    if fam.task == "translation":
        out = fam.sample(nets, data["a"])
    else:
        labels = data["label"] if cfg.num_classes else None
        out = fam.sample(nets, torch.randn(3, cfg.latent_dim), labels)
    assert out.shape == (3, 1) + (size,) * dims
    assert out.abs().max() <= 1.0  # tanh outputs, the data's range


@pytest.mark.parametrize("name,dims,size,width", CASES)
def test_train_step_changes_every_trained_component(name: str, dims: int, size: int,
                                                    width: int) -> None:
    torch.manual_seed(0)
    fam = get_family(name)
    cfg = _cfg(name, dims, size, width)
    nets = fam.build(cfg)
    before = {c: copy.deepcopy(n.state_dict()) for c, n in nets.items()}
    opts = fam.optimizers(nets, TrainConfig(lr_g=1e-3, lr_d=1e-3))
    out = fam.train_step(fam.draw(_data(cfg), 4), nets, opts, StepContext())
    for key, value in out.items():
        assert isinstance(value, torch.Tensor) and not value.requires_grad, key
        assert torch.isfinite(value), key
    for c, net in nets.items():
        changed = any(not torch.equal(before[c][k], v) for k, v in net.state_dict().items()
                      if v.is_floating_point())
        assert changed, f"{name}: component {c} did not train"


@pytest.mark.parametrize("name", ["pix2pix", "cyclegan"])
def test_translation_loss_falls_on_a_fixed_batch(name: str) -> None:
    torch.manual_seed(0)
    fam = get_family(name)
    cfg = _cfg(name, 2, 16, 8 if name == "pix2pix" else 4)
    nets = fam.build(cfg)
    opts = fam.optimizers(nets, TrainConfig(lr_g=2e-3, lr_d=2e-4))
    batch = {k: v[:2] for k, v in _data(cfg).items() if k in ("a", "b")}
    key = "loss-l1" if name == "pix2pix" else "loss-cycle"
    first = fam.train_step(batch, nets, opts, StepContext())[key].item()
    for _ in range(12):
        last = fam.train_step(batch, nets, opts, StepContext())[key].item()
    assert last < (0.7 if name == "pix2pix" else 0.85) * first, (first, last)


def test_wgan_critic_separates_real_from_fake() -> None:
    torch.manual_seed(0)
    fam = get_family("wgan-gp")
    cfg = _cfg("wgan-gp", 2, 16, 8)
    nets = fam.build(cfg)
    opts = fam.optimizers(nets, TrainConfig(lr_g=1e-5, lr_d=1e-3))
    data = {"image": torch.ones(16, 1, 16, 16) * 0.8}  # a trivially recognisable "real" image
    for _ in range(4):
        out = fam.train_step(fam.draw(data, 4), nets, opts, StepContext())
    assert out["w-distance"].item() > 0.5  # E[D(real)] - E[D(fake)] grows
    assert out["loss-gp"].item() >= 0
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
                   for m in nets["discriminator"].modules())  # Gulrajani et al. sec. 4


def test_wgan_draw_gives_one_batch_per_critic_step() -> None:
    fam = get_family("wgan-gp")
    batch = fam.draw({"image": torch.zeros(10, 1, 16, 16)}, 4)
    assert batch["image"].shape[0] == fam.n_critic * 4


def test_paired_draw_keeps_pairs_and_labels_aligned() -> None:
    x = torch.arange(20.0).view(20, 1, 1, 1)
    batch = get_family("pix2pix").draw({"a": x, "b": -x}, 8)
    assert torch.equal(batch["b"], -batch["a"])
    labelled = get_family("cdcgan").draw({"image": x, "label": torch.arange(20)}, 8)
    assert torch.equal(labelled["image"].flatten().long(), labelled["label"])
    with pytest.raises(ValueError, match="unequal lengths"):
        get_family("pix2pix").draw({"a": x, "b": x[:3]}, 4)


def test_unpaired_draw_is_independent_and_skips_a_missing_domain() -> None:
    torch.manual_seed(0)
    fam = CycleGAN()
    a, b = torch.arange(50.0).view(50, 1, 1, 1), torch.arange(50.0).view(50, 1, 1, 1)
    batch = fam.draw({"a": a, "b": b}, 16)
    assert not torch.equal(batch["a"], batch["b"])  # one shared index would make them equal
    only_a = fam.draw({"a": a, "b": b[:0]}, 4)
    assert set(only_a) == {"a"}
    assert fam.examples({"a": a[:7], "b": b[:0]}) == {"g_ab": 7, "g_ba": 7, "d_a": 0, "d_b": 0}
    assert fam.examples({"a": a[:7], "b": b[:5]}) == {"g_ab": 12, "g_ba": 12, "d_a": 7, "d_b": 5}


def test_cyclegan_with_one_domain_trains_generators_only() -> None:
    torch.manual_seed(0)
    fam = get_family("cyclegan")
    cfg = _cfg("cyclegan", 2, 16, 8)
    nets = fam.build(cfg)
    before = {c: copy.deepcopy(n.state_dict()) for c, n in nets.items()}
    opts = fam.optimizers(nets, TrainConfig())
    out = fam.train_step({"a": _data(cfg, 4)["a"]}, nets, opts, StepContext())
    assert "loss-d" not in out and "loss-cycle" in out
    for c, net in nets.items():
        changed = any(not torch.equal(before[c][k], v) for k, v in net.state_dict().items())
        assert changed == c.startswith("g_"), c


def test_cdcgan_needs_classes_and_labels() -> None:
    fam = get_family("cdcgan")
    with pytest.raises(ValueError, match="num_classes"):
        fam.build(ModelConfig(family="cdcgan", num_classes=0))
    nets = fam.build(_cfg("cdcgan", 2, 32, 8))
    with pytest.raises(ValueError, match="labels"):
        fam.sample(nets, torch.randn(2, 16))


def _forbid_sync(monkeypatch: pytest.MonkeyPatch) -> None:
    def guard(method: str) -> object:
        original = getattr(torch.Tensor, method)

        def refuse(self: torch.Tensor, *a: object, **k: object) -> object:
            # torch.optim reads its step counter, which it keeps on the CPU by design (no sync)
            if "torch/optim" in sys._getframe(1).f_code.co_filename.replace("\\", "/"):
                return original(self, *a, **k)
            raise AssertionError(f"host sync inside train_step: Tensor.{method}")

        return refuse

    for method in ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__"):
        monkeypatch.setattr(torch.Tensor, method, guard(method))


@pytest.mark.parametrize("name", ["dcgan", "cdcgan", "wgan-gp", "pix2pix", "cyclegan", "lapgan"])
def test_no_host_sync_inside_a_step(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    fam = get_family(name)
    cfg = _cfg(name, 2, 16, 4)
    nets = fam.build(cfg)
    opts = fam.optimizers(nets, TrainConfig(prox_mu=0.1))
    anchor = {c: [p.detach().clone() for p in n.parameters()] for c, n in nets.items()}
    ctx = StepContext(prox_mu=0.1, anchor=anchor)
    data = _data(cfg)
    with monkeypatch.context() as m:
        _forbid_sync(m)
        batch = fam.draw(data, 4)
        out = fam.train_step(batch, nets, opts, ctx)
    assert out  # the patch is gone: the caller syncs once
    assert all(torch.isfinite(v).item() for v in out.values())


def test_forbid_sync_guard_really_fires(monkeypatch: pytest.MonkeyPatch) -> None:
    with monkeypatch.context() as m:
        _forbid_sync(m)
        with pytest.raises(AssertionError, match="host sync"):
            torch.ones(1).item()


# issue 23: what each consumer decided by itself before the families declared it
OLD_CAPABILITIES = {
    "augment": {"dcgan", "cdcgan", "wgan-gp", "pix2pix"},  # small_data.AUGMENT_FAMILIES
    "r1": {"dcgan", "cdcgan", "pix2pix"},  # small_data.R1_FAMILIES
    "dp": {"dcgan", "cdcgan", "wgan-gp", "pix2pix", "cyclegan", "lapgan", "pgan"},  # + lapgan, pgan (issue 22)
    "ua-gan": {"dcgan", "cdcgan"},  # server/ua_gan.py and client/ua_gan.py UA_FAMILIES
}


def _old_preset_discriminator(c: str) -> bool:  # server/presets.py is_discriminator
    return c == "discriminator" or c.startswith("d_") or c.endswith("_discriminator")


def _old_image_generator(c: str) -> bool:  # server/images.py, fedsynth/commands/sample.py
    return c in ("generator", "decoder") or c.startswith("g_")


def _old_ema_generator(c: str) -> bool:  # server/ema.py, small_data.generator_components
    return c == "generator" or c.startswith("g_")


@pytest.mark.parametrize("name", families())
def test_family_declares_its_generators_and_discriminators(name: str) -> None:
    from shared_models.capabilities import CAPABILITIES
    from shared_models.family import FamilyBase

    family = get_family(name)
    assert isinstance(family, FamilyBase)
    gens, discs = family.generators, family.discriminators
    assert gens and discs and not set(gens) & set(discs)
    assert sorted(gens + discs) == sorted(family.components)  # a partition
    assert set(family.samplers) <= set(gens) and set(family.ema_components) <= set(gens)
    assert family.supports <= CAPABILITIES and not set(family.lacks) & family.supports
    # the same answers the consumers' own rules gave
    assert discs == tuple(c for c in family.components if _old_preset_discriminator(c))
    assert family.samplers == tuple(c for c in family.components if _old_image_generator(c))
    assert family.ema_components == tuple(c for c in family.components
                                          if _old_ema_generator(c))
    train = TrainConfig(lr_g=1e-3, lr_d=3e-4)
    opts = family.optimizers(family.build(ModelConfig(family=name, image_size=16, width=4,
                                                      num_classes=3 if name == "cdcgan" else 0)),
                             train)
    assert {c: o.param_groups[0]["lr"] for c, o in opts.items()} == {
        c: train.lr_g if c in gens else train.lr_d for c in family.components}


def test_capabilities_come_from_the_families() -> None:
    from shared_models.capabilities import DP, supporting
    from shared_models.family import FamilyBase

    for capability, old in OLD_CAPABILITIES.items():
        assert set(supporting(capability)) == old, capability
    # "dp" is declared where there is a DP-SGD path, nowhere else
    assert set(supporting(DP)) == {n for n in families()
                                   if type(get_family(n)).dp_plan is not FamilyBase.dp_plan}
    with pytest.raises(ValueError, match="unknown capability"):
        supporting("masks")


def test_optional_hooks_have_defaults_on_every_family() -> None:
    cfg = ModelConfig(family="maskgan", image_size=16, num_classes=2)
    x = torch.zeros(2, 1, 16, 16)
    for name in families():
        family = get_family(name)
        assert family.output == ("mask" if name == "aae" else "image")
        assert family.pair_keys == (("mask", "image") if name == "maskgan" else ("a", "b"))
        own = family.grid_inputs(cfg, 2)
        assert (own is not None) == (name == "maskgan")
        if name != "maskgan":
            assert family.show_input(x) is x
        if name != "aae":
            assert family.evaluate_holdout({}, {}, torch.device("cpu")) is None


def test_every_registered_family_answers_to_its_registry_name() -> None:
    """shared_models/registry.py names module and class; the family's own ``name`` agrees."""
    from shared_models.registry import FAMILIES

    for name in FAMILIES:
        assert get_family(name).name == name
    with pytest.raises(ValueError, match="unknown GAN family 'nope'; known: aae, cdcgan"):
        get_family("nope")
