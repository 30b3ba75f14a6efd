"""A curious coordinator against UA-GAN (trust review, finding 5): rebuild a hospital's training
slice from one ``train.ua_gan`` reply.

The attack, as a coordinator can run it through the hospital's real ClientApp:

1. a TRAIN message plants a crafted discriminator D0 (lr 0: the hospital's weights do not move and
   its ``train`` handler keeps the whole model in ``context.state``);
2. one ``train.ua_gan`` round asks for 1 step, batch 1, lr_d 1 on ONE all-zero "generated" image;
3. the coordinator knows D0, the seed (hence which slice index is drawn), Adam's betas, lr and
   steps, so it simulates the hospital's step differentiably (``_simulate``) and solves the returned
   input gradient for the real slice (``_invert``: L-BFGS from an all-zero image).

D0 (``_planted_discriminator``) makes that simulation nearly linear in the slice: every layer sits
in the linear part of its LeakyReLU (large biases), BatchNorm sees fluctuations far below its eps
(so train-mode normalisation is linear), the first three convolutions are orthogonal
space-to-depth maps (32x32 -> 64 channels x 4x4, invertible), and the head's weight is ~1e-22 so
every parameter gradient is far below Adam's eps=1e-8 and Adam's first step, lr*g/(|g|+eps), is
linear in g. The head then moves by lr/eps * g ~ the slice's features, and the input gradient of
the stepped D at the zero image is an invertible linear image of the slice. The BatchNorm scales
of the last block are spread over a decade, so the inversion is not just "show the gradient":
a reply that does not come from D0 maps to noise, not to a picture of the anatomy.

On the vulnerable code (commit e407197, D restored from the TRAIN message's state, steps / batch /
lr from the message) this reconstructs the used slice with correlation 0.993 (slice 29 of 32;
the best match among all slices is that one). ``test_coordinator_cannot_rebuild_a_training_slice``
asserts the defended property: the reconstruction correlates <= 0.3 with EVERY training slice. It
fails on that code and must pass once the UA discriminator is the hospital's own (secret seed,
never loaded from a message) and trained by the hospital's floor (batch, lr, steps): 0.25 on
c026aad.
``test_train_message_does_not_plant_the_ua_discriminator`` is the cheap direct check of the first
half of that fix.
"""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from flwr.app import Context, RecordDict

from protocol import records as protocol
from fedsynth.demo_data import build_demo_hospitals
from shared_models import ModelConfig, TrainConfig, encode, get_family

from tests.harness.flower_helpers import server_message, task_identity

try:  # the message type the coordinator sends (moved between modules over time)
    from server.ua_gan import UA_MESSAGE_TYPE
except ImportError:  # pragma: no cover
    UA_MESSAGE_TYPE = "train.ua_gan"

FAKES, GRADS, LOGITS = "fakes", "grads", "logits"  # the UA-GAN wire names (server/ua_gan.py)

# Models of their own: the hospital process caches trainers / optimisers per model config, and no
# other test may share this one's (an optimiser created by another test would keep its lr).
ATTACK_MODEL = ModelConfig(family="dcgan", image_size=32, width=16, latent_dim=8)
PLANT_MODEL = ModelConfig(family="dcgan", image_size=32, width=4, latent_dim=8)
NODE_ID = 7
BOUND = 0.3  # the defended property: no training slice is rebuilt better than this

_RUN_IDS = itertools.count(9001)  # a fresh Flower run per exchange: hospitals keep state per run

BN_EPS, BN_MOMENTUM, SLOPE = 1e-5, 0.1, 0.2
TRAIN_D_FORWARDS = 3  # DCGAN.train_step runs D three times (real, fake, fake for G) per step


def hospital_settings(folder: Path, cache: Path) -> dict:
    """The hospital's node config: the ONE place its settings are written."""
    return {"data-dir": str(folder), "cache-dir": str(cache), "accept-unsigned-models": True}


@pytest.fixture(scope="module")
def hospital(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("ua-attack")
    folder = build_demo_hospitals(root, 1, matrix=32)[0]
    return hospital_settings(folder, root / "cache")


def _training_slices(node: dict, model: ModelConfig) -> np.ndarray:
    from client.datasets import local_data
    from client.settings import HospitalSettings

    return local_data(HospitalSettings.from_mapping(node), model).train["image"].numpy()[:, 0]


def _send(node_config: dict, context, model: ModelConfig, train: TrainConfig, server_round: int,
          arrays: dict, message_type: str = "train"):
    from client.app import app

    content = RecordDict({protocol.ARRAYS: protocol.to_record(arrays),
                          protocol.CONFIG: protocol.train_config(model, train, server_round)})
    return app(server_message(content, NODE_ID, message_type), context)


def _ua_round(node: dict, model: ModelConfig, nets: dict, ua: TrainConfig,
              fakes: np.ndarray) -> dict[str, np.ndarray] | None:
    """TRAIN with ``nets`` at lr 0 (the plant), then one UA round; the reply's arrays.

    None when the hospital refuses the UA round (a hospital that will not run it leaks nothing).
    """
    from client.app import HospitalError

    plant = TrainConfig(local_steps=1, batch_size=2, lr_g=0.0, lr_d=0.0, seed=ua.seed)
    run_id = next(_RUN_IDS)
    with task_identity(run_id=run_id, node_id=NODE_ID):
        context = Context(run_id=run_id, node_id=NODE_ID, node_config=node, state=RecordDict(),
                          run_config={})
        reply = _send(node, context, model, plant, 1, encode(nets))
        assert not reply.has_error()
        try:
            reply = _send(node, context, model, ua, 2, {FAKES: fakes}, UA_MESSAGE_TYPE)
        except HospitalError:
            return None
    if reply.has_error():
        return None
    return protocol.from_record(reply.content[protocol.ARRAYS])


# --- the attacker -------------------------------------------------------------------------------

def _planted_discriminator(seed: int = 0) -> dict:
    """Generator as built, discriminator crafted as described in the module docstring."""
    gen = torch.Generator().manual_seed(seed)
    nets = get_family("dcgan").build(ATTACK_MODEL)
    d = nets["discriminator"]
    sd = {k: v.clone() for k, v in d.state_dict().items()}
    taps = [(1, 1), (1, 2), (2, 1), (2, 2)]  # a stride-2, pad-1, 4x4 kernel's own 2x2 block

    def space_to_depth(weight: torch.Tensor, n_in: int, scale: float) -> torch.Tensor:
        q, _ = torch.linalg.qr(torch.randn(4 * n_in, 4 * n_in, generator=gen, dtype=torch.float64))
        w = torch.zeros_like(weight)
        for o in range(4 * n_in):
            for i in range(n_in):
                for t, (a, b) in enumerate(taps):
                    w[o, i, a, b] = float(q[o, 4 * i + t]) * scale
        return w

    sd["body.0.conv.weight"] = space_to_depth(sd["body.0.conv.weight"], 1, 1.0)
    sd["body.0.conv.bias"].fill_(3.0)  # > |W1 x| for x in [-1, 1]: LeakyReLU is the identity
    sd["body.1.conv.weight"] = space_to_depth(sd["body.1.conv.weight"], 4, 1e-4)
    sd["body.2.conv.weight"] = space_to_depth(sd["body.2.conv.weight"], 16, 1e-2)
    for i in (1, 2):
        sd[f"body.{i}.adn.N.running_mean"].zero_()
        sd[f"body.{i}.adn.N.running_var"].fill_(1.0)
    sd["body.1.adn.N.weight"].fill_(1.0)
    sd["body.1.adn.N.bias"].fill_(1.0)
    c3 = 1e-10 * 10 ** (-torch.rand(64, generator=gen))  # spread over a decade
    sd["body.2.adn.N.weight"] = c3
    sd["body.2.adn.N.bias"] = c3.clone()
    sd["head.weight"].fill_(1e-22)
    sd["head.bias"].zero_()
    d.load_state_dict(sd)
    return nets


def _d_forward(p: dict, b: dict, x: torch.Tensor, train: bool) -> tuple[torch.Tensor, dict]:
    """DCGANDiscriminator (2D, unconditional), functionally, with its BatchNorm buffers."""
    b = dict(b)
    h = F.leaky_relu(F.conv2d(x, p["body.0.conv.weight"], p["body.0.conv.bias"], 2, 1), SLOPE)
    for i in (1, 2):
        z = F.conv2d(h, p[f"body.{i}.conv.weight"], None, 2, 1)
        n = f"body.{i}.adn.N."
        if train:
            mean, var = z.mean((0, 2, 3)), z.var((0, 2, 3), unbiased=False)
            count = z.numel() // z.shape[1]
            b[n + "running_mean"] = (1 - BN_MOMENTUM) * b[n + "running_mean"] + BN_MOMENTUM * mean
            b[n + "running_var"] = ((1 - BN_MOMENTUM) * b[n + "running_var"]
                                    + BN_MOMENTUM * var * count / (count - 1))
        else:
            mean, var = b[n + "running_mean"], b[n + "running_var"]
        zh = (z - mean[None, :, None, None]) / torch.sqrt(var[None, :, None, None] + BN_EPS)
        h = F.leaky_relu(p[n + "weight"][None, :, None, None] * zh
                         + p[n + "bias"][None, :, None, None], SLOPE)
    return (h.flatten(1) @ p["head.weight"].T + p["head.bias"]).squeeze(1), b


def _simulate(p: dict, b: dict, real: torch.Tensor, fakes: torch.Tensor,
              train: TrainConfig) -> torch.Tensor:
    """The hospital's UA round as the attacker models it: d grads / d fakes, differentiable in
    ``real`` (the candidate slice). The plant's TRAIN round moved only BatchNorm buffers; its data
    is unknown and taken as zero images (the crafted D makes their contribution negligible)."""
    zeros = torch.zeros_like(fakes[:1])
    for _ in range(TRAIN_D_FORWARDS):
        _, b = _d_forward(p, b, zeros, True)
    names = list(p)
    m = {k: torch.zeros_like(p[k]) for k in names}
    v = {k: torch.zeros_like(p[k]) for k in names}
    for t in range(1, train.local_steps + 1):
        out_r, b = _d_forward(p, b, real, True)
        out_f, b = _d_forward(p, b, fakes, True)
        loss = (F.binary_cross_entropy_with_logits(out_r, torch.ones_like(out_r))
                + F.binary_cross_entropy_with_logits(out_f, torch.zeros_like(out_f)))
        grads = torch.autograd.grad(loss, [p[k] for k in names], create_graph=True)
        stepped = {}
        for k, g in zip(names, grads):  # torch.optim.Adam's update, written out
            m[k] = train.beta1 * m[k] + (1 - train.beta1) * g
            v[k] = train.beta2 * v[k] + (1 - train.beta2) * g * g
            denom = torch.sqrt(v[k].clamp_min(1e-300)) / math.sqrt(1 - train.beta2 ** t) + 1e-8
            stepped[k] = p[k] - train.lr_d / (1 - train.beta1 ** t) * m[k] / denom
        p = stepped
    x = fakes.clone().requires_grad_(True)
    logits, _ = _d_forward(p, b, x, False)
    (a,) = torch.autograd.grad(logits.sum(), x, create_graph=True)
    return a


def _invert(nets: dict, train: TrainConfig, fakes: np.ndarray, observed: np.ndarray,
            iters: int = 100) -> np.ndarray:
    """The slice whose simulated reply matches the observed input gradients (L-BFGS from 0).

    The observed reply is rescaled to the size the model gives a typical image, so a reply of
    another size (one not made by D0) is still fitted rather than left at the starting point."""
    d = nets["discriminator"]
    state = {k: v.detach().double() for k, v in d.state_dict().items()}
    p = {k: state[k].clone().requires_grad_(True) for k, _ in d.named_parameters()}
    b = {k: state[k] for k in state if "running" in k}
    fakes_t = torch.as_tensor(fakes, dtype=torch.float64)
    probe = 0.5 * torch.randn(fakes_t[:1].shape, generator=torch.Generator().manual_seed(1),
                              dtype=torch.float64)
    base = _simulate(p, b, torch.zeros_like(probe), fakes_t, train).detach()
    size = float((_simulate(p, b, probe, fakes_t, train).detach() - base).norm())
    target = torch.as_tensor(observed, dtype=torch.float64)
    target = base + target / target.norm() * size
    x = torch.zeros_like(probe).requires_grad_(True)
    opt = torch.optim.LBFGS([x], lr=1, max_iter=iters, history_size=50, tolerance_grad=1e-14,
                            tolerance_change=1e-13, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = ((_simulate(p, b, x, fakes_t, train) - target) / size).pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return x.detach()[0, 0].numpy()


def _corr(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel() - a.mean(), b.ravel() - b.mean()
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-30))


def _used_slice(train: TrainConfig, server_round: int, n: int) -> int:
    """The slice index the vulnerable hospital drew (its generator seeded from the message)."""
    gen = torch.Generator().manual_seed(train.seed * 1_000_003 + server_round)
    return int(torch.randint(n, (1,), generator=gen))


def attack(node: dict) -> tuple[np.ndarray | None, np.ndarray]:
    """(reconstruction or None when the hospital refused, the training slices)."""
    torch.manual_seed(0)
    nets = _planted_discriminator()
    ua = TrainConfig(local_steps=1, batch_size=1, lr_d=1.0, seed=5)
    fakes = np.zeros((1, 1, 32, 32), np.float32)
    out = _ua_round(node, ATTACK_MODEL, nets, ua, fakes)
    slices = _training_slices(node, ATTACK_MODEL)
    if out is None:
        return None, slices
    return _invert(nets, ua, fakes, out[GRADS]), slices


@pytest.mark.slow
@pytest.mark.parametrize("secret", [11, 2**40 + 7, 987654321, 5, 31337, 2**61 - 1])
def test_coordinator_cannot_rebuild_a_training_slice(hospital: dict, secret: int,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Defended property: the attack's reconstruction correlates <= 0.3 with every slice.

    FAILS on the vulnerable code (e407197: correlation 0.993 with the used slice) and passes
    once the UA discriminator is the hospital's own and trained by its floor (c026aad). The
    hospital's secret seed is drawn per run; here three fixed ones stand in for it, so the test
    is repeatable (the attacker knows none of them).
    """
    import client.ua_gan

    monkeypatch.setattr(client.ua_gan.secrets, "randbits", lambda _bits: secret)
    rebuilt, slices = attack(hospital)
    if rebuilt is None:
        return  # the hospital refused the round: nothing came back to invert
    corrs = [_corr(rebuilt, s) for s in slices]
    best = int(np.argmax(corrs))
    print(f"[ua-attack] secret {secret}: best correlation {corrs[best]:.3f} (slice {best})")
    assert max(corrs) <= BOUND, (
        f"the coordinator rebuilt training slice {best} (correlation {corrs[best]:.5f}; "
        f"slice the message's seed picks: {_used_slice(TrainConfig(seed=5), 2, len(slices))})")


def test_train_message_does_not_plant_the_ua_discriminator(hospital: dict) -> None:
    """A TRAIN message's discriminator must not become the UA discriminator.

    The planted D has every weight 0 and head bias 1234.5: its logit is 1234.5 for any image and its
    input gradient is 0. A UA round within any sane floor (a few steps at lr <= 1e-3) moves that
    bias by well under 1, so a hospital that trained the planted D answers ~1234.5 and zero
    gradients; its own (secret-seeded DCGAN) D answers logits of order 1 and non-zero gradients.
    """
    nets = get_family("dcgan").build(PLANT_MODEL)
    d = nets["discriminator"]
    with torch.no_grad():
        for name, t in d.state_dict().items():
            if t.is_floating_point() and "running_var" not in name:
                t.zero_()
        d.head.bias.fill_(1234.5)
    ua = TrainConfig(local_steps=5, batch_size=16, lr_d=2e-4, seed=3)
    fakes = np.random.default_rng(0).uniform(-1, 1, (16, 1, 32, 32)).astype(np.float32)
    out = _ua_round(hospital, PLANT_MODEL, nets, ua, fakes)
    assert out is not None, "the hospital refused an ordinary UA round"
    logits = np.asarray(out[LOGITS], dtype=np.float64)
    assert np.all(np.abs(logits - 1234.5) > 100), f"UA D answers like the planted one: {logits}"
    assert np.any(np.asarray(out[GRADS]) != 0)
