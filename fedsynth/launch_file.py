"""The launch file as ``fedsynth launch`` and ``fedsynth status`` read it.

``LaunchConfig.load`` checks its sections and keys; ``load_launch_file`` also checks the CA file it
names, so a missing or unreadable ``root-certificates`` is one line naming the file
rather than a traceback from the TLS probe, or a ``flwr ls`` error, later (issue 24 item 6).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from protocol.coordinator import COORDINATOR  # the hospital's [coordinator] has the same keys
from shared_models.settings import unknown_message


@dataclass(frozen=True)
class LaunchConfig:
    """``[coordinator]`` address + root-certificates (or insecure); ``[run]`` run settings.

    Paths in ``[run]`` (run-dir, signing-key) are paths on the coordinator's machine; relative ones
    are resolved against the file's folder, i.e. launch from the coordinator's host.
    """

    address: str
    root_certificates: Path | None
    run: dict[str, Any]
    source: Path

    @classmethod
    def load(cls, path: Path, check_run: bool = True) -> "LaunchConfig":
        """``check_run=False`` (``fedsynth status``) skips checking ``[run]`` against the run
        configuration, whose families import torch (~2 s)."""
        import tomllib

        path = Path(path)
        try:
            data = tomllib.loads(path.read_text())
        except OSError as exc:
            raise ValueError(f"launch file '{path}' cannot be read: {exc.strerror}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ValueError(f"launch file '{path}' is not valid TOML: {exc}") from None
        unknown_sections = sorted(set(data) - {"coordinator", "run"})
        if unknown_sections:
            raise ValueError(f"launch file '{path}': unknown section(s) "
                             f"{', '.join(f'[{x}]' for x in unknown_sections)} (known: "
                             "[coordinator], [run])")
        coord = data.get("coordinator", {})
        extra = sorted(set(coord) - set(COORDINATOR.keys()))
        if extra:
            hint = (" (the run's metrics endpoint is [run] metrics-port)"
                    if "metrics-port" in extra else "")
            raise ValueError(f"launch file '{path}': "
                             + unknown_message(extra, COORDINATOR.keys(), "[coordinator] key",
                                               plain=True) + hint)
        if not coord.get("address"):
            raise ValueError(f"launch file '{path}': [coordinator] address is missing")
        insecure = bool(coord.get("insecure", False))
        root = coord.get("root-certificates")
        if not insecure and not root:
            raise ValueError(f"launch file '{path}': [coordinator] root-certificates is missing "
                             "(the federation's ca.pem), or set insecure = true")
        run = dict(data.get("run", {}))
        if check_run:
            from server.run_config import CODEC, PATH_KEYS, from_flat

            try:
                from_flat(run)  # unknown or mistyped keys fail here, by name, before submission
            except ValueError as exc:
                raise ValueError(f"launch file '{path}': {exc}") from None
            path_keys, sep = PATH_KEYS, (lambda key: CODEC.by_key[key].sep or ",")
        else:  # status reads run-dir alone: resolved the same way, without torch's import
            path_keys, sep = ("run-dir",), (lambda key: ",")
        for key in path_keys:
            if run.get(key):
                p = Path(str(run[key])).expanduser()
                run[key] = str(p if p.is_absolute() else (path.parent / p).resolve())
        for key, value in list(run.items()):
            if isinstance(value, list):  # classes = ["a", "b"]: Flower's run config is scalars
                run[key] = sep(key).join(map(str, value))
        root_path = None
        if not insecure:
            root_path = Path(str(root)).expanduser()
            root_path = root_path if root_path.is_absolute() else (path.parent / root_path)
        return cls(address=str(coord["address"]), root_certificates=root_path, run=run,
                   source=path)


def load_launch_file(path: Path, check_run: bool = True) -> "LaunchConfig":
    """The parsed launch file; every mistake a person can fix is a ``UserError``."""
    from fedsynth.certs import CertError, load_certificate
    from fedsynth.errors import UserError

    try:
        cfg = LaunchConfig.load(path, check_run)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    if cfg.root_certificates is not None:
        try:
            load_certificate(cfg.root_certificates, "[coordinator] root-certificates")
        except CertError as exc:
            raise UserError(f"launch file '{path}': {exc}") from None
    return cfg
