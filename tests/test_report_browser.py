"""The HTML dashboard of real jobs, opened in headless Chromium (Debian's, driven by Playwright).

Asserts what a reader sees: the leaderboard's rows, every chart drawn, images decoded, no console
error, no request beyond the file itself (the page must work offline), and that a user's run name
stays text. A copy of the page that loads plotly.js from a CDN must draw nothing: proof that the
checks here would catch a page that needs the network.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

CHROMIUM = "/usr/bin/chromium"
ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "reports" / "test-artifacts"
EVIL_NAME = "<img src=x onerror=alert(1)>"
#: Tiny real jobs: a sliver of mnist5k, one short epoch, 32 attacked images.
TINY = [
    "experiment=smoke",
    "data.max_train=256",
    "data.max_test=64",
    "training.epochs=1",
    "training.max_batches=4",
    "training.batch_size=32",
    "eval.attack_samples=32",
    "checks.probe_samples=32",
    "attack=[fgsm,pgd]",
]

#: [scroll width, visible width] of the leaderboard's scroll box, its right edge, the window's width.
LEADERBOARD_FIT = (
    "(() => { const t = document.getElementById('leaderboard-table'); const w = t.parentElement;"
    " return [w.scrollWidth, w.clientWidth, t.getBoundingClientRect().right,"
    " document.documentElement.clientWidth]; })()"
)

pytestmark = pytest.mark.slow

if not Path(CHROMIUM).exists():
    pytest.skip(
        f"{CHROMIUM} not found: install Debian's Chromium, `apt-get install -y chromium` (.ci/run does)",
        allow_module_level=True,
    )
sync_api = pytest.importorskip(
    "playwright.sync_api",
    reason="needs Playwright for Python: pip install -e '.[dev]' (never `playwright install`)",
)


@dataclass
class Store:
    uri: str
    root: Path
    report: Path
    run_ids: list[str] = field(default_factory=list)


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory, empty_store: Path) -> Iterator[Store]:
    """Two real jobs (defenses none and dropout), a sweep parent and a failed run; then the report."""
    import shutil

    from omegaconf import OmegaConf

    from robustcnn.config import compose
    from robustcnn.jobs.dispatch import run_job
    from robustcnn.report import build_report
    from robustcnn.tracking.store import TrackingStore

    root = tmp_path_factory.mktemp("report-store")
    shutil.copy(empty_store, root / "mlflow.db")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        mp.setenv("ROBUSTCNN_CACHE_DIR", str(root / "cache"))
        mp.setenv("GIT_PYTHON_REFRESH", "quiet")
        mp.chdir(root)
        made = Store(uri, root, root / "reports" / "smoke" / "index.html")
        for defense, name in (("none", None), ("dropout", EVIL_NAME)):
            cfg = compose([*TINY, f"defense={defense}"])
            if name is not None:
                OmegaConf.update(cfg, "tracking.run_name", name)
            results = run_job(cfg, output_dir=root / f"out-{defense}", progress=False)
            made.run_ids.append(results["mlflow_run_id"])
            assert results["attributions"]["methods"] == ["saliency", "integrated_gradients", "grad_cam"]
            assert (root / f"out-{defense}" / "attributions.png").is_file()
            assert (root / f"out-{defense}" / "gradients.safetensors").is_file()
        with TrackingStore.at(uri).start_run("smoke", "sweep-parent", {"robustcnn.sweep": "true"}):
            pass
        dying = TrackingStore.at(uri).start_run("smoke", "died-in-training", {"model": "lenet5"})
        with pytest.raises(RuntimeError), dying:
            raise RuntimeError("killed")
        written = build_report(uri, "smoke", root / "reports")
    assert written == [made.report]
    yield made


@dataclass
class Visit:
    """What happened while a page was open."""

    console_errors: list[str] = field(default_factory=list)
    requests: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    dialogs: list[str] = field(default_factory=list)


def visit(path: Path, check: Callable[..., None], wait_for_charts: int = 0) -> Visit:
    """Open ``path`` with every non-file request aborted (offline), run ``check(page)``, close."""
    seen = Visit()
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.on("console", lambda m: seen.console_errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: seen.console_errors.append(str(e)))
            page.on("request", lambda r: seen.requests.append(r.url))
            page.on("requestfailed", lambda r: seen.failed.append(r.url))

            def on_dialog(dialog: object) -> None:
                seen.dialogs.append(dialog.message)  # type: ignore[attr-defined]
                dialog.dismiss()  # type: ignore[attr-defined]

            page.on("dialog", on_dialog)

            def offline(route: object) -> None:
                url = route.request.url  # type: ignore[attr-defined]
                if url.startswith(("file:", "data:")):
                    route.continue_()  # type: ignore[attr-defined]
                else:
                    route.abort("internetdisconnected")  # type: ignore[attr-defined]

            page.route("**/*", offline)
            page.goto(path.as_uri(), wait_until="load")
            if wait_for_charts:
                drawn = f"document.querySelectorAll('.chart .main-svg').length >= {wait_for_charts}"
                page.wait_for_function(drawn, timeout=30_000)
            else:
                page.wait_for_timeout(1500)
            check(page)
        finally:
            browser.close()
    return seen


def test_report_renders_offline_in_chromium(store: Store) -> None:
    n_charts = 5  # curves of none and dropout, the defenses' bars and overlaid curves, the trade-off
    looked: dict[str, object] = {}

    def check(page: object) -> None:
        p = page  # type: ignore[assignment]
        looked["rows"] = p.locator("#leaderboard-table tbody tr").count()
        looked["incomplete"] = p.locator("#incomplete-table tbody tr").count()
        looked["charts"] = p.locator(".chart").count()
        looked["drawn"] = p.locator(".chart:has(.main-svg)").count()
        looked["images_ok"] = p.evaluate(
            "Array.from(document.images).length > 0 && "
            "Array.from(document.images).every(i => i.complete && i.naturalWidth > 0)"
        )
        looked["evil_as_text"] = p.locator("#leaderboard-table td", has_text=EVIL_NAME).count()
        looked["overlay"] = p.locator("#compare .chart:has(.main-svg)").count()
        looked["overlay_lines"] = p.locator("#chart-overlay .scatterlayer .trace").count()
        looked["attribution_rows"] = p.locator("#attributions-table tbody tr").count()
        looked["attribution_maps"] = p.evaluate(
            "Array.from(document.querySelectorAll('#attributions img'))"
            ".filter(i => i.complete && i.naturalWidth > 0).length"
        )
        looked["gradient_grids"] = p.evaluate(
            "Array.from(document.querySelectorAll('#gradients img'))"
            ".filter(i => i.complete && i.naturalWidth > 0).length"
        )
        looked["gradient_rows"] = p.locator("#gradients figcaption").inner_text()
        looked["gradients_link"] = p.locator('nav a[href="#gradients"]').count()
        # the leaderboard fits a 1400 px window: no sideways scroll, the verdict column in view
        looked["fits"] = p.evaluate(LEADERBOARD_FIT)
        verdict_th = p.locator("#leaderboard-table th", has_text="verdict")
        right = "th => th.getBoundingClientRect().right"
        looked["verdict_right"] = p.evaluate(right, verdict_th.element_handle())
        # a sanity-check row with a failed check is visibly marked (none expected, but never unmarked)
        looked["unmarked_failures"] = p.locator("#checks-table tr:not(.flagged) td.fail").count()
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        p.screenshot(path=str(ARTIFACTS / "report.png"), full_page=True)  # the default order
        clean = p.locator("#leaderboard-table th", has_text="clean acc.")
        column = int(p.evaluate("th => th.cellIndex", clean.element_handle()))
        clean.click()
        first = p.locator("#leaderboard-table tbody tr").evaluate_all(
            f"rows => rows.map(r => parseFloat(r.cells[{column}].dataset.sort))"
        )
        clean.click()
        second = p.locator("#leaderboard-table tbody tr").evaluate_all(
            f"rows => rows.map(r => parseFloat(r.cells[{column}].dataset.sort))"
        )
        looked["sorted"] = (first, second)

    seen = visit(store.report, check, wait_for_charts=n_charts)
    assert looked["rows"] == 2, "one leaderboard row per finished job (parent and failed run excluded)"
    assert looked["incomplete"] == 1
    assert looked["charts"] == n_charts and looked["drawn"] == n_charts, looked
    assert looked["images_ok"], "every embedded example grid decodes"
    assert looked["overlay"] == 2 and looked["overlay_lines"] == 2, "bars, then one line per run in one chart"
    assert looked["attribution_rows"] == 2 and looked["attribution_maps"] == 2, looked
    assert looked["gradient_grids"] == 1 and looked["gradients_link"] == 1, "one grid, a row per defense"
    assert looked["gradient_rows"] == "rows: dropout; none", looked["gradient_rows"]
    scroll_width, client_width, table_right, page_width = looked["fits"]  # type: ignore[misc]
    assert scroll_width <= client_width and table_right <= page_width <= 1400, looked["fits"]
    assert looked["verdict_right"] <= page_width, "the verdict column is in view without scrolling"
    assert looked["unmarked_failures"] == 0
    assert looked["evil_as_text"] == 1 and seen.dialogs == [], "a run name is shown as text, never run"
    first, second = looked["sorted"]  # type: ignore[misc]
    assert first == sorted(first, reverse=True) and second == sorted(second), looked["sorted"]
    assert seen.console_errors == [], seen.console_errors
    assert seen.failed == [], seen.failed
    outside = [u for u in seen.requests if not u.startswith(("file:", "data:"))]
    assert outside == [], f"the page must not touch the network: {outside}"
    assert (ARTIFACTS / "report.png").stat().st_size > 10_000


def test_a_page_that_loads_plotly_from_a_cdn_draws_nothing_offline(store: Store, tmp_path: Path) -> None:
    """Negative control: the same page with plotly.js from a CDN (and no CSP) fails the checks above."""
    html = store.report.read_text()
    start = html.index('<script id="plotly-js">')
    end = html.index("</script>", start) + len("</script>")
    cdn = '<script src="https://cdn.plot.ly/plotly-2.35.2.min.js"></script>'
    html = html[:start] + cdn + html[end:]
    html = html.replace('<meta http-equiv="Content-Security-Policy"', '<meta name="no-csp"', 1)
    broken = tmp_path / "cdn.html"
    broken.write_text(html)
    drawn: dict[str, object] = {}

    def check(page: object) -> None:
        drawn["svg"] = page.locator(".chart .main-svg").count()  # type: ignore[attr-defined]
        drawn["rows"] = page.locator("#leaderboard-table tbody tr").count()  # type: ignore[attr-defined]

    seen = visit(broken, check)
    assert drawn == {"svg": 0, "rows": 2}, drawn  # the tables are there, the charts are not
    assert any(u.startswith("https://cdn.plot.ly/") for u in seen.requests), seen.requests
    assert any(u.startswith("https://cdn.plot.ly/") for u in seen.failed), seen.failed


@pytest.fixture(scope="module")
def face_report(tmp_path_factory: pytest.TempPathFactory, empty_store: Path) -> Path:
    """A tiny real face study (obama dodging and impersonating biden) and its experiment's report."""
    import shutil

    from face_assets import require_face_assets
    from test_face_job import TINY_FACE

    from robustcnn.config import compose
    from robustcnn.jobs.dispatch import run_job
    from robustcnn.report import build_report

    require_face_assets()
    root = tmp_path_factory.mktemp("face-report-store")
    shutil.copy(empty_store, root / "mlflow.db")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        mp.setenv("GIT_PYTHON_REFRESH", "quiet")
        mp.chdir(root)
        run_job(compose([*TINY_FACE, "tracking.experiment=faces"]), output_dir=root / "out", progress=False)
        (written,) = build_report(uri, "faces", root / "reports")
    return written


def test_face_section_renders_in_chromium(face_report: Path) -> None:
    looked: dict[str, object] = {}

    def check(page: object) -> None:
        p = page  # type: ignore[assignment]
        looked["sections"] = p.locator("#face-patch .face-run").count()
        looked["leaderboard"] = p.locator("#leaderboard-table tbody tr").count()
        looked["patches"] = p.locator("#face-patches-0 tbody tr").count()
        looked["figures"] = p.locator("#face-figures-0 tbody tr td:nth-child(2)").all_inner_texts()
        looked["held_out"] = p.locator("#face-patches-0 tbody tr td:nth-child(4)").all_inner_texts()
        looked["note"] = p.locator("#face-patch .face-run .note").first.inner_text()
        looked["saliency_columns"] = p.locator("#face-patches-0 th", has_text="saliency in patch").count()
        looked["images"] = p.evaluate(
            "Array.from(document.querySelectorAll('#face-patch img'))"
            ".map(i => i.complete && i.naturalWidth > 0)"
        )
        p.locator("#face-patch").screenshot(path=str(ARTIFACTS / "report-face.png"))

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    seen = visit(face_report, check)
    assert looked["sections"] == 1 and looked["leaderboard"] == 0, "a face run is no classifier row"
    assert looked["patches"] == 2  # obama's dodging patch, obama as biden
    assert looked["held_out"] == ["photos", "transforms_only"]
    assert sorted(looked["figures"]) == ["photos", "transforms_only", "transforms_only"]  # type: ignore[type-var]
    assert "held-out impostor pairs (95% CI" in str(looked["note"])
    images = looked["images"]
    assert isinstance(images, list) and len(images) == 4 and all(images), images  # faces, saliency, 2 patches
    assert looked["saliency_columns"] == 2, "the share of saliency in the patch, clean and patched"
    assert seen.console_errors == [] and seen.failed == []
    assert [u for u in seen.requests if not u.startswith(("file:", "data:"))] == []


def test_a_leaderboard_whose_cells_cannot_wrap_fails_the_fit_check(store: Store, tmp_path: Path) -> None:
    """Negative control for the 1400 px check: the same page with unwrappable cells scrolls sideways."""
    rule = "#leaderboard-table td,#leaderboard-table th{white-space:nowrap}</style>"
    stiff = tmp_path / "nowrap.html"
    stiff.write_text(store.report.read_text().replace("</style>", rule, 1))
    measured: dict[str, object] = {}

    def check(page: object) -> None:
        measured["fit"] = page.evaluate(LEADERBOARD_FIT)  # type: ignore[attr-defined]

    visit(stiff, check)
    scroll_width, client_width, _, _ = measured["fit"]  # type: ignore[misc]
    assert scroll_width > client_width, measured


def test_cli_report_writes_the_page(store: Store, tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "robustcnn.cli", "report", "--out", str(tmp_path / "r")],
        cwd=tmp_path,
        env={**os.environ, "MLFLOW_TRACKING_URI": store.uri},
        text=True,
        capture_output=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    printed = [Path(line) for line in out.stdout.splitlines()]
    assert tmp_path / "r" / "smoke" / "index.html" in printed and all(p.is_file() for p in printed)
    page = (tmp_path / "r" / "smoke" / "index.html").read_text()
    assert all(run_id in page for run_id in store.run_ids)
