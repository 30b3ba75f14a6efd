"""Write the ``## GPU`` section of BENCHMARKS.md from the logs ``bench/gpu.sh`` printed.

GPU figures come from a lent machine, not from ``make bench`` here, so they are kept as the raw
logs under ``bench/results/`` and rendered from there: nothing in the table is typed by hand.
Usage: ``python -m bench.gpu_record bench/results/gpu-*.log [--output BENCHMARKS.md]``.
"""

from __future__ import annotations

import argparse
import re
from dataclasses import dataclass, field
from pathlib import Path

from bench.run_all import ROOT, replace_section

SECTION = "## GPU"
FIGURE = re.compile(r"^(?P<name>(?:gpu|probe)_[a-z0-9_]+): (?P<value>-?[0-9.]+)$")


@dataclass
class GpuLog:
    path: Path
    header: list[str] = field(default_factory=list)  # date/host, card, torch/CUDA lines
    figures: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)  # per-case lines: ratio of medians, weights


def parse(path: Path) -> GpuLog:
    log = GpuLog(path)
    for line in path.read_text().splitlines():
        if m := FIGURE.match(line.strip()):
            log.figures[m["name"]] = float(m["value"])
        elif line.startswith(("# gpu:", "# device:")) or re.match(r"# \d{4}-\d\d-\d\dT", line):
            log.header.append(line[2:].strip())
        elif line.startswith("# ") and "ratio of medians" in line:
            log.notes.append(line[2:].strip())
    if not log.figures:
        raise ValueError(f"{path}: no 'name: value' figures; is this a bench/gpu.sh log?")
    return log


def _cases(figures: dict[str, float]) -> list[tuple[str, str]]:
    seen: list[tuple[str, str]] = []
    for name in figures:
        if m := re.match(r"gpu_([a-z0-9]+)_(fp32|bf16|fp16)_", name):
            if (m[1], m[2]) not in seen:
                seen.append((m[1], m[2]))
    return seen


def render(logs: list[GpuLog]) -> str:
    lines = [SECTION, "", "Rendered by `python -m bench.gpu_record` from the raw `bench/gpu.sh` logs "
             "kept under `bench/results/` (a GPU is lent only to some sessions; `make bench` does "
             "not touch this section).", ""]
    for log in logs:
        rel = log.path.resolve().relative_to(ROOT) if log.path.resolve().is_relative_to(ROOT) \
            else log.path
        lines += [f"### `{rel}`", ""] + [f"- {h}" for h in log.header] + [""]
        cases = _cases(log.figures)
        if cases:
            lines += ["| case | precision | trainer img/s | bare img/s | trainer / bare | "
                      "host syncs per step |", "| --- | --- | --- | --- | --- | --- |"]
            for case, prec in cases:
                def f(what: str, fmt: str = "{:.1f}") -> str:
                    v = log.figures.get(f"gpu_{case}_{prec}_{what}")
                    return "—" if v is None else fmt.format(v)
                lines.append(f"| {case} | {prec} | {f('trainer_images_per_s')} | "
                             f"{f('bare_images_per_s')} | {f('trainer_vs_bare', '{:.3f}')} | "
                             f"{f('host_syncs_per_step', '{:.2f}')} |")
            lines.append("")
        probes = {k: v for k, v in log.figures.items() if k.startswith("probe_")}
        if probes:
            lines += ["| probe | images/s |", "| --- | --- |"]
            lines += [f"| `{k}` | {v:.1f} |" for k, v in probes.items()] + [""]
        lines += [f"- {n}" for n in log.notes]
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("logs", nargs="+", type=Path)
    p.add_argument("--output", type=Path, default=ROOT / "BENCHMARKS.md")
    p.add_argument("--notes", type=Path, help="markdown appended under the tables (findings)")
    args = p.parse_args(argv)
    body = render([parse(path) for path in args.logs])
    if args.notes:
        body += "\n" + args.notes.read_text()
    text = args.output.read_text() if args.output.exists() else ""
    args.output.write_text(replace_section(text, body, SECTION))
    print(f"wrote {SECTION} of {args.output} from {len(args.logs)} log(s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
