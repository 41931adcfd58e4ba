"""What every role does with the coordinator's commands, whatever its job."""

from __future__ import annotations

import os
import signal

from mpc.transport import Channel, Message, Traffic


def next_command(coordinator: Channel, traffic: Traffic) -> Message | None:
    """The next command for this role's own logic; ``None`` means stop.

    Traffic reports are answered here, so they never reach the role.
    """
    while True:
        msg = coordinator.recv()
        if msg.kind == "stop":
            return None
        if msg.kind != "report":
            return msg
        coordinator.send("traffic", traffic.as_dict())


def die() -> None:
    """Failure drill: end this process the hard way, as a crash or power cut would."""
    os.kill(os.getpid(), signal.SIGKILL)
