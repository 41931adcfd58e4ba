"""Party jobs for the attack tests: an encrypted inference during which a party records its view.

A party's view is what it may legitimately know: every value it helped open (its own
contribution and the opened result, so the peer's message is their difference, or XOR)
and its own share of every tensor shared with ``crypten_compat.encrypt``.
"""

from __future__ import annotations

from typing import Any

import torch

from medmpc.mpc import crypten_compat
from medmpc.protocols import inference


def _record_view(view: dict[str, list[Any]]) -> None:
    crypten = crypten_compat.patched()
    comm = crypten.communicator.get()
    all_reduce, encrypt = comm.all_reduce, crypten_compat.encrypt

    def recording_all_reduce(tensors: Any, op: Any = torch.distributed.ReduceOp.SUM, batched: bool = False) -> Any:
        mine = [t.clone() for t in (tensors if batched else [tensors])]
        opened = all_reduce(tensors, op=op, batched=batched)
        view["opened"].append(
            {
                "xor": op == torch.distributed.ReduceOp.BXOR,
                "mine": mine,
                "opened": [t.clone() for t in (opened if batched else [opened])],
            }
        )
        return opened

    def recording_encrypt(tensor: torch.Tensor, *, src: int = 0) -> Any:
        shared = encrypt(tensor, src=src)
        view["own_shares"].append(shared._tensor.share.clone())
        return shared

    comm.all_reduce = recording_all_reduce
    crypten_compat.encrypt = recording_encrypt


def recorded_forward(*, rank: int, world_size: int, **kwargs: Any) -> dict[str, Any]:
    """``protocols.inference.encrypted_forward``, returning this party's view beside its result."""
    view: dict[str, list[Any]] = {"opened": [], "own_shares": []}
    _record_view(view)
    return {"result": inference.encrypted_forward(rank=rank, world_size=world_size, **kwargs), "view": view}


def generator_kinds(*, rank: int, world_size: int) -> dict[str, tuple[str, tuple[int, ...]]]:
    """The class and first two words of every CPU generator CrypTen holds in this party after
    ``crypten.init`` (drawing them spends them: this job does nothing else)."""
    crypten = crypten_compat.patched()
    from crypten.mpc.provider.ttp_provider import TTPClient

    gens = {name: gens[torch.device("cpu")] for name, gens in crypten.generators.items()}
    gens["dealer"] = TTPClient.get().get_generator("cpu")
    return {name: (type(g).__name__, tuple(g.ring((2,)).tolist())) for name, g in gens.items()}


def recorded_norm_check(
    *, rank: int, world_size: int, sketches: str, bound: float, fractional_bits: int
) -> dict[str, Any]:
    """``protocols.norm_check.accepted`` on this party's sketch shares (``sketches``: a file of
    every party's, by rank), returning this party's view beside the bits."""
    from medmpc.protocols import norm_check

    view: dict[str, list[Any]] = {"opened": [], "own_shares": []}
    _record_view(view)
    mine = torch.load(sketches, weights_only=True)[rank]
    bits = norm_check.accepted(mine, bound=bound, fractional_bits=fractional_bits)
    return {"result": bits, "view": view}
