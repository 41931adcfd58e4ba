"""Run the three service parties as local processes (``medmpc serve``, tests, the load script)."""

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

from medmpc.mpc.launch import PartyError, channel_args, free_port, log_tail, party_name, start_party
from medmpc.serving.options import service_argv

PARTIES = ("model-owner", "compute", "dealer")


@dataclass
class LocalService:
    """Start with ``with LocalService(...) as service:``; ``service.urls`` are the compute parties."""

    checkpoint: Path
    tokens_file: Path | None  # None: the parties read $MEDMPC_TOKENS
    host: str = "127.0.0.1"
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
        return [f"{self.scheme}://{self.host}:{port}" for port in self._ports[:2]]

    def log_file(self, party: str) -> Path:
        return self._log_dir / f"{party}.log"

    def __enter__(self) -> LocalService:
        self._ports = self.ports or tuple(free_port(self.host) for _ in PARTIES)
        if self.log_dir is None:
            self._tmp: tempfile.TemporaryDirectory[str] | None = tempfile.TemporaryDirectory(prefix="medmpc-serve-")
            self._log_dir = Path(self._tmp.name)
        else:
            self._tmp, self._log_dir = None, self.log_dir
            self._log_dir.mkdir(parents=True, exist_ok=True)
        parties = ",".join(f"{self.host}:{port}" for port in self.mpc_ports or [free_port(self.host) for _ in PARTIES])
        # a CA for this service only, beside the logs' temporary folder; its key is never written
        self._keys = tempfile.TemporaryDirectory(prefix="medmpc-serve-pki-")
        channels = channel_args(
            [party_name(rank, 2) for rank in range(3)],
            Path(self._keys.name) / "pki",
            plaintext=self.plaintext_transport,
        )
        common = [
            "--parties",
            parties,
            *channels,
            "--host",
            self.host,
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
            for party, port in zip(PARTIES, self._ports):
                argv = [sys.executable, "-m", "medmpc.serving.party", "--role", party, "--port", str(port), *common]
                if self.mpc_listen_ports:
                    argv += ["--listen", f"{self.host}:{self.mpc_listen_ports[PARTIES.index(party)]}"]
                if party == "model-owner":
                    argv += ["--model", str(self.checkpoint)]
                with open(self.log_file(party), "wb") as log:
                    self._procs[party] = start_party(argv, log=log, env={**os.environ, "PYTHONUNBUFFERED": "1"})
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
        waiting = list(zip(PARTIES, self._ports))
        while waiting:
            self.check_alive()
            party, port = waiting[0]
            try:
                if httpx.get(f"{self.scheme}://{self.host}:{port}/ready", timeout=2, verify=verify).status_code == 200:
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
