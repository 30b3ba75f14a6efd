"""The lines the daemons copy from their children (SuperLink, nginx, SuperNode, warm executor).

Each line is logged as ``fedsynth.<child>`` and written to ``--log-file`` as plain text (Flower
colours its level names even into a pipe), and a few Flower lines are said the way an operator
should read them (issue 24 item 7):

- the coordinator registers every hospital key at each start; the SuperLink answers a key it
  already holds with two red ``ERROR Public key already in use`` lines and a 412, though nothing
  is wrong (the registrar logs "registered (node already registered)");
- a SuperNode's ``Connection attempt failed`` is about the coordinator, so it says so.
"""

from __future__ import annotations

import logging
import re
from typing import Callable, TextIO

from protocol.logs import Rule, plain, reword

RULES: dict[str, tuple[Rule, ...]] = {
    "superlink": (
        (re.compile(r"ERROR\s*:\s*Public key already in use$"),
         "INFO :      hospital key already registered (the state database keeps it)"),
        (re.compile(r"ApiError:\d+\] Public key already in use while registering"), None),
        (re.compile(r'"POST /v1/control/register-node HTTP/[\d.]+" 412'), None),
    ),
    "supernode": (
        (re.compile(r"WARNING\s*:\s*Connection attempt failed, retrying in ([\d.]+) seconds"),
         r"WARNING :   coordinator not answering, retrying in \1 s"),
    ),
}


def child_sink(name: str, log_file: TextIO | None) -> Callable[[str], None]:
    """A ``Supervisor`` sink for child ``name``: plain, reworded, logged and copied to the file."""
    rules = RULES.get(name, ())
    logger = logging.getLogger(f"fedsynth.{name}")

    def sink(line: str) -> None:
        text = reword(plain(line), rules)
        if text is None:
            return
        if log_file is not None:
            log_file.write(text + "\n")
        logger.info("%s", text)
    return sink
