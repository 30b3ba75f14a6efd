"""``fedsynth evaluate CHECKPOINT DATA_DIR``: a hospital scores a global model on its own data.

Runs entirely on the hospital's machine and sends nothing anywhere: DATA_DIR is read with the
hospital's own DICOM path (``client.datasets``, the run's class rules from the checkpoint's run
folder, or this site's ``--label-attribute`` / ``--label-pattern``); every ``--holdout-every``-th
slice is held out as during training. Generation checkpoints (dcgan, wgan-gp, cdcgan) draw
``--n`` images (cdcgan: class-balanced) and are scored against the held-out slices:

- Fréchet Radiomics Distance (frd-score's radiomic features), Fréchet distance on the fixed
  FeatureNet, precision / recall / density / coverage (prdc);
- conditional models, on this hospital's own labels: a MONAI classifier trained on its real
  training slices alone, on those plus the synthetic slices (augmentation gain) and on the
  synthetic slices only (TSTR, and TSTR / real), balanced accuracy and AUC on the held-out ones.

Output: a table, or ``--json``. The numbers are the hospital's to keep or share as it chooses.

``fedsynth evaluate --kept-home SETTINGS`` prints instead the evaluations a hospital that
requires DP kept during runs (``client/evaluation.py``: their figures never went to the
coordinator), read from the kept-evaluations file beside its privacy ledger.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import time
from pathlib import Path
from typing import Any


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "evaluate", help="score a global model on this hospital's own data, locally",
        description="Fidelity, diversity and (conditional models) downstream utility of a "
                    "checkpoint's images against this hospital's held-out slices; nothing "
                    "leaves this machine.")
    p.add_argument("checkpoint", type=Path, nargs="?",
                   help="checkpoint .npz written by a federated run")
    p.add_argument("data_dir", type=Path, nargs="?", help="this hospital's DICOM folder")
    p.add_argument("--kept-home", type=Path, metavar="SETTINGS",
                   help="instead: the run evaluations this hospital (its daemon's settings "
                        "file) kept at home because it requires DP")
    p.add_argument("--run", type=int, default=None, help="with --kept-home: only this run")
    p.add_argument("--json", action="store_true", help="machine-readable result on stdout")
    p.add_argument("--n", type=int, default=0,
                   help="generated images (default: 4 x the held-out slices, at least 64; "
                        "cdcgan: the same number of each class)")
    p.add_argument("--holdout-every", type=int, default=4,
                   help="every N-th slice is held out for scoring (the rest trains the "
                        "classifiers of a conditional model)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--label-attribute", default="",
                   help="this site's slice attribute for the classes (default: the run's)")
    p.add_argument("--label-pattern", action="append", default=[], metavar="NAME=REGEX",
                   help="this site's regular expression for a class (repeatable)")
    p.add_argument("--classifier-steps", type=int, default=300)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's choice)")
    p.set_defaults(func=run)


def evaluate(checkpoint: Path, data_dir: Path, *, n: int = 0, holdout_every: int = 4,
             seed: int = 0, label_attribute: str = "", label_patterns: tuple = (),
             classifier_steps: int = 300) -> dict[str, Any]:
    """The scores of ``checkpoint`` on ``data_dir`` (ValueError with one line on a problem)."""
    import torch

    from client.datasets import local_data
    from client.settings import HospitalSettings
    from fedsynth.generation import class_names, generate, load_generator
    from fedsynth.utility import ClassifierBudget, fidelity, utility

    family, nets, meta = load_generator(checkpoint)
    cfg, data = meta.pop("_config"), meta.pop("_data")
    name = str(meta["family"])
    if family.task != "generation":
        raise ValueError(f"checkpoint '{checkpoint}' is a {name} translation model: evaluate "
                         f"scores generation families (dcgan, wgan-gp, cdcgan); a translation "
                         f"model's SSIM/PSNR/MAE are in the run's report")
    if cfg.spatial_dims != 2:
        raise ValueError("evaluate scores 2D models (radiomic features and the classifier are 2D)")
    hospital = HospitalSettings(data_dir=data_dir, cache_dir=None, holdout_every=holdout_every,
                                label_attribute=label_attribute,
                                label_patterns=tuple(label_patterns), name="local")
    t0 = time.perf_counter()
    loaded = local_data(hospital, cfg, data)
    train, held = loaded.train, loaded.holdout
    if held["image"] is train["image"]:
        raise ValueError(f"{len(train['image'])} slices in '{data_dir}' are too few to hold any "
                         f"out at --holdout-every {holdout_every} (need {2 * holdout_every})")
    n_held = len(held["image"])
    names = class_names(cfg, data) if cfg.num_classes else ()
    per_class = 0
    if cfg.num_classes:
        per_class = max(1, math.ceil((n or max(64, 4 * n_held)) / cfg.num_classes))
        total = per_class * cfg.num_classes
    else:
        total = n or max(64, 4 * n_held)
    images = torch.from_numpy(generate(family, nets, cfg, total, seed, None))
    out: dict[str, Any] = {
        "checkpoint": checkpoint.name, "family": name, "round": int(meta.get("round", 0)),
        "image_size": cfg.image_size, "generated": total, "held_out": n_held,
        "training_slices": len(train["image"]), **fidelity(held["image"], images)}
    if cfg.num_classes:
        # generate() cycles the classes: image i has label i % num_classes
        labels = torch.arange(total) % cfg.num_classes
        synthetic = {"image": images, "label": labels}
        out["classes"] = list(names)
        out["held_out_by_class"] = torch.bincount(held["label"],
                                                  minlength=cfg.num_classes).tolist()
        out.update(utility(train, held, synthetic, cfg.num_classes, seed,
                           ClassifierBudget(steps=classifier_steps)))
    out["seconds"] = time.perf_counter() - t0
    return out


ROWS = (("frd", "Fréchet Radiomics Distance (lower is better)"),
        ("frechet", "Fréchet distance, FeatureNet (lower is better)"),
        ("precision", "precision (fidelity)"), ("recall", "recall (diversity)"),
        ("density", "density (fidelity)"), ("coverage", "coverage (diversity)"),
        ("real-bacc", "classifier on real slices: balanced accuracy"),
        ("augmented-bacc", "real + synthetic: balanced accuracy"),
        ("tstr-bacc", "synthetic only (TSTR): balanced accuracy"),
        ("real-auc", "classifier on real slices: AUC"),
        ("augmented-auc", "real + synthetic: AUC"), ("tstr-auc", "synthetic only (TSTR): AUC"),
        ("intended-class-accuracy", "intended-class accuracy (real classifier on synthetic)"),
        ("intended-class-ratio", "intended-class accuracy / real held-out accuracy"),
        ("augmentation-gain", "augmentation gain (balanced accuracy)"),
        ("tstr-ratio", "TSTR / real (balanced accuracy)"))


def _print_table(result: dict[str, Any]) -> None:
    from fedsynth.utility import describe

    print(f"{result['checkpoint']}: {result['family']} round {result['round']}, "
          f"{result['generated']} generated vs {result['held_out']} held-out slices "
          f"({result['training_slices']} training slices), {result['seconds']:.0f} s, "
          f"computed on this machine")
    if "classes" in result:
        print("held out by class: " + ", ".join(
            f"{c} {k}" for c, k in zip(result["classes"], result["held_out_by_class"])))
    width = max(len(label) for _, label in ROWS)
    for key, label in ROWS:
        if key in result:
            print(f"  {label:<{width}}  {describe(result[key])}")


KEPT_COLUMNS = (("frd", "eval-frd"), ("frechet", "eval-frechet"), ("mmd", "eval-mmd"),
                ("precision", "eval-precision"), ("recall", "eval-recall"),
                ("density", "eval-density"), ("coverage", "eval-coverage"),
                ("intended", "eval-intended-class-accuracy"),
                ("d-real", "eval-d-real"), ("d-fake", "eval-d-fake"), ("ssim", "eval-ssim"),
                ("psnr", "eval-psnr"), ("mae", "eval-mae"), ("examples", "eval-examples"))


def kept_home(settings: Path, run_id: int | None = None) -> list[dict[str, Any]]:
    """The evaluations kept at the hospital of daemon settings file ``settings``."""
    from client.evaluation import kept_path, read_kept
    from client.settings import DaemonSettings

    hospital = DaemonSettings.load(settings).hospital
    path = kept_path(hospital)
    if path is None or not path.is_file():
        return []
    return [e for e in read_kept(path) if run_id is None or e.get("run") == run_id]


def _print_kept(entries: list[dict[str, Any]]) -> None:
    if not entries:
        print("no evaluation kept at this hospital (it keeps them only when it requires DP)")
        return
    cols = [(label, key) for label, key in KEPT_COLUMNS if any(key in e for e in entries)]
    print("evaluations kept at this hospital (not sent: it requires DP)")
    print("  ".join(f"{h:>9}" for h in ("run", "round", *(c for c, _ in cols))))
    for e in entries:
        cells = [str(e.get("run", "")), str(e.get("round", ""))]
        for _, key in cols:
            v = e.get(key)
            cells.append("-" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v))
        print("  ".join(f"{c:>9}" for c in cells))


def run(args: argparse.Namespace) -> int:
    from client.dicom import NoUsableDicomError
    from client.settings import SettingsError
    from fedsynth.errors import UserError

    if args.kept_home is not None:
        try:
            entries = kept_home(args.kept_home, args.run)
        except (SettingsError, OSError) as exc:
            raise UserError(str(exc)) from exc
        if args.json:
            print(json.dumps(entries, indent=2, sort_keys=True))
        else:
            _print_kept(entries)
        return 0
    if args.checkpoint is None or args.data_dir is None:
        raise UserError("evaluate needs CHECKPOINT and DATA_DIR (or --kept-home SETTINGS)")

    if args.threads > 0:
        import torch

        torch.set_num_threads(args.threads)
    if not args.verbose:
        logging.getLogger("pydicom").setLevel(logging.CRITICAL)
    patterns = []
    for item in args.label_pattern:
        name, sep, regex = item.partition("=")
        if not sep or not name.strip():
            raise UserError(f"--label-pattern {item!r}: use NAME=REGEX")
        patterns.append((name.strip(), regex))
    if args.holdout_every < 2:
        raise UserError("--holdout-every must be at least 2")
    try:
        result = evaluate(args.checkpoint, args.data_dir, n=args.n,
                          holdout_every=args.holdout_every, seed=args.seed,
                          label_attribute=args.label_attribute, label_patterns=tuple(patterns),
                          classifier_steps=args.classifier_steps)
    except (ValueError, NoUsableDicomError) as exc:  # DataSelectionError is a ValueError
        raise UserError(str(exc)) from exc
    if args.json:
        print(json.dumps({k: (None if isinstance(v, float) and not math.isfinite(v) else v)
                          for k, v in result.items()}, indent=2, sort_keys=True))
    else:
        _print_table(result)
    return 0
