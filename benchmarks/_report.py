"""What every benchmark writes: the machine it ran on, the date, and its JSON under reports/benchmarks/.

Why shared: figures are only comparable with the machine next to them (threads, load, GPU), and
every benchmark should record the same facts about it; and every report is stamped with the script,
the commit and a digest (_provenance.py), so a figure typed into it by hand shows.
"""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path
from typing import Any

import torch
from _provenance import stamp


def machine_info(device: torch.device | None = None) -> dict[str, Any]:
    """Platform, versions, threads, load average and GPU of the machine running the benchmark."""
    cuda = torch.cuda.is_available() and (device is None or device.type == "cuda")
    return {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "device": device.type if device is not None else ("cuda" if cuda else "cpu"),
        "cpu_threads": torch.get_num_threads(),
        "load_average": [round(v, 2) for v in os.getloadavg()],
        "gpu": torch.cuda.get_device_name(0) if cuda else None,
    }


def write_report(
    out: Path, name: str, results: Any, device: torch.device | None = None, **extra: Any
) -> None:
    """Write ``{"benchmark", ...extra, "machine", "date", "results", "written_by", "sha256"}`` to ``out``.

    The whole file comes from here: nothing may be added to it by hand (the digest would not match).
    """
    payload = {
        "benchmark": name,
        **extra,
        "machine": machine_info(device),
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "results": results,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(stamp(payload), indent=2) + "\n")
    print(f"wrote {out}")
