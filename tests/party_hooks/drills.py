"""Failure drills, injected into the federated role processes from outside the production code.

MEDMPC_TEST_DRILLS is a JSON object, party -> "ACTION:ROUND":

* "kill:R": the party dies (SIGKILL, as a crash or power cut would) when round R's command
  reaches it (the coordinator: when it starts round R, after round R-1 is saved);
* "kill_revealed:R": the coordinator dies just after round R's average is revealed and saved,
  before it evaluates the round;
* "stall:R": the party hangs (sleeps, its connections open) when round R's command reaches it;
* "crash_sending:R": a hospital dies halfway through streaming its round-R masked update;
* "nan:R" / "overflow:R": a hospital's round-R update gets a NaN or a 1e30 (a broken update
  that must be refused);
* "boost:R" / "flip:R": a poisoning hospital sends 100 times its round-R update, or -100 times.
"""

from __future__ import annotations

import json
import math
import os
import signal
import time

ENV = "MEDMPC_TEST_DRILLS"
ACTIONS = ("kill", "kill_revealed", "stall", "crash_sending", "nan", "overflow", "boost", "flip")


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def install() -> None:
    from medmpc.protocols import aggregator, coordinator, hospital, submit

    drills = {party: spec.split(":") for party, spec in json.loads(os.environ[ENV]).items()}
    for party, spec in drills.items():
        if len(spec) != 2 or spec[0] not in ACTIONS or not spec[1].isdigit():
            raise ValueError(f"{ENV}: {party}: {':'.join(spec)!r} is not ACTION:ROUND")
    me: dict[str, str] = {}

    def drill(round_: object) -> str | None:
        action, at = drills.get(me.get("name", ""), ("", ""))
        return action if str(round_) == at else None

    for role in (hospital.Hospital, aggregator.Aggregator):

        def run(self, _run=role.run) -> None:  # the process's party, once its role object exists
            me["name"] = self.name
            _run(self)

        role.run = run

    def run_coordinator(self, listener, _run=coordinator.Coordinator.run):
        me["name"] = "coordinator"
        return _run(self, listener)

    coordinator.Coordinator.run = run_coordinator

    def aggregate(self, strategy, job, *args, _aggregate=coordinator.Coordinator.aggregate, **kwargs):
        if drill(job.round) == "kill":
            _die()
        return _aggregate(self, strategy, job, *args, **kwargs)

    coordinator.Coordinator.aggregate = aggregate

    def save(self, out, plan, _save=coordinator.CoordinatorState.save):
        _save(self, out, plan)
        if drill(self.round) == "kill_revealed" and "validation" not in self.report["rounds"][-1]:
            _die()

    coordinator.CoordinatorState.save = save

    for module in (hospital, aggregator):

        def next_command(*args, _next=module.next_command, **kwargs):
            received = _next(*args, **kwargs)
            action = None if received is None else drill(received[1].meta.get("round"))
            if action == "kill":
                _die()
            if action == "stall":
                time.sleep(3600)
            return received

        module.next_command = next_command

    def local_update(self, request, global_vector, _local=hospital.Hospital._local_update):
        update, seconds = _local(self, request, global_vector)
        action = drill(request.round)
        if action in ("nan", "overflow"):
            update[0] = float("nan") if action == "nan" else 1e30
        if action in ("boost", "flip"):
            update = update * (100.0 if action == "boost" else -100.0)
        return update, seconds

    hospital.Hospital._local_update = local_update

    def submit_(self, tag, update, _submit=submit.SecureSubmitter.submit):
        if drill(tag.removeprefix("round")) == "crash_sending":
            stream = self.collector.send_stream

            def dying(kind, meta, *, dtype, shape, pieces):
                return stream(kind, meta, dtype=dtype, shape=shape, pieces=_halfway(pieces, math.prod(shape)))

            self.collector.send_stream = dying
        return _submit(self, tag, update)

    submit.SecureSubmitter.submit = submit_

    def plain_submit(self, tag, update, _submit=submit.PlainSubmitter.submit):
        if drill(tag.removeprefix("round")) == "crash_sending":
            _die()  # the update travels in one message here: the nearest crash is before it
        return _submit(self, tag, update)

    submit.PlainSubmitter.submit = plain_submit


def _halfway(pieces, numel):
    sent = 0
    for piece in pieces:
        if sent >= numel // 2:
            _die()
        yield piece
        sent += piece.numel()
