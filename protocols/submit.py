"""How a hospital hands in a contribution: secret-shared to the aggregators, or in the clear.

The two submitters are the hospital side of the aggregation strategies in
protocols.strategy; the rest of the hospital does not know which one it uses.
"""

from __future__ import annotations

import time
from typing import Protocol

import torch

from medmpc.mpc import kernels
from medmpc.mpc.sharing import NOT_FINITE, EncodingError, Mask, new_mask
from medmpc.mpc.transport import Channel
from medmpc.protocols import messages
from medmpc.protocols.messages import Seed, Share, Update, Withdraw
from medmpc.protocols.secure_aggregation import COLLECTOR, masked_share


class Submitter(Protocol):
    def prepare(self, tag: str, numel: int) -> None:
        """Do the data-independent part of submitting ``tag`` ahead of time."""

    def submit(self, tag: str, update: torch.Tensor) -> dict[str, float]:
        """Send ``update`` for aggregation ``tag``; returns timings. Raises EncodingError, having
        withdrawn from ``tag``, if the update must not be aggregated."""

    def withdraw(self, tag: str, reason: str) -> None:
        """Tell the receivers that no contribution to ``tag`` will come."""


class SecureSubmitter:
    """Share 0 (the full masked vector) goes to the collector, the other aggregators get
    seeds. The seeds and their mask are made in :meth:`prepare`, before the update exists."""

    def __init__(self, name: str, aggregators: list[Channel], *, n_hospitals: int, fractional_bits: int) -> None:
        self.name, self.aggregators = name, aggregators
        self.collector = aggregators[COLLECTOR]
        self.n_hospitals, self.fractional_bits = n_hospitals, fractional_bits
        self.masks: dict[str, Mask] = {}
        kernels.warm_up()

    def prepare(self, tag: str, numel: int) -> None:
        mask = new_mask(len(self.aggregators), numel)
        holders = [ch for ch in self.aggregators if ch is not self.collector]
        for ch, seed in zip(holders, mask.seeds):
            messages.send(ch, Seed(tag, numel=numel), torch.frombuffer(bytearray(seed), dtype=torch.uint8))
        self.masks[tag] = mask

    def submit(self, tag: str, update: torch.Tensor) -> dict[str, float]:
        start = time.perf_counter()
        if tag not in self.masks:
            self.prepare(tag, update.numel())
        mask = self.masks.pop(tag)
        try:
            pieces = masked_share(
                update, mask, hospital=self.name, n_hospitals=self.n_hospitals, fractional_bits=self.fractional_bits
            )
        except EncodingError as err:
            self.withdraw(tag, err.category)
            raise
        checked = time.perf_counter()
        # encoded while sent: the aggregator adds the first pieces while the later ones are made
        messages.send_stream(self.collector, Share(tag), dtype=torch.int64, shape=[update.numel()], pieces=pieces)
        return {"share_s": checked - start, "send_s": time.perf_counter() - checked}

    def withdraw(self, tag: str, reason: str) -> None:
        # the other aggregators hold only data-independent seeds for this tag
        self.masks.pop(tag, None)
        messages.send(self.collector, Withdraw(tag, hospital=self.name, reason=reason))


class PlainSubmitter:
    """Plain FedAvg, for comparison only: the coordinator sees every update."""

    def __init__(self, name: str, coordinator: Channel) -> None:
        self.name, self.coordinator = name, coordinator

    def prepare(self, tag: str, numel: int) -> None:
        pass  # nothing to precompute in the clear

    def withdraw(self, tag: str, reason: str) -> None:
        pass  # the coordinator hears it from the hospital directly

    def submit(self, tag: str, update: torch.Tensor) -> dict[str, float]:
        start = time.perf_counter()
        flat = update.reshape(-1).float()
        if not torch.isfinite(flat).all():
            raise EncodingError(f"{self.name}: update has NaN/Inf value(s)", category=NOT_FINITE)
        messages.send(self.coordinator, Update(tag), flat)
        return {"share_s": 0.0, "send_s": time.perf_counter() - start}
