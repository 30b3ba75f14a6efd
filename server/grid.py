"""A Grid that notices replies promptly.

Flower 1.42's deployed Grid (``HttpGrid.send_and_receive``) checks for replies every 3 s, a fixed
sleep: a round whose last reply lands just after a check waits up to 3 s more, and a round has two
such waits (train, evaluate). ``PromptGrid`` does the same push-then-pull with Flower's public
``push_messages``/``pull_messages`` and checks every 0.1 s; each check is one small request to the
SuperLink on the coordinator's own machine. Everything else is delegated to the wrapped Grid.
"""

from __future__ import annotations

import time
from typing import Any, Iterable

POLL_S = 0.1


class PromptGrid:
    def __init__(self, grid: Any, poll_s: float = POLL_S) -> None:
        self._grid = grid
        self.poll_s = poll_s

    def send_and_receive(self, messages: Iterable[Any], *, timeout: float | None = None
                         ) -> list[Any]:
        """Push ``messages``; return the replies that arrived before ``timeout`` seconds."""
        pending = set(self._grid.push_messages(messages))
        deadline = None if timeout is None else time.monotonic() + timeout
        replies: list[Any] = []
        while pending:
            got = list(self._grid.pull_messages(pending))
            replies += got
            pending -= {m.metadata.reply_to_message_id for m in got}
            if not pending or (deadline is not None and time.monotonic() >= deadline):
                break
            time.sleep(self.poll_s)
        return replies

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)
