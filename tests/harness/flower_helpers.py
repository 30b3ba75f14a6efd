"""Building Flower messages outside a Flower process, the way Flower's own tests do.

Flower 1.42 stamps every new ``Message`` with the process's task identity; a unit test has none, so
``task_identity()`` sets one for the duration of a test.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

from flwr.app import Context, Message, MessageType, RecordDict
from flwr.supercore.task_identity import TaskIdentity


@contextlib.contextmanager
def task_identity(run_id: int = 1, node_id: int = 0, task_id: int = 1) -> Iterator[None]:
    saved = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = run_id, node_id, task_id
    try:
        yield
    finally:
        TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved


def server_message(content: RecordDict, dst_node_id: int,
                   message_type: str = MessageType.TRAIN) -> Message:
    return Message(content=content, dst_node_id=dst_node_id, message_type=message_type)


def client_context(node_id: int, node_config: dict) -> Context:
    return Context(run_id=1, node_id=node_id, node_config=node_config, state=RecordDict(),
                   run_config={})
