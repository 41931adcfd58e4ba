"""Aggregation strategies: the one interface the coordinator depends on.

``SecureFedAvg`` never sees an individual update: the aggregation parties hold
shares and only the average comes back. ``PlainFedAvg`` is the same federated
averaging in the clear, kept for comparison runs.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Protocol

import torch

from medmpc.mpc import kernels, prg
from medmpc.mpc.division import QuotientDecoder
from medmpc.mpc.transport import Channel, Message, PeerError, gather
from medmpc.protocols import messages
from medmpc.protocols.messages import Aborted, Collect, Discard, Kind, Ready, Reveal
from medmpc.protocols.secure_aggregation import COLLECTOR, reveal_decoder


class RoundAborted(RuntimeError):
    """A contribution was refused; nothing of this aggregation was revealed."""


class BudgetExhausted(RoundAborted):
    """A hospital's privacy budget is spent: the run stops cleanly with the last global model."""


@dataclass(frozen=True, kw_only=True)
class Aggregation:
    """One aggregation: the average of every hospital's ``numel`` values, ``(sum + noise) / divisor``.

    ``noise_std``: Gaussian noise of this total standard deviation is added to the sum
    (central DP) before the division."""

    tag: str
    numel: int
    round: int
    divisor: int
    noise_std: float = 0.0
    norm_bound: float | None = None  # every update's public L2 bound (protocols.norm_check)


@dataclass(frozen=True)
class Settled:
    """How the aggregation parties' collection went: the hospitals they could not count (hospital
    -> why), and those of them whose connection is gone."""

    failed: dict[str, str]
    lost: set[str]


class Strategy(Protocol):
    def begin(self, job: Aggregation, hospitals: list[str]) -> None:
        """Prepare for one aggregation of ``hospitals``' contributions before they are asked."""

    def receive(self, hospital: str, msg: Message) -> None:
        """A contribution that arrived at the coordinator itself (plaintext only)."""

    def settle(self) -> Settled:
        """Wait until the contributions are collected; the hospitals the collection failed for."""

    def finish(self) -> tuple[torch.Tensor, dict[str, float]]:
        """The average and timings, once settled with every hospital counted."""

    def discard(self) -> None:
        """Once settled, drop every contribution without revealing anything."""


class PlainFedAvg:
    """Plaintext FedAvg: every update comes to the coordinator. Updates are read concurrently and
    summed at the end in the hospitals' order, so a run is repeatable bit for bit."""

    def __init__(self) -> None:
        self.job: Aggregation | None = None
        self.updates: dict[str, torch.Tensor] = {}
        self._lock = threading.Lock()

    def begin(self, job: Aggregation, hospitals: list[str]) -> None:
        self.job, self.updates = job, {}

    def receive(self, hospital: str, msg: Message) -> None:
        assert self.job is not None
        if msg.tensor is None:
            raise PeerError(hospital, "sent an update without its values")
        if msg.tensor.numel() != self.job.numel:
            raise PeerError(hospital, f"update has {msg.tensor.numel()} values, expected {self.job.numel}")
        with self._lock:
            self.updates[hospital] = msg.tensor

    def settle(self) -> Settled:
        return Settled({}, set())  # every update came to the coordinator itself

    def finish(self) -> tuple[torch.Tensor, dict[str, float]]:
        assert self.job is not None
        start = time.perf_counter()
        total = torch.zeros(self.job.numel, dtype=torch.float64)
        for hospital in sorted(self.updates):
            total += self.updates[hospital]
        work = time.perf_counter() - start
        if self.job.noise_std > 0:
            total += prg.gaussian(total.numel(), self.job.noise_std)
        self.updates = {}
        return (total / self.job.divisor).float(), {"aggregation_s": work, "reveal_s": 0.0}

    def discard(self) -> None:
        self.updates = {}


class SecureFedAvg:
    """The coordinator's side of secure aggregation (protocols.secure_aggregation).

    The other aggregators' shares of the average are data-independent: they are received
    in the background from :meth:`begin` on, while the hospitals train. The collector's
    share comes once every hospital has contributed and is decoded range by range as it
    arrives. With ``deferred`` (the plan lets a round go on without a hospital) every
    aggregator reports on its collection and keeps its share until the reveal, as a share
    handed over early would hold the masks of a hospital that may yet be left out."""

    def __init__(self, aggregators: dict[str, Channel], fractional_bits: int, *, deferred: bool = False) -> None:
        self.aggregators, self.fractional_bits, self.deferred = aggregators, fractional_bits, deferred
        names = list(aggregators)
        self.collector_name = names[COLLECTOR]
        self.collector = aggregators[self.collector_name]
        self.holders = [ch for name, ch in aggregators.items() if name != self.collector_name]
        self.job: Aggregation | None = None
        self._decoder: QuotientDecoder | None = None
        self._average: torch.Tensor | None = None
        self._offline: Future[torch.Tensor] | None = None
        self._report: Ready | None = None
        self._reports: dict[str, Ready | Aborted] = {}  # each aggregator's on this collection
        self._pool = ThreadPoolExecutor(1)
        # receive buffers (0: the collector's share, 1..: the others'), kept from one aggregation
        # to the next and touched when made: fresh memory is slow to touch the first time
        self._buffers: dict[int, torch.Tensor] = {}
        kernels.warm_up()

    def _buffer(self, i: int, numel: int) -> torch.Tensor:
        buf = self._buffers.get(i)
        if buf is None or buf.numel() != numel:
            buf = self._buffers[i] = torch.zeros(numel, dtype=torch.int64)
        return buf

    def begin(self, job: Aggregation, hospitals: list[str]) -> None:
        self.job, self._report, self._reports = job, None, {}
        collect = Collect(
            job.tag,
            numel=job.numel,
            round=job.round,
            divisor=job.divisor,
            noise_std=job.noise_std,
            hospitals=hospitals,
            deferred=self.deferred,
            norm_bound=job.norm_bound,
        )
        for ch in self.aggregators.values():
            messages.send(ch, collect)
        if not self.deferred:
            self._offline = self._pool.submit(self._receive_offline, job.numel)
        self._decoder = reveal_decoder(len(self.aggregators), job.divisor, fractional_bits=self.fractional_bits)
        # the average's and the collector's share's memory, touched now: decoding into
        # never-touched memory is slower (page faults inside the online phase)
        self._average = self._decoder.empty(job.numel).zero_()
        self._buffer(0, job.numel)

    def _receive_offline(self, numel: int) -> torch.Tensor:
        """The sum of the K-1 data-independent shares of the average (wrapping int64)."""
        parts = [self._buffer(i, numel) for i in range(1, len(self.aggregators))]
        gather(self.holders, Kind.SHARE, parts, lambda lo, hi: None)
        for part in parts[1:]:
            parts[0].add_(part)
        return parts[0]

    def receive(self, hospital: str, msg: Message) -> None:
        raise PeerError(hospital, "sent its update to the coordinator in a secure run")

    def wait_offline(self) -> None:
        """Block until the data-independent part is done: every such share is in, or, deferred,
        every seed holder reported its mask sum made (the shares then come with the reveal)."""
        if self._offline is not None:
            self._offline.result()
        for name, ch in self.aggregators.items():
            if name != self.collector_name and self.deferred and name not in self._reports:
                self._reports[name] = self._collection_report(name, ch)

    def _collection_report(self, name: str, channel: Channel) -> Ready | Aborted:
        """One aggregator's report on collecting this aggregation (every share in, or withdrawals
        and failures)."""
        assert self.job is not None
        report, _ = messages.receive(channel, Ready, Aborted)
        if report.tag != self.job.tag:
            raise PeerError(name, f"reported on {report.tag!r} during {self.job.tag!r}")
        return report

    @property
    def _holding(self) -> dict[str, Channel]:
        """The aggregators that report on a collection and keep their shares until Reveal or
        Discard: all of them, deferred; else the collector alone."""
        return self.aggregators if self.deferred else {self.collector_name: self.collector}

    def settle(self) -> Settled:
        assert self.job is not None
        reports = self._reports
        for name, ch in self._holding.items():
            if name not in reports:
                reports[name] = self._collection_report(name, ch)
        if not self.deferred:
            assert self._offline is not None
            self._offline.result()  # data-independent: used, or dropped unused
        failed: dict[str, str] = {}
        lost: set[str] = set()
        for name, report in reports.items():
            if isinstance(report, Aborted):
                failed |= {h: f"{name}: {why}" for h, why in report.reasons.items() if h not in failed}
                lost |= set(report.lost)
        collector = reports[self.collector_name]
        self._report = collector if isinstance(collector, Ready) else None
        return Settled(failed, lost)

    def finish(self) -> tuple[torch.Tensor, dict[str, float]]:
        assert self.job is not None and self._report is not None
        start = time.perf_counter()
        for ch in self._holding.values():
            messages.send(ch, Reveal(self.job.tag))
        if self.deferred:
            offline = self._receive_offline(self.job.numel)
        else:
            assert self._offline is not None
            offline = self._offline.result()
        decoder, avg = self._decoder, self._average
        assert decoder is not None and avg is not None
        self._average = None  # handed to the caller
        online = self._buffer(0, self.job.numel)
        gather([self.collector], Kind.SHARE, [online], lambda lo, hi: decoder.decode([offline, online], avg, lo, hi))
        timings = {"aggregation_s": self._report.sum_s, "reveal_s": time.perf_counter() - start}
        if self.job.norm_bound is not None:
            r = self._report
            timings |= {
                "norm_check_s": r.check_s,
                "norm_check_bytes": r.check_bytes,
                "norm_check_rounds": r.check_rounds,
            }
        return avg, timings

    def discard(self) -> None:
        assert self.job is not None
        # every aggregator that still holds shares of this aggregation drops them
        for ch in self._holding.values():
            messages.send(ch, Discard(self.job.tag))
