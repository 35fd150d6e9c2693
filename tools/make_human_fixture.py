"""Build tests/fixtures/human_models_reference.json: descriptors of real face crops from the ORIGINAL graphs.

Why: the torch port of the human-models recognizers (robustcnn.models.face.tfjs_graph and
human_recognizers) is only trustworthy if it gives the descriptors TF.js itself gives on the same crops.
This script takes crops of the embedded gallery (face-api-aligned boxes, the crops the face study
feeds every recognizer), runs tools/human_models_reference/describe.js on them under node (tfjs 4.22.0,
pure-JS CPU backend) with each model's own window, size and output node, and stores per crop: its
gallery index and identity, the sha256 of its uint8 bytes and each model's raw descriptor. No image
bytes go into the fixture.

Usage (needs node/npm and the npm registry for tfjs; the human-models assets from `robustcnn assets`):

    .venv/bin/python tools/make_human_fixture.py [--workdir DIR]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from robustcnn.face.gallery import load_face_gallery  # noqa: E402
from robustcnn.models.face.human_assets import (  # noqa: E402
    HUMAN_PACKAGE,
    HUMAN_SHA256,
    HUMAN_VERSION,
    human_models_dir,
)
from robustcnn.models.face.human_recognizers import HUMAN_MODELS  # noqa: E402

REFERENCE_DIR = ROOT / "tools" / "human_models_reference"
FIXTURE = ROOT / "tests" / "fixtures" / "human_models_reference.json"
#: Gallery crops in the fixture: three photos of one person, another person, faces of four demo photos.
CROPS = (0, 1, 2, 3, 4, 9, 16, 25)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=None, help="scratch node folder to keep and reuse")
    parser.add_argument("--out", type=Path, default=FIXTURE)
    args = parser.parse_args()

    models = human_models_dir() / "models"
    gallery = load_face_gallery(boxes="aligned")
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="human-models-reference-"))
    workdir.mkdir(parents=True, exist_ok=True)
    shutil.copy(REFERENCE_DIR / "package.json", workdir / "package.json")
    shutil.copy(REFERENCE_DIR / "describe.js", workdir / "describe.js")
    if not (workdir / "node_modules" / "@tensorflow" / "tfjs" / "package.json").is_file():
        subprocess.run(
            ["npm", "install", "--no-audit", "--no-fund", "--ignore-scripts"], cwd=workdir, check=True
        )
    crops = gallery.crops[list(CROPS)]
    plan = [model.plan() for model in HUMAN_MODELS.values()]
    (workdir / "crops.u8").write_bytes(crops.tobytes())
    (workdir / "shapes.json").write_text(json.dumps([list(c.shape[:2]) for c in crops]))
    (workdir / "plan.json").write_text(json.dumps(plan))
    subprocess.run(
        ["node", "describe.js", str(models), "crops.u8", "shapes.json", "plan.json", "descriptors.json"],
        cwd=workdir, check=True,
    )  # fmt: skip
    result = json.loads((workdir / "descriptors.json").read_text())
    entries = [
        {
            "gallery_index": index,
            "identity": gallery.identities[index],
            "crop_sha256": hashlib.sha256(crop.tobytes()).hexdigest(),
            "descriptors": {
                name: [float(f"{v:.7g}") for v in rows[i]] for name, rows in result["descriptors"].items()
            },
        }
        for i, (index, crop) in enumerate(zip(CROPS, crops, strict=True))
    ]
    fixture = {
        "about": "raw outputs of the original TF.js graphs; regenerate with tools/make_human_fixture.py",
        "source": {"package": HUMAN_PACKAGE, "version": HUMAN_VERSION, "tarball_sha256": HUMAN_SHA256},
        "reference": {
            "runtime": "node "
            + subprocess.run(["node", "--version"], capture_output=True, text=True).stdout.strip(),
            "tfjs": result["tfjs_version"],
            "backend": result["backend"],
        },
        "gallery": {"boxes": "aligned", "margin": 0.0, "crops_sha256": gallery.identity.get("crops_sha256")},
        "plan": plan,
        "crops": entries,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(fixture, indent=1) + "\n")
    print(f"{args.out}: {len(entries)} crops x {len(plan)} models")
    if args.workdir is None:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
