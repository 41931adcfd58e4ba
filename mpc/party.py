"""Entry point of one CrypTen party process: ``python -m medmpc.mpc.party``.

Run it by hand on each machine to spread the parties over a network::

    RANK is given by --rank; every process gets the same --parties HOST:PORT,... (one
    address per rank, the dealer's last: each listens on its own) and --mpc-tls-dir, a
    folder with ca.pem, crl.pem and its own party<RANK>.pem/.key (dealer.pem/.key for
    the dealer) from one federation CA (mpc.pki). The dealer (TTP) runs with
    --rank WORLD_SIZE --dealer.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from medmpc.mpc import crypten_compat
from medmpc.mpc.launch import channel_environment


def resolve_job(spec: str) -> Callable[..., Any]:
    module_name, sep, func_name = spec.partition(":")
    if not sep or not module_name or not func_name:
        raise ValueError(f"job must look like 'package.module:function', got {spec!r}")
    job: Callable[..., Any] = getattr(importlib.import_module(module_name), func_name)
    return job


def _atomic_save(obj: Any, path: Path) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def add_channel_args(p: argparse.ArgumentParser) -> None:
    """How a CrypTen process reaches the others (mpc.tls_communicator)."""
    p.add_argument(
        "--parties", required=True, help="HOST:PORT of every rank, the dealer's last (each listens on its own)"
    )
    p.add_argument(
        "--listen",
        help="HOST:PORT this process listens on, where a port forward puts it elsewhere than its entry in --parties",
    )
    channels = p.add_mutually_exclusive_group(required=True)
    channels.add_argument(
        "--mpc-tls-dir",
        help="federation folder: ca.pem, crl.pem and this process's "
        "party<RANK>.pem/.key (dealer.pem/.key), from one CA (mpc.pki)",
    )
    channels.add_argument(
        "--plaintext-transport",
        action="store_true",
        help="no TLS between the processes, to measure the protocol's own cost; NOT secure",
    )


def channel_env(a: argparse.Namespace) -> dict[str, str]:
    """The channel environment from :func:`add_channel_args`' flags."""
    tls_dir = None if a.plaintext_transport else a.mpc_tls_dir
    return channel_environment(parties=a.parties, tls_dir=tls_dir, listen=a.listen or "")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m medmpc.mpc.party", description=__doc__)
    p.add_argument("--job", required=True, help="package.module:function run on every party")
    p.add_argument("--rank", type=int, required=True)
    p.add_argument("--world-size", type=int, required=True, help="number of computing parties")
    add_channel_args(p)
    p.add_argument("--args-file", type=Path, help="JSON keyword arguments for the job")
    p.add_argument("--result-file", type=Path, help="where this party writes its return value")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds before a silent peer is an error")
    p.add_argument("--provider", default="TTP")
    p.add_argument("--allow-insecure", action="store_true", help="permit the TFP provider (tests only)")
    p.add_argument("--dealer", action="store_true", help="run the dealer (TTP server)")
    a = p.parse_args(argv)

    os.environ.update(RANK=str(a.rank), WORLD_SIZE=str(a.world_size), **channel_env(a))
    # Each party is one process on a shared machine; oversubscribed threads slow every party.
    torch.set_num_threads(max(1, int(os.environ.get("MEDMPC_THREADS", "1"))))
    if a.dealer:
        crypten_compat.run_dealer(timeout_s=a.timeout)
        return
    job = resolve_job(a.job)
    kwargs = json.loads(a.args_file.read_text()) if a.args_file else {}
    crypten = crypten_compat.init_party(timeout_s=a.timeout, provider=a.provider, allow_insecure=a.allow_insecure)
    try:
        result = job(rank=a.rank, world_size=a.world_size, **kwargs)
    finally:
        crypten.uninit()
    if a.result_file is not None:
        _atomic_save(result, a.result_file)


if __name__ == "__main__":
    main()
