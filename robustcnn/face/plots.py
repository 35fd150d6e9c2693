"""The face study's pictures: the printable patch, clean vs. patched faces, the impersonation
matrix and the genuine/impostor distance distributions.

Why separate from ``report/figures.py``: those draw accuracy-vs-eps curves for classifiers; these
draw identities and distances. Both render with matplotlib's Agg canvas (no pyplot global state) and
write atomically through :func:`robustcnn.plotting.save_figure`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure
from PIL import Image

from robustcnn.plotting import save_figure

__all__ = ["distance_histogram", "face_grid", "save_patch_png", "success_matrix"]


def save_patch_png(patch: torch.Tensor, mask: torch.Tensor, path: str | Path) -> Path:
    """The patch as it would be printed: its colours inside the mask, transparent elsewhere (RGBA)."""
    rgb = (patch.detach().float().clamp(0, 1).cpu().permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    alpha = (mask.detach().float().reshape(mask.shape[-2:]).cpu().numpy() > 0.5).astype(np.uint8) * 255
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp")
    Image.fromarray(np.dstack([rgb, alpha]), mode="RGBA").save(tmp, format="PNG")
    tmp.replace(target)
    return target


def face_grid(
    rows: Sequence[tuple[str, torch.Tensor]], column_titles: Sequence[str], path: str | Path
) -> Path:
    """A grid of faces: one row per (label, batch [N, 3, H, W] in [0, 1]), one column per attacker."""
    n_cols = max(int(batch.shape[0]) for _, batch in rows)
    fig = Figure(figsize=(1.6 * n_cols + 0.6, 1.7 * len(rows)))
    for r, (label, batch) in enumerate(rows):
        for c in range(n_cols):
            ax = fig.add_subplot(len(rows), n_cols, r * n_cols + c + 1)
            ax.set_xticks([])
            ax.set_yticks([])
            if c < batch.shape[0]:
                ax.imshow(batch[c].detach().float().clamp(0, 1).cpu().permute(1, 2, 0).numpy())
            if c == 0:
                ax.set_ylabel(label, fontsize=8)
            if r == 0 and c < len(column_titles):
                ax.set_title(column_titles[c], fontsize=6)
    return save_figure(fig, path)


def success_matrix(
    matrix: Sequence[Sequence[float | None]],
    attackers: Sequence[str],
    targets: Sequence[str],
    path: str | Path,
) -> Path:
    """Impersonation success per attacker (rows) and target (columns), on held-out draws."""
    values = np.array([[np.nan if v is None else float(v) for v in row] for row in matrix], dtype=float)
    fig = Figure(figsize=(1.0 + 0.55 * max(len(targets), 2), 1.0 + 0.45 * max(len(attackers), 2)))
    ax = fig.add_subplot(1, 1, 1)
    image = ax.imshow(np.ma.masked_invalid(values), vmin=0.0, vmax=1.0, cmap="viridis")
    ax.set_xticks(range(len(targets)), [str(t) for t in targets], rotation=60, ha="right", fontsize=7)
    ax.set_yticks(range(len(attackers)), [str(a) for a in attackers], fontsize=7)
    ax.set_xlabel("impersonated identity")
    ax.set_ylabel("attacker")
    for (i, j), value in np.ndenumerate(values):
        if not np.isnan(value):
            colour = "w" if value < 0.6 else "k"
            ax.text(j, i, f"{value:.0%}", ha="center", va="center", fontsize=6, color=colour)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="success rate (held-out draws)")
    return save_figure(fig, path)


def distance_histogram(
    impostor: Sequence[float], genuine: Sequence[float], thresholds: dict[str, float], path: str | Path
) -> Path:
    """Impostor (different people) and genuine (same face, re-cropped) distances with the thresholds."""
    fig = Figure(figsize=(6, 3.6))
    ax = fig.add_subplot(1, 1, 1)
    bins = np.linspace(0.0, max([*impostor, *genuine, *thresholds.values(), 1.0]) * 1.05, 40).tolist()
    if impostor:
        ax.hist(impostor, bins=bins, alpha=0.6, label=f"impostor pairs ({len(impostor)})", density=True)
    if genuine:
        ax.hist(genuine, bins=bins, alpha=0.6, label=f"genuine pairs ({len(genuine)})", density=True)
    for name, value in thresholds.items():
        colour = "k" if "cal" in name else "r"
        ax.axvline(value, linestyle="--", linewidth=1, label=f"{name} {value:.3f}", color=colour)
    ax.set_xlabel("Euclidean distance of descriptors")
    ax.set_ylabel("density")
    ax.legend(fontsize=7)
    return save_figure(fig, path)
