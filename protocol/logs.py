"""How every fedsynth process logs: plain text, libraries quiet, Flower's misleading lines reworded.

The daemons copy their children's output (SuperLink, nginx, SuperNode, the warm executor) into
their own log and ``--log-file``; people and grep read those files. So colour codes, per-start
library notices and lines that blame the wrong peer are dealt with here, in fedsynth's own logging
(levels, a formatter, filters), never by patching Flower (issue 24 item 7). Flower and
third-party names only: ``client`` (the executor) and ``fedsynth`` (the daemons) both use it.
"""

from __future__ import annotations

import logging
import re
from typing import Iterable, Pattern

FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"
DATEFMT = "%H:%M:%S"

# Loggers held at WARNING, and what each said at INFO.
QUIET = {
    "alembic": "7 'setup plugin' lines per start (Flower's state database migrations)",
    "highdicom": "a 'copy attributes of module' line per DICOM SEG written",
    "httpx": "a line per HTTP request (the executor polls its SuperNode every 0.1 s)",
    "flwr": "Flower's in-process INFO and DEBUG (its daemons' lines are copied separately)",
    "ray": "", "PIL": "", "matplotlib": "",
}
ANSI = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]")  # CSI sequences: Flower colours its level names

Rule = tuple[Pattern[str], "str | None"]  # (pattern, replacement; None drops the line)


def plain(text: str) -> str:
    """``text`` without terminal colour codes."""
    return ANSI.sub("", text)


def reword(text: str, rules: Iterable[Rule]) -> str | None:
    """``text`` as the first matching rule says (None: drop it); unchanged when none matches."""
    for pattern, replacement in rules:
        m = pattern.search(text)
        if m:
            return None if replacement is None else m.expand(replacement)
    return text


class PlainFormatter(logging.Formatter):
    """A log line as text a file can hold: a message quoting a coloured line loses the codes."""

    def format(self, record: logging.LogRecord) -> str:
        return plain(super().format(record))


class RewordFilter(logging.Filter):
    """Rewrite matching records' messages (and level): a logger filter, so every handler agrees."""

    def __init__(self, rules: Iterable[Rule], level: int = logging.INFO) -> None:
        super().__init__()
        self.rules, self.level = tuple(rules), level

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        text = reword(message, self.rules)
        if text is None:
            return False
        if text != message:
            record.msg, record.args = text, ()
            record.levelno, record.levelname = self.level, logging.getLevelName(self.level)
        return True


def adopt_flower() -> None:
    """Flower's logger prints each line a second time, coloured, through its own handler; with
    propagation on, the root handler already prints it once, plain. Flower's import also sets the
    logger to DEBUG, so call this after Flower is imported."""
    flower = logging.getLogger("flwr")
    flower.setLevel(logging.WARNING)
    if flower.propagate:
        for handler in list(flower.handlers):
            flower.removeHandler(handler)


def setup(level: int | str = logging.INFO, fmt: str = FORMAT, datefmt: str | None = DATEFMT) -> None:
    """Root handler with ``PlainFormatter``, the ``QUIET`` loggers at WARNING."""
    handler = logging.StreamHandler()
    handler.setFormatter(PlainFormatter(fmt, datefmt))
    logging.basicConfig(level=level, handlers=[handler])
    for name in QUIET:
        logging.getLogger(name).setLevel(logging.WARNING)
    adopt_flower()
