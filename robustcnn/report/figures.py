"""PNG figures for reports and MLflow artifacts: robustness curves and adversarial example grids.

Every figure is a bare ``matplotlib.figure.Figure`` saved by :func:`robustcnn.plotting.save_figure`
(the Agg canvas, never pyplot; atomic writes).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import PercentFormatter
from torch import Tensor

from robustcnn.plotting import DPI
from robustcnn.plotting import save_figure as _save

__all__ = ["example_grid", "robustness_curve"]

# Up to this many legend entries fit inside a 6x4 in axes without hiding the curves.
_LEGEND_INSIDE_MAX = 6
# Eps ticks are placed at the measured radii only when there are few of them and they do not crowd.
_EPS_TICKS_MAX = 8
_NORM_NAMES = {"linf": "L∞", "l2": "L2", "l1": "L1"}
_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "<", ">", "h", "*", "p")


def _as_floats(name: str, values: Sequence[float], length: int) -> np.ndarray:
    """Accuracies as a float array, checked for length and for the [0,1] fraction convention.

    Percentages (0..100) are the common mistake; plotting them silently would put every curve off the
    chart, so they are refused with a message that says which series is wrong.
    """
    arr = np.asarray([float(v) for v in values], dtype=float)
    if arr.shape != (length,):
        raise ValueError(f"{name} has {arr.size} values but there are {length} eps values")
    finite = arr[np.isfinite(arr)]
    if finite.size and (finite.min() < -1e-6 or finite.max() > 1 + 1e-6):
        raise ValueError(
            f"{name} must hold accuracies as fractions in [0,1] (NaN allowed), got {arr.tolist()}"
        )
    return arr


def _per_255(value: float) -> int | None:
    """n when ``value`` is n/255 for a whole n in 1..32, the form small L-inf budgets are quoted in (8/255).

    Larger radii are left alone: 0.2 is exactly 51/255, but nobody quotes it that way.
    """
    steps = value * 255
    n = round(steps)
    if 0 < n <= 32 and abs(steps - n) < 1e-3 * steps:
        return n
    return None


def _eps_label(value: float, norm: str) -> str:
    """Tick text for one radius; for L-inf also the n/255 form people quote (8/255) when it is exact."""
    text = f"{value:.3g}"
    n = _per_255(value) if norm == "linf" else None
    return text if n is None else f"{text}\n{n}/255"


def robustness_curve(
    path: str | Path,
    eps: Sequence[float],
    curves: Mapping[str, Sequence[float]],
    worst_case: Sequence[float] | None = None,
    clean_accuracy: float | None = None,
    title: str = "",
    norm: str = "linf",
) -> Path:
    """Plot robust accuracy against the attack radius and write it to ``path`` as a PNG.

    One marked line per attack in ``curves`` (accuracies are fractions in [0,1], shown as percent), the
    per-eps worst case over attacks as a thick black line (the number that matters for a robustness
    claim), and the clean accuracy as a dashed horizontal reference. NaN entries (an attack that was
    skipped or failed at that radius) are left out rather than drawn as zero; a series that is all NaN
    still appears in the legend, marked "no data", so its absence is visible. ``eps`` is in raw [0,1]
    pixel units, as everywhere in robustcnn. Returns the written path.
    """
    eps_arr = np.asarray([float(e) for e in eps], dtype=float)
    if eps_arr.ndim != 1 or eps_arr.size == 0:
        raise ValueError("eps must be a non-empty sequence of radii")
    if not np.all(np.isfinite(eps_arr)) or eps_arr.min() < 0:
        raise ValueError(f"eps must be finite and >= 0, got {eps_arr.tolist()}")
    # Plot in ascending eps so a caller's unsorted list does not draw zig-zag lines.
    order = np.argsort(eps_arr, kind="stable")
    xs = eps_arr[order]
    series = {name: _as_floats(f"curve {name!r}", vals, xs.size)[order] for name, vals in curves.items()}
    worst = None if worst_case is None else _as_floats("worst_case", worst_case, xs.size)[order]
    clean = clean_accuracy if clean_accuracy is not None and math.isfinite(clean_accuracy) else None
    if clean is not None and not -1e-6 <= clean <= 1 + 1e-6:
        raise ValueError(f"clean_accuracy must be a fraction in [0,1], got {clean}")

    fig = Figure(figsize=(6, 4), dpi=DPI)
    ax = fig.add_subplot()
    n = len(series)
    colors = _palette(n)
    for i, (name, ys) in enumerate(series.items()):
        ok = np.isfinite(ys)
        label = name if ok.any() else f"{name} (no data)"
        ax.plot(
            xs[ok],
            ys[ok],
            marker=_MARKERS[i % len(_MARKERS)],
            markersize=4.5,
            linewidth=1.4,
            color=colors[i],
            label=label,
            alpha=0.9,
        )
    if worst is not None:
        ok = np.isfinite(worst)
        ax.plot(
            xs[ok],
            worst[ok],
            color="black",
            linewidth=3.0,
            marker="o",
            markersize=5,
            label="worst case" if ok.any() else "worst case (no data)",
            zorder=1.5,  # beneath the attack lines, so the attack that sets the worst case stays visible
        )
    if clean is not None:
        ax.axhline(
            clean,
            color="0.35",
            linestyle="--",
            linewidth=1.2,
            label=f"clean ({clean_accuracy:.1%})",
            zorder=1,
        )

    ax.set_ylim(-0.03, 1.03)
    ax.yaxis.set_major_formatter(PercentFormatter(xmax=1, decimals=0))
    ax.set_ylabel("accuracy")
    norm_name = _NORM_NAMES.get(norm.lower(), norm)
    ax.set_xlabel(f"ε ({norm_name} radius, [0,1] pixel units)")
    _set_eps_ticks(ax, np.unique(xs), norm.lower())
    if xs.size == 1 or xs[0] == xs[-1]:
        # A single radius: give the lone points some room instead of matplotlib's ±epsilon default.
        centre = xs[0]
        half = max(abs(centre) * 0.5, 0.05)
        ax.set_xlim(centre - half, centre + half)
    ax.grid(True, alpha=0.3, linewidth=0.6)
    ax.tick_params(labelsize=8)
    if title:
        ax.set_title(title, fontsize=10)

    handles, _ = ax.get_legend_handles_labels()
    if handles:
        if len(handles) <= _LEGEND_INSIDE_MAX:
            ax.legend(fontsize=7.5, loc="best", framealpha=0.85)
        else:
            # Many attacks: outside on the right so the curves stay readable; bbox_inches="tight"
            # widens the saved image to include it.
            ncol = 1 if len(handles) <= 16 else 2
            ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0, ncol=ncol)
    return _save(fig, path)


def _palette(n: int) -> list[tuple[float, float, float, float]]:
    """Distinct colours for ``n`` attack lines: tab10 while it suffices, then tab20, then a spread."""
    if n <= 10:
        cmap = colormaps["tab10"]
        return [cmap(i) for i in range(n)]
    if n <= 20:
        cmap = colormaps["tab20"]
        return [cmap(i) for i in range(n)]
    cmap = colormaps["turbo"]
    return [cmap(0.05 + 0.9 * i / (n - 1)) for i in range(n)]


def _set_eps_ticks(ax: Axes, values: np.ndarray, norm: str) -> None:
    """Put ticks at the measured radii when they are few and spread out; otherwise keep auto ticks."""
    if values.size > _EPS_TICKS_MAX:
        return
    if values.size > 1:
        span = values[-1] - values[0]
        if span <= 0 or np.min(np.diff(values)) < span / 14:
            return  # labels would overlap
    ax.set_xticks(values)
    ax.set_xticklabels([_eps_label(v, norm) for v in values])


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
    clean_np = _to_images("clean", clean)
    adv_np = _to_images("adversarial", adversarial)
    if clean_np.ndim != 4 or clean_np.shape[1] not in (1, 3):
        raise ValueError(f"clean must be [k, C, H, W] with C = 1 or 3, got shape {tuple(clean_np.shape)}")
    eps_list = [float(e) for e in eps]
    if adv_np.ndim != 5 or adv_np.shape[0] != len(eps_list) or adv_np.shape[1:] != clean_np.shape:
        raise ValueError(
            f"adversarial must be [E, k, C, H, W] = [{len(eps_list)}, {', '.join(map(str, clean_np.shape))}] "
            f"(one block per eps), got shape {tuple(adv_np.shape)}"
        )
    k, _, height, width = clean_np.shape
    if k == 0:
        raise ValueError("clean holds no examples")
    if labels is not None and len(labels) != k:
        raise ValueError(f"labels has {len(labels)} entries for {k} examples")
    preds = None
    if predictions is not None:
        preds = torch.as_tensor(predictions).detach().cpu().long().numpy()
        if preds.shape != (len(eps_list) + 1, k):
            raise ValueError(
                f"predictions must be [E+1, k] = [{len(eps_list) + 1}, {k}] (row 0 = clean), "
                f"got shape {tuple(preds.shape)}"
            )

    def class_name(index: int) -> str:
        if class_names is not None and 0 <= index < len(class_names):
            return str(class_names[index])
        return str(index)

    n = min(k, max_examples)
    # Each row: (row label, [(image, title, title colour) per column]).
    rows: list[tuple[str, list[tuple[np.ndarray, str, str]]]] = []
    cells = []
    for j in range(n):
        parts = []
        if labels is not None:
            parts.append(f"label {labels[j]}")
        if preds is not None:
            parts.append(f"pred {class_name(int(preds[0, j]))}")
        cells.append((clean_np[j], "\n".join(parts), "black"))
    rows.append(("clean", cells))
    for e_idx, e in enumerate(eps_list):
        if e == 0:
            continue
        adv_cells, delta_cells = [], []
        for j in range(n):
            title, color = "", "black"
            if preds is not None:
                p = int(preds[e_idx + 1, j])
                title = f"pred {class_name(p)}"
                color = "red" if p != int(preds[0, j]) else "black"
            adv_cells.append((adv_np[e_idx, j], title, color))
            delta = adv_np[e_idx, j] - clean_np[j]
            peak = float(np.abs(delta).max())
            scaled = 0.5 + delta / (2 * peak) if peak > 0 else np.full_like(delta, 0.5)
            delta_cells.append((scaled, f"max|δ| {peak:.3g}", "black"))
        n255 = _per_255(e)
        eps_text = f"ε={e:.3g}" if n255 is None else f"ε={e:.3g}\n({n255}/255)"
        rows.append((f"adv\n{eps_text}", adv_cells))
        rows.append((f"δ stretched\n{eps_text}", delta_cells))

    # Layout in inches; the axes spans the figure with data units = inches, y growing downwards.
    cell_w = 1.0
    cell_h = cell_w * height / width
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
    grey = clean_np.shape[1] == 1
    cmap, vmin, vmax = ("gray", 0.0, 1.0) if grey else (None, None, None)
    for (row_label, cells), top in zip(rows, tops, strict=True):
        for j, (image, title, color) in enumerate(cells):
            x0 = left + j * (cell_w + gap_x)
            ax.imshow(
                _hwc(np.clip(image, 0.0, 1.0)),
                extent=(x0, x0 + cell_w, top + cell_h, top),
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
    return _save(fig, path, tight=False)  # laid out in inches already; skips the extra draw pass
