"""The audit's ``report.html``: the dashboard page of robustcnn report, for one model, verdict first.

Reusing the dashboard's renderer (one run) keeps one look and one set of tables: the curves,
per-attack breakdown, checks and example grid read the same ``results.json`` fields; the audit adds
a verdict section with the gate and the model card on top.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from robustcnn.report.build import plotly_js
from robustcnn.report.charts import robustness_curves
from robustcnn.report.examples import EXAMPLES_FILE, ExampleSet
from robustcnn.report.page import esc, render, section
from robustcnn.report.records import EXAMPLES_PNG, ExperimentRuns, RunRecord

#: How the verdict section words results.json's ``evidence``.
EVIDENCE_TEXT = {
    "white_box": "white-box: gradient attacks on the model itself ran",
    "black_box": "black-box only: query and transfer attacks, no gradients; the robust accuracy is an "
    "upper bound of unknown tightness",
}


def _gate_text(gate: dict[str, Any]) -> str:
    """The gate row: none, passed / FAILED against the minimum, or REFUSED and why."""
    if gate.get("refused"):
        return f"REFUSED: {gate['refused']}"
    if gate.get("min_robust_accuracy") is None:
        return "none (audit.min_robust_accuracy not set)"
    return (
        f"{gate['robust_accuracy']:.4f} at ε = {gate['eps']:g} vs minimum "
        f"{gate['min_robust_accuracy']:g}: {'passed' if gate['passed'] else 'FAILED'}"
    )


def _verdict_section(results: dict[str, Any], card: dict[str, Any]) -> str:
    model = results["model"]
    gate = results.get("gate") or {}
    rows = [
        ("verdict", results["verdict"]),
        ("evidence", EVIDENCE_TEXT.get(str(results.get("evidence")), str(results.get("evidence")))),
        ("exit code", results["exit_code"]),
        ("model", f"{model['name']} ({model['format']}, {model['parameters']:,} parameters)"),
        ("source", model["source"]),
        ("sha256", model["sha256"]),
        ("access", card["access"]),
        ("data", f"{results['data']}: {results['n_attacked']} test images"),
        ("clean accuracy", f"{results['clean_accuracy']:.4f}"),
        (
            "worst-case robust accuracy",
            f"{results['reference_robust_accuracy']:.4f} at ε = {results['reference_eps']:g} "
            f"({results['threat']['norm']})",
        ),
        ("gate", _gate_text(gate)),
        *[("note", note) for note in results.get("notes", [])],
    ]
    table = "".join(f"<tr><th>{esc(k)}</th><td>{esc(v)}</td></tr>" for k, v in rows)
    body = f'<div class="scroll"><table id="verdict-table">{table}</table></div>'
    card_json = esc(json.dumps(card, indent=2))
    body += f"<details><summary>model card (model_card.json)</summary><pre>{card_json}</pre></details>"
    return section(
        "verdict",
        "Verdict",
        body,
        "unreliable = a sanity check failed (e.g. masked gradients): no robustness claim can be trusted; "
        "unchecked = the sanity checks were turned off (checks.enabled=false): no verdict; "
        "robust / not robust compares the worst-case robust accuracy at the reference ε with the threshold.",
    )


def write_report(
    out: Path, results: dict[str, Any], config: dict[str, Any], card: dict[str, Any], store: str
) -> Path:
    """Render ``out/report.html`` (atomically) from the audit's results."""
    shown = {**results, "model": results["model"]["name"], "defense": "(audited)"}
    kept = out / EXAMPLES_FILE
    examples = ExampleSet.load(kept).render_png(out / EXAMPLES_PNG) if kept.is_file() else out / EXAMPLES_PNG
    record = RunRecord(
        run_id=str(results.get("mlflow_run_id") or "-"),
        name=results["model"]["name"],
        status="FINISHED",
        results=shown,
        config=config,
        images={EXAMPLES_PNG: examples.read_bytes()} if examples.is_file() else {},
    )
    runs = ExperimentRuns(f"audit of {results['model']['name']}", finished=[record])
    page = render(
        runs,
        robustness_curves(runs.finished),
        plotly_js(),
        store=store,
        generated=time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        lead=[_verdict_section(results, card)],
    )
    target = out / "report.html"
    partial = out / f".report.html.{os.getpid()}.tmp"
    partial.write_text(page, encoding="utf-8")
    os.replace(partial, target)
    return target
