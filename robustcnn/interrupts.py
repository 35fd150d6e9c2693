"""Ctrl-C and SIGTERM that cannot be lost: a request flag, raised again at safe points.

Why: Python runs a signal handler between bytecodes of whatever code is running, and an exception
raised there is *discarded* when that code is a weakref callback or a ``__del__`` (SQLAlchemy, which
MLflow's store uses, runs such callbacks all the time): the interpreter prints "Exception ignored
in ..." with a traceback and the job goes on as if nothing happened. A sweep told to stop then ran to
the end and exited 0. So the handler also records the request, the long loops (training steps,
attack slices) and run boundaries call :func:`raise_if_requested`, and the unraisable-exception hook
stays silent about the interrupt it knows will be raised again.
"""

from __future__ import annotations

import signal
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import FrameType

_requested: int | None = None
#: True inside :func:`hold_interrupts`: requests are recorded, nothing is interrupted.
_holding = False


def _request(signum: int, frame: FrameType | None) -> None:
    """The handler: remember the request, then interrupt what runs now (it may be discarded)."""
    global _requested
    _requested = signum
    if not _holding:
        raise KeyboardInterrupt


def _quiet_unraisable(
    previous: Callable[[sys.UnraisableHookArgs], object],
) -> Callable[[sys.UnraisableHookArgs], None]:
    def hook(unraisable: sys.UnraisableHookArgs) -> None:
        if _requested is not None and isinstance(unraisable.exc_value, KeyboardInterrupt):
            return  # discarded inside a callback; raise_if_requested raises it again shortly
        previous(unraisable)

    return hook


def requested() -> bool:
    """True once SIGINT or SIGTERM arrived while :func:`catch_interrupts` was active."""
    return _requested is not None


def raise_if_requested() -> None:
    """Raise KeyboardInterrupt if a stop was requested (a safe point in a long loop)."""
    if _requested is not None:
        raise KeyboardInterrupt


@contextmanager
def catch_interrupts(signals: tuple[int, ...] = (signal.SIGINT, signal.SIGTERM)) -> Iterator[None]:
    """Turn ``signals`` into a KeyboardInterrupt that is raised again at the next safe point.

    Outside the main thread (signal handlers cannot be set there) this is a no-op. The previous
    handlers and hook are restored on exit and the request is cleared on entry and on exit: a stop
    belongs to the block it arrived in (the KeyboardInterrupt leaving it), never to later work in the
    same process (a test suite, a notebook).
    """
    global _requested
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _requested = None
    previous = {sig: signal.signal(sig, _request) for sig in signals}
    previous_hook = sys.unraisablehook
    sys.unraisablehook = _quiet_unraisable(previous_hook)
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        sys.unraisablehook = previous_hook
        _requested = None


@contextmanager
def hold_interrupts() -> Iterator[None]:
    """Inside :func:`catch_interrupts`: record a stop request but interrupt nothing until the block ends.

    Why: some clean-up must finish once started, such as stopping a server's whole process group
    (``robustcnn ui``), where a second Ctrl-C that cut the stop short would leave orphans serving
    the port. The request stays recorded (:func:`requested`, :func:`raise_if_requested`).
    """
    global _holding
    before = _holding
    _holding = True
    try:
        yield
    finally:
        _holding = before
