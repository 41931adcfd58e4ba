"""The options every service party takes, shared by ``python -m medmpc.serving.party`` and ``medmpc serve``."""

from __future__ import annotations

import argparse
import ipaddress
from collections.abc import Mapping
from pathlib import Path

# (flag, type, default, help); a None default means "not given"
_OPTIONS: list[tuple[str, type, object, str]] = [
    ("--tokens-file", Path, None, "client bearer tokens, one per line (else $MEDMPC_TOKENS)"),
    ("--tls-cert", Path, None, "TLS certificate (PEM): serve HTTPS"),
    ("--tls-key", Path, None, "TLS private key (PEM)"),
    ("--max-batch", int, 8, "images per encrypted forward pass"),
    ("--max-queue", int, 64, "requests waiting at most; more get 429"),
    (
        "--per-client-queue",
        int,
        None,
        "requests one client (token) may have waiting; more get 429 (default: a quarter of --max-queue)",
    ),
    ("--share-timeout", float, 10.0, "seconds a share waits for its partner share to reach the other party"),
    ("--request-timeout", float, 60.0, "seconds a request may wait for its result"),
    ("--peer-timeout", float, 120.0, "seconds before a silent party is an error"),
    ("--max-body-mb", float, 16.0, "largest accepted request body"),
    ("--nonlinear", str, "fss", "ReLU and the input clamp: 'fss' (one round each, large dealer keys) or 'bit-sliced'"),
]


def add_service_options(p: argparse.ArgumentParser) -> None:
    for flag, kind, default, text in _OPTIONS:
        p.add_argument(flag, type=kind, default=default, help=text)


def service_argv(values: Mapping[str, object]) -> list[str]:
    """Option values (keyed like argparse's names: ``max_batch``) as arguments for a party process."""
    argv = []
    for flag, _, _, _ in _OPTIONS:
        value = values.get(flag[2:].replace("-", "_"))
        if value is not None:
            argv += [flag, str(value)]
    return argv


def is_loopback(host: str) -> bool:
    """Whether ``host`` names this machine only (plain HTTP is allowed there, nowhere else)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # a name: it may resolve anywhere
        return False
