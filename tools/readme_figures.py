"""Render README's measured figures from the committed JSON they cite; ``--check`` says which disagree.

Why: a number typed into the README drifts from the run that measured it (a re-run, a changed
default, a figure copied from another machine). Every measured figure in README.md sits between
``<!-- figures:NAME -->`` and ``<!-- /figures:NAME -->``; the text between is exactly what
:data:`FIGURES` renders from the JSON named there, so it can only be changed by re-running the script
that wrote the JSON (and this tool). tests/test_readme_figures.py runs ``--check`` on the README.

    python tools/readme_figures.py            # rewrite every figure block from its JSON
    python tools/readme_figures.py --check    # exit 1, naming each block that disagrees with its JSON
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import textwrap
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from robustcnn.errors import ReportError

ROOT = Path(__file__).resolve().parent.parent
WIDTH = 105
_BLOCK = re.compile(
    r"^(?P<indent>[ \t]*)<!-- figures:(?P<name>[\w.-]+) -->\n"
    r"(?P<body>.*?)^[ \t]*<!-- /figures:(?P=name) -->$",
    re.MULTILINE | re.DOTALL,
)
_OPENING = re.compile(r"^[ \t]*<!-- figures:([\w.-]+) -->$", re.MULTILINE)  # a marker is a line of its own


class FiguresError(ReportError):
    """The README's figure markers are broken, or a cited JSON is missing, unreadable or incomplete."""


@dataclass(frozen=True)
class Figure:
    """One figure block: the JSON it is rendered from, and how (paragraphs, wrapped, and tables)."""

    source: str
    render: Callable[[dict[str, Any]], str]


def sweep_overhead(report: dict[str, Any]) -> str:
    results, machine = report["results"], report["machine"]
    return (
        f"medians of {len(results['rounds'])} rounds of a {results['jobs']}-job `{report['job']}` sweep "
        f"({machine['cpu_threads']} CPU threads; load average {results['load_average_before'][0]} before, "
        f"{results['load_average_after'][0]} after; {report['date'][:10]}): "
        f"{results['overhead_per_job_seconds']['median']} s per job beyond its training and attacks "
        f"(each job is composed once, logs in a few batched MLflow calls and draws nothing), "
        f"{results['overhead_fixed_seconds']['median']} s per sweep ({results['import_floor_seconds']} s "
        f"of it is importing torch, Hydra and mlflow), and {results['rerun_seconds']['median']} s to "
        f"re-run a finished sweep (every job reused)."
    )


def demo_time(report: dict[str, Any]) -> str:
    demo, machine = report["results"]["demo"], report["machine"]
    return (
        f"`make demo` took {demo['first_seconds'] / 60:.1f} minutes from an empty weight cache and store "
        f"({machine['cpu_threads']} CPU threads, `benchmarks/sweep_overhead.py --demo`, "
        f"{report['date'][:10]}); "
        f"run again, with every job reused, {demo['rerun_seconds']:.1f} s."
    )


def defense_epoch_cost(report: dict[str, Any]) -> str:
    machine = report["machine"]
    rows = [
        f"Epoch time against a standard epoch (`benchmarks/defenses.py`, "
        f"`reports/benchmarks/defenses.json`: {report['model']} on {report['images_per_epoch']} "
        f"{report['data']} images per epoch, batch {report['batch_size']}, best of {report['repeats']} "
        f"rounds, {machine['cpu_threads']} CPU thread(s), load average {machine['load_average'][0]}; "
        f"{report['date'][:10]}):",
        "",
        "| training | gradient passes per batch | epoch cost vs standard | overhead beyond the passes |",
        "|---|---|---|---|",
    ]
    for name, row in report["results"].items():
        rows.append(
            f"| `{name}` | {row['gradient_passes_per_batch']} | {row['cost_vs_standard']} | "
            f"{row['overhead_ratio']} |"
        )
    return "\n".join(rows)


def face_port_crops(fixture: dict[str, Any]) -> str:
    crops = fixture["crops"]
    square = sum(1 for crop in crops if crop["kind"] == "crop")
    return (
        f"{len(crops)} entries from real photos, {square} square 150x150 crops and {len(crops) - square} "
        "odd-sized face regions that the model pads and resizes as face-api does."
    )


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


#: What each face figure was judged on, in words (results.json ``figures[].held_out``).
FACE_JUDGED_ON = {
    "transforms_only": "the photos it was optimised on (only the draws held out)",
    "photos": "photos the optimisation never saw, against the enrolled template",
}


def _face_patch_row(patch: dict[str, Any]) -> str:
    """One patch: who and what for, in sample and on held-out photos, each next to its random patch."""
    name = patch["attacker"] + (f" as {patch['target']}" if patch["target"] else "")
    held, inside = patch["held_out_photos"], patch["in_sample"]

    def pair(evaluation: dict[str, Any] | None) -> str:
        if evaluation is None:
            return "-"
        return f"{_pct(evaluation['success_rate'])} / {_pct(evaluation['random_patch']['success_rate'])}"

    verdict = "yes" if patch["beats_baseline"] else "NO"
    return (
        f"| {patch['goal']} {name} | {patch['held_out']} | {pair(inside)} | {pair(held)} "
        f"| {verdict} (p = {patch['p_value']:.2g}) |"
    )


def face_smoke(run: dict[str, Any]) -> str:
    settings, verification = run["settings"], run["verification"]
    held, fit = verification["held_out"], verification["fit"]
    low, high = verification["false_accept_interval"]
    far = _pct(verification["target_far"])
    rows = [
        f"`robustcnn run experiment=face_smoke` (attacker {', '.join(run['attackers'])}, "
        f"{len(run['patches'])} patches, {settings['steps']} steps, EOT {settings['eot_samples']}, "
        f"{run['eval_draws']} held-out draws per photo; `reports/runs/face_smoke.json`, its results.json "
        f"unchanged; {run['environment']['threads']} CPU threads, {run['job_seconds']:.0f} s on a "
        f"shared machine; {run['finished_at'][:10]}): the threshold, fitted at FAR {far} on the "
        f"{fit['pairs']} impostor pairs of the people outside the study, is {run['threshold']:.3f}; on "
        f"the {held['pairs']} impostor pairs the fit never saw it accepts {_pct(held['false_accept_rate'])} "
        f"(95% CI {_pct(low)} to {_pct(high)}). Each patch is compared with its own random patch of the "
        f"same eyeglass mask ({run['mask_area_percent']:.1f}% of the crop) on the same draws.",
        "",
        "| goal | held out | judged on | success | random patch | no patch "
        "| patches beating their random one |",
        "|---|---|---|---|---|---|---|",
    ]
    for figure in run["figures"]:
        rows.append(
            f"| {figure['goal']} | {figure['held_out']} | {FACE_JUDGED_ON[figure['held_out']]} "
            f"| {_pct(figure['success_rate'])} | {_pct(figure['random_patch_success_rate'])} "
            f"| {_pct(figure['clean_success_rate'])} | {figure['beat_baseline']} of {figure['patches']} |"
        )
    published, fitted = verification["published"], verification["calibrated"]
    rows += [
        "",
        "| patch | held out | in sample (patch / random) | held-out photos (patch / random) "
        "| beats its random patch |",
        "|---|---|---|---|---|",
        *(_face_patch_row(patch) for patch in run["patches"]),
        "",
        f"On the same held-out impostor pairs face-api's published 0.6 accepts "
        f"{_pct(published['false_accept_rate'])}; of the {verification['genuine_pairs']} genuine pairs "
        f"({verification['genuine_source']}) it rejects {_pct(published['false_reject_rate'])}, the fitted "
        f"threshold {_pct(fitted['false_reject_rate'])}.",
    ]
    return "\n".join(rows)


def face_transfer(run: dict[str, Any]) -> str:
    """The smoke study's patches on the recognizers they were never optimised against."""
    members = [member["recognizer"] for member in run.get("ensemble") or [{"recognizer": run["model"]}]]
    if len(members) == 1:
        intro = f"The same `face_smoke` run's {len(run['patches'])} patches (optimised against {members[0]})"
    else:
        intro = (
            f"`robustcnn run experiment=face_smoke face.recognizers=[{','.join(members)}]` "
            "(`reports/runs/face_smoke_ensemble.json`, its results.json unchanged; "
            f"{run['job_seconds']:.0f} s on a shared machine; {run['finished_at'][:10]}): "
            f"{len(run['patches'])} patches, each optimised against {' and '.join(members)} at once,"
        )
    rows = [
        f"{intro} on the recognizers the optimisation never saw, each with its own threshold fitted at the "
        "same FAR apart from the study:",
        "",
        "| recognizer | threshold (held-out FAR, genuine pairs rejected) | goal | held out | success "
        "| random patch | no patch | patches beating their random one |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, entry in run["transfer"].items():
        verification = entry["verification"]
        rejected = verification["calibrated"]["false_reject_rate"]
        for row in entry["figures"]:
            rows.append(
                f"| {name} | {entry['threshold']:.3f} ({_pct(entry['false_accept_rate'])}, "
                f"{_pct(rejected)} of {verification['genuine_pairs']}) | {row['goal']} | {row['held_out']} "
                f"| {_pct(row['success_rate'])} | {_pct(row['random_patch_success_rate'])} "
                f"| {_pct(row['clean_success_rate'])} | {row['beat_baseline']} of {row['patches']} |"
            )
    return "\n".join(rows)


def _per_seed(values: list[float]) -> str:
    return " / ".join(_pct(value) for value in values)


def _transfer_row(
    mask: str, recognizer: str, evaluations: list[dict[str, Any]], random_rates: list[float]
) -> str:
    """One recognizer's dodging evaluations, one per seed: success next to the random patch and the bare
    face, and how many beat their random patch (the paired test, p < 0.05)."""
    beats = sum(bool(e["beats_baseline"]) for e in evaluations)
    return (
        f"| {mask} | {recognizer} | {evaluations[0]['held_out']} "
        f"| {_per_seed([e['success_rate'] for e in evaluations])} | {_per_seed(random_rates)} "
        f"| {_per_seed([e['clean_success_rate'] for e in evaluations])} | {beats} of {len(evaluations)} |"
    )


def _dodging(run: dict[str, Any]) -> dict[str, Any]:
    return next(patch for patch in run["patches"] if patch["goal"] == "dodging")


def face_transfer_masks(report: dict[str, Any]) -> str:
    """The face_smoke study per shipped mask and seed: the dodging patch on the held-out photo, on the
    recognizer it was optimised against and on those it never saw."""
    masks, machine, seeds = report["results"], report["machine"], report["seeds"]
    first = next(iter(next(iter(masks.values())).values()))
    photos = [
        split["evaluation"][0]
        for run in next(iter(masks.values())).values()
        for split in run["photo_split"]["identities"].values()
    ]
    chosen = (
        ", the first whose photo splits hold out a different photo of the attacker each"
        if report["seed_choice"] == "distinct_held_out_photos"
        else ""
    )
    rows = [
        f"`benchmarks/face_transfer_masks.py` (`reports/benchmarks/face_transfer_masks.json`; "
        f"{report['date'][:10]}; {machine['cpu_threads']} CPU threads): `robustcnn run "
        f"experiment=face_smoke face.mask=M face.eval_draws={report['eval_draws']} seed=S` for every "
        f"shipped mask M (its default shape) and the seeds S = {', '.join(map(str, seeds))}"
        f"{chosen}, holding out {', '.join(photos)}. "
        f"Each dodging patch is optimised against {first['recognizer']} alone and judged on the photo the "
        f"optimisation never saw, against the enrolled template, on {report['eval_draws']} held-out draws, "
        "by the recognizer it was optimised against and by each recognizer it never saw (each with its own "
        "threshold fitted at the same FAR apart from the study), next to a random patch of the same mask "
        "on the same draws and the bare face. Each cell lists the seeds in order:",
        "",
        "| mask (share of the crop) | recognizer | held out | dodging success | random patch | no patch "
        "| beating their random patch |",
        "|---|---|---|---|---|---|---|",
    ]
    impersonation = 0.0
    for runs in masks.values():
        ordered = [runs[str(seed)] for seed in seeds]
        mask = f"{ordered[0]['mask']} ({ordered[0]['mask_area_percent']:.1f}%)"
        held = [_dodging(run)["held_out_photos"] for run in ordered]
        attacked = f"{ordered[0]['recognizer']} (attacked)"
        rows.append(_transfer_row(mask, attacked, held, [e["random_patch"]["success_rate"] for e in held]))
        for name in ordered[0]["holdout_recognizers"]:
            moved = [_dodging(run)["transfer"][name] for run in ordered]
            rows.append(_transfer_row(mask, name, moved, [e["random_patch_success_rate"] for e in moved]))
        others = [patch for run in ordered for patch in run["patches"] if patch["goal"] != "dodging"]
        for patch in others:
            impersonation = max([impersonation, *(e["success_rate"] for e in patch["transfer"].values())])
    rows += [
        "",
        f"The impersonation patches of the same runs reach at most {_pct(impersonation)} on the "
        "recognizers they never saw.",
    ]
    return "\n".join(rows)


def fmn_vs_foolbox(report: dict[str, Any]) -> str:
    """Our FMN against foolbox's on the same images: robust accuracy per eps, time, minimal norms."""
    machine, results = report["machine"], report["results"]
    rows = [
        f"`benchmarks/attacks.py` (`reports/benchmarks/attacks.json`: {report['model']} on "
        f"{report['images']} {report['data']} test images, 100 steps each, {machine['cpu_threads']} CPU "
        f"thread(s), load average {machine['load_average'][0]} at the end; {report['date'][:10]}):",
        "",
        "| norm | eps | ours | foolbox 3.3.4 | our time / foolbox's (median, min-max) "
        "| our median minimal norm |",
        "|---|---|---|---|---|---|",
    ]
    for norm in ("linf", "l2"):
        row = results[f"fmn_{norm}_vs_foolbox"]
        ratio, minimal = row["ours_vs_foolbox"], row["ours_minimal_perturbation"]
        accuracy = row["robust_accuracy"]
        rows.append(
            f"| {norm} | {' / '.join(f'{e:g}' for e in row['eps'])} "
            f"| {' / '.join(_pct(a) for a in accuracy['ours'])} "
            f"| {' / '.join(_pct(a) for a in accuracy['foolbox'])} "
            f"| {ratio['median']} ({ratio['min']}-{ratio['max']}) | {minimal['median']:.3f} |"
        )
    return "\n".join(rows)


def face_patch_speed(report: dict[str, Any]) -> str:
    results, machine = report["results"], report["machine"]
    before, after, one = results["before"], results["after"], results["after_eot_batch_1"]
    ratio = results["after_vs_before"]
    floor, floor_ratio = results["recognizer_only"], results["recognizer_only_vs_before"]
    agreement = results["same_results"]["max_abs_loss_difference_after_vs_before"]
    return (
        f"`benchmarks/face_patch.py` ({report['date'][:10]}; {report['recognizer']}, {report['mask']} "
        f"mask, {report['eot_samples']} EOT draws a step, {report['torch_threads']} torch thread per worker, "
        f"load average {machine['load_average'][0]}): {before['ms_per_step']['median']} ms per "
        f"step before (commit {before['commit'][:7]}), {after['ms_per_step']['median']} ms after: "
        f"{ratio['median']}x (min {ratio['min']}, max {ratio['max']} over {ratio['rounds']} rounds; the "
        f"issue's target was 0.6x); {one['ms_per_step']['median']} ms with `eot_batch=1`; the loss "
        f"histories of before and after agree to {agreement:.1e}. The recognizer alone (its forward pass "
        f"and input gradient on a step's {report['eot_samples']} crops, nothing else) takes "
        f"{floor['ms_per_step']['median']} ms a step, {floor_ratio['median']}x of before (min "
        f"{floor_ratio['min']}, max {floor_ratio['max']}): no rewrite of the loop around this recognizer "
        f"can go below that on this CPU."
    )


def regularisation_study(report: dict[str, Any]) -> str:
    results = report["results"]
    cells = results["cells"]
    eps = cells[0]["eps"]
    minutes = results["wall_seconds"] / 60
    rows = [
        f"`benchmarks/regularisation_study.py` (`reports/runs/regularisation.json`, {report['date'][:10]}): "
        f"`{' '.join(results['command'])}` from an empty weight cache took {minutes:.1f} minutes on "
        f"{report['machine']['cpu_threads']} CPU threads (budget 30). Worst-case robust accuracy "
        f"(L-inf, per-sample minimum over every attack and probe) on the preset's test images, and the "
        f"median of the per-sample minimal perturbation (FMN and every attack's examples; - where over "
        f"half the samples were never broken):",
        "",
        "| defense | model | clean | "
        + " | ".join(f"eps {e:g}" for e in eps if e > 0)
        + " | median minimal L-inf | epoch cost | verdict |",
        "|---|---|---|" + "---|" * (len([e for e in eps if e > 0]) + 3),
    ]
    for c in cells:
        curve = [v for e, v in zip(eps, c["worst_case_robust_accuracy"], strict=True) if e > 0]
        median = (c["minimal_perturbation"] or {}).get("median")
        cost = c["epoch_cost_ratio"]
        rows.append(
            f"| `{c['defense']}` | {c['model']} | {_pct(c['clean_accuracy'])} | "
            + " | ".join(_pct(v) for v in curve)
            + f" | {'-' if median is None else f'{median:.3f}'} | "
            f"{'-' if cost is None else f'{cost:.1f}x'} | {c['verdict']} |"
        )
    return "\n".join(rows) + "\n\n" + _regularisation_answer(cells, eps)


def _regularisation_answer(cells: list[dict[str, Any]], eps: list[float]) -> str:
    """The study's answer in words, every number and the wording's choice taken from the cells."""
    curve, largest = "worst_case_robust_accuracy", len(eps) - 1
    by = {(c["defense"], c["model"]): c for c in cells}
    others = [c for c in cells if c["defense"] not in ("pgd_at", "none")]
    gains = [  # (gain over standard training of the same network, eps index, cell), below the largest eps
        (c[curve][i] - by[("none", c["model"])][curve][i], i, c)
        for c in others
        if ("none", c["model"]) in by
        for i in range(1, largest)
    ]
    gain, at, best = max(gains, key=lambda g: g[0])
    trained = [c for c in cells if c["defense"] == "pgd_at"]
    costs = " and ".join(f"{c['epoch_cost_ratio']:.0f}x" for c in trained)
    ceiling = max(c[curve][largest] for c in others)
    verdict = (
        "they do not buy robustness at the threat's eps"
        if ceiling < 0.1
        else f"one keeps {_pct(ceiling)} at the threat's eps: read its row"
    )
    return (
        f"The answer, as measured: at eps {eps[largest]:g} no regularised, pruned or dropout model keeps "
        f"more than {_pct(ceiling)} (standard training: "
        f"{' and '.join(_pct(c[curve][largest]) for c in cells if c['defense'] == 'none')}), while PGD "
        f"adversarial training keeps {' and '.join(_pct(c[curve][largest]) for c in trained)} at {costs} "
        f"the epoch cost. Below it, the largest gain of a non-adversarial lever over standard training of "
        f"the same network is {100 * gain:+.1f} points (`{best['defense']}`, {best['model']}, eps "
        f"{eps[at]:g}): regularisation, dropout and pruning can shift small-eps robustness, but {verdict}. "
        f"Caveats: an MNIST-scale network, {len(cells)} cells of one seed each (seed-to-seed spread not "
        f"measured), the preset's test images, one strength per regulariser, CPU budgets."
    )


def _versus(found: dict[str, Any], key: str) -> str:
    """An evaluation's robust accuracy, its gap to AutoAttack and its share of AutoAttack's CPU time."""
    target = found["targets"][key]
    return (
        f"{_pct(found[key]['robust_accuracy'])} ({target['gap_points']:+.1f} pt, "
        f"{100 * target['cpu_time_fraction']:.1f}% of its CPU time)"
    )


def audit_vs_autoattack(report: dict[str, Any]) -> str:
    results, stamp = report["results"], report["written_by"]
    models = results["models"]
    audit_images = sorted({found["audit"]["images"] for found in models.values()})
    reused = sorted(m for m, found in models.items() if "reused_from" in found["autoattack"])
    load = (stamp["load_average_at_start"][0], stamp["load_average_at_end"][0])
    reuse = (
        f"; AutoAttack's figures of {', '.join(reused)} from an earlier run of the script" if reused else ""
    )
    rows = [
        f"`benchmarks/audit_vs_autoattack.py` (`reports/benchmarks/audit_vs_autoattack.json`, "
        f"{report['date'][:10]}): robust accuracy at eps {results['eps']} on {results['images']} mnist5k "
        f"test images ({', '.join(map(str, audit_images))} for the audit), and the CPU time (all threads) "
        f"as a share of AutoAttack's on the same model; {results['torch_threads']} torch threads on "
        f"{results['cpu_count']} cores (load average {load[0]} at the start, {load[1]} at the end){reuse}.",
        "",
        "| model | clean | AutoAttack (standard) | `robustcnn run` defaults | `robustcnn audit` | PGD-40 |",
        "|---|---|---|---|---|---|",
    ]
    for found in models.values():
        reference = found["autoattack"]
        rows.append(
            f"| {found['model']} | {_pct(found['clean_accuracy'])} | {_pct(reference['robust_accuracy'])} "
            f"({reference['cpu_seconds']:.0f} CPU s) | {_versus(found, 'run_defaults')} | "
            f"{_versus(found, 'audit')} | {_pct(found['pgd40']['robust_accuracy'])} |"
        )
    return "\n".join(rows)


#: Every figure block README.md may hold, by name.
FIGURES: dict[str, Figure] = {
    "sweep_overhead": Figure("reports/benchmarks/sweep_overhead.json", sweep_overhead),
    "demo_time": Figure("reports/benchmarks/sweep_overhead.json", demo_time),
    "defense_epoch_cost": Figure("reports/benchmarks/defenses.json", defense_epoch_cost),
    "face_smoke": Figure("reports/runs/face_smoke.json", face_smoke),
    "face_transfer": Figure("reports/runs/face_smoke.json", face_transfer),
    "face_transfer_ensemble": Figure("reports/runs/face_smoke_ensemble.json", face_transfer),
    "face_transfer_masks": Figure("reports/benchmarks/face_transfer_masks.json", face_transfer_masks),
    "face_port_crops": Figure("tests/fixtures/face_api_reference.json", face_port_crops),
    "fmn_vs_foolbox": Figure("reports/benchmarks/attacks.json", fmn_vs_foolbox),
    "regularisation_study": Figure("reports/runs/regularisation.json", regularisation_study),
    "face_patch_speed": Figure("reports/benchmarks/face_patch.json", face_patch_speed),
    "audit_vs_autoattack": Figure("reports/benchmarks/audit_vs_autoattack.json", audit_vs_autoattack),
}


def rendered(name: str, indent: str, root: Path) -> str:
    """The body of block ``name`` as it must read: the figure rendered from its JSON, indented."""
    if name not in FIGURES:
        raise FiguresError(f"README has a figure block '{name}' that tools/readme_figures.py does not know")
    figure = FIGURES[name]
    path = root / figure.source
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise FiguresError(f"figure '{name}' cites {figure.source}, which cannot be read: {error}") from None
    try:
        text = figure.render(data)
    except (KeyError, IndexError, TypeError) as error:
        raise FiguresError(f"figure '{name}': {figure.source} lacks what it renders ({error!r})") from None
    lines: list[str] = []
    for number, chunk in enumerate(text.split("\n\n")):  # paragraphs are wrapped, tables kept as rows
        table = chunk.startswith("|")
        lines += ([""] if number else []) + (
            chunk.splitlines() if table else textwrap.wrap(chunk, WIDTH - len(indent), break_on_hyphens=False)
        )
    return "".join(f"{indent}{line}\n" if line else "\n" for line in lines)


def _blocks(text: str) -> list[re.Match[str]]:
    """Every figure block, after checking each opening marker has its closing one and none repeats."""
    blocks = list(_BLOCK.finditer(text))
    found = [block["name"] for block in blocks]
    for name in _OPENING.findall(text):
        if name not in found:
            raise FiguresError(f"README's figure block '{name}' has no closing <!-- /figures:{name} -->")
    repeated = sorted({name for name in found if found.count(name) > 1})
    if repeated:
        raise FiguresError(f"README has the figure block(s) {', '.join(repeated)} more than once")
    return blocks


def render(text: str, root: Path = ROOT) -> str:
    """``text`` with every figure block's body replaced by its rendering."""
    out, last = [], 0
    for block in _blocks(text):
        out += [text[last : block.start("body")], rendered(block["name"], block["indent"], root)]
        last = block.end("body")
    return "".join([*out, text[last:]])


def check(text: str, root: Path = ROOT) -> list[str]:
    """One line per figure block that disagrees with its JSON, and per known figure README lacks."""
    problems = []
    blocks = _blocks(text)
    for block in blocks:
        if block["body"] != rendered(block["name"], block["indent"], root):
            source = FIGURES[block["name"]].source
            problems.append(
                f"README figure '{block['name']}' disagrees with {source}: "
                "run `python tools/readme_figures.py` (never edit a figure by hand)"
            )
    missing = sorted(set(FIGURES) - {block["name"] for block in blocks})
    problems += [f"README lacks the figure block '{name}' (<!-- figures:{name} -->)" for name in missing]
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only report blocks that disagree (exit 1)")
    parser.add_argument("--readme", type=Path, default=ROOT / "README.md")
    args = parser.parse_args(argv)
    try:
        text = args.readme.read_text()
        if args.check:
            problems = check(text)
            for line in problems:
                print(line, file=sys.stderr)
            return 1 if problems else 0
        new = render(text)
    except (FiguresError, OSError) as error:
        print(f"readme_figures: error: {error}", file=sys.stderr)
        return 2
    if new != text:
        args.readme.write_text(new)
        print(f"rewrote the figures in {args.readme}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
