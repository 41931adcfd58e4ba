"""CrypTen's communicator over the project's TLS channels instead of gloo and its TCPStore.

This torch build's gloo has no TLS transport, and the TCPStore rendezvous listens on every
interface without authentication. :class:`TLSCommunicator` implements CrypTen's
``Communicator`` interface (the collectives its protocols and its TTP provider call) over
mutually authenticated TLS 1.3 :class:`~mpc.transport.Channel` s: party ``r`` is
``party{r}`` in the federation's certificates, the dealer (CrypTen's TTP, rank
``world_size``) is ``dealer``. Each process listens on its own address, accepts one
connection from every other process (named by its certificate) and opens one to each:
a connection carries data one way only, because an OpenSSL connection must not be read
and written from two threads at once (records get corrupted), and collectives send
while they receive. Then it closes its listener: no port is left open once the mesh stands.

Collectives are the obvious ones on a full mesh: every party sends its tensor to each peer
(from a thread, so two large sends never block each other) and combines what it receives.
Two of them also come in parts (``all_gather_parts``, ``reduce_parts``), each part handed to the
caller as it arrives, so that computing on the first parts overlaps the transfer of the rest:
on a link of 100 Mbit/s a 224-px ResNet-18's openings are seconds on the wire.
Rounds and bytes are counted by CrypTen's own ``_logging`` decorator, exactly as for gloo,
so benchmarks compare like with like. Objects travel pickled and are read with CrypTen's
restricted unpickler, as over gloo. A silent or dead peer is a PeerError naming it.
"""

from __future__ import annotations

import itertools
import os
import pickle
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from crypten.common import serial
from crypten.communicator.communicator import Communicator, _logging
from crypten.config import cfg
from torch.distributed import ReduceOp

from medmpc.mpc import pki
from medmpc.mpc.launch import LISTEN_ENV, PARTIES_ENV, PLAINTEXT_ENV, TIMEOUT_ENV, TLS_DIR_ENV, party_name
from medmpc.mpc.transport import Channel, Listener, PeerError, Traffic, connect

# the two message kinds between CrypTen parties: a tensor, and a pickled object (restricted unpickler)
TENSOR, OBJECT = "t", "obj"


def _plain(tensor: Any) -> torch.Tensor:
    """The int64 torch tensor behind a tensor or a CrypTen CUDALongTensor."""
    return tensor if isinstance(tensor, torch.Tensor) else tensor.data


def _like(original: Any, tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` as the type ``original`` had (CrypTen's CUDALongTensor stays one)."""
    return tensor if isinstance(original, torch.Tensor) else type(original)(tensor)


def transport_identity(me: str) -> pki.Identity | None:
    """This process's credentials from the environment; None only where plaintext was asked for."""
    tls_dir = os.environ.get(TLS_DIR_ENV, "")
    if tls_dir:
        return pki.Identity(Path(tls_dir), me)
    if os.environ.get(PLAINTEXT_ENV) == "1":
        return None
    raise pki.IdentityError(f"{me}: no TLS credentials ({TLS_DIR_ENV}); plaintext only with {PLAINTEXT_ENV}=1")


class _Done:
    def __init__(self, finish: Callable[[], None] | None = None) -> None:
        self._finish = finish

    def wait(self) -> None:
        if self._finish is not None:
            finish, self._finish = self._finish, None
            finish()


def _combine(op: Any, tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    out = tensors[0].clone()
    for t in tensors[1:]:
        if op == ReduceOp.SUM:
            out += t
        elif op == ReduceOp.BXOR:
            out ^= t
        else:
            raise ValueError(f"reduce op {op} is not supported (SUM and BXOR are)")
    return out


class TLSCommunicator(Communicator):
    BYTES_PER_ELEMENT = 8
    instance: TLSCommunicator | None = None

    def __init__(self, *, rank: int, world_size: int, init_ttp: bool) -> None:
        if PARTIES_ENV not in os.environ:
            raise ValueError(
                f"{PARTIES_ENV} is not set: start CrypTen parties with medmpc.mpc.launch "
                "or `python -m medmpc.mpc.party`"
            )
        addresses = [a.rsplit(":", 1) for a in os.environ[PARTIES_ENV].split(",")]
        total = world_size + 1 if init_ttp else world_size
        if len(addresses) != total:
            raise ValueError(f"{PARTIES_ENV} lists {len(addresses)} addresses for {total} processes")
        self.rank, self.world_size, self.ttp_initialized = rank, world_size, init_ttp
        self.main_group = frozenset(range(world_size))
        self.ttp_group = frozenset(range(total))
        self.ttp_comm_group = frozenset({0, total - 1})
        self._name = f"rank{rank}"
        self.reset_communication_stats()
        timeout_s = float(os.environ.get(TIMEOUT_ENV, "120"))
        me = party_name(rank, world_size)
        identity = transport_identity(me)
        self.traffic = Traffic()
        host, port = (os.environ.get(LISTEN_ENV) or ":".join(addresses[rank])).rsplit(":", 1)
        others = {party_name(r, world_size): r for r in range(total) if r != rank}
        listener = Listener(host, int(port), identity=identity)
        accepted: dict[str, Any] = {}

        def accept() -> None:
            try:
                accepted["channels"] = listener.accept(set(others), traffic=self.traffic, timeout_s=timeout_s)
            except PeerError as err:
                accepted["error"] = err

        acceptor = threading.Thread(target=accept, daemon=True)
        acceptor.start()
        try:
            self.outgoing: dict[int, Channel] = {
                r: connect(
                    addresses[r][0],
                    int(addresses[r][1]),
                    me=me,
                    peer=name,
                    traffic=self.traffic,
                    timeout_s=timeout_s,
                    identity=identity,
                )
                for name, r in others.items()
            }
            acceptor.join()
        finally:
            listener.close()
        if "error" in accepted:
            raise accepted["error"]
        self.incoming: dict[int, Channel] = {others[n]: ch for n, ch in accepted["channels"].items()}

    # ---- life cycle, as DistributedCommunicator -------------------------------------------
    @classmethod
    def is_initialized(cls) -> bool:
        return cls.instance is not None

    @classmethod
    def initialize(cls, rank: int = 0, world_size: int = 1, init_ttp: bool = False) -> None:
        cls.instance = TLSCommunicator(
            rank=int(os.environ.get("RANK", rank)),
            world_size=int(os.environ.get("WORLD_SIZE", world_size)),
            init_ttp=init_ttp,
        )

    @classmethod
    def get(cls) -> TLSCommunicator | None:
        return cls.instance

    @classmethod
    def shutdown(cls) -> None:
        me = cls.instance
        if me is None:
            return
        if me.rank == 0 and me.ttp_initialized:
            me.send_obj("terminate", me.get_ttp_rank(), me.ttp_group)
        for channel in (*me.outgoing.values(), *me.incoming.values()):
            channel.close()
        cls.instance = None

    # ---- point to point --------------------------------------------------------------------
    def _send(self, dst: int, tensor: Any) -> None:
        self.outgoing[dst].send(TENSOR, None, _plain(tensor))

    def _recv(self, src: int, like: Any) -> torch.Tensor:
        got = self.incoming[src].expect(TENSOR).tensor
        assert got is not None
        target = _plain(like)
        if got.shape != target.shape:
            raise PeerError(
                self.incoming[src].peer, f"sent a tensor of shape {list(got.shape)}, expected {list(target.shape)}"
            )
        return got.to(target.device)

    def _to_all(self, members: frozenset[int], tensors: Sequence[Any]) -> threading.Thread:
        """Send every tensor to every other member, from a thread (large sends must not wait on
        large receives). Errors surface when the caller's receives fail on the closed channel."""
        errors: list[BaseException] = []

        def run() -> None:
            try:
                for r in sorted(members - {self.rank}):
                    for t in tensors:
                        self._send(r, t)
            except BaseException as err:  # the receiving side reports the broken peer
                errors.append(err)

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        thread.errors = errors  # type: ignore[attr-defined]
        return thread

    @staticmethod
    def _joined(thread: threading.Thread) -> None:
        thread.join()
        if thread.errors:  # type: ignore[attr-defined]
            raise thread.errors[0]  # type: ignore[attr-defined]

    @_logging
    def send(self, tensor: Any, dst: int) -> None:
        self._send(dst, tensor)

    @_logging
    def recv(self, tensor: Any, src: int | None = None) -> torch.Tensor:
        return _like(tensor, self._recv(self._only_peer() if src is None else src, tensor))

    @_logging
    def isend(self, tensor: Any, dst: int) -> _Done:
        thread = self._to_all(frozenset({self.rank, dst}), [tensor])
        return _Done(lambda: self._joined(thread))

    @_logging
    def irecv(self, tensor: Any, src: int | None = None) -> _Done:
        def finish() -> None:
            _plain(tensor).copy_(self._recv(self._only_peer() if src is None else src, tensor))

        return _Done(finish)

    def _only_peer(self) -> int:
        if len(self.incoming) != 1:
            raise ValueError("recv without src needs exactly one peer")
        return next(iter(self.incoming))

    # ---- collectives -----------------------------------------------------------------------
    def _gather_all(self, tensors: list[Any], members: frozenset[int]) -> list[list[torch.Tensor]]:
        """Every member's tensors, by member rank order (this party's own included)."""
        sending = self._to_all(members, tensors)
        received = {r: [self._recv(r, t) for t in tensors] for r in sorted(members - {self.rank})}
        self._joined(sending)
        received[self.rank] = [_plain(t) for t in tensors]
        return [received[r] for r in sorted(members)]

    @_logging
    def all_reduce(self, input: Any, op: Any = ReduceOp.SUM, batched: bool = False) -> Any:
        tensors = list(input) if batched else [input]
        everyone = self._gather_all(tensors, self.main_group)
        out = [_like(t, _combine(op, [mine[i] for mine in everyone])) for i, t in enumerate(tensors)]
        return out if batched else out[0]

    @_logging
    def reduce(self, input: Any, dst: int, op: Any = ReduceOp.SUM, batched: bool = False) -> Any:
        tensors = list(input) if batched else [input]
        if self.rank != dst:
            for t in tensors:
                self._send(dst, t)
            return None
        parts = [[self._recv(r, t) for t in tensors] for r in sorted(self.main_group - {dst})]
        out = [_like(t, _combine(op, [_plain(t), *(p[i] for p in parts)])) for i, t in enumerate(tensors)]
        return out if batched else out[0]

    def reduce_parts(
        self, parts: Sequence[torch.Tensor], dst: int, arrived: Callable[[int, torch.Tensor], None] | None
    ) -> None:
        """:meth:`reduce` (the sum) of each of ``parts`` at ``dst``, part by part: there it calls
        ``arrived(k, sum of part k)`` as soon as every peer's part ``k`` is in, so that the caller
        computes on it while the later parts are still on the wire; elsewhere (``arrived`` None
        there) it sends the parts. Counted as one reduce of them all: one round, the same bytes."""
        if cfg.communicator.verbose:
            self._log_communication(sum(p.nelement() for p in parts) * (self.world_size - 1 if dst == self.rank else 1))
        if self.rank != dst:
            for part in parts:
                self._send(dst, part)
            return
        if arrived is None:
            raise ValueError(f"rank {dst} receives the parts: it needs a function to take them")
        peers = sorted(self.main_group - {dst})
        for k, part in enumerate(parts):
            arrived(k, _combine(ReduceOp.SUM, [_plain(part), *(self._recv(r, part) for r in peers)]))

    @_logging
    def all_gather(self, tensor: Any) -> list[torch.Tensor]:
        return [_like(tensor, mine[0]) for mine in self._gather_all([tensor], self.main_group)]

    def all_gather_parts(self, tensor: torch.Tensor, bounds: Sequence[int]) -> Iterator[list[torch.Tensor]]:
        """:meth:`all_gather` of ``tensor`` (1-D) in parts, cut at the offsets ``bounds`` (0 first,
        its length last): yields every member's part ``k`` (by rank, this party's own included) as
        soon as part ``k`` has arrived from every peer, so that the caller computes on it while the
        later parts are still on the wire. Counted as one all_gather of ``tensor``: one round,
        the same bytes."""
        if tensor.dim() != 1 or list(bounds[:1]) != [0] or bounds[-1] != tensor.numel():
            raise ValueError(f"parts of a 1-D tensor of {tensor.numel()} elements need bounds from 0 to its length")
        if cfg.communicator.verbose:
            self._log_communication(2 * (self.world_size - 1) * tensor.nelement())
        parts = [tensor[lo:hi] for lo, hi in itertools.pairwise(bounds)]
        sending = self._to_all(self.main_group, parts)
        peers = sorted(self.main_group - {self.rank})
        for part in parts:
            received = {r: self._recv(r, part) for r in peers}
            received[self.rank] = part
            yield [received[r] for r in sorted(self.main_group)]
        self._joined(sending)

    @_logging
    def gather(self, tensor: Any, dst: int) -> list[torch.Tensor | None]:
        if self.rank != dst:
            self._send(dst, tensor)
            return [None]
        return [tensor if r == dst else _like(tensor, self._recv(r, tensor)) for r in sorted(self.main_group)]

    @_logging
    def scatter(self, scatter_list: list[Any], src: int, size: Any = None, device: Any = None) -> torch.Tensor:
        if self.rank == src:
            for r in sorted(self.main_group - {src}):
                self._send(r, scatter_list[r])
            return _plain(scatter_list[src])
        return self._recv(src, torch.empty(size or scatter_list[self.rank].size(), dtype=torch.long, device=device))

    @_logging
    def broadcast(self, input: Any, src: int, group: frozenset[int] | None = None, batched: bool = False) -> Any:
        members = self.main_group if group is None else group
        tensors = list(input) if batched else [input]
        if self.rank == src:
            self._joined(self._to_all(members, tensors))
        else:
            for t in tensors:
                _plain(t).copy_(self._recv(src, t))
        return input

    @_logging
    def barrier(self) -> None:
        self._gather_all([torch.zeros(1, dtype=torch.int64)], self.main_group)

    # ---- objects: pickled, read back with CrypTen's restricted unpickler ---------------------
    @staticmethod
    def _pickled(obj: Any) -> torch.Tensor:
        return torch.frombuffer(bytearray(pickle.dumps(obj)), dtype=torch.uint8)

    def _unpickled(self, src: int) -> Any:
        message = self.incoming[src].expect(OBJECT)
        assert message.tensor is not None
        return serial.restricted_loads(message.tensor.numpy().tobytes())

    @_logging
    def send_obj(self, obj: Any, dst: int, group: frozenset[int] | None = None) -> None:
        self.outgoing[dst].send(OBJECT, None, self._pickled(obj))

    @_logging
    def recv_obj(self, src: int, group: frozenset[int] | None = None) -> Any:
        return self._unpickled(src)

    @_logging
    def broadcast_obj(self, obj: Any, src: int, group: frozenset[int] | None = None) -> Any:
        members = self.main_group if group is None else group
        if self.rank != src:
            return self._unpickled(src)
        buf = self._pickled(obj)
        for r in sorted(members - {src}):
            self.outgoing[r].send(OBJECT, None, buf)
        return obj

    # ---- identity --------------------------------------------------------------------------
    def get_world_size(self) -> int:
        return self.world_size

    def get_rank(self) -> int:
        return self.rank

    def get_ttp_rank(self) -> int:
        return self.world_size

    def set_name(self, name: str) -> None:
        self._name = name

    def get_name(self) -> str:
        return self._name

    def get_distributed_backend(self) -> str:
        return "tls"
