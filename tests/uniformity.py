"""Statistical checks that a share looks uniformly random over the int64 ring."""

import torch
from scipy import stats


def as_unit(share: torch.Tensor):
    # top 53 bits as a float in [0, 1)
    share = share.reshape(-1)
    return ((share >> 11) & ((1 << 53) - 1)).double().numpy() / 2.0**53


def looks_uniform(share: torch.Tensor) -> bool:
    """Every bit position is set about half the time (5 sigma), and the values pass a KS test
    for uniformity over the ring."""
    share = share.reshape(-1)
    bits = torch.stack([(share >> b) & 1 for b in range(64)], 1).double().mean(0)
    sigma = 0.5 / share.numel() ** 0.5
    return bool(((bits - 0.5).abs() < 5 * sigma).all()) and stats.kstest(as_unit(share), "uniform").pvalue > 1e-4
