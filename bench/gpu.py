"""GPU throughput: DCGAN-64 (batch 128) and CycleGAN-256 (batch 4), fp32 and mixed precision.

For each model and precision it prints the trainer's images/s, the bare loop's images/s and their
ratio (``name: value`` lines), using the same interleaved comparison as the CPU benchmark
(``bench.trainer.compare``). ``bench/gpu.sh`` runs it on a CUDA machine; ``--device cpu --quick``
runs the same code path on tiny sizes (mixed precision is CUDA-only and reported as skipped).
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
import warnings
from dataclasses import dataclass

import torch

from bench.trainer import _amp_dtype, _sync, _synthetic, available, compare
from client.trainer import LocalTrainer
from shared_models import ModelConfig, TrainConfig, get_family

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Case:
    name: str
    model: ModelConfig
    train: TrainConfig
    reps: int
    n_images: int


def cases(quick: bool) -> list[Case]:
    if quick:
        return [
            Case("dcgan32", ModelConfig(image_size=32, width=8),
                 TrainConfig(local_steps=2, batch_size=8), 1, 16),
            Case("cyclegan32", ModelConfig(family="cyclegan", image_size=32, width=8),
                 TrainConfig(local_steps=1, batch_size=2), 1, 4),
        ]
    return [
        # ~2 s per timed run on an H100: long enough that launch jitter and the reply's weight
        # copy (part of the trainer's time, as in a real round) do not decide the ratio.
        Case("dcgan64", ModelConfig(image_size=64), TrainConfig(local_steps=200, batch_size=128),
             5, 1024),
        Case("cyclegan256", ModelConfig(family="cyclegan", image_size=256),
             TrainConfig(local_steps=40, batch_size=4), 5, 16),
    ]


def syncs_per_step(model: ModelConfig, train: TrainConfig, device: torch.device, amp: bool,
                   steps: int = 3) -> float:
    """Host syncs CUDA itself reports inside the family's step (``set_sync_debug_mode``): 0 means
    the step never waits for the GPU. fp16's GradScaler reads its inf check once per step by
    design (bf16, used where the card has it, needs no scaler)."""
    trainer = LocalTrainer(model, device, amp="auto" if amp else "off")
    data = {k: trainer._to_device(v) for k, v in _synthetic(model.family, model, 64).items()}
    opts = trainer.family.optimizers(trainer.nets, train)
    ctx = trainer._context(train)
    for net in trainer.nets.values():
        net.train()
    trainer.family.train_step(trainer.family.draw(data, train.batch_size), trainer.nets, opts, ctx)
    torch.cuda.synchronize(device)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            for _ in range(steps):
                batch = trainer.family.draw(data, train.batch_size)
                trainer.family.train_step(batch, trainer.nets, opts, ctx)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize(device)
    syncs = [w for w in caught if "synchroniz" in str(w.message).lower()
             and "prototype feature" not in str(w.message)]  # torch's one-off notice, not a sync
    for w in syncs[:3]:
        print(f"# sync: {w.filename}:{w.lineno}: {str(w.message)[:120]}", flush=True)
    return len(syncs) / steps


def probe(device: torch.device, name: str = "cyclegan256", steps: int = 20) -> None:
    """Why mixed precision or the trainer loses on a case: the family step and the bare loop at
    fp32/bf16 x channels_last/contiguous, then the top CUDA kernels of one bf16 step of each."""
    from torch.profiler import ProfilerActivity, profile

    from bench.trainer import _family_step_loop, bare_cyclegan, bare_dcgan

    case = next(c for c in cases(False) + cases(True) if c.name == name)
    family = get_family(case.model.family)
    train = TrainConfig(**{**case.train.__dict__, "local_steps": steps})
    data = _synthetic(case.model.family, case.model, case.n_images)

    def loop(kind: str, nets: dict, on_dev: dict, amp_dtype: torch.dtype | None, tr: TrainConfig
             ) -> None:
        if kind == "family":
            _family_step_loop(case.model.family, nets, on_dev, tr, 0, amp_dtype)
        elif case.model.family == "cyclegan":
            bare_cyclegan(nets, on_dev["a"], on_dev["b"], tr, 0, amp_dtype)
        else:
            bare_dcgan(nets["generator"], nets["discriminator"], on_dev["image"], tr, 0,
                       amp_dtype)

    one = TrainConfig(**{**case.train.__dict__, "local_steps": 1})
    for amp_dtype in (None, torch.bfloat16) if device.type == "cuda" else (None,):
        for fmt in (torch.channels_last, torch.contiguous_format):
            for kind in ("family", "bare"):
                torch.manual_seed(0)
                nets = family.build(case.model)
                for net in nets.values():
                    net.to(device).to(memory_format=fmt)
                on_dev = {k: v.to(device).contiguous(memory_format=fmt) for k, v in data.items()}
                loop(kind, nets, on_dev, amp_dtype, TrainConfig(**{**train.__dict__,
                                                                   "local_steps": 3}))
                _sync(device)
                t0 = time.perf_counter()
                loop(kind, nets, on_dev, amp_dtype, train)
                _sync(device)
                rate = steps * case.train.batch_size * len(family.batch_keys) / (
                    time.perf_counter() - t0)
                prec = "bf16" if amp_dtype else "fp32"
                layout = "cl" if fmt == torch.channels_last else "contig"
                print(f"probe_{name}_{prec}_{layout}_{kind}_images_per_s: {rate:.1f}", flush=True)
                if fmt == torch.channels_last and (amp_dtype is not None or device.type != "cuda"):
                    with profile(activities=[ProfilerActivity.CUDA if device.type == "cuda"
                                             else ProfilerActivity.CPU]) as prof:
                        loop(kind, nets, on_dev, amp_dtype, one)
                        _sync(device)
                    print(f"# top kernels, one bf16 channels_last step, {kind}:")
                    print(prof.key_averages().table(sort_by=f"{device.type}_time_total", row_limit=12,
                                                    max_name_column_width=60), flush=True)


def run(device: torch.device, quick: bool) -> list[tuple[str, float]]:
    """All figures as (name, value), printed as they come so a timeout still leaves some."""
    out: list[tuple[str, float]] = []

    def emit(name: str, value: float) -> None:
        out.append((name, value))
        print(f"{name}: {value:.3f}", flush=True)

    for case in cases(quick):
        if not available(case.model.family):
            print(f"# {case.name}: skipped, family {case.model.family!r} is not registered",
                  flush=True)
            continue
        for amp in (False, True):
            dtype = _amp_dtype(device, amp)
            if amp and dtype is None:
                print(f"# {case.name} mixed precision: skipped (CUDA only)", flush=True)
                continue
            prec = "fp32" if dtype is None else str(dtype).removeprefix("torch.").replace(
                "bfloat16", "bf16").replace("float16", "fp16")
            t0 = time.perf_counter()
            c = compare(f"gpu_{case.name}_{prec}", case.model, case.train, case.reps, device,
                        amp, case.n_images)
            emit(f"gpu_{case.name}_{prec}_trainer_images_per_s", c.a_rate)
            emit(f"gpu_{case.name}_{prec}_bare_images_per_s", c.b_rate)
            emit(f"gpu_{case.name}_{prec}_trainer_vs_bare", c.ratio)
            if device.type == "cuda":
                try:
                    emit(f"gpu_{case.name}_{prec}_host_syncs_per_step",
                         syncs_per_step(case.model, case.train, device, amp))
                except Exception as e:  # the audit must not cost the throughput figures
                    print(f"# {case.name} {prec}: sync audit failed: {e!r}", flush=True)
            print(f"# {case.name} {prec}: {c.extra['bare']}, ratio of medians "
                  f"{c.ratio_of_medians:.3f}, max-weight-diff "
                  f"{c.extra['max-weight-diff']:.2e}, {time.perf_counter() - t0:.1f} s",
                  flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu")
    p.add_argument("--quick", action="store_true", help="tiny sizes (a CPU check of this path)")
    p.add_argument("--probe", metavar="CASE",
                   help="diagnose one case (e.g. cyclegan256): layouts, precisions, top kernels")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    device = torch.device(args.device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            print(f"error: --device {args.device} but torch {torch.__version__} sees no CUDA GPU",
                  file=sys.stderr)
            return 2
        torch.backends.cudnn.benchmark = True
        print(f"# device: {torch.cuda.get_device_name(device)}, torch {torch.__version__}, "
              f"CUDA {torch.version.cuda}", flush=True)
    else:
        print(f"# device: {device}, torch {torch.__version__}, {torch.get_num_threads()} threads",
              flush=True)
    if args.probe:
        probe(device, args.probe)
    else:
        run(device, args.quick)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
