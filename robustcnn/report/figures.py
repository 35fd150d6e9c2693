"""The dashboard's adversarial example grid as a PNG (the robustness curves are plotly charts).

Composed with PIL (no plotting library, no global state): safe to call from parallel threads, and
cheap enough (milliseconds) to draw for every run of a report.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor

__all__ = ["Row", "draw_rows", "example_grid", "stretched"]

#: Bump when the grid's look changes: reports keep drawn grids in a cache named after it.
GRID_VERSION = 1
#: Target size of one image cell in pixels (a 28 px digit is drawn 3x, a 32 px CIFAR image 3x).
CELL_PIXELS = 84
FONT_SIZE = 10
GAP = 4


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
    return draw_rows(rows, path, n)


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


def stretched(values: np.ndarray) -> tuple[np.ndarray, float]:
    """Signed values drawn around mid-grey at full range (0.5 + v / (2 max|v|)), and max|v|.

    Why: a perturbation of 8/255 or an input gradient is invisible at its true scale; stretched to
    its own maximum, its shape shows (grey = zero), and the peak printed beside it keeps the scale.
    """
    peak = float(np.abs(values).max()) if values.size else 0.0
    return (0.5 + values / (2 * peak) if peak > 0 else np.full_like(values, 0.5)), peak


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
        scaled, peak = stretched(adv_np[j] - clean_np[j])
        delta_cells.append((scaled, f"max|delta| {peak:.3g}", "black"))
    n255 = _per_255(e)
    eps_text = f"eps={e:.3g}" if n255 is None else f"eps={e:.3g}\n({n255}/255)"  # ASCII: the font's glyphs
    return [(f"adv\n{eps_text}", adv_cells), (f"delta\nstretched\n{eps_text}", delta_cells)]


def draw_rows(
    rows: list[Row],
    path: str | Path,
    n: int,
    breaks: frozenset[int] | None = None,
    cell_pixels: int = CELL_PIXELS,
) -> Path:
    """Paste the cells (upscaled, nearest neighbour) under their titles, label the rows, save atomically.

    ``breaks``: the rows that get extra air above them (None: every odd row, the example grid's eps
    blocks). Drawn with PIL, not matplotlib: a grid is ~100 small images and labels, which PIL
    composes in milliseconds where a figure took ~0.3 s (plus ~0.3 s to import matplotlib) per run.
    """
    height, width = rows[0][1][0][0].shape[-2:]
    scale = max(1, round(cell_pixels / max(height, width)))
    cell_w, cell_h = width * scale, height * scale
    font = ImageFont.load_default(size=FONT_SIZE)
    line_h = FONT_SIZE + 2
    left = max(_text_width(font, line) for label, _ in rows for line in label.split("\n")) + 2 * GAP
    tops, y = [], GAP
    for r, (_, cells) in enumerate(rows):
        lines = max(title.count("\n") + 1 if title else 0 for _, title, _ in cells)
        spaced = r in breaks if breaks is not None else r % 2 == 1  # air between blocks
        y += (2 * GAP if r > 0 and spaced else 0) + lines * line_h + GAP
        tops.append(y)
        y += cell_h
    canvas = Image.new("RGB", (left + n * (cell_w + GAP), y + GAP), "white")
    pen = ImageDraw.Draw(canvas)
    for (row_label, cells), top in zip(rows, tops, strict=True):
        for j, (image, title, color) in enumerate(cells):
            x0 = left + j * (cell_w + GAP)
            canvas.paste(_cell(image, cell_w, cell_h), (x0, top))
            for k, line in enumerate(reversed(title.split("\n") if title else [])):
                pen.text((x0 + cell_w // 2, top - GAP - k * line_h), line, fill=color, font=font, anchor="md")
        label_lines = row_label.split("\n")
        first = top + cell_h // 2 - len(label_lines) * line_h // 2
        for k, line in enumerate(label_lines):
            pen.text((left - GAP, first + k * line_h), line, fill="black", font=font, anchor="ra")
    return _save_png(canvas, Path(path))


def _cell(image: np.ndarray, cell_w: int, cell_h: int) -> Image.Image:
    """One [C, H, W] image in [0, 1] as an upscaled RGB picture."""
    pixels = (np.clip(_hwc(image), 0.0, 1.0) * 255).round().astype(np.uint8)
    return Image.fromarray(pixels).convert("RGB").resize((cell_w, cell_h), Image.Resampling.NEAREST)


def _text_width(font: ImageFont.FreeTypeFont | ImageFont.ImageFont, text: str) -> int:
    left, _, right, _ = font.getbbox(text)
    return int(right - left)


def _save_png(image: Image.Image, target: Path) -> Path:
    """Write atomically (temp file + rename), creating parent folders: a reader never sees half a PNG."""
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{target.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        image.save(partial, format="PNG")
        os.replace(partial, target)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    return target
