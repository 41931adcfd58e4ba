"""A network self-check: parties secret-share private inputs and compute on them.

Run by ``medmpc selfcheck``; hospital IT can use it to prove that the parties
reach each other and that secret-shared arithmetic matches plaintext.
"""

from __future__ import annotations

from typing import Any

import torch

from mpc import crypten_compat


def private_input(rank: int, size: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed * 1000 + rank)
    return torch.randn(size, generator=g) * 3


def arithmetic(*, rank: int, world_size: int, size: int = 16, seed: int = 0) -> dict[str, Any]:
    """Every party contributes one private vector; reveal sum, product and ReLU of the first two."""
    mine = private_input(rank, size, seed)
    shared = [
        crypten_compat.encrypt(mine if src == rank else torch.zeros(size), src=src)
        for src in range(world_size)
    ]
    total = shared[0]
    for s in shared[1:]:
        total = total + s
    x, y = shared[0], shared[1]
    return {
        "input": mine,
        "sum": total.get_plain_text(),
        "product": (x * y).get_plain_text(),
        "relu": (x - y).relu().get_plain_text(),
    }


def expected(world_size: int, size: int = 16, seed: int = 0) -> dict[str, torch.Tensor]:
    inputs = [private_input(r, size, seed) for r in range(world_size)]
    x, y = inputs[0], inputs[1]
    return {"sum": sum(inputs), "product": x * y, "relu": torch.relu(x - y)}


def crash_on_rank1(*, rank: int, world_size: int) -> None:
    """For failure drills: party 1 dies mid-protocol; the others must not hang."""
    x = crypten_compat.encrypt(torch.ones(4), src=0)
    if rank == 1:
        raise SystemExit("party 1 stopped on purpose")
    (x * x).get_plain_text()
