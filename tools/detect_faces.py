"""Regenerate the candidate face boxes of the embedded gallery, with contact sheets for review.

This is how ``robustcnn/face/face_gallery.json`` was made:

1. ``python tools/detect_faces.py --out /tmp/faces_review`` runs the Haar-cascade union
   (:func:`robustcnn.face.gallery.detect_faces`) on face-api's six demo photos and matplotlib's
   ``grace_hopper.jpg``, and writes ``candidates.json`` (image name, sha256, boxes), one
   ``<image>_boxes.png`` per photo (boxes drawn and numbered) and ``<image>_crops.png`` (each candidate
   cut with the gallery's crop rule, numbered).
2. A person looks at the PNGs and keeps the numbers of the real faces (false positives on badges,
   blinds and clothing are dropped).
3. ``python tools/detect_faces.py --out /tmp/faces_review --keep sample1.jpg=0,1 ... --write`` writes
   the kept boxes to the package's ``face_gallery.json``.

4. Optional, face-api's own alignment: ``--node-modules DIR`` (a node project with
   @vladmandic/face-api 1.7.15 and @tensorflow/tfjs 4.22.0, e.g. the one tools/make_face_fixture.py sets
   up; ~7 minutes on the pure-JS CPU backend) runs the ORIGINAL face-api pipeline (SSD detection, 68
   landmarks, the dlib-style square box its descriptors are computed on) on the photos, matches each
   kept Haar box to a face-api face (IoU >= 0.3) and stores that face's square box as
   ``aligned_boxes``. ``--face-api-results FILE`` reuses the JSON such a run wrote (``face_api.json``).
5. A new photo (face_recognition's test photos were added so): ``--only obama.jpg ...`` scans just those
   photos, ``--identity obama.jpg=obama`` names the person of each kept box (one person on several
   photos), and ``--write`` merges their entries into the file in gallery order, each with the command
   that made it.

Why a reviewed file rather than detecting at run time: the gallery must be the same bytes on every
machine and OpenCV version, and a detector's false positives would be "identities" of wallpaper.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import numpy as np

from robustcnn.face.crops import crop_face
from robustcnn.face.gallery import (
    CASCADES,
    GALLERY_JSON,
    GALLERY_NOTE,
    GALLERY_PHOTOS,
    detect_faces,
    gallery_photo_paths,
    read_rgb,
    sha256_file,
)

#: Runs face-api's own pipeline on raw RGB photos; prints, per face, its SSD box and the square box
#: face-api cuts for its descriptor (landmarks.align with useDlibAlignment, as withFaceDescriptors does).
FACE_API_JS = r"""
'use strict';
const fs = require('fs');
async function main() {
  const [modelDir, listFile, outFile] = process.argv.slice(2);
  const faceapi = require('@vladmandic/face-api/dist/face-api.node-wasm.js');
  const { tf } = faceapi;
  await tf.setBackend('cpu'); await tf.ready();
  const { ssdMobilenetv1, faceLandmark68Net, faceRecognitionNet } = faceapi.nets;
  for (const net of [ssdMobilenetv1, faceLandmark68Net, faceRecognitionNet]) await net.loadFromDisk(modelDir);
  const out = [];
  for (const item of JSON.parse(fs.readFileSync(listFile, 'utf8'))) {
    const input = tf.tensor3d(Int32Array.from(fs.readFileSync(item.raw)), [item.h, item.w, 3], 'int32');
    const options = new faceapi.SsdMobilenetv1Options({ minConfidence: 0.3 });
    const faces = await faceapi.detectAllFaces(input, options).withFaceLandmarks().withFaceDescriptors();
    input.dispose();
    for (const f of faces) {
      const d = f.detection.box;
      const a = f.landmarks.align(null, { useDlibAlignment: true });
      out.push({ image: item.name, score: f.detection.score, box: [d.x, d.y, d.width, d.height],
        dlib: [a.x, a.y, a.width, a.height], descriptor: Array.from(f.descriptor) });
    }
    console.log(item.name, faces.length);
  }
  fs.writeFileSync(outFile, JSON.stringify(out));
}
main().catch((e) => { console.error(e.stack || e); process.exit(1); });
"""


def _run_face_api(
    node_modules: Path, model_dir: Path, photos: list[tuple[str, np.ndarray]], out: Path
) -> Path:
    """Run :data:`FACE_API_JS` under node on ``photos`` (name, RGB image); the results JSON it wrote."""
    import subprocess
    import tempfile

    with tempfile.TemporaryDirectory() as scratch:
        work = Path(scratch)
        (work / "node_modules").symlink_to(node_modules.resolve())
        (work / "align.js").write_text(FACE_API_JS)
        listing = []
        for name, image in photos:
            raw = work / f"{name}.rgb"
            raw.write_bytes(np.ascontiguousarray(image).tobytes())
            listing.append({"name": name, "raw": str(raw), "h": image.shape[0], "w": image.shape[1]})
        (work / "list.json").write_text(json.dumps(listing))
        result = out / "face_api.json"
        subprocess.run(["node", "align.js", str(model_dir), "list.json", str(result)], cwd=work, check=True)
    return result


def _iou(a: list[float], b: list[float]) -> float:
    iw = max(0.0, min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1]))
    inter = iw * ih
    return inter / (a[2] * a[3] + b[2] * b[3] - inter)


def _aligned_boxes(name: str, boxes: list[tuple[int, int, int, int]], faces: list[dict]) -> list[list[int]]:
    """For each Haar box, the dlib-style square box of the face-api face that overlaps it most."""
    aligned = []
    for box in boxes:
        scored = [(_iou(list(box), f["box"]), f) for f in faces if f["image"] == name]
        best = max(scored, key=lambda t: t[0], default=(0.0, None))
        if best[1] is None or best[0] < 0.3:
            raise SystemExit(f"{name}: face-api found no face at the kept box {box} (best IoU {best[0]:.2f})")
        aligned.append([int(v) for v in best[1]["dlib"]])
    return aligned


def _draw_boxes(image: np.ndarray, boxes: list[tuple[int, int, int, int]], path: Path) -> None:
    """Save the photo (downscaled to <= 1200 px wide) with each box drawn and numbered."""
    from PIL import Image, ImageDraw

    picture = Image.fromarray(image)
    scale = min(1.0, 1200 / picture.width)
    picture = picture.resize((round(picture.width * scale), round(picture.height * scale)))
    draw = ImageDraw.Draw(picture)
    for i, (x, y, w, h) in enumerate(boxes):
        rect = [x * scale, y * scale, (x + w) * scale, (y + h) * scale]
        draw.rectangle(rect, outline=(255, 0, 0), width=3)
        draw.text((rect[0] + 4, rect[1] + 4), str(i), fill=(255, 255, 0))
    picture.save(path)


def _contact_sheet(crops: list[np.ndarray], path: Path, columns: int = 6) -> None:
    """Save the candidate crops side by side, each numbered in its corner."""
    from PIL import Image, ImageDraw

    if not crops:
        return
    side = crops[0].shape[0]
    rows = (len(crops) + columns - 1) // columns
    sheet = Image.new("RGB", (columns * side, rows * side), (40, 40, 40))
    draw = ImageDraw.Draw(sheet)
    for i, crop in enumerate(crops):
        x, y = (i % columns) * side, (i // columns) * side
        sheet.paste(Image.fromarray(crop), (x, y))
        draw.text((x + 4, y + 4), str(i), fill=(255, 255, 0))
    sheet.save(path)


def _dump(document: dict) -> str:
    """JSON with each list of integers (a box, a size, kept numbers) on one line: readable diffs."""
    text = json.dumps(document, indent=2)
    return re.sub(r"\[\s*(-?\d+(?:,\s*-?\d+)*)\s*\]", _one_line, text) + "\n"


def _one_line(match: re.Match[str]) -> str:
    return "[" + re.sub(r",\s*", ", ", match.group(1)) + "]"


def _merged(document: dict) -> dict:
    """The gallery's boxes file with the rescanned photos of ``document`` replacing (or added to) its own.

    Each rescanned entry keeps the command that made it (the file's ``detector`` describes the rest)."""
    existing = json.loads(GALLERY_JSON.read_text())
    command = document["detector"]["command"]
    fresh = {entry["image"]: {**entry, "command": command} for entry in document["photos"]}
    photos = {entry["image"]: entry for entry in existing["photos"]} | fresh
    order = [name for _, name in GALLERY_PHOTOS]
    existing["photos"] = sorted(photos.values(), key=lambda entry: order.index(entry["image"]))
    return existing


def _parse_keep(items: list[str]) -> dict[str, list[int]]:
    keep: dict[str, list[int]] = {}
    for item in items:
        name, _, numbers = item.partition("=")
        keep[name] = [int(n) for n in numbers.split(",") if n.strip()]
    return keep


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for candidates.json and the PNGs")
    parser.add_argument(
        "--assets", type=Path, default=None, help="face-api folder (default: robustcnn assets)"
    )
    parser.add_argument("--min-size", type=int, default=40, help="smallest face side in pixels")
    parser.add_argument("--min-neighbors", type=int, default=5, help="Haar cascade minNeighbors")
    parser.add_argument("--angles", default="0", help="comma-separated rotations (degrees) also scanned")
    parser.add_argument("--only", nargs="*", default=None, help="scan only these photos (file names)")
    parser.add_argument("--keep", nargs="*", default=[], help="IMAGE=i,j,...: candidate numbers to keep")
    parser.add_argument("--node-modules", type=Path, default=None, help="node_modules with face-api + tfjs")
    parser.add_argument("--face-api-results", type=Path, default=None, help="face_api.json of an earlier run")
    parser.add_argument(
        "--identity", nargs="*", default=[], help="IMAGE=name,...: the person of each kept box"
    )
    parser.add_argument("--write", action="store_true", help=f"write the kept boxes to {GALLERY_JSON}")
    args = parser.parse_args(argv)

    args.out.mkdir(parents=True, exist_ok=True)
    keep = _parse_keep(args.keep)
    people = {name: value.split(",") for name, _, value in (item.partition("=") for item in args.identity)}
    angles = tuple(float(a) for a in args.angles.split(",") if a.strip())
    entries = []
    photos = []
    for source, path in gallery_photo_paths(args.assets):
        if args.only is not None and path.name not in args.only:
            continue
        image = read_rgb(path)
        boxes = detect_faces(image, min_size=args.min_size, min_neighbors=args.min_neighbors, angles=angles)
        _draw_boxes(image, boxes, args.out / f"{path.stem}_boxes.png")
        _contact_sheet([crop_face(image, box) for box in boxes], args.out / f"{path.stem}_crops.png")
        chosen = [boxes[i] for i in keep[path.name]] if path.name in keep else boxes
        entries.append(
            {
                "image": path.name,
                "source": source,
                "sha256": sha256_file(path),
                "size": [int(image.shape[1]), int(image.shape[0])],
                "candidates": len(boxes),
                "kept_candidates": keep.get(path.name, list(range(len(boxes)))),
                "boxes": [list(b) for b in chosen],
                **({"identities": people[path.name]} if path.name in people else {}),
            }
        )
        photos.append((path.name, image))
        print(f"{path.name}: {len(boxes)} candidate(s), keeping {len(chosen)}")
    results = args.face_api_results
    if results is None and args.node_modules is not None:
        # the full package's model/ (robustcnn's assets keep no SSD detector)
        model_dir = args.node_modules / "@vladmandic" / "face-api" / "model"
        results = _run_face_api(args.node_modules, model_dir, photos, args.out)
    if results is not None:
        faces = json.loads(results.read_text())
        for entry in entries:
            entry["aligned_boxes"] = _aligned_boxes(entry["image"], entry["boxes"], faces)
    document = {
        "note": GALLERY_NOTE,
        "box_format": "x, y, width, height in the photo's pixels",
        "detector": {
            "cascades": list(CASCADES),
            "min_size": args.min_size,
            "min_neighbors": args.min_neighbors,
            "angles": list(angles),
            "aligned_boxes": "face-api 1.7.15's own square box (SSD + 68 landmarks, useDlibAlignment)"
            if results is not None
            else None,
            "command": "python tools/detect_faces.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        },
        "photos": entries,
    }
    (args.out / "candidates.json").write_text(_dump(document))
    if args.only is not None:  # some photos rescanned: merged into the gallery's file, in gallery order
        document = _merged(document)
    text = _dump(document)
    if args.write:
        GALLERY_JSON.write_text(text)
        print(f"wrote {GALLERY_JSON}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
