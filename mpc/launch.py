"""Launch and supervise one OS process per party.

Every party is a plain ``python -m medmpc.mpc.party`` process that finds the others
through explicit addresses (``--parties host:port,...``, one per process) and
proves who it is with a certificate, so the same command runs unchanged with
parties on different machines. ``Hosts`` says where each party runs: all on this
machine (``ThisMachine``), or each on a host of its own (``medmpc.netlab.hosts.Network``,
the same commands run in separate network namespaces). The
supervisor below starts them, collects their results and, when one party dies
or the run outlives its deadline, stops all of them and names the culprit.
Nothing here forks a live interpreter (unlike ``crypten.mpc.run_multiprocess``).
"""

from __future__ import annotations

import ctypes
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Protocol

import torch

from medmpc.mpc import pki

DEFAULT_TIMEOUT_S = 120.0
CRYPTEN_PORT = 29500  # a CrypTen party's listener, where each host's ports are its own
# how a CrypTen process finds the others (mpc.tls_communicator reads them)
PARTIES_ENV, LISTEN_ENV, TLS_DIR_ENV = "MEDMPC_PARTIES", "MEDMPC_LISTEN", "MEDMPC_TLS_DIR"
PLAINTEXT_ENV, TIMEOUT_ENV = "MEDMPC_PLAINTEXT_TRANSPORT", "MEDMPC_PEER_TIMEOUT"
PARTY_NAMES_ENV = "MEDMPC_PARTY_NAMES"  # every rank's name, the dealer's last (else party<R>, dealer)


def channel_environment(*, parties: str, tls_dir: str | None, listen: str = "") -> dict[str, str]:
    """The environment mpc.tls_communicator connects by: ``parties``, every rank's HOST:PORT (the
    dealer's last); ``listen``, where this process binds if not at its own entry; ``tls_dir``, the
    federation folder, or None for the plaintext transport (measurements only)."""
    return {
        PARTIES_ENV: parties,
        LISTEN_ENV: listen,
        TLS_DIR_ENV: tls_dir or "",
        PLAINTEXT_ENV: "1" if tls_dir is None else "",
    }


class PartyError(RuntimeError):
    """A party failed, or the run timed out; the message names the party."""

    def __init__(self, party: str, message: str) -> None:
        super().__init__(f"party {party!r}: {message}")
        self.party = party


@dataclass
class PartyProcess:
    name: str
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)
    result_file: Path | None = None
    echo: bool = False  # copy its output to our stderr as it runs (progress for the user)


def _ephemeral_ports() -> tuple[int, int]:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999  # Linux's default


def free_port(host: str = "127.0.0.1") -> int:
    """A port free on ``host`` now, for a party to listen on a moment later.

    Not one the kernel would pick (``bind(0)`` and every outgoing connection draw from the
    ephemeral range): in the gap before the party binds it, a connection made by any process
    could take such a port and the party would fail with "address already in use"."""
    low, high = _ephemeral_ports()
    # above the well-known services' ports, on either side of the ephemeral range
    ranges = [r for r in ((10000, low), (high + 1, 65536)) if r[1] - r[0] >= 1000]
    for _ in range(100 if ranges else 0):
        start, stop = ranges[secrets.randbelow(len(ranges))]
        port = start + secrets.randbelow(stop - start)
        with socket.socket() as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
            return port
    raise OSError(f"no free port on {host} outside the ephemeral range {low}-{high}")


class Hosts(Protocol):
    """Where parties run: each party's name is the name of its host."""

    def address(self, host: str) -> str:
        """The address the others reach ``host`` at."""
        ...

    def port(self, host: str, wanted: int) -> int:
        """A port ``host`` may listen on; ``wanted`` where that host's ports are its own."""
        ...

    def command(self, host: str, argv: Sequence[str]) -> list[str]:
        """``argv`` run on ``host``."""
        ...


@dataclass(frozen=True)
class ThisMachine:
    """Every party on this machine at ``host``, each listener on a free port."""

    host: str = "127.0.0.1"

    def address(self, host: str) -> str:
        return self.host

    def port(self, host: str, wanted: int) -> int:
        return free_port(self.host)

    def command(self, host: str, argv: Sequence[str]) -> list[str]:
        return list(argv)


_PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """Run in a party's process between fork and exec (``preexec_fn``): the kernel kills it
    when its launcher dies, even by SIGKILL, where no ``finally`` of the launcher runs.

    Each party has a session of its own (so a terminal's Ctrl-C reaches only the launcher,
    which stops them in order); without this a killed launcher would leave them running.
    """
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")


def start_party(argv: Sequence[str], *, log: BinaryIO, env: dict[str, str]) -> subprocess.Popen[bytes]:
    """One party's process: its own session, output to ``log``, killed with its launcher."""
    return subprocess.Popen(
        argv, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, preexec_fn=die_with_parent
    )


def log_tail(path: Path, n_chars: int = 2000) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return text[-n_chars:].strip()


def _copy_out(logs: list[BinaryIO]) -> None:
    for f in logs:
        sys.stderr.buffer.write(f.read())
    sys.stderr.flush()


def _failure(first: str, procs: dict[str, tuple[subprocess.Popen[bytes], Path]], running: set[str]) -> PartyError:
    """Describe ``first``'s failure and any other party that failed with it.

    When one party dies its peers often fail a moment later (connection lost), and
    which exit is seen first is a race, so every party that failed is listed.
    """
    time.sleep(0.5)
    others = [n for n in sorted(running) if procs[n][0].poll() not in (None, 0)]
    message = _status(procs, first)
    if others:
        message += "\nalso failed: " + "\n".join(f"{n} {_status(procs, n)}" for n in others)
    return PartyError(first, message)


def _status(procs: dict[str, tuple[subprocess.Popen[bytes], Path]], name: str) -> str:
    code = procs[name][0].returncode
    how = f"killed by signal {-code}" if code < 0 else f"exited with code {code}"
    return f"{how}; last output:\n{log_tail(procs[name][1])}"


def supervise(
    parties: list[PartyProcess], *, timeout_s: float, workdir: Path, expendable: frozenset[str] = frozenset()
) -> dict[str, Any]:
    """Run the processes to completion; return each party's result (``None`` if it has none).

    The first party to exit non-zero, or the deadline, stops all of them; a party in
    ``expendable`` (one the protocol goes on without) exiting non-zero is reported on stderr
    and the others go on, and once every other party has finished, those still running are
    stopped (as hung). The deadline applies to the rest.
    """
    procs: dict[str, tuple[subprocess.Popen[bytes], Path]] = {}
    echoes: list[BinaryIO] = []
    env_base = {**os.environ, "PYTHONUNBUFFERED": "1"}
    try:
        for party in parties:
            log = workdir / f"{party.name}.log"
            with open(log, "wb") as out:
                procs[party.name] = (start_party(party.argv, log=out, env={**env_base, **party.env}), log)
        deadline = time.monotonic() + timeout_s
        running = set(procs)
        echoes = [open(procs[p.name][1], "rb") for p in parties if p.echo]
        while running:
            _copy_out(echoes)
            for name in sorted(running):
                code = procs[name][0].poll()
                if code is None:
                    continue
                running.discard(name)
                if code != 0 and name in expendable:
                    print(
                        f"{name} {_status(procs, name)}\nthe others go on without {name}", file=sys.stderr, flush=True
                    )
                elif code != 0:
                    raise _failure(name, procs, running)
            if running and running <= expendable and len(procs) > len(expendable):
                # the others finished: the protocol went on without these (hung, or cut off)
                print(f"the run is over without {', '.join(sorted(running))}: stopped", file=sys.stderr, flush=True)
                break
            if running and time.monotonic() > deadline:
                slow = ", ".join(sorted(running))
                raise PartyError(
                    sorted(running)[0],
                    f"did not finish within {timeout_s:.0f} s (still running: {slow})",
                )
            time.sleep(0.05)
    finally:
        _copy_out(echoes)
        for f in echoes:
            f.close()
        for proc, _ in procs.values():
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    results: dict[str, Any] = {}
    for party in parties:
        if party.result_file is None:
            results[party.name] = None
        elif not party.result_file.exists():
            raise PartyError(party.name, "finished without writing its result")
        else:
            results[party.name] = torch.load(party.result_file, weights_only=True)
    return results


def party_name(rank: int, world_size: int) -> str:
    """A CrypTen process's name in the federation's certificates: PARTY_NAMES_ENV's entry for
    ``rank`` where a process that has a name of its own (a federation's aggregator) sets it."""
    names = os.environ.get(PARTY_NAMES_ENV, "")
    if names:
        listed = names.split(",")
        if len(listed) != world_size + 1:
            raise ValueError(f"{PARTY_NAMES_ENV} names {len(listed)} processes; the world has {world_size + 1}")
        return listed[rank]
    return "dealer" if rank == world_size else f"party{rank}"


def channel_args(names: list[str], folder: Path, *, plaintext: bool) -> list[str]:
    """``--mpc-tls-dir`` of a CA made in ``folder`` for these processes only, or ``--plaintext-transport``."""
    if plaintext:
        return ["--plaintext-transport"]
    pki.init_federation(folder, names, days=7, keep_ca_key=False)
    return ["--mpc-tls-dir", str(folder)]


def run_crypten_job(
    job: str,
    *,
    world_size: int,
    args: dict[str, Any] | None = None,
    dealer: bool = True,
    provider: str = "TTP",
    allow_insecure: bool = False,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    hosts: Hosts = ThisMachine(),
    plaintext_transport: bool = False,
) -> list[Any]:
    """Run ``job`` (``"package.module:function"``) on ``world_size`` CrypTen parties.

    Each party calls ``function(rank=..., world_size=..., **args)`` after CrypTen is
    initialised; the return values (tensors, numbers, lists, dicts) come back in
    rank order. With ``dealer`` a separate process serves correlated randomness
    (CrypTen's ``TTP`` provider) and learns nothing about the parties' inputs.
    The processes talk over mutually authenticated TLS with certificates from a CA made
    for this run only (its key never written); ``plaintext_transport`` measures without.
    ``hosts`` places each party (``party0``, ``party1``, ``dealer``) on its host.
    """
    if world_size < 2:
        raise ValueError(f"an MPC job needs at least 2 parties, got world_size={world_size}")
    if dealer != (provider.upper() == "TTP"):
        raise ValueError("the TTP provider needs dealer=True, and only TTP uses a dealer")
    names = [party_name(rank, world_size) for rank in range(world_size + dealer)]
    addresses = ",".join(f"{hosts.address(n)}:{hosts.port(n, CRYPTEN_PORT)}" for n in names)
    with tempfile.TemporaryDirectory(prefix="medmpc-") as tmp:
        workdir = Path(tmp)
        args_file = workdir / "args.json"
        args_file.write_text(json.dumps(args or {}))
        common = [
            "--job",
            job,
            "--world-size",
            str(world_size),
            "--parties",
            addresses,
            "--args-file",
            str(args_file),
            "--timeout",
            str(timeout_s),
            "--provider",
            provider,
            *channel_args(names, workdir / "pki", plaintext=plaintext_transport),
        ]
        if allow_insecure:
            common.append("--allow-insecure")
        parties = []
        for rank in range(world_size):
            result = workdir / f"result{rank}.pt"
            argv = [sys.executable, "-m", "medmpc.mpc.party", *common, "--rank", str(rank)]
            argv += ["--result-file", str(result)]
            parties.append(PartyProcess(f"party{rank}", hosts.command(f"party{rank}", argv), result_file=result))
        if dealer:
            argv = [sys.executable, "-m", "medmpc.mpc.party", *common, "--rank", str(world_size), "--dealer"]
            parties.append(PartyProcess("dealer", hosts.command("dealer", argv)))
        results = supervise(parties, timeout_s=timeout_s + 30, workdir=workdir)
    return [results[f"party{rank}"] for rank in range(world_size)]
