"""Reproducible stratified validation splits and partitions across hospitals."""

from __future__ import annotations

import numpy as np
import torch


def _by_class(labels: torch.Tensor, rng: np.random.Generator) -> list[np.ndarray]:
    y = labels.numpy()
    return [rng.permutation(np.flatnonzero(y == c)) for c in np.unique(y)]


def stratified_split(labels: torch.Tensor, fraction: float, *, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Hold out ``fraction`` of every class; returns ``(train_index, held_out_index)``."""
    if not 0 < fraction < 1:
        raise ValueError(f"validation fraction must be in (0, 1), got {fraction}")
    rng = np.random.default_rng(seed)
    train, held = [], []
    for idx in _by_class(labels, rng):
        k = int(round(fraction * len(idx)))
        if len(idx) >= 2:
            k = min(max(k, 1), len(idx) - 1)
        held.append(idx[:k])
        train.append(idx[k:])
    return torch.from_numpy(np.sort(np.concatenate(train))), torch.from_numpy(np.sort(np.concatenate(held)))


def _split_by_weights(idx: np.ndarray, weights: np.ndarray) -> list[np.ndarray]:
    cuts = (np.cumsum(weights)[:-1] / weights.sum() * len(idx)).round().astype(int)
    return np.split(idx, cuts)


def parse_scheme(scheme: str, n_hospitals: int) -> tuple[str, float | np.ndarray | None]:
    """``iid``, ``dirichlet:ALPHA`` or ``sizes:W1,W2,...`` (one weight per hospital)."""
    name, _, arg = scheme.partition(":")
    if name == "iid" and not arg:
        return name, None
    if name == "dirichlet":
        try:
            alpha = float(arg)
        except ValueError:
            alpha = -1.0
        if alpha <= 0:
            raise ValueError(f"dirichlet needs a positive alpha, e.g. dirichlet:0.5, got {scheme!r}")
        return name, alpha
    if name == "sizes":
        try:
            w = np.array([float(v) for v in arg.split(",")])
        except ValueError:
            w = np.array([])
        if len(w) != n_hospitals or (w <= 0).any():
            raise ValueError(
                f"sizes needs {n_hospitals} positive weights, e.g. sizes:"
                f"{','.join(['1'] * n_hospitals)}, got {scheme!r}"
            )
        return name, w
    raise ValueError(f"unknown partition {scheme!r}; use iid, dirichlet:ALPHA or sizes:W1,...,WN")


def partition(
    labels: torch.Tensor, n_hospitals: int, scheme: str = "iid", *, seed: int = 0, min_size: int = 2
) -> list[torch.Tensor]:
    """Split sample indices across hospitals.

    ``iid``: equal sizes, every class spread evenly. ``dirichlet:ALPHA``: each
    class's share per hospital drawn from Dirichlet(ALPHA) (small ALPHA, strong
    label skew). ``sizes:...``: unequal sizes in the given proportions, classes
    spread evenly. Every hospital gets at least ``min_size`` samples.
    """
    if n_hospitals < 1:
        raise ValueError(f"need at least one hospital, got {n_hospitals}")
    if len(labels) < n_hospitals * min_size:
        raise ValueError(f"{len(labels)} samples cannot give {n_hospitals} hospitals {min_size} each")
    kind, arg = parse_scheme(scheme, n_hospitals)
    rng = np.random.default_rng(seed)
    for _attempt in range(100):
        parts: list[list[np.ndarray]] = [[] for _ in range(n_hospitals)]
        for c, idx in enumerate(_by_class(labels, rng)):
            if kind == "dirichlet":
                weights = rng.dirichlet(np.full(n_hospitals, arg))
            elif kind == "sizes":
                weights = np.asarray(arg, dtype=np.float64)
            else:
                weights = np.ones(n_hospitals)
            # rotate so rounding remainders do not always land on the same hospital
            order = np.roll(np.arange(n_hospitals), c)
            for h, chunk in zip(order, _split_by_weights(idx, np.asarray(weights)[order])):
                parts[h].append(chunk)
        out = [np.sort(np.concatenate(p)) for p in parts]
        if min(len(p) for p in out) >= min_size:
            return [torch.from_numpy(p) for p in out]
    raise ValueError(f"partition {scheme!r} left a hospital with < {min_size} samples in 100 draws")


def partition_table(parts: list[torch.Tensor], labels: torch.Tensor, classes: tuple[str, ...]) -> str:
    """Per-hospital class counts as a printable table."""
    header = ["hospital", *classes, "total"]
    rows = []
    for h, idx in enumerate(parts):
        counts = torch.bincount(labels[idx], minlength=len(classes)).tolist()
        rows.append([str(h), *map(str, counts), str(len(idx))])
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in [header, *rows])
