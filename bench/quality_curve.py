"""The learning curve of ``make bench-quality`` (issue 21): each row's held-out score along the run.

Federated rows keep every round's checkpoint and score the global generator at the curve's rounds
(FedBN, whose norm layers stay at the hospitals: each hospital's model at that round, its own
weights then with that round's shared ones, averaged over hospitals, as the final row is scored);
centralized and hospital-alone rows are scored at the same optimiser steps as they train
(``bench.quality._train``). Steps per hospital = round x local steps throughout.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from bench.quality import (REFERENCE_ROWS, BenchConfig, Curve, Data, KeptOptimizers,
                           hospital_nets, hospital_settings, score)
from fedsynth.inprocess import InProcessGrid
from protocol import records as protocol
from server.federation import FederationConfig, run_federation
from server.run_folder import load_checkpoint
from shared_models.codec import decode_into


class LocalStates:
    """An observer keeping each hospital's own weights (``client.app``'s local state: FedBN's
    norm layers) after the rounds in ``rounds``, to rebuild its model at that round."""

    def __init__(self, grid_box: list[InProcessGrid], rounds: Sequence[int]) -> None:
        self.grid_box, self.rounds = grid_box, set(rounds)
        self.by_round: dict[int, dict[int, dict[str, np.ndarray]]] = {}

    def __call__(self, summary: Any) -> None:
        from client.app import LOCAL_STATE

        if summary.round not in self.rounds or not self.grid_box:
            return
        grid = self.grid_box[0]
        self.by_round[summary.round] = {
            n: (protocol.from_record(c.state.array_records[LOCAL_STATE])
                if LOCAL_STATE in c.state.array_records else {})
            for n, c in grid.contexts.items()}


def federated_curve(family: Any, cfg: BenchConfig, fcfg: FederationConfig, held: Data,
                    personal: bool) -> tuple[dict[str, float], Curve]:
    """The run with every checkpoint kept: the final score (as ``federated``) and the global
    model's (``personal``: each hospital's own model's, averaged) at ``cfg.curve_rounds()``."""
    model = fcfg.model
    fcfg = replace(fcfg, keep_checkpoints=cfg.rounds + 1)
    app = KeptOptimizers() if cfg.keep_optimizers else None
    grid = InProcessGrid(hospital_settings(cfg), app=app)
    states = LocalStates([grid], cfg.curve_rounds())
    fcfg = replace(fcfg, min_hospitals=max(fcfg.min_hospitals, len(grid.node_ids)))
    with grid.serving():  # as run_inprocess, with the observer that needs the grid
        folder = run_federation(grid, fcfg, (states,))
    by_round = {int(p.stem.split("-")[1]): p for p in (folder / "checkpoints").glob("round-*.npz")}

    def nets_of(arrays: Mapping[str, np.ndarray]) -> dict:
        nets = family.build(model)
        decode_into(nets, arrays)
        return nets

    def at(r: int) -> dict[str, float]:
        arrays, _ = load_checkpoint(by_round[r])
        if not personal:
            return score(family, nets_of(arrays), held)
        shared = [set(protocol.from_record(grid.last_received[n]["train"]
                                           .content[protocol.ARRAYS]))
                  for n in grid.node_ids]  # what the coordinator sends each hospital
        scores = [score(family, nets_of({**states.by_round[r][n],
                                         **{k: v for k, v in arrays.items() if k in keys}}),
                        held) for n, keys in zip(grid.node_ids, shared)]
        return {k: float(np.mean([sc[k] for sc in scores])) for k in scores[0]}

    curve = [(r * cfg.local_steps, at(r)) for r in cfg.curve_rounds() if r < cfg.rounds]
    if personal:  # the final row as federated() scores it: what each hospital evaluated
        scores = [score(family, nets, held) for nets in hospital_nets(family, model, grid)]
        final = {k: float(np.mean([sc[k] for sc in scores])) for k in scores[0]}
    else:
        final = score(family, nets_of(load_checkpoint(by_round[max(by_round)])[0]), held)
    return final, curve + [(cfg.steps, final)]


def curve_table(curves: Mapping[str, Curve], metric: str = "ssim") -> str:
    """Steps per hospital down, one column per row: ``metric`` averaged over seeds."""
    names = [n for n, pts in curves.items() if pts]
    steps = sorted({s for n in names for s, _ in curves[n]})
    lines = ["| steps per hospital | " + " | ".join(names) + " |",
             "| --- |" + " --- |" * len(names)]
    for st in steps:
        cells = []
        for n in names:
            vals = [m[metric] for s, m in curves[n] if s == st]
            cells.append(f"{np.mean(vals):.4f}" if vals else "")
        lines.append(f"| {st} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_curve(path: Path, curves: Mapping[str, Curve], rows: Mapping[str, Mapping[str, float]],
               title: str) -> Path:
    """SSIM along the run of every row (hospitals alone: their mean), the references as bars."""
    from bench.plots import curve_png

    series: dict[str, list[tuple[float, float]]] = {}
    for name, pts in curves.items():
        key = "hospital alone (mean)" if name.endswith(" alone") else name
        series.setdefault(key, []).extend((s, m["ssim"]) for s, m in pts)
    return curve_png(path, series, title=title, ylabel="SSIM on held-out T2w",
                     bars={n: rows[n]["ssim"] for n in REFERENCE_ROWS if n in rows})
