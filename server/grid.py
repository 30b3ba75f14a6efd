"""A Grid that notices replies promptly, and hospitals that will not answer.

Flower 1.42's deployed Grid (``HttpGrid.send_and_receive``) checks for replies every 3 s, a fixed
sleep: a round whose last reply lands just after a check waits up to 3 s more, and a round has two
such waits (train, evaluate). ``PromptGrid`` does the same push-then-pull with Flower's public
``push_messages``/``pull_messages`` and checks every 0.1 s; each check is one small request to the
SuperLink on the coordinator's own machine. Everything else is delegated to the wrapped Grid.

Every message sent gets exactly one reply back, so that a hospital that does not answer is
counted failed, by node, in the round's metrics:

* the hospital's own reply (content or an error it reported);
* ``offline``: Flower no longer lists the node as online. Flower marks a node offline when it
  leaves (a SuperNode stopped with SIGTERM tells the SuperLink; a hospital daemon killed hard
  has its SuperNode stopped that way by its guard, ``fedsynth.processes.spawn``) or after two
  missed heartbeats (2 x 30 s) when nothing could tell it, e.g. a machine that lost power.
  Flower's own "node unavailable" reply (sent from the SuperLink's id) becomes this one, from the
  hospital's node id;
* ``restarted``: the node's SuperNode connected again after the message went out (its
  ``last_activated_at`` changed): whatever the previous one was doing for us is lost, and a
  daemon restarted within seconds would otherwise hold the round until ``timeout``;
* ``timeout``: no reply within ``timeout`` seconds (the run's ``round-timeout``).

Test hook (never set in a deployment): with ``FEDSYNTH_TEST_RECORD_REPLIES`` naming a file, every
reply this process receives from a hospital is appended to it (one pickle per reply: sender,
message type, every array, config and metric record as received). The secure-aggregation
deployed test (``tests/system/test_secure_aggregation_deployed.py``) reads it to show that no reply
carries a hospital's update.

Liveness is checked every ``liveness_s`` (1 s) with one ``get_nodes`` request. So a phase waits
for a dead hospital at most ~1 s after Flower reports it offline, not ``round-timeout``.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any, Iterable

log = logging.getLogger(__name__)

POLL_S = 0.1
LIVENESS_S = 1.0
SUPERLINK_NODE_ID = 1  # flwr.common.constant.SUPERLINK_NODE_ID: Flower's own error replies
# failure kinds (the reason of a synthetic error reply is "fedsynth: <kind>")
OFFLINE, RESTARTED, TIMEOUT = "offline", "restarted", "timeout"
FAILURE_PREFIX = "fedsynth: "
RECORD_ENV = "FEDSYNTH_TEST_RECORD_REPLIES"  # test hook: see the module docstring


def record_reply(message: Any) -> None:
    """Append what ``message`` carried to the file ``FEDSYNTH_TEST_RECORD_REPLIES`` names (a test
    hook; nothing happens when it is unset)."""
    path = os.environ.get(RECORD_ENV)
    if not path:
        return
    import pickle

    content = None if message.has_error() else message.content
    entry = {"src": int(message.metadata.src_node_id), "run": int(message.metadata.run_id),
             "type": str(message.metadata.message_type), "error": message.has_error(),
             "arrays": {} if content is None else {
                 name: {k: a.numpy() for k, a in rec.items()}
                 for name, rec in content.array_records.items()},
             "configs": {} if content is None else {
                 name: dict(rec) for name, rec in content.config_records.items()},
             "metrics": {} if content is None else {
                 name: dict(rec) for name, rec in content.metric_records.items()}}
    with open(path, "ab") as fh:
        pickle.dump(entry, fh)


# A hospital's refusal names its class of problem in the error reason (client/app.py keeps
# every other detail at the site: "train refused by the hospital's privacy settings
# (PrivacyBudgetExhausted)"); the kind the round's metrics, the report and `fedsynth status` show.
# Most specific first (EvaluationRefused and PrivacyBudgetExhausted are PrivacyRefused).
REFUSAL_KINDS: tuple[tuple[str, str], ...] = (
    ("(PrivacyBudgetExhausted)", "dp-budget"),
    ("(LedgerUnusable)", "dp-ledger"),
    ("(EvaluationRefused)", "evaluation-refused"),
    ("(PrivacyRefused)", "dp-required"),
    ("(CeilingRefused)", "ceiling"),
    ("(PerceptualRefused)", "perceptual-network"),  # before its base class, PolicyRefused
    ("(PolicyRefused)", "never-send"),
    ("app bundle is not approved", "bundle"),
)


def failure_kind(message: Any) -> str:
    """What kind of failure an error reply stands for: offline / restarted / timeout from this
    grid; a hospital's refusal by its kind (``REFUSAL_KINDS``: dp-budget, dp-ledger, ceiling,
    ...); else ``error`` (the hospital failed; its text stays at the hospital)."""
    reason = str(getattr(getattr(message, "error", None), "reason", "") or "")
    if reason.startswith(FAILURE_PREFIX):
        kind = reason[len(FAILURE_PREFIX):].split(":", 1)[0].strip()
        if kind in (OFFLINE, RESTARTED, TIMEOUT):
            return kind
    for marker, kind in REFUSAL_KINDS:
        if marker in reason:
            return kind
    return "error"


class PromptGrid:
    def __init__(self, grid: Any, poll_s: float = POLL_S, liveness_s: float = LIVENESS_S) -> None:
        self._grid = grid
        self.poll_s = poll_s
        self.liveness_s = liveness_s
        self._names: dict[int, str] = {}

    # -- node liveness and names ---------------------------------------------------------------
    def _nodes(self) -> dict[int, tuple[bool, str]] | None:
        """node id -> (online, last_activated_at) from Flower, or None when unavailable."""
        get_nodes = getattr(self._grid, "get_nodes", None)
        if get_nodes is None:
            return None
        try:
            infos = list(get_nodes())
        except Exception as exc:  # noqa: BLE001 - a failed check must not end the round
            log.debug("get_nodes failed: %s", exc)
            return None
        out: dict[int, tuple[bool, str]] = {}
        for info in infos:
            node_id = int(info.node_id)
            name = str(getattr(info, "name", "") or "")
            if name:
                self._names[node_id] = name
            # Flower's GetNodes lists the run's online nodes; a status says so explicitly
            status = str(getattr(info, "status", "") or "online").lower()
            out[node_id] = (status == "online", str(getattr(info, "last_activated_at", "")))
        return out

    def node_name(self, node_id: int | str) -> str:
        """The name the hospital's key was registered under (``fedsynth coordinator`` registers
        ``KEYS/nodes/NAME.pub`` as NAME), else the node id. Nothing a hospital sent."""
        try:
            key = int(node_id)
        except (TypeError, ValueError):
            return str(node_id)
        if key not in self._names:
            self._nodes()
        return self._names.get(key, str(key))

    # -- send and receive ----------------------------------------------------------------------
    def send_and_receive(self, messages: Iterable[Any], *, timeout: float | None = None
                         ) -> list[Any]:
        """Push ``messages``; one reply for each (see the module docstring)."""
        messages = list(messages)
        before = self._nodes() if messages else None
        ids = list(self._grid.push_messages(messages))
        sent = dict(zip(ids, messages))
        pending = set(ids)
        deadline = None if timeout is None else time.monotonic() + timeout
        next_check = time.monotonic() + self.liveness_s
        replies: list[Any] = []
        while pending:
            for msg in self._grid.pull_messages(pending):
                mid = msg.metadata.reply_to_message_id
                pending.discard(mid)
                record_reply(msg)
                if (msg.has_error() if hasattr(msg, "has_error") else False) and \
                        msg.metadata.src_node_id == SUPERLINK_NODE_ID and mid in sent:
                    msg = self._failure(sent[mid], mid, OFFLINE) or msg  # Flower's "unavailable"
                replies.append(msg)
            if not pending:
                break
            now = time.monotonic()
            if deadline is not None and now >= deadline:
                replies += self._give_up(sent, pending, TIMEOUT)
                break
            if before is not None and now >= next_check:
                next_check = now + self.liveness_s
                nodes = self._nodes()
                if nodes is not None:
                    for mid in list(pending):
                        node = _dst(sent[mid])
                        if node is None or node not in before:
                            continue
                        online, activated = nodes.get(node, (False, ""))
                        kind = (OFFLINE if not online else
                                RESTARTED if activated != before[node][1] else None)
                        if kind is not None:
                            replies += self._give_up(sent, {mid}, kind)
                            pending.discard(mid)
            time.sleep(self.poll_s)
        return replies

    def _give_up(self, sent: dict[str, Any], mids: set[str], kind: str) -> list[Any]:
        out = []
        for mid in sorted(mids):
            reply = self._failure(sent[mid], mid, kind)
            if reply is not None:
                log.warning("no reply from hospital %s (%s)", self.node_name(_dst(sent[mid])),
                            kind)
                out.append(reply)
        return out

    @staticmethod
    def _failure(message: Any, mid: str, kind: str) -> Any | None:
        """An error reply to ``message`` from its destination node (None for a test double)."""
        node = _dst(message)
        if node is None:
            return None
        from flwr.app import Error, Message, Metadata
        from protocol.flower_private import ErrorCode

        meta = message.metadata
        reply = Metadata(run_id=meta.run_id, message_id="", src_node_id=node,
                         dst_node_id=meta.src_node_id, reply_to_message_id=mid,
                         group_id=meta.group_id, created_at=time.time(), ttl=meta.ttl,
                         message_type=meta.message_type)
        code = ErrorCode.REPLY_MESSAGE_UNAVAILABLE if kind == TIMEOUT else \
            ErrorCode.NODE_UNAVAILABLE
        return Message(metadata=reply, error=Error(code=code, reason=FAILURE_PREFIX + kind))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)


def _dst(message: Any) -> int | None:
    try:
        return int(message.metadata.dst_node_id)
    except (AttributeError, TypeError, ValueError):
        return None
