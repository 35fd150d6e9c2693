"""The attribution grid: what the model looks at in each kept example, clean vs adversarial (PNG).

Drawn with PIL through :func:`robustcnn.report.figures.draw_rows` (milliseconds, no plotting
library), so a job can afford to write it. Columns are the kept examples; rows are the clean and
the adversarial images, then per method four heat maps: clean / adversarial input, each for the
predicted and for the true class. Each map is scaled to its own maximum (bright = most attributed);
the true-class adversarial map carries its rank correlation with the clean one (rho).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from torch import Tensor

from robustcnn.report.figures import Row, draw_rows

__all__ = ["ATTRIBUTIONS_PNG", "FACE_SALIENCY_PNG", "attribution_grid", "face_saliency_grid", "heat"]

#: The PNG every classifier job logs under ``plots/`` (and the dashboard embeds).
ATTRIBUTIONS_PNG = "attributions.png"
#: Row labels of a method's four maps (the order of ``maps[method]``'s first axis).
VARIANT_LABELS = ("clean\npredicted", "adv\npredicted", "clean\ntrue class", "adv\ntrue class")
METHOD_LABELS = {
    "saliency": "saliency",
    "integrated_gradients": "integrated\ngradients",
    "grad_cam": "Grad-CAM",
}
CELL_PIXELS = 56
#: The PNG a face study logs under ``plots/``: the recognizer's saliency on the clean and the patched face.
FACE_SALIENCY_PNG = "face_saliency.png"


def heat(values: np.ndarray) -> np.ndarray:
    """A non-negative [H, W] map as an RGB [3, H, W] image: black -> red -> yellow -> white ('hot').

    Scaled to the map's own maximum; an all-zero map is black.
    """
    peak = float(values.max()) if values.size else 0.0
    v = values / peak if peak > 0 else np.zeros_like(values)
    return np.stack([np.clip(3 * v, 0, 1), np.clip(3 * v - 1, 0, 1), np.clip(3 * v - 2, 0, 1)]).astype(
        np.float32
    )


def attribution_grid(
    path: str | Path,
    clean: Tensor,
    adversarial: Tensor,
    maps: Mapping[str, Tensor],
    predictions: Tensor,
    labels: Tensor,
    class_names: Sequence[str] = (),
    stability: Mapping[str, Sequence[float | None]] | None = None,
) -> Path:
    """Write the grid to ``path``: ``maps[method]`` is [4, k, H, W] (>= 0), ``predictions`` [2, k]."""
    k = int(clean.shape[0])
    images = [clean.detach().float().cpu().numpy(), adversarial.detach().float().cpu().numpy()]
    preds = predictions.detach().cpu().long().tolist()
    truth = labels.detach().cpu().long().tolist()

    def name(index: int) -> str:
        return str(class_names[index]) if 0 <= index < len(class_names) else str(index)

    rows: list[Row] = [
        (
            "clean",
            [
                (np.clip(images[0][j], 0, 1), f"label {name(truth[j])}\npred {name(preds[0][j])}", "black")
                for j in range(k)
            ],
        ),
        (
            "adversarial",
            [
                (
                    np.clip(images[1][j], 0, 1),
                    f"pred {name(preds[1][j])}",
                    "red" if preds[1][j] != preds[0][j] else "black",
                )
                for j in range(k)
            ],
        ),
    ]
    breaks = {1}
    for method, block in maps.items():
        values = block.detach().float().cpu().numpy()
        rhos = (stability or {}).get(method) or [None] * k
        breaks.add(len(rows))
        for v, variant in enumerate(VARIANT_LABELS):
            label = f"{METHOD_LABELS.get(method, method)}\n{variant}"
            cells = [(heat(values[v, j]), _rho_title(rhos[j]) if v == 3 else "", "black") for j in range(k)]
            rows.append((label, cells))
    return draw_rows(rows, path, k, breaks=frozenset(breaks), cell_pixels=CELL_PIXELS)


def _rho_title(rho: float | None) -> str:
    return "rho n/a" if rho is None else f"rho {rho:.2f}"


def face_saliency_grid(
    path: str | Path,
    faces: tuple[Tensor, Tensor],
    maps: tuple[Tensor, Tensor],
    titles: Sequence[str],
    shares: Sequence[tuple[float | None, float | None]],
) -> Path:
    """Write the face saliency grid: one column per patch, rows clean face, its saliency, patched face, its
    saliency. ``faces``: (clean, patched) [k, 3, H, W]; ``maps``: theirs [k, H, W] (>= 0); ``shares``:
    per column the share of each map inside the patch, printed over it."""
    clean, patched = (f.detach().float().cpu().numpy() for f in faces)
    clean_maps, patched_maps = (m.detach().float().cpu().numpy() for m in maps)
    k = len(titles)

    def share(value: float | None) -> str:
        return "in patch n/a" if value is None else f"in patch {100 * value:.0f}%"

    rows: list[Row] = [
        ("clean", [(np.clip(clean[j], 0, 1), titles[j], "black") for j in range(k)]),
        ("saliency\nclean", [(heat(clean_maps[j]), share(shares[j][0]), "black") for j in range(k)]),
        ("with patch", [(np.clip(patched[j], 0, 1), "", "black") for j in range(k)]),
        ("saliency\npatched", [(heat(patched_maps[j]), share(shares[j][1]), "black") for j in range(k)]),
    ]
    return draw_rows(rows, path, k, breaks=frozenset({2}), cell_pixels=CELL_PIXELS)
