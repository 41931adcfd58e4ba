"""The aggregation-party role: holds one additive share of every update, never an update.

Aggregator 0, the collector, receives every hospital's masked update and hands its share
of the average over only once every hospital has contributed. Every other aggregator
receives one seed per hospital; its share is the sum of those hospitals' masks, known
before any update exists, so it hands it over as soon as the seeds are in (offline).

Where a round may go on without a hospital (Plan.exclusions_possible), every aggregator keeps
its share until the coordinator asks for it (Reveal), after every aggregator reported that all
expected hospitals' shares are in (Ready): a share handed over early would hold the masks of a
hospital that may yet be left out. A hospital whose channel fails (closed, silent past the
timeout, or a malformed message) is then reported (Aborted) instead of ending this process, and
its channel is dropped.

With the update norm check (Plan.update_norm_bound) the aggregators also form a CrypTen world
with the dealer: when an aggregation begins they agree on a sketch key, each sketches its share
of every hospital's update as it arrives, and once all are in they learn one bit per hospital
(protocols.norm_check); a rejected hospital is reported like one that failed.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import TypeVar

import torch

from medmpc.mpc import prg
from medmpc.mpc.sketch import Sketcher
from medmpc.mpc.transport import Channel, Incoming, Listener, PeerError, Traffic, connect
from medmpc.protocols import messages, norm_check
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


class _Check:
    """One aggregation's norm check at this aggregator: the public bound, and a sketch of each
    hospital's share under the key the aggregators agreed on for it."""

    def __init__(self, bound: float, hospitals: list[str], numel: int, *, fractional_bits: int) -> None:
        key = norm_check.agree_key()
        self.bound, self.fractional_bits = bound, fractional_bits
        self.sketches = {h: Sketcher(numel, key) for h in hospitals}
        norm_check.prepare(len(hospitals), bound=bound, fractional_bits=fractional_bits)

    def run(self, ready: Ready) -> tuple[list[bool], Ready]:
        """Online, once every expected share is in: each hospital's bit, and ``ready`` with the
        check's cost here."""
        start, (sent, rounds) = time.perf_counter(), norm_check.traffic()
        sketches = torch.stack([sketcher.result() for sketcher in self.sketches.values()])
        passed = norm_check.accepted(sketches, bound=self.bound, fractional_bits=self.fractional_bits)
        now_sent, now_rounds = norm_check.traffic()
        elapsed = time.perf_counter() - start
        return passed, replace(ready, check_s=elapsed, check_bytes=now_sent - sent, check_rounds=now_rounds - rounds)


class Aggregator:
    def __init__(self, plan: Plan, index: int) -> None:
        self.plan, self.index, self.name = plan, index, f"aggregator{index}"
        self.traffic = Traffic()
        self.state: AggregatorState | None = None
        self.hospitals: dict[str, Channel] = {}
        self.released: set[str] = set()
        self.check: _Check | None = None

    def _from_each_hospital(
        self,
        names: list[str],
        tag: str,
        numel: int,
        take: Callable[[str, Incoming, Share | Seed | Withdraw], T],
    ) -> tuple[dict[str, T], dict[str, str]]:
        """One message about ``tag`` from each of ``names``, all at once: each is read by its own
        thread, parsed, and handed to ``take`` (which reads the payload, if any). Returns what
        ``take`` made of each, and the hospitals that failed (hospital -> why); a failure ends
        this aggregator unless the plan lets a round go on without a hospital."""
        deadline = time.monotonic() + self.plan.timeout_s

        def receive(name: str) -> T:
            channel = self.hospitals.get(name)
            if channel is None:
                raise PeerError(name, "connection lost in an earlier round")
            incoming = channel.recv_header(timeout_s=max(0.0, deadline - time.monotonic()))
            try:
                message = messages.parse(incoming, name, Share, Seed, Withdraw, numel=numel)
            except PeerError as err:
                raise incoming.reject(str(err).removeprefix(f"{name}: ")) from None
            if message.tag != tag:
                raise incoming.reject(f"sent a contribution for {message.tag!r}, expected {tag!r}")
            if isinstance(message, Withdraw) and message.hospital != name:
                raise incoming.reject(f"withdrew in the name of {message.hospital!r}")
            return take(name, incoming, message)

        with ThreadPoolExecutor(len(names)) as pool:
            futures = {name: pool.submit(receive, name) for name in names}
        results: dict[str, T] = {}
        failed: dict[str, str] = {}
        for name, future in futures.items():
            try:
                results[name] = future.result()
            except PeerError as err:
                if not self.plan.exclusions_possible:
                    raise
                failed[name] = str(err).removeprefix(f"{name}: ")
                channel = self.hospitals.pop(name, None)
                if channel is not None:  # mid-message or silent: nothing more is read from it
                    channel.close()
        return results, failed

    def _state(self, collect: Collect) -> AggregatorState:
        """This aggregator's state for the coordinator's request ``collect``; the sum starts
        from this aggregator's part of the noise.

        The noise and the divisor are the plan's (Plan.aggregation), not the coordinator's: a
        coordinator asking for less noise would get averages with less noise than the reported
        epsilon counts. A request naming other values than the plan's, an aggregation the plan does
        not have, one whose share this aggregator already handed over (the plan accounts for one
        release of each; a collection dropped unrevealed may run again), or hospitals that are not
        the plan's or fewer than its quorum, is refused.
        """
        p, tag = self.plan, collect.tag
        try:
            # where the plan weights by sample count, the coordinator's total stands: it only scales the average
            noise_std, divisor = p.aggregation(tag, n_samples=collect.divisor, n_hospitals=len(collect.hospitals))
        except ValueError as err:
            raise PeerError("coordinator", f"asked for {tag!r}: {err}") from None
        for key, asked, planned in (("noise_std", collect.noise_std, noise_std), ("divisor", collect.divisor, divisor)):
            if asked != planned:
                raise PeerError("coordinator", f"asked for {key} {asked} in {tag!r}; the plan says {planned}")
        if collect.deferred != p.exclusions_possible:
            # a seed holder that hands its mask sum over early, where a hospital may yet be left
            # out, would give that hospital's update away (protocols.secure_aggregation)
            raise PeerError(
                "coordinator",
                f"asked for {tag!r} with deferred={collect.deferred}; the plan says {p.exclusions_possible}",
            )
        self._check_bound(collect)
        if tag in self.released:
            raise PeerError("coordinator", f"asked for {tag!r} twice; the plan accounts for one release of each")
        unknown = sorted(set(collect.hospitals) - set(p.hospital_names))
        if unknown or len(set(collect.hospitals)) != len(collect.hospitals):
            raise PeerError("coordinator", f"asked for {tag!r} from hospitals {collect.hospitals}, not the plan's")
        if len(collect.hospitals) < p.quorum:
            raise PeerError(
                "coordinator", f"asked for {tag!r} from {len(collect.hospitals)} hospitals; the plan needs {p.quorum}"
            )
        # this aggregator's part of the noise; no single party knows the total
        start = noise_share(collect.numel, noise_std, p.aggregators, p.fractional_bits) if noise_std > 0 else None
        return AggregatorState(
            tag,
            collect.hospitals,
            collect.numel,
            n_aggregators=p.aggregators,
            divisor=divisor,
            fractional_bits=p.fractional_bits,
            start=start,
        )

    def _check_bound(self, collect: Collect) -> None:
        """A round's bound is the plan's, or (adaptive) any up to it: it derives from averages only
        the coordinator sees. The statistics are not checked."""
        p, bound = self.plan, collect.norm_bound
        checked = p.norm_checked and collect.tag != "stats"
        if checked != (bound is not None):
            raise PeerError(
                "coordinator",
                f"asked for {collect.tag!r} with norm bound {bound}; the plan says "
                + ("a bound" if checked else "none"),
            )
        if bound is None:
            return
        fixed = p.update_norm_factor is None or collect.round == 1
        if (fixed and bound != p.update_norm_bound) or not bound <= (p.update_norm_bound or 0.0):
            raise PeerError("coordinator", f"asked for {collect.tag!r} with norm bound {bound}, not the plan's")

    def _outcome(self, tag: str, withdrawn: dict[str, str], failed: dict[str, str], sum_s: float) -> Ready | Aborted:
        if withdrawn or failed:
            self.state = None  # discard every share of this aggregation
            return Aborted(tag, reasons=withdrawn | failed, lost=sorted(failed))
        return Ready(tag, sum_s=sum_s)

    def _collect(self, state: AggregatorState) -> Ready | Aborted:
        """The collector: every hospital's masked update (or its withdrawal), each added piece by
        piece into the running sum as it arrives; reports readiness, or the withdrawals and failures."""
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

            sketch = self.check.sketches[name] if self.check else None

            def add(start: int, piece: torch.Tensor) -> None:
                nonlocal work
                began = time.perf_counter()
                state.add_piece(start, piece)
                if sketch is not None:
                    sketch.add(start, piece)
                work += time.perf_counter() - began

            incoming.read(on_piece=add)
            state.complete(name)
            return "share", work

        results, failed = self._from_each_hospital(state.expected, tag, state.numel, take)
        withdrawn = {name: str(reason) for name, (kind, reason) in results.items() if kind == "withdrawn"}
        return self._outcome(tag, withdrawn, failed, sum(float(s) for kind, s in results.values() if kind == "share"))

    def _collect_seeds(self, state: AggregatorState) -> Ready | Aborted:
        """Any other aggregator: its share is the sum of the hospitals' masks for this
        aggregation (expanded from their seeds), divided."""
        self.state = state

        def take(name: str, incoming: Incoming, message: Share | Seed | Withdraw) -> None:
            if not isinstance(message, Seed):  # messages.parse checked the seed's size and type
                raise incoming.reject(f"sent {message.KIND!r} to a seed holder")
            seed = incoming.read()
            assert seed is not None
            mask = prg.expand(bytes(seed.numpy()), state.numel)
            state.add(name, mask)
            if self.check:
                self.check.sketches[name].add(0, mask)

        _, failed = self._from_each_hospital(state.expected, state.tag, state.numel, take)
        return self._outcome(state.tag, {}, failed, 0.0)

    def _checked(self, outcome: Ready | Aborted) -> Ready | Aborted:
        """``outcome``, or, where every aggregator has every share and the check rejects hospitals,
        their rejection (this aggregation's shares are then dropped)."""
        check, state = self.check, self.state
        self.check = None
        if check is None or not norm_check.everyone(isinstance(outcome, Ready)):
            return outcome  # an aggregator still misses a share: the round is collected again anyway
        assert state is not None and isinstance(outcome, Ready)
        passed, ready = check.run(outcome)
        rejected = {
            h: f"rejected: update norm above the bound {check.bound:.6g}"
            for h, ok in zip(state.expected, passed)
            if not ok
        }
        return self._outcome(state.tag, rejected, {}, 0.0) if rejected else ready

    def _send_average(self, coord: Channel, state: AggregatorState) -> None:
        """Hand this aggregator's share of the average over (refused before anything is sent
        until every expected hospital contributed); it is released then, once."""
        pieces = state.average_share()
        self.released.add(state.tag)
        messages.send_stream(coord, Share(state.tag), dtype=torch.int64, shape=[state.numel], pieces=pieces)

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
        accepted = listener.accept(set(p.hospital_names), traffic=self.traffic, timeout_s=p.timeout_s)
        self.hospitals = {h: accepted[h] for h in p.hospital_names}
        joined = False
        try:
            if p.norm_checked:
                # a seed holder waits in the check for the collector, which may wait a whole timeout for updates
                norm_check.join(p.mpc_world(self.name), timeout_s=2 * p.timeout_s)
                joined = True
            while (received := next_command(coord, self.traffic, Collect, Reveal, Discard)) is not None:
                command, _ = received
                if isinstance(command, Collect):
                    try:
                        state = self._state(command)
                    except PeerError as err:
                        coord.send_error(f"{self.name} refuses: {err}")
                        raise
                    if command.norm_bound is not None:
                        self.check = _Check(
                            command.norm_bound, state.expected, state.numel, fractional_bits=p.fractional_bits
                        )
                    if self.index == COLLECTOR:
                        messages.send(coord, self._checked(self._collect(state)))
                    elif p.exclusions_possible:
                        # reported at once (the coordinator waits for it before the updates are sent);
                        # the collector reports the check, which needs every update
                        outcome = self._collect_seeds(state)
                        messages.send(coord, outcome)
                        self._checked(outcome)
                    else:  # no hospital can be left out: the mask sums go now, before the updates exist
                        self._collect_seeds(state)
                        self._send_average(coord, state)
                        self.state = None
                elif isinstance(command, Discard):
                    self.state = None
                elif self.state is None or self.state.tag != command.tag:
                    coord.send_error(f"{self.name}: nothing collected for {command.tag!r}")
                else:
                    try:
                        self._send_average(coord, self.state)
                    except RevealRefused as err:
                        coord.send_error(f"{self.name}: {err}")
                        continue
                    self.state = None
        finally:
            listener.close()
            if joined:
                norm_check.leave()
