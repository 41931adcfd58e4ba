"""Separate hosts on one machine: each party in its own network namespace, behind one router.

Topology: host ``i`` (in the order given) is alone in namespace ``mm<pid>n<k>-<name>`` with one
interface, ``eth0``, at 198.18.<i+1>.2/24 (the benchmarking range, RFC 2544), and a default
route to 198.18.<i+1>.1, the router namespace's end of their veth pair. A host reaches
another only through the router, and nothing else: not the machine's other interfaces, not
another host's loopback. The profile's bandwidth is a ``tc tbf`` on both ends of each veth
(the host's upload and download); its round-trip time is the delay line
(``netlab.delay``) in the router, which every forwarded packet passes once each way.

Needs CAP_NET_ADMIN (root), ``ip``, ``tc`` and ``/dev/net/tun``; :func:`unavailable` says what
is missing. Namespaces are removed on exit, also after an error; namespaces left by a
process that no longer exists (killed before its clean-up) are removed by the next one.

    with Network(["coordinator", "hospital0"], profile="wan") as net:
        net.popen("coordinator", [...]); net.address("coordinator")  # "198.18.1.2"

A process started on one of the hosts reaches the others through :class:`Placed`, made from
:meth:`Network.placement` (a load test's client, which starts the service parties).
"""

from __future__ import annotations

import itertools
import os
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

from medmpc.netlab import profiles
from medmpc.netlab.profiles import Profile

_OURS = re.compile(r"^mm(\d+)n\d+-")  # mm<pid>n<k>-<host>: the k-th network of process pid
_made_here = itertools.count()
MAX_HOSTS = 250
HOST_NAME = re.compile(r"^[a-z][a-z0-9]{0,31}$")


class NetlabError(RuntimeError):
    """Setting up or using the namespaces failed; the message names the command and host."""


def unavailable(profile: Profile | None = None) -> str | None:
    """Why separate hosts (linked by ``profile``, if given) cannot be made here, or None if they can."""
    if sys.platform != "linux":
        return "network namespaces need Linux"
    if os.geteuid() != 0:
        return "network namespaces need CAP_NET_ADMIN (run as root)"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"`{tool}` is not installed (iproute2)"
    if profile is not None and profile.rtt_s > 0 and not Path("/dev/net/tun").exists():
        return f"/dev/net/tun is missing (the delay line of profile {profile.name!r} needs a TUN device)"
    probe = f"mm{os.getpid()}probe"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode != 0:
        return f"cannot make a network namespace: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


def _sh(*argv: str) -> None:
    done = subprocess.run(argv, capture_output=True, text=True)
    if done.returncode != 0:
        raise NetlabError(f"`{' '.join(argv)}` failed: {done.stderr.strip()}")


def _remove_namespace(ns: str) -> None:
    pids = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True).stdout.split()
    for pid in pids:
        try:
            os.kill(int(pid), signal.SIGKILL)
        except ProcessLookupError:
            pass
    subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def _in_namespace(ns: str, argv: Sequence[str]) -> list[str]:
    return ["ip", "netns", "exec", ns, *argv]


@dataclass(frozen=True)
class Placed:
    """The hosts of a :class:`Network` that another process made and still owns (``placement``:
    its :meth:`Network.placement`); satisfies ``medmpc.mpc.launch.Hosts``."""

    placement: dict[str, dict[str, str]]

    def _host(self, host: str) -> dict[str, str]:
        try:
            return self.placement[host]
        except KeyError:
            raise KeyError(f"no host {host!r} in this network (hosts: {', '.join(self.placement)})") from None

    def address(self, host: str) -> str:
        return self._host(host)["address"]

    def port(self, host: str, wanted: int) -> int:
        self._host(host)
        return wanted

    def command(self, host: str, argv: Sequence[str]) -> list[str]:
        return _in_namespace(self._host(host)["namespace"], argv)


def remove_stale() -> list[str]:
    """Remove the namespaces of netlab processes that have died; returns their names."""
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split("\n")
    stale = []
    for line in listed:
        name = line.split(" ")[0]
        owner = _OURS.match(name)
        if owner is not None and not Path(f"/proc/{owner[1]}").exists():
            _remove_namespace(name)
            stale.append(name)
    return stale


class Network:
    """Hosts named ``hosts``, each in its own namespace, linked by ``profile`` (a name from
    ``netlab.profiles`` or a :class:`Profile`)."""

    def __init__(self, hosts: Sequence[str], *, profile: str | Profile) -> None:
        self.profile = profile if isinstance(profile, Profile) else profiles.profile(profile)
        if not 0 < len(hosts) <= MAX_HOSTS or len(set(hosts)) != len(hosts):
            raise ValueError(f"need 1 to {MAX_HOSTS} distinct host names, got {list(hosts)}")
        for name in hosts:
            if not HOST_NAME.match(name):
                raise ValueError(f"host name {name!r}: lower-case letters and digits, starting with a letter")
        self.hosts = list(hosts)
        self.prefix = f"mm{os.getpid()}n{next(_made_here)}-"
        self.router = self.prefix + "router"
        self._made: list[str] = []
        self._delay: subprocess.Popen[bytes] | None = None

    # -- where things are ---------------------------------------------------
    def namespace(self, host: str) -> str:
        self._index(host)
        return self.prefix + host

    def address(self, host: str) -> str:
        return f"198.18.{self._index(host) + 1}.2"

    def port(self, host: str, wanted: int) -> int:
        """A port ``host`` may listen on: ``wanted``, since each host has all its ports to itself."""
        self._index(host)
        return wanted

    def command(self, host: str, argv: Sequence[str]) -> list[str]:
        """``argv`` run on ``host`` (in its namespace, with this process's environment)."""
        return _in_namespace(self.namespace(host), argv)

    def placement(self) -> dict[str, dict[str, str]]:
        """Each host's namespace and address, for :class:`Placed` in another process."""
        return {h: {"namespace": self.namespace(h), "address": self.address(h)} for h in self.hosts}

    def popen(self, host: str, argv: Sequence[str], **kwargs: Any) -> subprocess.Popen[Any]:
        return subprocess.Popen(self.command(host, argv), **kwargs)

    def run(self, host: str, argv: Sequence[str], **kwargs: Any) -> subprocess.CompletedProcess[Any]:
        return subprocess.run(self.command(host, argv), **kwargs)

    def set_link(self, host: str, *, up: bool) -> None:
        """Plug ``host``'s cable in or pull it out (its one interface up or down)."""
        ns = self.namespace(host)
        _sh("ip", "-n", ns, "link", "set", "eth0", "up" if up else "down")
        if up:  # the kernel dropped the default route with the link
            _sh("ip", "-n", ns, "route", "replace", "default", "via", self._gateway(host))

    def _gateway(self, host: str) -> str:
        return f"198.18.{self._index(host) + 1}.1"

    def _index(self, host: str) -> int:
        try:
            return self.hosts.index(host)
        except ValueError:
            raise KeyError(f"no host {host!r} in this network (hosts: {', '.join(self.hosts)})") from None

    # -- life cycle -----------------------------------------------------------
    def __enter__(self) -> Network:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, kind: type[BaseException] | None, err: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    def start(self) -> None:
        reason = unavailable(self.profile)
        if reason is not None:
            raise NetlabError(reason)
        remove_stale()
        self._add_namespace(self.router)
        ip_r = ("ip", "-n", self.router)
        _sh("ip", "netns", "exec", self.router, "sysctl", "-qw", "net.ipv4.ip_forward=1")
        for host in self.hosts:
            self._add_host(host)
        if self.profile.rtt_s > 0:
            self._start_delay_line()
            _sh(*ip_r, "route", "add", "198.18.0.0/15", "dev", "tun0")
            _sh(*ip_r, "rule", "add", "iif", "tun0", "lookup", "100", "pref", "100")

    def _add_namespace(self, ns: str) -> None:
        _sh("ip", "netns", "add", ns)
        self._made.append(ns)
        _sh("ip", "-n", ns, "link", "set", "lo", "up")
        # forwarded packets come back out of the TUN device: no reverse-path filtering
        _sh("ip", "netns", "exec", ns, "sysctl", "-qw", "net.ipv4.conf.all.rp_filter=0")
        _sh("ip", "netns", "exec", ns, "sysctl", "-qw", "net.ipv4.conf.default.rp_filter=0")

    def _add_host(self, host: str) -> None:
        i = self._index(host) + 1
        ns, link = self.namespace(host), f"h{i}"
        self._add_namespace(ns)
        _sh("ip", "-n", self.router, "link", "add", link, "type", "veth", "peer", "name", "eth0", "netns", ns)
        # with a delay line, the route to each host is in table 100, reached only from the TUN
        # device; the main table sends every host's packets into the delay line first
        delayed = self.profile.rtt_s > 0
        _sh("ip", "-n", self.router, "addr", "add", f"198.18.{i}.1/24", "dev", link, *(["noprefixroute"] * delayed))
        _sh("ip", "-n", self.router, "link", "set", link, "up")
        if delayed:
            _sh("ip", "-n", self.router, "route", "add", f"198.18.{i}.0/24", "dev", link, "table", "100")
        _sh("ip", "-n", ns, "addr", "add", f"{self.address(host)}/24", "dev", "eth0")
        _sh("ip", "-n", ns, "link", "set", "eth0", "up")
        _sh("ip", "-n", ns, "route", "add", "default", "via", self._gateway(host))
        if self.profile.rate_bit_s is not None:
            rate = int(self.profile.rate_bit_s)
            burst = max(1 << 16, rate // 8 // 500)  # 2 ms at line rate, and at least one 64 KiB segment
            for where, dev in ((ns, "eth0"), (self.router, link)):
                _sh("tc", "-n", where, "qdisc", "add", "dev", dev, "root", "tbf", "rate", f"{rate}bit",
                    "burst", str(burst), "latency", "100ms")  # fmt: skip

    def _start_delay_line(self) -> None:
        argv = [sys.executable, "-m", "medmpc.netlab.delay", "--device", "tun0"]
        argv += ["--one-way-ms", str(self.profile.rtt_s / 2 * 1e3)]
        self._delay = subprocess.Popen(
            ["ip", "netns", "exec", self.router, *argv], stdin=subprocess.PIPE, stdout=subprocess.PIPE
        )
        assert self._delay.stdout is not None
        if self._delay.stdout.readline().strip() != b"ready":
            raise NetlabError(f"the delay line did not start (exit status {self._delay.wait()})")
        _sh("ip", "-n", self.router, "link", "set", "tun0", "up")
        _sh("ip", "netns", "exec", self.router, "sysctl", "-qw", "net.ipv4.conf.tun0.rp_filter=0")

    def close(self) -> None:
        """Stop everything still running on the hosts and remove the namespaces."""
        if self._delay is not None:
            assert self._delay.stdin is not None
            self._delay.stdin.close()
            self._delay.kill()
            self._delay.wait()
            self._delay = None
        for ns in reversed(self._made):
            _remove_namespace(ns)
        self._made = []
