"""Training throughput of every zoo model (images/s), on CPU and on CUDA when present.

Writes ``reports/benchmarks/train_throughput.json``. A benchmark, never a timed test: the figures
depend on the machine, so they are recorded (with the machine) rather than asserted.

    python benchmarks/train_throughput.py [--batches 20] [--batch-size 128] [--out PATH]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from _report import write_report

from robustcnn.device import seed_everything
from robustcnn.models import available_models, build_model, count_parameters
from robustcnn.training.loop import TrainConfig, fit

#: Natural input shape per model: the MNIST nets on 1x28x28, the CIFAR nets on 3x32x32.
SHAPES = {"lenet5": (1, 28, 28), "madry_cnn": (1, 28, 28)}
DEFAULT_SHAPE = (3, 32, 32)


def measure(name: str, device: torch.device, batches: int, batch_size: int) -> dict[str, float]:
    shape = SHAPES.get(name, DEFAULT_SHAPE)
    seed_everything(0)
    model = build_model(name, input_shape=shape, num_classes=10, mean=[0.5] * shape[0], std=[0.25] * shape[0])
    n = batches * batch_size
    x = torch.rand(n, *shape)
    y = torch.randint(0, 10, (n,))
    config = TrainConfig(epochs=1, batch_size=batch_size, scheduler="none")
    # warm-up (first CUDA kernels, allocator) is not counted
    fit(model, x[: 2 * batch_size], y[: 2 * batch_size], config, device, progress=False)
    result = fit(model, x, y, config, device, progress=False)
    model.eval()
    with torch.inference_mode():
        xs = x.to(device)
        start = time.perf_counter()
        for i in range(0, n, 512):
            model(xs[i : i + 512])
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        eval_seconds = time.perf_counter() - start
    return {
        "input_shape": list(shape),
        "parameters": count_parameters(model),
        "train_images_per_s": round(result.images_per_s, 1),
        "eval_images_per_s": round(n / eval_seconds, 1),
        "batch_size": batch_size,
        "images": n,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--models", nargs="*", default=None)
    parser.add_argument("--out", type=Path, default=Path("reports/benchmarks/train_throughput.json"))
    args = parser.parse_args()

    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    results: dict[str, dict[str, dict[str, float]]] = {}
    for device in devices:
        batches = args.batches * (10 if device.type == "cuda" else 1)
        for name in args.models or available_models():
            figures = measure(name, device, batches, args.batch_size)
            results.setdefault(name, {})[device.type] = figures
            print(
                f"{name:14s} {device.type:5s} train {figures['train_images_per_s']:10.1f} img/s   "
                f"eval {figures['eval_images_per_s']:10.1f} img/s",
                flush=True,
            )
    write_report(
        args.out,
        "train_throughput",
        results,
        None,
    )


if __name__ == "__main__":
    main()
