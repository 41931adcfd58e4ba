"""What every role does with the coordinator's commands, whatever its job."""

from __future__ import annotations

from medmpc.mpc.transport import Channel, Message, Traffic
from medmpc.protocols import messages
from medmpc.protocols.messages import Kind


def next_command(coordinator: Channel, traffic: Traffic) -> Message | None:
    """The next command for this role's own logic; ``None`` means stop.

    Traffic reports are answered here, so they never reach the role.
    """
    while True:
        msg = coordinator.recv()
        if msg.kind == Kind.STOP:
            return None
        if msg.kind != Kind.REPORT:
            return msg
        messages.send(coordinator, messages.TrafficReport(traffic.as_dict()))
