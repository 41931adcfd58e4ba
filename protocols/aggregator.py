"""The aggregation-party role: holds one additive share of every update, never an update."""

from __future__ import annotations

import selectors
import time

from mpc import prg
from mpc.transport import Channel, Listener, PeerError, Traffic, connect
from protocols.commands import die, next_command
from protocols.plan import Plan
from protocols.secure_aggregation import AggregatorState, RevealRefused, average_share, full_share_holder, noise_share


class Aggregator:
    def __init__(self, plan: Plan, index: int) -> None:
        self.plan, self.index, self.name = plan, index, f"aggregator{index}"
        self.traffic = Traffic()
        self.state: AggregatorState | None = None

    def _collect(self, coord: Channel, hospitals: dict[str, Channel], tag: str, numel: int) -> dict[str, object]:
        """Receive one contribution per hospital for ``tag``, in arrival order; report readiness or an abort.

        Seeds come first (hospitals send them before training ends) and are expanded as they
        arrive; "seeded" tells the coordinator when that data-independent part is done."""
        self.state = AggregatorState(tag, self.plan.hospital_names, numel)
        seeds_due = {
            h for i, h in enumerate(self.plan.hospital_names)
            if full_share_holder(i, self.plan.aggregators) != self.index
        }  # fmt: skip
        work = 0.0
        aborted: dict[str, str] = {}
        deadline = time.monotonic() + self.plan.timeout_s
        with selectors.DefaultSelector() as sel:
            for name, ch in hospitals.items():
                sel.register(ch.sock, selectors.EVENT_READ, name)
            while sel.get_map():
                ready = sel.select(timeout=max(0.0, deadline - time.monotonic()))
                if not ready:
                    waiting = ", ".join(key.data for key in sel.get_map().values())
                    raise PeerError(waiting, f"no contribution to {tag} within {self.plan.timeout_s:.0f} s")
                for key, _ in ready:
                    name = key.data
                    sel.unregister(key.fileobj)
                    msg = hospitals[name].recv()
                    if msg.meta.get("tag") != tag:
                        raise PeerError(name, f"sent a contribution for {msg.meta.get('tag')!r}, expected {tag!r}")
                    if msg.kind == "abort":
                        aborted[name] = msg.meta["reason"]
                    elif msg.kind == "seed":  # offline: not counted as aggregation work
                        self.state.add(name, prg.expand(bytes(msg.tensor.numpy()), numel))
                        seeds_due.discard(name)
                        if not seeds_due:
                            coord.send("seeded", {"tag": tag})
                    elif msg.kind == "share":
                        start = time.perf_counter()
                        self.state.add(name, msg.tensor)
                        work += time.perf_counter() - start
                    else:
                        raise PeerError(name, f"unexpected message {msg.kind!r}")
        if aborted:
            self.state = None  # discard every share of this aggregation
            return {"kind": "aborted", "reasons": aborted}
        return {"kind": "ready", "sum_s": work}

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
                    start = time.perf_counter()
                    noise_std = msg.meta.get("noise_std", 0.0)
                    if noise_std > 0:
                        # this aggregator's part of the central-DP noise; no single party knows the total
                        summed = summed + noise_share(summed.numel(), noise_std, p.aggregators, p.fractional_bits)
                    share = average_share(summed, msg.meta["divisor"], fractional_bits=p.fractional_bits)
                    self.state = None
                    coord.send("share", {"tag": tag, "mpc_s": time.perf_counter() - start}, share)
                else:
                    raise PeerError("coordinator", f"unexpected message {msg.kind!r}")
        finally:
            listener.close()
