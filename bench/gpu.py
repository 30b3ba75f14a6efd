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
from dataclasses import dataclass

import torch

from bench.trainer import _amp_dtype, available, compare
from shared_models import ModelConfig, TrainConfig

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
        Case("dcgan64", ModelConfig(image_size=64), TrainConfig(local_steps=50, batch_size=128),
             3, 1024),
        Case("cyclegan256", ModelConfig(family="cyclegan", image_size=256),
             TrainConfig(local_steps=10, batch_size=4), 3, 16),
    ]


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
            print(f"# {case.name} {prec}: {c.extra['bare']}, ratio of medians "
                  f"{c.ratio_of_medians:.3f}, max-weight-diff "
                  f"{c.extra['max-weight-diff']:.2e}, {time.perf_counter() - t0:.1f} s",
                  flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu")
    p.add_argument("--quick", action="store_true", help="tiny sizes (a CPU check of this path)")
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
    run(device, args.quick)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
