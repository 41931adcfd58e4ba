"""One DP-SGD training step against one non-private step, same model and batch.

The private step clips every per-sample gradient to norm C (Opacus ghost clipping,
with our Conv2d norm sampler) and adds Gaussian noise. Both are timed in this process, alternating, and
the ratio of medians goes into extra_info and benchmarks/results/dp_step.json.

    .venv/bin/python -m pytest benchmarks/test_dp_step.py --benchmark-only -s
"""

import statistics
import time

import pytest
import torch
import torch.nn.functional as F

from benchmarks import record
from medmpc.models import build_model
from medmpc.training.dp import DPSGD, DPConfig


def _steps(model_name: str, image_size: int, batch: int):
    torch.manual_seed(0)
    x, y = torch.randn(batch, 1, image_size, image_size), torch.randint(0, 3, (batch,))
    plain = build_model(model_name, 3, seed=0)
    plain_opt = torch.optim.AdamW(plain.parameters(), lr=1e-3)
    model = build_model(model_name, 3, seed=0)
    dp = DPSGD(
        DPConfig(epsilon=8, noise_multiplier=1.0), n_samples=batch * 20, batch_size=batch, planned_epochs=1, who="bench"
    )
    private, private_opt = dp.wrap(model, torch.optim.AdamW(model.parameters(), lr=1e-3))

    def plain_step():
        plain_opt.zero_grad(set_to_none=True)
        F.cross_entropy(plain(x), y).backward()
        plain_opt.step()

    def private_step():
        private_opt.zero_grad(set_to_none=True)
        dp.backward(private, x, y)
        private_opt.step()

    return plain_step, private_step


@pytest.mark.parametrize(
    "model_name,image_size,batch", [("cnn_gn", 64, 64), ("cnn_gn", 128, 64), ("resnet18_gn", 64, 32)]
)
def test_dp_step_vs_plain_step(benchmark, model_name, image_size, batch):
    plain_step, private_step = _steps(model_name, image_size, batch)
    for f in (plain_step, private_step):
        f()  # warm-up
    plain_t, private_t = [], []
    for _ in range(7):
        for f, out in ((plain_step, plain_t), (private_step, private_t)):
            start = time.perf_counter()
            f()
            out.append(time.perf_counter() - start)
    benchmark.pedantic(private_step, rounds=3, iterations=1)
    result = {
        "plain_step_s": statistics.median(plain_t),
        "private_step_s": statistics.median(private_t),
        "ratio": statistics.median(private_t) / statistics.median(plain_t),
        "threads": torch.get_num_threads(),
    }
    benchmark.extra_info.update(result)
    record("dp_step", {f"{model_name} {image_size}px batch {batch}": result})
