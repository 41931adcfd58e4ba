"""Party jobs for the attack tests: an encrypted inference during which a party records its view.

A party's view is what it may legitimately know: every value it helped open (its own
contribution and the opened result, so the peer's message is their difference, or XOR;
for a gathered opening, every party's contribution, part by part where it travels in parts;
for a one-round gate the opened masked input with its ring; for an opening to this party
alone, a reduce, what it received, part by part where it travels in parts)
and its own share of every tensor shared with ``crypten_compat.encrypt``.
"""

from __future__ import annotations

from typing import Any

import torch

from medmpc.mpc import crypten_compat, opening
from medmpc.protocols import inference


def _record_view(view: dict[str, list[Any]]) -> None:
    crypten = crypten_compat.patched()
    comm = crypten.communicator.get()
    all_reduce, all_gather, reduce, encrypt = comm.all_reduce, comm.all_gather, comm.reduce, crypten_compat.encrypt
    reduce_parts, all_gather_parts = comm.reduce_parts, comm.all_gather_parts

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

    def recording_reduce(tensor: Any, dst: int, *args: Any, **kwargs: Any) -> Any:
        opened = reduce(tensor, dst, *args, **kwargs)
        if opened is not None:  # this party is dst
            view["reduced"].append({"mine": tensor.clone(), "opened": opened.clone()})
        return opened

    def recording_reduce_parts(parts: Any, dst: int, arrived: Any) -> None:
        if arrived is None:  # this party sends
            return reduce_parts(parts, dst, arrived)

        def recording_arrived(k: int, total: torch.Tensor) -> None:
            view["reduced"].append({"mine": parts[k].clone(), "opened": total.clone()})
            arrived(k, total)

        return reduce_parts(parts, dst, recording_arrived)

    def recording_all_gather_parts(tensor: Any, bounds: Any) -> Any:
        for parts in all_gather_parts(tensor, bounds):
            view["gathered"].append({"mine": parts[comm.get_rank()].clone(), "parts": [p.clone() for p in parts]})
            yield parts

    def recording_all_gather(tensor: Any) -> Any:
        parts = all_gather(tensor)
        view["gathered"].append({"mine": tensor.clone(), "parts": [p.clone() for p in parts]})
        return parts

    def recording_encrypt(tensor: torch.Tensor, *, src: int = 0, precision: int | None = None) -> Any:
        shared = encrypt(tensor, src=src, precision=precision)
        view["own_shares"].append(shared._tensor.share.clone())
        return shared

    combine = opening.combine

    def recording_combine(parts: list[Any], bits: int, size: int) -> Any:
        opened = combine(parts, bits, size)
        view["gate"].append({"bits": bits, "opened": torch.from_numpy(opened.view("int64").copy())})
        return opened

    comm.all_reduce = recording_all_reduce
    comm.all_gather = recording_all_gather
    comm.reduce = recording_reduce
    comm.reduce_parts = recording_reduce_parts
    comm.all_gather_parts = recording_all_gather_parts
    opening.combine = recording_combine
    crypten_compat.encrypt = recording_encrypt


def recorded_forward(*, rank: int, world_size: int, **kwargs: Any) -> dict[str, Any]:
    """``protocols.inference.encrypted_forward``, returning this party's view beside its result."""
    view: dict[str, list[Any]] = {"opened": [], "gathered": [], "gate": [], "reduced": [], "own_shares": []}
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

    view: dict[str, list[Any]] = {"opened": [], "gathered": [], "gate": [], "reduced": [], "own_shares": []}
    _record_view(view)
    mine = torch.load(sketches, weights_only=True)[rank]
    bits = norm_check.accepted(mine, bound=bound, fractional_bits=fractional_bits)
    return {"result": bits, "view": view}
