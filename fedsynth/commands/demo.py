"""``fedsynth demo``: build DICOM hospitals from data that ships in packages, then federate them."""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

log = logging.getLogger("fedsynth.demo")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="a small real federation on generated DICOM hospitals")
    p.add_argument("--family", default="dcgan",
                   help="GAN family: dcgan, cdcgan, wgan-gp, pix2pix (T1w->T2w), cyclegan")
    p.add_argument("--preset", default="fedgan",
                   help="aggregation preset: fedgan, fedmed-gan, fedbn, local-d, ua-gan")
    p.add_argument("--hospitals", type=int, default=3)
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--local-steps", type=int, default=25)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=16)
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
        model=ModelConfig(family=args.family, image_size=args.image_size,
                          num_classes=2 if args.family == "cdcgan" else 0),
        train=TrainConfig(local_steps=args.local_steps, batch_size=args.batch_size),
        rounds=args.rounds, run_dir=str(args.run_dir), run_id=args.run_id, preset=args.preset,
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
    return 0
