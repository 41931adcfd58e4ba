"""A party job for the communicator's collectives in parts: each against its whole counterpart."""

from __future__ import annotations

from typing import Any

import torch

from medmpc.mpc import crypten_compat


def parts_against_whole(*, rank: int, world_size: int) -> dict[str, Any]:
    """all_gather and reduce of one tensor, whole and in parts, with the rounds and bytes each
    counted. Each party's tensor is public here (``rank`` times a ramp): only the plumbing is tested."""
    crypten = crypten_compat.patched()
    crypten.cfg.communicator.verbose = True
    comm = crypten.communicator.get()
    mine = torch.arange(1000, dtype=torch.int64) * (rank + 1)

    def counted(run: Any) -> tuple[Any, int, int]:
        comm.reset_communication_stats()
        out = run()
        stats = comm.get_communication_stats()
        return out, int(stats["rounds"]), int(stats["bytes"])

    gathered: list[list[torch.Tensor]] = []
    reduced: list[tuple[int, torch.Tensor]] = []
    bounds = [0, 1, 400, 999, 1000]
    tiles = [mine[lo:hi].reshape(1, -1, 1, 1) for lo, hi in zip(bounds, bounds[1:])]
    return {
        "all_gather": counted(lambda: comm.all_gather(mine)),
        "all_gather_parts": counted(lambda: gathered.extend(comm.all_gather_parts(mine, bounds)) or gathered),
        "reduce": counted(lambda: comm.reduce(mine, 0)),
        "reduce_parts": counted(
            lambda: comm.reduce_parts(tiles, 0, (lambda k, t: reduced.append((k, t))) if rank == 0 else None) or reduced
        ),
    }
