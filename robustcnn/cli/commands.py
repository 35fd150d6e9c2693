"""The subcommands besides ``run``: list, report, ui, audit, sync, assets (each imports what it needs)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from robustcnn.cli.output import fail, quiet_libraries
from robustcnn.errors import RobustCNNError
from robustcnn.interrupts import catch_interrupts, raise_if_requested


def cmd_list() -> None:
    """Print every config group with its choices, and the registered datasets and models."""
    from robustcnn.config import conf_dir, config_groups
    from robustcnn.data import available_datasets
    from robustcnn.models import available_models

    print(f"configs: {conf_dir()}")
    for group, choices in config_groups().items():
        print(f"  {group}: {', '.join(choices)}")
    print(f"datasets: {', '.join(available_datasets())}")
    print(f"models: {', '.join(available_models())}")


def cmd_report(ns: argparse.Namespace) -> None:
    """Build the HTML dashboard of one experiment (or all) from the MLflow store; print the paths."""
    from robustcnn.report import build_report
    from robustcnn.tracking.store import TrackingStore

    quiet_libraries()
    uri = ns.tracking_uri or TrackingStore.resolve().uri
    for path in build_report(uri, ns.experiment, Path(ns.out)):
        print(path)


def cmd_ui(ns: argparse.Namespace) -> None:
    """Serve the MLflow UI on the project's store (tracking.ui); 127.0.0.1 unless --host says otherwise."""
    from robustcnn.tracking.schema import sqlite_file
    from robustcnn.tracking.store import TrackingStore
    from robustcnn.tracking.ui import serve

    uri = ns.tracking_uri or TrackingStore.resolve().uri
    if sqlite_file(uri) is not None:
        # a new store is made here the safe way (robustcnn/tracking/schema.py), not by the server
        # while a sweep started beside it makes it too
        store = TrackingStore.at(uri)
        store.check_writable()
        _ = store.client
    serve(uri, ns.host, ns.port)


def cmd_audit(ns: argparse.Namespace) -> None:
    """Audit one model file or MLflow model; the exit code is the verdict (robustcnn.jobs.audit)."""
    from robustcnn.jobs.audit import output_folder_of, run_audit, summary_line
    from robustcnn.progress import progress_enabled

    quiet_libraries()
    try:
        with catch_interrupts():
            code, results = run_audit(ns.model, ns.overrides, progress=progress_enabled())
            raise_if_requested()
    except KeyboardInterrupt:
        fail("interrupted; files already written are kept", 130)
    except RobustCNNError:
        raise
    except Exception as exc:  # an untrusted model can fail anywhere: one line, never a traceback
        if os.environ.get("ROBUSTCNN_DEBUG"):
            raise
        fail(
            f"the audit stopped: {type(exc).__name__}: {' '.join(str(exc).split())[:300]} "
            "(set ROBUSTCNN_DEBUG=1 for the traceback and report it if the model is valid)"
        )
    print(summary_line(results, output_folder_of(results)))
    raise SystemExit(code)


def cmd_sync(ns: argparse.Namespace) -> None:
    """Import jobs whose tracking store failed while they ran (tracking.sync); exit 1 if any is damaged."""
    from robustcnn.tracking.sync import sync

    quiet_libraries()
    outcomes = sync(ns.paths, ns.tracking_uri)
    for outcome in outcomes:
        print(outcome.line())
    count = {s: sum(o.status == s for o in outcomes) for s in ("imported", "present", "damaged")}
    print(
        f"sync: {count['imported']} imported, {count['present']} already present, {count['damaged']} damaged"
    )
    if count["damaged"]:
        raise SystemExit(1)


def cmd_assets(ns: argparse.Namespace) -> None:
    """Fetch, verify and convert the face-recognition assets (models.face.assets), the held-out
    recognizers (models.face.human_assets) and the photos of the same people (models.face.photo_assets);
    print where they are."""
    from robustcnn.models.face.assets import fetch_face_api
    from robustcnn.models.face.human_assets import fetch_human_models
    from robustcnn.models.face.photo_assets import fetch_photos

    print(fetch_face_api(dest=ns.dir, tarball=ns.tarball, force=ns.force))
    print(fetch_human_models(dest=ns.dir, tarball=ns.human_models_tarball, force=ns.force))
    print(fetch_photos(dest=ns.dir, sdist=ns.photos_sdist, force=ns.force))

