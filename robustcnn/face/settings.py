"""The ``face`` section of a face study, checked before any work: what the study builds and runs.

Why here, not in the job: these are the study's own settings (mask, patch optimisation, physical
variation, who attacks whom, the threshold rule); the job only prepares, opens the run and records.
A bad value fails in seconds, before photos, weights or the tracking store are touched, with the key
and a valid example in the message.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any  # Any: config sections (mappings of user values)

import torch

from robustcnn.config import config_bool, config_float, config_int, config_section, show
from robustcnn.device import check_threads, resolve_device
from robustcnn.errors import ConfigError
from robustcnn.face.masks import make_mask
from robustcnn.face.patch import PatchSettings
from robustcnn.face.transforms import PhysicalVariation

#: Keys of the ``face`` section (anything else is a typo and refused).
FACE_KEYS = (
    "recognizer",
    "recognizers",
    "holdout_recognizers",
    "threshold",
    "far",
    "attackers",
    "targets",
    "mask",
    "mask_params",
    "steps",
    "step_size",
    "optimizer",
    "momentum",
    "eot_samples",
    "eot_batch",
    "eval_draws",
    "tv_weight",
    "nps_weight",
    "nps_variant",
    "early_stop",
    "variation",
    "eval_variation",
    "keep_faces",
)
#: ``face.variation`` / ``face.eval_variation`` may name a preset instead of listing ranges.
VARIATION_PRESETS = ("physical", "digital")


def _variation(value: object, key: str) -> PhysicalVariation:
    """``physical`` (the default ranges), ``digital`` (none), or a mapping of ranges."""
    if value in (None, "physical"):
        return PhysicalVariation()
    if value == "digital":
        return PhysicalVariation.identity()
    if isinstance(value, str):
        raise ConfigError(
            f"{key}={show(value)} is unknown; use {' or '.join(VARIATION_PRESETS)} or a mapping"
        )
    try:
        return PhysicalVariation.from_dict(config_section(value, key))
    except ConfigError as exc:
        raise ConfigError(f"{key}: {exc}") from exc
    except TypeError as exc:  # e.g. a print_model mapping with an unknown key
        raise ConfigError(f"{key}: {' '.join(str(exc).split())}") from exc


#: Eye height below the top of a face box, as a fraction of its side, per kind of box: face-api's
#: landmark-aligned boxes (measured 0.301 +- 0.009 on the gallery) and OpenCV Haar boxes (0.392 +- 0.020).
EYE_LEVEL_BY_BOXES = {"aligned": 0.30, "haar": 0.38}
#: Masks drawn relative to the face box (the others are fractions of the crop, or a user's PNG).
FACE_BOX_MASKS = ("eyeglasses", "hat_band")


def mask_geometry(mask_name: str, data: dict[str, Any]) -> dict[str, Any]:
    """Where the face box sits in the crop (``data.margin``) and, for eyeglasses, the eye height."""
    if mask_name not in FACE_BOX_MASKS:
        return {}
    margin = data.get("margin", 0.0)
    geometry: dict[str, Any] = {"margin": float(margin) if isinstance(margin, (int, float)) else 0.0}
    if mask_name == "eyeglasses":
        boxes = data.get("boxes", "aligned") if data.get("name") == "faces" else "haar"
        geometry["eye_level"] = EYE_LEVEL_BY_BOXES.get(boxes, EYE_LEVEL_BY_BOXES["haar"])
    return geometry


IdentitySelection = int | list[str] | None


def _identity_selection(value: object, key: str) -> IdentitySelection:
    """The first N gallery identities (an int), all of them (null), or a list of identity names."""
    if value is None:
        return None
    if isinstance(value, (list, tuple)):
        if not value or not all(isinstance(name, str) and name for name in value):
            raise ConfigError(
                f"{key}={show(value)} must be a count, null (all) or a non-empty list of identity names, "
                f"e.g. {key}=[grace_hopper,sample1_face0]"
            )
        return list(dict.fromkeys(value))
    return config_int(value, key, minimum=0, hint=" (a count, null for all, or a list of identity names)")


def select_identities(selection: IdentitySelection, names: list[str], key: str) -> list[int]:
    """Indices of the selected identities; an unknown name is an error that lists the gallery's names."""
    if selection is None:
        return list(range(len(names)))
    if isinstance(selection, int):
        return list(range(min(selection, len(names))))
    unknown = [name for name in selection if name not in names]
    if unknown:
        shown = ", ".join(names[:12]) + (", ..." if len(names) > 12 else "")
        raise ConfigError(
            f"{key} names {unknown}, not in the face data's {len(names)} identities ({shown}); "
            "pick names from the gallery (results.json lists them) or give a count"
        )
    return [names.index(name) for name in selection]


#: ``face.holdout_recognizers: auto``: every recognizer robustcnn ships that the optimisation does not use.
AUTO = "auto"


def _names(value: object, key: str, example: str) -> list[str]:
    """A list of recognizer names or TorchScript paths (each once, in order)."""
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) and v for v in value):
        raise ConfigError(
            f"{key}={show(value)} must be a list of recognizer names or TorchScript paths, e.g. {example}"
        )
    return list(dict.fromkeys(value))


def _ensemble(values: dict[str, Any]) -> tuple[str, ...]:
    """``face.recognizers`` (a list: optimise against all of them) wins over ``face.recognizer`` (one)."""
    value = values.get("recognizers")
    if value is None or value == []:
        return (str(values.get("recognizer", "face_api")),)
    return tuple(_names(value, "face.recognizers", "face.recognizers=[face_api,faceres]"))


def _holdouts(values: dict[str, Any], ensemble: tuple[str, ...]) -> tuple[str, ...]:
    """``face.holdout_recognizers``: ``auto`` (every shipped recognizer outside ``ensemble``), [] for
    none, or names / TorchScript paths, none of them one the patches are optimised against."""
    from robustcnn.models.face.loading import RECOGNIZER_NAMES

    value = values.get("holdout_recognizers", AUTO)
    if value == AUTO:
        return tuple(name for name in RECOGNIZER_NAMES if name not in ensemble)
    example = "face.holdout_recognizers=[faceres,mobileface], auto or []"
    names = _names([] if value is None else value, "face.holdout_recognizers", example)
    optimised = [name for name in names if name in ensemble]
    if optimised:
        raise ConfigError(
            f"face.holdout_recognizers lists {', '.join(optimised)}, optimised against "
            f"(face.recognizer/face.recognizers): a held-out recognizer is one the optimisation never saw; "
            "remove it, or use face.holdout_recognizers=auto"
        )
    return tuple(names)


def _threshold(values: dict[str, Any]) -> float | None:
    """``face.threshold``: a distance, or None (``calibrated``, the default) for the FAR calibration."""
    threshold = values.get("threshold", "calibrated")
    if threshold in (None, "calibrated"):
        return None
    return config_float(threshold, "face.threshold", minimum=0.0, above=True, hint=" (or calibrated)")


def _mask(values: dict[str, Any], data: dict[str, Any]) -> tuple[str, torch.Tensor]:
    """``face.mask`` (a mask name or a crop-sized PNG) drawn for the data's crop geometry, and its name."""
    mask_name = values.get("mask", "eyeglasses")
    if not isinstance(mask_name, str):
        raise ConfigError(f"face.mask={show(mask_name)} must be a mask name or a PNG path")
    mask_params = config_section(values.get("mask_params") or {}, "face.mask_params")
    mask_params = {**mask_geometry(mask_name, data), **mask_params}
    if mask_name.lower().endswith(".png"):  # a user's mask file: white = patch, crop-sized
        mask_params = {**mask_params, "path": mask_name}
    try:
        mask = make_mask("png" if "path" in mask_params else mask_name, **mask_params)
    except (ConfigError, TypeError) as exc:
        detail = " ".join(str(exc).split())
        raise ConfigError(f"face.mask={mask_name} with face.mask_params={mask_params}: {detail}") from exc
    return mask_name, mask


def _eot_batch(value: object) -> int | None:
    """``face.eot_batch``: draws per forward pass of the recognizer; null (the default): all of a step's."""
    if value is None:
        return None
    return config_int(value, "face.eot_batch", minimum=1, hint=" (or null: all of a step's draws at once)")


def _patch_settings(values: dict[str, Any], variation: PhysicalVariation, seed: int) -> PatchSettings:
    """How each patch is optimised: steps, step rule, EOT draws, regularisers, early stop."""
    optimizer = values.get("optimizer", "sign")
    return PatchSettings(
        steps=config_int(values.get("steps", 200), "face.steps", minimum=1),
        step_size=config_float(
            values.get("step_size", 2.0 / 255.0), "face.step_size", minimum=0.0, maximum=1.0, above=True
        ),
        optimizer=optimizer if isinstance(optimizer, str) else show(optimizer),
        momentum=config_float(
            values.get("momentum", 0.9), "face.momentum", minimum=0.0, maximum=1.0, below=True
        ),
        eot_samples=config_int(values.get("eot_samples", 8), "face.eot_samples", minimum=1),
        eot_batch=_eot_batch(values.get("eot_batch")),
        tv_weight=config_float(values.get("tv_weight", 0.0), "face.tv_weight", minimum=0.0),
        nps_weight=config_float(values.get("nps_weight", 0.0), "face.nps_weight", minimum=0.0),
        nps_variant=str(values.get("nps_variant", "product")),
        variation=variation,
        seed=seed,
        early_stop=config_bool(values.get("early_stop", True), "face.early_stop"),
    )


@dataclass(frozen=True)
class FacePlan:
    """The ``face`` section, checked before any work: what the study builds and runs."""

    recognizer: str  # the one the study's own figures and threshold report are judged on
    holdout_recognizers: tuple[str, ...]  # scored on, never optimised against
    threshold: float | None  # None: calibrated at ``far`` on the gallery's impostor pairs
    far: float
    attackers: IdentitySelection  # the first N identities, or these names, attack; None: all
    targets: IdentitySelection  # impersonation targets (count or names); 0: no impersonation
    mask_name: str
    mask: torch.Tensor
    patch: PatchSettings
    eval_variation: PhysicalVariation
    eval_draws: int
    keep_faces: int
    ensemble: tuple[str, ...] = ()  # every recognizer the patches are optimised against (first: recognizer)

    @classmethod
    def from_mapping(cls, section: object, seed: int, data: dict[str, Any] | None = None) -> FacePlan:
        """``data`` (the data section) fixes the crop geometry the mask is drawn for.

        Settings are checked in the section's order, so the first bad value is the one reported.
        """
        values = config_section(section, "face", FACE_KEYS)
        ensemble = _ensemble(values)
        holdouts = _holdouts(values, ensemble)
        threshold = _threshold(values)
        mask_name, mask = _mask(values, data or {})
        variation = _variation(values.get("variation"), "face.variation")
        eval_raw = values.get("eval_variation")
        eval_variation = variation if eval_raw is None else _variation(eval_raw, "face.eval_variation")
        patch = _patch_settings(values, variation, seed)
        return cls(
            recognizer=ensemble[0],
            holdout_recognizers=holdouts,
            threshold=threshold,
            far=config_float(values.get("far", 0.01), "face.far", minimum=0.0, maximum=1.0, below=True),
            attackers=_identity_selection(values.get("attackers"), "face.attackers"),
            targets=_identity_selection(values.get("targets", 0), "face.targets"),
            mask_name=mask_name,
            mask=mask,
            patch=patch,
            eval_variation=eval_variation,
            eval_draws=config_int(values.get("eval_draws", 64), "face.eval_draws", minimum=1),
            keep_faces=config_int(values.get("keep_faces", 8), "face.keep_faces", minimum=0),
            ensemble=ensemble,
        )


def check_face_config(config: dict[str, Any], *, device: bool = True) -> FacePlan:
    """Every check of a face job that needs no data, weights or store (bad values fail here)."""
    check_threads(config.get("threads"))
    seed = config_int(config.get("seed", 0), "seed", minimum=0)
    if device:
        resolve_device(config.get("device", "auto"))
    data = config.get("data") or {}
    if data.get("name") not in ("faces", "face_folder"):
        raise ConfigError(
            f"task=face_patch needs face data, got data={show(data.get('name'))}; use data=faces "
            "(the embedded gallery) or data=face_folder data.root=/path/to/one/folder/per/person"
        )
    return FacePlan.from_mapping(config.get("face"), seed, data)


def study_identities(plan: FacePlan, names: list[str]) -> tuple[list[int], list[int]]:
    """The attackers' and the targets' indices among the enrolled ``names``, checked against them.

    Why after loading: names and counts can only be checked once the photos are read; a study needs
    3 identities (impostor pairs for the threshold, a target to impersonate) and one attacker.
    """
    if len(names) < 3:
        raise ConfigError(
            f"the face data has {len(names)} identities; a study needs at least 3 (impostor pairs for the "
            "threshold, a target to impersonate): add identity folders or use data=faces"
        )
    attackers = select_identities(plan.attackers, names, "face.attackers")
    targets = select_identities(plan.targets, names, "face.targets")
    if not attackers:
        raise ConfigError("face.attackers=0 leaves nobody to attack; set face.attackers to 1 or more")
    return attackers, targets
