"""The one place a hospital compiles a label pattern: RE2, a linear-time regular-expression engine.

Class, domain and mask-label patterns come from the coordinator (the signed run configuration,
``DataConfig``) or from the hospital's own ``label-patterns``; they are searched in the text of the
hospital's slices and segments inside its daemon. Python's ``re`` backtracks and has no time
limit: ``.*`` x20 then ``=`` (41 characters) hung a hospital's ClientApp for 75 s, and
``\\w*\\w*\\w*!`` or ``a{0,30}`` x4 ran for over 20 s (issue 25, item 4). RE2 (google-re2, the
"RE2 Python bindings") never backtracks: a search takes time linear in the text, whatever the
pattern, and its compiled program is held to a memory budget (``MAX_MEM``).

What RE2 does not offer, and is therefore refused at launch (coordinator) and again at the
hospital, with one line: backreferences (``\\1``, ``(?P=name)``), lookaround (``(?=``, ``(?!``,
``(?<=``), possessive and atomic groups, and counted repetitions above 1000. What it reads
otherwise as ``re`` does, with two differences a label rule may meet: ``\\w``, ``\\d``, ``\\b``
are ASCII (``\\w`` does not match ``é``), and ``$`` matches only at the very end of the text
(``re`` also matches before a final newline).

No nesting rule is kept (``(a+)+``, ``(a|ab)*`` compile and run in linear time): the shape check
it replaced did not stop the patterns above, and every pattern goes through here, so a second,
incomplete defence would only refuse useful rules such as ``(T1|T2)+``.
``tests/unit/shared_models/test_patterns_re2.py`` checks that no module of ``client``,
``server`` or ``shared_models`` calls ``re`` on a pattern that is not a literal.
"""

from __future__ import annotations

import functools
from typing import Any

MAX_PATTERN_CHARS = 256
MAX_MEM = 8 << 20  # bytes RE2 may use for one compiled pattern (its default); more: refused


class PatternError(ValueError):
    """A pattern is too long or not one RE2 can compile; the message says which and why."""


def _re2() -> Any:
    try:
        import re2
    except ImportError:  # pragma: no cover - a declared dependency (pyproject.toml)
        raise PatternError("the RE2 engine (pip package google-re2, module re2) is not "
                           "installed; fedsynth matches label patterns only with it") from None
    return re2


@functools.lru_cache(maxsize=256)
def compile_pattern(pattern: str, ignore_case: bool = True) -> Any:
    """``pattern`` compiled by RE2 (case-insensitive by default, as every label rule is).

    The result has ``search(text)`` like ``re``'s; ``PatternError`` for a pattern RE2 cannot
    compile. The length cap is ``check_pattern``'s, for what a run or a setting sends; a rule
    built here from a file's own label text (``literal``) is only bounded by ``MAX_MEM``."""
    if not isinstance(pattern, str):
        raise PatternError(f"pattern {pattern!r} is not text")
    re2 = _re2()
    options = re2.Options()
    options.case_sensitive = not ignore_case
    options.log_errors = False  # the error is ours to report, in one line, not absl's on stderr
    options.max_mem = MAX_MEM
    try:
        return re2.compile(pattern, options)
    except re2.error as exc:
        why = exc.args[0] if exc.args else exc
        if isinstance(why, bytes):
            why = why.decode("utf-8", "replace")
        raise PatternError(f"pattern {pattern!r} is not a regular expression the hospital's "
                           f"linear-time engine (RE2) accepts: {why} (backreferences and "
                           "lookaround are not supported)") from None


def check_pattern(pattern: str) -> None:
    """Refuse, with one line, a run-sent or configured pattern longer than
    ``MAX_PATTERN_CHARS`` or one RE2 cannot compile (called at launch by the coordinator, and
    by the hospital when it rebuilds ``DataConfig`` from the signed record)."""
    if isinstance(pattern, str) and len(pattern) > MAX_PATTERN_CHARS:
        raise PatternError(f"pattern of {len(pattern)} characters: at most {MAX_PATTERN_CHARS}")
    compile_pattern(pattern)


def search(pattern: str, text: str, ignore_case: bool = True) -> bool:
    """Whether ``pattern`` is found anywhere in ``text`` (linear time in ``len(text)``)."""
    return compile_pattern(pattern, ignore_case).search(text) is not None


def literal(name: str) -> str:
    """A pattern that finds ``name`` as it is written (the default rule of a class or label)."""
    return _re2().escape(name)
