"""README's measured figures agree with the committed JSON they cite, and reports/ holds no hand edits.

Why: a figure typed into the README (or into a benchmark JSON) drifts from the run that measured it.
tools/readme_figures.py renders every figure block from its JSON; benchmarks/_provenance.py stamps
every benchmark JSON with a digest of its content. These tests fail on a figure or a field changed
by hand.
"""

from __future__ import annotations

import json
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "tools"), str(ROOT / "benchmarks")]

import _provenance  # noqa: E402
import readme_figures  # noqa: E402

README = (ROOT / "README.md").read_text()

#: Benchmark JSON written before reports were stamped (benchmarks/_provenance.py). Their fields were
#: compared by hand with what their scripts write; each leaves this list when its script re-runs.
UNSTAMPED = {"defenses.json", "soak.json", "train_throughput.json"}


def test_every_readme_figure_agrees_with_its_json() -> None:
    assert readme_figures.check(README) == []


def test_a_figure_altered_in_the_readme_fails_the_check(tmp_path: Path) -> None:
    block = README.split("<!-- figures:sweep_overhead -->")[1].split("<!-- /figures:sweep_overhead -->")[0]
    median = json.loads((ROOT / "reports/benchmarks/sweep_overhead.json").read_text())["results"]
    figure = f"{median['overhead_per_job_seconds']['median']} s per job"
    assert figure in block
    altered = README.replace(figure, "0.1 s per job", 1)
    problems = readme_figures.check(altered)
    assert len(problems) == 1 and "'sweep_overhead'" in problems[0] and "sweep_overhead.json" in problems[0]

    copy = tmp_path / "README.md"
    copy.write_text(altered)
    assert readme_figures.main(["--check", "--readme", str(copy)]) == 1
    assert readme_figures.main(["--readme", str(copy)]) == 0  # rendering puts the measured figure back
    assert copy.read_text() == README


def test_a_changed_json_fails_the_check_until_the_readme_is_rendered(tmp_path: Path) -> None:
    for figure in readme_figures.FIGURES.values():
        (tmp_path / figure.source).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / figure.source, tmp_path / figure.source)
    defenses = tmp_path / "reports/benchmarks/defenses.json"
    report = json.loads(defenses.read_text())
    report["results"]["pgd_10"]["cost_vs_standard"] = 99.5
    defenses.write_text(json.dumps(report))
    problems = readme_figures.check(README, root=tmp_path)
    assert [p.split(" disagrees")[0] for p in problems] == ["README figure 'defense_epoch_cost'"]
    assert "| 99.5 |" in readme_figures.render(README, root=tmp_path)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda t: t.replace("<!-- /figures:face_smoke -->", "", 1), "has no closing"),
        (lambda t: t + "\n<!-- figures:nope -->\nx\n<!-- /figures:nope -->\n", "does not know"),
        (lambda t: t.replace("<!-- figures:sweep_overhead -->", "", 1), None),
    ],
    ids=["unclosed", "unknown", "removed"],
)
def test_broken_markers_are_one_error_line(
    edit: Callable[[str], str], message: str | None, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    copy = tmp_path / "README.md"
    copy.write_text(edit(README))
    code = readme_figures.main(["--check", "--readme", str(copy)])
    err = capsys.readouterr().err.strip()
    if message is None:  # a figure block deleted with its markers: the check names what README lacks
        assert code == 1 and "lacks the figure block 'sweep_overhead'" in err
    else:
        assert code == 2 and len(err.splitlines()) == 1 and message in err


def test_a_missing_field_is_one_error_not_a_traceback(tmp_path: Path) -> None:
    (tmp_path / "reports/runs").mkdir(parents=True)
    (tmp_path / "reports/runs/face_smoke.json").write_text("{}")
    with pytest.raises(readme_figures.FiguresError, match="face_smoke.json lacks what it renders"):
        readme_figures.rendered("face_smoke", "", tmp_path)


def test_every_benchmark_json_was_written_whole_by_its_script() -> None:
    reports = sorted((ROOT / "reports/benchmarks").glob("*.json"))
    assert reports
    for path in reports:
        payload = json.loads(path.read_text())
        if path.name in UNSTAMPED:  # a re-run stamps it: then it must leave the list
            assert "sha256" not in payload, f"{path.name} is stamped now: remove it from UNSTAMPED"
        else:
            assert _provenance.verify(payload) is None, f"{path.name}: {_provenance.verify(payload)}"
    assert not UNSTAMPED - {path.name for path in reports}, "UNSTAMPED names a report that is gone"


def test_a_field_edited_after_the_script_wrote_it_shows(tmp_path: Path) -> None:
    import _report

    out = tmp_path / "bench.json"
    _report.write_report(out, "bench", {"robust_accuracy": 0.615, "cpu_seconds": 12.5}, None, images=10)
    payload = json.loads(out.read_text())
    assert _provenance.verify(payload) is None
    stamp = payload["written_by"]
    assert {"script", "argv", "commit", "cpu_seconds", "load_average_at_start", "load_average_at_end"} <= set(
        stamp
    )
    for edit in (
        lambda p: p["results"].__setitem__("cpu_seconds", 2195.0),  # a figure typed in
        lambda p: p["results"].__setitem__("measured", "a note"),  # a field added by hand
    ):
        edited = json.loads(out.read_text())
        edit(edited)
        assert "does not match" in str(_provenance.verify(edited))
    del payload["sha256"]
    assert "no written_by/sha256 stamp" in str(_provenance.verify(payload))


def test_audit_benchmark_reuses_autoattack_only_from_its_own_unedited_output(tmp_path: Path) -> None:
    import _report
    import audit_vs_autoattack as bench

    header = {"weights_key": "k", "weights_sha256": "a" * 64, "images": 10, "eps": bench.EPS}
    figures = {"robust_accuracy": 0.6, "seconds": 100.0, "cpu_seconds": 150.0}
    out = tmp_path / "audit_vs_autoattack.json"
    models = {"pgd_at_20": {**header, "autoattack": figures}}
    _report.write_report(out, "audit_vs_autoattack", {"models": models}, None)
    reused = bench.reusable_autoattack(out, "pgd_at_20", header)
    assert reused is not None and reused["cpu_seconds"] == 150.0
    assert reused["reused_from"]["sha256"] == json.loads(out.read_text())["sha256"]
    assert bench.reusable_autoattack(out, "pgd_at_20", {**header, "images": 20}) is None  # other images
    assert bench.reusable_autoattack(out, "pgd_at_preset", header) is None  # another model
    # the same training config retrained elsewhere: same cache key, other weights
    assert bench.reusable_autoattack(out, "pgd_at_20", {**header, "weights_sha256": "b" * 64}) is None

    edited = json.loads(out.read_text())
    edited["results"]["models"]["pgd_at_20"]["autoattack"]["cpu_seconds"] = 2195.0  # a figure typed in
    out.write_text(json.dumps(edited))
    assert bench.reusable_autoattack(out, "pgd_at_20", header) is None

    audit = {"robust_accuracy": 0.61, "seconds": 10.0, "cpu_seconds": 9.0}
    targets = bench.targets(audit, figures)
    assert targets["cpu_time_fraction"] == 0.06 and targets["time_met"] and targets["gap_points"] == 1.0
