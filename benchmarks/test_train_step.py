"""Training in bfloat16 against float32: the same training loop (``training.local.train``), model,
images and batches, in this process.

Each measurement is one epoch of four batches without augmentation, so it includes what bf16
adds around the passes (the layout conversion at the epoch's start and end). The two precisions
alternate, and the ratio of medians goes into extra_info and benchmarks/results/train_step.json.

    .venv/bin/python -m pytest benchmarks/test_train_step.py --benchmark-only -s
"""

import statistics
import time

import pytest
import torch

from benchmarks import record
from medmpc.imaging.transforms import Preprocessing
from medmpc.models import build_model
from medmpc.training.local import TrainConfig, train

BATCHES = 4


def _epoch(model_name: str, image_size: int, batch: int, precision: str):
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (BATCHES * batch, 1, image_size, image_size), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, 3, (len(images),), generator=g)
    model = build_model(model_name, 3, seed=0)
    cfg = TrainConfig(epochs=1, batch_size=batch, lr=1e-3, augment="none", precision=precision)
    prep = Preprocessing.fit(images)
    return lambda: train(model, images, labels, prep, cfg, num_classes=3)


@pytest.mark.parametrize("model_name,image_size,batch", [("cnn", 64, 64), ("resnet18", 128, 32), ("resnet18", 224, 32)])
def test_bf16_epoch_vs_fp32_epoch(benchmark, model_name, image_size, batch):
    runs = {p: _epoch(model_name, image_size, batch, p) for p in ("fp32", "bf16")}
    for run in runs.values():
        run()  # warm-up: oneDNN picks its kernels on the first pass
    times: dict[str, list[float]] = {p: [] for p in runs}
    for _ in range(5):
        for p, run in runs.items():
            start = time.perf_counter()
            run()
            times[p].append(time.perf_counter() - start)
    benchmark.pedantic(runs["bf16"], rounds=2, iterations=1)
    fp32, bf16 = statistics.median(times["fp32"]) / BATCHES, statistics.median(times["bf16"]) / BATCHES
    result = {
        "fp32_step_s": fp32,
        "bf16_step_s": bf16,
        "speed_up": fp32 / bf16,
        "threads": torch.get_num_threads(),
        "cpu_bf16": torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported(),
    }
    benchmark.extra_info.update(result)
    record("train_step", {f"{model_name} {image_size}px batch {batch}": result})
