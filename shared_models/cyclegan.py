"""CycleGAN (Zhu et al. 2017): unpaired translation between domains a and b.

Components ``g_ab`` (G: A -> B), ``g_ba`` (F: B -> A), ``d_a``, ``d_b``. Objective (eq. 3):
L = L_GAN(G, D_B) + L_GAN(F, D_A) + lambda * L_cyc(G, F), lambda = 10, with the least-squares GAN
loss of sec. 4 (Mao et al. 2017): G minimises E[(D(G(x)) - 1)^2], D minimises
0.5 * (E[(D(y) - 1)^2] + E[D(G(x))^2]); the cycle loss (eq. 2) is
E[||F(G(a)) - a||_1] + E[||G(F(b)) - b||_1]; plus the identity loss of sec. 5.2,
0.5 * lambda * (E[||G(b) - b||_1] + E[||F(a) - a||_1]). The paper's 50-image history buffer for D
is left out: a round holds a few dozen steps, and the buffer would not survive between rounds.

Lesion-aware cycle (after Jiang et al. 2018's tumour-aware loss; Cohen et al. 2018 showed that
plain translation can drop lesions): with ``lesion-cycle-weight`` w > 0 (``TrainConfig``, carried
in ``StepContext``) a hospital also loads its lesion masks (DICOM SEG / RTSTRUCT of the run's
``mask-labels``, read as maskgan reads them) as ``mask_a`` / ``mask_b`` beside its domain images,
and G's loss adds w x (L1 of the cycle + (identity / cycle weight) x L1 of the identity term),
each L1 averaged over the pixels inside the union of the record's masks. A slice no mask covers
adds 0, so does a hospital holding no mask: it trains the plain terms, says so in one log line,
and reports ``loss-lesion`` 0. Under DP the masked terms are part of each record's own loss.

A hospital may hold one domain only. What it trains then, and the examples it reports (so that the
coordinator weights each component by the data that really trained it):

================  =========================================================  ==================
data              trained                                                    examples
================  =========================================================  ==================
a and b           g_ab, g_ba (all terms above); d_a, d_b                     g: nA+nB, d_a: nA,
                                                                             d_b: nB
a only            g_ab (adversarial against the received d_b, forward         g: nA, d_*: 0
                  cycle), g_ba (forward cycle, identity on a); no D: d_a
                  would have no fake a (F needs real b) and d_b no real b
b only            mirror image: g_ba against d_a, backward cycle, identity    g: nB, d_*: 0
                  of g_ab on b; no D
================  =========================================================  ==================
"""

from __future__ import annotations

from typing import Mapping

import torch

from .config import ModelConfig
from .capabilities import DP, LESION_CYCLE
from .dp import per_sample_norms, sample_rate
from .family import FamilyBase, Nets, Optimizers, StepContext, eval_forward
from .losses import masked_l1
from .translation_networks import PatchGAN, ResnetGenerator, init_normal, set_requires_grad

CYCLE_WEIGHT = 10.0  # lambda of eq. 3
IDENTITY_WEIGHT = 0.5 * CYCLE_WEIGHT  # sec. 5.2: 0.5 * lambda
MASK_KEYS = {"a": "mask_a", "b": "mask_b"}  # a domain's lesion masks, drawn with its index


def _ls(pred: torch.Tensor, target: float) -> torch.Tensor:
    """Least-squares GAN loss E[(D(.) - target)^2] in fp32.

    Why not MONAI's ``PatchAdversarialLoss(criterion="least_squares")``, which computes the same:
    it builds its target with ``torch.tensor(1).fill_(label).to(device)`` on every call, a copy
    from pageable host memory that synchronises the CUDA stream, several times per step; the
    step is meant to run with no host synchronisation (GPU bench,
    tests/unit/shared_models/test_perf_regression.py).
    """
    return ((pred.float() - target) ** 2).mean()


def _l1(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return (x.float() - y.float()).abs().mean()


class CycleGAN(FamilyBase):
    name = "cyclegan"
    components = ("g_ab", "g_ba", "d_a", "d_b")
    batch_keys = ("a", "b")
    task = "translation"
    data_layout = "unpaired"
    supports = frozenset({DP, LESION_CYCLE})

    def __init__(self, cycle_weight: float = CYCLE_WEIGHT,
                 identity_weight: float = IDENTITY_WEIGHT) -> None:
        self.cycle_weight = cycle_weight
        self.identity_weight = identity_weight

    def build(self, cfg: ModelConfig) -> Nets:
        """Half of ``cfg.width`` per network: a step runs six generator passes and two Ds, and at
        half width it costs about what pix2pix costs at full width (0.3-0.7 s at 64 px, batch 4,
        width 32, one CPU core). Residual blocks: 6 from 128 px up (the paper), else 3."""
        w = max(cfg.width // 2, 4)
        blocks = 6 if cfg.image_size >= 128 else 3
        nets: Nets = {
            "g_ab": ResnetGenerator(cfg.spatial_dims, cfg.channels, cfg.channels, w, blocks),
            "g_ba": ResnetGenerator(cfg.spatial_dims, cfg.channels, cfg.channels, w, blocks),
            "d_a": PatchGAN(cfg.spatial_dims, cfg.channels, cfg.image_size, w, "INSTANCE"),
            "d_b": PatchGAN(cfg.spatial_dims, cfg.channels, cfg.image_size, w, "INSTANCE"),
        }
        for net in nets.values():
            init_normal(net)
        return per_sample_norms(nets, cfg.norm)  # instance norm only: nothing to swap

    def dp_records(self, data: Mapping[str, torch.Tensor]) -> int:
        """The smaller domain present: its records have the highest inclusion probability."""
        sizes = [len(data[k]) for k in self.batch_keys if k in data and len(data[k])]
        if not sizes:
            raise ValueError("family 'cyclegan': no images of domain a or b")
        return min(sizes)

    def dp_plan(self, data: Mapping[str, torch.Tensor], batch_size: int) -> tuple[float, int]:
        """Generators' joint step + (with both domains) the discriminators' joint step. Each
        domain is Poisson-sampled at batch / N_domain <= q = batch / min(N_a, N_b)."""
        both = all(k in data and len(data[k]) for k in self.batch_keys)
        return sample_rate(batch_size, self.dp_records(data)), 2 if both else 1

    def _lesion(self, ctx: StepContext, x: torch.Tensor, cycled: torch.Tensor,
                same: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor | float:
        """``lesion-cycle-weight`` x the cycle and identity L1 inside ``mask`` (0 without one)."""
        if ctx.lesion_cycle_weight <= 0 or mask is None:
            return 0.0
        return ctx.lesion_cycle_weight * (
            masked_l1(cycled, x, mask)
            + self.identity_weight / self.cycle_weight * masked_l1(same, x, mask))

    def _domain_rate(self, dp, key: str) -> dict[str, torch.Tensor]:  # noqa: ANN001
        """A Poisson sample of domain ``key`` at batch / N_key (<= the accounted rate), with its
        masks when the data holds them."""
        n = len(dp.data[key])
        mask = dp.rand(n) < min(1.0, dp.batch_size / n)
        idx = mask.nonzero().squeeze(1)
        keys = [k for k in (key, MASK_KEYS[key]) if k in dp.data and len(dp.data[k]) == n]
        return {k: dp.data[k][idx] for k in keys}

    def dp_step(self, nets: Nets, opts: Optimizers, ctx: StepContext) -> dict[str, torch.Tensor]:
        """The DP path of ``train_step`` (shared_models.dp): every term of a record of domain a
        (adversarial of G(a), both cycles through it, identity of F on a; D_A on a, D_B on G(a))
        is that record's, clipped with it; likewise for b. Only FedProx is public."""
        g_ab, g_ba, d_a, d_b = (nets[c] for c in self.components)
        dp = ctx.dp
        present = [k for k in self.batch_keys if k in dp.data and len(dp.data[k])]

        def g_a(ex: dict[str, torch.Tensor]) -> torch.Tensor:
            a = ex["a"]
            fake_b = g_ab(a)
            rec, same = g_ba(fake_b), g_ba(a)
            return (_ls(d_b(fake_b), 1.0) + self.cycle_weight * _l1(rec, a)
                    + self.identity_weight * _l1(same, a)
                    + self._lesion(ctx, a, rec, same, ex.get("mask_a")))

        def g_b(ex: dict[str, torch.Tensor]) -> torch.Tensor:
            b = ex["b"]
            fake_a = g_ba(b)
            rec, same = g_ab(fake_a), g_ab(b)
            return (_ls(d_a(fake_a), 1.0) + self.cycle_weight * _l1(rec, b)
                    + self.identity_weight * _l1(same, b)
                    + self._lesion(ctx, b, rec, same, ex.get("mask_b")))

        def d_of_a(ex: dict[str, torch.Tensor]) -> torch.Tensor:
            a = ex["a"]
            with torch.no_grad():
                fake_b = g_ab(a)
            return 0.5 * (_ls(d_a(a), 1.0) + _ls(d_b(fake_b), 0.0))

        def d_of_b(ex: dict[str, torch.Tensor]) -> torch.Tensor:
            b = ex["b"]
            with torch.no_grad():
                fake_a = g_ba(b)
            return 0.5 * (_ls(d_b(b), 1.0) + _ls(d_a(fake_a), 0.0))

        terms = {"a": (g_a, d_of_a), "b": (g_b, d_of_b)}
        set_requires_grad([d_a, d_b], False)
        try:
            with ctx.autocast():
                dp.step({"g_ab": g_ab, "g_ba": g_ba},
                        [(terms[k][0], self._domain_rate(dp, k)) for k in present],
                        [opts["g_ab"], opts["g_ba"]],
                        ctx.prox_term("g_ab", g_ab) + ctx.prox_term("g_ba", g_ba))
        finally:
            set_requires_grad([d_a, d_b], True)
        if len(present) == 2:
            with ctx.autocast():
                dp.step({"d_a": d_a, "d_b": d_b},
                        [(terms[k][1], self._domain_rate(dp, k)) for k in present],
                        [opts["d_a"], opts["d_b"]],
                        ctx.prox_term("d_a", d_a) + ctx.prox_term("d_b", d_b))
        return {}  # every loss here is a statistic of the sampled records: none travels

    def examples(self, data: Mapping[str, torch.Tensor]) -> dict[str, int]:
        """See the module table: a discriminator counts only when both domains are present."""
        n_a, n_b = (len(data[k]) if k in data else 0 for k in ("a", "b"))
        both = n_a > 0 and n_b > 0
        return {"g_ab": n_a + n_b, "g_ba": n_a + n_b,
                "d_a": n_a if both else 0, "d_b": n_b if both else 0}

    def draw(self, data: Mapping[str, torch.Tensor], batch_size: int,
             balanced: bool = False) -> dict[str, torch.Tensor]:
        """Unpaired: an independent index draw per domain (its masks, if any, with the same
        index); an empty or absent domain is left out."""
        batch: dict[str, torch.Tensor] = {}
        for key in self.batch_keys:
            images = data.get(key)
            if images is None or len(images) == 0:
                continue
            n = len(images)
            idx = torch.randint(n, (min(batch_size, n),), device=images.device)
            batch[key] = images[idx]
            masks = data.get(MASK_KEYS[key])
            if masks is not None and len(masks) == n:
                batch[MASK_KEYS[key]] = masks[idx]
        if not batch:
            raise ValueError("family 'cyclegan': no images of domain a or b")
        return batch

    def train_step(
        self, batch: dict[str, torch.Tensor], nets: Nets, opts: Optimizers, ctx: StepContext
    ) -> dict[str, torch.Tensor]:
        if ctx.dp is not None:
            return self.dp_step(nets, opts, ctx)
        g_ab, g_ba, d_a, d_b = (nets[c] for c in self.components)
        a, b = batch.get("a"), batch.get("b")
        if a is None and b is None:
            raise ValueError("family 'cyclegan': a batch needs domain a or b images")

        # Generators, against discriminators frozen for this update.
        set_requires_grad([d_a, d_b], False)
        try:
            with ctx.autocast():
                adv, cyc, idt, lesion = [], [], [], []
                if a is not None:
                    fake_b = g_ab(a)
                    rec_a, same_a = g_ba(fake_b), g_ba(a)
                    adv.append(_ls(d_b(fake_b), 1.0))
                    cyc.append(_l1(rec_a, a))
                    idt.append(_l1(same_a, a))
                    lesion.append(self._lesion(ctx, a, rec_a, same_a, batch.get("mask_a")))
                if b is not None:
                    fake_a = g_ba(b)
                    rec_b, same_b = g_ab(fake_a), g_ab(b)
                    adv.append(_ls(d_a(fake_a), 1.0))
                    cyc.append(_l1(rec_b, b))
                    idt.append(_l1(same_b, b))
                    lesion.append(self._lesion(ctx, b, rec_b, same_b, batch.get("mask_b")))
                loss_cyc, loss_idt, loss_lesion = sum(cyc), sum(idt), sum(lesion)
                loss_g = (sum(adv) + self.cycle_weight * loss_cyc
                          + self.identity_weight * loss_idt + loss_lesion
                          + ctx.prox_term("g_ab", g_ab) + ctx.prox_term("g_ba", g_ba))
            ctx.step(loss_g, opts["g_ab"], opts["g_ba"])
        finally:
            set_requires_grad([d_a, d_b], True)
        out = {"loss-g": loss_g.detach(), "loss-cycle": loss_cyc.detach(),
               "loss-identity": loss_idt.detach()}
        if ctx.lesion_cycle_weight > 0:  # 0 where this hospital's batch held no mask
            out["loss-lesion"] = (loss_g.new_zeros(()) + loss_lesion).detach()  # no host copy

        # Discriminators: only with both domains (real a vs F(b), real b vs G(a)).
        if a is not None and b is not None:
            with ctx.autocast():
                da_real, da_fake = d_a(a), d_a(fake_a.detach())
                db_real, db_fake = d_b(b), d_b(fake_b.detach())
                loss_d_a = 0.5 * (_ls(da_real, 1.0) + _ls(da_fake, 0.0))
                loss_d_b = 0.5 * (_ls(db_real, 1.0) + _ls(db_fake, 0.0))
                loss_d = (loss_d_a + loss_d_b + ctx.prox_term("d_a", d_a)
                          + ctx.prox_term("d_b", d_b))
            ctx.step(loss_d, opts["d_a"], opts["d_b"])
            out["loss-d"] = loss_d.detach()
            out["d-real"] = 0.5 * (da_real.detach().float().mean() + db_real.detach().float().mean())
            out["d-fake"] = 0.5 * (da_fake.detach().float().mean() + db_fake.detach().float().mean())
        return out

    @torch.no_grad()
    def sample(self, nets: Nets, noise: torch.Tensor, labels: torch.Tensor | None = None,
               direction: str = "ab") -> torch.Tensor:
        """Translate the input batch ``noise`` from domain a to b (``direction="ba"``: b to a)."""
        if direction not in ("ab", "ba"):
            raise ValueError(f"direction must be 'ab' or 'ba', got {direction!r}")
        return eval_forward(nets["g_" + direction], noise)
