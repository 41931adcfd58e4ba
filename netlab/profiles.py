"""Network profiles: the access link of every host and the round-trip time between any two.

A profile gives each host a symmetric link of ``rate_bit_s`` (shaped by ``tc tbf`` on both
ends of its veth) and adds ``rtt_s`` between any two hosts (half on the way out, half on the
way back, by the delay line in ``netlab.delay``). The time a protocol should take on it is
modelled as

    compute + rounds * rtt / 2 + bytes / rate

with ``rounds`` the message rounds one after another (each costs one one-way latency: in an MPC
round both parties send at once; a request and its reply are two rounds) and ``bytes`` what the
busiest host's link carries in its busier direction (every host has a link of its own).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, kw_only=True)
class Profile:
    """``rate_bit_s`` None: links are not shaped; ``rtt_s`` 0: no delay line."""

    name: str
    rate_bit_s: float | None
    rtt_s: float
    about: str

    def predict(self, *, compute_s: float, rounds: int, bytes_sent: float) -> float:
        """Seconds the simple model expects: compute, plus one one-way latency per round, plus
        the busiest link's bytes at the link rate."""
        wire = 0.0 if self.rate_bit_s is None else 8 * bytes_sent / self.rate_bit_s
        return compute_s + rounds * self.rtt_s / 2 + wire

    def describe(self) -> str:
        rate = "unshaped" if self.rate_bit_s is None else f"{self.rate_bit_s / 1e6:g} Mbit/s"
        return f"{self.name} ({rate}, {self.rtt_s * 1e3:g} ms RTT)"


PROFILES = {
    p.name: p
    for p in (
        Profile(name="lan", rate_bit_s=1e9, rtt_s=0.5e-3, about="a hospital LAN: 1 Gbit/s, 0.5 ms round trip"),
        Profile(name="wan", rate_bit_s=100e6, rtt_s=40e-3, about="the internet: 100 Mbit/s, 40 ms round trip"),
        Profile(name="unshaped", rate_bit_s=None, rtt_s=0.0, about="separate hosts, links at memory speed"),
    )
}


def profile(name: str) -> Profile:
    """The profile called ``name``; ValueError listing the known ones otherwise."""
    try:
        return PROFILES[name]
    except KeyError:
        raise ValueError(f"unknown network profile {name!r}; known: {', '.join(PROFILES)}") from None
