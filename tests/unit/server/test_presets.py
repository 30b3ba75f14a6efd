"""Each named preset aggregates each component as its table says; UA-GAN's math by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, Message

from client.ua_gan import reply_plan, ua_discriminator_round
from protocol import records as protocol
from server.presets import PRESETS, make_strategy, preset_policies
from server.strategy import GanStrategy
from server.ua_gan import FAKES, GRADS, LOGITS, UA_MESSAGE_TYPE, UaGanStrategy, \
    generator_input_grad
from shared_models import ModelConfig, TrainConfig, get_family
from tests.harness.flower_helpers import task_identity
from tests.unit.server.test_strategy import ALL, COMPONENTS, NO_B, NORM, global_model, run_round

CYCLEGAN = get_family("cyclegan")  # the components of the round helpers (test_strategy.py)
DCGAN = get_family("dcgan")
assert CYCLEGAN.components == COMPONENTS

# hospital 1 replies 1.0 everywhere with all domains, hospital 2 replies 5.0 without domain B
EXPECTED = {  # preset -> key -> value after one round, by hand
    "fedgan": {"g_ab.w": 4.0, "g_ba.w": 1.0, "d_a.w": 4.0, "d_b.w": 1.0, "g_ab.norm.weight": 4.0},
    "fedmed-gan": {"g_ab.w": 4.0, "g_ba.w": 1.0, "d_a.w": 0.0, "d_b.w": 0.0,
                   "g_ab.norm.weight": 4.0, "d_a.norm.weight": 0.0},
    "local-d": {"g_ab.w": 4.0, "g_ba.w": 1.0, "d_a.w": 0.0, "d_b.w": 0.0},
    "fedbn": {"g_ab.w": 4.0, "g_ba.w": 1.0, "d_a.w": 4.0, "d_b.w": 1.0,
              "g_ab.norm.weight": 0.0, "d_a.norm.weight": 0.0},
}


@pytest.mark.parametrize("preset", sorted(EXPECTED))
def test_preset_aggregates_each_component_as_specified(preset: str) -> None:
    strategy = make_strategy(preset, CYCLEGAN, norm_keys=NORM)
    _, _, new, _ = run_round(strategy, {1: (1.0, ALL), 2: (5.0, NO_B)})
    for key, value in EXPECTED[preset].items():
        assert new[key] == pytest.approx(np.full_like(new[key], value)), key


def test_overrides_change_shared_components_only() -> None:
    policies = preset_policies("local-d", DCGAN,
                               {"reducer": "median", "sync_every": 3})
    assert policies["generator"].reducer == "median" and policies["generator"].sync_every == 3
    assert not policies["discriminator"].shared and policies["discriminator"].reducer == "mean"
    with pytest.raises(ValueError, match="unknown policy field"):
        preset_policies("fedgan", DCGAN, {"momentum": 0.9})
    with pytest.raises(ValueError, match="unknown strategy preset"):
        make_strategy("fedprox-gan", DCGAN)
    assert set(EXPECTED) | {"ua-gan"} == set(PRESETS)


def test_fedadam_preset_override_steps_the_global_copy() -> None:
    strategy = make_strategy("fedgan", CYCLEGAN,
                             overrides={"server_opt": "adam", "server_lr": 0.1})
    _, _, new, _ = run_round(strategy, {1: (1.0, ALL)})
    # delta 1: m = 0.1, v = 0.01, step = 0.1 * 0.1 / (0.1 + 1e-3)
    assert new["g_ab.w"][0] == pytest.approx(0.1 * 0.1 / 0.101, rel=1e-5)


def test_reply_plan_follows_the_round_config() -> None:
    nets = get_family("dcgan").build(ModelConfig(image_size=16, width=4, latent_dim=8))
    comps, include = reply_plan({"reply-components": "generator",
                                 "local-norm-components": "generator"}, nets,
                                ("generator", "discriminator"))
    assert comps == ("generator",) and include is not None
    assert not include("generator", "project.1.weight")  # BatchNorm1d of the generator
    assert include("generator", "project.0.weight")
    assert reply_plan({}, nets, ("generator", "discriminator")) == (
        ("generator", "discriminator"), None)


def test_ua_generator_gradient_by_hand() -> None:
    """Odds 1 and 3 with equal shares: Φ = 2, D_ua = 2/3, dL/dℓ = -1/3 * (1/4, 3/4)."""
    logits = np.array([[0.0], [math.log(3.0)]])
    grads = np.array([[[1.0]], [[2.0]]])
    dx, loss, d_ua = generator_input_grad(logits, grads, np.array([5.0, 5.0]))
    assert d_ua == pytest.approx(2 / 3)
    assert loss == pytest.approx(math.log(1.5))
    assert dx[0, 0] == pytest.approx(-1 / 12 * 1.0 - 1 / 4 * 2.0)


def test_ua_round_moves_only_the_generator_and_sends_no_weights() -> None:
    model = ModelConfig(image_size=16, width=4, latent_dim=8)
    torch.manual_seed(0)
    family = get_family("dcgan")
    nets = family.build(model)
    from shared_models import encode

    start = encode(nets)
    strategy = make_strategy("ua-gan", family, model=model,
                             train=TrainConfig(local_steps=2, batch_size=4), fake_batch=4)
    assert isinstance(strategy, UaGanStrategy)
    hospital_d = family.build(model)["discriminator"]
    opt = torch.optim.Adam(hospital_d.parameters(), 1e-3)
    with task_identity():
        msgs = list(strategy.configure_train(1, protocol.to_record(start), ConfigRecord({}),
                                             FakeGrid2()))
        assert msgs[0].metadata.message_type == UA_MESSAGE_TYPE
        sent = protocol.from_record(msgs[0].content[protocol.ARRAYS])
        assert set(sent) == {FAKES} and sent[FAKES].shape == (4, 1, 16, 16)
        real = torch.rand(6, 1, 16, 16) * 2 - 1
        logits, grads, metrics = ua_discriminator_round(
            hospital_d, opt, real, torch.from_numpy(sent[FAKES]), steps=2, batch_size=4)
        good = Message(protocol.train_reply({LOGITS: logits, GRADS: grads},
                                            {**metrics, protocol.NUM_EXAMPLES: 6}),
                       reply_to=msgs[0])
        no_grads = Message(protocol.train_reply({LOGITS: logits}, {protocol.NUM_EXAMPLES: 6}),
                           reply_to=msgs[1])
        record, out = strategy.aggregate_train(1, [good, no_grads])
    new = protocol.from_record(record)
    assert strategy.last_train.rejected_reasons == {"missing-key": 1}
    assert not np.allclose(new["generator.project.0.weight"], start["generator.project.0.weight"])
    for key in start:
        if key.startswith("discriminator."):
            np.testing.assert_array_equal(new[key], start[key])
    assert 0.0 < out["d-fake-ua"] < 1.0


class FakeGrid2:
    def get_node_ids(self) -> list[int]:
        return [1, 2]


def test_ua_gan_refuses_families_without_a_probability_discriminator() -> None:
    with pytest.raises(ValueError, match="ua-gan"):
        make_strategy("ua-gan", CYCLEGAN, model=ModelConfig(family="cyclegan"),
                      train=TrainConfig())
    assert isinstance(make_strategy("fedgan", DCGAN), GanStrategy)


AAE_NORM = frozenset({"encoder.norm.weight", "decoder.norm.weight"})
AAE_EXPECTED = {  # preset -> component -> (weight, norm) after one round; 0.0: kept at home
    "fedgan": {"encoder": (4.0, 4.0), "decoder": (4.0, 4.0), "latent_discriminator": (4.0, None)},
    "fedmed-gan": {"encoder": (4.0, 4.0), "decoder": (4.0, 4.0),
                   "latent_discriminator": (0.0, None)},
    "local-d": {"encoder": (4.0, 4.0), "decoder": (4.0, 4.0), "latent_discriminator": (0.0, None)},
    "fedbn": {"encoder": (4.0, 0.0), "decoder": (4.0, 0.0), "latent_discriminator": (4.0, None)},
}


@pytest.mark.parametrize("preset", sorted(AAE_EXPECTED))
def test_adversarial_autoencoder_components_under_every_preset(preset: str) -> None:
    """aae (issue 15): encoder and decoder are shared like generators, the latent discriminator
    is a discriminator (private under local-d / fedmed-gan); UA-GAN refuses the family."""
    from tests.unit.server.test_strategy import FakeGrid, reply

    aae = get_family("aae")
    components = aae.components
    assert components == ("encoder", "decoder", "latent_discriminator")
    arrays = {f"{c}.w": np.zeros(2, np.float32) for c in components}
    arrays.update({k: np.zeros(1, np.float32) for k in AAE_NORM})
    strategy = make_strategy(preset, aae, norm_keys=AAE_NORM)
    answers = {1: (1.0, dict.fromkeys(components, 10)), 2: (5.0, dict.fromkeys(components, 30))}
    with task_identity():
        out = list(strategy.configure_train(1, protocol.to_record(arrays), ConfigRecord({}),
                                            FakeGrid(answers)))
        want = strategy.expected_keys(1, arrays)
        replies = [reply(m, {k: np.full_like(arrays[k], answers[m.metadata.dst_node_id][0])
                             for k in want}, answers[m.metadata.dst_node_id][1]) for m in out]
        record, _ = strategy.aggregate_train(1, replies)
    new = protocol.from_record(record)
    for component, (w, norm) in AAE_EXPECTED[preset].items():
        assert new[f"{component}.w"] == pytest.approx(np.full(2, w)), (preset, component)
        if norm is not None:
            assert new[f"{component}.norm.weight"] == pytest.approx([norm]), (preset, component)
    with pytest.raises(ValueError, match="ua-gan"):
        make_strategy("ua-gan", aae, model=ModelConfig(family="aae"), train=TrainConfig())
