"""face-api's recognizer ported to torch: parity with the original JS, the converter, assets and loading.

The parity test compares our descriptors with ones computed by face-api's own JavaScript on the same
crops (tests/fixtures/face_api_reference.json, made by tools/make_face_fixture.py). Tests that need the
real weights skip when `robustcnn assets` has not been run, unless ROBUSTCNN_REQUIRE_ASSETS=1 (CI).
Everything else runs offline on a synthetic package with the real layout.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from face_assets import require_face_assets
from torch import nn

from robustcnn.errors import AssetError, ModelError
from robustcnn.face.crops import crop_face
from robustcnn.models.face import assets, convert
from robustcnn.models.face.fused import SpaceToDepthConv, fuse_face_api
from robustcnn.models.face.loading import load_face_api, load_face_recognizer
from robustcnn.models.face.network import FaceApiResNet, pad_to_square, to_face_input

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.*:DeprecationWarning")

FIXTURE = Path(__file__).parent / "fixtures" / "face_api_reference.json"
REGENERATE = "regenerate it with `.venv/bin/python tools/make_face_fixture.py` (needs node/npm)"


# --------------------------------------------------------------------------------------------------
# Real weights: parity with the original


@pytest.fixture(scope="module")
def face_api_folder() -> Path:
    """The real converted assets, or a skip (a failure when ROBUSTCNN_REQUIRE_ASSETS=1, as in CI)."""
    return require_face_assets()


def _read_rgb(path: Path) -> np.ndarray:
    from PIL import Image, ImageOps

    with Image.open(path) as image:
        return np.array(ImageOps.exif_transpose(image).convert("RGB"), dtype=np.uint8)


def test_port_matches_the_original_javascript_descriptors(face_api_folder: Path) -> None:
    fixture = json.loads(FIXTURE.read_text())
    assert fixture["source"]["tarball_sha256"] == assets.FACE_API_SHA256
    photos = {}
    for name, digest in fixture["image_sha256"].items():
        path = face_api_folder / "demo" / name
        actual = hashlib.sha256(path.read_bytes()).hexdigest()
        assert actual == digest, f"{path} differs from the photo the fixture was made from; {REGENERATE}"
        photos[name] = _read_rgb(path)
    inputs = []
    for entry in fixture["crops"]:
        x, y, w, h = entry["box"]
        if entry["kind"] == "crop":
            crop = crop_face(photos[entry["image"]], (x, y, w, h), margin=fixture["crop_rule"]["margin"])
        else:  # a raw, non-square region: the model pads and resizes it as face-api does
            crop = np.ascontiguousarray(photos[entry["image"]][y : y + h, x : x + w])
        digest = hashlib.sha256(crop.tobytes()).hexdigest()
        assert digest == entry["crop_sha256"], (
            f"the crop of {entry['image']} {entry['box']} differs from the fixture's (crop_face or the JPEG "
            f"decoder changed); {REGENERATE}"
        )
        inputs.append(torch.from_numpy(crop).permute(2, 0, 1)[None].float() / 255.0)
    model = load_face_api()
    square = [i for i, x in enumerate(inputs) if x.shape[-2:] == (150, 150)]
    ours = torch.empty(len(inputs), 128)
    with torch.no_grad():  # one batch for the 150x150 crops (fast), one call per odd-sized region
        ours[square] = model(torch.cat([inputs[i] for i in square]))
        for i in sorted(set(range(len(inputs))) - set(square)):
            ours[i] = model(inputs[i])[0]
    reference = torch.tensor([entry["descriptor"] for entry in fixture["crops"]])
    cosine = torch.nn.functional.cosine_similarity(ours, reference)
    error = (ours - reference).norm(dim=1)
    assert cosine.min() >= 0.999, f"cosine to the JS descriptors: {cosine.tolist()}"
    assert error.max() < 1e-3, f"Euclidean error vs the JS descriptors: {error.tolist()}"
    # face-api's decisions are distances: pairwise distances must agree too
    assert (torch.cdist(ours, ours) - torch.cdist(reference, reference)).abs().max() < 1e-3
    norms = ours.norm(dim=1)
    assert ((norms > 0.8) & (norms < 2.0)).all(), "face-api descriptors are not unit-norm (~1.4)"


def test_face_api_recognizer_is_differentiable_and_frozen(face_api_folder: Path) -> None:
    recognizer = load_face_recognizer("face_api", threshold=0.6)
    assert recognizer.name == "face_api" and recognizer.threshold == 0.6
    x = torch.rand(1, 3, 150, 150, requires_grad=True)
    recognizer.embed(x).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert not any(p.requires_grad for p in recognizer.embedder.parameters())
    # the recognizer runs the fused net (robustcnn.models.face.fused): the reference port's descriptors
    assert isinstance(recognizer.embedder.conv32_down.conv, SpaceToDepthConv)
    with torch.no_grad():
        torch.testing.assert_close(recognizer.embed(x), load_face_api()(x), rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------------------
# A synthetic package with face-api's exact layout (offline, no real weights)


def _synthetic_model(folder: Path, seed: int = 0) -> dict:
    """Write a manifest + .bin in face-api's layout (uint8-quantised, conv64_* filters raw float32)."""
    rng = np.random.default_rng(seed)
    entries, chunks = [], []
    for name, _, shape in convert.manifest_layout():
        entry: dict = {"name": name, "shape": list(shape), "dtype": "float32"}
        count = math.prod(shape)
        if name.startswith("conv64") and name.endswith("filters"):
            chunks.append(rng.normal(0, 0.05, count).astype("<f4").tobytes())
        else:
            entry["quantization"] = {"dtype": "uint8", "scale": 0.001, "min": -0.1}
            chunks.append(rng.integers(0, 256, count, dtype=np.uint8).tobytes())
        entries.append(entry)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "face_recognition_model.bin").write_bytes(b"".join(chunks))
    manifest = [{"paths": ["face_recognition_model.bin"], "weights": entries}]
    (folder / convert.MANIFEST_FILE).write_text(json.dumps(manifest))
    return {"entries": entries, "chunks": chunks}


def test_converter_dequantises_and_transposes(tmp_path: Path) -> None:
    made = _synthetic_model(tmp_path / "model")
    weights = convert.read_tfjs_weights(tmp_path / "model")
    assert len(weights) == 117
    index = {e["name"]: i for i, e in enumerate(made["entries"])}
    stem = np.frombuffer(made["chunks"][index["conv32_down/conv/filters"]], np.uint8)
    expected = (stem.astype(np.float64) * 0.001 - 0.1).astype(np.float32).reshape(7, 7, 3, 32)
    np.testing.assert_array_equal(weights["conv32_down/conv/filters"], expected)
    raw = np.frombuffer(made["chunks"][index["conv64_1/conv1/conv/filters"]], "<f4").reshape(3, 3, 64, 64)
    np.testing.assert_array_equal(weights["conv64_1/conv1/conv/filters"], raw)
    state = convert.to_state_dict(weights)
    assert torch.equal(state["conv32_down.conv.weight"], torch.from_numpy(expected.transpose(3, 2, 0, 1)))
    assert state["fc.weight"].shape == (128, 256)
    out = convert.convert_face_api(
        tmp_path / "model", tmp_path / "w.safetensors", metadata={"source": "test"}
    )
    model = load_face_api(out)  # checks the sidecar sha256 and the state dict
    assert model(torch.rand(1, 3, 150, 150)).shape == (1, 128)


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        ("truncate", "the manifest describes"),
        ("drop_entry", "lists 116 tensors"),
        ("wrong_shape", "expected tensor conv32_down/conv/filters"),
        ("float16", "only float32 stored raw or as uint8"),
        ("not_json", "cannot read the face-api manifest"),
        ("no_bin", "missing"),
    ],
)
def test_converter_refuses_damaged_or_different_models(tmp_path: Path, damage: str, message: str) -> None:
    folder = tmp_path / "model"
    _synthetic_model(folder)
    manifest_path = folder / convert.MANIFEST_FILE
    manifest = json.loads(manifest_path.read_text())
    weights = manifest[0]["weights"]
    if damage == "truncate":
        with open(folder / "face_recognition_model.bin", "r+b") as handle:
            handle.truncate(1000)
    elif damage == "drop_entry":
        weights.pop()
    elif damage == "wrong_shape":
        weights[0]["shape"] = [5, 5, 3, 32]
    elif damage == "float16":
        weights[0]["quantization"]["dtype"] = "float16"
    elif damage == "no_bin":
        (folder / "face_recognition_model.bin").unlink()
    manifest_path.write_text("{oops" if damage == "not_json" else json.dumps(manifest))
    with pytest.raises(AssetError, match=message):
        convert.read_tfjs_weights(folder)


def test_load_face_api_refuses_a_file_that_does_not_match_its_sidecar(tmp_path: Path) -> None:
    _synthetic_model(tmp_path / "model")
    out = convert.convert_face_api(tmp_path / "model", tmp_path / "w.safetensors")
    sidecar = tmp_path / "w.safetensors.sha256"
    sidecar.write_text("0" * 64 + "  w.safetensors\n")
    with pytest.raises(AssetError, match="damaged"):
        load_face_api(out)


# --------------------------------------------------------------------------------------------------
# Assets: location, fetch from a tarball, errors


def _package_tarball(path: Path, model_dir: Path) -> Path:
    """A .tgz shaped like `npm pack` output, with extra members that must not be extracted."""

    def add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))

    with tarfile.open(path, "w:gz") as tar:
        for file in sorted(model_dir.iterdir()):
            add(tar, f"package/model/{file.name}", file.read_bytes())
        add(tar, "package/model/ssd_mobilenetv1_model.bin", b"not needed")
        add(tar, "package/demo/sample1.jpg", b"jpeg bytes")
        add(tar, "package/dist/face-api.js", b"not needed")
        add(tar, "package/LICENSE", b"MIT License\n\nCopyright (c) Vladimir Mandic\n")
        add(tar, "package/package.json", b'{"name": "@vladmandic/face-api", "version": "1.7.15"}')
        add(tar, "evil/../../outside.txt", b"never extracted")
    return path


@pytest.fixture()
def fake_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A synthetic face-api tarball whose sha256 is pinned for this test."""
    _synthetic_model(tmp_path / "src_model")
    tgz = _package_tarball(tmp_path / "vladmandic-face-api-1.7.15.tgz", tmp_path / "src_model")
    monkeypatch.setattr(assets, "FACE_API_SHA256", hashlib.sha256(tgz.read_bytes()).hexdigest())
    return tgz


def test_assets_dir_precedence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ROBUSTCNN_ASSETS_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert assets.assets_dir() == tmp_path / "xdg" / "robustcnn" / "assets"
    monkeypatch.setenv("ROBUSTCNN_ASSETS_DIR", str(tmp_path / "env"))
    assert assets.assets_dir() == tmp_path / "env"
    assert assets.assets_dir(tmp_path / "explicit") == tmp_path / "explicit"


def test_missing_assets_say_where_and_how_to_fetch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ROBUSTCNN_ASSETS_DIR", str(tmp_path))
    with pytest.raises(AssetError) as info:
        assets.face_api_dir()
    message = str(info.value)
    assert str(tmp_path / "face-api-1.7.15") in message
    for hint in (
        "robustcnn assets",
        "--tarball",
        "npm pack @vladmandic/face-api@1.7.15",
        "ROBUSTCNN_ASSETS_DIR",
    ):
        assert hint in message
    with pytest.raises(AssetError, match="robustcnn assets"):
        load_face_recognizer("face_api")


def test_fetch_from_a_tarball_extracts_only_what_is_needed_and_is_idempotent(
    tmp_path: Path, fake_package: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from test_face_human import _human_tarball
    from test_photo_assets import _sdist

    from robustcnn.cli import main
    from robustcnn.models.face import human_assets, photo_assets

    sdist = _sdist(tmp_path / "face_recognition-1.3.0.tar.gz")  # the photos, from a file: no pip
    monkeypatch.setattr(photo_assets, "PHOTOS_SHA256", hashlib.sha256(sdist.read_bytes()).hexdigest())
    human = _human_tarball(tmp_path / "human-models.tgz")  # the held-out recognizers, from a file: no npm
    monkeypatch.setattr(human_assets, "HUMAN_SHA256", hashlib.sha256(human.read_bytes()).hexdigest())
    root = tmp_path / "assets"
    main(["assets", "--dir", str(root), "--tarball", str(fake_package), "--photos-sdist", str(sdist),
          "--human-models-tarball", str(human)])  # fmt: skip
    folder = root / "face-api-1.7.15"
    photos = root / "face_recognition-1.3.0"
    humans = root / "human-models-3.0.4"
    assert capsys.readouterr().out.split() == [str(folder), str(humans), str(photos)]
    assert assets.face_api_dir(root) == folder
    kept = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
    assert kept == [
        "LICENSE", "NOTICE", "demo/sample1.jpg", "face_recognition.safetensors",
        "face_recognition.safetensors.sha256", "model/face_recognition_model-weights_manifest.json",
        "model/face_recognition_model.bin", "package.json",
    ]  # fmt: skip
    assert not (tmp_path / "outside.txt").exists()
    assert "MIT License" in (folder / "NOTICE").read_text()
    assert sorted(p.name for p in root.iterdir()) == sorted([photos.name, folder.name, humans.name])
    load_face_api(folder / "face_recognition.safetensors")
    # second call: no npm needed (a missing npm would fail), instant
    assert assets.fetch_face_api(root, npm="no-such-npm-here") == folder


def test_fetch_refuses_a_tarball_with_another_sha256(tmp_path: Path, fake_package: Path) -> None:
    other = tmp_path / "other.tgz"
    other.write_bytes(fake_package.read_bytes() + b"\0")
    root = tmp_path / "assets"
    with pytest.raises(AssetError) as info:
        assets.fetch_face_api(root, tarball=other)
    assert hashlib.sha256(other.read_bytes()).hexdigest() in str(info.value)
    assert assets.FACE_API_SHA256 in str(info.value)
    assert list(root.iterdir()) == []  # nothing half-made


def test_fetch_reports_a_missing_or_failing_npm(tmp_path: Path) -> None:
    with pytest.raises(AssetError, match="not installed or not on PATH"):
        assets.fetch_face_api(tmp_path / "a", npm="no-such-npm-here")
    fake_npm = tmp_path / "npm"
    fake_npm.write_text("#!/bin/sh\necho 'npm notice starting' >&2\necho 'npm error code E404' >&2\nexit 1\n")
    fake_npm.chmod(0o755)
    with pytest.raises(AssetError, match="npm error code E404"):
        assets.fetch_face_api(tmp_path / "b", npm=str(fake_npm))
    assert list((tmp_path / "b").iterdir()) == []


def test_cli_assets_error_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from robustcnn.cli import main

    with pytest.raises(SystemExit) as info:
        main(["assets", "--dir", str(tmp_path), "--tarball", str(tmp_path / "missing.tgz")])
    assert info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("robustcnn: error:") and "missing.tgz" in err and "\n" not in err


# --------------------------------------------------------------------------------------------------
# Non-square inputs and user embedders


def test_pad_to_square_centres_like_face_api() -> None:
    x = torch.ones(1, 3, 10, 7)  # 3 columns missing: face-api puts round(1.5) = 2 after, 1 before
    square = pad_to_square(x)
    assert square.shape == (1, 3, 10, 10)
    assert square[0, 0, 0].tolist() == [0, 1, 1, 1, 1, 1, 1, 1, 0, 0]
    wide = pad_to_square(torch.ones(1, 3, 4, 8))
    assert wide[0, 0, :, 0].tolist() == [0, 0, 1, 1, 1, 1, 0, 0]
    same = torch.rand(2, 3, 150, 150)
    assert torch.equal(to_face_input(same), same)
    resized = to_face_input(torch.rand(2, 3, 90, 120, requires_grad=True))
    assert resized.shape == (2, 3, 150, 150)


def test_network_shapes_without_weights() -> None:
    model = FaceApiResNet().eval()
    assert sum(p.numel() for p in model.parameters()) == 5_614_592
    assert len(model.state_dict()) == 117
    with torch.no_grad():
        assert model(torch.rand(2, 3, 150, 150)).shape == (2, 128)
        assert model(torch.rand(1, 3, 120, 100)).shape == (1, 128)


def _random_face_api(seed: int = 0) -> FaceApiResNet:
    """The net with random weights, scales and offsets far from 1 and 0 (so folding them matters)."""
    torch.manual_seed(seed)
    model = FaceApiResNet().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".scale." in name:
                p.copy_(torch.rand_like(p) + 0.5 if name.endswith("weight") else 0.1 * torch.randn_like(p))
            elif ".bias" in name:
                p.copy_(0.1 * torch.randn_like(p))
    return model


@pytest.mark.parametrize("shape", [(3, 3, 150, 150), (1, 3, 120, 100)])
def test_fused_net_gives_the_reference_descriptors_and_input_gradients(shape: tuple[int, ...]) -> None:
    # float64: the rewrites are exact, so only rounding may differ (in float32 a ReLU input within
    # rounding of 0 can flip and move a gradient pixel; the real weights are checked in float32 above)
    model = _random_face_api().double()
    fused = fuse_face_api(model)
    x = torch.rand(shape, dtype=torch.float64)
    outputs = []
    for net in (model, fused):
        xr = x.clone().requires_grad_(True)
        descriptors = net(xr)
        (grad,) = torch.autograd.grad(descriptors.pow(2).sum(), xr)
        outputs.append((descriptors.detach(), grad))
    (d_ref, g_ref), (d_fused, g_fused) = outputs
    torch.testing.assert_close(d_fused, d_ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(g_fused, g_ref, rtol=1e-8, atol=1e-10 * float(g_ref.abs().max()))
    assert not any(p.requires_grad for p in fused.parameters())
    assert len(model.state_dict()) == 117, "fusing works on a copy: the reference keeps its TF.js layout"


def test_space_to_depth_conv_is_the_stride_2_convolution() -> None:
    conv = nn.Conv2d(3, 8, 7, stride=2)
    x = torch.rand(2, 3, 20, 16)
    with torch.no_grad():
        torch.testing.assert_close(SpaceToDepthConv(conv)(x), conv(x), rtol=1e-5, atol=1e-5)
        # the phases must go where pixel_unshuffle puts them: a transposed phase order is a different map
        broken = SpaceToDepthConv(conv)
        broken.weight.copy_(broken.weight.transpose(2, 3).clone())
        assert not torch.allclose(broken(x), conv(x), atol=1e-3)
    with pytest.raises(ModelError, match="stride-2"):
        SpaceToDepthConv(nn.Conv2d(3, 8, 3, stride=1))


class _Embedder(nn.Module):
    def __init__(self, out: int = 16) -> None:
        super().__init__()
        self.fc = nn.Linear(3, out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.mean(dim=(2, 3)))


class _Identity(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 2


def test_a_users_torchscript_embedder_plugs_in(tmp_path: Path) -> None:
    path = tmp_path / "my_embedder.pt"
    torch.jit.save(torch.jit.script(_Embedder()), str(path))
    recognizer = load_face_recognizer(str(path), threshold=0.4)
    assert recognizer.name == "my_embedder" and recognizer.threshold == 0.4
    assert recognizer.embed(torch.rand(3, 3, 150, 150)).shape == (3, 16)


def test_bad_user_embedders_are_refused_clearly(tmp_path: Path) -> None:
    wrong = tmp_path / "wrong.pt"
    torch.jit.save(torch.jit.script(_Identity()), str(wrong))
    with pytest.raises(ModelError, match=r"maps a \[1, 3, 150, 150\] crop to \(1, 3, 150, 150\).*\[1, D\]"):
        load_face_recognizer(str(wrong))
    not_script = tmp_path / "weights.pt"
    torch.save({"w": torch.zeros(2)}, not_script)
    with pytest.raises(ModelError, match="is not a TorchScript file"):
        load_face_recognizer(str(not_script))
    with pytest.raises(ModelError, match="is none of face_api, faceres, mobileface nor an existing"):
        load_face_recognizer(str(tmp_path / "absent.pt"))
