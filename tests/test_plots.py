"""The example grid: valid PNGs for the odd inputs sweeps produce, drawn without a plotting library."""

from __future__ import annotations

import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from PIL import Image

from robustcnn.report.figures import example_grid


def _png_size(path: Path) -> tuple[int, int]:
    """Open and fully decode the file: a truncated or non-PNG file fails here."""
    assert path.is_file() and path.stat().st_size > 0
    with Image.open(path) as img:
        assert img.format == "PNG"
        img.load()
        assert img.width > 0 and img.height > 0
        return img.size


def _attack(
    eps: list[float], k: int = 5, channels: int = 1, size: int = 12
) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    clean = torch.rand(k, channels, size, size, generator=gen)
    signs = torch.randint(0, 2, (len(eps), k, channels, size, size), generator=gen).float() * 2 - 1
    radii = torch.tensor(eps).view(-1, 1, 1, 1, 1)
    adv = (clean.unsqueeze(0) + radii * signs).clamp(0, 1)
    return clean, adv


@pytest.mark.parametrize("channels", [1, 3])
def test_example_grid_grey_and_rgb_with_zero_eps(tmp_path: Path, channels: int) -> None:
    eps = [0.0, 0.1, 0.3]
    clean, adv = _attack(eps, k=5, channels=channels)
    preds = torch.tensor([[0, 1, 2, 3, 4], [0, 1, 2, 3, 4], [0, 7, 2, 9, 4], [1, 7, 8, 9, 4]])
    names = [f"c{i}" for i in range(10)]
    out = example_grid(
        tmp_path / "g" / f"grid{channels}.png",
        clean,
        adv,
        eps,
        labels=list("01234"),
        predictions=preds,
        class_names=names,
    )
    size = _png_size(out)
    # The eps=0 block draws nothing: the same grid without it has exactly the same size.
    without_zero = example_grid(
        tmp_path / "nz.png",
        clean,
        adv[1:],
        eps[1:],
        labels=list("01234"),
        predictions=preds[[0, 2, 3]],
        class_names=names,
    )
    assert _png_size(without_zero) == size
    assert size[1] > size[0] * 0.8  # 5 rows of 5 roughly square cells


def test_example_grid_single_eps_max_examples_and_uint8(tmp_path: Path) -> None:
    clean, adv = _attack([8 / 255], k=20, channels=3, size=8)
    wide = _png_size(example_grid(tmp_path / "w.png", clean, adv, [8 / 255], max_examples=8))
    narrow = _png_size(example_grid(tmp_path / "n.png", clean, adv, [8 / 255], max_examples=3))
    assert narrow[0] < wide[0]
    as_bytes = (clean * 255).round().to(torch.uint8)
    _png_size(example_grid(tmp_path / "u8.png", as_bytes, as_bytes.unsqueeze(0), [0.1]))  # zero delta
    _png_size(example_grid(tmp_path / "zero.png", clean, clean.unsqueeze(0), [0.0]))  # clean row only


def test_example_grid_rejects_mismatched_shapes(tmp_path: Path) -> None:
    clean, adv = _attack([0.1, 0.2], k=3)
    with pytest.raises(ValueError, match="one block per eps"):
        example_grid(tmp_path / "x.png", clean, adv, [0.1])
    with pytest.raises(ValueError, match=r"\[E\+1, k\]"):
        example_grid(tmp_path / "x.png", clean, adv, [0.1, 0.2], predictions=torch.zeros(2, 3))
    with pytest.raises(ValueError, match="C = 1 or 3"):
        example_grid(tmp_path / "x.png", clean[:, :, :, :].repeat(1, 2, 1, 1), adv, [0.1, 0.2])


def test_drawing_imports_no_plotting_library(tmp_path: Path) -> None:
    """A report draws one grid per run: matplotlib's import alone cost more than a grid does now."""
    code = (
        "import sys, torch\n"
        "from robustcnn.report.figures import example_grid\n"
        "clean = torch.rand(2, 1, 6, 6)\n"
        f"example_grid({str(tmp_path / 'g.png')!r}, clean, clean.unsqueeze(0), [0.1])\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'matplotlib'))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
    _png_size(tmp_path / "g.png")


def test_parallel_threads(tmp_path: Path) -> None:
    """Report builds may draw from several threads at once: no shared state to race on."""
    clean, adv = _attack([0.1], k=3, channels=3, size=8)

    def job(i: int) -> Path:
        return example_grid(tmp_path / f"g{i}.png", clean, adv, [0.1])

    with ThreadPoolExecutor(max_workers=4) as pool:
        paths = list(pool.map(job, range(4)))
    for path in paths:
        _png_size(path)
