"""Out of GPU memory mid-job: the batch is halved and the work redone, never the job lost.

No GPU is needed: a wrapper raises CUDA's own out-of-memory error (it exists in CPU builds of
torch too) for batches above a limit, the way a too-small GPU would.
"""

from __future__ import annotations

import logging

import pytest
import torch
from torch import Tensor, nn

from robustcnn.attacks import FGSM, PGD, AttackResult
from robustcnn.batching import clean_accuracy, in_batches, is_out_of_memory
from robustcnn.errors import ConfigError
from robustcnn.evaluation.battery import BatterySettings, gradient_stats, is_stochastic, run_battery
from robustcnn.threat import ThreatModel

LINF = ThreatModel(norm="linf", eps=(0.0, 0.1, 0.3))
CPU = torch.device("cpu")


class MemoryLimited(nn.Module):
    """A model on a pretend GPU that fits at most ``limit`` images per forward pass."""

    def __init__(self, net: nn.Module, limit: int) -> None:
        super().__init__()
        self.net = net
        self.limit = limit
        self.bounds = net.bounds
        self.num_classes = net.num_classes
        self.largest_batch = 0  # the largest batch that fitted: proves the limit was respected

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[0] > self.limit:
            raise torch.cuda.OutOfMemoryError(
                "CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 7.79 GiB total capacity)"
            )
        self.largest_batch = max(self.largest_batch, x.shape[0])
        return self.net(x)


def _oom_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    messages = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    return [m for m in messages if "out of GPU memory" in m]


def _assert_same_numbers(split: AttackResult, whole: AttackResult) -> None:
    for key in ("clean_correct", "success", "correct"):
        assert torch.equal(getattr(split, key), getattr(whole, key)), key
    for key in ("norms", "true_prob_clean", "true_prob_adv", "adv_examples"):
        torch.testing.assert_close(getattr(split, key), getattr(whole, key), msg=key)
    assert torch.equal(split.clean_examples, whole.clean_examples)
    assert (split.forward_passes, split.gradient_passes) == (whole.forward_passes, whole.gradient_passes), (
        "work lost to out-of-memory must not be counted"
    )


def test_fgsm_after_out_of_memory_reports_the_same_numbers(
    trained_lenet, mnist_small, caplog: pytest.LogCaptureFixture
) -> None:
    x, y = mnist_small.x_test[:40], mnist_small.y_test[:40]
    # 12 kept examples > the 8 images that finally fit: they must be gathered across batches
    whole = FGSM(batch_size=32, keep_examples=12).run(trained_lenet, x, y, LINF)
    limited = MemoryLimited(trained_lenet, limit=8)
    attack = FGSM(batch_size=32, keep_examples=12)
    with caplog.at_level(logging.WARNING):
        split = attack.run(limited, x, y, LINF)
    _assert_same_numbers(split, whole)
    assert split.adv_examples.shape == (3, 12, 1, 28, 28)
    assert limited.largest_batch == 8
    assert attack.batch_size == 32 and split.params["batch_size"] == 32, "the setting itself is unchanged"
    warnings = _oom_warnings(caplog)
    assert len(warnings) == 2, warnings  # 32 -> 16 -> 8, then every later batch uses 8
    assert "attack fgsm" in warnings[0] and "batch of 32" in warnings[0] and "batches of 16" in warnings[0]
    assert "attack.fgsm.batch_size" in warnings[0]


def test_pgd_after_out_of_memory_completes_and_keeps_its_invariants(
    trained_lenet, mnist_small, caplog: pytest.LogCaptureFixture
) -> None:
    x, y = mnist_small.x_test[:36], mnist_small.y_test[:36]
    limited = MemoryLimited(trained_lenet, limit=8)
    with caplog.at_level(logging.WARNING):
        result = PGD(steps=5, batch_size=32, keep_examples=8).run(limited, x, y, LINF)
    assert _oom_warnings(caplog)
    assert limited.largest_batch <= 8
    assert result.success.shape == result.correct.shape == result.norms.shape == (3, 36)
    assert result.adv_examples.shape == (3, 8, 1, 28, 28)
    assert bool((result.norms <= torch.tensor(LINF.eps).view(-1, 1) + 1e-5).all())
    assert torch.equal(result.correct[0], result.clean_correct)
    assert bool((result.correct[1:] <= result.correct[:-1]).all())
    assert result.robust_accuracy()[-1] <= 0.1, "eps 0.3 must still fool an undefended lenet"


def test_out_of_memory_with_a_single_image_raises_a_clear_error(trained_lenet, mnist_small) -> None:
    x, y = mnist_small.x_test[:8], mnist_small.y_test[:8]
    with pytest.raises(ConfigError, match="attack fgsm ran out of GPU memory even with a batch of") as info:
        FGSM(batch_size=4).run(MemoryLimited(trained_lenet, limit=0), x, y, LINF)
    assert isinstance(info.value.__cause__, torch.cuda.OutOfMemoryError)

    def never_fits(begin: int, end: int) -> None:
        raise RuntimeError("CUDA error: out of memory")

    with pytest.raises(ConfigError, match="even with a batch of 1 image;.*device=cpu") as info:
        in_batches(never_fits, 5, 4, what="the test", setting="test.batch_size")
    assert isinstance(info.value.__cause__, RuntimeError)


def test_other_errors_are_not_mistaken_for_out_of_memory() -> None:
    calls: list[tuple[int, int]] = []

    def broken(begin: int, end: int) -> None:
        calls.append((begin, end))
        raise RuntimeError("mat1 and mat2 shapes cannot be multiplied")

    with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
        in_batches(broken, 10, 4, what="the test", setting="test.batch_size")
    assert calls == [(0, 4)], "no retry for an error that is not out-of-memory"
    assert is_out_of_memory(torch.cuda.OutOfMemoryError("CUDA out of memory"))
    assert is_out_of_memory(RuntimeError("MPS backend out of memory"))
    assert not is_out_of_memory(ValueError("out of memory"))


def test_clean_accuracy_after_out_of_memory_is_unchanged(
    trained_lenet, mnist_small, caplog: pytest.LogCaptureFixture
) -> None:
    x, y = mnist_small.x_test[:100], mnist_small.y_test[:100]
    whole = clean_accuracy(trained_lenet, x, y, 64, CPU)
    limited = MemoryLimited(trained_lenet, limit=8)
    with caplog.at_level(logging.WARNING):
        split = clean_accuracy(limited, x, y, 64, CPU)
    assert split.accuracy == whole.accuracy
    assert torch.equal(split.correct, whole.correct)
    assert limited.largest_batch == 8
    assert any("eval.batch_size" in w for w in _oom_warnings(caplog))


def test_battery_checks_after_out_of_memory_are_unchanged(trained_lenet, mnist_small) -> None:
    x, y = mnist_small.x_test[:64], mnist_small.y_test[:64]
    limited = MemoryLimited(trained_lenet, limit=16)
    assert gradient_stats(limited, x, y, 64) == gradient_stats(trained_lenet, x, y)
    assert not is_stochastic(limited, x, 64)
    assert limited.largest_batch == 16


def test_battery_completes_after_out_of_memory(trained_lenet, mnist_small) -> None:
    x, y = mnist_small.x_test[:64], mnist_small.y_test[:64]
    threat = ThreatModel(norm="linf", eps=(0.0, 0.1, 0.3), reference_eps=0.3)
    limited = MemoryLimited(trained_lenet, limit=16)
    battery = run_battery(
        limited,
        x,
        y,
        threat,
        [FGSM(), PGD(steps=5)],  # the default batch of 256 does not fit
        undefended=True,
        settings=BatterySettings(probe_samples=32, eot_samples=2),
    )
    assert limited.largest_batch <= 16
    assert {"fgsm", "pgd", "noise"} <= set(battery.attacks)
    assert {"pgd_strong", "pgd_unbounded"} <= set(battery.probes)
    assert battery.verdict == "not robust"
    assert not [c for c in battery.checks if c.passed is False]
