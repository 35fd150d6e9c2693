"""One face patch study: gallery -> recognizer -> threshold -> patches -> held-out evaluation -> MLflow.

Why a job of its own: a face study has no classifier to train and no eps curve; it attacks a
pretrained face recognizer with physical patches (eyeglass frames, stickers, hat bands) and measures
dodging and impersonation on held-out physical draws. It shares everything else with the classifier
job (``runner.prepare_job``: device, store and folder checks, dedupe and resume, run.json/results.json,
store-loss handling and ``robustcnn sync``), so a sweep can mix both.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from robustcnn.config import config_bool, config_float, config_int, config_section, show
from robustcnn.device import check_threads, resolve_device
from robustcnn.errors import ConfigError
from robustcnn.face.gallery import FaceGallery
from robustcnn.face.masks import area_percent, make_mask
from robustcnn.face.patch import PatchSettings
from robustcnn.face.transforms import PhysicalVariation
from robustcnn.models.face.recognizer import Calibration, FaceRecognizer, calibrate_threshold, impostor_pairs
from robustcnn.tracking.store import flatten
from robustcnn.tracking.sweep_link import SweepLink

log = logging.getLogger(__name__)

#: Keys of the ``face`` section (anything else is a typo and refused).
FACE_KEYS = (
    "recognizer",
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


def _variation(value: Any, key: str) -> PhysicalVariation:
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


def _identity_selection(value: Any, key: str) -> IdentitySelection:
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


@dataclass(frozen=True)
class FacePlan:
    """The ``face`` section, checked before any work: what the study builds and runs."""

    recognizer: str
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

    @classmethod
    def from_mapping(cls, section: Any, seed: int, data: dict[str, Any] | None = None) -> FacePlan:
        """``data`` (the data section) fixes the crop geometry the mask is drawn for."""
        values = config_section(section, "face", FACE_KEYS)
        threshold = values.get("threshold", "calibrated")
        if threshold in (None, "calibrated"):
            threshold_value = None
        else:
            threshold_value = config_float(
                threshold, "face.threshold", minimum=0.0, above=True, hint=" (or calibrated)"
            )
        mask_name = values.get("mask", "eyeglasses")
        if not isinstance(mask_name, str):
            raise ConfigError(f"face.mask={show(mask_name)} must be a mask name or a PNG path")
        mask_params = config_section(values.get("mask_params") or {}, "face.mask_params")
        mask_params = {**mask_geometry(mask_name, data or {}), **mask_params}
        if mask_name.lower().endswith(".png"):  # a user's mask file: white = patch, crop-sized
            mask_params = {**mask_params, "path": mask_name}
        try:
            mask = make_mask("png" if "path" in mask_params else mask_name, **mask_params)
        except (ConfigError, TypeError) as exc:
            detail = " ".join(str(exc).split())
            raise ConfigError(f"face.mask={mask_name} with face.mask_params={mask_params}: {detail}") from exc
        variation = _variation(values.get("variation"), "face.variation")
        eval_raw = values.get("eval_variation")
        eval_variation = variation if eval_raw is None else _variation(eval_raw, "face.eval_variation")
        optimizer = values.get("optimizer", "sign")
        patch = PatchSettings(
            steps=config_int(values.get("steps", 200), "face.steps", minimum=1),
            step_size=config_float(
                values.get("step_size", 2.0 / 255.0), "face.step_size", minimum=0.0, maximum=1.0, above=True
            ),
            optimizer=optimizer if isinstance(optimizer, str) else show(optimizer),
            momentum=config_float(
                values.get("momentum", 0.9), "face.momentum", minimum=0.0, maximum=1.0, below=True
            ),
            eot_samples=config_int(values.get("eot_samples", 8), "face.eot_samples", minimum=1),
            tv_weight=config_float(values.get("tv_weight", 0.0), "face.tv_weight", minimum=0.0),
            nps_weight=config_float(values.get("nps_weight", 0.0), "face.nps_weight", minimum=0.0),
            nps_variant=str(values.get("nps_variant", "product")),
            variation=variation,
            seed=seed,
            early_stop=config_bool(values.get("early_stop", True), "face.early_stop"),
        )
        return cls(
            recognizer=str(values.get("recognizer", "face_api")),
            threshold=threshold_value,
            far=config_float(values.get("far", 0.01), "face.far", minimum=0.0, maximum=1.0, below=True),
            attackers=_identity_selection(values.get("attackers"), "face.attackers"),
            targets=_identity_selection(values.get("targets", 0), "face.targets"),
            mask_name=mask_name,
            mask=mask,
            patch=patch,
            eval_variation=eval_variation,
            eval_draws=config_int(values.get("eval_draws", 64), "face.eval_draws", minimum=1),
            keep_faces=config_int(values.get("keep_faces", 8), "face.keep_faces", minimum=0),
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


def load_faces(data: dict[str, Any]) -> FaceGallery:
    """The embedded gallery (``data=faces``) or a user's identity folders (``data=face_folder``)."""
    from robustcnn.face.gallery import load_face_folder, load_face_gallery

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


def genuine_distances(
    recognizer: FaceRecognizer, gallery: FaceGallery, data: dict[str, Any]
) -> tuple[torch.Tensor, str]:
    """Same-person distances: real pairs when identities have several photos, else re-crop jitter."""
    labels = gallery.labels
    if len(set(gallery.identities)) < len(gallery):
        d = torch.cdist(*(2 * [recognizer.embed_batched(gallery.images)]))
        upper = torch.triu(torch.ones_like(d, dtype=torch.bool), diagonal=1)
        return d[upper & (labels[:, None] == labels[None, :])], "same-person photo pairs"
    if data["name"] != "faces":
        return torch.empty(0), "none (one photo per identity)"
    from robustcnn.face.gallery import genuine_jitter_pairs

    original, jittered, _ = genuine_jitter_pairs(
        margin=float(data.get("margin", 0.0)), boxes=str(data.get("boxes", "aligned"))
    )
    return (
        recognizer.distance(recognizer.embed_batched(original), recognizer.embed_batched(jittered)),
        "re-crops of the same photo with a jittered box (a lower bound on real same-person distances)",
    )


def _quantiles(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"min": None, "p05": None, "median": None, "max": None}
    t = torch.tensor(values, dtype=torch.float64)
    q = torch.quantile(t, torch.tensor([0.05, 0.5], dtype=torch.float64)).tolist()
    return {"min": float(t.min()), "p05": q[0], "median": q[1], "max": float(t.max())}


def calibration_report(calibration: Calibration, published: float, genuine_source: str) -> dict[str, Any]:
    """What the threshold rests on: both distributions and both thresholds' error rates."""
    impostor, genuine = calibration.impostor_distances, calibration.genuine_distances

    def rates(threshold: float) -> dict[str, float | None]:
        far = sum(d < threshold for d in impostor) / len(impostor)
        frr = sum(d >= threshold for d in genuine) / len(genuine) if genuine else None
        return {"threshold": threshold, "false_accept_rate": far, "false_reject_rate": frr}

    return {
        "target_far": calibration.target_far,
        "calibrated": rates(calibration.threshold),
        "published": rates(published),
        "impostor_pairs": len(impostor),
        "genuine_pairs": len(genuine),
        "genuine_source": genuine_source,
        "impostor_distance": _quantiles(impostor),
        "genuine_distance": _quantiles(genuine),
    }


def write_face_artifacts(
    out: Path, study: Any, plan: FacePlan, calibration: Calibration, published: float, enrolment: Enrolment
) -> list[Path]:
    """Patch PNGs (as printed), clean vs. patched faces, the impersonation matrix, the distances."""
    from robustcnn.face.plots import distance_histogram, face_grid, save_patch_png, success_matrix
    from robustcnn.files import safe_file_name

    written: list[Path] = []
    for key, patch in study.patches.items():
        goal, name = key.split("/", 1)
        written.append(
            save_patch_png(patch, plan.mask, out / "patches" / goal / f"{safe_file_name(name)}.png")
        )
    kept = list(study.adversarial_faces.items())[: plan.keep_faces]
    if kept:
        index = {name: i for i, name in enumerate(enrolment.names)}
        clean = torch.stack([enrolment.images[index[key.split("/", 1)[1].split("__")[0]]] for key, _ in kept])
        patched = torch.stack([face for _, face in kept])
        titles = [  # two short lines: who, and what for
            name.replace("__", "\nas ") if "__" in name else f"{name}\ndodging"
            for name in (key.split("/", 1)[1] for key, _ in kept)
        ]
        written.append(
            face_grid([("clean", clean), ("with patch", patched)], titles, out / "adversarial_faces.png")
        )
    matrix = study.metrics.get("impersonation_matrix") or {}
    if matrix.get("targets"):
        written.append(
            success_matrix(
                matrix["success_rate"],
                matrix["attackers"],
                matrix["targets"],
                out / "impersonation_matrix.png",
            )
        )
    thresholds = {"published": published, "calibrated": calibration.threshold}
    written.append(
        distance_histogram(
            calibration.impostor_distances,
            calibration.genuine_distances,
            thresholds,
            out / "distance_distributions.png",
        )
    )
    return written


def run_face_job(
    config: dict[str, Any],
    output_dir: str | Path | None,
    *,
    progress: bool = True,
    sweep: SweepLink | None = None,
    job_tags: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Run one face patch study end to end; results in ``output_dir/results.json`` and MLflow."""
    from robustcnn.face.study import run_face_study
    from robustcnn.jobs.lifecycle import (
        environment_info,
        job_run_tags,
        open_job_run,
        prepare_job,
        raise_unrecorded,
        record_results,
    )
    from robustcnn.models.face.loading import load_face_recognizer
    from robustcnn.models.face.recognizer import DEFAULT_THRESHOLD

    plan = check_face_config(config)
    ctx = prepare_job(config, output_dir, sweep, uses_cache=False)
    if ctx.previous is not None:
        return ctx.previous
    data = dict(config["data"])
    gallery = load_faces(data)  # before the run opens: a missing photo or weights is one line
    recognizer = load_face_recognizer(plan.recognizer, threshold=DEFAULT_THRESHOLD, device=ctx.device)
    enrolment = enrol(gallery)
    n_ids = len(enrolment.names)
    if n_ids < 3:
        raise ConfigError(
            f"the face data has {n_ids} identities; a study needs at least 3 (impostor pairs for the "
            "threshold, a target to impersonate): add identity folders or use data=faces"
        )
    attackers = select_identities(plan.attackers, enrolment.names, "face.attackers")
    targets = select_identities(plan.targets, enrolment.names, "face.targets")
    if not attackers:
        raise ConfigError("face.attackers=0 leaves nobody to attack; set face.attackers to 1 or more")

    run_name = (config.get("tracking") or {}).get("run_name") or (
        f"{recognizer.name}-{plan.mask_name}-{data['name']}"
    )
    tags = job_run_tags(
        ctx,
        {"task": "face_patch", "model": recognizer.name, "data": data["name"], "mask": plan.mask_name},
        job_tags,
    )
    device = ctx.device
    params = flatten({k: v for k, v in config.items() if k in ("task", "data", "face", "seed", "device")})
    params.update(flatten(gallery.identity, prefix="data_identity."))
    with open_job_run(ctx, run_name, tags, params) as run:

        started = time.perf_counter()
        images = enrolment.images.to(device)
        descriptors = recognizer.embed_batched(images)
        genuine, genuine_source = genuine_distances(recognizer, gallery, data)
        calibration = calibrate_threshold(
            impostor_pairs(descriptors, enrolment.names), plan.far, genuine.to(descriptors.device)
        )
        report = calibration_report(calibration, DEFAULT_THRESHOLD, genuine_source)
        recognizer.threshold = calibration.threshold if plan.threshold is None else plan.threshold
        log.info(
            "face threshold %.4f (%s); impostor pairs below the published 0.6: %.1f%%",
            recognizer.threshold,
            f"calibrated at FAR {plan.far:.3g}" if plan.threshold is None else "set by face.threshold",
            100 * report["published"]["false_accept_rate"],
        )
        probes = {i: p.to(device) for i, p in enrolment.probes.items()}
        study = run_face_study(
            recognizer,
            images,
            enrolment.names,
            attackers,
            targets,
            plan.mask.to(device),
            plan.patch,
            plan.eval_variation,
            plan.eval_draws,
            seed=ctx.seed,
            probe_faces=probes or None,
        )
        study_seconds = time.perf_counter() - started
        results: dict[str, Any] = {
            "task": "face_patch",
            "model": recognizer.name,
            "data": data["name"],
            "mask": plan.mask_name,
            "mask_area_percent": area_percent(plan.mask),
            "identities": n_ids,
            "faces": len(gallery),
            "attackers": [enrolment.names[a] for a in attackers],
            "targets": [enrolment.names[t] for t in targets],
            "threshold": recognizer.threshold,
            "threshold_source": "calibrated" if plan.threshold is None else "config",
            "verification": report,
            "patch_settings": plan.patch.to_dict(),
            "eval_variation": plan.eval_variation.to_dict(),
            "eval_draws": plan.eval_draws,
            **study.metrics,
            "seed": ctx.seed,
            "device": str(device),
            "study_seconds": study_seconds,
            "data_identity": gallery.identity,
            "environment": environment_info(device),
            "mlflow_run_id": run.run_id,
            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        from robustcnn.tracking.records import face_metric_rows

        run.log_metric_rows(face_metric_rows(results))
        run.set_tags({"dodging_success_rate": results.get("dodging_success_rate")})
        if ctx.out is not None:
            artifacts = write_face_artifacts(ctx.out, study, plan, calibration, DEFAULT_THRESHOLD, enrolment)
            for path in artifacts:
                relative = path.parent.relative_to(ctx.out)
                run.log_artifact(path, "plots" if str(relative) == "." else f"plots/{relative}")
        unwritten = record_results(run, ctx, results)
    raise_unrecorded(run, ctx, unwritten)
    log.info(
        "%s: dodging %.3f, impersonation %s, random patch %.3f (held-out draws)",
        run_name,
        results.get("dodging_success_rate") or 0.0,
        results.get("impersonation_success_rate"),
        results.get("random_patch_success_rate") or 0.0,
    )
    return results
