"""A hospital's own settings: where its data is, which device trains. They never leave the site.

In deployment they come from the SuperNode's ``--node-config`` (written by ``fedsynth hospital``
from its TOML file); in simulation each virtual hospital finds its entry, by partition id, in the
JSON list named by ``FEDSYNTH_SIM_HOSPITALS``.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from protocol.coordinator import COORDINATOR, COORDINATOR_KEYS  # noqa: F401 - re-exported
from shared_models.settings import REQUIRED, Codec, env_path, setting, unknown_message

SIM_ENV = "FEDSYNTH_SIM_HOSPITALS"


class SettingsError(ValueError):
    """A hospital setting is missing or wrong; the message names it."""


DEFAULT_MAX_DECODED_MB = 256.0
DEFAULT_MAX_EVALUATIONS = 1000  # per run (client/evaluation.py)
# The most work one message may ask (client/ceilings.py): DCGAN at 256 px, width 64, has 92 M
# parameters; training state is about 16 bytes a parameter (weights, gradients, Adam)
CEILINGS = {"max-parameters": 100_000_000, "max-batch": 256, "max-steps": 5000,
            "max-round-seconds": 3600.0, "max-memory-mb": 8192.0}


def _max_decoded_mb(value: Any, key: str = "max-decoded-mb") -> float:
    """``max-decoded-mb``: the decompression-bomb budget, a number of MB > 0."""
    try:
        mb = float(value)
    except (TypeError, ValueError):
        mb = float("nan")
    if not 0 < mb < float("inf"):
        raise SettingsError(f"hospital setting {key!r} must be a number of MB > 0, "
                            f"got {value!r}")
    return mb


STATE_ENV = "STATE_DIRECTORY"  # set by systemd for a unit with StateDirectory=


@dataclass(frozen=True)
class HospitalSettings:
    """The ``[hospital]`` settings, each declared once with ``setting`` (shared_models/settings.py):
    its key, type, default, help; ``HOSPITAL`` below is their codec (node config <-> this)."""

    data_dir: Path = setting(REQUIRED, "the hospital's DICOM folder")
    # disposable: preprocessed slices (systemd CacheDirectory=)
    cache_dir: Path | None = setting(None, "folder of preprocessed slices (disposable)")
    # Kept: the privacy ledger and the replay records (systemd StateDirectory=, whose
    # $STATE_DIRECTORY is the default of ``state-dir``). Never cleaned; back it up.
    state_dir: Path | None = setting(None, "folder of the privacy ledger and replay records "
                                     "(kept; default: $STATE_DIRECTORY)",
                                     fallback=env_path(STATE_ENV))
    device: str = setting("auto", "auto | cpu | cuda | cuda:N")
    amp: str = setting("auto", "auto (bf16 on a GPU that has it, else fp16 on GPU, fp32 on CPU) "
                       "| off")
    threads: int = setting(0, "torch CPU threads; 0 leaves torch's default")
    modalities: tuple[str, ...] = setting((), "DICOM modalities read, comma separated (empty: "
                                          "all)", sep=",",
                                          parse=lambda v, k: tuple(x.upper() for x in _names(v)))
    holdout_every: int = setting(10, "every n-th slice is held out for local evaluation")
    name: str = setting("hospital", "this hospital's name (labels, its own state folder)")
    # Pinned Ed25519 public key of the coordinator: unsigned, tampered or replayed messages are
    # refused. Without one, a deployed hospital refuses every message unless
    # accept_unsigned_models is set (a loudly named flag, for local tests only).
    model_public_key: Path | None = setting(None, "the coordinator's Ed25519 public key")
    # Decompression-bomb budget (client/dicom/budget.py): the most decoded pixel MB (rows x
    # columns x frames x samples x bytes) one DICOM file may declare or encode; larger: "too-large".
    max_decoded_mb: float = setting(DEFAULT_MAX_DECODED_MB, "decoded MB one DICOM file may hold",
                                    parse=_max_decoded_mb)
    accept_unsigned_models: bool = setting(False, "serve unsigned messages (local tests only)")
    # What may never leave this hospital, whatever a message asks: component names (e.g.
    # "discriminator", "d_a", "d_b") and "ua-gan" (UA-GAN's logits and input gradients).
    never_send: tuple[str, ...] = setting((), "components (and ua-gan) never sent, comma "
                                          "separated", sep=",")
    # pix2pix perceptual-loss (shared_models/perceptual.py): this hospital's own feature network,
    # a FeatureNet state dict, loaded only when its SHA-256 is the pinned one; without both, a
    # run asking perceptual-loss > 0 is refused here
    perceptual_network: Path | None = setting(None, "perceptual-loss: this hospital's feature "
                                              "network, a FeatureNet state dict (.pt)")
    perceptual_network_sha256: str = setting("", "perceptual-loss: the SHA-256 the "
                                             "perceptual-network file must have")
    # UA-GAN's hospital-side floor (client/ua_gan.py): each step sees at least ua_min_batch real
    # slices, the discriminator's learning rate is at most ua_max_lr, a round runs between
    # ua_min_steps and ua_max_steps steps and answers for at most ua_max_fakes images.
    ua_min_batch: int = setting(16, "ua-gan: real slices per step, at least")
    ua_max_lr: float = setting(2e-4, "ua-gan: discriminator learning rate, at most")
    ua_min_steps: int = setting(5, "ua-gan: steps per round, at least")
    ua_max_steps: int = setting(500, "ua-gan: steps per round, at most")
    ua_max_fakes: int = setting(256, "ua-gan: generated images answered per round, at most")
    # This site's own class/domain rule (client/datasets.py): the attribute its series names are
    # read from, and (name, regex) pairs; the run's names and their order stay the federation's.
    label_attribute: str = setting("", "slice attribute this site's class names are read from")
    label_patterns: tuple[tuple[str, str], ...] = setting(
        (), "this site's NAME=REGEX pairs, ';' separated (or a TOML table)", sep=";",
        parse=lambda v, k: _patterns(v),
        encode=lambda pairs: ";".join(f"{n}={p}" for n, p in pairs))
    # Differential privacy (client/privacy.py): this hospital's budget per run, (dp-epsilon,
    # dp-delta); inf = no budget. A finite budget, or require-dp, refuses runs without DP-SGD
    # (train dp-noise-multiplier = 0) and UA-GAN rounds (their replies are not DP).
    dp_epsilon: float = setting(float("inf"), "privacy budget per run (inf: none)",
                                parse=lambda v, k: _positive(v, k, inf_ok=True))
    dp_delta: float = setting(1e-5, "privacy delta", parse=lambda v, k: _delta(v))
    require_dp: bool = setting(False, "refuse runs without DP-SGD")
    # Secure aggregation (client/secure_aggregation.py): refuse every train round whose update
    # would leave this hospital unmasked (a run without `secure-aggregation = true`, UA-GAN)
    require_secure_aggregation: bool = setting(False, "refuse train rounds without secure "
                                               "aggregation")
    # Memorisation audit (shared_models.audit) after every n-th round this hospital trains: its
    # scalars are logged, on the metrics port and (runs without DP only) in the reply; 0: off
    audit_every: int = setting(0, "memorisation audit every n-th trained round (0: off)",
                               parse=lambda v, k: _count(v, k))
    # Evaluations acted on per run (client/evaluation.py): at most one per round always, and at
    # most this many in one run; further ones are refused in one line and counted
    max_evaluations: int = setting(DEFAULT_MAX_EVALUATIONS, "evaluations acted on per run",
                                   parse=lambda v, k: _count(v, k))
    # Ceilings on one message (client/ceilings.py): model parameters, batch, local steps per
    # round and seconds per round; past one the message is refused in one line and counted
    max_parameters: int = setting(int(CEILINGS["max-parameters"]), "model parameters one "
                                  "message may ask, at most", parse=lambda v, k: _limit(v, k))
    max_batch: int = setting(int(CEILINGS["max-batch"]), "batch one message may ask, at most",
                             parse=lambda v, k: _limit(v, k))
    max_steps: int = setting(int(CEILINGS["max-steps"]), "local steps per round, at most",
                             parse=lambda v, k: _limit(v, k))
    max_round_seconds: float = setting(CEILINGS["max-round-seconds"], "seconds per round, at "
                                       "most", parse=lambda v, k: _positive(v, k))
    max_memory_mb: float = setting(CEILINGS["max-memory-mb"], "memory (MB) one message may "
                                   "make this hospital's training use, at most",
                                   parse=lambda v, k: _positive(v, k))

    def _own_folder(self, root: Path | None) -> Path | None:
        """``root/run-state/<this hospital>``: hospitals may share a folder (virtual hospitals
        over one folder) and must not share replay records or privacy ledgers."""
        if root is None:
            return None
        import hashlib

        return root / "run-state" / hashlib.sha256(self.name.encode()).hexdigest()[:16]

    def run_state_path(self, run_id: int, kind: str) -> Path | None:
        """A file of per-run state kept across restarts (Flower keeps ``context.state`` in the
        SuperNode's memory only; the replay record): in the state folder, or, at a hospital
        without one (simulation, a demo), in the cache folder as before."""
        own = self._own_folder(self.state_dir or self.cache_dir)
        return None if own is None else own / f"run-{int(run_id)}-{kind}.json"

    def state_path(self, kind: str) -> Path | None:
        """A file of this hospital's state across runs (the privacy ledger: every run on these
        slices charges one budget): in the state folder only, never the disposable cache."""
        own = self._own_folder(self.state_dir)
        return None if own is None else own / f"{kind}.json"

    def cache_state_path(self, kind: str) -> Path | None:
        """Where a file of ``state_path`` lay before it moved to the state folder (the cache):
        read once to carry an old ledger over, and for the cache's copy of the ledger marker."""
        own = self._own_folder(self.cache_dir)
        return None if own is None else own / f"{kind}.json"

    @property
    def needs_dp(self) -> bool:
        return self.require_dp or math.isfinite(self.dp_epsilon)

    def __post_init__(self) -> None:
        if self.require_dp and not math.isfinite(self.dp_epsilon):
            # without a budget any noise multiplier the coordinator picks (0.01: epsilon ~1e5 a
            # round) would count as DP
            raise SettingsError("hospital setting require-dp needs a finite dp-epsilon (the "
                                "budget the noise must keep this hospital within)")

    @classmethod
    def from_mapping(cls, m: Mapping[str, Any]) -> "HospitalSettings":
        """From a node config (or one simulated hospital's entry): its hospital keys; the others
        are Flower's (partition-id...). A settings file's unknown keys are refused, by
        ``DaemonSettings.load``."""
        return HOSPITAL.decode({k: v for k, v in m.items() if k in HOSPITAL.by_key})

    @classmethod
    def from_node_config(cls, node_config: Mapping[str, Any]) -> "HospitalSettings":
        """Deployment: node config holds ``data-dir``; simulation: ``partition-id`` + the env list."""
        if "data-dir" in node_config:
            return cls.from_mapping(node_config)
        if "partition-id" in node_config and os.environ.get(SIM_ENV):
            entries = json.loads(Path(os.environ[SIM_ENV]).read_text())
            return cls.from_mapping(entries[int(node_config["partition-id"])])
        raise SettingsError("no hospital settings: node config has no 'data-dir' "
                            f"and {SIM_ENV} is not set")

    def to_node_config(self) -> dict[str, Any]:
        """The inverse of ``from_mapping``: what ``fedsynth hospital`` hands the SuperNode (the
        settings that differ from their defaults, and data-dir)."""
        return HOSPITAL.encode(self, changed_only=True)

    def check_local(self) -> None:
        """Fail at daemon start, with the setting's name, rather than in every round."""
        if self.needs_dp and self.state_dir is None:
            raise SettingsError("hospital settings dp-epsilon / require-dp need a state-dir "
                                "(under systemd, StateDirectory= gives it): the privacy ledger "
                                "must survive a restart of the daemon and a cleaned cache")
        if not self.data_dir.is_dir():
            raise SettingsError(f"hospital data-dir '{self.data_dir}' is not a folder")
        if self.model_public_key is not None:
            from protocol.signing import SignatureError, load_public_key

            try:
                load_public_key(self.model_public_key)  # readable, and an Ed25519 public key
            except SignatureError as exc:
                raise SettingsError(f"hospital model-public-key: {exc}") from None


def _positive(value: Any, name: str, inf_ok: bool = False) -> float:
    try:
        x = float(value)
    except (TypeError, ValueError):
        x = float("nan")
    if not (x > 0 and (inf_ok or math.isfinite(x))):
        raise SettingsError(f"hospital setting {name!r} must be a number > 0, got {value!r}")
    return x


def _count(value: Any, name: str) -> int:
    try:
        n = int(value)
    except (TypeError, ValueError):
        n = -1
    if n < 0 or isinstance(value, bool) or (isinstance(value, float) and n != value):
        raise SettingsError(f"hospital setting {name!r} must be a whole number >= 0, "
                            f"got {value!r}")
    return n


def _limit(value: Any, name: str) -> int:
    n = _count(value, name)
    if n < 1:
        raise SettingsError(f"hospital setting {name!r} must be a whole number >= 1, got "
                            f"{value!r}")
    return n


def _delta(value: Any) -> float:
    try:
        x = float(value)
    except (TypeError, ValueError):
        x = float("nan")
    if not 0 < x < 1:
        raise SettingsError(f"hospital setting 'dp-delta' must be in (0, 1), got {value!r}")
    return x


def _patterns(value: Any) -> tuple[tuple[str, str], ...]:
    """``label-patterns``: a TOML table {name = regex} or the node-config form name=regex;...

    Matched by the same RE2 engine as the run's patterns (``shared_models.patterns``): a pattern
    RE2 cannot compile, or one over its length cap, stops the daemon at start."""
    from shared_models.patterns import PatternError, check_pattern

    if isinstance(value, Mapping):
        pairs = [(str(k), str(v)) for k, v in value.items()]
    else:
        pairs = []
        for item in (str(value).split(";") if value else []):
            name, sep, regex = item.partition("=")
            if not sep or not name.strip():
                raise SettingsError(f"hospital setting 'label-patterns': {item!r} is not "
                                    "NAME=REGEX")
            pairs.append((name.strip(), regex))
    for name, regex in pairs:
        if ";" in regex or "=" in name:
            raise SettingsError(f"hospital setting 'label-patterns': {name} = {regex!r}: a "
                                "pattern may not contain ';' (it separates patterns on the "
                                "SuperNode's command line)")
        try:
            check_pattern(regex)
        except PatternError as exc:
            raise SettingsError(f"hospital setting 'label-patterns': {name} = {regex!r}: "
                                f"{exc}") from None
    return tuple(pairs)


HOSPITAL = Codec(HospitalSettings, "hospital setting", error=SettingsError, lenient=True)
HOSPITAL_KEYS = HOSPITAL.keys()


@dataclass(frozen=True)
class NodeSettings:
    """The ``[node]`` table of ``fedsynth hospital``'s settings file."""

    key: Path | None = setting(None, "the SuperNode's OpenSSH EC private key")
    port: int = setting(9094, "local runtime port of the SuperNode")
    metrics_port: int = setting(0, "this hospital's Prometheus metrics port (0: off)")
    executor: str = setting("warm", "only warm: one long-lived process runs every task")
    approved_apps: tuple[str, ...] = setting((), "sha256 of the launch bundles served (empty: "
                                             "any code-free fedsynth launch bundle)", sep=",")


NODE = Codec(NodeSettings, "[node] setting", error=SettingsError, lenient=True, plain=True)
NODE_KEYS = NODE.keys()


def _names(value: Any) -> tuple[str, ...]:
    """A list setting given as a TOML list or a comma-separated string."""
    items = value.split(",") if isinstance(value, str) else list(value)
    return tuple(str(x).strip() for x in items if str(x).strip())


# "flower" (Flower's own SuperExec + flwr-clientapp) imported the run's app bundle, i.e. ran the
# coordinator's code at the hospital: refused since the trust review (client/bundle.py).
EXECUTORS = ("warm",)


@dataclass(frozen=True)
class DaemonSettings:
    """``fedsynth hospital``'s settings file (TOML), overridable by flags.

    ``[coordinator]`` address, root-certificates (or insecure = true); ``[node]`` key (OpenSSH EC
    private key), port (local runtime port of the SuperNode), metrics-port (0: off), executor
    (only "warm": one long-lived process runs every task of the installed fedsynth, see
    ``client.executor``), approved-apps (sha256 of the launch bundles served);
    ``[hospital]`` the ``HospitalSettings`` keys (``HOSPITAL_KEYS``). Relative paths are
    relative to the file's folder. Unknown keys are refused.
    """

    coordinator: str
    hospital: HospitalSettings
    root_certificates: Path | None = None
    insecure: bool = False
    node_key: Path | None = None
    port: int = 9094
    metrics_port: int = 0
    executor: str = "warm"
    approved_apps: tuple[str, ...] = ()  # sha256 of app bundles this hospital serves (empty: any
    #                                      code-free fedsynth launch bundle, see client/bundle.py)

    @classmethod
    def load(cls, path: Path | None, overrides: Mapping[str, Any] | None = None
             ) -> "DaemonSettings":
        """Read ``path`` (optional), then apply ``overrides`` ("section.key" → value)."""
        import tomllib

        data: dict[str, dict[str, Any]] = {"coordinator": {}, "node": {}, "hospital": {}}
        base = Path.cwd()
        if path is not None:
            path = Path(path)
            try:
                loaded = tomllib.loads(path.read_text())
            except OSError as exc:
                raise SettingsError(f"settings file '{path}' cannot be read: "
                                    f"{exc.strerror}") from None
            except tomllib.TOMLDecodeError as exc:
                raise SettingsError(f"settings file '{path}' is not valid TOML: {exc}") from None
            for section, values in loaded.items():
                if section not in data or not isinstance(values, dict):
                    raise SettingsError(f"settings file '{path}': unknown section [{section}] "
                                        "(known: coordinator, node, hospital)")
                data[section].update(values)
            base = path.parent
        for dotted, value in (overrides or {}).items():
            section, _, key = dotted.partition(".")
            if value is not None:
                data[section][key] = value

        def rel(value: Any) -> Path | None:
            if value in (None, ""):
                return None
            p = Path(str(value)).expanduser()
            return p if p.is_absolute() else base / p

        for section, codec in (("hospital", HOSPITAL), ("node", NODE),
                               ("coordinator", COORDINATOR)):
            unknown = sorted(k for k, v in data[section].items()
                             if k not in codec.by_key and v is not None)
            if unknown:
                raise SettingsError(unknown_message(unknown, codec.keys(),
                                                    f"[{section}] setting", plain=True))
            for s in codec.settings:  # relative paths: relative to the file's folder
                if s.is_path and data[section].get(s.key):
                    data[section][s.key] = str(rel(data[section][s.key]))
        hosp = dict(data["hospital"])
        try:
            coord = COORDINATOR.decode(data["coordinator"])
        except ValueError as exc:
            raise SettingsError(str(exc)) from None
        node = NODE.decode(data["node"])
        if not coord.address:
            raise SettingsError("coordinator address is missing ([coordinator] address = "
                                "\"HOST:PORT\" or --coordinator)")
        insecure = coord.insecure
        root = coord.root_certificates
        if root is None and not insecure:
            raise SettingsError("coordinator root-certificates is missing (the CA file from "
                                "the coordinator); set insecure = true only for a local test")
        executor = node.executor
        if executor == "flower":
            raise SettingsError('[node] executor = "flower" is no longer offered: Flower\'s own '
                                "ClientApp process imports the code of the run's app bundle; "
                                'the warm executor serves only the installed fedsynth')
        if executor not in EXECUTORS:
            raise SettingsError(f"[node] executor = {executor!r} is not one of {EXECUTORS}")
        return cls(coordinator=coord.address, hospital=HospitalSettings.from_mapping(hosp),
                   root_certificates=None if insecure else root, insecure=insecure,
                   node_key=node.key, port=node.port, metrics_port=node.metrics_port,
                   executor=executor, approved_apps=node.approved_apps)
