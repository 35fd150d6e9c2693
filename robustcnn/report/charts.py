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
