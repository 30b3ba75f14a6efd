"""The wire protocol's names: record keys, metric keys, config entries.

Kept apart from ``protocol.records`` (which converts to and from Flower records) so the hospital's
trainer and the GPU benchmark can use them without importing Flower.
"""

from __future__ import annotations

import math
import re

ARRAYS = "arrays"  # the one ArrayRecord: component-prefixed keys (see shared_models.codec)
CONFIG = "config"
METRICS = "metrics"

NUM_EXAMPLES = "num-examples"  # Flower's own weighting key, kept for its stock strategies
SERVER_ROUND = "server-round"


def examples_key(component: str) -> str:
    """Metric key: examples that trained ``component`` (a hospital without CT has 0 for a CT D)."""
    return f"num-examples-{component}"


# Scalar metrics a hospital may report; anything else in a reply is rejected by the coordinator.
TRAIN_METRICS = ("loss-g", "loss-d", "d-real", "d-fake", "train-seconds", "steps",
                 "images-per-second", "data-seconds", "loss-gp", "w-distance", "loss-l1",
                 "loss-cycle", "loss-identity",
                 # weighted terms: pix2pix gradient-loss, cyclegan lesion-cycle-weight
                 "loss-gradient", "loss-lesion",
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
