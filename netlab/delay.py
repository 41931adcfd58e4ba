"""The delay line: every packet routed between two hosts waits ``--one-way-ms`` in user space.

This kernel has no ``netem``, so the router namespace sends every forwarded packet to a TUN
device; this process reads it, holds it for the one-way delay and writes it back, and the
router forwards it on (a policy rule routes what comes out of the TUN device to its
destination's veth). Packets keep their order (the delay is one constant) and TCP sees the
delay as path latency: its windows, slow start and retransmissions are the kernel's own.
With ``IFF_VNET_HDR`` and the offloads switched on, the kernel hands over TCP segments of
up to 64 KiB at once, so one Python loop keeps up with 1 Gbit/s.

    ip netns exec ROUTER python -m medmpc.netlab.delay --device tun0 --one-way-ms 20

It prints ``ready`` once the device exists and exits when its standard input closes.
"""

from __future__ import annotations

import argparse
import ctypes
import fcntl
import os
import select
import struct
import sys
import time
from collections import deque

TUNSETIFF = 0x400454CA
TUNSETOFFLOAD = 0x400454D0
IFF_TUN, IFF_NO_PI, IFF_VNET_HDR = 0x0001, 0x1000, 0x4000
TUN_F_CSUM, TUN_F_TSO4, TUN_F_TSO6 = 0x01, 0x02, 0x04
PR_SET_TIMERSLACK = 29
# select() wakes up this much late on average; releasing packets this much early keeps the
# mean delay on target
EARLY_S = 50e-6


def open_tun(name: str) -> int:
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK)
    fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", name.encode(), IFF_TUN | IFF_NO_PI | IFF_VNET_HDR))
    fcntl.ioctl(fd, TUNSETOFFLOAD, TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6)
    return fd


def run(fd: int, one_way_s: float, stop: int) -> None:
    held: deque[tuple[float, bytes]] = deque()
    while True:
        now = time.monotonic()
        while held and held[0][0] <= now + EARLY_S:
            os.write(fd, held.popleft()[1])
        timeout = max(0.0, held[0][0] - now - EARLY_S) if held else None
        readable, _, _ = select.select([fd, stop], [], [], timeout)
        if stop in readable and not os.read(stop, 1):
            return
        if fd in readable:
            due = time.monotonic() + one_way_s
            for _ in range(256):
                try:
                    held.append((due, os.read(fd, 1 << 17)))
                except BlockingIOError:
                    break


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m medmpc.netlab.delay", description=__doc__)
    p.add_argument("--device", required=True, help="name of the TUN device to make")
    p.add_argument("--one-way-ms", type=float, required=True)
    a = p.parse_args(argv)
    if a.one_way_ms < 0:
        p.error("--one-way-ms must be non-negative")
    ctypes.CDLL(None).prctl(PR_SET_TIMERSLACK, 1, 0, 0, 0)  # timers fire within 1 us, not 50
    fd = open_tun(a.device)
    print("ready", flush=True)
    run(fd, a.one_way_ms / 1e3, sys.stdin.fileno())
    return 0


if __name__ == "__main__":
    sys.exit(main())
