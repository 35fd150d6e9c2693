"""Out of GPU memory mid-job: the batch is halved and the work redone, never the job lost (training
included: its steps stay the same, the gradients of the pieces summed).

No GPU is needed: a wrapper raises CUDA's own out-of-memory error (it exists in CPU builds of
torch too) for batches above a limit, the way a too-small GPU would.
"""

from __future__ import annotations

import logging
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from robustcnn.attacks import FGSM, PGD, AttackResult
from robustcnn.batching import clean_accuracy, in_batches, is_out_of_memory
from robustcnn.defenses.adversarial_training import PGDAdversarialTraining, Trades
from robustcnn.errors import ConfigError
from robustcnn.evaluation.battery import BatterySettings, gradient_stats, is_stochastic, run_battery
from robustcnn.threat import ThreatModel
from robustcnn.training.loop import TrainConfig, TrainHook, TrainResult, fit

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
    # judged at 0.1, where images survive: the strong probe (survivors only) runs under the limit too
    threat = ThreatModel(norm="linf", eps=(0.0, 0.1, 0.3), reference_eps=0.1)
    limited = MemoryLimited(trained_lenet, limit=16)
    battery = run_battery(
        limited,
        x,
        y,
        threat,
        [FGSM(), PGD(steps=20)],  # the default batch of 256 does not fit; 20 steps converge at eps 0.1
        undefended=True,
        settings=BatterySettings(probe_samples=32, eot_samples=2),
    )
    assert limited.largest_batch <= 16
    assert {"fgsm", "pgd", "noise"} <= set(battery.attacks)
    assert {"pgd_strong", "pgd_unbounded"} <= set(battery.probes)
    assert battery.verdict in ("robust", "not robust")  # judged, not unreliable
    assert not [c for c in battery.checks if c.passed is False]


# -- training: fit and the adversarial inner attack ------------------------------------------------


class _RunsOutInBackward(torch.autograd.Function):
    """Identity forward; a backward pass over more than ``limit`` images runs out of memory."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, limit: int) -> Tensor:
        ctx.limit = limit
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        if grad.shape[0] > ctx.limit:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.00 GiB")
        return grad, None


class PretendGPU(nn.Module):
    """A small CNN on a pretend GPU that fits at most ``limit`` images at a time.

    ``where`` says in which pass memory runs out: ``forward``, or ``backward`` (after the layers
    above the first conv already have their gradients: a partial backward pass). ``modes`` says
    in which module mode: ``train`` (the loop's own pass) and/or ``eval`` (an inner attack).
    """

    def __init__(
        self,
        limit: int,
        where: str = "forward",
        modes: tuple[str, ...] = ("train", "eval"),
        *,
        norm: bool = False,
    ) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.features = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU())
        self.norm = nn.BatchNorm2d(4) if norm else nn.Identity()
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(4 * 28 * 28, 10))
        self.limit, self.where, self.modes = limit, where, modes
        self.bounds = (0.0, 1.0)

    def forward(self, x: Tensor) -> Tensor:
        limited = ("train" if self.training else "eval") in self.modes
        if limited and self.where == "forward" and x.shape[0] > self.limit:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        h = self.features(x)
        if limited and self.where == "backward":
            h = _RunsOutInBackward.apply(h, self.limit)
        return self.head(self.norm(h))


#: Six steps of 32 images (the last batch of each epoch short: 80 images = 32 + 32 + 16).
TRAIN_OOM = TrainConfig(epochs=2, batch_size=32, shift=1, scheduler="cosine")
#: One step: TRADES' ascent starts where the KL's gradient is almost zero, so its sign turns rounding
#: differences (of any two runs: other thread counts, other batch sizes) into other examples from the
#: second step on; whether the pieces take the whole batch's step shows in the first.
ONE_STEP = TrainConfig(epochs=1, batch_size=32, max_batches=1, shift=1)


def _train_on(
    model: nn.Module, data: Any, hooks: list[TrainHook] | None = None, config: TrainConfig = TRAIN_OOM
) -> TrainResult:
    x, y = data.x_train[:80], data.y_train[:80]
    return fit(model, x, y, config, CPU, hooks=hooks or [], seed=3, progress=False)


def _training_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [m for m in _oom_warnings(caplog) if m.startswith("training")]


def _assert_same_training(
    split: TrainResult, limited: nn.Module, whole: TrainResult, model: nn.Module
) -> None:
    """The same weights (to rounding) and the same history (but its timings)."""
    for name, value in model.state_dict().items():
        torch.testing.assert_close(limited.state_dict()[name], value, msg=name)
    for row_split, row_whole in zip(split.history, whole.history, strict=True):
        for key, value in row_whole.items():
            if "seconds" not in key and "per_s" not in key:
                assert row_split[key] == pytest.approx(value, rel=1e-5), key


@pytest.mark.parametrize("where", ["forward", "backward"])
def test_training_after_out_of_memory_takes_the_same_steps(
    mnist_small, where: str, caplog: pytest.LogCaptureFixture
) -> None:
    model = PretendGPU(limit=10**6)
    whole = _train_on(model, mnist_small)
    limited = PretendGPU(limit=8, where=where)
    with caplog.at_level(logging.WARNING):
        split = _train_on(limited, mnist_small)
    _assert_same_training(split, limited, whole, model)
    assert [row["train_piece_images"] for row in split.history] == [8.0, 8.0], "the run records the pieces"
    assert "train_piece_images" not in whole.history[0]
    warnings = _training_warnings(caplog)
    assert len(warnings) == 1, warnings  # 32 -> 16 -> 8 in the first batch; later batches start at 8
    assert "with 32 images at a time" in warnings[0] and "pieces of 8" in warnings[0]
    assert "the same steps" in warnings[0] and "training.batch_size=8" in warnings[0]


@pytest.mark.parametrize(
    ("defense", "modes", "config"),
    [
        (PGDAdversarialTraining(eps=0.2, steps=2), ("eval",), TRAIN_OOM),  # the inner attack runs out
        (PGDAdversarialTraining(eps=0.2, steps=2), ("train",), TRAIN_OOM),  # the outer loss runs out
        (Trades(eps=0.2, steps=2, beta=6.0), ("eval", "train"), ONE_STEP),
    ],
    ids=["pgd_at inner attack", "pgd_at outer loss", "trades"],
)
def test_adversarial_training_after_out_of_memory_takes_the_same_steps(
    mnist_small, defense: Any, modes: tuple[str, ...], config: TrainConfig, caplog: pytest.LogCaptureFixture
) -> None:
    x, y = mnist_small.x_train[:80], mnist_small.y_train[:80]
    model = PretendGPU(limit=10**6)
    whole = _train_on(model, mnist_small, defense.hooks(0, x, y), config)
    whole_report = defense.report()
    limited = PretendGPU(limit=8, modes=modes)
    with caplog.at_level(logging.WARNING):
        split = _train_on(limited, mnist_small, defense.hooks(0, x, y), config)
    # the random starts are drawn per image, so pieces attack from the same points as whole batches
    _assert_same_training(split, limited, whole, model)
    assert defense.report() == pytest.approx(whole_report), "counted once, not per failed attempt"
    assert len(_training_warnings(caplog)) == 1


def test_adversarial_training_counts_a_batch_once_when_its_backward_runs_out(mnist_small) -> None:
    x, y = mnist_small.x_train[:80], mnist_small.y_train[:80]
    defense = PGDAdversarialTraining(eps=0.01, steps=2)  # small: some adversarial examples still fail
    model = PretendGPU(limit=10**6)
    whole = _train_on(model, mnist_small, defense.hooks(0, x, y))
    assert all(row["adv_train_accuracy"] > 0 for row in whole.history)
    # the hook counts a piece's predictions in its forward pass, before the backward pass runs out
    limited = PretendGPU(limit=8, where="backward", modes=("train",))
    split = _train_on(limited, mnist_small, defense.hooks(0, x, y))
    _assert_same_training(split, limited, whole, model)
    assert [row["adv_train_accuracy"] for row in split.history] == [
        row["adv_train_accuracy"] for row in whole.history
    ]


def test_training_with_batchnorm_after_out_of_memory_says_it_is_not_exact(
    mnist_small, caplog: pytest.LogCaptureFixture
) -> None:
    limited = PretendGPU(limit=16, norm=True)
    with caplog.at_level(logging.WARNING):
        result = _train_on(limited, mnist_small)
    assert result.epochs_run == 2 and result.history[-1]["train_piece_images"] == 16.0
    (warning,) = _training_warnings(caplog)
    assert "BatchNorm" in warning and "differ slightly" in warning and "training.batch_size=16" in warning


def test_training_out_of_memory_with_a_single_image_is_one_clear_line(mnist_small) -> None:
    with pytest.raises(ConfigError) as info:
        _train_on(PretendGPU(limit=0), mnist_small)
    message = str(info.value)
    assert message.startswith("training ran out of GPU memory even with a batch of 1 image;")
    assert "device=cpu" in message and "training.batch_size" in message and "\n" not in message
    assert isinstance(info.value.__cause__, torch.cuda.OutOfMemoryError)
