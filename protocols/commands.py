"""What every role does with the coordinator's commands, whatever its job."""

from __future__ import annotations

from typing import Any

from medmpc.mpc.transport import Channel, Message, Traffic
from medmpc.protocols import messages
from medmpc.protocols.messages import Report, Stop, TrafficReport

# How long a role waits for the coordinator's next command, in timeouts: between two commands a
# round may spend one timeout on the hospitals' replies and one on the aggregators' reports
# before the coordinator drops it and asks again (protocols.coordinator).
COMMAND_WAIT = 3


def next_command(
    coordinator: Channel, traffic: Traffic, *expected: type, numel: int | None = None
) -> tuple[Any, Message] | None:
    """The coordinator's next command for this role's own logic, one of ``expected`` (checked as
    messages.receive checks, ``numel`` the size of a payload), with its payload; ``None`` means
    stop. Traffic reports are answered here, so they never reach the role."""
    while True:
        command, msg = messages.receive_any(
            coordinator, (Stop, Report, *expected), numel=numel, timeout_s=COMMAND_WAIT * coordinator.timeout_s
        )
        if isinstance(command, Stop):
            return None
        if not isinstance(command, Report):
            return command, msg
        messages.send(coordinator, TrafficReport(traffic.as_dict()))
