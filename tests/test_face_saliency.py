"""The recognizer's saliency on the clean and the patched face, on recognizers with a known answer."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image
from torch import Tensor, nn

from robustcnn.face.saliency import face_saliency, mass_inside, patch_saliency
from robustcnn.models.face.recognizer import FaceRecognizer
from robustcnn.report.heatmaps import face_saliency_grid
from robustcnn.tracking.records import face_metric_rows

SIDE = 12
#: The rows and columns the "looks only here" recognizer reads (a 3x4 window).
WINDOW = (slice(2, 5), slice(6, 10))


class _LooksOnlyAt(nn.Module):
    """A descriptor that is a linear function of one window of pixels: its saliency is zero elsewhere."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(3 * 3 * 4, 5)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear(x[:, :, WINDOW[0], WINDOW[1]].flatten(1))


class _SeesBrightPatches(nn.Module):
    """Pixels of the top rows count only where they are brighter than 0.5 (a ReLU that a dark face
    leaves dead), the rest of the face linearly: a bright patch up there is what draws the attention."""

    def forward(self, x: Tensor) -> Tensor:
        top = torch.relu(x[:, :, :3] - 0.5).flatten(1).sum(1)
        rest = x[:, :, 3:].flatten(1)
        return torch.stack([top, rest.mean(1), rest[:, ::7].sum(1)], 1)


def _recognizer(net: nn.Module) -> FaceRecognizer:
    torch.manual_seed(0)
    return FaceRecognizer(net.apply(lambda m: m.reset_parameters() if isinstance(m, nn.Linear) else None))


def _mask(rows: slice, cols: slice) -> Tensor:
    mask = torch.zeros(1, 1, SIDE, SIDE)
    mask[..., rows, cols] = 1.0
    return mask


def test_the_saliency_mass_lands_where_the_recognizer_looks() -> None:
    recognizer = _recognizer(_LooksOnlyAt())
    faces = torch.rand(2, 3, SIDE, SIDE, generator=torch.Generator().manual_seed(1))
    template = torch.randn(5, generator=torch.Generator().manual_seed(2))
    maps = face_saliency(recognizer, faces, template)
    assert maps.shape == (2, SIDE, SIDE) and bool((maps >= 0).all())
    outside = torch.ones(SIDE, SIDE, dtype=torch.bool)
    outside[WINDOW] = False
    assert float(maps[:, outside].abs().max()) == 0.0 and float(maps[:, ~outside].sum()) > 0
    assert mass_inside(maps, _mask(*WINDOW)) == [1.0, 1.0]  # a patch over the window holds all of it
    assert mass_inside(maps, _mask(slice(6, 12), slice(0, 6))) == [0.0, 0.0]  # one elsewhere holds none
    half = mass_inside(maps, _mask(slice(2, 5), slice(6, 8)))  # half the window
    assert all(value is not None and 0.0 < value < 1.0 for value in half)
    assert mass_inside(torch.zeros(1, SIDE, SIDE), _mask(*WINDOW)) == [None]
    assert not any(p.grad is not None for p in recognizer.embedder.parameters()), "no parameter gradients"


def test_a_bright_patch_draws_the_attention_a_dark_face_did_not_get() -> None:
    recognizer = _recognizer(_SeesBrightPatches())
    clean = torch.full((3, SIDE, SIDE), 0.2)
    mask = _mask(slice(0, 3), slice(2, 10))
    patched = clean * (1 - mask[0]) + 0.9 * mask[0]
    template = torch.tensor([0.0, 1.0, 1.0])
    found = patch_saliency(recognizer, clean, patched, template, mask, "obama")
    assert found.clean_mass_in_patch == 0.0, "under a dead ReLU the top rows get no gradient"
    assert found.patched_mass_in_patch is not None and found.patched_mass_in_patch > 0.5
    assert found.patch_area_fraction == pytest.approx(24 / 144)
    assert found.summary()["template"] == "obama" and found.clean.shape == found.patched.shape == (SIDE, SIDE)


def test_the_grid_and_the_per_patch_metrics(tmp_path: Path) -> None:
    faces = torch.rand(2, 3, SIDE, SIDE)
    maps = torch.rand(2, SIDE, SIDE)
    path = face_saliency_grid(
        tmp_path / "face_saliency.png", (faces, faces), (maps, maps), ["obama\ndodging", "obama\nas biden"],
        [(0.1, 0.6), (None, 0.2)],
    )  # fmt: skip
    assert Image.open(path).size[0] > 2 * SIDE
    patches = [{"saliency": {"clean_mass_in_patch": 0.1, "patched_mass_in_patch": 0.6}},
               {"saliency": {"clean_mass_in_patch": None, "patched_mass_in_patch": 0.2}}, {}]  # fmt: skip
    rows = face_metric_rows({"patches": patches, "dodging_saliency_in_patch_clean": 0.1})
    assert ("saliency_in_patch/clean", 0.1, 0) in rows and ("saliency_in_patch/patched", 0.2, 1) in rows
    assert ("dodging_saliency_in_patch_clean", 0.1, 0) in rows
    assert not any(name == "saliency_in_patch/clean" and step == 1 for name, _, step in rows)
