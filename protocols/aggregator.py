"""The aggregation-party role: holds one additive share of every update, never an update."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import torch

from mpc import prg
from mpc.transport import Channel, Listener, PeerError, Traffic, connect
from protocols.commands import die, next_command
from protocols.plan import Plan
from protocols.secure_aggregation import (
    AggregatorState, ContributionError, RevealRefused, average_share, full_share_holder, noise_share,
)  # fmt: skip


class Aggregator:
    def __init__(self, plan: Plan, index: int) -> None:
        self.plan, self.index, self.name = plan, index, f"aggregator{index}"
        self.traffic = Traffic()
        self.state: AggregatorState | None = None

    def _collect(self, coord: Channel, hospitals: dict[str, Channel], tag: str, numel: int) -> dict[str, object]:
        """Receive one contribution per hospital for ``tag``, all at once; report readiness or an abort.

        Each hospital's message is read by its own thread, a share piece by piece into the
        running sum. Seeds come first (hospitals send them before training ends) and are
        expanded as they arrive; "seeded" tells the coordinator when that data-independent
        part is done."""
        state = self.state = AggregatorState(tag, self.plan.hospital_names, numel)
        seeds_due = {
            h for i, h in enumerate(self.plan.hospital_names)
            if full_share_holder(i, self.plan.aggregators) != self.index
        }  # fmt: skip
        seeds_lock = threading.Lock()
        deadline = time.monotonic() + self.plan.timeout_s

        def receive(name: str) -> tuple[str, str | float]:
            """("abort", reason), ("share", seconds spent adding) or ("seed", 0.0)."""
            incoming = hospitals[name].recv_header(timeout_s=max(0.0, deadline - time.monotonic()))
            if incoming.meta.get("tag") != tag:
                raise incoming.reject(f"sent a contribution for {incoming.meta.get('tag')!r}, expected {tag!r}")
            if incoming.kind == "abort":
                return "abort", incoming.meta["reason"]
            if incoming.kind == "seed":  # offline: not counted as aggregation work
                seed = incoming.read()
                assert seed is not None
                state.add(name, prg.expand(bytes(seed.numpy()), numel))
                with seeds_lock:
                    seeds_due.discard(name)
                    if not seeds_due:
                        coord.send("seeded", {"tag": tag})
                return "seed", 0.0
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

        with ThreadPoolExecutor(len(hospitals)) as pool:
            results = dict(zip(hospitals, pool.map(receive, hospitals)))
        aborted = {name: reason for name, (kind, reason) in results.items() if kind == "abort"}
        if aborted:
            self.state = None  # discard every share of this aggregation
            return {"kind": "aborted", "reasons": aborted}
        return {"kind": "ready", "sum_s": sum(float(v) for kind, v in results.values() if kind == "share")}

    def run(self) -> None:
        p = self.plan
        host, port = p.aggregator_address(self.index)
        listener = Listener(p.bind or host, port)
        coord = connect(*p.coordinator_address(), me=self.name, peer="coordinator", traffic=self.traffic, timeout_s=p.timeout_s)
        hospitals = listener.accept(set(p.hospital_names), traffic=self.traffic, timeout_s=p.timeout_s)
        hospitals = {h: hospitals[h] for h in p.hospital_names}
        try:
            while (msg := next_command(coord, self.traffic)) is not None:
                tag = msg.meta["tag"]
                if msg.kind == "collect":
                    if p.drill(self.name, msg.meta.get("round", -1)) == "kill":
                        die()
                    result = self._collect(coord, hospitals, tag, msg.meta["numel"])
                    kind = result.pop("kind")
                    coord.send(kind, {"tag": tag, **result})
                elif msg.kind == "discard":
                    self.state = None
                elif msg.kind == "reveal":
                    if self.state is None or self.state.tag != tag:
                        coord.send("error", {"message": f"{self.name}: nothing collected for {tag!r}"})
                        continue
                    try:
                        summed = self.state.summed_share()
                    except RevealRefused as err:
                        coord.send("error", {"message": f"{self.name}: {err}"})
                        continue
                    noise_std = msg.meta.get("noise_std", 0.0)
                    if noise_std > 0:
                        # this aggregator's part of the central-DP noise; no single party knows the total
                        summed += noise_share(summed.numel(), noise_std, p.aggregators, p.fractional_bits)
                    self.state = None
                    # divided while sent, over the summed share's memory
                    pieces = average_share(summed, msg.meta["divisor"], fractional_bits=p.fractional_bits)
                    coord.send_stream("share", {"tag": tag}, dtype=torch.int64, shape=[summed.numel()], pieces=pieces)
                else:
                    raise PeerError("coordinator", f"unexpected message {msg.kind!r}")
        finally:
            listener.close()
