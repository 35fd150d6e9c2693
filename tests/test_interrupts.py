"""A stop request (SIGTERM, Ctrl-C) survives landing where Python discards exceptions.

The CI failure this guards against: SIGTERM arrived while SQLAlchemy ran a weakref callback, the
KeyboardInterrupt raised there was printed as "Exception ignored" and the sweep ran to the end, exit 0.
"""

from __future__ import annotations

import os
import signal

import pytest
import torch

from robustcnn.interrupts import catch_interrupts, raise_if_requested, requested
from robustcnn.tracking.store import TrackingStore


class _SignalsItselfWhenCollected:
    """Its ``__del__`` is where the signal handler runs: an exception there is discarded."""

    def __del__(self) -> None:
        os.kill(os.getpid(), signal.SIGTERM)
        for _ in range(1000):  # the handler runs between bytecodes, still inside __del__
            pass


def _signal_inside_a_destructor() -> None:
    _SignalsItselfWhenCollected()  # collected at once (refcount 0): __del__ runs here


def test_a_discarded_interrupt_is_raised_again_at_the_next_safe_point(capfd: pytest.CaptureFixture) -> None:
    handler_before = signal.getsignal(signal.SIGTERM)
    with catch_interrupts():
        _signal_inside_a_destructor()  # did not raise: Python discarded the KeyboardInterrupt
        assert requested()
        with pytest.raises(KeyboardInterrupt):
            raise_if_requested()
    assert "Traceback" not in capfd.readouterr().err, "the discarded interrupt is not reported as an error"
    assert signal.getsignal(signal.SIGTERM) == handler_before, "the previous handler is restored"
    assert not requested(), "a stop belongs to its block: later work in the process is not interrupted"
    raise_if_requested()
    with catch_interrupts():
        assert not requested(), "each use starts without a pending request"


def test_a_run_whose_stop_was_discarded_ends_killed_and_no_new_run_starts(isolated: dict) -> None:
    store = isolated["store"]
    with catch_interrupts():
        with pytest.raises(KeyboardInterrupt):
            with TrackingStore.at(store).start_run("interrupts") as run:
                _signal_inside_a_destructor()
        assert TrackingStore.at(store).read_run(run.run_id)["status"] == "KILLED"
        with pytest.raises(KeyboardInterrupt):
            with TrackingStore.at(store).start_run("interrupts"):
                pytest.fail("a sweep told to stop must not start its next job")


def test_training_stops_at_the_next_step_after_a_discarded_interrupt() -> None:
    from robustcnn.training.loop import TrainConfig, fit

    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 2))
    x, y = torch.rand(8, 1, 2, 2), torch.tensor([0, 1] * 4)
    with catch_interrupts():
        _signal_inside_a_destructor()
        with pytest.raises(KeyboardInterrupt):
            fit(model, x, y, TrainConfig(epochs=1, batch_size=4), torch.device("cpu"), progress=False)
    fit(model, x, y, TrainConfig(epochs=1, batch_size=4), torch.device("cpu"), progress=False)  # cleared


def test_ui_stops_through_the_shared_handler_and_a_second_signal_cannot_cut_the_stop_short(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`robustcnn ui` handles SIGTERM/Ctrl-C with catch_interrupts, as every other command does,
    and a second signal while the server's process group is being stopped is recorded, not raised."""
    from robustcnn.tracking import ui

    with catch_interrupts():
        shared = signal.getsignal(signal.SIGTERM)
    seen: dict[str, object] = {}

    class FakeServer:
        pid = 0

        def __init__(self, command: list[str], start_new_session: bool) -> None:
            seen["own session"] = start_new_session

        def wait(self, timeout: float | None = None) -> int:
            seen["handler"] = signal.getsignal(signal.SIGTERM)
            os.kill(os.getpid(), signal.SIGTERM)
            for _ in range(1000):  # the handler runs between bytecodes
                pass
            pytest.fail("SIGTERM did not stop the wait for the server")

    def stop(proc: object) -> None:
        os.kill(os.getpid(), signal.SIGINT)  # a second Ctrl-C while the group is being stopped
        for _ in range(1000):
            pass
        seen["stopped"] = proc

    monkeypatch.setattr(ui.subprocess, "Popen", FakeServer)
    monkeypatch.setattr(ui, "_stop_process_group", stop)
    before = signal.getsignal(signal.SIGINT)
    ui.serve("sqlite:///unused.db", "127.0.0.1", 0)  # returns normally: a requested stop is exit 0
    assert seen["handler"] == shared, "ui uses robustcnn.interrupts, not a handler of its own"
    assert isinstance(seen["stopped"], FakeServer), "the second signal did not cut the stop short"
    assert signal.getsignal(signal.SIGINT) == before and not requested()


def test_a_stop_during_a_store_write_lets_the_write_finish_and_is_raised_after(isolated: dict) -> None:
    """The CI hang this guards against: SIGTERM landed inside a sqlite transaction, the interrupted
    connection kept the database lock, and ending the runs as KILLED then waited out the busy timeout."""
    store = TrackingStore.at(isolated["store"])
    experiment_id = store.ensure_experiment("interrupts")
    run_id = store.create_run(experiment_id, "parent", {})
    real_set_tag = store.client.set_tag

    def set_tag_signalled_midway(*args: object, **kwargs: object) -> None:
        os.kill(os.getpid(), signal.SIGTERM)
        for _ in range(1000):  # the handler runs between bytecodes, inside the store call
            pass
        real_set_tag(*args, **kwargs)

    with catch_interrupts():
        store.client.set_tag = set_tag_signalled_midway
        try:
            store.set_run_tag(run_id, "written", "yes")
        except KeyboardInterrupt:
            pytest.fail("the stop was raised inside the store's transaction")
        finally:
            store.client.set_tag = real_set_tag
        assert requested(), "the stop is recorded"
        with pytest.raises(KeyboardInterrupt):
            raise_if_requested()
        store.end_run(run_id, "KILLED")
    assert store.read_run(run_id)["tags"]["written"] == "yes"
    assert store.read_run(run_id)["status"] == "KILLED"


def test_a_stop_during_a_call_to_a_tracking_server_is_not_held() -> None:
    server = TrackingStore("http://127.0.0.1:9")
    with catch_interrupts():
        with pytest.raises(KeyboardInterrupt):
            server._call("a request", _signal_inside_a_call)


def _signal_inside_a_call() -> None:
    os.kill(os.getpid(), signal.SIGTERM)
    for _ in range(1000):
        pass
    pytest.fail("the stop should have interrupted the call")
