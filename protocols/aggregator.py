"""The aggregation-party role: holds one additive share of every update, never an update.

Aggregator 0, the collector, receives every hospital's masked update and hands its share
of the average over only once every hospital has contributed. Every other aggregator
receives one seed per hospital; its share is the sum of those hospitals' masks, known
before any update exists, so it hands it over as soon as the seeds are in (offline).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import torch

from medmpc.mpc import prg
from medmpc.mpc.transport import Channel, Incoming, Listener, PeerError, Traffic, connect
from medmpc.protocols import messages
from medmpc.protocols.commands import next_command
from medmpc.protocols.messages import Aborted, Collect, Discard, Ready, Reveal, Seed, Share, Withdraw
from medmpc.protocols.plan import Plan
from medmpc.protocols.secure_aggregation import (
    COLLECTOR,
    AggregatorState,
    ContributionError,
    RevealRefused,
    noise_share,
)

T = TypeVar("T")


class Aggregator:
    def __init__(self, plan: Plan, index: int) -> None:
        self.plan, self.index, self.name = plan, index, f"aggregator{index}"
        self.traffic = Traffic()
        self.state: AggregatorState | None = None
        self.collected: set[str] = set()

    def _from_each_hospital(
        self,
        hospitals: dict[str, Channel],
        tag: str,
        numel: int,
        take: Callable[[str, Incoming, Share | Seed | Withdraw], T],
    ) -> dict[str, T]:
        """One message about ``tag`` from every hospital, all at once: each is read by its own
        thread, parsed, and handed to ``take`` (which reads the payload, if any)."""
        deadline = time.monotonic() + self.plan.timeout_s

        def receive(name: str) -> T:
            incoming = hospitals[name].recv_header(timeout_s=max(0.0, deadline - time.monotonic()))
            try:
                message = messages.parse(incoming, name, Share, Seed, Withdraw, numel=numel)
            except PeerError as err:
                raise incoming.reject(str(err).removeprefix(f"{name}: ")) from None
            if message.tag != tag:
                raise incoming.reject(f"sent a contribution for {message.tag!r}, expected {tag!r}")
            if isinstance(message, Withdraw) and message.hospital != name:
                raise incoming.reject(f"withdrew in the name of {message.hospital!r}")
            return take(name, incoming, message)

        with ThreadPoolExecutor(len(hospitals)) as pool:
            return dict(zip(hospitals, pool.map(receive, hospitals)))

    def _state(self, collect: Collect) -> AggregatorState:
        """This aggregator's state for the coordinator's request ``collect``; the sum starts
        from this aggregator's part of the noise.

        The noise and the divisor are the plan's (Plan.aggregation), not the coordinator's: a
        coordinator asking for less noise would get averages with less noise than the reported
        epsilon counts. A request naming other values than the plan's, an aggregation the plan does
        not have, or one already collected (the plan accounts for one release of each), is refused.
        """
        p, tag = self.plan, collect.tag
        try:
            # where the plan weights by sample count, the coordinator's total stands: it only scales the average
            noise_std, divisor = p.aggregation(tag, n_samples=collect.divisor)
        except ValueError as err:
            raise PeerError("coordinator", f"asked for {tag!r}: {err}") from None
        for key, asked, planned in (("noise_std", collect.noise_std, noise_std), ("divisor", collect.divisor, divisor)):
            if asked != planned:
                raise PeerError("coordinator", f"asked for {key} {asked} in {tag!r}; the plan says {planned}")
        if tag in self.collected:
            raise PeerError("coordinator", f"asked for {tag!r} twice; the plan accounts for one release of each")
        self.collected.add(tag)
        # this aggregator's part of the noise; no single party knows the total
        start = noise_share(collect.numel, noise_std, p.aggregators, p.fractional_bits) if noise_std > 0 else None
        return AggregatorState(
            tag,
            p.hospital_names,
            collect.numel,
            n_aggregators=p.aggregators,
            divisor=divisor,
            fractional_bits=p.fractional_bits,
            start=start,
        )

    def _collect(self, hospitals: dict[str, Channel], state: AggregatorState) -> Ready | Aborted:
        """The collector: every hospital's masked update (or its withdrawal), each added piece by
        piece into the running sum as it arrives; reports readiness or the withdrawals."""
        self.state, tag = state, state.tag

        def take(name: str, incoming: Incoming, message: Share | Seed | Withdraw) -> tuple[str, str | float]:
            """("withdrawn", reason) or ("share", seconds in add_piece: adds, divisions of the blocks
            it completed, and waits for their locks)."""
            if isinstance(message, Withdraw):
                return "withdrawn", message.reason
            if not isinstance(message, Share):
                raise incoming.reject(f"sent {message.KIND!r} to the collector")
            try:
                state.admit(name, incoming.dtype, incoming.numel)
            except ContributionError as err:
                raise incoming.reject(str(err)) from None
            work = 0.0

            def add(start: int, piece: torch.Tensor) -> None:
                nonlocal work
                began = time.perf_counter()
                state.add_piece(start, piece)
                work += time.perf_counter() - began

            incoming.read(on_piece=add)
            state.complete(name)
            return "share", work

        results = self._from_each_hospital(hospitals, tag, state.numel, take)
        withdrawn = {name: str(reason) for name, (kind, reason) in results.items() if kind == "withdrawn"}
        if withdrawn:
            self.state = None  # discard every share of this aggregation
            return Aborted(tag, reasons=withdrawn)
        return Ready(tag, sum_s=sum(float(seconds) for _, seconds in results.values()))

    def _hand_over_masks(self, coord: Channel, hospitals: dict[str, Channel], state: AggregatorState) -> None:
        """Any other aggregator: its share is the sum of the hospitals' masks for this
        aggregation (expanded from their seeds); divided, it goes straight to the coordinator."""

        def take(name: str, incoming: Incoming, message: Share | Seed | Withdraw) -> None:
            if not isinstance(message, Seed):  # messages.parse checked the seed's size and type
                raise incoming.reject(f"sent {message.KIND!r} to a seed holder")
            seed = incoming.read()
            assert seed is not None
            state.add(name, prg.expand(bytes(seed.numpy()), state.numel))

        self._from_each_hospital(hospitals, state.tag, state.numel, take)
        self._send_average(coord, state)

    def _send_average(self, coord: Channel, state: AggregatorState) -> None:
        messages.send_stream(
            coord, Share(state.tag), dtype=torch.int64, shape=[state.numel], pieces=state.average_share()
        )

    def run(self) -> None:
        p = self.plan
        identity = p.identity(self.name)
        listener = Listener(*p.listen_address(self.name, p.aggregator_address(self.index)), identity=identity)
        coord = connect(
            *p.coordinator_address(),
            me=self.name,
            peer="coordinator",
            traffic=self.traffic,
            timeout_s=p.timeout_s,
            identity=identity,
        )
        hospitals = listener.accept(set(p.hospital_names), traffic=self.traffic, timeout_s=p.timeout_s)
        hospitals = {h: hospitals[h] for h in p.hospital_names}
        try:
            while (received := next_command(coord, self.traffic, Collect, Reveal, Discard)) is not None:
                command, _ = received
                if isinstance(command, Collect):
                    try:
                        state = self._state(command)
                    except PeerError as err:
                        coord.send_error(f"{self.name} refuses: {err}")
                        raise
                    if self.index != COLLECTOR:
                        self._hand_over_masks(coord, hospitals, state)
                        continue
                    messages.send(coord, self._collect(hospitals, state))
                elif isinstance(command, Discard):
                    self.state = None
                elif self.state is None or self.state.tag != command.tag:
                    coord.send_error(f"{self.name}: nothing collected for {command.tag!r}")
                else:
                    try:
                        self._send_average(coord, self.state)  # refused before anything is sent
                    except RevealRefused as err:
                        coord.send_error(f"{self.name}: {err}")
                        continue
                    self.state = None
        finally:
            listener.close()
