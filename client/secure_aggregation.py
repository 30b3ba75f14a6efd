"""The hospital's side of secure aggregation: Flower's ``secaggplus_mod`` around the train handler.

Why a wrapper and not the bare mod: the mod raises on any train message without its protocol
record, and fedsynth's ClientApp serves plain and secure runs alike; it only handles a train
message that carries the record (``server/secure_aggregation.py`` sends it in all four stages).
The mod then runs the protocol's key agreement, secret sharing and masking itself (no
cryptography of fedsynth's); only in its "collect masked vectors" stage does it call the train
handler, and it expects the legacy ``FitRes`` reply layout. ``_masked_input`` turns fedsynth's
reply into that layout: the hospital's *update* (trained - received) encoded by
``protocol.secure_vector`` (clipped per coordinate, weighted per component by capped example
counts), with the constant weight that makes Flower's weighting a plain mean. The trained arrays
themselves are never in the reply; the mod masks the encoded list and clears the arrays.

The scalar metrics (losses, example counts, eval-*) still travel in the clear, as in every run.

Before the mod sees a protocol message, ``client.admission.check_secure_parameters`` refuses a
threshold below 2 or fewer than 2 other hospitals (the coordinator's protocol messages are not
signed; these are the parameters that would expose this hospital's update).

Which stage is next, the hospital's key pair and its shares of the others' secrets live in the
run's ``context.state`` (Flower keeps it per node across messages of a run).
"""

from __future__ import annotations

from flwr.app import Context, Message, MessageType

from protocol import records as protocol
from protocol.secure_vector import components_of, encode_update, secure_keys

from .admission import SECURE_RECORD, check_secure_parameters
from .settings import HospitalSettings


def secure_aggregation_mod(msg: Message, context: Context, call_next):  # type: ignore[no-untyped-def]
    """A ClientApp mod: SecAgg+ for train messages of a secure round, nothing otherwise."""
    if (str(msg.metadata.message_type) != MessageType.TRAIN
            or SECURE_RECORD not in msg.content.config_records):
        return call_next(msg, context)
    check_secure_parameters(HospitalSettings.from_node_config(context.node_config),
                            msg.content.config_records[SECURE_RECORD])
    from flwr.client.mod import secaggplus_mod

    def handler(m: Message, c: Context) -> Message:
        return _masked_input(m, c, call_next(m, c))

    from protocol.flower_private import masked_as_arrays

    # the masked vector as chunked arrays, not one ConfigRecord object (masked_as_arrays: why)
    return masked_as_arrays(secaggplus_mod(msg, context, handler))


def _masked_input(msg: Message, context: Context, reply: Message) -> Message:
    """fedsynth's train reply as the ``FitRes`` the mod masks (see the module docstring)."""
    if reply.has_error():
        return reply  # the mod fails on it; this hospital counts as dropped out
    from protocol.flower_private import SECAGG_STATE, legacy_fitres_record

    state = context.state.config_records[SECAGG_STATE]
    clip, max_examples = float(state["clipping_range"]), float(state["max_weight"])
    trained = protocol.from_record(reply.content[protocol.ARRAYS])
    received = protocol.from_record(msg.content[protocol.ARRAYS])
    metrics = {k: v for k, v in reply.content[protocol.METRICS].items()}
    total = float(metrics.get(protocol.NUM_EXAMPLES, 0.0))
    examples = {c: float(metrics.get(protocol.examples_key(c), total))
                for c in components_of(secure_keys(trained))}
    vector = encode_update(trained, received, examples, clip, max_examples)
    return Message(legacy_fitres_record(vector, int(round(max_examples)), metrics),
                   reply_to=msg)
