"""The settings toolkit (shared_models/settings.py): one ``setting`` and one flat codec for run,
hospital and coordinator settings (issue 23 item 3)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from shared_models.settings import REQUIRED, Codec, check_choices, setting

NAMES = ["alpha", "beta"]  # a registry: the choices are read when asked, not copied


@dataclass(frozen=True)
class Toy:
    folder: Path = setting(REQUIRED, "a folder")
    rate: float = setting(0.5, "a rate")
    on: bool = setting(False, "a flag")
    rule: str = setting("alpha", "one of {choices}", choices=lambda: NAMES)
    tags: tuple[str, ...] = setting((), "tags", sep=",")
    labels: str = setting("a,b", "labels", sep=";")
    hidden: int = setting(1, "derived", run=False)

    def __post_init__(self) -> None:
        check_choices(self)


def test_types_paths_and_list_separators() -> None:
    codec = Codec(Toy, "toy setting")
    assert codec.keys() == ("folder", "rate", "on", "rule", "tags", "labels")  # no run=False
    toy = codec.decode({"folder": "~/x", "rate": 1, "tags": "a, b,,c", "labels": ["x", "y"]})
    assert toy.folder == Path("~/x").expanduser() and codec.by_key["folder"].is_path
    assert toy.rate == 1.0 and isinstance(toy.rate, float)
    assert toy.tags == ("a", "b", "c") and toy.labels == "x;y"
    assert codec.encode(toy)["tags"] == "a,b,c"
    with pytest.raises(ValueError, match="'rate' must be a float"):
        codec.decode({"folder": "x", "rate": "fast"})
    with pytest.raises(ValueError, match="'on' must be a bool"):
        codec.decode({"folder": "x", "on": 1})
    with pytest.raises(ValueError, match="toy setting 'folder' is missing"):
        codec.decode({})
    lenient = Codec(Toy, "toy setting", lenient=True)  # a command line's text
    assert lenient.decode({"folder": "x", "on": "yes", "rate": "2"}) == Toy(Path("x"), 2.0, True)


def test_choices_come_from_a_registry() -> None:
    codec = Codec(Toy)
    assert codec.by_key["rule"].help == "one of alpha, beta"
    with pytest.raises(ValueError, match="rule 'gamma' is not one of alpha, beta"):
        codec.decode({"folder": "x", "rule": "gamma"})
    NAMES.append("gamma")
    try:
        assert codec.decode({"folder": "x", "rule": "gamma"}).rule == "gamma"
        assert "gamma" in codec.by_key["rule"].help
    finally:
        NAMES.remove("gamma")


def test_run_choices_are_the_aggregation_registry() -> None:
    from server.aggregation import REDUCERS, SERVER_OPTS
    from server.run_config import CODEC

    assert CODEC.by_key["reducer"].choices == ("", *REDUCERS)
    assert CODEC.by_key["server-opt"].choices == ("", *SERVER_OPTS)
    assert CODEC.by_key["reducer"].help.endswith(", ".join(REDUCERS))


def test_unknown_key_gets_one_suggestion() -> None:
    codec = Codec(Toy, "toy setting")
    with pytest.raises(ValueError, match=r"^unknown toy setting 'raet': did you mean 'rate'\?$"):
        codec.decode({"folder": "x", "raet": 1})
    with pytest.raises(ValueError, match="unknown toy setting 'zzz'; known: folder, rate"):
        codec.decode({"folder": "x", "zzz": 1})


def test_run_settings_round_trip_through_the_one_codec() -> None:
    from server.run_config import CODEC, FederationConfig, from_flat

    cfg = from_flat({"family": "cdcgan", "classes": ["a", "b"], "reducer": "median",
                     "num-server-rounds": 2})
    assert CODEC.decode(CODEC.encode(cfg)) == cfg
    assert CODEC.encode(FederationConfig()) == CODEC.defaults()


def test_hospital_settings_round_trip_through_the_one_codec(tmp_path: Path) -> None:
    from client.settings import HOSPITAL, HospitalSettings, SettingsError

    h = HospitalSettings.from_mapping({
        "data-dir": str(tmp_path), "modalities": "mr,ct", "never-send": ["d_a", "ua-gan"],
        "label-patterns": {"MR": "^MR$"}, "dp-epsilon": 2, "state-dir": str(tmp_path / "s"),
        "max-batch": 8, "accept-unsigned-models": "true", "partition-id": 3})  # Flower's key
    assert h.modalities == ("MR", "CT") and h.never_send == ("d_a", "ua-gan")
    assert h.label_patterns == (("MR", "^MR$"),) and h.dp_epsilon == 2.0
    flat = h.to_node_config()
    assert flat["label-patterns"] == "MR=^MR$" and flat["never-send"] == "d_a,ua-gan"
    assert HospitalSettings.from_mapping(flat) == h == HOSPITAL.decode(HOSPITAL.encode(h))
    with pytest.raises(SettingsError, match="did you mean 'never-send'"):
        HOSPITAL.check_keys({"never-sent": "x"})


def test_coordinator_keys_have_one_home() -> None:
    import client.settings
    import fedsynth.launch_file
    from protocol.coordinator import COORDINATOR, COORDINATOR_KEYS

    assert client.settings.COORDINATOR_KEYS is COORDINATOR_KEYS
    assert fedsynth.launch_file.COORDINATOR is COORDINATOR
    assert COORDINATOR_KEYS == ("address", "root-certificates", "insecure")
