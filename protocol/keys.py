"""The wire protocol's names: record keys, metric keys, config entries.

Kept apart from ``protocol.records`` (which converts to and from Flower records) so the hospital's
trainer and the GPU benchmark can use them without importing Flower.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Callable, Mapping

ARRAYS = "arrays"  # the one ArrayRecord: component-prefixed keys (see shared_models.codec)
CONFIG = "config"
METRICS = "metrics"

NUM_EXAMPLES = "num-examples"  # Flower's own weighting key, kept for its stock strategies
SERVER_ROUND = "server-round"


def examples_key(component: str) -> str:
    """Metric key: examples that trained ``component`` (a hospital without CT has 0 for a CT D)."""
    return f"num-examples-{component}"


def class_examples_key(label: int) -> str:
    """Metric key: training slices of class index ``label`` at this hospital. Sent only when the
    train message asks (``CLASS_EXAMPLES``) and never by a hospital that requires DP
    (client/round.py); the coordinator checks them (server/validation.py)."""
    return f"num-examples-class-{label}"


CLASS_EXAMPLES_PREFIX = "num-examples-class-"

# Scalar metrics a hospital may report; anything else in a reply is rejected by the coordinator.
TRAIN_METRICS = ("loss-g", "loss-d", "d-real", "d-fake", "train-seconds", "steps",
                 "images-per-second", "data-seconds", "loss-gp", "w-distance", "loss-l1",
                 "loss-cycle", "loss-identity",
                 # weighted terms: pix2pix gradient-loss, cyclegan lesion-cycle-weight
                 "loss-gradient", "loss-lesion",
                 # pix2pix perceptual-loss (the hospital's feature network)
                 "loss-perceptual",
                 # epsilon spent so far by this run's DP-SGD at the hospital (client/privacy.py)
                 "dp-epsilon",
                 # the hospital's memorisation audit (audit-every; runs without DP only)
                 "audit-near-copy-share", "audit-pixel-ratio")
EVAL_METRICS = ("eval-d-real", "eval-d-fake", "eval-frechet", "eval-mmd", "eval-examples",
                "eval-ssim", "eval-psnr", "eval-mae", "eval-seconds",
                # Fréchet Radiomics Distance; precision/recall/density/coverage (FeatureNet)
                "eval-frd", "eval-precision", "eval-recall", "eval-density", "eval-coverage",
                # conditional families: a classifier trained on the hospital's real held-out
                # slices reads generated ones; balanced accuracy against their intended class
                "eval-intended-class-accuracy",
                # 1: a hospital that requires DP kept its figures home (client/evaluation.py)
                "eval-kept-home")
EVAL_KEPT_HOME = "eval-kept-home"

# ConfigRecord entries the strategy writes so a hospital knows what to send back.
REPLY_COMPONENTS = "reply-components"  # components whose arrays the reply must carry
LOCAL_NORM_COMPONENTS = "local-norm-components"  # of those, norm-layer entries stay at home
# In a train message of a class-weighted-aggregation run: the number of classes whose training
# slice counts the reply should carry (``class_examples_key``).
CLASS_EXAMPLES = "class-examples"
# In a train message: evaluate the received global model (round N's aggregate) before training,
# and report the eval-* metrics in the train reply (server/strategy.py, "folded" evaluation).
EVALUATE_ROUND = "evaluate-round"

# The app bundle ``fedsynth launch`` ships (``fedsynth.deployment.write_launch_app``): it holds no
# code, and hospitals serve no other (``client.bundle``).
LAUNCH_APP_PUBLISHER = "fedsynth"
LAUNCH_APP_NAME = "fedsynth-run"
LAUNCH_APP_VERSION = "1.0.0"

# UA-GAN (server/ua_gan.py, client/ua_gan.py): the message action and its array names.
UA_ACTION = "ua_gan"  # hospitals register ``@app.train(UA_ACTION)``
UA_FAKES = "fakes"
UA_LABELS = "labels"
UA_LOGITS = "logits"
UA_GRADS = "grads"


def valid_epsilon(value: object) -> float | None:
    """A hospital's self-reported ``dp-epsilon`` as a float if it can be an epsilon (a finite
    number >= 0), else None: the report and the coordinator's metrics show such a value as
    invalid, never as the value (-5, NaN or inf would read as a strong or no guarantee)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        eps = float(value)
    except OverflowError:  # an int beyond float range
        return None
    return eps if math.isfinite(eps) and eps >= 0 else None


# A hospital's name as a metric label (coordinator and hospital exporters): no path, no space.
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")


def check_name(name: str) -> str:
    """``name`` if it is a valid label value, else ``ValueError`` naming it."""
    if not NAME_PATTERN.match(name):
        raise ValueError(f"hospital name {name!r} is not a valid metric label: use 1-63 letters, "
                         "digits, '.', '_' or '-' (no paths, no spaces)")
    return name


# prometheus-client's multiprocess folder. A hospital daemon sets it for its ClientApp processes
# (client/metrics.py); `fedsynth coordinator --metrics-port` sets it in the SuperLink's
# environment, inherited by every run's ServerApp, which then records its series there for the
# daemon to serve across runs (server/metrics.py, server/app.py).
PROMETHEUS_MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

# A file `fedsynth coordinator` sets in the SuperLink's environment (inherited by every run's
# ServerApp, whose stdout and stderr Flower sends to /dev/null): each ServerApp appends its
# coordinator lines there (strategy, rounds, failed hospitals; server/federation.py), and the
# daemon follows it into its own log (fedsynth/child_output.py).
SERVERAPP_LOG_ENV = "FEDSYNTH_SERVERAPP_LOG"

# -- dashboard gauges of reported metrics ---------------------------------------------------------
# The coordinator's (server/metrics.py) and the hospital's (client/metrics.py) Prometheus gauges of
# the scalars above are made from these declarations and set from the metric keys they name: a
# new hospital-reported scalar is its key in TRAIN_METRICS / EVAL_METRICS, a ``ReportedGauge``
# below, and a panel in deploy/grafana/dashboards/fedsynth.json. Names are Prometheus names
# (``fedsynth_`` prefix, base units); the dashboard and the alert rules (deploy/) use them.

@dataclass(frozen=True)
class ReportedGauge:
    """A gauge of reported scalars: its ``name``, ``help`` and ``labels``, and which metric key
    gives the value for which label values (``keys``: key -> values of ``labels``; at a
    per-hospital gauge the ``hospital`` label comes first and is not listed).

    ``section``: the scalars of a train reply (``train``) or of an evaluation (``evaluate``).
    ``missing``: ``keep`` leaves the last value when a report lacks the key, ``nan`` shows NaN.
    ``check``: turns a reported value into the one shown (None: shown as NaN), e.g. an epsilon
    that cannot be one (``valid_epsilon``)."""

    name: str
    help: str
    keys: tuple[tuple[str, tuple[str, ...]], ...]
    labels: tuple[str, ...] = ()
    section: str = "train"
    missing: str = "keep"
    check: Callable[[object], float | None] | None = None

    @classmethod
    def of(cls, name: str, help: str, key: str, **kw: Any) -> "ReportedGauge":
        """A gauge of one key, without labels of its own."""
        return cls(name, help, ((key, ()),), **kw)


_LOSSES = (("loss-g", ("generator",)), ("loss-d", ("discriminator",)))
PRDC = ("precision", "recall", "density", "coverage")

# The coordinator's gauges of the federation's round (example-weighted means of the replies).
FEDERATION_GAUGES = (
    ReportedGauge("fedsynth_loss", "Example-weighted mean training loss of the last round.",
                  _LOSSES, ("component",)),
    ReportedGauge("fedsynth_discriminator_score",
                  "Mean D output on real / generated images in training.",
                  (("d-real", ("real",)), ("d-fake", ("fake",))), ("on",)),
    ReportedGauge.of("fedsynth_eval_frechet_distance",
                     "Fréchet distance, hospitals' held-out slices vs samples.", "eval-frechet",
                     section="evaluate"),
    ReportedGauge.of("fedsynth_eval_mmd", "MMD (RBF) of held-out slices vs samples.", "eval-mmd",
                     section="evaluate"),
    ReportedGauge.of("fedsynth_eval_frd",
                     "Fréchet Radiomics Distance, hospitals' held-out slices vs samples.",
                     "eval-frd", section="evaluate"),
    ReportedGauge.of("fedsynth_eval_intended_class_accuracy",
                     "Conditional families: hospitals' real-slice classifiers reading generated "
                     "slices, balanced accuracy against the intended class.",
                     "eval-intended-class-accuracy", section="evaluate"),
    ReportedGauge("fedsynth_eval_prdc", "Precision / recall / density / coverage of samples vs "
                  "hospitals' held-out slices.", tuple((f"eval-{m}", (m,)) for m in PRDC),
                  ("measure",), section="evaluate"),
)

# The coordinator's per-hospital gauges, from each hospital's last train reply.
COORDINATOR_HOSPITAL_GAUGES = (
    ReportedGauge.of("fedsynth_hospital_images_per_second",
                     "Training throughput the hospital reported in its last reply.",
                     "images-per-second", missing="nan"),
    ReportedGauge("fedsynth_hospital_loss", "Losses of the hospital's last reply.", _LOSSES,
                  ("component",), missing="nan"),
    ReportedGauge.of("fedsynth_hospital_dp_epsilon",
                     "Differential privacy the hospital reported spent so far in this run "
                     "(epsilon at its own delta; DP-SGD runs only). NaN when its last report "
                     "was not a finite number >= 0.", "dp-epsilon", check=valid_epsilon),
)

# The hospital's own exporter (its metrics port), from the round it trained or evaluated.
HOSPITAL_GAUGES = (
    ReportedGauge.of("fedsynth_hospital_dp_epsilon_spent",
                     "Differential privacy spent by this run so far at this hospital (epsilon at "
                     "its dp-delta; DP-SGD runs only).", "dp-epsilon"),
    ReportedGauge.of("fedsynth_hospital_audit_near_copy_share",
                     "Share of the last memorisation audit's samples that are near-copies of "
                     "this hospital's training slices (audit-every rounds only).",
                     "audit-near-copy-share"),
    ReportedGauge.of("fedsynth_hospital_train_images_per_second",
                     "Training throughput of the last round.", "images-per-second",
                     missing="nan"),
    ReportedGauge.of("fedsynth_hospital_train_seconds",
                     "Wall time of the last round's local training.", "train-seconds",
                     missing="nan"),
    ReportedGauge("fedsynth_hospital_train_loss", "Mean loss of the last training round.",
                  _LOSSES, ("component",)),
    ReportedGauge.of("fedsynth_hospital_eval_frechet_distance",
                     "Fréchet distance of the last local evaluation.", "eval-frechet",
                     section="evaluate", missing="nan"),
    ReportedGauge.of("fedsynth_hospital_eval_frd",
                     "Fréchet Radiomics Distance of the last local evaluation.", "eval-frd",
                     section="evaluate", missing="nan"),
    ReportedGauge.of("fedsynth_hospital_eval_intended_class_accuracy",
                     "Conditional families: this hospital's real-slice classifier on generated "
                     "slices, balanced accuracy against the intended class (last local "
                     "evaluation).", "eval-intended-class-accuracy", section="evaluate",
                     missing="nan"),
)


def gauge_values(gauge: ReportedGauge, metrics: Mapping[str, object]
                 ) -> list[tuple[tuple[str, ...], object]]:
    """(label values, reported value) of ``gauge`` in ``metrics``: a key the report lacks is
    left out (``missing = keep``) or NaN (``nan``); the value as reported, unchecked."""
    out = []
    for key, values in gauge.keys:
        if key in metrics:
            out.append((values, metrics[key]))
        elif gauge.missing == "nan":
            out.append((values, math.nan))
    return out
