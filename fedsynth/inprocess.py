"""A federation in this process: ``run_federation`` over a Grid that hands each message to the
real ClientApp (``client.app.app``), without Flower's transport, SuperLink or Ray.

What the quality benchmarks run (``bench.quality``, ``bench.quality_extra``): the same round loop as
the deployed ServerApp (``server.app``) and Flower's simulation engine (``fedsynth.simulation``),
the same strategy, signing, validation and run folder, and the same ClientApp with its data
loading, signature and replay checks, local-state handling and trainer. Only the delivery differs:
``InProcessGrid.send_and_receive`` calls ``client.app.app(message, context)`` for each message,
one after the other, with one persistent ``Context`` per virtual hospital (its ``node_config`` =
that hospital's settings, as a deployed SuperNode's ``--node-config``; its ``state`` kept across
rounds, as a SuperNode keeps it).

Flower (1.42) has no public in-memory Grid that delivers to a ClientApp: ``InMemoryGrid``
(``flwr.superlink.grid``, not exported by ``flwr.serverapp`` or ``flwr.simulation``) only stores
messages in a LinkState for the simulation engine's node workers to pull. So this module stamps
messages the way those two do: ``push_messages`` gives each instruction a fresh ``message_id``
(a uuid, as ``InMemoryGrid`` does) after checking it is an instruction of this run; the reply is
``Message(content, reply_to=message)`` as the ClientApp builds it (Flower sets ``reply_to_message_id``,
``src_node_id`` = the hospital, ``dst_node_id`` = the coordinator, ``run_id``, ``group_id``); a
ClientApp that raises is answered with ``Error(CLIENT_APP_RAISED_EXCEPTION)``, the reason written
as Flower's node runtime writes it. Messages are not serialised: the ClientApp reads the
coordinator's records, it never writes them, and every reply carries its own arrays.
"""

from __future__ import annotations

import logging
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

from flwr.app import Context, Error, Message, RecordDict
from flwr.serverapp import Grid

from server.federation import FederationConfig, Observer, run_federation

log = logging.getLogger(__name__)

ClientAppFn = Callable[[Message, Context], Message]
SUPERLINK_NODE_ID = 1  # flwr.common.constant.SUPERLINK_NODE_ID: the coordinator's node id
FIRST_NODE_ID = 1001  # hospital i gets 1001 + i (node_id % 1000 = i + 1 seeds its batches)


@dataclass(frozen=True)
class InProcessRun:
    """What ``Grid.run`` gives ``run_federation`` (only ``run_id`` is read)."""

    run_id: int
    fab_id: str = "fedsynth/inprocess"
    fab_version: str = ""


def new_run_id() -> int:
    """A random 63-bit run id (Flower's are random 64-bit integers)."""
    return uuid.uuid4().int >> 65


def default_client_app() -> ClientAppFn:
    from client.app import app

    return app


class InProcessGrid(Grid):
    """Flower's ``Grid`` for ``run_federation`` and the strategies, delivering in-process.

    ``hospitals``: one settings mapping per virtual hospital (``data-dir``, ``cache-dir``,
    ``holdout-every``, ``device``...), as a deployed SuperNode's node config; each entry gets
    ``name`` ``hospital-N`` and ``accept-unsigned-models = true`` unless it sets them (give a
    ``model-public-key`` and the run a ``signing-key`` to have every message signed and checked).
    ``app``: what answers a message (default ``client.app.app``; a wrapper of it for a bench that
    changes one thing at the hospital).

    Messages must be built while the grid's task identity holds (``with grid.serving():``, or
    ``run_inprocess``), as inside a ServerApp process: Flower stamps the run id on every new message.
    """

    def __init__(self, hospitals: Sequence[Mapping[str, Any]], *, run_id: int | None = None,
                 app: ClientAppFn | None = None, first_node_id: int = FIRST_NODE_ID) -> None:
        # A fresh run id per grid, as the SuperLink gives each run: a hospital's replay record
        # (client.app, kept in its cache folder) is per run, and so is client.app's run state.
        self._run = InProcessRun(new_run_id() if run_id is None else int(run_id))
        self.app = app or default_client_app()
        self.node_ids = [first_node_id + i for i in range(len(hospitals))]
        self.contexts: dict[int, Context] = {}
        self.names: dict[int, str] = {}
        n = len(hospitals)
        for i, (node_id, settings) in enumerate(zip(self.node_ids, hospitals)):
            node_config = {"name": f"hospital-{i + 1}", "accept-unsigned-models": True,
                           **dict(settings), "partition-id": i, "num-partitions": n}
            self.names[node_id] = str(node_config["name"])
            self.contexts[node_id] = Context(run_id=self._run.run_id, node_id=node_id,
                                             node_config=node_config, state=RecordDict(),
                                             run_config={})
        self.last_received: dict[int, dict[str, Message]] = {n: {} for n in self.node_ids}
        self._replies: dict[str, Message] = {}
        self.delivered = 0

    # ---- the Grid interface
    def set_run(self, run: Any) -> None:
        self._run = InProcessRun(int(getattr(run, "run_id", run)))

    @property
    def run(self) -> InProcessRun:  # type: ignore[override] - Flower's Run has fields we lack
        return self._run

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int,
                       group_id: str, ttl: float | None = None) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.node_ids)

    def node_name(self, node_id: int) -> str:
        """The hospital's name, for ``RoundSummary.failed_hospitals`` (as ``PromptGrid`` does)."""
        return self.names.get(int(node_id), str(node_id))

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        """Deliver each message now; its reply waits for ``pull_messages``."""
        ids = []
        for msg in messages:
            self._check(msg)
            msg.metadata.__dict__["_message_id"] = uuid.uuid4().hex  # as InMemoryGrid does
            reply = self._deliver(msg)
            reply.metadata.__dict__["_message_id"] = uuid.uuid4().hex
            self._replies[msg.metadata.message_id] = reply
            ids.append(msg.metadata.message_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self._replies.pop(i) for i in list(message_ids) if i in self._replies]

    def send_and_receive(self, messages: Iterable[Message], *,
                         timeout: float | None = None) -> Iterable[Message]:
        """Every reply, in the order sent (delivery is synchronous: ``timeout`` never expires)."""
        return list(self.pull_messages(self.push_messages(messages)))

    # ---- delivery
    def _check(self, msg: Message) -> None:
        md = msg.metadata
        if md.reply_to_message_id or md.message_id:
            raise ValueError("only new instruction messages can be pushed")
        if int(md.dst_node_id) not in self.contexts:
            raise ValueError(f"no hospital with node id {md.dst_node_id}")
        if int(md.run_id) != self._run.run_id:
            raise ValueError(f"message of run {md.run_id} pushed to run {self._run.run_id}: build "
                             "messages inside grid.serving()")

    def _deliver(self, msg: Message) -> Message:
        node_id = int(msg.metadata.dst_node_id)
        context = self.contexts[node_id]
        self.last_received[node_id][str(msg.metadata.message_type)] = msg
        self.delivered += 1
        with self._task_identity(node_id):
            try:
                reply = self.app(msg, context)
            except Exception as exc:  # noqa: BLE001 - answered as Flower's node runtime does
                from protocol.flower_private import ErrorCode

                log.info("hospital %s answered %s with an error: %s", self.names[node_id],
                         msg.metadata.message_type, type(exc).__name__)
                reply = Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION,
                                      reason=f"{type(exc)}:<'{exc}'>"), reply_to=msg)
        if reply.metadata.reply_to_message_id != msg.metadata.message_id:
            raise RuntimeError("the ClientApp's reply does not reply to the message it was given")
        return reply

    @contextmanager
    def _task_identity(self, node_id: int, task_id: int = 1) -> Iterator[None]:
        from protocol.flower_private import TaskIdentity

        saved = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
        TaskIdentity.run_id, TaskIdentity.node_id = self._run.run_id, node_id
        TaskIdentity.task_id = task_id
        try:
            yield
        finally:
            TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved

    @contextmanager
    def serving(self) -> Iterator["InProcessGrid"]:
        """The coordinator's task identity (this run, the SuperLink's node id), as in a ServerApp."""
        with self._task_identity(SUPERLINK_NODE_ID):
            yield self

    # ---- what a bench reads back from the hospitals
    def local_arrays(self, node_id: int) -> dict:
        """Hospital ``node_id``'s model as it last evaluated it: its own weights (kept in its
        context's state by ``client.app``) overlaid with the last model it received."""
        from client.app import LOCAL_STATE
        from protocol import records as protocol

        state = self.contexts[node_id].state
        out = (protocol.from_record(state.array_records[LOCAL_STATE])
               if LOCAL_STATE in state.array_records else {})
        received = self.last_received[node_id]
        last = received.get("evaluate") or received.get("train")
        if last is not None and protocol.ARRAYS in last.content.array_records:
            out.update(protocol.from_record(last.content[protocol.ARRAYS]))
        return out


def run_inprocess(cfg: FederationConfig, hospitals: Sequence[Mapping[str, Any]], *,
                  observers: tuple[Observer, ...] = (), app: ClientAppFn | None = None,
                  run_id: int | None = None) -> tuple[Path, InProcessGrid]:
    """``run_federation(cfg)`` with one in-process virtual hospital per entry of ``hospitals``.

    Returns the run folder and the grid (its hospitals' contexts, what each last received).
    ``min_hospitals`` is raised to the number of hospitals, as ``fedsynth.simulation`` does.
    """
    grid = InProcessGrid(hospitals, run_id=run_id, app=app)
    cfg = replace(cfg, min_hospitals=max(cfg.min_hospitals, len(grid.node_ids)))
    with grid.serving():
        folder = run_federation(grid, cfg, observers)
    return folder, grid
