"""Framed messages over plain TCP sockets, with deadlines and traffic counters.

A frame is an 8-byte big-endian header length, a JSON header, then an optional
raw tensor payload whose dtype and shape the header gives. Every receive has a
deadline, so a dead or silent peer becomes a :class:`PeerError` naming it
instead of a hang.
"""

from __future__ import annotations

import json
import socket
import struct
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch

_LEN = struct.Struct(">Q")
_DTYPES = {str(t): t for t in (torch.float32, torch.float64, torch.int64, torch.uint8)}
MAX_HEADER = 1 << 20


class PeerError(RuntimeError):
    """A peer disconnected, stalled past the timeout, or broke the protocol."""

    def __init__(self, peer: str, message: str) -> None:
        super().__init__(f"{peer}: {message}")
        self.peer = peer


@dataclass
class Traffic:
    bytes_sent: int = 0
    messages_sent: int = 0
    bytes_received: int = 0
    messages_received: int = 0
    # channels of one process may send or receive from several threads at once
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def count(self, *, sent: int = 0, received: int = 0) -> None:
        with self._lock:
            self.bytes_sent += sent
            self.messages_sent += bool(sent)
            self.bytes_received += received
            self.messages_received += bool(received)

    def as_dict(self) -> dict[str, int]:
        with self._lock:
            return {k: v for k, v in vars(self).items() if not k.startswith("_")}


@dataclass
class Message:
    kind: str
    meta: dict[str, Any] = field(default_factory=dict)
    tensor: torch.Tensor | None = None


class Channel:
    """One connection to a named peer."""

    def __init__(self, sock: socket.socket, peer: str, traffic: Traffic, timeout_s: float) -> None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock, self.peer, self.traffic, self.timeout_s = sock, peer, traffic, timeout_s

    def send(self, kind: str, meta: dict[str, Any] | None = None, tensor: torch.Tensor | None = None) -> None:
        header: dict[str, Any] = {"kind": kind, "meta": meta or {}}
        payload = b""
        if tensor is not None:
            t = tensor.detach().cpu().contiguous()
            if str(t.dtype) not in _DTYPES:
                raise TypeError(f"cannot send dtype {t.dtype}")
            header["dtype"], header["shape"] = str(t.dtype), list(t.shape)
            payload = t.reshape(-1).view(torch.uint8).numpy().data if t.numel() else b""
        head = json.dumps(header).encode()
        try:
            self.sock.settimeout(self.timeout_s)
            self.sock.sendall(_LEN.pack(len(head)) + head)
            if len(payload):
                self.sock.sendall(payload)
        except OSError as err:
            raise PeerError(self.peer, f"send failed ({err})") from err
        self.traffic.count(sent=_LEN.size + len(head) + len(payload))

    def _recv_exact(self, n: int, deadline: float, into: memoryview | None = None) -> memoryview:
        view = memoryview(bytearray(n)) if into is None else into
        got = 0
        while got < n:
            left = deadline - time.monotonic()
            if left <= 0:
                raise PeerError(self.peer, f"no message within {self.timeout_s:.0f} s (stalled or dead)")
            self.sock.settimeout(left)
            try:
                k = self.sock.recv_into(view[got:], n - got)
            except TimeoutError as err:
                raise PeerError(self.peer, f"no message within {self.timeout_s:.0f} s (stalled or dead)") from err
            except OSError as err:
                raise PeerError(self.peer, f"connection lost ({err})") from err
            if k == 0:
                raise PeerError(self.peer, "disconnected (process ended or crashed)")
            got += k
        return view

    def recv(self, timeout_s: float | None = None) -> Message:
        deadline = time.monotonic() + (self.timeout_s if timeout_s is None else timeout_s)
        (n,) = _LEN.unpack(self._recv_exact(_LEN.size, deadline))
        if n > MAX_HEADER:
            raise PeerError(self.peer, f"header of {n} bytes is too large")
        header = json.loads(bytes(self._recv_exact(n, deadline)))
        tensor = None
        size = _LEN.size + n
        if "dtype" in header:
            dtype = _DTYPES[header["dtype"]]
            shape = header["shape"]
            numel = 1
            for s in shape:
                numel *= s
            nbytes = numel * torch.empty(0, dtype=dtype).element_size()
            # received straight into the tensor's memory: no zero-filled buffer, no copy
            tensor = torch.empty(shape, dtype=dtype)
            if nbytes:
                self._recv_exact(nbytes, deadline, memoryview(tensor.view(-1).view(torch.uint8).numpy()))
            size += nbytes
        self.traffic.count(received=size)
        if header["kind"] == "error":
            raise PeerError(self.peer, header["meta"].get("message", "reported an error"))
        return Message(header["kind"], header["meta"], tensor)

    def expect(self, kind: str, timeout_s: float | None = None) -> Message:
        msg = self.recv(timeout_s)
        if msg.kind != kind:
            raise PeerError(self.peer, f"expected a {kind!r} message, got {msg.kind!r}")
        return msg

    def close(self) -> None:
        self.sock.close()


def expect_all(channels: list[Channel], kind: str) -> list[Message]:
    """One ``kind`` message from each channel, received concurrently (large payloads from
    several peers arrive in parallel instead of one after another)."""
    if len(channels) == 1:
        return [channels[0].expect(kind)]
    with ThreadPoolExecutor(len(channels)) as pool:
        return list(pool.map(lambda ch: ch.expect(kind), channels))


def connect(host: str, port: int, *, me: str, peer: str, traffic: Traffic, timeout_s: float) -> Channel:
    """Connect (retrying while the peer starts up) and introduce ourselves."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            sock = socket.create_connection((host, port), timeout=max(0.1, deadline - time.monotonic()))
            break
        except OSError as err:
            if time.monotonic() > deadline:
                raise PeerError(peer, f"cannot connect to {host}:{port} within {timeout_s:.0f} s ({err})") from err
            time.sleep(0.05)
    ch = Channel(sock, peer, traffic, timeout_s)
    ch.send("hello", {"from": me})
    return ch


class Listener:
    """Accepts connections from a known set of peers, each introducing itself by name."""

    def __init__(self, host: str, port: int) -> None:
        self.sock = socket.create_server((host, port), reuse_port=False)
        self.port = int(self.sock.getsockname()[1])

    def accept(self, expected: set[str], *, traffic: Traffic, timeout_s: float) -> dict[str, Channel]:
        channels: dict[str, Channel] = {}
        deadline = time.monotonic() + timeout_s
        while len(channels) < len(expected):
            left = deadline - time.monotonic()
            if left <= 0:
                missing = ", ".join(sorted(expected - set(channels)))
                raise PeerError(missing, f"did not connect within {timeout_s:.0f} s")
            self.sock.settimeout(left)
            try:
                sock, _ = self.sock.accept()
            except TimeoutError:
                continue
            ch = Channel(sock, "unknown peer", traffic, timeout_s)
            name = ch.expect("hello").meta.get("from", "")
            if name not in expected or name in channels:
                ch.send("error", {"message": f"unexpected peer {name!r}"})
                ch.close()
                continue
            ch.peer = name
            channels[name] = ch
        return channels

    def close(self) -> None:
        self.sock.close()
