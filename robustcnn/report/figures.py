"""The dashboard's adversarial example grid as a PNG (the robustness curves are plotly charts).

Every figure is a bare ``matplotlib.figure.Figure`` saved by :func:`robustcnn.plotting.save_figure`
(the Agg canvas, never pyplot; atomic writes).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure
from torch import Tensor

from robustcnn.plotting import DPI, save_figure

__all__ = ["example_grid"]


def _per_255(value: float) -> int | None:
    """n when ``value`` is n/255 for a whole n in 1..32, the form small L-inf budgets are quoted in (8/255).

    Larger radii are left alone: 0.2 is exactly 51/255, but nobody quotes it that way.
    """
    steps = value * 255
    n = round(steps)
    if 0 < n <= 32 and abs(steps - n) < 1e-3 * steps:
        return n
    return None


def _to_images(name: str, tensor: Tensor) -> np.ndarray:
    """Detach, move to CPU and scale to float in [0,1] (uint8 images are taken as 0..255)."""
    t = torch.as_tensor(tensor).detach().cpu()
    t = t.float() / 255.0 if not (t.is_floating_point() or t.is_complex()) else t.float()
    if not torch.isfinite(t).all():
        raise ValueError(f"{name} contains NaN or inf values")
    return t.numpy()


def _hwc(image: np.ndarray) -> np.ndarray:
    """[C,H,W] -> what imshow wants: [H,W] for grey, [H,W,3] for RGB."""
    return image[0] if image.shape[0] == 1 else np.transpose(image, (1, 2, 0))


#: One row of the grid: its label, and per column (image [C, H, W], title, title colour).
Row = tuple[str, list[tuple[np.ndarray, str, str]]]


def example_grid(
    path: str | Path,
    clean: Tensor,
    adversarial: Tensor,
    eps: Sequence[float],
    labels: Sequence[str] | None = None,
    predictions: Tensor | None = None,
    class_names: Sequence[str] | None = None,
    max_examples: int = 8,
) -> Path:
    """Draw clean images, their adversarial versions and the perturbations, and write a PNG.

    ``clean`` is [k, C, H, W] in [0,1] (C = 1 grey or 3 RGB); ``adversarial`` is [E, k, C, H, W], one
    block per radius in ``eps``. Columns are the first ``max_examples`` examples. Rows: the clean
    images, then for each eps > 0 the adversarial images and, below them, the perturbation
    adv - clean. A perturbation of 8/255 is invisible at its true scale, so each one is stretched to
    the full range around mid-grey (0.5 + delta / (2 max|delta|), grey = unchanged) and its true
    max|delta| is printed above it, which also shows whether the attack kept to its budget.
    eps == 0 rows are skipped (nothing to see). ``predictions`` ([E+1, k] class indices, row 0 for
    the clean images) appear as small titles, named by ``class_names`` when given; an adversarial
    prediction that differs from the clean one is shown in red. ``labels`` are the true labels, shown
    over the clean images. Returns the written path.

    All cells are drawn into one axes laid out in inches (one ``imshow`` per cell with an extent)
    rather than one subplot per cell: a subplot costs tens of milliseconds to build, and a grid of
    8 examples x 6 radii would otherwise take seconds per artifact.
    """
    if max_examples < 1:
        raise ValueError(f"max_examples must be >= 1, got {max_examples}")
    eps_list = [float(e) for e in eps]
    clean_np, adv_np = _checked_images(clean, adversarial, len(eps_list))
    k = clean_np.shape[0]
    if labels is not None and len(labels) != k:
        raise ValueError(f"labels has {len(labels)} entries for {k} examples")
    preds = _checked_predictions(predictions, len(eps_list), k)

    def class_name(index: int) -> str:
        if class_names is not None and 0 <= index < len(class_names):
            return str(class_names[index])
        return str(index)

    n = min(k, max_examples)
    rows = [_clean_row(clean_np, n, labels, preds, class_name)]
    for e_idx, e in enumerate(eps_list):
        if e != 0:
            adv_preds = None if preds is None else preds[e_idx + 1]
            rows += _eps_rows(clean_np, adv_np[e_idx], e, n, adv_preds, preds, class_name)
    aspect = clean_np.shape[2] / clean_np.shape[3]
    return _draw(rows, path, n, aspect=aspect, grey=clean_np.shape[1] == 1)


def _checked_images(clean: Tensor, adversarial: Tensor, n_eps: int) -> tuple[np.ndarray, np.ndarray]:
    """Both blocks as float arrays in [0, 1], their shapes checked against each other and the eps list."""
    clean_np = _to_images("clean", clean)
    adv_np = _to_images("adversarial", adversarial)
    if clean_np.ndim != 4 or clean_np.shape[1] not in (1, 3):
        raise ValueError(f"clean must be [k, C, H, W] with C = 1 or 3, got shape {tuple(clean_np.shape)}")
    if adv_np.ndim != 5 or adv_np.shape[0] != n_eps or adv_np.shape[1:] != clean_np.shape:
        raise ValueError(
            f"adversarial must be [E, k, C, H, W] = [{n_eps}, {', '.join(map(str, clean_np.shape))}] "
            f"(one block per eps), got shape {tuple(adv_np.shape)}"
        )
    if clean_np.shape[0] == 0:
        raise ValueError("clean holds no examples")
    return clean_np, adv_np


def _checked_predictions(predictions: Tensor | None, n_eps: int, k: int) -> np.ndarray | None:
    if predictions is None:
        return None
    preds = torch.as_tensor(predictions).detach().cpu().long().numpy()
    if preds.shape != (n_eps + 1, k):
        raise ValueError(
            f"predictions must be [E+1, k] = [{n_eps + 1}, {k}] (row 0 = clean), "
            f"got shape {tuple(preds.shape)}"
        )
    return preds


def _clean_row(
    clean_np: np.ndarray,
    n: int,
    labels: Sequence[str] | None,
    preds: np.ndarray | None,
    class_name: Callable[[int], str],
) -> Row:
    cells = []
    for j in range(n):
        parts = []
        if labels is not None:
            parts.append(f"label {labels[j]}")
        if preds is not None:
            parts.append(f"pred {class_name(int(preds[0, j]))}")
        cells.append((clean_np[j], "\n".join(parts), "black"))
    return ("clean", cells)


def _eps_rows(
    clean_np: np.ndarray,
    adv_np: np.ndarray,
    e: float,
    n: int,
    adv_preds: np.ndarray | None,
    preds: np.ndarray | None,
    class_name: Callable[[int], str],
) -> list[Row]:
    """The adversarial images at one eps and, below them, their perturbations stretched to be seen."""
    adv_cells, delta_cells = [], []
    for j in range(n):
        title, color = "", "black"
        if adv_preds is not None and preds is not None:
            p = int(adv_preds[j])
            title = f"pred {class_name(p)}"
            color = "red" if p != int(preds[0, j]) else "black"
        adv_cells.append((adv_np[j], title, color))
        delta = adv_np[j] - clean_np[j]
        peak = float(np.abs(delta).max())
        scaled = 0.5 + delta / (2 * peak) if peak > 0 else np.full_like(delta, 0.5)
        delta_cells.append((scaled, f"max|δ| {peak:.3g}", "black"))
    n255 = _per_255(e)
    eps_text = f"ε={e:.3g}" if n255 is None else f"ε={e:.3g}\n({n255}/255)"
    return [(f"adv\n{eps_text}", adv_cells), (f"δ stretched\n{eps_text}", delta_cells)]


def _draw(rows: list[Row], path: str | Path, n: int, aspect: float, grey: bool) -> Path:
    """Lay the rows out in inches on one axes (data units = inches, y growing downwards) and save."""
    cell_w = 1.0
    cell_h = cell_w * aspect
    gap_x, line_h, pad = 0.06, 0.11, 0.04
    left, block_gap = 0.8, 0.08
    tops, y = [], 0.02
    for r, (_, cells) in enumerate(rows):
        lines = max(title.count("\n") + 1 if title else 0 for _, title, _ in cells)
        if r > 0 and r % 2 == 1:
            y += block_gap  # a little air between eps blocks (adv + delta belong together)
        y += pad + lines * line_h
        tops.append(y)
        y += cell_h
    fig_w, fig_h = left + n * cell_w + (n - 1) * gap_x + 0.05, y + 0.05
    fig = Figure(figsize=(fig_w, fig_h), dpi=DPI)
    ax = fig.add_axes((0.0, 0.0, 1.0, 1.0))
    ax.set_axis_off()
    cmap, vmin, vmax = ("gray", 0.0, 1.0) if grey else (None, None, None)
    for (row_label, cells), top in zip(rows, tops, strict=True):
        for j, (image, title, color) in enumerate(cells):
            x0 = left + j * (cell_w + gap_x)
            extent = (x0, x0 + cell_w, top + cell_h, top)
            image = _hwc(np.clip(image, 0.0, 1.0))
            ax.imshow(
                image,
                extent=extent,
                interpolation="antialiased",
                aspect="auto",
                cmap=cmap,
                vmin=vmin,
                vmax=vmax,
            )
            if title:
                ax.text(
                    x0 + cell_w / 2,
                    top - 0.02,
                    title,
                    ha="center",
                    va="bottom",
                    fontsize=6.5,
                    color=color,
                    linespacing=1.1,
                )
        ax.text(
            left - 0.06, top + cell_h / 2, row_label, ha="right", va="center", fontsize=7, linespacing=1.15
        )
    ax.set_xlim(0, fig_w)
    ax.set_ylim(fig_h, 0)
    return save_figure(fig, path, tight=False)  # laid out in inches already; skips the extra draw pass
