"""Who takes part in a face study: the faces the ``data`` section names, enrolled one photo per identity.

Why enrolment is separate from the gallery: the gallery is a set of labelled crops; a study needs
them split into what the recognizer stores (one enrolment photo per identity) and what an attacker
wears a patch on (that identity's other photos), so a patch is never judged on the very photo the
recognizer enrolled when a second one exists.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any  # Any: the data section (a config mapping)

import torch

from robustcnn.config import config_bool, config_float, config_int, config_section, show
from robustcnn.errors import ConfigError
from robustcnn.face.gallery import FaceGallery, load_face_folder, load_face_gallery
from robustcnn.face.settings import EYE_LEVEL_BY_BOXES


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
    """One enrolment photo per identity (the gallery), the other photos as the attacker's probes."""

    names: list[str]
    images: torch.Tensor  # [G, 3, H, W]
    probes: dict[int, torch.Tensor]  # identity index -> [K, 3, H, W], only for identities with >1 photo


def enrol(gallery: FaceGallery) -> Enrolment:
    """The first photo of each identity enrols it; later photos are what its attacker wears a patch on."""
    images = gallery.images
    names: list[str] = []
    first: list[int] = []
    others: dict[str, list[int]] = {}
    for i, name in enumerate(gallery.identities):
        if name not in others:
            names.append(name)
            first.append(i)
            others[name] = []
        else:
            others[name].append(i)
    probes = {names.index(n): images[idx] for n, idx in others.items() if idx}
    return Enrolment(names, images[first], probes)
