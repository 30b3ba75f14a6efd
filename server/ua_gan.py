"""UA-GAN, the coordinator side (Zhang et al. 2021, "Training Federated GANs with Theoretical
Guarantees: A Universal Aggregation Approach").

The coordinator owns the generator; each hospital owns a discriminator D_j that never leaves it.
One round (message type ``train.ua_gan``):

1. coordinator -> hospital: a batch of generated images x = G(z) (and their class labels for
   conditional families) under ``ARRAYS`` (``fakes``, ``labels``), plus the training config.
   No real image and no weight goes out.
2. hospital: trains D_j for ``local_steps`` steps on its real slices vs the received fakes, then
   replies with D_j's logits on the fakes and their gradient with respect to the fakes (``logits``,
   ``grads``), and its example count. Logits alone give the coordinator no gradient for G; the
   input gradient is taken at synthetic images only and carries no real pixel.
3. coordinator: the universal aggregate D_ua(x) = Φ/(1+Φ), Φ = Σ_j π_j D_j/(1-D_j) with π_j the
   hospitals' shares of examples (the paper's UA rule): in logits, ℓ_ua = log Σ_j π_j exp(ℓ_j). G takes
   one step on the non-saturating loss -log D_ua(G(z)), back-propagated through the hospitals'
   input gradients by the chain rule.
"""

from __future__ import annotations

import copy
import logging
from collections import Counter
from typing import Iterable, Mapping

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid

from protocol import records as protocol
from protocol.signing import SIGNATURE_KEY
from shared_models import ModelConfig, TrainConfig, encode, get_family
from shared_models.capabilities import UA_GAN, supporting
from shared_models.codec import decode_into

from .aggregation import Update
from .strategy import GanStrategy, RoundReport, Signer
from .validation import (
    EXAMPLES_RATIO, MAX_EXAMPLES, NORM_OUTLIER_RATIO, RejectedReply, cap_examples, known_metrics,
    train_metric_keys,
)

log = logging.getLogger(__name__)

UA_ACTION = "ua_gan"  # hospitals register ``@app.train(UA_ACTION)``
UA_MESSAGE_TYPE = f"{MessageType.TRAIN}.{UA_ACTION}"
FAKES = "fakes"
LABELS = "labels"
LOGITS = "logits"
GRADS = "grads"


def ua_logit(logits: torch.Tensor, examples: torch.Tensor) -> torch.Tensor:
    """ℓ_ua = log Σ_j π_j exp(ℓ_j) for logits (J, B, ...) and example counts (J,)."""
    pi = examples.to(logits.dtype) / examples.sum()
    shape = (-1,) + (1,) * (logits.ndim - 1)
    return torch.logsumexp(logits + torch.log(pi).view(shape), dim=0)


def generator_input_grad(logits: np.ndarray, grads: np.ndarray, examples: np.ndarray
                         ) -> tuple[np.ndarray, float, float]:
    """dL/dx of the generator loss L = mean_b softplus(-ℓ_ua[b]) at the fakes, by the chain rule.

    ``logits`` (J, B) and ``grads`` (J, B, C, ...) are the hospitals' ℓ_j(x_b) and dℓ_j/dx_b
    (one logit per image, so the input gradient of each image is its own). Returns
    (dL/dx of shape (B, C, ...), L, mean D_ua).
    """
    ell = torch.tensor(logits, dtype=torch.float64, requires_grad=True)
    combined = ua_logit(ell, torch.tensor(examples, dtype=torch.float64))
    loss = torch.nn.functional.softplus(-combined).mean()
    (dl_dell,) = torch.autograd.grad(loss, ell)  # (J, B)
    dx = np.einsum("jb,jb...->b...", dl_dell.numpy(), grads.astype(np.float64))
    return dx, float(loss.detach()), float(torch.sigmoid(combined.detach()).mean())


class UaGanStrategy(GanStrategy):
    """The coordinator of UA-GAN: trains the generator, keeps no discriminator.

    The global model it returns holds the trained generator and the initial discriminator
    (never used: each hospital trains its own).
    """

    folds_evaluation = False  # its train messages are UA messages: evaluation stays separate

    def __init__(
        self,
        model: ModelConfig,
        train: TrainConfig,
        *,
        fake_batch: int = 64,
        signer: Signer | None = None,
        norm_outlier_ratio: float = NORM_OUTLIER_RATIO,
        fraction_train: float = 1.0,
        min_train_nodes: int = 1,
        min_available_nodes: int = 1,
        examples_ratio: float = EXAMPLES_RATIO,
        max_examples: float = MAX_EXAMPLES,
        **_: object,
    ) -> None:
        family = get_family(model.family)
        if UA_GAN not in family.supports:  # its D must give the logit of a probability
            raise ValueError(f"preset 'ua-gan' needs a family whose discriminator gives a "
                             f"probability ({', '.join(supporting(UA_GAN))}), not "
                             f"{model.family!r}")
        super().__init__(family.components, signer=signer,
                         norm_outlier_ratio=norm_outlier_ratio, fraction_train=fraction_train,
                         min_train_nodes=min_train_nodes, min_available_nodes=min_available_nodes,
                         fraction_evaluate=0.0, examples_ratio=examples_ratio,
                         max_examples=max_examples)
        self.model = model
        self.family = family
        self.fake_batch = fake_batch
        self.nets = family.build(model)
        g = self.nets["generator"]
        self.opt_g = torch.optim.Adam(g.parameters(), train.lr_g, (train.beta1, train.beta2))
        self._z = torch.zeros(0)
        self._labels: torch.Tensor | None = None
        self._fakes = np.zeros(0, dtype=np.float32)

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        self._global = protocol.from_record(arrays)
        decode_into(self.nets, {k: v for k, v in self._global.items()
                                if k.startswith("generator.")})
        nodes = self._sample(grid, self.fraction_train, self.min_train_nodes)
        self.last_train = RoundReport(selected=len(nodes))
        rng = torch.Generator().manual_seed(10_007 * server_round)
        self._z = torch.randn(self.fake_batch, self.model.latent_dim, generator=rng)
        self._labels = (torch.randint(self.model.num_classes, (self.fake_batch,), generator=rng)
                        if self.model.num_classes else None)
        with torch.no_grad():
            self._fakes = self.nets["generator"](self._z, self._labels).numpy().astype(np.float32)
        out = {FAKES: self._fakes}
        if self._labels is not None:
            out[LABELS] = self._labels.numpy()
        record = protocol.to_record(out)
        config[protocol.SERVER_ROUND] = server_round
        if self.signer is not None:
            config[SIGNATURE_KEY] = self.signer(record, config, UA_MESSAGE_TYPE)
        content = RecordDict({protocol.ARRAYS: record, protocol.CONFIG: config})
        return [Message(content=content, message_type=UA_MESSAGE_TYPE, dst_node_id=n)
                for n in nodes]

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Validate the hospitals' (logits, grads), combine them, take one generator step."""
        report = self.last_train
        notes: Counter[str] = Counter()
        valid = self._validated(server_round, replies,
                                lambda content: self._validate(content, notes))
        report.dropped_metric_keys += sum(notes.values())
        if len(valid) >= 3:
            norms = {h: float(np.linalg.norm(v[1])) for h, v in valid.items()}
            median = float(np.median(list(norms.values())))
            for h, n in norms.items():
                if n > self.norm_outlier_ratio * median:
                    del valid[h]
                    self._reject(report, server_round, h, RejectedReply(
                        "norm", f"gradient norm {n:.3g} > {self.norm_outlier_ratio:g} x "
                                f"median {median:.3g}"))
        for hospital, (*_, metrics) in valid.items():
            report.replied += 1
            report.per_hospital[hospital] = metrics
        if not valid:
            log.warning("round %d: no valid reply, the generator is kept", server_round)
            return None, None
        capped, clipped = cap_examples(
            {h: Update(arrays={}, examples={"discriminator": v[2]}) for h, v in valid.items()},
            self.examples_ratio, self.max_examples)
        report.capped_examples += len(clipped)
        for hospital, _, claimed, kept in clipped:
            log.warning("round %d: hospital %s claims %.3g examples; weighted as %.3g",
                        server_round, hospital, claimed, kept)
        logits = np.stack([v[0] for v in valid.values()])
        grads = np.stack([v[1] for v in valid.values()])
        examples = np.array([capped[h].examples["discriminator"] for h in valid])
        metrics = self._mean_metrics(report.per_hospital)
        with np.errstate(all="ignore"):
            dx, loss, d_ua = generator_input_grad(logits, grads, examples)
        if not (np.isfinite(dx).all() and self._generator_step(dx)):
            # keep the previous generator (and its optimizer state), count it
            log.error("round %d: the generator step is not finite; the generator is kept",
                      server_round)
            report.refused_aggregates += 1
            return protocol.to_record(self._global), MetricRecord(metrics)
        self._global.update(encode(self.nets, ("generator",)))
        metrics.update({"loss-g": loss, "d-fake-ua": d_ua})
        return protocol.to_record(self._global), MetricRecord(metrics)

    def _generator_step(self, dx: np.ndarray) -> bool:
        """One generator step along ``dx``; False (and nothing changed) if it is not finite."""
        g = self.nets["generator"]
        saved = ({k: v.detach().clone() for k, v in g.state_dict().items()},
                 copy.deepcopy(self.opt_g.state_dict()))
        g.train()
        fake = g(self._z, self._labels)
        self.opt_g.zero_grad(set_to_none=True)
        fake.backward(torch.from_numpy(dx).to(fake.dtype))
        self.opt_g.step()
        if all(bool(torch.isfinite(v).all()) for v in g.state_dict().values()
               if v.is_floating_point()):
            return True
        g.load_state_dict(saved[0])
        self.opt_g.load_state_dict(saved[1])
        return False

    def _validate(self, content: RecordDict, notes: Counter[str] | None = None
                  ) -> tuple[np.ndarray, np.ndarray, float, dict[str, float]]:
        if protocol.ARRAYS not in content.array_records or \
                protocol.METRICS not in content.metric_records:
            raise RejectedReply("no-record", "reply lacks its arrays or metrics record")
        try:
            arrays = protocol.from_record(content.array_records[protocol.ARRAYS])
        except ValueError as exc:
            raise RejectedReply("decode", f"arrays do not decode: {exc}") from None
        if set(arrays) != {LOGITS, GRADS}:
            kind = "missing-key" if not {LOGITS, GRADS} <= set(arrays) else "extra-key"
            raise RejectedReply(kind, f"keys {sorted(arrays)} != {[GRADS, LOGITS]}")
        logits, grads = arrays[LOGITS], arrays[GRADS]
        if logits.shape != (self.fake_batch,) or grads.shape != self._fakes.shape:
            raise RejectedReply("shape", f"logits {logits.shape} / grads {grads.shape} do not "
                                         f"fit {self._fakes.shape} fakes")
        for name, a in ((LOGITS, logits), (GRADS, grads)):
            if a.dtype not in (np.float32, np.float16):
                raise RejectedReply("dtype", f"key {name!r}: dtype {a.dtype} is not float")
            if not np.isfinite(a).all():
                raise RejectedReply("non-finite", f"key {name!r}: contains NaN or Inf")
        metrics, dropped = known_metrics(content.metric_records[protocol.METRICS],
                                         train_metric_keys(("discriminator",)))
        if notes is not None and dropped:
            notes["dropped-metric-keys"] += dropped
        n = metrics.get(protocol.examples_key("discriminator"),
                        metrics.get(protocol.NUM_EXAMPLES, 0.0))
        if not np.isfinite(n) or n <= 0:
            raise RejectedReply("metric", f"example count {n} must be > 0")
        return logits.astype(np.float64), grads.astype(np.float64), n, metrics

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        return []  # hospitals hold no generator; the coordinator's sample grid shows it

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]
                           ) -> MetricRecord | None:
        return None


def ua_settings(rc: Mapping[str, object]) -> dict[str, int]:
    """UA-GAN knobs from a flat run config (``ua-fake-batch``)."""
    return {"fake_batch": int(rc.get("ua-fake-batch", 64))}  # type: ignore[call-overload]
