"""The int8 reply format: an update against the received weights, per-channel scales, error
feedback at the hospital; the coordinator treats the payload as hostile input."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch

from bench import wire
from protocol import records as protocol
from server.validation import RejectedReply, validate_train_reply
from shared_models import ModelConfig, TrainConfig, encode, get_family
from shared_models.codec import (INT8_MAX, MAX_INT8_SCALE, SCALE_SUFFIX, CodecError,
                                 dequantize_update, quantize_update)


def _model(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"generator.conv.weight": rng.normal(0, 0.05, (16, 8, 3, 3)).astype(np.float32),
            "generator.bn.bias": rng.normal(0, 0.1, (16,)).astype(np.float32),
            "generator.bn.num_batches_tracked": np.array(7, dtype=np.int64)}


def test_train_config_accepts_int8_and_nothing_else() -> None:
    assert TrainConfig(wire_dtype="int8").wire_dtype == "int8"
    with pytest.raises(ValueError, match="int8"):
        TrainConfig(wire_dtype="int4")


def test_round_trip_error_is_at_most_half_a_step_per_channel() -> None:
    base = _model()
    rng = np.random.default_rng(1)
    trained = {k: (v + rng.normal(0, 1e-3, v.shape).astype(np.float32)
                   if v.dtype == np.float32 else v) for k, v in base.items()}
    trained["generator.conv.weight"][3] = base["generator.conv.weight"][3]  # a row unchanged
    wire_arrays, residual = quantize_update(trained, base)
    assert wire_arrays["generator.conv.weight"].dtype == np.int8
    scale = wire_arrays["generator.conv.weight" + SCALE_SUFFIX]
    assert scale.shape == (16,) and scale.dtype == np.float32
    assert wire_arrays["generator.bn.bias" + SCALE_SUFFIX].shape == (1,)
    assert wire_arrays["generator.bn.num_batches_tracked"] == 7  # integers unchanged
    back = dequantize_update(wire_arrays, base)
    for key in ("generator.conv.weight", "generator.bn.bias"):
        err = np.abs(back[key] - trained[key])
        s = wire_arrays[key + SCALE_SUFFIX]
        step = s.reshape((-1,) + (1,) * (err.ndim - 1)) if err.ndim >= 2 else s[0]
        assert (err <= step / 2 + 1e-6).all()  # round to nearest: half a step at most
        # the residual is exactly what did not get through
        np.testing.assert_allclose(residual[key], trained[key] - base[key] - (back[key] - base[key]),
                                   atol=1e-6)
        # and the error is small against the update, not against the weights
        update = np.abs(trained[key] - base[key]).max()
        assert err.max() <= update / INT8_MAX


def test_error_feedback_keeps_the_accumulated_error_bounded() -> None:
    """200 rounds of small updates: what the coordinator added up, minus what the hospital
    trained, stays within one round's rounding with error feedback; without it, it grows."""
    rng = np.random.default_rng(2)
    shape = (32, 64)
    truth = np.zeros(shape, np.float64)
    with_ef = np.zeros(shape, np.float64)
    without = np.zeros(shape, np.float64)
    residual: dict[str, np.ndarray] = {}
    worst_step = 0.0
    errors_ef, errors_plain = [], []
    for _ in range(200):
        # a drift plus noise, as local training gives: rounding errors are then correlated
        update = (rng.normal(0, 1e-3, shape) + 3e-4).astype(np.float32)
        base = {"g.w": np.zeros(shape, np.float32)}
        truth += update
        w_ef, residual = quantize_update({"g.w": update}, base, residual)
        with_ef += dequantize_update(w_ef, base)["g.w"]
        w_plain, _ = quantize_update({"g.w": update}, base)
        without += dequantize_update(w_plain, base)["g.w"]
        worst_step = max(worst_step, float(w_ef["g.w" + SCALE_SUFFIX].max()))
        errors_ef.append(np.abs(with_ef - truth).max())
        errors_plain.append(np.abs(without - truth).max())
    # with feedback: the accumulated error is the last residual, at most half a step (+ fp32)
    assert max(errors_ef) <= worst_step / 2 * 1.01
    assert errors_ef[-1] <= errors_ef[20] * 2  # flat, not growing
    # without: it keeps growing, and ends far beyond
    assert errors_plain[-1] > 5 * errors_ef[-1]
    assert errors_plain[-1] > 2 * errors_plain[20]
    print(f"\n[int8] accumulated max error after 200 rounds: with error feedback "
          f"{errors_ef[-1]:.2e}, without {errors_plain[-1]:.2e} (step <= {worst_step:.2e})")


def test_int8_reply_of_a_real_model_is_at_most_0_26_of_fp32_on_the_wire() -> None:
    model = ModelConfig(image_size=64)  # DCGAN-64, ~6.7 MB of fp32
    _, up32, payload = wire.train_messages(model, TrainConfig(wire_dtype="float32"))
    _, up8, _ = wire.train_messages(model, TrainConfig(wire_dtype="int8"), "float16")
    b32, b8 = wire.message_bytes(up32, "up"), wire.message_bytes(up8, "up")
    print(f"\n[int8] DCGAN-64 reply on the wire: fp32 {b32} B, int8 {b8} B: {b8 / b32:.4f}")
    assert b8 <= 0.26 * b32
    assert b32 >= payload


# ---------------------------------------------------------------- hostile replies

def _reply(arrays: dict[str, np.ndarray]):  # noqa: ANN202
    return protocol.train_reply(arrays, {protocol.NUM_EXAMPLES: 10,
                                         protocol.examples_key("generator"): 10})


def _honest() -> tuple[dict, dict]:
    base = _model()
    trained = {k: (v + 1e-3 if v.dtype == np.float32 else v) for k, v in base.items()}
    return base, quantize_update(trained, base)[0]


def _validate(wire_arrays: dict, base: dict, int8: bool = True):  # noqa: ANN202
    return validate_train_reply(_reply(wire_arrays), base, ("generator",),
                                notes=Counter(), int8_base=base if int8 else None)


def test_an_honest_int8_reply_is_accepted_as_weights() -> None:
    base, w = _honest()
    update, _ = _validate(w, base)
    assert set(update.arrays) == set(base)  # no "#scale" key reaches aggregation
    np.testing.assert_allclose(update.arrays["generator.bn.bias"], base["generator.bn.bias"] + 1e-3,
                               atol=1e-5)


KEY = "generator.conv.weight"


@pytest.mark.parametrize("name,mutate", [
    ("nan scale", lambda w: w[KEY + SCALE_SUFFIX].__setitem__(0, np.nan)),
    ("inf scale", lambda w: w[KEY + SCALE_SUFFIX].__setitem__(0, np.inf)),
    ("negative scale", lambda w: w[KEY + SCALE_SUFFIX].__setitem__(0, -1e-3)),
    ("huge scale", lambda w: w[KEY + SCALE_SUFFIX].__setitem__(0, MAX_INT8_SCALE * 2)),
    ("scale shape", lambda w: w.__setitem__(KEY + SCALE_SUFFIX, np.ones(15, np.float32))),
    ("per-element scale", lambda w: w.__setitem__(KEY + SCALE_SUFFIX,
                                                  np.ones((16, 8, 3, 3), np.float32))),
    ("scale dtype", lambda w: w.__setitem__(KEY + SCALE_SUFFIX, np.ones(16, np.float64))),
    ("no scale", lambda w: w.pop(KEY + SCALE_SUFFIX)),
    ("stray scale", lambda w: w.__setitem__("generator.bn.weight" + SCALE_SUFFIX,
                                            np.ones(1, np.float32))),
    ("int8 shape", lambda w: w.__setitem__(KEY, np.zeros((16, 8, 3, 4), np.int8))),
    ("int8 shape larger", lambda w: w.__setitem__(KEY, np.zeros((1 << 12, 8, 3, 3), np.int8))),
    ("int8 for an integer buffer", lambda w: w.__setitem__(
        "generator.bn.num_batches_tracked", np.array(1, np.int8))),
    ("int8 for a key not sent", lambda w: w.__setitem__("generator.extra.weight",
                                                        np.zeros((2, 2), np.int8))),
])
def test_hostile_int8_replies_are_refused(name: str, mutate) -> None:  # noqa: ANN001
    base, w = _honest()
    w = {k: v.copy() for k, v in w.items()}
    mutate(w)
    with pytest.raises(RejectedReply) as info:
        _validate(w, base)
    assert info.value.kind in ("int8", "extra-key", "missing-key"), (name, info.value.kind)


def test_int8_outside_an_int8_run_is_refused() -> None:
    base, w = _honest()
    with pytest.raises(RejectedReply) as info:
        _validate(w, base, int8=False)
    assert info.value.kind == "int8"


def test_max_scale_still_bounded_by_the_update_bound() -> None:
    """A scale just under the cap decodes, and the coordinator's norm bound still refuses it."""
    from server.aggregation import Update
    from server.validation import update_bound

    base, w = _honest()
    w[KEY + SCALE_SUFFIX] = np.full(16, MAX_INT8_SCALE, np.float32)
    w[KEY] = np.full(base[KEY].shape, INT8_MAX, np.int8)
    update, _ = _validate(w, base)
    assert update_bound({"h": update}, base)  # moved far beyond ratio x norm: refused


def test_a_hospitals_reply_through_the_client_app_with_error_feedback() -> None:
    """client/wire.py: two rounds for one hospital; the residual is kept in context.state."""
    from types import SimpleNamespace

    from flwr.app import Context, RecordDict

    from client.wire import RESIDUAL, int8_reply

    family = get_family("dcgan")
    torch.manual_seed(0)
    nets = family.build(ModelConfig(image_size=32))
    sent = {k: v.astype(np.float16) for k, v in encode(nets).items()}
    msg = SimpleNamespace(content=RecordDict({protocol.ARRAYS: protocol.to_record(sent)}))
    context = Context(run_id=1, node_id=5, node_config={}, state=RecordDict(), run_config={})
    trained = {k: (v.astype(np.float32) + 1e-3 if v.dtype == np.float16 else v)
               for k, v in sent.items()}
    first = int8_reply(trained, msg, context)
    assert RESIDUAL in context.state.array_records
    res1 = protocol.from_record(context.state.array_records[RESIDUAL])
    base = {k: v.astype(np.float32) if v.dtype == np.float16 else v for k, v in sent.items()}
    back = dequantize_update(first, base)
    for k, r in res1.items():  # residual = what did not get through this round
        np.testing.assert_allclose(r, trained[k] - back[k], atol=1e-6)
    second = int8_reply(trained, msg, context)  # same update again: the residual rides along
    back2 = dequantize_update(second, base)
    k = next(iter(res1))
    np.testing.assert_allclose(back2[k] - base[k], trained[k] - base[k] + res1[k]
                               - protocol.from_record(context.state.array_records[RESIDUAL])[k],
                               atol=1e-6)
    with pytest.raises(CodecError):
        dequantize_update({k: second[k]}, base)  # int8 without its scale
