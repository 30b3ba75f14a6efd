"""``report.html``: one self-contained page a person opens to see how a run went.

Loss and quality curves are inline SVG drawn here (no plotting library, no script from the
network), sample grids are embedded as base64 PNG, and participation is a table of rounds by
hospital. Everything comes from the run folder: ``config.json``, ``metrics.jsonl`` and
``samples/round-NNN.png``. A small inline script checks that every image decoded and marks the
page (``<body data-render="ok">``), which the browser test reads.
"""

from __future__ import annotations

import base64
import html
import json
import logging
import math
from pathlib import Path
from typing import Any, Mapping, Sequence

from protocol.keys import valid_epsilon  # one definition of an epsilon a report may show

log = logging.getLogger(__name__)

PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf", "#8c564b")
MAX_GRIDS = 24  # sample grids shown; evenly spaced rounds beyond that, first and last kept

Series = Mapping[str, Sequence[tuple[float, float]]]


class ReportError(ValueError):
    """The run folder cannot be reported on (the message names what is missing)."""


def _fmt(v: float) -> str:
    if v == 0 or not math.isfinite(v):
        return "0" if v == 0 else str(v)
    a = abs(v)
    return f"{v:.3g}" if 1e-3 <= a < 1e4 else f"{v:.2e}"


def line_chart(title: str, series: Series, *, width: int = 460, height: int = 240,
               x_label: str = "round") -> str:
    """An SVG line chart of ``series`` (name → (x, y) points); NaN/inf points leave gaps."""
    pts = [(x, y) for s in series.values() for x, y in s if math.isfinite(y)]
    esc = html.escape
    head = (f'<svg class="chart" xmlns="http://www.w3.org/2000/svg" width="{width}" '
            f'height="{height}" viewBox="0 0 {width} {height}" role="img" '
            f'aria-label="{esc(title)}"><title>{esc(title)}</title>'
            f'<text x="{width / 2}" y="16" text-anchor="middle" class="t">{esc(title)}</text>')
    if not pts:
        return head + (f'<text x="{width / 2}" y="{height / 2}" text-anchor="middle">'
                       "no finite values</text></svg>")
    left, right, top, bottom = 56, 12, 28, 40
    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
    x0, x1 = min(xs), max(xs)
    y0, y1 = min(ys), max(ys)
    if x1 == x0:
        x0, x1 = x0 - 1, x1 + 1
    if y1 == y0:
        pad = abs(y0) * 0.1 or 1.0
        y0, y1 = y0 - pad, y1 + pad
    pw, ph = width - left - right, height - top - bottom

    def px(x: float) -> float:
        return left + (x - x0) / (x1 - x0) * pw

    def py(y: float) -> float:
        return top + (1 - (y - y0) / (y1 - y0)) * ph

    out = [head, f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" class="plot"/>']
    for i in range(5):
        yv = y0 + (y1 - y0) * i / 4
        out.append(f'<line x1="{left}" x2="{left + pw}" y1="{py(yv):.1f}" y2="{py(yv):.1f}" '
                   f'class="grid"/><text x="{left - 4}" y="{py(yv) + 4:.1f}" '
                   f'text-anchor="end">{_fmt(yv)}</text>')
    for xv in sorted(set(xs)) if len(set(xs)) <= 12 else [x0 + (x1 - x0) * i / 6 for i in range(7)]:
        out.append(f'<text x="{px(xv):.1f}" y="{top + ph + 14}" text-anchor="middle">'
                   f'{_fmt(xv)}</text>')
    out.append(f'<text x="{left + pw / 2}" y="{height - 6}" text-anchor="middle">'
               f'{esc(x_label)}</text>')
    for i, (name, s) in enumerate(series.items()):
        color = PALETTE[i % len(PALETTE)]
        runs: list[list[tuple[float, float]]] = [[]]
        for x, y in sorted(s):
            if math.isfinite(y):
                runs[-1].append((px(x), py(y)))
            elif runs[-1]:
                runs.append([])
        for run in runs:
            if len(run) > 1:
                d = " ".join(f"{x:.1f},{y:.1f}" for x, y in run)
                out.append(f'<polyline points="{d}" fill="none" stroke="{color}" '
                           'stroke-width="2" class="line"/>')
            for x, y in run:
                out.append(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="3" fill="{color}"/>')
        lx = left + 8 + i * 110
        out.append(f'<rect x="{lx}" y="{top + 6}" width="10" height="10" fill="{color}"/>'
                   f'<text x="{lx + 14}" y="{top + 15}">{esc(name)}</text>')
    out.append("</svg>")
    return "".join(out)


def _series(rows: Sequence[Mapping[str, Any]], section: str, keys: Mapping[str, str]
            ) -> dict[str, list[tuple[float, float]]]:
    out: dict[str, list[tuple[float, float]]] = {}
    for label, key in keys.items():
        pts = []
        for r in rows:
            v = (r.get(section) or {}).get(key) if section else r.get(key)
            if v is not None:
                pts.append((float(r["round"]), float(v)))
        if pts:
            out[label] = pts
    return out


# What each score means depends on the family: the hospitals' evaluation (client/trainer.py
# ``LocalTrainer.evaluate``, the family's ``evaluate_holdout``) sends these eval-* keys.
_TRANSLATION_PAIR = {  # family -> what is compared with what in SSIM / PSNR / MAE
    "pix2pix": "G(A) vs its held-out paired B",
    "cyclegan": "G_AB(A) vs its held-out paired B, at hospitals holding A/B pairs",
    "maskgan": "G(mask) vs the held-out image of that mask",
}


def _panels(rows: Sequence[Mapping[str, Any]], family: str
            ) -> list[tuple[str, dict[str, list[tuple[float, float]]]]]:
    """(title, series) of each chart the run's family produces: a panel is shown when some row
    carries one of its keys, so a family never gets a panel for a measure it does not make
    (CycleGAN has no Fréchet distance); a measure it makes that came out NaN every round still
    shows, as "no finite values", since that is a failure to see."""
    ev = lambda keys: _series(rows, "evaluate", keys)  # noqa: E731
    pair = _TRANSLATION_PAIR.get(family, "the translation vs its held-out target")
    mae_title = ("Mask reconstruction error (held-out masks, MAE of decoder(encoder(mask)); "
                 "lower is better)" if family == "aae" else
                 f"MAE (held-out; {pair}; lower is better)")
    d_eval_title = ("Latent discriminator on held-out masks' codes (prior vs encoded)"
                    if family == "aae" else "Discriminator on held-out slices (real vs generated)")
    candidates = [
        ("Losses (example-weighted mean)",
         _series(rows, "train", {"generator": "loss-g", "discriminator": "loss-d"})),
        ("Discriminator output in training",
         _series(rows, "train", {"on real": "d-real", "on fake": "d-fake"})),
        ("Fréchet distance (held-out, lower is better)", ev({"frechet": "eval-frechet"})),
        ("MMD (held-out, lower is better)", ev({"mmd": "eval-mmd"})),
        ("Fréchet Radiomics Distance (held-out, lower is better)", ev({"frd": "eval-frd"})),
        ("Precision, recall, density, coverage (held-out; recall and coverage fall under mode "
         "collapse)", ev({m: f"eval-{m}" for m in ("precision", "recall", "density", "coverage")})),
        (f"SSIM (held-out; {pair}; higher is better)", ev({"ssim": "eval-ssim"})),
        (f"PSNR in dB (held-out; {pair}; higher is better)", ev({"psnr": "eval-psnr"})),
        (mae_title, ev({"mae": "eval-mae"})),
        (d_eval_title, ev({"on real": "eval-d-real", "on generated": "eval-d-fake"})),
        ("Intended-class accuracy (a real-slice classifier reads the generated slices; higher "
         "is better)", ev({"intended class": "eval-intended-class-accuracy"})),
        ("Sample diversity (falls under mode collapse)",
         _series(rows, "server", {"diversity": "sample-diversity"})),
        ("Round duration", _series(rows, "", {"seconds": "seconds"})),
    ]
    return [(t, s) for t, s in candidates if s]


def _unscored(rows: Sequence[Mapping[str, Any]], family: str) -> str:
    """A note when hospitals evaluated but none could score (``eval-examples`` 0 everywhere:
    e.g. CycleGAN hospitals that hold one domain, or both without pairs)."""
    counts = [r["evaluate"].get("eval-examples") for r in rows
              if isinstance(r.get("evaluate"), Mapping) and r["evaluate"]]
    if not counts or any(c for c in counts if c is not None):
        return ""
    return ("<p class=\"note\">Evaluated, but no hospital had anything to score "
            f"(held-out examples 0 in every evaluation of this {html.escape(family)} run): a "
            "translation is scored only where a hospital holds held-out slices of both domains "
            "in pairs.</p>")


def hospital_names(root: Path) -> dict[str, str]:
    """Node id → name where the run folder knows it: the rows' ``names`` (a deployment: the
    names the coordinator registered the hospitals' keys under) and, in simulation,
    ``node-names/``."""
    out: dict[str, str] = {}
    metrics = root / "metrics.jsonl"
    if metrics.is_file():
        for line in metrics.read_text().splitlines():
            try:
                row = json.loads(line)
            except ValueError:
                continue
            names = row.get("names") if isinstance(row, dict) else None
            if isinstance(names, dict):
                out.update({str(k): str(v) for k, v in names.items()})
    folder = root / "node-names"
    if folder.is_dir():
        out.update({f.stem: f.read_text().strip() for f in folder.glob("*.name")})
    return out


def _participation(rows: Sequence[Mapping[str, Any]], names: Mapping[str, str]) -> str:
    nodes = sorted({n for r in rows for n in (r.get("hospitals") or {})},
                   key=lambda n: (names.get(n, "~"), n))
    label = {n: names.get(n, f"node …{n[-4:]}") for n in nodes}
    head = "".join(f"<th>{html.escape(label[n])}</th>" for n in nodes)
    body = []
    for r in rows:
        hs = r.get("hospitals") or {}
        cells = "".join(
            f'<td class="ok" title="{_fmt(hs[n].get("images-per-second", float("nan")))} img/s">'
            "✓</td>" if n in hs else '<td class="miss">–</td>' for n in nodes)
        body.append(f"<tr><td>{r['round']}</td><td>{r.get('selected', '')}</td>"
                    f"<td>{r.get('replied', '')}</td><td>{r.get('failed', '')}</td>"
                    f"<td>{r.get('rejected', '')}</td><td>{_fmt(float(r.get('seconds', 0)))}</td>"
                    f"{cells}</tr>")
    return ('<table class="part"><tr><th>round</th><th>selected</th><th>replied</th>'
            f'<th>failed</th><th>rejected</th><th>seconds</th>{head}</tr>'
            + "".join(body) + "</table>")


def _privacy(rows: Sequence[Mapping[str, Any]], names: Mapping[str, str],
             config: Mapping[str, Any]) -> tuple[str, str]:
    """DP runs: a chart of the epsilon each hospital reported, and a table of the last values
    (each at the hospital's own delta; a hospital that refused a round stays at its last).

    Epsilon is self-reported: a value that cannot be an epsilon (negative, NaN, inf:
    ``protocol.keys.valid_epsilon``) is shown as invalid, with its rounds, never as the value;
    it is left out of the chart, and a hospital whose latest report is invalid shows no epsilon."""
    per_h: dict[str, list[tuple[float, float]]] = {}
    invalid: dict[str, list[int]] = {}
    last: dict[str, tuple[int, bool]] = {}  # hospital -> (latest round reported, was it valid)
    for r in rows:
        for node, m in (r.get("hospitals") or {}).items():
            if "dp-epsilon" in m:
                name = names.get(node, f"node …{node[-4:]}")
                eps = valid_epsilon(m["dp-epsilon"])
                if eps is None:
                    invalid.setdefault(name, []).append(int(r["round"]))
                else:
                    per_h.setdefault(name, []).append((float(r["round"]), eps))
                last[name] = (int(r["round"]), eps is not None)
    if not last:
        return "", ""
    if invalid:
        log.warning("report: hospitals sent a dp-epsilon that is not a finite number >= 0: %s",
                    ", ".join(f"{h} (rounds {', '.join(map(str, rs))})"
                              for h, rs in sorted(invalid.items())))
    train = config.get("train", {})
    chart = (line_chart("Privacy spent per hospital (DP epsilon)", dict(sorted(per_h.items())))
             if per_h else "")
    body = []
    for h in sorted(last):
        rnd, ok = last[h]
        cell = (f"<td>{_fmt(per_h[h][-1][1])}</td>" if ok else
                '<td class="miss">invalid (refused)</td>')
        bad = invalid.get(h, [])
        bad_cell = (f'<td class="miss">rounds {", ".join(map(str, bad))}: not a finite number '
                    "&ge; 0, refused</td>" if bad else "<td></td>")
        body.append(f"<tr><td>{html.escape(h)}</td>{cell}<td>{rnd}</td>{bad_cell}</tr>")
    table = (f"<h2>Privacy</h2><p>DP-SGD at the hospitals: noise multiplier "
             f"{html.escape(str(train.get('dp_noise_multiplier', '?')))}, clipping norm "
             f"{html.escape(str(train.get('dp_max_grad_norm', '?')))}; epsilon as each "
             "hospital's accountant reported it, at its own delta. A reported epsilon that is "
             "negative, NaN or infinite is refused: shown as invalid, not as a value.</p>"
             '<table class="part"><tr><th>hospital</th><th>epsilon spent</th>'
             "<th>last round reported</th><th>invalid reports</th></tr>"
             + "".join(body) + "</table>")
    return chart, table


def _kept_home(rows: Sequence[Mapping[str, Any]], names: Mapping[str, str]) -> str:
    """Hospitals that require DP keep their evaluation figures (client/evaluation.py): their
    replies carry ``eval-kept-home = 1`` and no figure; say so rather than draw nothing."""
    per_h: dict[str, list[int]] = {}
    for r in rows:
        for node, m in (r.get("evaluated") or {}).items():
            if isinstance(m, Mapping) and m.get("eval-kept-home") == 1:
                per_h.setdefault(names.get(node, f"node …{node[-4:]}"), []).append(
                    int(r["round"]))
    if not per_h:
        return ""
    body = "".join(f"<tr><td>{html.escape(h)}</td><td>kept at hospital (DP)</td>"
                   f"<td>{len(rs)}</td><td>{max(rs)}</td></tr>"
                   for h, rs in sorted(per_h.items()))
    return ("<h2>Evaluation kept at hospitals</h2><p>These hospitals require differential "
            "privacy: their evaluation figures (computed on their held-out slices) stay at the "
            "hospital, in its log and <code>fedsynth evaluate --kept-home</code>, and are not "
            "in the curves above.</p>"
            '<table class="part"><tr><th>hospital</th><th>evaluation</th><th>rounds evaluated'
            f"</th><th>last round</th></tr>{body}</table>")


# What each failure kind means (server/grid.py failure_kind, REFUSAL_KINDS)
FAILURE_KINDS = {
    "offline": "Flower no longer listed the hospital as online",
    "restarted": "its SuperNode reconnected mid-round: the work in flight was lost",
    "timeout": "no reply within round-timeout",
    "dp-budget": "refused: the round would take it past its dp-epsilon",
    "dp-ledger": "refused: its privacy ledger is unusable until an operator acts",
    "dp-required": "refused: it requires differential privacy the run does not give",
    "evaluation-refused": "refused the evaluation (its DP settings)",
    "ceiling": "refused: the work asked is past its ceilings",
    "never-send": "refused: the round asks for a component it keeps at home",
    "bundle": "refused: the run's app bundle is not the one it approved",
    "error": "failed at the hospital (the reason is in its own log)",
}


def failures_section(rows: Sequence[Mapping[str, Any]]) -> str:
    """Per round, each hospital that failed (train or evaluate phase) and why, by registered
    name (metrics.jsonl ``failed_hospitals`` / ``evaluate_failed``); "" when none failed."""
    body = []
    for r in rows:
        for phase, key in (("train", "failed_hospitals"), ("evaluate", "evaluate_failed")):
            failed = r.get(key) or {}
            if not isinstance(failed, Mapping):
                continue
            for hospital, kind in sorted(failed.items()):
                why = FAILURE_KINDS.get(str(kind), "")
                body.append(f"<tr><td>{html.escape(str(r.get('round', '')))}</td>"
                            f"<td>{html.escape(str(hospital))}</td><td>{phase}</td>"
                            f"<td>{html.escape(str(kind))}</td><td>{html.escape(why)}</td></tr>")
    if not body:
        return ""
    return ("<h2>Failed hospitals</h2>"
            '<table class="part"><tr><th>round</th><th>hospital</th><th>phase</th>'
            f"<th>reason</th><th>what it means</th></tr>{''.join(body)}</table>")


def _pick_grids(paths: Sequence[Path]) -> list[Path]:
    if len(paths) <= MAX_GRIDS:
        return list(paths)
    step = (len(paths) - 1) / (MAX_GRIDS - 1)
    return [paths[round(i * step)] for i in range(MAX_GRIDS)]


def _grids(root: Path) -> str:
    paths = _pick_grids(sorted((root / "samples").glob("round-*.png")))
    figs = []
    for p in paths:
        data = base64.b64encode(p.read_bytes()).decode("ascii")
        rnd = p.stem.split("-")[-1].lstrip("0") or "0"
        figs.append(f'<figure><img class="grid" alt="samples after round {rnd}" '
                    f'src="data:image/png;base64,{data}"><figcaption>round {rnd}'
                    f'{" (untrained)" if rnd == "0" else ""}</figcaption></figure>')
    return '<div class="grids">' + "".join(figs) + "</div>" if figs else "<p>no sample grids</p>"


_CSS = """
body{font:14px system-ui,sans-serif;margin:24px;color:#222}
h1{font-size:20px}h2{font-size:16px;margin-top:28px}
.charts{display:flex;flex-wrap:wrap;gap:12px}
svg.chart{background:#fff;border:1px solid #ddd}svg text{font-size:11px;fill:#333}
svg .t{font-size:13px;font-weight:600}svg .plot{fill:#fafafa;stroke:#bbb}
svg .grid{stroke:#e4e4e4}
table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:3px 8px;text-align:center}
td.ok{background:#d9f2d9}td.miss{background:#f8d7d7}
.note{color:#8a4b00}
.grids{display:flex;flex-wrap:wrap;gap:10px}figure{margin:0}
img.grid{image-rendering:pixelated;width:192px;border:1px solid #ccc}
figcaption{text-align:center;font-size:12px}
pre{background:#f4f4f4;padding:8px;max-height:240px;overflow:auto}
"""

# Marks the page once every image decoded and no script error happened (read by the e2e test).
_SCRIPT = """
window.addEventListener('error', function(){document.body.dataset.render='script-error';});
window.addEventListener('load', function(){
  var imgs=document.images, bad=0;
  for (var i=0;i<imgs.length;i++){ if(!imgs[i].complete||imgs[i].naturalWidth===0){bad++;} }
  var charts=document.querySelectorAll('svg.chart').length;
  if (document.body.dataset.render!=='script-error'){
    document.body.dataset.render = bad===0 ? 'ok' : 'broken-images';
  }
  document.body.dataset.images=imgs.length; document.body.dataset.charts=charts;
  document.title = document.body.dataset.render + ' ' + document.title;
});
"""


def _client_dp(rows: Sequence[Mapping[str, Any]], config: Mapping[str, Any]) -> tuple[str, str]:
    """Client-level DP runs (server/client_dp.py): a chart of the run's epsilon by round and a
    line with its mechanism; ("", "") otherwise. The epsilon is the coordinator's own accounting
    (Opacus' RDP accountant over the rounds), not a hospital's report."""
    series = _series(rows, "server", {"client-level epsilon": "client-dp-epsilon"})
    if not series:
        return "", ""
    last = series["client-level epsilon"][-1]
    chart = line_chart("Client-level DP on the aggregate (epsilon spent by the run)", series)
    line = (f"<p>Client-level DP on the aggregate: each hospital's update clipped to "
            f"{html.escape(str(config.get('client_dp_clip', '?')))}, Gaussian noise multiplier "
            f"{html.escape(str(config.get('client_dp_noise_multiplier', '?')))}; epsilon "
            f"{_fmt(last[1])} after round {int(last[0])} at delta "
            f"{html.escape(str(config.get('client_dp_delta', '?')))} (the coordinator's RDP "
            "accountant; it protects each hospital's participation in the released model, not "
            "against the coordinator).</p>")
    return chart, line


def build_report(root: Path) -> str:
    """The HTML text of the report of run folder ``root``."""
    root = Path(root)
    metrics_path = root / "metrics.jsonl"
    if not metrics_path.is_file():
        raise ReportError(f"{root} is not a run folder: it has no metrics.jsonl")
    rows = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    rows.sort(key=lambda r: r["round"])
    config = {}
    if (root / "config.json").is_file():
        config = json.loads((root / "config.json").read_text())
    names = hospital_names(root)

    family = str(config.get("model", {}).get("family", ""))
    charts = [line_chart(title, series) for title, series in _panels(rows, family)]
    per_h: dict[str, list[tuple[float, float]]] = {}
    for r in rows:
        for node, m in (r.get("hospitals") or {}).items():
            if "images-per-second" in m:
                per_h.setdefault(names.get(node, f"node …{node[-4:]}"), []).append(
                    (float(r["round"]), float(m["images-per-second"])))
    if per_h:
        charts.append(line_chart("Hospital throughput (images/s)", dict(sorted(per_h.items()))))
    privacy = _privacy(rows, names, config)
    if privacy[0]:
        charts.append(privacy[0])
    client_dp = _client_dp(rows, config)
    if client_dp[0]:
        charts.append(client_dp[0])

    model = config.get("model", {})
    title = f"fedsynth run {config.get('run_id', root.name)}"
    summary = (f"{len(rows)} rounds · family {model.get('family', '?')} · image size "
               f"{model.get('image_size', '?')} · preset {config.get('preset', '?')}")
    return (
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">"
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>"
        f"<h1>{html.escape(title)}</h1><p>{html.escape(summary)}</p>"
        f'<h2>Curves</h2>{_unscored(rows, family)}<div class="charts">{"".join(charts)}</div>'
        f"<h2>Participation</h2>{_participation(rows, names)}"
        f"{privacy[1]}{client_dp[1]}{_kept_home(rows, names)}{failures_section(rows)}"
        f"<h2>Fixed-noise samples by round</h2>{_grids(root)}"
        f"<h2>Configuration</h2><pre>{html.escape(json.dumps(config, indent=2))}</pre>"
        f"<script>{_SCRIPT}</script></body></html>"
    )


def write_report(root: Path, out: Path | None = None) -> Path:
    """Write ``report.html`` into the run folder (or ``out``); returns its path."""
    from .run_folder import _atomic_write

    out = Path(out) if out else Path(root) / "report.html"
    _atomic_write(out, build_report(Path(root)).encode("utf-8"))
    log.info("report written to %s", out)
    return out
