"""The coordinator's state database is its own: 0600, not the umask's 0644 (issue 25, item 9).

``state.db`` holds every run, its configuration and the hospitals' replies; Flower's SuperLink
created it world-readable.
"""

from __future__ import annotations

import os
import sqlite3
import stat
from pathlib import Path

import pytest


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_a_new_database_and_its_sqlite_files_are_0600(tmp_path: Path) -> None:
    from fedsynth.commands.coordinator import private_database

    old = os.umask(0o022)
    try:
        db = private_database(tmp_path)
        conn = sqlite3.connect(db)  # as the SuperLink does: it opens what is there
        conn.execute("pragma journal_mode=wal")
        conn.execute("create table t (x)")
        conn.commit()
        files = sorted(p.name for p in tmp_path.iterdir())
        assert "state.db-wal" in files
        assert {p.name: _mode(p) for p in tmp_path.iterdir()} == dict.fromkeys(files, 0o600)
        conn.close()
    finally:
        os.umask(old)


def test_an_existing_0644_database_is_made_0600_and_kept(tmp_path: Path) -> None:
    from fedsynth.commands.coordinator import private_database

    db = tmp_path / "state.db"
    conn = sqlite3.connect(db)
    conn.execute("create table runs (id)")
    conn.execute("insert into runs values (7)")
    conn.commit()
    conn.close()
    (tmp_path / "state.db-journal").write_bytes(b"")
    db.chmod(0o644)
    (tmp_path / "state.db-journal").chmod(0o644)
    private_database(tmp_path)
    assert _mode(db) == 0o600 and _mode(tmp_path / "state.db-journal") == 0o600
    assert sqlite3.connect(db).execute("select id from runs").fetchall() == [(7,)]


def test_the_superlink_is_started_on_the_private_database(tmp_path: Path, monkeypatch) -> None:
    """``fedsynth coordinator``: the file is 0600 before the SuperLink is started on it."""
    import fedsynth.supervisor as supervisor
    from fedsynth.cli import build_parser

    seen = {}

    class Stop(Exception):
        pass

    class FakeSupervisor:
        def __init__(self, name, command, **_kw):  # noqa: ANN001, ANN003
            db = Path(command[command.index("--database") + 1])
            seen["db"], seen["mode"] = db, _mode(db)
            raise Stop

    monkeypatch.setattr(supervisor, "Supervisor", FakeSupervisor)
    state = tmp_path / "coord"
    args = build_parser().parse_args(["coordinator", "--insecure", "--address",
                                      "127.0.0.1:1", "--superlink-port", "2", "--state",
                                      str(state)])
    with pytest.raises(Stop):
        args.func(args)
    assert seen == {"db": state / "state.db", "mode": 0o600}
    assert _mode(state) == 0o700  # a folder it made is its own too
