"""Aggregation strategies: the one interface the coordinator depends on.

``SecureFedAvg`` never sees an individual update: the aggregation parties hold
shares and only the average comes back. ``PlainFedAvg`` is the same federated
averaging in the clear, kept for comparison runs.
"""

from __future__ import annotations

import time
from typing import Protocol

import torch

from mpc import prg
from mpc.transport import Channel, Message, PeerError, gather
from protocols.secure_aggregation import reveal_decoder


class RoundAborted(RuntimeError):
    """A contribution was refused; nothing of this aggregation was revealed."""


class BudgetExhausted(RoundAborted):
    """A hospital's privacy budget is spent: the run stops cleanly with the last global model."""


class Strategy(Protocol):
    def begin(self, tag: str, numel: int, round_: int) -> None:
        """Prepare for one aggregation before hospitals are asked to contribute."""

    def receive(self, hospital: str, msg: Message) -> None:
        """A contribution that arrived at the coordinator itself (plaintext only)."""

    def finish(self, tag: str, divisor: int, noise_std: float = 0.0) -> tuple[torch.Tensor, dict[str, float]]:
        """The average ((sum + noise) / divisor) and timings, once every hospital has contributed.

        ``noise_std``: Gaussian noise of this total standard deviation is added to the sum
        (central DP) before the division."""

    def discard(self, tag: str) -> None:
        """Drop every contribution of ``tag`` without revealing anything."""


class PlainFedAvg:
    def __init__(self) -> None:
        self.total: torch.Tensor | None = None
        self.work = 0.0

    def begin(self, tag: str, numel: int, round_: int) -> None:
        self.total, self.work = torch.zeros(numel, dtype=torch.float64), 0.0

    def receive(self, hospital: str, msg: Message) -> None:
        assert self.total is not None and msg.tensor is not None
        if msg.tensor.numel() != self.total.numel():
            raise PeerError(hospital, f"update has {msg.tensor.numel()} values, expected {self.total.numel()}")
        start = time.perf_counter()
        self.total += msg.tensor
        self.work += time.perf_counter() - start

    def finish(self, tag: str, divisor: int, noise_std: float = 0.0) -> tuple[torch.Tensor, dict[str, float]]:
        assert self.total is not None
        if noise_std > 0:
            self.total += prg.gaussian(self.total.numel(), noise_std)
        avg = (self.total / divisor).float()
        self.total = None
        return avg, {"aggregation_s": self.work, "reveal_s": 0.0}

    def discard(self, tag: str) -> None:
        self.total = None


class SecureFedAvg:
    def __init__(self, aggregators: dict[str, Channel], fractional_bits: int) -> None:
        self.aggregators, self.fractional_bits = aggregators, fractional_bits
        self._numel = 0
        self._parts: list[torch.Tensor] | None = None

    def begin(self, tag: str, numel: int, round_: int) -> None:
        self._numel = numel
        for ch in self.aggregators.values():
            ch.send("collect", {"tag": tag, "numel": numel, "round": round_})

    def receive(self, hospital: str, msg: Message) -> None:
        raise PeerError(hospital, "sent its update to the coordinator in a secure run")

    def wait_offline(self, tag: str) -> None:
        """Block until every aggregator has expanded its seeds for ``tag`` (the offline part)."""
        for ch in self.aggregators.values():
            ch.expect("seeded")

    def _status(self, ch: Channel) -> Message:
        """The aggregator's next report on its collection, past a "seeded" nobody waited for."""
        msg = ch.recv()
        return ch.recv() if msg.kind == "seeded" else msg

    def finish(self, tag: str, divisor: int, noise_std: float = 0.0) -> tuple[torch.Tensor, dict[str, float]]:
        sum_s = 0.0
        for name, ch in self.aggregators.items():
            msg = self._status(ch)
            if msg.kind == "aborted":
                raise RoundAborted(f"{tag}: {name} reports refused contributions: {msg.meta['reasons']}")
            if msg.kind != "ready":
                raise PeerError(name, f"expected 'ready', got {msg.kind!r}")
            sum_s = max(sum_s, msg.meta["sum_s"])
        start = time.perf_counter()
        for ch in self.aggregators.values():
            ch.send("reveal", {"tag": tag, "divisor": divisor, "noise_std": noise_std})
        avg = self._reveal(divisor)
        return avg, {"aggregation_s": sum_s, "reveal_s": time.perf_counter() - start}

    def _reveal(self, divisor: int) -> torch.Tensor:
        """Receive every aggregator's share of the average and reconstruct it, range by range
        as the shares arrive."""
        decoder = reveal_decoder(len(self.aggregators), divisor, fractional_bits=self.fractional_bits)
        numel = self._numel
        if self._parts is None or self._parts[0].numel() != numel:
            # kept for the next aggregation: fresh memory is slow to touch the first time
            self._parts = [torch.empty(numel, dtype=torch.int64) for _ in self.aggregators]
        avg = decoder.empty(numel)
        gather(
            list(self.aggregators.values()), "share", self._parts,
            lambda lo, hi: decoder.decode(self._parts, avg, lo, hi),
        )  # fmt: skip
        return avg

    def discard(self, tag: str) -> None:
        # wait until every aggregator has finished collecting, then have all drop their shares
        for name, ch in self.aggregators.items():
            msg = self._status(ch)
            if msg.kind not in ("ready", "aborted"):
                raise PeerError(name, f"expected 'ready' or 'aborted' for {tag}, got {msg.kind!r}")
        for ch in self.aggregators.values():
            ch.send("discard", {"tag": tag})
