"""Render one experiment's dashboard as a single self-contained HTML file.

Self-contained means: plotly.js is embedded once, images are data URIs, and a Content-Security-
Policy forbids every network request, so the page works from a file on a laptop without network
and cannot leak anything when opened. Every user-provided string (run names, configs, check
details) goes through :func:`esc`; chart data goes through :func:`script_json`, which is safe
inside a ``<script>`` element.
"""

from __future__ import annotations

import base64
import html
import json
from collections.abc import Sequence
from typing import Any

from robustcnn.report import face, tables
from robustcnn.report.aligned import AlignedGrid, aligned_grid
from robustcnn.report.charts import Chart
from robustcnn.report.heatmaps import ATTRIBUTIONS_PNG
from robustcnn.report.records import EXAMPLES_PNG, ExperimentRuns, RunRecord

#: No network at all: inline scripts and styles, images and fonts only from data: URIs.
CSP = (
    "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
    "img-src data: blob:; font-src data:"
)

STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0;color:#222;background:#fafafa}
header{background:#223;color:#fff;padding:1em 2em}header h1{margin:0 0 .3em;font-size:1.5em}
header p{margin:.2em 0;color:#ccd}nav a{color:#9cf;margin-right:1em}
main{padding:1em 2em}section{background:#fff;border:1px solid #ddd;border-radius:6px;margin:1em 0;padding:1em}
h2{margin-top:0;font-size:1.2em}.note{color:#666;font-size:.9em}
table{border-collapse:collapse;font-size:.88em;margin:.5em 0}
th,td{border:1px solid #ddd;padding:.3em .6em;text-align:left;vertical-align:top}
th{background:#f0f0f4;position:sticky;top:0}table.sortable th{cursor:pointer}
td.num{text-align:right;font-variant-numeric:tabular-nums}
tr.flagged td{background:#fff0f0}td.fail{color:#b00;font-weight:bold}td.pass{color:#070}td.skip{color:#888}
.charts{display:grid;grid-template-columns:repeat(auto-fill,minmax(460px,1fr));gap:1em}
.chart{min-height:380px}figure{display:inline-block;margin:.5em;vertical-align:top}
figure img{max-width:640px;border:1px solid #ddd}figcaption{font-size:.85em;color:#555}
details{margin:.3em 0}pre{background:#f6f6f6;padding:.6em;overflow:auto;max-height:30em;font-size:.8em}
.scroll{overflow-x:auto}
#leaderboard-table{font-size:.8em;width:100%}#leaderboard-table td{overflow-wrap:anywhere;max-width:14em}
"""

#: Draws every chart from the JSON specs, and sorts tables by a clicked header (no library needed).
SCRIPT = """
(function () {
  var specs = JSON.parse(document.getElementById('chart-specs').textContent);
  specs.forEach(function (spec) {
    var el = document.getElementById(spec.id);
    if (!el) { return; }
    if (!window.Plotly) { el.textContent = 'chart not drawn: the embedded plotly.js is missing'; return; }
    Plotly.newPlot(el, spec.figure.data, spec.figure.layout, {displaylogo: false, responsive: true});
  });
  document.querySelectorAll('table.sortable').forEach(function (table) {
    table.querySelectorAll('th').forEach(function (th, col) {
      th.addEventListener('click', function () {
        var body = table.tBodies[0], rows = Array.prototype.slice.call(body.rows);
        var dir = th.dataset.dir === 'desc' ? 1 : -1;
        th.dataset.dir = dir === 1 ? 'asc' : 'desc';
        function key(row) {
          var cell = row.cells[col], sort = cell.getAttribute('data-sort');
          return sort !== null ? parseFloat(sort) : cell.textContent.toLowerCase();
        }
        rows.sort(function (a, b) {
          var x = key(a), y = key(b);
          if (typeof x !== typeof y) { return typeof x === 'number' ? -1 : 1; }
          return x < y ? -dir : x > y ? dir : 0;
        });
        rows.forEach(function (row) { body.appendChild(row); });
      });
    });
  });
})();
"""


def esc(value: Any) -> str:
    """HTML-escape any value (quotes included: the result may go into an attribute)."""
    return html.escape(str(value), quote=True)


def script_json(value: Any) -> str:
    """JSON that cannot end its ``<script>`` element: <, > and & become unicode escapes."""
    text = json.dumps(value, separators=(",", ":"), allow_nan=False)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def render_table(table: tables.Table, table_id: str, sortable: bool = False, empty: str = "") -> str:
    if not table.rows:
        return f'<p class="note">{esc(empty or "nothing to show")}</p>'
    head = "".join(f"<th>{esc(c)}</th>" for c in table.columns)
    rows = []
    for row in table.rows:
        cells = []
        for cell in row.cells:
            classes = " ".join(c for c in (cell.css, "num" if cell.sort is not None else None) if c)
            attrs = f' class="{esc(classes)}"' if classes else ""
            attrs += f' title="{esc(cell.title)}"' if cell.title else ""
            attrs += f' data-sort="{cell.sort!r}"' if cell.sort is not None else ""
            cells.append(f"<td{attrs}>{esc(cell.text)}</td>")
        row_attrs = ' class="flagged"' if row.flagged else ""
        row_attrs += f' data-run-id="{esc(row.run_id)}"' if row.run_id else ""
        rows.append(f"<tr{row_attrs}>{''.join(cells)}</tr>")
    css = ' class="sortable"' if sortable else ""
    return (
        f'<div class="scroll"><table id="{esc(table_id)}"{css}><thead><tr>{head}</tr></thead>'
        f"<tbody>{''.join(rows)}</tbody></table></div>"
    )


def section(section_id: str, title: str, body: str, note: str = "") -> str:
    note_html = f'<p class="note">{esc(note)}</p>' if note else ""
    return f'<section id="{esc(section_id)}"><h2>{esc(title)}</h2>{note_html}{body}</section>'


def chart_divs(charts: Sequence[Chart]) -> str:
    if not charts:
        return '<p class="note">no run with an attack curve</p>'
    divs = "".join(f'<div class="chart" id="{esc(c.chart_id)}" title="{esc(c.title)}"></div>' for c in charts)
    return f'<div class="charts">{divs}</div>'


def example_grids(
    runs: Sequence[RunRecord], image: str = EXAMPLES_PNG, what: str = "adversarial examples"
) -> str:
    """Each run's ``image`` (a PNG it logged or the report drew) as an embedded figure."""
    figures = []
    for run in runs:
        png = run.images.get(image)
        if png is None:
            continue
        data = base64.b64encode(png).decode("ascii")
        figures.append(
            f'<figure><img src="data:image/png;base64,{data}" alt="{esc(what)} of {esc(run.label)}">'
            f"<figcaption>{esc(run.label)} ({esc(run.model)}, {esc(run.defense)})"
            "</figcaption></figure>"
        )
    return "".join(figures) or f'<p class="note">no run logged {esc(what)}</p>'


def face_sections(runs: Sequence[RunRecord]) -> str:
    """The face study: per run, its figures, every patch with its baselines, and its images."""
    blocks = []
    for i, run in enumerate(runs):
        figures = "".join(
            f'<figure><img src="{uri}" alt="{esc(caption)} of {esc(run.label)}">'
            f"<figcaption>{esc(caption)}</figcaption></figure>"
            for caption, uri in face.images(run)
        )
        blocks.append(
            f'<div class="face-run" id="face-run-{i}"><h3>{esc(run.label)}</h3>'
            f'<p class="note">{esc(face.threshold_note(run))}</p>'
            + render_table(face.figures_table(run), f"face-figures-{i}", empty="no figures in results.json")
            + render_table(face.patches_table(run), f"face-patches-{i}", sortable=True,
                           empty="no patches in results.json")
            + render_table(face.transfer_table(run), f"face-transfer-{i}",
                           empty="no held-out recognizers (face.holdout_recognizers)")
            + (figures or '<p class="note">no face images logged</p>')
            + "</div>"
        )
    return section(
        "face-patch", "Face-patch study", "".join(blocks),
        "Success of each physical patch at the calibrated threshold on held-out draws: in sample (the "
        "photos it was optimised on; held out: transforms_only) and on held-out photos (photos the "
        "optimisation never saw, against the enrolled template; held out: photos), next to a random "
        "patch of the same mask (its own seed) and the bare face on the same draws. Rows marked NO "
        "do not beat their random patch (one-sided exact McNemar test, p < 0.05). Saliency in patch: the "
        "share of the recognizer's input-gradient saliency (of its similarity to the attacker's enrolled "
        "template for dodging, the target's for impersonation) inside the patch, on the face without "
        "and with it; does the patch draw the attention? (face_saliency: the maps). The last table: the "
        "same patches on recognizers the optimisation never saw, each at its own calibrated threshold.",
    )


def aligned_figure(grid: AlignedGrid) -> str:
    """The input-gradient grid as an embedded figure, and the runs it leaves out (other kept images)."""
    data = base64.b64encode(grid.png).decode("ascii")
    left_out = (
        f'<p class="note">not drawn (they kept other images): {esc(", ".join(grid.left_out))}</p>'
        if grid.left_out else ""
    )  # fmt: skip
    return (
        f'<figure><img src="data:image/png;base64,{data}" alt="input gradients per defense">'
        f"<figcaption>rows: {esc('; '.join(grid.rows))}</figcaption></figure>{left_out}"
    )


def configs(runs: Sequence[RunRecord]) -> str:
    blocks = []
    for run in runs:
        text = json.dumps(run.config if run.config is not None else {}, indent=2, sort_keys=True, default=str)
        blocks.append(
            f"<details><summary>{esc(run.label)} <code>{esc(run.run_id)}</code></summary>"
            f"<pre>{esc(text)}</pre></details>"
        )
    return "".join(blocks)


def sections(runs: ExperimentRuns, charts: Sequence[Chart], lead: Sequence[str] = ()) -> list[str]:
    """The page's sections in order, each chart in the section it belongs to (by its id)."""
    done = runs.finished
    curves = [c for c in charts if c.chart_id.startswith("chart-curves-")]
    overlay = [c for c in charts if c.chart_id in ("chart-defenses", "chart-overlay")]
    minimal = [c for c in charts if c.chart_id == "chart-minimal"]
    others = [c for c in charts if c not in (*curves, *overlay, *minimal)]
    parts = [
        *lead,
        section(
            "leaderboard",
            "Leaderboard",
            render_table(tables.leaderboard(done), "leaderboard-table", sortable=True,
                         empty="no finished run with results.json yet"),
            "Worst-case robust accuracy (the per-sample minimum over every attack that ran), best first by "
            "the reference ε; AUC is the area under the worst-case curve divided by the ε range. Rows marked "
            "⚠ failed a sanity check: their numbers are not trustworthy. Click a header to sort.",
        ),
        *([section("compare", "Defenses at a glance", chart_divs(overlay),
                   "Clean and worst-case robust accuracy per defense with its training cost, then every "
                   "run's worst-case curve in one chart, one colour per defense.")] if overlay else []),
        section("curves", "Robustness curves per defense", chart_divs(curves)),
        section("tradeoff", "Clean vs robust trade-off", chart_divs(others),
                "Each point is a run; the dotted line joins the Pareto front "
                "(the runs no other run beats on both axes)."),
        section("attacks", "Per-attack breakdown",
                render_table(tables.attack_breakdown(done), "attacks-table", sortable=True)),
        section("minimal", "Minimal perturbation",
                (chart_divs(minimal) if minimal else "")
                + render_table(tables.minimal_perturbations(done), "minimal-table", sortable=True,
                               empty="no run with a minimum-norm attack (attack=fmn)"),
                "Per sample, the smallest perturbation shown to break it (FMN's verified search and every "
                "example an attack reported wrong): its quartiles per run, a robustness figure that needs "
                "no ε choice. Robust accuracy at ε is about the fraction of samples above ε."),
        section("checks", "Sanity checks",
                render_table(tables.sanity_checks(done), "checks-table", sortable=True),
                "Carlini et al. 2019: a failed check (FAIL) makes the verdict unreliable. Hover a cell for "
                "its detail; skipped means the check's attacks did not run; enforced means the attack "
                "base guarantees it by construction (nothing measured: no evidence either way)."),
    ]
    if runs.face_patch:
        parts.append(face_sections(runs.face_patch))
    if runs.incomplete:
        parts.append(section("incomplete", "Incomplete runs",
                             render_table(tables.incomplete_runs(runs.incomplete), "incomplete-table"),
                             "Failed, killed or still running: not ranked."))
    parts.append(section("examples", "Adversarial examples", example_grids(done),
                         "Clean images (top) and adversarial ones of each run's strongest attack."))
    if any(run.result("attributions") for run in done):  # an audit, a run without attacks: none
        parts.append(section(
            "attributions", "What the model looks at",
            render_table(tables.attribution_stability(done), "attributions-table", sortable=True)
            + example_grids(done, ATTRIBUTIONS_PNG, "attribution maps"),
            "Saliency, Integrated Gradients and Grad-CAM of the kept examples, clean and adversarial (at "
            "the reference ε), for the predicted and the true class; each map scaled to its own maximum. "
            "Stability: Spearman's rank correlation of the clean and adversarial true-class maps (1 = the "
            "attack did not move what the model looks at).",
        ))
    grid = aligned_grid(done)
    if grid is not None:
        parts.append(section(
            "gradients", "Input gradients per defense", aligned_figure(grid),
            "Tsipras et al. 2019: the input gradient of the true class's score at the same clean images, one "
            "row per run, each map stretched to its own maximum around grey (grey = 0, the peak above it). "
            "An adversarially trained model's gradients tend to look like the digit, a standard one's like "
            "noise: whether a regulariser buys the same alignment shows here.",
        ))  # fmt: skip
    everything = [*done, *runs.face_patch]
    parts.append(section(
        "configs", "Configs and versions",
        render_table(tables.environments(everything), "environment-table") + configs(everything),
    ))
    return parts


def render(
    runs: ExperimentRuns,
    charts: Sequence[Chart],
    plotly_js: str,
    store: str,
    generated: str,
    lead: Sequence[str] = (),
) -> str:
    """The whole page; ``charts`` are drawn into the divs of the curves and trade-off sections.

    ``lead``: rendered sections placed first (an audit's verdict and model card).
    """
    parts = sections(runs, charts, lead)
    shown = "".join(parts)
    nav = "".join(
        f'<a href="#{sid}">{esc(title)}</a>'
        for sid, title in (
            ("leaderboard", "leaderboard"), ("compare", "at a glance"), ("curves", "curves"),
            ("tradeoff", "trade-off"), ("attacks", "attacks"), ("minimal", "minimal perturbation"),
            ("checks", "checks"), ("face-patch", "face study"), ("examples", "examples"),
            ("attributions", "attributions"), ("gradients", "gradients"), ("configs", "configs"),
        )  # fmt: skip
        if f'<section id="{sid}">' in shown  # only the sections this page has
    )
    specs = [{"id": c.chart_id, "figure": c.figure} for c in charts]
    summary = (
        f"{len(runs.finished)} finished run(s), {len(runs.face_patch)} face-patch, "
        f"{len(runs.incomplete)} incomplete, {runs.skipped} skipped (sweep parents, runs without "
        f"results) · store {store} · generated {generated}"
    )
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f'<meta http-equiv="Content-Security-Policy" content="{esc(CSP)}">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>robustcnn report: {esc(runs.name)}</title><style>{STYLE}</style></head><body>"
        f"<header><h1>robustcnn report: {esc(runs.name)}</h1><p>{esc(summary)}</p><nav>{nav}</nav></header>"
        f"<main>{shown}</main>"
        f'<script id="plotly-js">{plotly_js}</script>'
        f'<script type="application/json" id="chart-specs">{script_json(specs)}</script>'
        f"<script>{SCRIPT}</script></body></html>\n"
    )
