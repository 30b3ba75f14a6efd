"""``fedsynth demo``: build DICOM hospitals from data that ships in packages, then federate them."""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

log = logging.getLogger("fedsynth.demo")

# What the demo runs by default: sized to finish in about 5 minutes on 2 CPU cores with a last
# grid that shows the phantom's anatomy (README "Quick start"; BENCHMARKS.md "Small local data").
# 6 rounds x 200 local steps (8x the old 25) at width 16 (a step costs ~1/3 of width 32's).
# DiffAugment keeps D from winning outright on ~32 slices per hospital: BENCHMARKS.md "Small
# local data" (b), at this size, measured it at 0.26x the Fréchet distance without it, and the
# generator EMA (0.95 local, 0.5 across rounds) at 0.68x, worse than augmentation alone, so both
# EMAs stay off; R1 stays off (it doubles D's cost, and was not shown to pay).
DEMO = {"rounds": 6, "local_steps": 200, "width": 16,
        "augment": "translation,cutout,brightness,contrast", "r1_gamma": 0.0,
        "ema_decay": 0.0, "server_ema_decay": 0.0}


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="a small real federation on generated DICOM hospitals")
    p.add_argument("--family", default="dcgan",
                   help="GAN family: dcgan, cdcgan, wgan-gp, pix2pix (T1w->T2w), cyclegan")
    p.add_argument("--preset", default="fedgan",
                   help="aggregation preset: fedgan, fedmed-gan, fedbn, local-d, ua-gan")
    p.add_argument("--hospitals", type=int, default=3)
    p.add_argument("--rounds", type=int, default=DEMO["rounds"])
    p.add_argument("--local-steps", type=int, default=DEMO["local_steps"])
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--width", type=int, default=DEMO["width"],
                   help="channels of the networks' widest-resolution layer")
    # small local data (shared_models/small_data.py): defaults from BENCHMARKS.md "Small local data"
    p.add_argument("--augment", default=DEMO["augment"],
                   help="DiffAugment policy of what D sees ('' off)")
    p.add_argument("--r1-gamma", type=float, default=DEMO["r1_gamma"], help="R1 weight (0 off)")
    p.add_argument("--ema-decay", type=float, default=DEMO["ema_decay"],
                   help="hospital: generator EMA over the local steps (0 off)")
    p.add_argument("--server-ema-decay", type=float, default=DEMO["server_ema_decay"],
                   help="coordinator: generator EMA across rounds, drawn in the grids (0 off)")
    p.add_argument("--data-dir", type=Path, default=Path("demo-data"))
    p.add_argument("--run-dir", type=Path, default=Path("runs"))
    p.add_argument("--run-id", default="")
    p.add_argument("--metrics-port", type=int, default=0,
                   help="serve coordinator metrics on 127.0.0.1:PORT during the run (0: off)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from fedsynth.demo_data import build_demo_hospitals
    from fedsynth.simulation import run_simulated_federation
    from server.federation import FederationConfig
    from server.metrics import CoordinatorMetrics, start_exporter
    from server.report import write_report
    from shared_models import ModelConfig, TrainConfig

    from fedsynth.errors import UserError
    from server.presets import PRESETS
    from shared_models import families

    if args.family not in families():
        raise UserError(f"unknown family {args.family!r}; known: {', '.join(families())}")
    if args.preset not in PRESETS:
        raise UserError(f"unknown preset {args.preset!r}; known: {', '.join(sorted(PRESETS))}")
    t0 = time.monotonic()
    log.info("writing %d demo hospitals (phantom MR + real clinical DICOM) to %s",
             args.hospitals, args.data_dir)
    folders = build_demo_hospitals(args.data_dir, args.hospitals)
    cfg = FederationConfig(
        model=ModelConfig(family=args.family, image_size=args.image_size, width=args.width,
                          num_classes=2 if args.family == "cdcgan" else 0),
        train=TrainConfig(local_steps=args.local_steps, batch_size=args.batch_size,
                          **_small_data(args)),
        rounds=args.rounds, run_dir=str(args.run_dir), run_id=args.run_id, preset=args.preset,
        server_ema_decay=args.server_ema_decay if _generates(args.family) else 0.0,
    )
    hospitals = [{"data-dir": str(f.resolve()),
                  "cache-dir": str((args.data_dir / ".cache" / f.name).resolve())}
                 for f in folders]
    log.info("federating %d hospitals for %d rounds on Flower's simulation engine",
             len(hospitals), cfg.rounds)
    metrics = CoordinatorMetrics()  # also names the hospitals in the report
    exporter = start_exporter(metrics, args.metrics_port) if args.metrics_port else None
    try:
        root = run_simulated_federation(cfg, hospitals, metrics=metrics)
    finally:
        if exporter is not None:
            exporter.shutdown()
    write_report(root)
    print(f"\nfedsynth demo finished in {time.monotonic() - t0:.0f} s")
    print(f"  run folder    : {root}")
    print(f"  sample grids  : {root / 'samples'}  (round-000.png = untrained, "
          f"round-{cfg.rounds:03d}.png = last)")
    print(f"  metrics       : {root / 'metrics.jsonl'}")
    print(f"  checkpoint    : {root / 'checkpoints'}")
    report = root / "report.html"
    if report.exists():
        print(f"  report        : {report}")
    if _generates(args.family):
        from fedsynth.demo_quality import frechet_vs_floor

        ckpt = root / "checkpoints" / f"round-{cfg.rounds:03d}.npz"
        q = frechet_vs_floor(ckpt, hospitals)
        print(f"  quality       : last-round Fréchet distance {q['frechet']:.4f} vs real-vs-real "
              f"floor {q['floor']:.4f} = {q['factor']:.1f}x the floor ({q['generated']:.0f} "
              f"generated vs {q['real'] - q['generated']:.0f} real slices; floor: two disjoint "
              "halves of the real slices)")
    return 0


def _generates(family: str) -> bool:
    from shared_models import get_family

    return get_family(family).task == "generation"


def _small_data(args: argparse.Namespace) -> dict:
    """The small-data settings, for the generation families they were measured on (the
    translation families train as before: no measurement chose them there)."""
    from shared_models import get_family
    from shared_models.capabilities import AUGMENT, R1

    gen = _generates(args.family)
    supports = get_family(args.family).supports
    return {"augment": args.augment if gen and AUGMENT in supports else "",
            "r1_gamma": args.r1_gamma if gen and R1 in supports else 0.0,
            "ema_decay": args.ema_decay if gen else 0.0}
