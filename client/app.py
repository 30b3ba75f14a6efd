"""The Flower ClientApp: a thin adapter from Flower messages to the hospital's round.

The round itself is a pipeline of named stages in ``client.round`` (admit, plan, evaluate,
train, account, reply); this module registers the handlers and sanitises their errors.

What leaves the hospital is built only by ``protocol.train_reply`` / ``evaluate_reply``:
the shared components' arrays and a fixed list of scalar metrics. Local errors are logged here in
full and reach the coordinator only as a generic reason, because an exception text can hold a file
path or a DICOM attribute.
"""

from __future__ import annotations

import functools
import logging
from typing import Callable

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from . import ceilings
from . import metrics as hospital_metrics
from . import round as stages
from .privacy import PrivacyRefused
from .secure_aggregation import secure_aggregation_mod
from .settings import HospitalSettings
from .ua_gan import UA_ACTION, ua_train

log = logging.getLogger(__name__)


class HospitalError(RuntimeError):
    """Sent to the coordinator instead of the local exception (whose text stays at the site)."""

    already_logged = False  # a refusal by the hospital's settings: logged in one line already


class HospitalRefusal(HospitalError):
    already_logged = True


def _private_errors(handler: Callable[[Message, Context], Message]
                    ) -> Callable[[Message, Context], Message]:
    """Log the real error locally; send only its class of problem to the coordinator."""

    @functools.wraps(handler)
    def wrapper(msg: Message, context: Context) -> Message:
        try:
            return handler(msg, context)
        except PrivacyRefused as exc:  # logged in one line where it was refused
            hospital_metrics.record_failure(_name_of(context), handler.__name__)
            raise HospitalRefusal(f"{handler.__name__} refused by the hospital's privacy "
                                  f"settings ({type(exc).__name__})") from None
        except ceilings.CeilingRefused as exc:  # logged in one line where it was refused
            hospital_metrics.record_failure(_name_of(context), handler.__name__)
            raise HospitalRefusal(f"{handler.__name__} refused: past the hospital's ceilings "
                                  f"({type(exc).__name__})") from None
        except Exception as exc:  # noqa: BLE001 - every local failure must be sanitised
            log.exception("round failed at this hospital")
            hospital_metrics.record_failure(_name_of(context), handler.__name__)
            raise HospitalError(f"{handler.__name__} failed at the hospital "
                                f"({type(exc).__name__}); see the hospital's log") from None

    return wrapper


def _name_of(context: Context) -> str:
    """The hospital's configured name for metric labels ("unknown" if its settings are broken)."""
    try:
        return HospitalSettings.from_node_config(context.node_config).name
    except Exception:  # noqa: BLE001 - the handler's own error is what gets reported
        return "unknown"


# this hospital's own weights across rounds (client.round; fedsynth.inprocess reads the key)
LOCAL_STATE = stages.LOCAL_STATE
restore_local, save_local = stages.restore_local, stages.save_local


# Flower's SecAgg+ masks the train reply of a secure-aggregation round (and only then)
app = ClientApp(mods=[secure_aggregation_mod])


@app.train()
@_private_errors
def train(msg: Message, context: Context) -> Message:
    """admit -> plan -> evaluate -> train -> account -> reply (client/round.py)."""
    return stages.train_round(msg, context)


@app.evaluate()
@_private_errors
def evaluate(msg: Message, context: Context) -> Message:
    """admit -> plan -> evaluate; at a DP hospital the figures stay here (client/evaluation.py)."""
    return stages.evaluate_round(msg, context)


# UA-GAN: the hospital trains its private discriminator and answers with its outputs on the
# coordinator's generated images (server/ua_gan.py).
app.train(UA_ACTION)(_private_errors(ua_train))
