"""Who takes part in a face study: the faces the ``data`` section names, enrolled one photo per identity.

Why enrolment is separate from the gallery: the gallery is a set of labelled crops; a study needs
them split into what the recognizer stores (one enrolment photo per identity), what an attacker
optimises a patch on, and what judges it (photos the optimisation never saw, where a person has
several: :mod:`robustcnn.face.splits`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any  # Any: the data section (a config mapping)

import torch

from robustcnn.config import config_bool, config_float, config_int, config_section, show
from robustcnn.errors import ConfigError
from robustcnn.face.gallery import FaceGallery, load_face_folder, load_face_gallery
from robustcnn.face.patch import frozen_modules
from robustcnn.face.settings import EYE_LEVEL_BY_BOXES
from robustcnn.face.splits import HELD_OUT_PHOTOS, PhotoSplit, split_photos
from robustcnn.models.face.recognizer import FaceRecognizer


def load_faces(data: dict[str, Any]) -> FaceGallery:
    """The embedded gallery (``data=faces``) or a user's identity folders (``data=face_folder``)."""
    options = {k: v for k, v in data.items() if k != "name"}
    margin = config_float(options.pop("margin", 1.0), "data.margin", minimum=0.0)
    if data["name"] == "faces":
        config_section(options, "data", ["boxes"])
        boxes = options.get("boxes", "aligned")
        if boxes not in EYE_LEVEL_BY_BOXES:
            raise ConfigError(
                f"data.boxes={show(boxes)} is unknown; use data.boxes=aligned or data.boxes=haar"
            )
        return load_face_gallery(margin=margin, boxes=boxes)
    config_section(options, "data", ["root", "detect", "max_per_identity"])
    limit = options.get("max_per_identity")
    return load_face_folder(
        options["root"],
        margin=margin,
        detect=config_bool(options.get("detect", True), "data.detect"),
        max_per_identity=None if limit is None else config_int(limit, "data.max_per_identity", minimum=1),
    )


@dataclass
class Enrolment:
    """Who takes part, and which of their photos enrol them, are optimised on, and judge a patch.

    ``images`` [G, 3, H, W]: one enrolment photo per identity (its template is what the recognizer
    stores); ``splits``: every identity's :class:`~robustcnn.face.splits.PhotoSplit` (rows of
    ``photos``, every crop of the gallery, [N, 3, H, W]); ``files``: each row's photo file name.
    """

    names: list[str]
    images: torch.Tensor
    photos: torch.Tensor
    splits: list[PhotoSplit]
    files: list[str]
    seed: int

    def optimisation_faces(self, identity: int) -> torch.Tensor:
        """The photos of ``identity`` a patch is optimised on (and the in-sample figure is judged on)."""
        return self.photos[list(self.splits[identity].optimisation)]

    def evaluation_faces(self, identity: int) -> torch.Tensor | None:
        """The photos of ``identity`` the optimisation never saw, or None (one photo: none held out)."""
        split = self.splits[identity]
        return self.photos[list(split.evaluation)] if split.held_out == HELD_OUT_PHOTOS else None

    def record(self) -> dict[str, Any]:
        """results.json's ``photo_split``: the seed and, per identity with several photos, who is where."""
        return {
            "seed": self.seed,
            "identities": {
                name: split.to_dict(self.files)
                for name, split in zip(self.names, self.splits, strict=True)
                if len(set(split.enrolment) | set(split.optimisation) | set(split.evaluation)) > 1
            },
        }


def enrol_photos(
    photos: torch.Tensor, identities: list[str], seed: int = 0, files: list[str] | None = None
) -> Enrolment:
    """Photos [N, 3, H, W] with one identity name each (several rows may share one): identities in
    order of first appearance, each one's photos split by :func:`~robustcnn.face.splits.split_photos`.
    ``files``: each row's photo name for the recorded split (default: ``row<i>``)."""
    if photos.dim() != 4 or photos.shape[0] != len(identities):
        raise ConfigError(f"{tuple(photos.shape)} photos for {len(identities)} identity names")
    rows: dict[str, list[int]] = {}
    for i, name in enumerate(identities):
        rows.setdefault(name, []).append(i)
    names = list(rows)
    splits = [split_photos(rows[name], seed, name) for name in names]
    images = photos[[split.enrolment[0] for split in splits]]
    files = files if files is not None else [f"row{i}" for i in range(len(identities))]
    return Enrolment(names, images, photos, splits, files, int(seed))


def enrol(gallery: FaceGallery, seed: int = 0) -> Enrolment:
    """The gallery's photos enrolled and split (seeded by ``seed``), recorded by photo file name."""
    return enrol_photos(gallery.images, gallery.identities, seed, [s.image for s in gallery.sources])


def templates(
    recognizer: FaceRecognizer, enrolment: Enrolment, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """``recognizer``'s enrolled templates [G, D] (what it stores) and the attacker-known ones (mean
    descriptor of each identity's optimisation photos)."""
    with frozen_modules([recognizer.embedder]):
        descriptors = recognizer.embed_batched(enrolment.photos.to(device)).float()
    enrolled = descriptors[[split.enrolment[0] for split in enrolment.splits]]
    known = torch.stack([descriptors[list(split.optimisation)].mean(0) for split in enrolment.splits])
    return enrolled, known
