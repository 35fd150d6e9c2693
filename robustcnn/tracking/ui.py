"""``robustcnn ui``: the MLflow UI on the project's store, bound to 127.0.0.1 unless asked otherwise.

Why a module of its own: the server is a process tree (``mlflow ui`` spawns ~9 processes), and
stopping it cleanly (the whole process group, bounded, never leaving orphans on the port) is its
own small piece of process management.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

from robustcnn.errors import RobustCNNError
from robustcnn.interrupts import catch_interrupts, hold_interrupts

PROG = "robustcnn"


class ServerError(RobustCNNError):
    """The UI could not start (busy port) or exited with an error."""


def _stop_process_group(proc: subprocess.Popen, grace: float = 15.0) -> None:
    """SIGTERM the server's whole process group, then SIGKILL what is left after ``grace`` seconds.

    ``mlflow ui`` spawns ~9 processes (server workers, job runners); killing only the main one
    leaves orphans that keep serving the port, so the group is signalled, never one process.
    """
    import time

    def signal_group(sig: int) -> bool:
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return False
        return True

    if not signal_group(signal.SIGTERM):
        proc.wait()
        return
    deadline = time.monotonic() + grace
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=grace)
    while time.monotonic() < deadline and _group_alive(proc.pid):
        time.sleep(0.1)
    if _group_alive(proc.pid):
        signal_group(signal.SIGKILL)
    proc.wait()


def _group_alive(pgid: int) -> bool:
    """Whether a live (non-zombie) process of group ``pgid`` remains (Linux /proc; else kill 0)."""
    proc_dir = Path("/proc")
    if not proc_dir.is_dir():
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return False
        return True
    for stat in proc_dir.glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[2]) == pgid and fields[0] != "Z":  # fields: state, ppid, pgrp, ...
                return True
    return False


def serve(uri: str, host: str, port: int) -> None:
    """Serve the MLflow UI for ``uri`` until Ctrl-C / SIGTERM, then stop every process it spawned.

    The server runs in its own process group; a busy port is reported before starting rather
    than as a server traceback.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server does: TIME_WAIT is free
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise ServerError(
                f"cannot listen on {host}:{port} ({exc.strerror or exc}); pick another --port"
            ) from exc
    shown = f"[{host}]" if ":" in host else host
    print(f"{PROG}: MLflow UI for store {uri} at http://{shown}:{port} (Ctrl-C stops it)", flush=True)
    if host in ("127.0.0.1", "localhost", "::1"):
        reach = "only (this machine); --host 0.0.0.0 serves other machines"
    else:
        reach = "(other machines can reach it; the MLflow UI has no login)"
    print(f"{PROG}: bound to {host} {reach}", flush=True)
    command = [
        sys.executable,
        "-m",
        "mlflow",
        "ui",
        "--backend-store-uri",
        uri,
        "--host",
        host,
        "--port",
        str(port),
    ]

    proc: subprocess.Popen | None = None
    code = 0
    with catch_interrupts():  # Ctrl-C and SIGTERM, handled as every other command handles them
        try:
            proc = subprocess.Popen(command, start_new_session=True)
            code = proc.wait()
        except KeyboardInterrupt:
            print(f"{PROG}: stopping the MLflow UI", file=sys.stderr, flush=True)
        finally:
            # the stop is bounded (SIGKILL after a grace period): a second Ctrl-C must not cut it short
            with hold_interrupts():
                if proc is not None:
                    _stop_process_group(proc)
    if code:
        raise ServerError(f"the MLflow UI exited with code {code} (its messages are above)")
