"""The Debian tools the tests drive for real, and how a test says one is missing.

A test that needs a tool skips with :func:`missing_tool`'s reason; under ``CI=true`` the hook in
``conftest.py`` turns that skip into a failure, so a fresh machine that lacks a tool cannot pass
quietly (``make test`` installs them first: the Makefile's ``tools`` target).
"""

from __future__ import annotations

import shutil

import pytest

PREFIX = "missing tool:"
SBIN = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def missing_tool(tool: str, package: str) -> str:
    """The skip reason for ``tool`` (Debian ``package``) absent from PATH."""
    return f"{PREFIX} {tool} (apt-get install {package})"


def which(tool: str) -> str | None:
    return shutil.which(tool) or shutil.which(tool, path=SBIN)


def skip_unless(tool: str, package: str) -> None:
    """Skip the running test (a failure under CI=true) when ``tool`` is absent."""
    if which(tool) is None:
        pytest.skip(missing_tool(tool, package))


def needs(tool: str, package: str) -> pytest.MarkDecorator:
    """Marker form of :func:`skip_unless`."""
    return pytest.mark.skipif(which(tool) is None, reason=missing_tool(tool, package))
