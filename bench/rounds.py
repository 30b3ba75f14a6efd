"""Round overhead on a localhost deployment: round wall time over the slowest hospital's compute.

A real coordinator (SuperLink, TLS, node authentication, signed models) and 3 hospital daemons run
as processes on 127.0.0.1, on demo DICOM folders, with enough local steps for about 30 s of
training per hospital per round. For each finished round the coordinator's own round time (train
+ evaluate + aggregation + checkpoint + sample grid, from metrics.jsonl) is divided by the largest
compute time any hospital reported for that round (its ``train-seconds`` + ``eval-seconds``, both
measured inside the hospital around the model work). 1.0 would mean the federation costs nothing
beyond the slowest hospital's own work.

The same federation runs twice side by side, with the hospital executor fedsynth uses
(``warm``: one long-lived process per hospital, see ``client.executor``) and with Flower's stock
path (``flower``: a fresh process per message, stock polling), so the gain is measured in one run.
Round 1 carries process start, imports and the slice cache and is reported apart; the figure is
the median over the later rounds.

``python -m bench.rounds [--families dcgan64,cyclegan128] [--seconds 30] [--rounds 3]``
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench.localdeploy import (free_port, hospital_toml, launch_toml, metrics_rows, run, start,
                               wait_for)

log = logging.getLogger(__name__)

CASES = {  # name: (family, image size, batch)
    "dcgan64": ("dcgan", 64, 32),
    "cyclegan128": ("cyclegan", 128, 2),
    "dcgan32": ("dcgan", 32, 4),  # --quick
}


@dataclass
class RoundsResult:
    case: str
    executor: str
    local_steps: int
    rows: list[dict] = field(default_factory=list)
    startup_s: float = 0.0  # daemons started until all 3 hospitals are connected

    def kind(self, i: int) -> str:
        """``train`` (no evaluation), ``folded`` (its train message also carried the previous
        round's evaluation: each hospital evaluated before training, one round trip) or
        ``separate`` (the last round: an evaluate message of its own, a second round trip)."""
        if i == len(self.rows) - 1 and self.rows[i].get("evaluated"):
            return "separate"
        if i > 0 and self.rows[i - 1].get("evaluated"):
            return "folded"
        return "train"

    def compute(self, i: int) -> float:
        """The slowest hospital's compute in round ``i``: its train seconds, plus the evaluation
        it ran in that round (the previous round's, folded; or its own, separate)."""
        row = self.rows[i]
        per_node: dict[str, float] = {}
        for node, m in (row.get("hospitals") or {}).items():
            per_node[node] = per_node.get(node, 0.0) + float(m.get("train-seconds", 0.0))
        kind = self.kind(i)
        evaluated = (self.rows[i - 1].get("evaluated") if kind == "folded"
                     else row.get("evaluated") if kind == "separate" else None) or {}
        for node, m in evaluated.items():
            per_node[node] = per_node.get(node, 0.0) + float(m.get("eval-seconds", 0.0))
        return max(per_node.values(), default=float("nan"))

    def _median(self, kind: str) -> float:
        """Median round/compute over the rounds after the first (imports, caches, warm-up)."""
        ratios = [self.rows[i]["seconds"] / self.compute(i) for i in range(1, len(self.rows))
                  if self.kind(i) == kind]
        return statistics.median(ratios) if ratios else float("nan")

    @property
    def ratio(self) -> float:
        """Training rounds without any evaluation."""
        return self._median("train")

    @property
    def eval_ratio(self) -> float:
        """Rounds that also evaluate: the evaluation folded into the train message."""
        return self._median("folded")

    @property
    def last_eval_ratio(self) -> float:
        """The last round, which evaluates with a message of its own (second round trip)."""
        return self._median("separate")

    def detail(self) -> str:
        marks = {"train": "", "folded": "e", "separate": "E"}
        rounds = ", ".join(f"{r['seconds']:.1f}/{self.compute(i):.1f}" + marks[self.kind(i)]
                           for i, r in enumerate(self.rows))
        over = statistics.median(self.rows[i]["seconds"] - self.compute(i)
                                 for i in range(1, len(self.rows)))
        phases = "; ".join(
            f"round {r['round']}: " + ", ".join(
                f"{k.removesuffix('-seconds')} {v:.1f}" for k, v in sorted(r["server"].items())
                if k.endswith("-seconds")) for r in self.rows[1:])
        return (f"{self.executor} executor, {self.local_steps} local steps; round/compute seconds "
                f"per round: {rounds} (round 1 = warm-up; e = also evaluated the previous "
                f"round's model, folded into the train message; E = the last round's own "
                f"evaluate message); median overhead {over:.1f} s per round; coordinator phases "
                f"(s): {phases}; daemons up in {self.startup_s:.0f} s")


def calibrate(family: str, image_size: int, batch: int, seconds: float) -> int:
    """Local steps that take about ``seconds`` on one core of this machine (as the hospitals run:
    ``threads = 1``), timed on a few steps of the real trainer."""
    import torch

    from client.trainer import LocalTrainer
    from shared_models import ModelConfig, TrainConfig, get_family

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _steps_for(family, image_size, batch, seconds)
    finally:
        torch.set_num_threads(threads)  # the caller's setting (run_all reports it)


def _steps_for(family: str, image_size: int, batch: int, seconds: float) -> int:
    import torch

    from client.trainer import LocalTrainer
    from shared_models import ModelConfig, TrainConfig, get_family

    model = ModelConfig(family=family, image_size=image_size)
    trainer = LocalTrainer(model, torch.device("cpu"), amp="off")
    gen = torch.Generator().manual_seed(0)
    data = {k: torch.rand((64, 1, image_size, image_size), generator=gen) * 2 - 1
            for k in get_family(family).batch_keys}
    trainer.fit(data, TrainConfig(local_steps=1, batch_size=batch), seed=0)  # warm-up
    steps = 3
    t0 = time.perf_counter()
    trainer.fit(data, TrainConfig(local_steps=steps, batch_size=batch), seed=1)
    per_step = (time.perf_counter() - t0) / steps
    return max(1, round(seconds / per_step))


def deployed(case: str, executor: str, local_steps: int, rounds: int, folder: Path,
             round_timeout: float = 900, evaluate_every: int = 0) -> RoundsResult:
    """One federation of ``rounds`` rounds with 3 hospital daemons using ``executor``."""
    from fedsynth.certs import init_federation, new_node_key
    from fedsynth.demo_data import build_demo_hospitals

    family, size, batch = CASES[case]
    folder.mkdir(parents=True, exist_ok=True)
    keys = init_federation(folder / "keys")
    names = ("h1", "h2", "h3")
    for name in names:
        new_node_key(keys.root, name)
    data = build_demo_hospitals(folder / "data", 3, matrix=size)
    # default 2: rounds 2, 4, ... are evaluated, their evaluation riding in rounds 3, 5, ...; so one
    # federation gives training rounds, evaluating rounds and the last round side by side
    evaluate_every = evaluate_every or 2
    address = f"127.0.0.1:{free_port()}"
    result = RoundsResult(case, executor, local_steps)
    t0 = time.monotonic()
    coord = start("coordinator", ["coordinator", "--keys", str(keys.root), "--address", address,
                                  "--state", str(folder / "state"), "--rescan", "2"], folder)
    hospitals = [start(n, ["hospital", str(hospital_toml(
        folder / f"{n}.toml", address, keys.root, n, data[i], free_port(), executor))], folder)
        for i, n in enumerate(names)]
    procs = (coord, *hospitals)
    run_folder = folder / "runs" / "bench"
    try:
        wait_for("3 hospitals connected", lambda: all("SuperNode ID" in h.text()
                                                      for h in hospitals), 300, procs)
        if executor == "warm":  # connected and ready: the executor has imported the ClientApp
            wait_for("warm executors", lambda: all("warm executor polling" in h.text()
                                                   for h in hospitals), 300, procs)
        result.startup_s = time.monotonic() - t0
        launch = launch_toml(folder / "launch.toml", address, keys.ca_cert, family=family,
                             rounds=rounds, local_steps=local_steps, batch_size=batch,
                             image_size=size, min_hospitals=3, round_timeout=int(round_timeout),
                             evaluate_every=evaluate_every, signing_key=keys.signing_key,
                             run_dir=run_folder.parent, run_id="bench")
        out = run(["launch", str(launch), "--flwr-home", str(folder / "flwr")], folder)
        if out.returncode != 0:
            raise RuntimeError(f"launch failed: {out.stderr[-2000:]}")
        wait_for(f"{rounds} rounds", lambda: len(metrics_rows(run_folder)) >= rounds,
                 rounds * round_timeout, procs)
        result.rows = metrics_rows(run_folder)[:rounds]
        bad = [r["round"] for r in result.rows if r["replied"] != 3]
        if bad:
            raise RuntimeError(f"rounds {bad} did not get 3 replies: {result.rows}")
    finally:
        for p in procs:
            p.stop()
    return result


def measure(cases: list[str], seconds: float, rounds: int, executors: tuple[str, ...],
            workdir: Path, compare: tuple[str, ...] = ()) -> list[RoundsResult]:
    """Each case with the warm executor; the cases in ``compare`` also with the others."""
    out = []
    for case in cases:
        family, size, batch = CASES[case]
        steps = calibrate(family, size, batch, seconds)
        log.info("%s: %d local steps for ~%.0f s of compute per hospital", case, steps, seconds)
        for executor in executors:
            if executor != "warm" and case not in compare:
                continue
            res = deployed(case, executor, steps, rounds, workdir / f"{case}-{executor}")
            print(f"# {case} {res.detail()}", flush=True)
            out.append(res)
    return out


def figure_name(res: RoundsResult) -> str:
    suffix = "" if res.executor == "warm" else f"_{res.executor}"
    return f"deployed_round_over_compute_{res.case}{suffix}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--families", default="dcgan64,cyclegan128",
                   help=f"comma separated cases: {', '.join(CASES)}")
    p.add_argument("--seconds", type=float, default=30.0, help="local compute per round")
    p.add_argument("--rounds", type=int, default=6,
                   help="rounds per federation (>= 4): round 1 warms up; with evaluate-every 2, "
                        "even rounds are evaluated in the next round's train message, the last "
                        "with a message of its own")
    p.add_argument("--executors", default="warm",
                   help="warm only: Flower's stock executor imports the run bundle's code and is no "
                        "longer offered (client/bundle.py)")
    p.add_argument("--compare", default="dcgan64",
                   help="cases also run with Flower's stock executor, side by side")
    p.add_argument("--json", type=Path, help="also write the rows here")
    p.add_argument("--keep", type=Path, help="keep the federations' folders (logs) here")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    with tempfile.TemporaryDirectory(prefix="fedsynth-rounds-") as tmp:
        results = measure(args.families.split(","), args.seconds, args.rounds,
                          tuple(args.executors.split(",")), args.keep or Path(tmp),
                          tuple(args.compare.split(",")))
    for res in results:
        print(f"{figure_name(res)}: {res.ratio:.3f}")
        print(f"{figure_name(res).replace('_round_', '_eval_round_')}: {res.eval_ratio:.3f}")
        print(f"{figure_name(res).replace('_round_', '_last_round_')}: {res.last_eval_ratio:.3f}")
    if args.json:
        args.json.write_text(json.dumps([{**res.__dict__} for res in results], indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
