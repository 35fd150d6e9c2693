"""Face patch speed: ms per optimisation step of the code before the faster loop and after it.

Writes ``reports/benchmarks/face_patch.json``. One dodging eyeglass patch on the shipped face-api
recognizer and the shipped photos (the first gallery identity's optimisation photos, the
face_patch experiment's settings: physical variation, TV and NPS on, early stop off so every run
makes the same number of steps), ``--eot-samples`` draws a step, for four contenders:

* ``before``: the code at ``--before`` (default: main's HEAD when the work began);
* ``after``: this checkout, all of a step's draws in one recognizer pass (``eot_batch`` None);
* ``after_eot_batch_1``: this checkout, one draw per pass (what ``face.eot_batch=1`` costs);
* ``recognizer_only``: this checkout's recognizer alone, its forward pass and input gradient on a
  step's batch of crops: the floor of a step (a loop whose warps, blur, penalties and update cost
  nothing would still take this long), so ``recognizer_only_vs_before`` is the best ``after_vs_before``
  any rewrite of the loop around this recognizer can reach.

Why "before" is the old code and not ``eot_batch=1``: the old loop already put all of a step's EOT
draws through one warp call and one recognizer forward; there was no per-draw path to compare with.
Profiling one step showed where the time went instead: ~75% in the recognizer's forward and input
gradient, a third of that in the backward of its first convolution (7x7, stride 2, 3 channels), and
~10% in the per-sample blur. So the old code itself is the honest "before": ``git archive`` extracts
its ``robustcnn`` package into a temporary folder, and each contender runs in its own worker process
(``PYTHONPATH`` picks the package; the worker reports the file it imported), which loads the model
and photos once and then runs ``--steps`` steps per request, timing itself (wall and CPU seconds).
The contenders are interleaved round by round (benchmarks/_timing.py): the ratios are medians of
per-round ratios with min and max, CPU-time ratios beside them. ``same_results`` compares the loss
histories of before and after (the same draws; the fused recognizer differs by float rounding).

    python benchmarks/face_patch.py [--steps 10] [--eot-samples 8] [--rounds 5] [--threads 1]
                                    [--before REV] [--out PATH]

A dry run that leaves the committed figures alone: ``--steps 2 --rounds 1 --out /tmp/face_patch.json``.
Needs the face assets (``robustcnn assets``).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from _report import write_report
from _timing import Measured, interleaved

if TYPE_CHECKING:  # the workers import torch and the package under test themselves (PYTHONPATH)
    from torch import Tensor

    from robustcnn.models.face.recognizer import FaceRecognizer

ROOT = Path(__file__).resolve().parent.parent
#: main's HEAD when the faster loop began (issue 19 item 6): the code "before".
BEFORE = "8e2e2414758014e1577c0c5252468c3bfa0e36e6"
#: The face_patch experiment's patch settings (conf/experiment/face_patch.yaml), early stop off.
FACE = {"steps": 1, "eot_samples": 8, "tv_weight": 0.02, "nps_weight": 0.02, "early_stop": False}
DATA = {"name": "faces", "boxes": "aligned", "margin": 0.0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10, help="optimisation steps per timed run")
    parser.add_argument("--eot-samples", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds after one warm-up round")
    parser.add_argument("--threads", type=int, default=1, help="torch threads in each worker")
    parser.add_argument("--before", default=BEFORE, help="git revision of the code before")
    parser.add_argument("--out", type=Path, default=Path("reports/benchmarks/face_patch.json"))
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        serve(args.threads, args.eot_samples)
        return
    with tempfile.TemporaryDirectory(prefix="face-patch-before-") as folder:
        before = extract(args.before, Path(folder))
        workers = {"before": Worker(before, args), "after": Worker(ROOT, args)}  # both load at once
        try:
            for worker in workers.values():
                worker.wait_ready()
            results = measure(workers, args)
        finally:
            for worker in workers.values():
                worker.close()
    results["before"]["commit"] = before_commit(args.before)
    write_report(
        args.out,
        "face_patch",
        results,
        recognizer="face_api",
        mask="eyeglasses",
        steps=args.steps,
        eot_samples=args.eot_samples,
        rounds=args.rounds,
        torch_threads=args.threads,
    )


def before_commit(revision: str) -> str:
    """The full hash of ``revision``; one clear line when git does not know it."""
    out = subprocess.run(
        ["git", "rev-parse", "--verify", f"{revision}^{{commit}}"], cwd=ROOT, capture_output=True, text=True
    )
    if out.returncode != 0:
        raise SystemExit(f"--before {revision}: not a commit of this repository ({out.stderr.strip()})")
    return out.stdout.strip()


def extract(revision: str, folder: Path) -> Path:
    """The ``robustcnn`` package at ``revision``, extracted into ``folder`` (no checkout is touched)."""
    commit = before_commit(revision)
    archive = subprocess.run(
        ["git", "archive", commit, "robustcnn"], cwd=ROOT, capture_output=True, check=True
    )
    subprocess.run(["tar", "-x", "-C", str(folder)], input=archive.stdout, check=True)
    return folder


class Worker:
    """A process running this script with ``--worker`` on the package under ``root``."""

    def __init__(self, root: Path, args: argparse.Namespace) -> None:
        env = {**os.environ, "PYTHONPATH": str(root)}
        command = [sys.executable, __file__, "--worker", "--threads", str(args.threads)]
        command += ["--eot-samples", str(args.eot_samples)]
        self.root = root
        self.process = subprocess.Popen(
            command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env, cwd=root
        )
        self.ready: dict[str, Any] = {}

    def wait_ready(self) -> None:
        """Until the worker has loaded everything; it must have imported the package under its root."""
        self.ready = self._read()
        where = Path(self.ready["robustcnn"]).resolve()
        if not where.is_relative_to(self.root.resolve()):
            raise SystemExit(f"the worker for {self.root} imported robustcnn from {where}")

    def _read(self) -> dict[str, Any]:
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        if not line:
            raise SystemExit(f"a face patch worker exited (code {self.process.wait()}); see its error above")
        reply: dict[str, Any] = json.loads(line)
        return reply

    def run(self, steps: int, eot_batch: int | None = None, recognizer_only: bool = False) -> dict[str, Any]:
        """``steps`` steps of one patch (the same seed every time): its own seconds and losses; or, with
        ``recognizer_only``, just the recognizer's part of as many steps."""
        assert self.process.stdin is not None
        request: dict[str, Any] = {"steps": steps, "recognizer_only": recognizer_only}
        if eot_batch is not None:
            request["eot_batch"] = eot_batch
        self.process.stdin.write(json.dumps(request) + "\n")
        self.process.stdin.flush()
        return self._read()

    def close(self) -> None:
        if self.process.stdin is not None:
            self.process.stdin.close()
        self.process.wait(timeout=60)


def measure(workers: dict[str, Worker], args: argparse.Namespace) -> dict[str, Any]:
    """The four contenders interleaved; ms per step (median, min, max), ratios, the loss histories."""
    last: dict[str, dict[str, Any]] = {}

    def contender(
        name: str, worker: Worker, eot_batch: int | None = None, recognizer_only: bool = False
    ) -> Callable[[], Measured]:
        def run() -> Measured:
            last[name] = worker.run(args.steps, eot_batch, recognizer_only)
            return Measured(last[name]["wall"], last[name]["cpu"])

        return run

    contenders = {
        "before": contender("before", workers["before"]),
        "after": contender("after", workers["after"]),
        "after_eot_batch_1": contender("after_eot_batch_1", workers["after"], eot_batch=1),
        "recognizer_only": contender("recognizer_only", workers["after"], recognizer_only=True),
    }
    timings = interleaved(contenders, args.rounds)
    results: dict[str, Any] = {}
    for name in contenders:
        per_step = sorted(1000.0 * wall / args.steps for wall in timings.wall[name])
        cpu = sorted(1000.0 * cpu / args.steps for cpu in timings.cpu[name])
        results[name] = {
            "ms_per_step": {
                "median": round(per_step[len(per_step) // 2], 2),
                "min": round(per_step[0], 2),
                "max": round(per_step[-1], 2),
            },
            "cpu_ms_per_step_median": round(cpu[len(cpu) // 2], 2),
        }
    losses = {name: last[name]["history"] for name in contenders if name != "recognizer_only"}
    gap = max(abs(a - b) for a, b in zip(losses["after"], losses["before"], strict=True))
    results.update(
        after_vs_before=timings.ratio("after", "before"),
        after_eot_batch_1_vs_after=timings.ratio("after_eot_batch_1", "after"),
        recognizer_only_vs_before=timings.ratio("recognizer_only", "before"),
        recognizer_only_vs_after=timings.ratio("recognizer_only", "after"),
        same_results={"max_abs_loss_difference_after_vs_before": gap, "losses": losses},
        workers={name: worker.ready for name, worker in workers.items()},
        timings=timings.summary(),
    )
    print(f"after vs before: {results['after_vs_before']}", flush=True)
    print(f"eot_batch=1 vs after: {results['after_eot_batch_1_vs_after']}", flush=True)
    print(f"recognizer only vs before: {results['recognizer_only_vs_before']}", flush=True)
    return results


def serve(threads: int, eot_samples: int) -> None:
    """The worker: load the recognizer and the photos once, then answer one request per stdin line."""
    import dataclasses

    import torch

    import robustcnn
    from robustcnn.face.attack import attack_face
    from robustcnn.face.enrolment import enrol, load_faces
    from robustcnn.face.settings import FacePlan
    from robustcnn.models.face.loading import load_face_recognizer

    torch.set_num_threads(threads)
    plan = FacePlan.from_mapping({**FACE, "eot_samples": eot_samples}, 0, DATA)
    recognizer = load_face_recognizer("face_api")
    enrolment = enrol(load_faces(DATA))
    faces = enrolment.optimisation_faces(0)
    gallery = recognizer.embed_batched(enrolment.photos).float()
    ready = {"robustcnn": robustcnn.__file__, "attacker": enrolment.names[0], "photos": int(faces.shape[0])}
    print(json.dumps(ready), flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        steps = int(request["steps"])
        start = clock()
        if request.get("recognizer_only"):
            recognizer_part(recognizer, faces, gallery, eot_samples, steps)
            print(json.dumps({**elapsed(start), "history": []}), flush=True)
            continue
        settings = dataclasses.replace(plan.patch, steps=steps)
        if "eot_batch" in request:
            settings = dataclasses.replace(settings, eot_batch=request["eot_batch"])
        found = attack_face(recognizer, faces, gallery, 0, None, plan.mask, settings)
        print(json.dumps({**elapsed(start), "history": found.history}), flush=True)


def clock() -> tuple[float, float]:
    """Now, as wall seconds and this process's CPU seconds (user + system): a start for :func:`elapsed`."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return time.perf_counter(), usage.ru_utime + usage.ru_stime


def elapsed(start: tuple[float, float]) -> dict[str, float]:
    """Wall and CPU seconds since ``start`` (a :func:`clock` reading)."""
    wall, cpu = clock()
    return {"wall": wall - start[0], "cpu": cpu - start[1]}


def recognizer_part(
    recognizer: FaceRecognizer, faces: Tensor, gallery: Tensor, eot_samples: int, steps: int
) -> None:
    """The recognizer's share of ``steps`` steps: its forward pass and input gradient on a batch of
    ``eot_samples`` crops (what a step feeds it), nothing else. The floor of a step's time: a loop whose
    warps, blur, penalties and update cost nothing would still take this long."""
    import torch

    x = faces[torch.arange(eot_samples) % faces.shape[0]].clone()
    for _ in range(steps):
        crops = x.clone().requires_grad_(True)
        recognizer.distance(recognizer.embed(crops), gallery[:1]).sum().backward()


if __name__ == "__main__":
    main()
