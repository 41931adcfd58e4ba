"""A party's port is chosen by the launcher and bound by the party a moment later. In that gap any
outgoing connection on the machine may take a port from the kernel's ephemeral range (CI once lost a
service to "address already in use" that way), so the launcher picks outside that range."""

from __future__ import annotations

import socket

from medmpc.mpc.launch import _ephemeral_ports, free_port


def test_free_ports_lie_outside_the_range_outgoing_connections_draw_from():
    low, high = _ephemeral_ports()
    ports = {free_port() for _ in range(200)}
    assert not any(low <= port <= high for port in ports)
    assert len(ports) > 150  # spread out: two parties seldom draw the same port
    for port in list(ports)[:5]:
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))  # free indeed
    # control: the kernel's own choice, which the old launcher used, lands in that range
    with socket.socket() as listener, socket.socket() as outgoing:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        outgoing.connect(listener.getsockname())
        assert low <= listener.getsockname()[1] <= high
        assert low <= outgoing.getsockname()[1] <= high
