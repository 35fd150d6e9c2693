"""Pick the face embedder an experiment attacks: face-api's port, or a user's own TorchScript model.

Why TorchScript for user models: it carries its architecture with it (no code of ours to match) and
loads without unpickling arbitrary objects. A user's embedder must take [N, 3, 150, 150] RGB in [0, 1]
(robustcnn's convention: the model owns its normalisation) and return [N, D] descriptors; this is
checked on a blank crop at load time so a wrong model fails here, not in the middle of an attack.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from torch import nn

from robustcnn.errors import AssetError, ModelError
from robustcnn.hashing import file_sha256
from robustcnn.models.face.assets import face_api_dir
from robustcnn.models.face.fused import fuse_face_api
from robustcnn.models.face.human_assets import load_human_embedder
from robustcnn.models.face.human_recognizers import HUMAN_MODELS
from robustcnn.models.face.network import INPUT_SIZE, WEIGHTS_FILE, FaceApiResNet
from robustcnn.models.face.recognizer import DEFAULT_THRESHOLD, FaceRecognizer

#: Name of the ported face-api recognizer.
FACE_API = "face_api"
#: Every recognizer robustcnn ships a port of (by the name a config uses).
RECOGNIZER_NAMES = (FACE_API, *HUMAN_MODELS)


def face_api_weights(path: str | Path | None = None) -> Path:
    """The converted face-api weights file (default: in the assets folder); AssetError when missing."""
    path = Path(path) if path is not None else face_api_dir() / WEIGHTS_FILE
    if not path.is_file():
        raise AssetError(
            f"face-api weights {path} do not exist; run `robustcnn assets` to fetch and convert them"
        )
    return path


def load_face_api(path: str | Path | None = None, device: torch.device | str = "cpu") -> FaceApiResNet:
    """The ported net with face-api's weights (safetensors only: no pickle is ever loaded).

    ``path``: the converted weights file; default: ``face_recognition.safetensors`` in the assets folder
    (:func:`robustcnn.models.face.assets.face_api_dir` says how to fetch it when missing). When a
    ``.sha256`` sidecar sits next to the file, the file must match it (a damaged download fails here,
    not as wrong faces).
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = face_api_weights(path)
    sidecar = path.with_name(path.name + ".sha256")
    if sidecar.is_file():
        expected = sidecar.read_text().split()[0]
        actual = file_sha256(path)
        if actual != expected:
            raise AssetError(
                f"{path} has sha256 {actual} but {sidecar.name} says {expected} (damaged); "
                "run `robustcnn assets --force` to convert it again"
            )
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError) as exc:
        raise AssetError(
            f"{path} is not a readable safetensors file ({exc}); run `robustcnn assets --force`"
        ) from exc
    model = FaceApiResNet()
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        detail = " ".join(str(exc).split())[:300]
        raise AssetError(f"{path} does not hold face-api's recognizer weights ({detail})") from exc
    return model.eval().to(device)




def _check_embedder(module: nn.Module, path: Path, device: torch.device | str) -> int:
    """Run a blank crop through ``module``; its descriptor length, or ModelError saying what is wrong."""
    probe = torch.zeros(1, 3, INPUT_SIZE, INPUT_SIZE, device=device)
    try:
        with torch.no_grad():
            out = module(probe)
    except Exception as exc:  # a user's model can fail in any way: one clear message
        detail = " ".join(str(exc).split())[:200]
        raise ModelError(
            f"the face embedder {path} fails on a [1, 3, {INPUT_SIZE}, {INPUT_SIZE}] crop "
            f"({type(exc).__name__}: {detail}); it must map RGB crops in [0, 1] to [N, D] descriptors"
        ) from exc
    if not isinstance(out, torch.Tensor) or out.ndim != 2 or out.shape[0] != 1 or out.shape[1] < 1:
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ModelError(
            f"the face embedder {path} maps a [1, 3, {INPUT_SIZE}, {INPUT_SIZE}] crop to {got}; "
            "it must return one descriptor per face, a [1, D] tensor"
        )
    if not torch.isfinite(out).all():
        raise ModelError(f"the face embedder {path} returns non-finite descriptors for a blank crop")
    return int(out.shape[1])


def load_face_recognizer(
    name_or_path: str = FACE_API, threshold: float = DEFAULT_THRESHOLD, device: torch.device | str = "cpu"
) -> FaceRecognizer:
    """``"face_api"``: the ported face-api net (from `robustcnn assets`); ``"faceres"`` / ``"mobileface"``:
    the ported human-models recognizers (unit descriptors; :mod:`robustcnn.models.face.human_assets`);
    a file path: a TorchScript embedder.

    ``threshold`` is the Euclidean distance below which two faces verify as the same person (0.6 is
    face-api's; a user's embedder usually needs its own, e.g. from calibrate_threshold).
    """
    if name_or_path in HUMAN_MODELS:
        embedder, digest = load_human_embedder(name_or_path)
        embedder.to(device)
        return FaceRecognizer(embedder, threshold=threshold, name=name_or_path, weights_sha256=digest)
    if name_or_path == FACE_API:
        weights = face_api_weights()
        return FaceRecognizer(
            fuse_face_api(load_face_api(weights, device=device)),  # the same function, faster
            threshold=threshold,
            name=FACE_API,
            weights_sha256=file_sha256(weights),
        )
    path = Path(name_or_path).expanduser()
    if not path.is_file():
        raise ModelError(
            f"face recognizer {name_or_path!r} is none of {', '.join(RECOGNIZER_NAMES)} nor an existing "
            "TorchScript file "
            "(save yours with torch.jit.save(torch.jit.script(model), 'embedder.pt'))"
        )
    try:
        # torch >= 2.9 deprecates TorchScript, yet it is still the format that carries its own architecture
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            module = torch.jit.load(str(path), map_location=device)
    except Exception as exc:  # torch raises RuntimeError or ValueError subclasses for non-TorchScript files
        detail = " ".join(str(exc).split())[:200]
        raise ModelError(
            f"{path} is not a TorchScript file ({type(exc).__name__}: {detail}); save the embedder with "
            "torch.jit.save(torch.jit.script(model), path) or torch.jit.trace"
        ) from exc
    module.eval()
    _check_embedder(module, path, device)
    return FaceRecognizer(module, threshold=threshold, name=path.stem, weights_sha256=file_sha256(path))
