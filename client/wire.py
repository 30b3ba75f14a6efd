"""The int8 reply format at the hospital: the update against what was received, error feedback.

``wire-dtype = "int8"``: the trained weights minus the weights this hospital received this round,
plus the rounding residual it kept from its previous int8 reply, go out as int8 with per-channel
scales (``shared_models.codec.quantize_update``); the new residual stays here, in
``context.state`` (Flower keeps it per hospital and run across rounds, like the hospital's local
weights in ``client.app``), and is added to the next round's update before quantising. It is
derived from weights only, never from an image; it never leaves the hospital except folded into
the next update, which is what error feedback is for.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np
from flwr.app import Context, Message

from protocol import records as protocol
from shared_models.codec import quantize_update

RESIDUAL = "fedsynth-int8-residual"  # in context.state: this run's quantisation residual


def int8_reply(arrays: Mapping[str, np.ndarray], msg: Message, context: Context
               ) -> dict[str, np.ndarray]:
    """``arrays`` (float32 weights to send) as an int8 update against ``msg``'s weights."""
    received = protocol.from_record(msg.content[protocol.ARRAYS])
    residual = (protocol.from_record(context.state.array_records[RESIDUAL])
                if RESIDUAL in context.state.array_records else {})
    wire, kept = quantize_update(arrays, received, residual)
    # a residual for a key not sent this round is kept for the round that sends it again
    kept = {**{k: v for k, v in residual.items() if k not in kept}, **kept}
    context.state[RESIDUAL] = protocol.to_record(kept)
    return wire
