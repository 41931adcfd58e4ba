"""The ``medmpc`` command as a user runs it: its own process, real files."""

from __future__ import annotations

import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

MEDMPC = [sys.executable, "-m", "medmpc.cli.main"]  # the command, in the interpreter running the tests


def medmpc(
    *args: object, check: bool = True, timeout: float = 300, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run ``medmpc ARGS``; with ``check``, a non-zero exit fails the test with the command's stderr."""
    proc = subprocess.run(
        [*MEDMPC, *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"medmpc {args} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc


def medmpc_each(*calls: tuple[object, ...], workers: int = 3) -> list[subprocess.CompletedProcess[str]]:
    """Run independent ``medmpc`` commands at once (most of each is Python's start-up), unchecked."""
    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(lambda args: medmpc(*args, check=False), calls))
