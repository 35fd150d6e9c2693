"""``image_folder``: a user's own images, one sub-folder per class (``root/<class>/*.png``).

Class names are the sorted sub-folder names (label i = i-th name), every image is converted to
grey (``channels=1``) or RGB (``channels=3``) and resized bilinearly to ``image_size`` [H, W], and a
seeded stratified split holds out ``test_fraction`` of each class. Hidden files and files whose
extension is not an image format are ignored; an image that cannot be decoded is an error that names
it (silently skipping it would change the data without anyone noticing).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from robustcnn.data.base import Dataset, build_dataset, short_sha256
from robustcnn.data.registry import register_dataset
from robustcnn.data.split import check_seed, stratified_split
from robustcnn.data.validate import check_fraction, check_int_choice, check_root, check_size
from robustcnn.errors import DataError

IMAGE_SUFFIXES = frozenset(
    {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}
)


def _visible(name: str) -> bool:
    return not name.startswith(".")


def list_images(root: Path) -> tuple[list[str], list[tuple[Path, int]]]:
    """(class names, [(image path, label)]) for a class-per-folder tree, in a fixed sorted order."""
    if not root.is_dir():
        raise DataError(
            f"image_folder root {root} does not exist or is not a folder; set data.root to a "
            "folder that holds one sub-folder of images per class"
        )
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and _visible(p.name))
    if len(classes) < 2:
        raise DataError(
            f"image_folder root {root} has {len(classes)} class folder(s) "
            f"({', '.join(classes) or 'none'}); a classifier needs at least 2: put each class's "
            "images in its own sub-folder, "
            f"e.g. {root}/cat/*.png and {root}/dog/*.png"
        )
    samples: list[tuple[Path, int]] = []
    for label, name in enumerate(classes):
        files = sorted(
            p
            for p in (root / name).rglob("*")
            if p.is_file()
            and p.suffix.lower() in IMAGE_SUFFIXES
            and all(_visible(part) for part in p.relative_to(root).parts)
        )
        if not files:
            raise DataError(
                f"class folder {root / name} holds no images "
                f"({', '.join(sorted(IMAGE_SUFFIXES))}); add images to it or remove the folder"
            )
        samples.extend((f, label) for f in files)
    return classes, samples


def read_image(path: Path, *, channels: int, size: tuple[int, int]) -> np.ndarray:
    """One image as uint8 [C, H, W]: converted to L or RGB, resized bilinearly to ``size`` = (H, W)."""
    from PIL import Image, UnidentifiedImageError  # deferred: only this dataset needs PIL

    try:
        with Image.open(path) as opened:
            image = opened.convert("L" if channels == 1 else "RGB")
            if image.size != (size[1], size[0]):
                image = image.resize((size[1], size[0]), Image.Resampling.BILINEAR)
            array = np.asarray(image, dtype=np.uint8)
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, ValueError, SyntaxError) as exc:
        raise DataError(f"cannot read image {path} ({exc}); fix or delete the file") from exc
    return array[None] if channels == 1 else array.transpose(2, 0, 1)


@register_dataset("image_folder")
def image_folder(
    root: str,
    image_size: tuple[int, int] | list[int] = (32, 32),
    channels: int = 3,
    test_fraction: float = 0.2,
    split_seed: int = 0,
) -> Dataset:
    """Images from ``root/<class>/...``, split ``1 - test_fraction`` / ``test_fraction`` per class.

    ``identity`` holds a hash of the file list (relative path, class, byte size) and the settings;
    the test images' content hash is added by :func:`~robustcnn.data.load_dataset`. The absolute
    ``root`` is left out on purpose, so the same images give the same identity on any machine.
    """
    folder = check_root(root)
    size = check_size(image_size, "image_size")
    n_channels = check_int_choice(channels, "channels", (1, 3))
    fraction = check_fraction(test_fraction, "test_fraction")
    seed = check_seed(split_seed)
    classes, samples = list_images(folder)
    labels = np.array([label for _, label in samples], dtype=np.int64)
    images = np.stack([read_image(path, channels=n_channels, size=size) for path, _ in samples])
    train, test = stratified_split(labels, seed=seed, test_fraction=fraction)
    if len(test) == 0:
        raise DataError(
            f"image_folder {folder}: no class has 2 or more images, so nothing is left for "
            "the test split; add more images per class"
        )
    listing = "\n".join(
        f"{p.relative_to(folder).as_posix()}\t{label}\t{p.stat().st_size}" for p, label in samples
    )
    return build_dataset(
        "image_folder",
        x_train=images[train],
        y_train=labels[train],
        x_test=images[test],
        y_test=labels[test],
        class_names=classes,
        identity={
            "source": "image_folder",
            "files": len(samples),
            "files_sha256": short_sha256(listing.encode()),
            "image_size": f"{size[0]}x{size[1]}",
            "channels": n_channels,
            "test_fraction": fraction,
            "split_seed": seed,
        },
    )
