"""Transfer by mask: the face_smoke study once per shipped mask, judged on the recognizers it never saw.

Writes ``reports/benchmarks/face_transfer_masks.json``. Why: the committed face_smoke run (eyeglasses)
cannot show transfer: a random eyeglass patch alone already breaks faceres's match on the held-out
photo, and mobileface rejects most genuine pairs at its fitted threshold. Whether a patch optimised
against face-api alone transfers depends on where it sits, so every shipped mask (``eyeglasses``,
``sticker``, ``hat_band``, each with its default shape) runs through the real CLI with the same
settings: ``robustcnn run experiment=face_smoke face.mask=M face.eval_draws=N`` (one attacker,
obama, whose third photo the optimisation never sees; 40 steps, EOT 4; N held-out draws per photo,
64 by default so a rate moves in steps of 1.6 points). The JSON keeps each run's command, exit code,
figures, per-patch transfer records (with the paired test) and the held-out recognizers' summaries,
copied from its results.json.

Nothing here is tuned on what it reports: the masks are the shipped defaults, listed before any run,
and every one of them is reported.

    python benchmarks/face_transfer_masks.py [--masks eyeglasses sticker hat_band] [--eval-draws 64]
                                             [--out PATH]

Needs the face assets (``robustcnn assets``); about a minute per mask on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from _report import write_report

ROOT = Path(__file__).resolve().parent.parent
MASKS = ("eyeglasses", "sticker", "hat_band")
#: What each run keeps from its results.json.
KEPT = (
    "recognizer", "holdout_recognizers", "mask", "mask_area_percent", "figures", "transfer", "photo_split",
    "job_seconds", "threshold",
)  # fmt: skip
#: What it keeps of each patch: its evaluations in sample, on held-out photos and on each held-out recognizer.
PATCH_KEPT = ("goal", "attacker", "target", "held_out", "in_sample", "held_out_photos", "transfer")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--masks", nargs="+", default=list(MASKS), choices=MASKS)
    parser.add_argument("--eval-draws", type=int, default=64, help="held-out draws per photo")
    parser.add_argument("--out", type=Path, default=Path("reports/benchmarks/face_transfer_masks.json"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="face-transfer-masks-") as folder:
        runs = {mask: run_mask(mask, args.eval_draws, Path(folder)) for mask in args.masks}
    write_report(args.out, "face_transfer_masks", runs, experiment="face_smoke", eval_draws=args.eval_draws)


def run_mask(mask: str, eval_draws: int, folder: Path) -> dict[str, Any]:
    """One face_smoke run with ``mask``, through the CLI; what its results.json says about transfer."""
    overrides = [f"face.mask={mask}", f"face.eval_draws={eval_draws}"]
    command = ["run", "experiment=face_smoke", *overrides]
    private = [f"hydra.run.dir={folder / mask}", f"tracking.uri=sqlite:///{folder / 'mlflow.db'}"]
    done = subprocess.run(
        [sys.executable, "-m", "robustcnn.cli", *command, *private], cwd=ROOT, capture_output=True, text=True
    )
    results_file = folder / mask / "results.json"
    if not results_file.is_file():
        raise SystemExit(f"face_smoke with face.mask={mask} wrote no results.json:\n{done.stderr[-3000:]}")
    results = json.loads(results_file.read_text())
    patches = [{key: patch[key] for key in PATCH_KEPT} for patch in results["patches"]]
    print(f"{mask}: exit {done.returncode}, {results['job_seconds']:.0f} s", flush=True)
    return {
        "command": "robustcnn " + " ".join(command),
        "exit_code": done.returncode,
        **{key: results[key] for key in KEPT},
        "patches": patches,
    }


if __name__ == "__main__":
    main()
