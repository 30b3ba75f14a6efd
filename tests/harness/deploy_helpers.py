"""The deployment tests' helpers live in ``bench.localdeploy`` (the round benchmark uses them too),
except the real-daemon federation the process tests share."""

from pathlib import Path

from bench.localdeploy import (FEDSYNTH, Proc, free_port, hospital_toml,  # noqa: F401
                               launch_toml, metrics_rows, run, start, wait_for)


def lifecycle_federation(tmp_path: Path, names: tuple[str, ...]):
    """Keys, coordinator address and arguments, hospital ports and settings files of a real-daemon
    federation of ``names`` on demo data (nothing started)."""
    from fedsynth.certs import init_federation, new_node_key
    from fedsynth.demo_data import build_demo_hospitals

    keys = init_federation(tmp_path / "keys")
    for name in names:
        new_node_key(keys.root, name)
    data = build_demo_hospitals(tmp_path / "data", len(names), matrix=32)
    address = f"127.0.0.1:{free_port()}"
    coord_args = ["coordinator", "--keys", str(keys.root), "--address", address,
                  "--state", str(tmp_path / "state"), "--rescan", "2"]
    ports = {name: free_port() for name in names}
    tomls = {name: hospital_toml(tmp_path / f"{name}.toml", address, keys.root, name, data[i],
                                 ports[name]) for i, name in enumerate(names)}
    return keys, address, coord_args, ports, tomls
