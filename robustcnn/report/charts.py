"""The dashboard's interactive charts as Plotly figures (JSON), drawn in the page by plotly.js.

Plotly because its library can be embedded in the page once (offline, no CDN) and its figures are
plain JSON. Plotly renders a small HTML subset inside labels, so every user-provided string (run
names, defense names) is HTML-escaped here: plotly shows the entities as the literal characters.
"""

from __future__ import annotations

import html
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from robustcnn.report.records import RunRecord
from robustcnn.report.tables import pareto_front, reference_point, worst_case

#: Plotly's own template keeps the default look; white background reads better in a report.
TEMPLATE = "plotly_white"
#: One colour per defense in the overlaid chart (plotly's default qualitative colours).
PALETTE = (
    "#636efa", "#ef553b", "#00cc96", "#ab63fa", "#ffa15a",
    "#19d3f3", "#ff6692", "#b6e880", "#ff97ff", "#fecb52",
)  # fmt: skip


@dataclass(frozen=True)
class Chart:
    """A figure to draw into ``<div id=chart_id>``; ``figure`` is Plotly's JSON (data + layout)."""

    chart_id: str
    title: str
    figure: dict[str, Any]


def _label(run: RunRecord) -> str:
    return html.escape(run.label)


def _layout(title: str, x_title: str, y_title: str, **extra: Any) -> dict[str, Any]:
    return {
        "title": {"text": html.escape(title)},
        "xaxis": {"title": {"text": html.escape(x_title)}},
        "yaxis": {"title": {"text": html.escape(y_title)}, "range": [-0.02, 1.02]},
        "height": 380,
        "margin": {"l": 60, "r": 20, "t": 50, "b": 50},
        "legend": {"orientation": "h", "y": -0.2},
        "showlegend": True,  # plotly hides a single trace's legend; the run name is what it shows
        **extra,
    }


def _figure(data: list[Any], layout: dict[str, Any]) -> dict[str, Any]:
    """Validated through plotly.graph_objects (a typo in a property fails here, not in the browser).

    The JSON round trip leaves plain JSON types only (NaN becomes null), whatever plotly stored.
    """
    import plotly.graph_objects as go

    fig = go.Figure(data=data, layout=layout)
    fig.update_layout(template=TEMPLATE)
    return json.loads(fig.to_json())


def robustness_curves(runs: Sequence[RunRecord]) -> list[Chart]:
    """One chart per defense: worst-case robust accuracy against eps, one line per run."""
    import plotly.graph_objects as go

    by_defense: dict[str, list[RunRecord]] = {}
    for run in runs:
        if worst_case(run):
            by_defense.setdefault(str(run.defense or "–"), []).append(run)
    charts = []
    for index, (defense, group) in enumerate(sorted(by_defense.items())):
        traces = []
        norms = sorted({str((r.result("threat") or {}).get("norm", "")) for r in group} - {""})
        for run in group:
            curve = worst_case(run)
            traces.append(
                go.Scatter(
                    x=list(curve),
                    y=list(curve.values()),
                    mode="lines+markers",
                    name=_label(run),
                    hovertemplate="%{fullData.name}<br>ε=%{x}<br>robust acc.=%{y:.3f}<extra></extra>",
                )
            )
        title = f"defense: {defense}"
        layout = _layout(title, f"ε ({', '.join(norms) or 'norm'})", "worst-case robust accuracy")
        charts.append(Chart(f"chart-curves-{index}", title, _figure(traces, layout)))
    return charts


def tradeoff(runs: Sequence[RunRecord]) -> Chart | None:
    """Clean vs worst-case robust accuracy at the reference eps; the Pareto front marked and joined."""
    import plotly.graph_objects as go

    placed = [(run, point) for run in runs if (point := reference_point(run)) is not None]
    if not placed:
        return None
    points = [point for _, point in placed]
    front = pareto_front(points)
    traces: list[Any] = []
    by_defense: dict[str, list[int]] = {}
    for i, (run, _) in enumerate(placed):
        by_defense.setdefault(str(run.defense or "–"), []).append(i)
    for defense, indices in sorted(by_defense.items()):
        traces.append(
            go.Scatter(
                x=[points[i][0] for i in indices],
                y=[points[i][1] for i in indices],
                mode="markers",
                marker={"size": 11},
                name=html.escape(defense),
                text=[_label(placed[i][0]) for i in indices],
                customdata=[placed[i][0].result("reference_eps") for i in indices],
                hovertemplate=(
                    "%{text}<br>clean=%{x:.3f}<br>robust=%{y:.3f} at ε=%{customdata}<extra></extra>"
                ),
            )
        )
    traces.append(
        go.Scatter(
            x=[points[i][0] for i in front],
            y=[points[i][1] for i in front],
            mode="lines+markers",
            line={"dash": "dot", "color": "black"},
            marker={
                "symbol": "star",
                "size": 16,
                "color": "rgba(0,0,0,0)",
                "line": {"width": 2, "color": "black"},
            },
            name="Pareto front",
            text=[_label(placed[i][0]) for i in front],
            hovertemplate="Pareto front: %{text}<extra></extra>",
        )
    )
    eps = sorted({str(run.result("reference_eps")) for run, _ in placed})
    title = "clean vs robust accuracy"
    layout = _layout(title, "clean accuracy", f"worst-case robust accuracy at reference ε ({', '.join(eps)})")
    layout["xaxis"]["range"] = [-0.02, 1.02]
    return Chart("chart-tradeoff", title, _figure(traces, layout))


def overlaid_curves(runs: Sequence[RunRecord]) -> Chart | None:
    """Every run's worst-case curve in one chart, coloured by defense: the defenses at a glance.

    The per-defense panels (:func:`robustness_curves`) show each defense's runs apart; here they
    cross each other, so which defense holds up longest is read off one picture.
    """
    import plotly.graph_objects as go

    placed = [run for run in runs if worst_case(run)]
    if not placed:
        return None
    defenses = sorted({str(run.defense or "–") for run in placed})
    traces = []
    for run in sorted(placed, key=lambda r: (str(r.defense or "–"), r.label)):
        curve, defense = worst_case(run), str(run.defense or "–")
        traces.append(
            go.Scatter(
                x=list(curve),
                y=list(curve.values()),
                mode="lines+markers",
                name=f"{html.escape(defense)}: {_label(run)}",
                legendgroup=html.escape(defense),
                line={"color": PALETTE[defenses.index(defense) % len(PALETTE)]},
                hovertemplate="%{fullData.name}<br>ε=%{x}<br>robust acc.=%{y:.3f}<extra></extra>",
            )
        )
    norms = sorted({str((r.result("threat") or {}).get("norm", "")) for r in placed} - {""})
    title = "worst-case robust accuracy, every defense"
    layout = _layout(title, f"ε ({', '.join(norms) or 'norm'})", "worst-case robust accuracy", height=460)
    return Chart("chart-overlay", title, _figure(traces, layout))


def minimal_perturbation_boxes(runs: Sequence[RunRecord]) -> Chart | None:
    """Per run with a minimum-norm attack, its minimal perturbations' quartiles as a box, by defense.

    Drawn from the quartiles in results.json (the box spans q1..q3 around the median); a run whose
    median sample was never broken has no box (its row in the table says "unbroken").
    """
    import plotly.graph_objects as go

    traces = []
    for run in sorted(runs, key=lambda r: (str(r.defense or "–"), r.label)):
        found = run.result("minimal_perturbation")
        if not isinstance(found, dict) or any(found.get(k) is None for k in ("q1", "median", "q3")):
            continue
        q1, median, q3 = (float(found[k]) for k in ("q1", "median", "q3"))
        traces.append(
            go.Box(
                x=[html.escape(str(run.defense or "–"))],
                q1=[q1], median=[median], q3=[q3], lowerfence=[q1], upperfence=[q3],
                name=_label(run),
            )
        )
    if not traces:
        return None
    norms = sorted({str(r.result("minimal_perturbation", {}).get("norm", "")) for r in runs
                    if isinstance(r.result("minimal_perturbation"), dict)} - {""})
    title = "minimal perturbation per defense"
    y_title = f"minimal perturbation ({', '.join(norms) or 'norm'})"
    layout = _layout(title, "defense", y_title, boxmode="group")
    layout["yaxis"].pop("range")
    return Chart("chart-minimal", title, _figure(traces, layout))


def defense_comparison(runs: Sequence[RunRecord]) -> Chart | None:
    """Per run (named by its defense), clean accuracy and the worst-case robust accuracy at each eps as
    grouped bars, the training epoch's cost against a standard epoch under the name.

    Why bars beside the curves: "does this lever buy robustness, and at what price?" is a comparison
    of a few numbers per defense, read left to right; the curves show the shape.
    """
    import plotly.graph_objects as go

    placed = sorted((run for run in runs if worst_case(run)), key=lambda r: (str(r.defense or "–"), r.label))
    if not placed:
        return None
    names = [_bar_name(run, len({r.defense for r in placed}) < len(placed)) for run in placed]
    eps_values = sorted({e for run in placed for e in worst_case(run)} - {0.0})
    traces = [go.Bar(x=names, y=[run.result("clean_accuracy") for run in placed], name="clean")]
    for e in eps_values:
        traces.append(go.Bar(x=names, y=[worst_case(run).get(e) for run in placed], name=f"robust @ ε={e:g}"))
    title = "clean and worst-case robust accuracy per defense (cost: epoch vs standard)"
    layout = _layout(title, "defense", "accuracy", barmode="group", height=460)
    return Chart("chart-defenses", title, _figure(traces, layout))


def _bar_name(run: RunRecord, with_label: bool) -> str:
    """The defense (and the run, when a defense has several), with its epoch cost when it was measured."""
    name = html.escape(str(run.defense or "–")) + (f" ({_label(run)})" if with_label else "")
    ratio = (run.result("defense_report") or {}).get("epoch_cost_ratio")
    if isinstance(ratio, (int, float)):
        return f"{name}<br>{ratio:.1f}× epoch"
    return f"{name}<br>{'standard' if run.result('defense') == 'none' else 'cost not measured'}"
