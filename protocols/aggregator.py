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
from typing import Any, TypeVar

import torch

from mpc import prg
from mpc.transport import Channel, Incoming, Listener, PeerError, Traffic, connect
from protocols.commands import die, next_command
from protocols.plan import Plan
from protocols.secure_aggregation import (
    COLLECTOR, AggregatorState, ContributionError, RevealRefused, noise_share,
)  # fmt: skip

T = TypeVar("T")


class Aggregator:
    def __init__(self, plan: Plan, index: int) -> None:
        self.plan, self.index, self.name = plan, index, f"aggregator{index}"
        self.traffic = Traffic()
        self.state: AggregatorState | None = None
        self.collected: set[str] = set()

    def _from_each_hospital(
        self, hospitals: dict[str, Channel], tag: str, take: Callable[[str, Incoming], T]
    ) -> dict[str, T]:
        """One message about ``tag`` from every hospital, all at once: each is read by its own
        thread and handed to ``take`` (which reads the payload, if any)."""
        deadline = time.monotonic() + self.plan.timeout_s

        def receive(name: str) -> T:
            incoming = hospitals[name].recv_header(timeout_s=max(0.0, deadline - time.monotonic()))
            if incoming.meta.get("tag") != tag:
                raise incoming.reject(f"sent a contribution for {incoming.meta.get('tag')!r}, expected {tag!r}")
            return take(name, incoming)

        with ThreadPoolExecutor(len(hospitals)) as pool:
            return dict(zip(hospitals, pool.map(receive, hospitals)))

    def _state(self, meta: dict[str, Any]) -> AggregatorState:
        """This aggregator's state for the coordinator's "collect" request ``meta``; the sum starts
        from this aggregator's part of the noise.

        The noise and the divisor are the plan's (Plan.aggregation), not the coordinator's: a
        coordinator asking for less noise would get averages with less noise than the reported
        epsilon counts. A request naming other values than the plan's, an aggregation the plan does
        not have, or one already collected (the plan accounts for one release of each), is refused.
        """
        p, tag = self.plan, meta["tag"]
        try:
            # where the plan weights by sample count, the coordinator's total stands: it only scales the average
            noise_std, divisor = p.aggregation(tag, n_samples=meta.get("divisor"))
        except ValueError as err:
            raise PeerError("coordinator", f"asked for {tag!r}: {err}") from None
        for key, planned in (("noise_std", noise_std), ("divisor", divisor)):
            if meta.get(key, planned) != planned:
                raise PeerError("coordinator", f"asked for {key} {meta[key]} in {tag!r}; the plan says {planned}")
        if tag in self.collected:
            raise PeerError("coordinator", f"asked for {tag!r} twice; the plan accounts for one release of each")
        self.collected.add(tag)
        # this aggregator's part of the noise; no single party knows the total
        start = noise_share(meta["numel"], noise_std, p.aggregators, p.fractional_bits) if noise_std > 0 else None
        return AggregatorState(tag, p.hospital_names, meta["numel"], n_aggregators=p.aggregators,
                               divisor=divisor, fractional_bits=p.fractional_bits, start=start)  # fmt: skip

    def _collect(self, hospitals: dict[str, Channel], state: AggregatorState) -> dict[str, object]:
        """The collector: every hospital's masked update (or its abort), each added piece by
        piece into the running sum as it arrives; reports readiness or the aborts."""
        self.state, tag = state, state.tag

        def take(name: str, incoming: Incoming) -> tuple[str, str | float]:
            """("abort", reason) or ("share", seconds in add_piece: adds, divisions of the blocks
            it completed, and waits for their locks)."""
            if incoming.kind == "abort":
                return "abort", incoming.meta["reason"]
            if incoming.kind != "share":
                raise incoming.reject(f"unexpected message {incoming.kind!r}")
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

        results = self._from_each_hospital(hospitals, tag, take)
        aborted = {name: reason for name, (kind, reason) in results.items() if kind == "abort"}
        if aborted:
            self.state = None  # discard every share of this aggregation
            return {"kind": "aborted", "reasons": aborted}
        return {"kind": "ready", "sum_s": sum(float(seconds) for _, seconds in results.values())}

    def _hand_over_masks(self, coord: Channel, hospitals: dict[str, Channel], state: AggregatorState) -> None:
        """Any other aggregator: its share is the sum of the hospitals' masks for this
        aggregation (expanded from their seeds); divided, it goes straight to the coordinator."""

        def take(name: str, incoming: Incoming) -> None:
            if incoming.kind != "seed":
                raise incoming.reject(f"unexpected message {incoming.kind!r}")
            seed = incoming.read()
            assert seed is not None
            state.add(name, prg.expand(bytes(seed.numpy()), state.numel))

        self._from_each_hospital(hospitals, state.tag, take)
        self._send_average(coord, state)

    def _send_average(self, coord: Channel, state: AggregatorState) -> None:
        coord.send_stream("share", {"tag": state.tag}, dtype=torch.int64, shape=[state.numel],
                          pieces=state.average_share())  # fmt: skip

    def run(self) -> None:
        p = self.plan
        identity = p.identity(self.name)
        listener = Listener(*p.listen_address(self.name, p.aggregator_address(self.index)), identity=identity)
        coord = connect(*p.coordinator_address(), me=self.name, peer="coordinator", traffic=self.traffic,
                        timeout_s=p.timeout_s, identity=identity)  # fmt: skip
        hospitals = listener.accept(set(p.hospital_names), traffic=self.traffic, timeout_s=p.timeout_s)
        hospitals = {h: hospitals[h] for h in p.hospital_names}
        try:
            while (msg := next_command(coord, self.traffic)) is not None:
                tag = msg.meta["tag"]
                if msg.kind == "collect":
                    if p.drill(self.name, msg.meta.get("round", -1)) == "kill":
                        die()
                    try:
                        state = self._state(msg.meta)
                    except PeerError as err:
                        coord.send("error", {"message": f"{self.name} refuses: {err}"})
                        raise
                    if self.index != COLLECTOR:
                        self._hand_over_masks(coord, hospitals, state)
                        continue
                    result = self._collect(hospitals, state)
                    kind = result.pop("kind")
                    coord.send(kind, {"tag": tag, **result})
                elif msg.kind == "discard":
                    self.state = None
                elif msg.kind == "reveal":
                    if self.state is None or self.state.tag != tag:
                        coord.send("error", {"message": f"{self.name}: nothing collected for {tag!r}"})
                        continue
                    try:
                        self._send_average(coord, self.state)  # refused before anything is sent
                    except RevealRefused as err:
                        coord.send("error", {"message": f"{self.name}: {err}"})
                        continue
                    self.state = None
                else:
                    raise PeerError("coordinator", f"unexpected message {msg.kind!r}")
        finally:
            listener.close()
