"""Run the three service parties as processes of this launcher (``medmpc serve``, tests, the load
script): on this machine, or each on a host of its own (``hosts``, e.g. ``medmpc.netlab.hosts.Placed``)."""

from __future__ import annotations

import os
import signal
import ssl
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from medmpc.mpc.launch import (
    CRYPTEN_PORT,
    Hosts,
    PartyError,
    ThisMachine,
    channel_args,
    log_tail,
    party_name,
    start_party,
)
from medmpc.serving.options import service_argv

PARTIES = ("model-owner", "compute", "dealer")
HOSTS = tuple(party_name(rank, 2) for rank in range(3))  # their hosts' (and certificates') names
HTTP_PORT = 8443  # each party's front end, where each host's ports are its own


@dataclass
class LocalService:
    """Start with ``with LocalService(...) as service:``; ``service.urls`` are the compute parties."""

    checkpoint: Path
    tokens_file: Path | None  # None: the parties read $MEDMPC_TOKENS
    host: str = "127.0.0.1"  # with the default ``hosts``: every party's address
    hosts: Hosts | None = None  # where each party runs, by its name in HOSTS; default ThisMachine(host)
    ports: tuple[int, int, int] | None = None  # model owner, compute party, dealer
    mpc_ports: tuple[int, int, int] | None = None  # the parties' CrypTen addresses (default: free ports)
    mpc_listen_ports: tuple[int, int, int] | None = None  # where they listen, if elsewhere (a port forward)
    plaintext_transport: bool = False  # between the parties; measurement only
    tls_cert: Path | None = None
    tls_key: Path | None = None
    max_batch: int = 8
    max_queue: int = 64
    per_client_queue: int | None = None  # None: the parties' default (a quarter of max_queue)
    share_timeout_s: float = 10.0
    request_timeout_s: float = 60.0
    peer_timeout_s: float = 120.0
    max_body_mb: float = 16.0
    nonlinear: str = "fss"  # ReLU and the input clamp (mpc.comparison.configure)
    log_dir: Path | None = None  # default: a temporary folder
    _procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict, init=False)

    @property
    def scheme(self) -> str:
        return "https" if self.tls_cert else "http"

    @property
    def urls(self) -> list[str]:
        return [self._url(i) for i in range(2)]

    def _url(self, i: int) -> str:
        return f"{self.scheme}://{self._addresses[i]}:{self._ports[i]}"

    def log_file(self, party: str) -> Path:
        return self._log_dir / f"{party}.log"

    def __enter__(self) -> LocalService:
        hosts = self.hosts or ThisMachine(self.host)
        self._addresses = [hosts.address(h) for h in HOSTS]
        self._ports = self.ports or tuple(hosts.port(h, HTTP_PORT) for h in HOSTS)
        if self.log_dir is None:
            self._tmp: tempfile.TemporaryDirectory[str] | None = tempfile.TemporaryDirectory(prefix="medmpc-serve-")
            self._log_dir = Path(self._tmp.name)
        else:
            self._tmp, self._log_dir = None, self.log_dir
            self._log_dir.mkdir(parents=True, exist_ok=True)
        mpc_ports = self.mpc_ports or [hosts.port(h, CRYPTEN_PORT) for h in HOSTS]
        parties = ",".join(f"{address}:{port}" for address, port in zip(self._addresses, mpc_ports))
        # a CA for this service only, beside the logs' temporary folder; its key is never written
        self._keys = tempfile.TemporaryDirectory(prefix="medmpc-serve-pki-")
        channels = channel_args(
            list(HOSTS),
            Path(self._keys.name) / "pki",
            plaintext=self.plaintext_transport,
        )
        common = [
            "--parties",
            parties,
            *channels,
            *service_argv(
                {
                    "tokens_file": self.tokens_file,
                    "tls_cert": self.tls_cert,
                    "tls_key": self.tls_key,
                    "max_batch": self.max_batch,
                    "max_queue": self.max_queue,
                    "per_client_queue": self.per_client_queue,
                    "share_timeout": self.share_timeout_s,
                    "request_timeout": self.request_timeout_s,
                    "peer_timeout": self.peer_timeout_s,
                    "max_body_mb": self.max_body_mb,
                    "nonlinear": self.nonlinear,
                }
            ),
        ]
        try:
            for i, (party, address, port) in enumerate(zip(PARTIES, self._addresses, self._ports)):
                argv = [sys.executable, "-m", "medmpc.serving.party", "--role", party, "--host", address]
                argv += ["--port", str(port), *common]
                if self.mpc_listen_ports:
                    argv += ["--listen", f"{address}:{self.mpc_listen_ports[i]}"]
                if party == "model-owner":
                    argv += ["--model", str(self.checkpoint)]
                with open(self.log_file(party), "wb") as log:
                    self._procs[party] = start_party(
                        hosts.command(HOSTS[i], argv), log=log, env={**os.environ, "PYTHONUNBUFFERED": "1"}
                    )
            self.wait_ready(timeout_s=self.peer_timeout_s)
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def check_alive(self) -> None:
        """Raise naming the first party whose process has exited."""
        for party, proc in self._procs.items():
            if proc.poll() is not None:
                raise PartyError(
                    party, f"exited with code {proc.returncode}; last output:\n{log_tail(self.log_file(party))}"
                )

    def wait_ready(self, *, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        verify = ssl.create_default_context(cafile=self.tls_cert) if self.tls_cert else True
        waiting = list(enumerate(PARTIES))
        while waiting:
            self.check_alive()
            i, party = waiting[0]
            try:
                if httpx.get(f"{self._url(i)}/ready", timeout=2, verify=verify).status_code == 200:
                    waiting.pop(0)
                    continue
            except httpx.HTTPError:
                pass  # not listening yet
            if time.monotonic() > deadline:
                raise PartyError(
                    party, f"not ready within {timeout_s:.0f} s; last output:\n{log_tail(self.log_file(party))}"
                )
            time.sleep(0.2)

    def stop(self, party: str) -> None:
        """Kill one party (tests use this to check the others fail cleanly)."""
        proc = self._procs[party]
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()

    def __exit__(self, *exc: object) -> None:
        for proc in self._procs.values():
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for party, proc in self._procs.items():
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.stop(party)
        if self._tmp is not None:
            self._tmp.cleanup()
        if getattr(self, "_keys", None) is not None:
            self._keys.cleanup()
