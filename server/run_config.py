"""The run configuration: every setting of a federation run, its type, default and help, in one place.

``FederationConfig`` is a tree of frozen dataclasses: the model (``ModelConfig``), how hospitals
train (``TrainConfig``) and which slices are which class or domain (``DataConfig``), all from
``shared_models.config`` because they travel to the hospitals, plus the coordinator's own fields
below. Every field is a ``setting`` with a key and a line of help, and everything that knows a
run setting is derived from this tree:

- ``fedsynth launch`` checks the launch file's ``[run]`` table with ``from_flat`` before it
  submits anything (a mistyped key is refused with the key it is closest to, "did you mean";
  ``rounds`` names ``num-server-rounds``; the known keys are listed only when none is close);
- ``fedsynth launch --help`` lists ``SETTINGS`` with their help (``settings_help``);
- the code-free launch app declares ``defaults_flat()`` as ``[tool.flwr.app.config]`` (Flower
  refuses run-config keys an app does not declare), and this repository's ``pyproject.toml``
  declares the same (a test checks they are equal);
- ``examples/run.toml`` is ``example_toml()`` (a test checks the file is current);
- the ServerApp parses Flower's flat run config with ``from_flat`` too.

So a setting is added by adding a field, and nowhere else.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Mapping

from shared_models import DataConfig, ModelConfig, TrainConfig, families
from shared_models.capabilities import (DP, UA_GAN, check_model, check_preset, check_supported,
                                         refusal, supporting)
from shared_models.traits import family_traits
from shared_models.settings import Codec, Setting, check_choices, setting

# torch- and flwr-free: `fedsynth launch` checks its run file with this module (issue 24 item 8)
from .run_rules import (CLIENT_DP_DELTA, EXAMPLES_RATIO, MAX_EXAMPLES, NORM_FLOOR_RMS, PRESETS,
                        REDUCERS, SECAGG_CLIP, SECAGG_MAX_EXAMPLES, SERVER_OPTS,
                        UPDATE_NORM_RATIO, check_class_weighted_run, check_client_dp_run,
                        check_run_id, check_secure_run)

# Keys people write for a known one: refused, naming it (each setting has one key, the one
# `fedsynth launch --help` lists; a silent alias was a second spelling nobody could look up).
MISNOMERS = {"rounds": "num-server-rounds"}


@dataclass(frozen=True)
class FederationConfig:
    """One federation run, parsed once at the edge (the launch file, or Flower's run config)."""

    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rounds: int = setting(5, "federated rounds", key="num-server-rounds")
    preset: str = setting("fedgan", "aggregation preset: {choices}", choices=tuple(PRESETS))
    # "": the preset's; the choices are the registries' (server/aggregation.py)
    reducer: str = setting("", "override the preset's reducer: {choices}",
                           choices=("", *REDUCERS))
    server_opt: str = setting("", "override the preset's server optimiser: {choices}",
                              choices=("", *SERVER_OPTS))
    server_lr: float = setting(0.0, "server optimiser learning rate (0: the policy's, 1.0)")
    sync_every: int = setting(0, "aggregate shared components every k rounds (0: every round)")
    ua_fake_batch: int = setting(64, "ua-gan: generated images sent to hospitals per round")
    min_hospitals: int = setting(1, "a round waits until this many hospitals are connected")
    fraction_train: float = setting(1.0, "fraction of connected hospitals that train each round")
    round_timeout_s: float = setting(3600.0, "seconds a round waits for replies before it goes "
                                     "on with those it has", key="round-timeout")
    evaluate_every: int = setting(1, "hospitals evaluate every k rounds, and in the last")
    server_ema_decay: float = setting(0.0, "coordinator: moving average of the aggregated "
                                      "generator across rounds; grids and checkpoints' samples "
                                      "come from it (0: off)")
    run_dir: str = setting("runs", "folder of run folders, on the coordinator's machine",
                           path=True)
    run_id: str = setting("", "name of this run's folder (default: run-YYYYmmdd-HHMMSS)")
    resume: bool = setting(False, "continue run-id after its last completed round")
    signing_key: str = setting("", "the coordinator's model-signing.key (Ed25519 PEM): every "
                               "message to hospitals is signed with it", path=True)
    num_samples: int = setting(16, "images in each round's fixed-input sample grid")
    keep_checkpoints: int = setting(3, "checkpoints kept besides the best")
    # What a hospital may claim (server/validation.py): example counts clipped to K x the others'
    # median and an absolute cap; a reply moving a component beyond R x (||global|| + floor) is
    # rejected whatever the other replies are; max-update-norm clips each accepted update.
    examples_ratio: float = setting(EXAMPLES_RATIO, "a hospital's example count is clipped to "
                                    "this many times the other replies' median")
    max_examples: float = setting(float(MAX_EXAMPLES), "absolute cap on a hospital's example count")
    update_norm_ratio: float = setting(UPDATE_NORM_RATIO, "a reply moving a component more than "
                                       "this many times its norm is rejected")
    norm_floor_rms: float = setting(NORM_FLOOR_RMS, "per-element floor of that norm bound")
    max_update_norm: float = setting(0.0, "each hospital's update is scaled down to this L2 norm "
                                     "per component before aggregation (0: off)")
    metrics_port: int = setting(0, "serve the coordinator's Prometheus metrics on this port "
                                "(0: off)")
    metrics_host: str = setting("127.0.0.1", "address the metrics endpoint binds")
    hospital_names: str = setting("", "JSON file mapping node ids to hospital names (labels)",
                                  path=True)
    # Secure aggregation (server/secure_aggregation.py): Flower's SecAgg+ masks each hospital's
    # update; the coordinator learns only the sum. Reply validation cannot see single updates,
    # so the bounds are the encoding's: each update coordinate clipped at the hospital, each
    # example count capped (docs/security.md, "Secure aggregation").
    secure_aggregation: bool = setting(False, "hospitals' updates are summed under Flower's "
                                       "SecAgg+: the coordinator sees only the sum (mean "
                                       "presets fedgan, fedmed-gan, local-d, fedbn)")
    secure_aggregation_clip: float = setting(SECAGG_CLIP, "secure-aggregation: each coordinate "
                                             "of a hospital's update is clipped to +- this")
    secure_aggregation_max_examples: float = setting(
        SECAGG_MAX_EXAMPLES, "secure-aggregation: a hospital's example count is capped to this "
        "(the weights' scale; larger = coarser quantisation of small hospitals)")
    # Client-level DP on the aggregate (server/client_dp.py, McMahan et al. 2018): each hospital's
    # update clipped to client-dp-clip at the coordinator, equal-weight mean, Gaussian noise
    # z C / n; epsilon over rounds from Opacus' RDP accountant (docs/security.md).
    client_dp_noise_multiplier: float = setting(0.0, "client-level DP: noise multiplier z of the "
                                                "Gaussian noise z x client-dp-clip / n added to "
                                                "the mean update (0: off)")
    client_dp_clip: float = setting(0.0, "client-level DP: each hospital's update (trained - "
                                    "received, L2 over the shared components) is clipped to "
                                    "this norm; required > 0 with client DP")
    client_dp_delta: float = setting(CLIENT_DP_DELTA, "client-level DP: the delta of the run's "
                                     "client-level epsilon")

    # Per-class aggregation weights (server/aggregation.py, class_weighted_mean): each
    # hospital's weight for class c's embedding rows, CBN scales and AC-GAN head rows is its
    # training slices of class c; the other parameters keep the example-count weighting.
    class_weighted_aggregation: bool = setting(
        False, "conditional families: each class's parameter rows weighted by the hospitals' "
        "training slices of that class (not with secure-aggregation or client-level DP)")

    def __post_init__(self) -> None:
        if self.run_id:
            check_run_id(self.run_id)
        check_choices(self)  # preset, reducer, server-opt: "preset 'x' is not one of ..."
        if self.rounds < 1 or self.min_hospitals < 1 or self.evaluate_every < 1:
            raise ValueError("num-server-rounds, min-hospitals and evaluate-every must be >= 1")
        if not 0 < self.fraction_train <= 1 or self.round_timeout_s <= 0:
            raise ValueError("fraction-train must be in (0, 1] and round-timeout > 0")
        if not 0 <= self.metrics_port < 65536:
            raise ValueError(f"metrics-port {self.metrics_port} is not a TCP port")
        if not self.max_update_norm >= 0:
            raise ValueError(f"max-update-norm must be >= 0, got {self.max_update_norm}")
        if self.max_update_norm and self.preset == "ua-gan":  # its replies are no model updates
            raise ValueError("max-update-norm does not apply to preset 'ua-gan'")
        if self.client_dp_noise_multiplier:  # before SecAgg's: client DP names that clash
            check_client_dp_run(self)
        if self.secure_aggregation:
            check_secure_run(self)
        # its declared traits, torch-free; an unknown family fails here, by name
        family = family_traits(self.model.family)
        if self.class_weighted_aggregation:
            check_class_weighted_run(self, family.data_layout)
        check_supported(family, self.train)  # augment, r1-gamma, loss settings the family ignores
        check_model(family, self.model, self.train)  # channels = 3 for the colour families only
        check_preset(self.preset, self.train)  # loss settings ua-gan cannot honour
        if self.preset == "ua-gan" and UA_GAN not in family.supports:  # else only at round 1
            raise ValueError(refusal(family, UA_GAN, "preset 'ua-gan'"))
        if self.train.dp and DP not in family.supports:
            raise ValueError(f"family {self.model.family!r} has no DP-SGD training "
                             f"(dp-noise-multiplier > 0 needs {', '.join(supporting(DP))})")
        if not 0 <= self.server_ema_decay < 1:
            raise ValueError(f"server-ema-decay must be in [0, 1), got {self.server_ema_decay}")
        wants = (len(self.data.class_names) if family.data_layout == "labelled" else
                 len(self.data.mask_label_names) if family.data_layout == "masked" else 0)
        if self.model.num_classes != wants:
            object.__setattr__(self, "model",
                               dataclasses.replace(self.model, num_classes=wants))
        norm = "group" if self.train.dp else "batch"  # DP needs per-sample norms (shared_models.dp)
        if self.model.norm != norm:
            object.__setattr__(self, "model", dataclasses.replace(self.model, norm=norm))

    def policy_overrides(self) -> dict[str, Any]:
        """The ``ComponentPolicy`` fields this run sets for every shared component."""
        out: dict[str, Any] = {}
        if self.reducer:
            out["reducer"] = self.reducer
        if self.server_opt:
            out["server_opt"] = self.server_opt
        if self.server_lr:
            out["server_lr"] = self.server_lr
        if self.sync_every:
            out["sync_every"] = self.sync_every
        return out

    def resolved_run_id(self) -> str:
        return check_run_id(self.run_id) if self.run_id else \
            datetime.now(timezone.utc).strftime("run-%Y%m%d-%H%M%S")

    @classmethod
    def from_run_config(cls, rc: Mapping[str, Any]) -> "FederationConfig":
        """From Flower's flat ``run_config`` (the app's declared keys + the launch overrides)."""
        return from_flat(rc)

    def to_flat(self) -> dict[str, Any]:
        return CODEC.encode(self)


# ------------------------------------------------------------------------- the settings list

# The one flat codec (shared_models/settings.py) over the tree: the keys people write.
CODEC: Codec[FederationConfig] = Codec(FederationConfig, "run setting", misnomers=MISNOMERS,
                                       see=" (see `fedsynth launch --help`)",
                                       context="run settings")
SETTINGS: tuple[Setting, ...] = CODEC.settings
PATH_KEYS = tuple(s.key for s in SETTINGS if s.is_path)  # relative to the launch file's folder


def from_flat(values: Mapping[str, Any]) -> FederationConfig:
    """A ``FederationConfig`` from flat ``key = value`` settings; every mistake is a
    ``ValueError`` naming the key (``unknown_message``)."""
    return CODEC.decode(values)


def unknown_message(keys: list[str]) -> str:
    """One "did you mean X" per mistyped key; the full list only when nothing is close."""
    return CODEC.unknown_message(keys)


def defaults_flat() -> dict[str, Any]:
    """Every key with its default: the launch app's ``[tool.flwr.app.config]``."""
    return CODEC.defaults()


def settings_help() -> str:
    """``fedsynth launch --help``'s list of ``[run]`` settings."""
    width = max(len(s.key) for s in SETTINGS)
    lines = ["[run] settings (key = default: help):"]
    lines += [f"  {s.key:<{width}} = {toml_value(s.default):<10} {s.help}" for s in SETTINGS]
    lines.append(f"families: {', '.join(families())}; presets: {', '.join(PRESETS)}")
    return "\n".join(lines)


def toml_value(value: Any) -> str:
    """A scalar as TOML (the launch app's declarations, ``--run-config``, examples/run.toml)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


FAMILY_EXAMPLES = {
    "dcgan": ["family = \"dcgan\""],
    "cdcgan": ["family = \"cdcgan\"", "classes = \"T1w,T2w\"  # two classes, label order",
               "class-attribute = \"series_description\""],
    "wgan-gp": ["family = \"wgan-gp\"", "spatial-dims = 3  # volumes"],
    "pix2pix": ["family = \"pix2pix\"", "domain-a = \"T1w\"", "domain-b = \"T2w\"",
                "gradient-loss = 1.0  # sharper edges: image-gradient difference beside L1"],
    "cyclegan": ["family = \"cyclegan\"", "domain-attribute = \"modality\"",
                 "domain-a = \"MR\"", "domain-b = \"CT\"  # MR -> CT, unpaired",
                 "lesion-cycle-weight = 10.0  # where SEG/RTSTRUCT masks exist (mask-labels)"],
    "maskgan": ["family = \"maskgan\"", "mask-labels = \"lesion\"  # DICOM SEG / RTSTRUCT labels",
                "lesion-weight = 5.0  # the masked pixels weigh 5x in the losses"],
    "aae": ["family = \"aae\"  # masks from noise: stage 1 of `fedsynth sample --stage2`",
            "mask-labels = \"lesion\"", "latent-dim = 16"],
}


def example_toml() -> str:
    """``examples/run.toml``: a launch file with every setting at its default, explained."""
    lines = ["# fedsynth launch file: `fedsynth launch examples/run.toml` (on the coordinator's "
             "machine).",
             "# Generated from server/run_config.py (python -m server.run_config > "
             "examples/run.toml);",
             "# every [run] key is listed with its default. Unknown keys are refused.", "",
             "[coordinator]", 'address = "127.0.0.1:8000"  # runs are submitted from the '
             "coordinator's own host",
             'root-certificates = "keys/ca.pem"', "", "[run]"]
    for s in SETTINGS:
        value = {"signing-key": '"keys/model-signing.key"'}.get(s.key, toml_value(s.default))
        lines.append(f"# {s.help}")
        lines.append(f"{s.key} = {value}")
    lines += ["", "# Other families: replace the family line with one of these blocks."]
    for family in families():
        lines.append(f"#   {family}:")
        lines += [f"#     {x}" for x in FAMILY_EXAMPLES.get(family, [f'family = "{family}"'])]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(example_toml(), end="")
