"""Wire bytes of one round against the floor: 2 x shared parameter bytes x hospitals.

Measured with Flower 1.42's own serialisers, the way its gRPC transport sends a message: the
message's metadata as a ``Message`` proto with its content removed plus its ``ObjectTree`` (in
``PullMessagesResponse`` / ``PushMessagesRequest``), then every object of the message's tree
(``RecordDict``, ``ArrayRecord``, each ``Array`` and its ``ArrayChunk``s, ``ConfigRecord``,
``MetricRecord``) deflated and carried in its own ``PullObject*`` / ``PushObject*`` request and
response. Per gRPC message we add gRPC's 5-byte length prefix and one 9-byte HTTP/2 DATA frame header
per 16 KiB; HTTP/2 HEADERS frames (HPACK-compressed, a few dozen bytes per call) and TLS records are
not counted. Only the hospital <-> SuperLink link is counted (the consortium's network); the
ServerApp <-> SuperLink hop is local to the coordinator.

Down is what ``server.federation.run_federation`` sends today (the global model as float32 arrays,
whatever ``wire_dtype`` says); up is ``protocol.train_reply`` in ``wire_dtype``.
"""

from __future__ import annotations

import argparse
import time
import uuid
from dataclasses import dataclass
from typing import Mapping

import numpy as np
from flwr.app import Message, Metadata, RecordDict
from flwr.app.message.message import make_message, remove_content_from_message
from flwr.common.serde import message_to_proto
from flwr.proto.fleet_pb2 import PullMessagesResponse, PushMessagesRequest
from flwr.proto.message_pb2 import (
    PullObjectRequest,
    PullObjectResponse,
    PushObjectRequest,
    PushObjectResponse,
)
from flwr.proto.node_pb2 import Node
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects, get_object_tree

from protocol import records as protocol
from shared_models import ModelConfig, TrainConfig, encode, get_family
from shared_models.codec import nbytes

GRPC_PREFIX = 5  # compressed flag + 4-byte length, per gRPC message
HTTP2_FRAME = 9  # DATA frame header
HTTP2_MAX_FRAME = 16_384

# Realistic identifiers: 64-bit ids, sha256-hex object ids (Flower's own), uuid4 session ids.
RUN_ID = 0x7A3F_12C4_55E1_9B02
SERVER_NODE = 1
HOSPITAL_NODE = 0x5D2E_8A41_C3B7_0F19
SESSION = str(uuid.UUID(int=0x1234_5678_9ABC_DEF0_1234_5678_9ABC_DEF0))


def grpc_bytes(payload: int) -> int:
    """Bytes of one gRPC message of ``payload`` bytes on an HTTP/2 stream (no HEADERS/TLS)."""
    body = payload + GRPC_PREFIX
    return body + HTTP2_FRAME * max(1, -(-body // HTTP2_MAX_FRAME))


def _message(content: RecordDict, *, src: int, dst: int, reply_to: str = "",
             message_type: str = "train") -> Message:
    meta = Metadata(run_id=RUN_ID, message_id="", src_node_id=src, dst_node_id=dst,
                    reply_to_message_id=reply_to, group_id="1", created_at=time.time(),
                    ttl=3600.0, message_type=message_type)
    msg = make_message(metadata=meta, content=content)
    msg.metadata.__dict__["_message_id"] = msg.object_id  # what Flower sets when it stores it
    return msg


def message_bytes(msg: Message, direction: str) -> int:
    """Bytes a hospital's link carries for ``msg``: ``"down"`` (pulled) or ``"up"`` (pushed)."""
    node = Node(node_id=HOSPITAL_NODE)
    head = message_to_proto(remove_content_from_message(msg))
    tree = get_object_tree(msg)
    objects = get_all_nested_objects(msg)
    if direction == "down":
        total = grpc_bytes(PullMessagesResponse(messages_list=[head],
                                                message_object_trees=[tree]).ByteSize())
        for obj_id, obj in objects.items():
            total += grpc_bytes(PullObjectRequest(node=node, run_id=RUN_ID,
                                                  object_id=obj_id).ByteSize())
            total += grpc_bytes(PullObjectResponse(object_found=True, object_available=True,
                                                   object_content=obj.deflate()).ByteSize())
    elif direction == "up":
        total = grpc_bytes(PushMessagesRequest(node=node, messages_list=[head],
                                               message_object_trees=[tree]).ByteSize())
        for obj_id, obj in objects.items():
            total += grpc_bytes(PushObjectRequest(node=node, run_id=RUN_ID, object_id=obj_id,
                                                  object_content=obj.deflate(),
                                                  session_id=SESSION).ByteSize())
            total += grpc_bytes(PushObjectResponse(stored=True).ByteSize())
    else:
        raise ValueError(f"direction must be 'down' or 'up', got {direction!r}")
    return total


def train_messages(model: ModelConfig, train: TrainConfig, down_dtype: str = "float32",
                   seed: int = 0) -> tuple[Message, Message, int]:
    """A round's train message to one hospital and its reply, plus the fp32 shared payload bytes."""
    import torch

    family = get_family(model.family)
    torch.manual_seed(seed)
    nets = family.build(model)
    global_arrays = encode(nets, family.components, down_dtype)
    config = protocol.train_config(model, train, 1)
    down = _message(RecordDict({protocol.ARRAYS: protocol.to_record(global_arrays),
                                protocol.CONFIG: config}), src=SERVER_NODE, dst=HOSPITAL_NODE)
    # A trained reply: perturb the weights so no array repeats the sent one byte for byte
    # (Flower de-duplicates identical objects by content hash).
    with torch.no_grad():
        for net in nets.values():
            for p in net.parameters():
                p.add_(torch.randn_like(p) * 1e-3)
    reply_arrays = encode(nets, family.components, train.wire_dtype)
    if train.wire_dtype == "int8":  # the update against what was sent (client/wire.py)
        from shared_models.codec import quantize_update

        reply_arrays, _ = quantize_update(reply_arrays, {
            k: v.astype(np.float32) for k, v in global_arrays.items()})
    metrics = {"loss-g": 0.7, "loss-d": 1.3, "d-real": 0.6, "d-fake": 0.4, "train-seconds": 9.5,
               "steps": train.local_steps, "images-per-second": 40.0,
               protocol.NUM_EXAMPLES: 120,
               **{protocol.examples_key(c): 120 for c in family.components}}
    up = _message(protocol.train_reply(reply_arrays, metrics), src=HOSPITAL_NODE,
                  dst=SERVER_NODE, reply_to=down.metadata.message_id)
    floor_payload = nbytes(encode(nets, family.components, "float32"))
    return down, up, floor_payload


@dataclass
class WireRound:
    name: str
    hospitals: int
    payload: int  # fp32 bytes of the shared components (one copy)
    down: int  # per hospital
    up: int  # per hospital

    @property
    def total(self) -> int:
        return self.hospitals * (self.down + self.up)

    @property
    def floor(self) -> int:
        return 2 * self.payload * self.hospitals

    @property
    def ratio(self) -> float:
        return self.total / self.floor


def wire_round(name: str, model: ModelConfig, wire_dtype: str, hospitals: int = 3,
               down_dtype: str = "float32") -> WireRound:
    down, up, payload = train_messages(model, TrainConfig(wire_dtype=wire_dtype), down_dtype)
    return WireRound(name, hospitals, payload, message_bytes(down, "down"),
                     message_bytes(up, "up"))


def wire_rounds(quick: bool = False) -> list[WireRound]:
    """fp32 both ways, fp16 replies (what the code does), fp16 both ways (what it could do)."""
    size = 32 if quick else 64
    model = ModelConfig(image_size=size)
    tag = f"dcgan{size}"
    return [
        wire_round(f"wire_fp32_{tag}", model, "float32"),
        wire_round(f"wire_fp16_reply_{tag}", model, "float16"),
        wire_round(f"wire_fp16_both_{tag}", model, "float16", down_dtype="float16"),
        # int8 replies (update + per-channel scales), float16 downloads: what int8 does
        wire_round(f"wire_int8_reply_{tag}", model, "int8", down_dtype="float16"),
    ]


def payload_ratio(arrays: Mapping[str, np.ndarray], msg: Message, direction: str) -> float:
    """Serialized bytes of ``msg`` over the raw bytes of ``arrays`` (used by the regression test)."""
    return message_bytes(msg, direction) / nbytes(arrays)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    args = p.parse_args(argv)
    for w in wire_rounds(args.quick):
        print(f"{w.name}: {w.ratio:.4f}")
        print(f"  per hospital down {w.down} B, up {w.up} B; floor {2 * w.payload} B "
              f"(payload {w.payload} B fp32) x {w.hospitals} hospitals")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
