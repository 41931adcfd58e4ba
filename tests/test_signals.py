"""A stopped launcher leaves no party behind: `medmpc simulate` stopped by SIGTERM (or SIGHUP, which
takes the same handler to the same KeyboardInterrupt as Ctrl-C) stops its role processes and removes
its temporary folder; killed outright (SIGKILL, where nothing of it runs) its parties die with it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.medmpc_cli import MEDMPC

pytestmark = pytest.mark.slow


def _stat(pid: int) -> list[str] | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rindex(")") + 2 :].split()  # the fields after the command name


def _alive(pid: int) -> bool:
    fields = _stat(pid)
    return fields is not None and fields[0] != "Z"  # a zombie has exited; only its parent's wait is missing


def _children(pid: int) -> list[int]:
    kids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (fields := _stat(int(entry.name))) is not None and int(fields[1]) == pid:
            kids.append(int(entry.name))
    return kids


def _catches(pid: int, sig: signal.Signals) -> bool:
    """Whether process ``pid`` has a handler for ``sig`` (the SigCgt mask in /proc/PID/status)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigCgt:"):
            return bool(int(line.split()[1], 16) >> (sig - 1) & 1)
    return False


def _gone(pids: list[int], within_s: float) -> list[int]:
    """Those of ``pids`` still alive after ``within_s`` seconds."""
    deadline = time.monotonic() + within_s
    while (left := [p for p in pids if _alive(p)]) and time.monotonic() < deadline:
        time.sleep(0.05)
    return left


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=lambda s: s.name)
def test_a_stopped_simulate_leaves_no_party_running(tmp_path, sig):
    tmp, out = tmp_path / "tmp", tmp_path / "out"
    tmp.mkdir()
    argv = [*MEDMPC, "simulate", "--rounds", "200", "--data", "synthetic:90", "--image-size", "32", "--out", out]
    launcher = subprocess.Popen(
        list(map(str, argv)),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "TMPDIR": str(tmp)},
        start_new_session=True,  # as from its own terminal: the signal goes to the launcher only
    )
    deadline = time.monotonic() + 180
    while not (out / "model.pt").exists():  # round 1 done: every party is mid-run
        assert launcher.poll() is None and time.monotonic() < deadline, launcher.stderr.read()  # type: ignore[union-attr]
        time.sleep(0.05)
    parties = _children(launcher.pid)
    assert len(parties) == 6, parties  # coordinator, 3 hospitals, 2 aggregators
    os.kill(launcher.pid, sig)
    code = launcher.wait(timeout=30)
    assert _gone(parties, within_s=10) == [], "party processes outlived their launcher"
    rounds = len(json.loads((out / "report.json").read_text())["rounds"])
    assert rounds < 200
    time.sleep(1)
    assert len(json.loads((out / "report.json").read_text())["rounds"]) == rounds, "the run went on"
    if sig == signal.SIGKILL:
        assert code == -signal.SIGKILL
        return
    assert code == 128 + sig, launcher.stderr.read()  # type: ignore[union-attr]
    assert f"stopped by {sig.name}" in launcher.stderr.read()  # type: ignore[union-attr]
    interrupted = json.loads((out / "report.json").read_text())["interrupted"]  # it does not pass for a whole run
    assert interrupted["after_round"] == rounds and sig.name in interrupted["why"]
    assert list(tmp.iterdir()) == [], "the temporary plan and certificates were left behind"


@pytest.mark.parametrize("sig", [signal.SIGHUP, signal.SIGINT], ids=lambda s: s.name)
def test_sighup_and_ctrl_c_stop_any_command_in_one_line(tmp_path, sig):
    """SIGHUP (a closed SSH session) and Ctrl-C take the same way out as SIGTERM above, for every
    command, without a traceback: here a client waiting for servers that never answer."""
    token = tmp_path / "token"
    token.write_text("t")
    waiting = subprocess.Popen(
        [*MEDMPC, "predict", "--servers", "http://127.0.0.1:9,http://127.0.0.1:9", "--token-file", str(token),
         "--wait-ready", "120", str(tmp_path / "x.png")],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONFAULTHANDLER": "1"},  # SIGABRT prints every thread's stack
    )  # fmt: skip
    deadline = time.monotonic() + 120
    while not _catches(waiting.pid, signal.SIGHUP):  # its handlers are installed (imports take a while)
        assert waiting.poll() is None and time.monotonic() < deadline, waiting.stderr.read()  # type: ignore[union-attr]
        time.sleep(0.05)
    time.sleep(0.5)  # past the handlers' installation
    waiting.send_signal(sig)
    # the signal may land in a long C call (loading torch's libraries takes seconds on a busy
    # machine), which Python finishes before it handles it; a command that ignored the signal
    # would wait for its --wait-ready of 120 s
    try:
        code = waiting.wait(timeout=60)
    except subprocess.TimeoutExpired:  # say where it waits, for the one run in many that did
        waiting.send_signal(signal.SIGABRT)
        waiting.wait(timeout=30)
        pytest.fail(f"still running 60 s after {sig.name}; its stacks:\n{waiting.stderr.read()}")  # type: ignore[union-attr]
    assert code == 128 + sig
    said = waiting.stderr.read()  # type: ignore[union-attr]
    assert f"stopped by {sig.name}" in said and "Traceback" not in said


_SPAWNER = """
import subprocess, sys, time
from medmpc.mpc.launch import die_with_parent
child = subprocess.Popen(["sleep", "60"], start_new_session=True,
                         preexec_fn=die_with_parent if sys.argv[1] == "yes" else None)
print(child.pid, flush=True)
time.sleep(60)
"""


@pytest.mark.parametrize("tied", [True, False], ids=["die_with_parent", "control"])
def test_a_party_dies_with_its_killed_launcher(tied):
    """The mechanism on its own, with the control that an untied child outlives its launcher
    (so the test above would see parties left running)."""
    launcher = subprocess.Popen(
        [sys.executable, "-c", _SPAWNER, "yes" if tied else "no"], stdout=subprocess.PIPE, text=True
    )
    child = int(launcher.stdout.readline())  # type: ignore[union-attr]
    try:
        launcher.kill()
        launcher.wait()
        assert (_gone([child], within_s=5) == []) is tied
    finally:
        if _alive(child):
            os.kill(child, signal.SIGKILL)


_SWALLOWING_IMPORT = """
import time
try:  # as some libraries' import-time code does: an exception, KeyboardInterrupt too, goes unseen
    time.sleep(3)
except BaseException:
    pass
"""

_IMPORTER = """
import sys, time
from medmpc.cli.main import install_stop_handlers
if sys.argv[1] == "ours":
    install_stop_handlers()
sys.path.insert(0, sys.argv[2])
print("importing", flush=True)
import swallowing
time.sleep(60)
"""


@pytest.mark.parametrize("handlers", ["ours", "python's"])
def test_a_ctrl_c_during_an_import_that_swallows_it_still_stops_the_command(tmp_path, handlers):
    """The signal lands in an import whose code catches every exception: with the command's handlers
    it is sent again once the import is over and stops the command; with Python's own (the control)
    the KeyboardInterrupt is lost and the command runs on, as `predict --wait-ready` once did."""
    (tmp_path / "swallowing.py").write_text(_SWALLOWING_IMPORT)
    proc = subprocess.Popen(
        [sys.executable, "-c", _IMPORTER, handlers.split("'")[0], str(tmp_path)],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )  # fmt: skip
    assert proc.stdout.readline().strip() == "importing"  # type: ignore[union-attr]
    time.sleep(1)  # inside the import's sleep
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=15)
        stopped = True
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        stopped = False
    assert stopped is (handlers == "ours")
