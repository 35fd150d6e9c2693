"""File names made from strings a user or a store controls (experiment names, model names).

Why one rule: such a string can hold ``/``, ``..`` or control characters, and a folder named
after it must stay inside the output folder the user chose. Only ``[A-Za-z0-9._-]`` survive, runs
of anything else become one ``_``, and leading/trailing dots go (so ``..`` cannot survive).
"""

from __future__ import annotations

import re

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def safe_file_name(name: str, fallback: str = "unnamed") -> str:
    """``name`` reduced to a safe single path component (``fallback`` when nothing is left)."""
    return _UNSAFE.sub("_", name).strip("._") or fallback
