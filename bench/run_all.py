"""``make bench``: every performance figure against its floor, printed and written to BENCHMARKS.md.

Each figure prints as ``name: value`` on its own line. The ``## Performance`` section of
BENCHMARKS.md is rewritten with the table, the command, the machine (nproc, CPU model, load) and the
date; other sections are left as they are.
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import re
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from bench import rounds, scale, trainer, wire

log = logging.getLogger(__name__)

SECTION = "## Performance"
ROOT = Path(__file__).resolve().parents[1]

HOW = """\
How each figure is taken (all ratios are side by side in one run; the machine is shared and noisy):

- **trainer_vs_bare_\\***: images/s of `LocalTrainer.fit` over images/s of a bare PyTorch loop written
  inline in `bench/trainer.py` (no trainer, family or StepContext): same nets and initial weights,
  same Adam settings, same seed and batch draws, same step count. The trainer side is timed end to
  end (optimizer creation, steps, loss read-back and the weight export to numpy); the bare side
  does not export weights, so the ratio is conservative. Repetitions interleave (A B B A ...); the
  figure is the median over pairs of (bare seconds / trainer seconds), since the two runs of a
  pair share the machine's load; the CPU-time ratio (this process's CPU seconds) is shown beside it.
  `max-weight-diff` = 0 shows both sides did identical arithmetic.
  Target >= 0.95.
- **wire_\\***: bytes a hospital's link carries per round for the train message and its reply,
  serialized by Flower 1.42's own code (`message_to_proto` of the content-less message + its
  `ObjectTree`, then every object of the message tree deflated in its own Pull/PushObject
  request/response, gRPC 5-byte prefix and HTTP/2 DATA frame headers; HPACK headers and TLS not
  counted), over the floor 2 x fp32 shared parameter bytes x hospitals. Target <= 1.05 in fp32.
  `fp16_reply` halves only the hospitals' replies; `fp16_both` also sends the global model in
  float16, which is what `wire-dtype = float16` does since the strategy casts its downloads.
- **deployed_round_over_compute_\\***: `bench/rounds.py`. A real coordinator (SuperLink with TLS,
  node authentication, signed models) and 3 hospital daemons run as processes on 127.0.0.1 on demo
  DICOM folders, with local steps calibrated to ~30 s of one-core training (3 hospitals share 2
  cores, so they report ~50 s). Figure: the coordinator's round time (metrics.jsonl) over the
  slowest hospital's reported compute (train-seconds + eval-seconds), median over the training
  rounds after the first (round 1 carries imports and the slice cache). 6 rounds with
  `evaluate-every = 2`: rounds 2 and 4 are training rounds; rounds 3 and 5 also evaluate (the
  previous round's model, at each hospital before training, folded into the same train message):
  `deployed_eval_round_*`, target <= 1.10; round 6, the last, evaluates with an evaluate message of
  its own (a second round trip): `deployed_last_round_*`. `_flower` rows (previous runs only) were
  the same federation with the hospitals on Flower's stock path (`[node] executor = "flower"`,
  since removed: it imported the run bundle's code).
  What removed the overhead (each measured): the warm executor (`client/executor.py`), one packed
  Array per message (`protocol/records.py`), finer object-pull retries and a 0.25 s SuperNode
  poll (`protocol/flower_private.py`), a 0.1 s reply poll at the coordinator (`server/grid.py`).
- **scale_\\***: Flower's simulation engine, N virtual hospitals (2 Ray actors on 2 cores) on a
  tiny DCGAN (32 px, width 8, 1 local step of batch 4, 2 rounds, train + evaluate per round),
  sharing 3 demo DICOM folders and one slice cache. Seconds are the coordinator's own round time
  of the last round (round 1 carries Ray and actor start); memory is the peak of the summed PSS
  over the whole process tree (driver, Ray GCS, raylet, workers) sampled from /proc every 0.2 s.
  The per-hospital slopes are least-squares fits over N.
- **GPU** (`bench/gpu.sh`, installs nothing, < 8 min on one H100): images/s of DCGAN-64 batch 128
  and CycleGAN-256 batch 4 in fp32 and mixed precision (bf16 where supported, else fp16 with a
  grad scaler), with the trainer / bare-loop ratio for each. Its Python part runs on a CPU with
  `bench/gpu.sh --device cpu --quick` (tested); with `--probe CASE` it compares layouts and
  precisions and prints the top CUDA kernels. The figures of a GPU run are kept as raw logs in
  `bench/results/` and rendered into the `## GPU` section by `python -m bench.gpu_record`.
"""


def machine() -> dict[str, str]:
    model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = " / ".join(f"{x:.1f}" for x in os.getloadavg())
    import flwr

    return {"nproc": str(os.cpu_count()), "cpu": model, "load": load,
            "python": platform.python_version(), "torch": torch.__version__,
            "flwr": flwr.__version__, "threads": str(torch.get_num_threads())}


def replace_section(text: str, body: str, title: str = SECTION) -> str:
    """``text`` with the section ``title`` (up to the next ``## `` heading) replaced by ``body``;
    appended when the section is missing. ``body`` starts with the title line."""
    pattern = re.compile(rf"^{re.escape(title)}[ \t]*\n.*?(?=^## |\Z)", re.M | re.S)
    body = body.rstrip("\n") + "\n"
    if pattern.search(text):
        return pattern.sub(lambda _: body + "\n", text, count=1).rstrip("\n") + "\n"
    sep = "" if not text else ("\n" if text.endswith("\n") else "\n\n")
    return text + sep + body


def carried_rows(path: Path, prefixes: tuple[str, ...]) -> list[tuple[str, str, str, str]]:
    """Rows of the existing Performance table whose figure starts with one of ``prefixes``."""
    if not path.exists():
        return []
    text = path.read_text()
    start = text.find(SECTION)
    if start < 0:
        return []
    out = []
    for line in text[start:].split("\n## ", 1)[0].splitlines():
        m = re.match(r"^\| `([^`]+)` \| ([^|]*) \| ([^|]*) \| (.*) \|$", line)
        if m and m[1].startswith(prefixes):
            detail = m[4] if m[4].startswith("(previous run)") else f"(previous run) {m[4]}"
            out.append((m[1], m[2].strip(), m[3].strip(), detail))
    return out


def render(rows: list[tuple[str, str, str, str]], env: dict[str, str], command: str,
           started: str, seconds: float, notes: list[str]) -> str:
    lines = [SECTION, "",
             f"Command: `{command}` — {started}, {seconds:.0f} s. Machine: {env['nproc']} cores, "
             f"{env['cpu']}, Python {env['python']}, torch {env['torch']} ({env['threads']} "
             f"threads), flwr {env['flwr']}. Load average during the run: {env['load']} — other "
             "engineers' builds and tests shared these 2 cores, so absolute figures are pessimistic "
             "and noisy; the ratios are what to read.", "",
             "| figure | value | target | detail |", "| --- | --- | --- | --- |"]
    lines += [f"| `{n}` | {v} | {t} | {d} |" for n, v, t, d in rows]
    lines += [""] + [f"- {n}" for n in notes] + ["", HOW]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes; BENCHMARKS.md is not written")
    p.add_argument("--skip-scale", action="store_true")
    p.add_argument("--skip-rounds", action="store_true",
                   help="skip the deployed-round overhead runs (real processes, ~20 min)")
    p.add_argument("--scale-budget", type=float, default=900.0,
                   help="seconds for the simulation scale runs together (larger N are skipped)")
    p.add_argument("--output", type=Path, default=ROOT / "BENCHMARKS.md")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    t0 = time.monotonic()
    started = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    rows: list[tuple[str, str, str, str]] = []
    notes: list[str] = []

    def emit(name: str, value: float, fmt: str, target: str, detail: str) -> None:
        print(f"{name}: {value:{fmt}}", flush=True)
        rows.append((name, f"{value:{fmt}}", target, detail))

    for c in trainer.cpu_comparisons(args.quick):
        emit(c.name, c.ratio, ".3f", ">= 0.95",
             f"median over {len(c.a_seconds)} interleaved pairs of the pair's time ratio; "
             f"medians: trainer {c.a_rate:.2f} img/s, bare {c.b_rate:.2f} img/s (ratio "
             f"{c.ratio_of_medians:.3f}); CPU-time ratio {c.cpu_ratio:.3f}; max-weight-diff "
             f"{c.extra['max-weight-diff']:.1e}")
    for w in wire.wire_rounds(args.quick):
        target = {"fp32": "<= 1.05", "fp16_reply": "~0.75", "fp16_both": "~0.50",
                  "int8_reply": "~0.375 (reply <= 0.26 x fp32)"}
        key = next(k for k in target if f"_{k}_" in w.name)
        emit(w.name, w.ratio, ".4f", target[key],
             f"per hospital {w.down / 1e6:.3f} MB down + {w.up / 1e6:.3f} MB up vs floor "
             f"2 x {w.payload / 1e6:.3f} MB, x {w.hospitals} hospitals")
    if not args.skip_rounds:
        with tempfile.TemporaryDirectory(prefix="fedsynth-rounds-") as tmp:
            results = rounds.measure(["dcgan32"] if args.quick else ["dcgan64", "cyclegan128"],
                                     5.0 if args.quick else 30.0, 6, ("warm",),
                                     Path(tmp), ("dcgan32", "dcgan64"))
        for res in results:
            stock = res.executor != "warm"
            emit(rounds.figure_name(res), res.ratio, ".3f", "—" if stock else "<= 1.15",
                 ("Flower's stock path, same federation: " if stock else "") + res.detail())
            emit(rounds.figure_name(res).replace("_round_", "_eval_round_"), res.eval_ratio,
                 ".3f", "<= 1.10", "rounds that also evaluate: the previous round's model, "
                 "evaluated at each hospital before training, in the same train message")
            emit(rounds.figure_name(res).replace("_round_", "_last_round_"),
                 res.last_eval_ratio, ".3f", "—", "the last round, which evaluates with an "
                 "evaluate message of its own (second round trip)")
    if not args.skip_scale:
        ns = (2, 4) if args.quick else (10, 50, 100)
        points = scale.run_scale(ns, budget_s=args.scale_budget)
        for pt in points:
            emit(f"scale_round_seconds_{pt.hospitals}", pt.steady_seconds, ".2f", "—",
                 f"rounds {', '.join(f'{s:.1f}' for s in pt.round_seconds)} s; "
                 f"{min(pt.replied)} of {pt.hospitals} replied")
            emit(f"scale_peak_mb_{pt.hospitals}", pt.peak_pss / 2**20, ".0f", "—",
                 f"peak summed PSS (RSS sum {pt.peak_rss / 2**20:.0f} MB); whole run "
                 f"{pt.wall_seconds:.0f} s")
        if len(points) >= 2:
            xs = [pt.hospitals for pt in points]
            a, b = scale.fit_line(xs, [pt.steady_seconds for pt in points])
            emit("scale_seconds_per_hospital", b, ".3f", "—",
                 f"round seconds ~ {a:.2f} + {b:.3f} N (N = {xs})")
            a, b = scale.fit_line(xs, [pt.peak_pss / 2**20 for pt in points])
            emit("scale_mb_per_hospital", b, ".2f", "—",
                 f"peak MB ~ {a:.0f} + {b:.2f} N (N = {xs})")
        skipped = [n for n in ns if n not in {pt.hospitals for pt in points}]
        if skipped:
            notes.append(f"scale: N = {skipped} skipped, they would have overrun the "
                         f"{args.scale_budget:.0f} s budget (see the measured trend)")
    if args.skip_scale or args.skip_rounds:
        skipped = (("scale_",) if args.skip_scale else ()) + (
            ("deployed_",) if args.skip_rounds else ())
        kept = carried_rows(args.output, skipped)
        rows += kept
        if kept:
            notes.append(f"rows {', '.join(p + '*' for p in skipped)} were not re-measured in "
                         "this run (--skip-*): carried over from the previous table, marked "
                         "'(previous run)'.")
    if not trainer.available("cyclegan"):
        notes.append("CycleGAN family not registered when this ran: only DCGAN measured.")
    notes.append("GPU: `make bench` runs on this CPU box; the lent-GPU figures are in ## GPU below.")
    if args.quick:
        return 0
    env = machine()
    command = "make bench" if os.environ.get("MAKELEVEL") else "python -m bench.run_all"
    body = render(rows, env, command, started, time.monotonic() - t0, notes)
    old = args.output.read_text() if args.output.exists() else ""
    args.output.write_text(replace_section(old, body))
    log.info("wrote the %s section of %s", SECTION, args.output)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
