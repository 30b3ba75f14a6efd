"""The lines the daemons copy from their children (SuperLink, nginx, SuperNode, warm executor).

Each line is logged as ``fedsynth.<child>`` and written to ``--log-file`` as plain text (Flower
colours its level names even into a pipe), and a few Flower lines are said the way an operator
should read them (issue 24 item 7):

- the coordinator registers every hospital key at each start; the SuperLink answers a key it
  already holds with two red ``ERROR Public key already in use`` lines and a 412, though nothing
  is wrong (the registrar logs "registered (node already registered)");
- a SuperNode's ``Connection attempt failed`` is about the coordinator, so it says so.

A run's ServerApp is not a child whose output can be read (Flower starts it with stdout and
stderr on /dev/null): it appends its lines to a file the coordinator names in its environment
(``$FEDSYNTH_SERVERAPP_LOG``), and :func:`follow_file` copies them like a child's.
"""

from __future__ import annotations

import logging
import os
import re
import time
from pathlib import Path
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


def follow_file(path: Path, sink: Callable[[str], None], stopping: Callable[[], bool],
                poll: float = 0.5) -> None:
    """Give ``sink`` each line appended to ``path`` until ``stopping()`` (``tail -F``'s rule).

    ``path`` must exist. What it held before is not repeated; a file truncated or replaced is
    read again from its start; a partial last line waits for its newline.
    """
    fh = open(path, "rb")  # noqa: SIM115 - reopened when replaced
    fh.seek(0, os.SEEK_END)
    pending = b""
    try:
        while True:
            chunk = fh.read()
            if chunk:
                pending += chunk
                *lines, pending = pending.split(b"\n")
                for line in lines:
                    sink(line.decode("utf-8", "replace"))
                continue
            if stopping():
                return
            try:
                st = os.stat(path)
            except OSError:
                st = None
            if st is not None and (st.st_ino != os.fstat(fh.fileno()).st_ino
                                   or st.st_size < fh.tell()):
                fh.close()
                fh, pending = open(path, "rb"), b""  # noqa: SIM115
                continue
            time.sleep(poll)
    finally:
        fh.close()
