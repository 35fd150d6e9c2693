"""The HTML dashboard without a browser: tables and numbers from hand-made runs, escaping, errors.

Hand-made ``results.json`` dicts keep these fast; tests/test_report_browser.py renders a report of
real jobs in Chromium.
"""

from __future__ import annotations

import io
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from robustcnn.errors import ReportError, RobustCNNError
from robustcnn.report import build_report
from robustcnn.report.build import folder_name
from robustcnn.report.charts import robustness_curves, tradeoff
from robustcnn.report.page import render, script_json
from robustcnn.report.records import RunRecord, split_runs
from robustcnn.report.tables import (
    attack_breakdown,
    curve_auc,
    leaderboard,
    minimal_perturbations,
    pareto_front,
    sanity_checks,
)

EPS = [0.0, 0.1, 0.2, 0.3]
EVIL = "<script>alert(1)</script>"


def results(
    defense: str,
    clean: float,
    worst: list[float],
    verdict: str = "not robust",
    failed: tuple[str, ...] = (),
    **extra: Any,
) -> dict[str, Any]:
    """A results.json as run_job writes it (the keys the page reads)."""
    checks = [{"name": "monotone_in_eps", "passed": True, "detail": "ok"}]
    checks += [{"name": name, "passed": False, "detail": f"{name} failed"} for name in failed]
    checks.append({"name": "eot_for_stochastic", "passed": None, "detail": "deterministic model"})
    return {
        "clean_accuracy": clean,
        "model": "lenet5",
        "defense": defense,
        "data": "mnist5k",
        "threat": {"norm": "linf"},
        "eps": EPS,
        "robust_accuracy": {"fgsm": [clean, *[min(1.0, w + 0.1) for w in worst[1:]]], "pgd": worst},
        "worst_case_robust_accuracy": worst,
        "reference_eps": 0.3,
        "reference_robust_accuracy": worst[-1],
        "verdict": verdict,
        "checks": checks,
        "train_seconds": 12.5,
        "cache_hit": False,
        "timing": {"pgd": {"images_per_s": 900.0}, "fgsm": {"images_per_s": 9000.0}},
        "environment": {"python": "3.11.2", "torch": "2.13.0", "robustcnn": "0.1.0", "device": "cpu"},
        **extra,
    }


def run(name: str, res: dict[str, Any] | None, status: str = "FINISHED", **tags: str) -> RunRecord:
    return RunRecord(
        run_id=f"id-{name}",
        name=name,
        status=status,
        start_time=1_700_000_000_000,
        tags=dict(tags),
        results=res,
        config={"run_name": name, "model": {"name": "lenet5"}},
    )


@pytest.fixture()
def mixed_runs() -> list[RunRecord]:
    return [
        run("plain", results("none", 0.98, [0.98, 0.5, 0.1, 0.0])),
        run("at", results("pgd_at", 0.90, [0.90, 0.8, 0.7, 0.6], verdict="robust")),
        run(
            "masked",
            results("dropout", 0.95, [0.95, 0.9, 0.9, 0.9], "unreliable", ("white_box_beats_noise",)),
        ),
        run("sweep", None, **{"robustcnn.sweep": "true"}),
        run("crashed", None, status="FAILED", model="lenet5", defense="trades"),
        run("no-results", None),
    ]


def test_curve_auc_is_the_trapezoid_mean_over_the_eps_range() -> None:
    assert curve_auc(EPS, [0.98, 0.5, 0.1, 0.0]) == pytest.approx((0.074 + 0.03 + 0.005) / 0.3)
    assert curve_auc([0.1, 0.3], [1.0, 0.0]) == pytest.approx(0.5)  # normalised by 0.2, not 0.3
    assert curve_auc([0.3, 0.1], [0.0, 1.0]) == pytest.approx(0.5)  # order of the points is irrelevant
    assert curve_auc([0.3], [0.4]) == pytest.approx(0.4)
    assert curve_auc([], []) is None


def test_pareto_front_keeps_only_undominated_points() -> None:
    points = [(0.99, 0.0), (0.90, 0.4), (0.80, 0.3), (0.70, 0.6), (0.60, 0.6), (0.90, 0.4)]
    # (0.80, 0.3) is beaten by (0.90, 0.4); (0.60, 0.6) by (0.70, 0.6); equal points both stay
    assert pareto_front(points) == [3, 1, 5, 0]
    assert pareto_front([(0.5, 0.5)]) == [0]
    assert pareto_front([]) == []


def test_runs_are_split_into_sections(mixed_runs: list[RunRecord]) -> None:
    runs = split_runs("exp", mixed_runs)
    assert [r.name for r in runs.finished] == ["plain", "at", "masked"]
    assert [r.name for r in runs.incomplete] == ["crashed"]
    assert runs.skipped == 2 and runs.face_patch == []


def test_leaderboard_rows_order_auc_and_flags(mixed_runs: list[RunRecord]) -> None:
    table = leaderboard(split_runs("exp", mixed_runs).finished)
    assert len(table.rows) == 3
    assert [c for c in table.columns if c.startswith("robust @ ε=")] == [
        "robust @ ε=0", "robust @ ε=0.1", "robust @ ε=0.2", "robust @ ε=0.3"
    ]
    # sorted by robust accuracy at the reference eps: masked (0.9), at (0.6), plain (0.0)
    assert [row.cells[0].text for row in table.rows] == ["masked", "at", "plain"]
    auc = table.columns.index("AUC (robust vs ε)")
    assert table.rows[2].cells[auc].sort == pytest.approx((0.074 + 0.03 + 0.005) / 0.3)
    verdict = table.columns.index("verdict")
    assert [row.flagged for row in table.rows] == [True, False, False]
    assert table.rows[0].cells[verdict].text == "⚠ unreliable"
    assert table.rows[0].cells[verdict].title == "white_box_beats_noise"


def test_attack_breakdown_and_sanity_checks(mixed_runs: list[RunRecord]) -> None:
    done = split_runs("exp", mixed_runs).finished
    breakdown = attack_breakdown(done)
    assert len(breakdown.rows) == 6  # 3 runs x (fgsm, pgd)
    assert {row.cells[1].text for row in breakdown.rows} == {"fgsm", "pgd"}
    checks = sanity_checks(done)
    # columns in the order the checks first appear; a run without a check shows a dash
    names = ["monotone_in_eps", "eot_for_stochastic", "white_box_beats_noise"]
    assert checks.columns == ["run", "verdict", *names]
    masked = next(row for row in checks.rows if row.cells[0].text == "masked")
    assert masked.flagged and masked.cells[4].text == "FAIL" and masked.cells[4].css == "fail"
    assert masked.cells[4].title == "white_box_beats_noise failed"
    plain = next(row for row in checks.rows if row.cells[0].text == "plain")
    assert not plain.flagged and plain.cells[4].text == "–" and plain.cells[3].text == "skipped"


def test_enforced_unchecked_and_black_box_verdicts_are_marked() -> None:
    """An enforced invariant is no pass; an unchecked verdict is flagged; black-box evidence is said."""
    name = "reported_curves_monotone_in_eps"
    enforced = {"name": name, "passed": None, "status": "enforced", "detail": "x"}
    black = results("none", 0.98, [0.98, 0.9, 0.8, 0.7], verdict="robust", evidence="black_box")
    black["checks"].append(enforced)
    unchecked = results("none", 0.98, [0.98, 0.5, 0.1, 0.0], verdict="unchecked", checks=[])
    done = [RunRecord("id-black", "black", "FINISHED", results=black),
            RunRecord("id-off", "off", "FINISHED", results=unchecked)]  # fmt: skip
    table = sanity_checks(done)
    column = table.columns.index(name)
    assert table.rows[0].cells[column].text == "enforced" and table.rows[0].cells[column].css == "skip"
    assert table.rows[0].cells[1].text == "robust (black-box only)" and not table.rows[0].flagged
    assert table.rows[1].flagged and table.rows[1].cells[1].text == "⚠ unchecked"


def test_charts_one_per_defense_and_pareto_trace(mixed_runs: list[RunRecord]) -> None:
    done = split_runs("exp", mixed_runs).finished
    curves = robustness_curves(done)
    assert [c.title for c in curves] == ["defense: dropout", "defense: none", "defense: pgd_at"]
    assert curves[1].figure["data"][0]["y"] == [0.98, 0.5, 0.1, 0.0]
    chart = tradeoff(done)
    assert chart is not None
    front = next(t for t in chart.figure["data"] if t["name"] == "Pareto front")
    # plain (0.98, 0.0), masked (0.95, 0.9) are on the front; at (0.90, 0.6) is beaten by masked
    assert list(zip(front["x"], front["y"], strict=True)) == [(0.95, 0.9), (0.98, 0.0)]


def test_two_presets_of_one_defense_type_stay_apart_and_show_their_epoch_cost() -> None:
    """prune_robust and prune_robust_no_finetune are both ``defense.name: prune``: labels tell them apart."""
    tuned = results("prune", 0.97, [0.97, 0.9, 0.88, 0.86], defense_label="prune_robust",
                    defense_report={"epoch_cost_ratio": 11.43, "epoch_seconds": 45.2})  # fmt: skip
    plain = results("prune", 0.96, [0.96, 0.9, 0.86, 0.84], defense_label="prune_robust_no_finetune")
    old = results("prune", 0.95, [0.95, 0.9, 0.8, 0.7])  # written before labels existed: its type
    done = [RunRecord(f"id-{i}", "", "FINISHED", results=r) for i, r in enumerate((tuned, plain, old))]
    assert [c.title for c in robustness_curves(done)] == [
        "defense: prune", "defense: prune_robust", "defense: prune_robust_no_finetune"
    ]
    table = leaderboard(done)
    defense, cost = table.columns.index("defense"), table.columns.index("epoch cost")
    shown = [row.cells[defense].text for row in table.rows]
    assert shown == ["prune_robust", "prune_robust_no_finetune", "prune"]
    assert [row.cells[0].text for row in table.rows][0] == "lenet5-prune_robust-mnist5k"
    assert (table.rows[0].cells[cost].text, table.rows[0].cells[cost].title) == ("11.4×", "45.2 s per epoch")
    assert table.rows[1].cells[cost].text == "–"


def test_minimal_perturbation_quartiles_per_defense(mixed_runs: list[RunRecord]) -> None:
    """Only runs with a minimum-norm attack get a row; a quartile on an unbroken sample says so."""
    found = {"norm": "linf", "n": 100, "q1": 0.05, "median": 0.1234, "q3": None,
             "unbroken_fraction": 0.3, "attacks": ["fmn"]}
    fmn_run = run("fmn", results("pgd_at", 0.9, [0.9, 0.8, 0.7, 0.6], minimal_perturbation=found))
    table = minimal_perturbations(split_runs("exp", [*mixed_runs, fmn_run]).finished)
    assert table.columns == ["run", "defense", "norm", "q1", "median", "q3", "unbroken", "from"]
    assert [[c.text for c in row.cells] for row in table.rows] == [
        ["fmn", "pgd_at", "linf", "0.0500", "0.1234", "unbroken", "0.300", "fmn"]
    ]
    page = _page([*mixed_runs, fmn_run])
    rows = re.search(r'<table id="minimal-table".*?<tbody>(.*?)</tbody>', page, re.S)
    assert rows is not None and rows.group(1).count("<tr") == 1 and "0.1234" in rows.group(1)


def _page(runs: list[RunRecord]) -> str:
    split = split_runs("exp", runs)
    charts = robustness_curves(split.finished)
    trade = tradeoff(split.finished)
    charts += [trade] if trade else []
    return render(split, charts, "/* plotly.js */", store="sqlite:///x.db", generated="now")


def test_page_escapes_user_strings(mixed_runs: list[RunRecord]) -> None:
    evil_res = results("none", 0.9, [0.9, 0.2, 0.1, 0.0])
    evil_res["defense"] = '"><img src=x onerror=alert(2)>'
    evil_res["checks"][0]["detail"] = '" onmouseover="alert(3)'
    evil = run(EVIL, evil_res)
    evil.config = {"note": "</script><script>alert(4)</script>"}
    evil.run_id = '"><b>id'
    page = _page([*mixed_runs, evil])
    assert EVIL not in page and "<img src=x" not in page and "alert(4)</script>" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert 'onmouseover="alert' not in page and "<b>id" not in page
    # exactly our three script elements: plotly.js, the chart data, the drawing code
    assert len(re.findall(r"<script\b", page)) == 3
    specs = re.search(r'<script type="application/json" id="chart-specs">(.*?)</script>', page, re.S)
    assert specs is not None
    names = [t.get("name") for c in json.loads(specs.group(1)) for t in c["figure"]["data"]]
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in names  # plotly shows entities as text
    leaderboard_rows = re.search(r'<table id="leaderboard-table".*?<tbody>(.*?)</tbody>', page, re.S)
    assert leaderboard_rows is not None and leaderboard_rows.group(1).count("<tr") == 4


def test_script_json_cannot_close_the_script_element() -> None:
    text = script_json({"a": "</script><!-- & >"})
    assert "<" not in text and ">" not in text and "&" not in text
    assert json.loads(text) == {"a": "</script><!-- & >"}


def _face_evaluation(rate: float, random: float, held_out: str) -> dict[str, Any]:
    return {"held_out": held_out, "success_rate": rate, "clean_success_rate": 0.0,
            "random_patch": {"success_rate": random, "seed": 3}}  # fmt: skip


def face_results() -> dict[str, Any]:
    """A face job's results.json (the keys the face section reads)."""
    dodging = {
        "goal": "dodging", "attacker": "obama", "target": None, "held_out": "photos", "success_rate": 0.5,
        "clean_success_rate": 0.0, "beats_baseline": True, "p_value": 0.004,
        "in_sample": _face_evaluation(0.9375, 0.0625, "transforms_only"),
        "held_out_photos": _face_evaluation(0.5, 0.0, "photos"),
        "saliency": {"template": "obama", "clean_mass_in_patch": 0.04, "patched_mass_in_patch": 0.375,
                     "patch_area_fraction": 0.06},
    }  # fmt: skip
    imp = {
        "goal": "impersonation", "attacker": "obama", "target": EVIL, "held_out": "transforms_only",
        "success_rate": 0.0625, "clean_success_rate": 0.0, "beats_baseline": False, "p_value": 0.5,
        "in_sample": _face_evaluation(0.0625, 0.0, "transforms_only"), "held_out_photos": None,
    }  # fmt: skip
    figures = [
        {"goal": "dodging", "held_out": "transforms_only", "photos": "optimisation", "patches": 1,
         "success_rate": 0.9375, "random_patch_success_rate": 0.0625, "clean_success_rate": 0.0,
         "beat_baseline": 1},
        {"goal": "dodging", "held_out": "photos", "photos": "held-out", "patches": 1,
         "success_rate": 0.5, "random_patch_success_rate": 0.0, "clean_success_rate": 0.0,
         "beat_baseline": 1},
    ]  # fmt: skip
    return {
        "task": "face_patch", "model": "face_api", "data": "faces", "mask": "eyeglasses", "threshold": 0.49,
        "threshold_source": "calibrated", "eval_draws": 16, "figures": figures, "patches": [dodging, imp],
        "dodging_success_rate": 0.9375,
        "transfer": {"faceres": {"threshold": 0.887, "false_accept_rate": 0.0, "figures": [
            {"goal": "dodging", "held_out": "recognizer+photos", "patches": 1, "success_rate": 0.25,
             "random_patch_success_rate": 0.125, "clean_success_rate": 0.0, "beat_baseline": 0}]}},
        "verification": {"target_far": 0.01, "false_accept_rate": 0.011,
                         "false_accept_interval": [0.0003, 0.06], "held_out": {"pairs": 91}},
    }  # fmt: skip


def test_face_runs_get_a_section_of_their_own(mixed_runs: list[RunRecord]) -> None:
    plain = _page(mixed_runs[:3])
    assert 'id="face-patch"' not in plain and 'id="incomplete"' not in plain
    face = run("face", face_results(), task="face_patch")  # tagged by task, as face jobs are
    face.images["face/adversarial_faces.png"] = b"\x89PNG-faces"
    face.images["face/patches/dodging/obama.png"] = b"\x89PNG-patch"
    runs = split_runs("exp", [*mixed_runs, face])
    assert runs.face_patch == [face] and face not in runs.finished  # never a leaderboard row
    page = _page([*mixed_runs, face])
    leaderboard_rows = re.search(r'<table id="leaderboard-table".*?<tbody>(.*?)</tbody>', page, re.S)
    assert leaderboard_rows is not None and "id-face" not in leaderboard_rows.group(1)
    section = page[page.index('<section id="face-patch">') :]
    section = section[: section.index("</section>")]
    figures = re.search(r'<table id="face-figures-0".*?<tbody>(.*?)</tbody>', section, re.S)
    assert figures is not None and figures.group(1).count("<tr") == 2
    assert "<td>photos</td>" in figures.group(1) and ">50.0%</td>" in figures.group(1)
    patches = re.search(r'<table id="face-patches-0".*?<tbody>(.*?)</tbody>', section, re.S)
    assert patches is not None and patches.group(1).count("<tr") == 2
    # in sample and held-out side by side, each with its random baseline; a patch that does not beat
    # its baseline is flagged; user strings stay text
    assert ">93.8%</td>" in patches.group(1) and ">6.2%</td>" in patches.group(1)
    assert '<tr class="flagged"' in patches.group(1) and ">NO</td>" in patches.group(1)
    # the held-out recognizers: each next to its random patch, flagged when a patch does not beat it
    transfer = re.search(r'<table id="face-transfer-0".*?<tbody>(.*?)</tbody>', section, re.S)
    assert transfer is not None and transfer.group(1).count("<tr") == 1
    assert "<td>faceres</td>" in transfer.group(1) and "<td>recognizer+photos</td>" in transfer.group(1)
    assert ">25.0%</td>" in transfer.group(1) and ">12.5%</td>" in transfer.group(1)
    assert '<tr class="flagged"' in transfer.group(1)
    assert ">4.0%</td>" in patches.group(1) and ">37.5%</td>" in patches.group(1)  # saliency in the patch
    assert EVIL not in section and "&lt;script&gt;" in section
    assert "91 held-out impostor pairs (95% CI [0.0%, 6.0%])" in section
    assert section.count("<img ") == 2 and "data:image/png;base64," in section
    incomplete = re.search(r'<table id="incomplete-table".*?<tbody>(.*?)</tbody>', page, re.S)
    assert incomplete is not None and incomplete.group(1).count("<tr") == 1 and "FAILED" in page


def test_folder_name_is_safe() -> None:
    assert folder_name("smoke", "3") == "smoke"
    assert folder_name("../../etc", "7") == "etc-7"
    assert folder_name("a b/c", "9") == "a_b_c-9"


# ---------------------------------------------------------------- through a real (sqlite) store


@pytest.fixture()
def store_uri(tmp_path: Path, empty_store: Path) -> str:
    shutil.copy(empty_store, tmp_path / "m.db")
    return f"sqlite:///{tmp_path / 'm.db'}"


def _png() -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (4, 4), (200, 10, 10)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_report_from_a_store_skips_parents_and_lists_failed_runs(store_uri: str, tmp_path: Path) -> None:
    from robustcnn.tracking.store import TrackingStore

    png = tmp_path / "examples.png"
    png.write_bytes(_png())
    with TrackingStore.at(store_uri).start_run("exp", "sweep-parent", {"robustcnn.sweep": "true"}):
        pass
    for name, res in (("plain", results("none", 0.98, [0.98, 0.5, 0.1, 0.0])),
                      ("at", results("pgd_at", 0.9, [0.9, 0.8, 0.7, 0.6]))):
        with TrackingStore.at(store_uri).start_run("exp", name, {"model": "lenet5"}) as logged:
            logged.log_dict({"run_name": name}, "config.json")
            logged.log_dict(res, "results.json")
            logged.log_artifact(png, "plots")
    with pytest.raises(RuntimeError), TrackingStore.at(store_uri).start_run("exp", "crashed"):
        raise RuntimeError("died in training")

    written = build_report(store_uri, None, tmp_path / "reports")
    # every experiment with runs; the store's "warmup" holds one run without results.json
    assert written == [tmp_path / "reports" / name / "index.html" for name in ("exp", "warmup")]
    assert "no finished run with results.json yet" in written[1].read_text()
    page = written[0].read_text()
    rows = re.search(r'<table id="leaderboard-table".*?<tbody>(.*?)</tbody>', page, re.S)
    assert rows is not None and rows.group(1).count("<tr") == 2
    assert page.count('<img src="data:image/png;base64,') == 2
    assert "crashed" in page and "FAILED" in page and "sweep-parent" not in page
    assert "get_plotlyjs" not in page and len(page) > 1_000_000  # plotly.js itself is embedded
    assert not list((tmp_path / "reports" / "exp").glob(".*.tmp"))


def test_report_draws_kept_examples_once_and_reuses_its_cache(
    store_uri: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Jobs keep examples as data; the report draws each run's grid once, later builds read its cache."""
    import torch

    from robustcnn.report import examples as examples_module
    from robustcnn.tracking.store import TrackingStore

    clean = torch.rand(3, 1, 8, 8)
    adversarial = torch.stack([clean, (clean + 0.1).clamp(0, 1)])
    kept = examples_module.ExampleSet(clean, adversarial, (0.0, 0.1), ("a",))
    path = kept.save(tmp_path / examples_module.EXAMPLES_FILE)
    with TrackingStore.at(store_uri).start_run("exp", "kept", {"model": "lenet5"}) as logged:
        logged.log_dict(results("none", 0.98, [0.98, 0.5, 0.1, 0.0]), "results.json")
        logged.log_artifact(path, "plots")
    drawn: list[Path] = []
    real = examples_module.ExampleSet.render_png
    monkeypatch.setattr(
        examples_module.ExampleSet, "render_png", lambda self, p: drawn.append(p) or real(self, p)
    )

    first = build_report(store_uri, "exp", tmp_path / "reports")[0].read_text()
    assert first.count('<img src="data:image/png;base64,') == 1 and len(drawn) == 1
    second = build_report(store_uri, "exp", tmp_path / "reports")[0].read_text()
    assert len(drawn) == 1, "a finished run's grid was drawn again instead of read from the report's cache"
    assert second.count('<img src="data:image/png;base64,') == 1


def test_missing_experiment_names_the_existing_ones(store_uri: str, tmp_path: Path) -> None:
    with pytest.raises(ReportError, match="'nope' does not exist.*warmup") as info:
        build_report(store_uri, "nope", tmp_path / "reports")
    assert isinstance(info.value, RobustCNNError) and info.value.exit_code == 2
    assert not (tmp_path / "reports").exists()


def test_missing_store_is_an_error_and_is_not_created(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / "mlflow.db"
    with pytest.raises(ReportError, match="no MLflow store at"):
        build_report(f"sqlite:///{missing}", None, tmp_path / "reports")
    assert not missing.exists() and not missing.parent.exists()


def test_cli_report_on_a_missing_experiment_is_one_line(store_uri: str, tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "robustcnn.cli", "report", "--experiment", "nope",
         "--tracking-uri", store_uri, "--out", str(tmp_path / "r")],
        cwd=tmp_path, text=True, capture_output=True, timeout=120,
    )
    assert out.returncode == 2
    assert out.stderr.startswith("robustcnn: error: experiment 'nope' does not exist"), out.stderr
    assert "warmup" in out.stderr and "Traceback" not in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1


# ---------------------------------------------------------------- robustcnn ui


def _processes() -> dict[int, tuple[str, int, int]]:
    """``{pid: (state, ppid, pgid)}`` from /proc (Linux)."""
    table = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        table[int(stat.parent.name)] = (fields[0], int(fields[1]), int(fields[2]))
    return table


def _listening(port: int) -> list[str]:
    """Local addresses (hex, as /proc/net/tcp* writes them) listening on ``port``."""
    found = []
    for name in ("tcp", "tcp6"):
        table = Path("/proc/net") / name
        if table.exists():
            for line in table.read_text().splitlines()[1:]:
                local, state = line.split()[1], line.split()[3]
                address, hex_port = local.rsplit(":", 1)
                if state == "0A" and int(hex_port, 16) == port:
                    found.append(address)
    return found


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="reads sockets and processes from Linux /proc")
def test_ui_serves_on_localhost_and_sigterm_stops_every_process(store_uri: str, tmp_path: Path) -> None:
    import signal
    import socket
    import time
    import urllib.request

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    out, err = (tmp_path / "ui.out").open("w"), (tmp_path / "ui.err").open("w")
    cli = subprocess.Popen(
        [sys.executable, "-m", "robustcnn.cli", "ui", "--port", str(port), "--tracking-uri", store_uri],
        cwd=tmp_path, stdout=out, stderr=err, text=True,
    )
    try:
        deadline, answer = time.monotonic() + 60, None
        while time.monotonic() < deadline and cli.poll() is None and answer is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as response:
                    answer = (response.status, response.read().decode())
            except OSError:
                time.sleep(0.5)
        assert answer == (200, "OK"), f"no answer within 60 s: {(tmp_path / 'ui.err').read_text()[-2000:]}"
        printed = (tmp_path / "ui.out").read_text()
        assert f"http://127.0.0.1:{port}" in printed and "bound to 127.0.0.1 only" in printed
        assert _listening(port) and set(_listening(port)) == {"0100007F"}, "bound to 127.0.0.1 only"
        server = next(pid for pid, (_, ppid, _) in _processes().items() if ppid == cli.pid)
        group = {pid for pid, (state, _, pgid) in _processes().items() if pgid == server and state != "Z"}
        assert len(group) >= 2, "mlflow ui runs several processes (server workers, job runner)"

        cli.send_signal(signal.SIGTERM)
        assert cli.wait(timeout=60) == 0
    finally:
        if cli.poll() is None:
            cli.kill()
        out.close()
        err.close()
    assert _listening(port) == []
    with socket.socket() as again:
        again.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT is fine, a listener not
        again.bind(("127.0.0.1", port))
        again.listen()
    # zombies are ignored: in a container whose PID 1 does not reap, orphans stay as <defunct>
    left = _processes().items()
    alive = {pid for pid, (state, _, pgid) in left if state != "Z" and (pid in group or pgid == server)}
    assert alive == set(), f"processes left behind: {alive}"


def test_a_face_runs_images_survive_the_report_cache(tmp_path: Path) -> None:
    from robustcnn.report.store import _read_cached, _write_cached

    face = run("face", face_results(), task="face_patch")
    face.images["face/patches/dodging/obama.png"] = b"\x89PNG-patch"
    _write_cached(tmp_path, face)
    again = run("face", None, task="face_patch")
    assert _read_cached(tmp_path, again) and again.images == face.images and again.results == face.results
    # an entry cached before face images were kept is read again from the store, not shown without them
    (tmp_path / "id-face.json").write_text(json.dumps({"results": face_results(), "config": {}}))
    assert not _read_cached(tmp_path, run("face", None, task="face_patch"))


def test_leaderboard_names_the_attacks_and_puts_the_verdict_second(mixed_runs: list[RunRecord]) -> None:
    table = leaderboard(split_runs("exp", mixed_runs).finished)
    assert table.columns[:2] == ["run", "verdict"], "the verdict never scrolls out of sight"
    attacks = table.columns.index("attacks")
    assert {row.cells[attacks].text for row in table.rows} == {"fgsm, pgd"}


def test_one_chart_overlays_every_defenses_worst_case_curve(mixed_runs: list[RunRecord]) -> None:
    from robustcnn.report.charts import overlaid_curves

    done = split_runs("exp", mixed_runs).finished
    chart = overlaid_curves(done)
    assert chart is not None and chart.chart_id == "chart-overlay"
    traces = chart.figure["data"]
    assert sorted(t["legendgroup"] for t in traces) == ["dropout", "none", "pgd_at"]
    assert all(t["y"] == list(r.result("worst_case_robust_accuracy")) for t, r in zip(
        traces, sorted(done, key=lambda r: str(r.defense)), strict=True))  # fmt: skip
    colours = {t["legendgroup"]: t["line"]["color"] for t in traces}
    assert len(set(colours.values())) == 3, "one colour per defense"
    assert overlaid_curves([]) is None


def test_minimal_perturbation_boxes_per_defense_skip_an_unbroken_median() -> None:
    from robustcnn.report.charts import minimal_perturbation_boxes

    found = {"norm": "linf", "q1": 0.05, "median": 0.1, "q3": 0.2, "unbroken_fraction": 0.0}
    runs = [
        run("plain", results("none", 0.98, [0.98, 0.5, 0.1, 0.0], minimal_perturbation=found)),
        run("at", results("pgd_at", 0.9, [0.9, 0.8, 0.7, 0.6], minimal_perturbation={**found, "q3": None})),
    ]
    chart = minimal_perturbation_boxes(runs)
    assert chart is not None
    (box,) = chart.figure["data"]
    assert box["type"] == "box" and box["x"] == ["none"] and box["median"] == [0.1] and box["q3"] == [0.2]
    assert minimal_perturbation_boxes(runs[1:]) is None


def test_attribution_stability_table_and_section(mixed_runs: list[RunRecord]) -> None:
    from robustcnn.report.tables import attribution_stability

    stable = {"stability": {"saliency": 0.8, "grad_cam": None}, "attack": "pgd", "eps": 0.3, "examples": 8}
    curve = [0.97, 0.4, 0.1, 0.0]
    with_maps = run("maps", results("l1", 0.97, curve, attributions={**stable, "seconds": 0.1}))
    table = attribution_stability([*split_runs("exp", mixed_runs).finished, with_maps])
    assert table.columns[-4:] == ["saliency", "grad_cam", "examples", "seconds"]
    assert len(table.rows) == 1 and [c.text for c in table.rows[0].cells[4:6]] == ["0.800", "–"]
    page = render(split_runs("exp", [with_maps]), [], "", store="s", generated="now")
    assert 'id="attributions-table"' in page and 'href="#attributions"' in page
    # no chart to compare, no maps (an audit, runs without attacks): neither section, nor its link
    bare = render(split_runs("exp", mixed_runs), [], "", store="s", generated="now")
    assert 'id="attributions"' not in bare and 'href="#attributions"' not in bare
    assert 'id="compare"' not in bare and 'href="#compare"' not in bare and 'href="#leaderboard"' in bare


def test_defense_comparison_bars_carry_the_cost_under_the_name(mixed_runs: list[RunRecord]) -> None:
    from robustcnn.report.charts import defense_comparison

    done = split_runs("exp", mixed_runs).finished
    done[1].results["defense_report"] = {"epoch_cost_ratio": 11.04}  # type: ignore[index]
    chart = defense_comparison(done)
    assert chart is not None
    names = [t["name"] for t in chart.figure["data"]]
    assert names == ["clean", "robust @ ε=0.1", "robust @ ε=0.2", "robust @ ε=0.3"]
    expected = ["dropout<br>cost not measured", "none<br>standard", "pgd_at<br>11.0× epoch"]
    assert chart.figure["data"][0]["x"] == expected
    assert chart.figure["data"][3]["y"] == [0.9, 0.0, 0.6]


def _gradients(seed: int, k: int = 3) -> Any:
    """A hand-made GradientSet: ``seed`` picks the images (same seed, same images), noise gradients."""
    import torch

    from robustcnn.report.aligned import GradientSet

    images = torch.rand(k, 1, 8, 8, generator=torch.Generator().manual_seed(seed))
    gradients = torch.randn(k, 1, 8, 8, generator=torch.Generator().manual_seed(seed + 100))
    return GradientSet(images.half().float(), torch.arange(k), gradients)


def test_input_gradients_one_row_per_defense_on_the_same_images(mixed_runs: list[RunRecord]) -> None:
    from PIL import Image

    from robustcnn.report.aligned import aligned_grid

    curve = [0.9, 0.5, 0.2, 0.0]
    plain, robust, other = (run(n, results(d, 0.9, curve)) for n, d in
                            (("plain", "none"), ("at", "pgd_at"), ("elsewhere", "l1")))  # fmt: skip
    plain.gradients, robust.gradients, other.gradients = _gradients(0), _gradients(0), _gradients(7)
    grid = aligned_grid([robust, other, plain, *split_runs("exp", mixed_runs).finished])
    assert grid is not None and grid.rows == ["none", "pgd_at"], "sorted by defense, runs without none"
    assert grid.left_out == ["elsewhere"], "another image set is named, never drawn beside the others"
    one_row = aligned_grid([plain])
    assert one_row is not None
    pictures = [Image.open(io.BytesIO(g.png)) for g in (grid, one_row)]
    assert pictures[0].height > pictures[1].height, "a row per run drawn"
    avg = run("avg", results("none", 0.9, curve, model_label="lenet5 pooling=avg"))
    avg.gradients = _gradients(0)
    both = aligned_grid([plain, avg])
    assert both is not None and both.rows == ["none lenet5", "none lenet5 pooling=avg"], both.rows
    assert aligned_grid(split_runs("exp", mixed_runs).finished) is None

    page = render(split_runs("exp", [robust, plain, other]), [], "", store="s", generated="now")
    assert 'id="gradients"' in page and 'href="#gradients"' in page and "not drawn" in page
    bare = render(split_runs("exp", mixed_runs), [], "", store="s", generated="now")
    assert 'id="gradients"' not in bare and 'href="#gradients"' not in bare


def test_a_gradients_file_round_trips_and_anything_else_is_refused(tmp_path: Path) -> None:
    import torch

    from robustcnn.report.aligned import GradientSet
    from robustcnn.report.examples import ExampleSet
    from robustcnn.report.store import _read_cached, _write_cached

    kept = _gradients(0)
    again = GradientSet.load(kept.save(tmp_path / "g.safetensors"))
    assert torch.equal(again.images, kept.images) and torch.equal(again.labels, kept.labels)
    torch.testing.assert_close(again.gradients, kept.gradients, rtol=1e-3, atol=1e-3)  # float16 on disk
    examples = ExampleSet(kept.images, kept.images[None], (0.1,)).save(tmp_path / "e.safetensors")
    with pytest.raises(ReportError, match="not a robustcnn gradients file"):
        GradientSet.load(examples)
    with pytest.raises(ReportError, match="do not fit the images"):
        GradientSet(kept.images, kept.labels, kept.gradients[:2])
    # the report's cache keeps them; a damaged cached file sends the run back to the store
    record = run("plain", results("none", 0.9, [0.9, 0.5, 0.2, 0.0]))
    record.gradients = kept
    _write_cached(tmp_path / "cache", record)
    cached = run("plain", None)
    assert _read_cached(tmp_path / "cache", cached) and cached.gradients is not None
    assert torch.equal(cached.gradients.images, kept.images)
    (tmp_path / "cache" / "id-plain.gradients.safetensors").write_bytes(b"damaged")
    assert not _read_cached(tmp_path / "cache", run("plain", None))
