"""How the command speaks: one error line and an exit code, and no third-party chatter.

Why shared: every subcommand ends the same way on an error a user can fix (``robustcnn: error: ...``,
exit code 2 unless the error says otherwise), never with a traceback.
"""

from __future__ import annotations

import logging
import os
import sys

PROG = "robustcnn"


def fail(message: str, code: int = 2) -> None:
    """Print one clear line and exit (results already written stay where they are)."""
    print(f"{PROG}: error: {message}", file=sys.stderr)
    raise SystemExit(code)


def quiet_libraries() -> None:
    """Keep third-party chatter (alembic migrations, mlflow notices) out of the user's terminal."""
    for name in ("alembic", "mlflow", "urllib3", "git"):
        logging.getLogger(name).setLevel(logging.WARNING)
    os.environ.setdefault("GIT_PYTHON_REFRESH", "quiet")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

