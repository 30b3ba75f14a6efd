"""Tests of one package each, in process (no daemon, no service; a few run the CLI or `dciodvfy`
on a file). `make test-quick` runs those not marked slow.

Every folder under tests/ but tests/ itself is a package, so two test files may share a basename:
pytest imports them as ``unit.server.test_x`` / ``system.test_x`` (tests/ is on sys.path through
conftest.py, which is why tests/ has no ``__init__.py`` and tools.py stays beside it).
"""
