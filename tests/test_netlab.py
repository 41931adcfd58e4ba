"""The separate-hosts harness: namespaces that isolate, links that have the profile's
bandwidth and round-trip time, and nothing left behind."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from medmpc.netlab.hosts import Network, unavailable
from medmpc.netlab.profiles import PROFILES, Profile, profile

pytestmark = pytest.mark.skipif(unavailable() is not None, reason=f"no separate hosts here: {unavailable()}")

PROBE = [sys.executable, str(Path(__file__).with_name("netlab_probe.py"))]


def _namespaces() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    return {line.split(" ")[0] for line in out.splitlines() if line}


def _measure(net: Network, a: str, b: str, megabytes: int) -> dict:
    server = net.popen(b, [*PROBE, "serve", "5000"], stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout is not None and server.stdout.readline().strip() == "listening"
        client = net.run(
            a, [*PROBE, "measure", net.address(b), "5000", str(megabytes)], capture_output=True, text=True, timeout=60
        )
        assert client.returncode == 0, client.stderr
        return json.loads(client.stdout)
    finally:
        server.kill()
        server.wait()


@pytest.mark.parametrize("name,megabytes", [("wan", 12), ("lan", 100)])
def test_a_profile_gives_its_round_trip_time_and_bandwidth(name, megabytes):
    p = profile(name)
    if unavailable(p) is not None:
        pytest.skip(unavailable(p))
    with Network(["a", "b"], profile=p) as net:
        link = _measure(net, "a", "b", megabytes)
    # the delay line releases packets 50 us early to make up for its timer wake-up
    assert 0.9 * p.rtt_s <= link["rtt_s"] <= p.rtt_s * 1.3 + 0.3e-3, link
    # slow start costs a few round trips of the transfer
    assert 0.6 * p.rate_bit_s / 1e6 <= link["mbit_s"] <= 1.02 * p.rate_bit_s / 1e6, link


def test_the_unshaped_profile_is_much_faster_than_wan():
    """Control for the test above: without shaping and delay the same probe sees neither."""
    with Network(["a", "b"], profile="unshaped") as net:
        link = _measure(net, "a", "b", 60)
    assert link["rtt_s"] < 2e-3 and link["mbit_s"] > 1000, link


def test_a_host_reaches_other_hosts_only_at_their_own_address():
    listener = "import socket,sys; s=socket.create_server((sys.argv[1], 6000)); print('up', flush=True); s.accept()"
    connect = "import socket,sys; socket.create_connection((sys.argv[1], 6000), timeout=2); print('reached')"
    with Network(["a", "b"], profile="unshaped") as net:
        for bind, target, reachable in [
            (net.address("b"), net.address("b"), True),  # control: the test can see a reachable listener
            ("127.0.0.1", "127.0.0.1", False),  # b's loopback is b's alone
        ]:
            server = net.popen("b", [sys.executable, "-c", listener, bind], stdout=subprocess.PIPE, text=True)
            assert server.stdout is not None and server.stdout.readline().strip() == "up"
            tried = net.run("a", [sys.executable, "-c", connect, target], capture_output=True, text=True)
            server.kill()
            server.wait()
            assert (tried.returncode == 0) == reachable, (bind, tried.stderr[-300:])
        addresses = net.run("a", ["ip", "-4", "-o", "addr"], capture_output=True, text=True, check=True).stdout
        assert sorted(line.split()[3] for line in addresses.splitlines()) == ["127.0.0.1/8", f"{net.address('a')}/24"]


def test_namespaces_are_removed_even_when_the_body_fails():
    if unavailable(profile("wan")) is not None:
        pytest.skip(unavailable(profile("wan")))
    before = _namespaces()
    with pytest.raises(RuntimeError, match="on purpose"):
        with Network(["a", "b"], profile="wan") as net:
            assert {net.namespace("a"), net.namespace("b")} <= _namespaces()
            raise RuntimeError("on purpose")
    assert _namespaces() == before


def test_profiles_and_names_are_checked():
    with pytest.raises(ValueError, match="unknown network profile 'moon'; known: lan, wan"):
        profile("moon")
    with pytest.raises(ValueError, match="distinct"):
        Network(["a", "a"], profile="lan")
    with pytest.raises(ValueError, match="host name 'Bad_Name'"):
        Network(["Bad_Name"], profile="lan")
    assert set(PROFILES) >= {"lan", "wan"}


def test_the_model_adds_a_one_way_latency_per_round_and_bytes_over_bandwidth():
    wan = Profile(name="x", rate_bit_s=100e6, rtt_s=0.04, about="")
    assert wan.predict(compute_s=1.0, rounds=10, bytes_sent=12.5e6) == pytest.approx(1.0 + 10 * 0.02 + 1.0)


def test_namespaces_of_a_dead_run_are_removed_by_the_next():
    dead = next(pid for pid in range(4_000_000, 4_100_000) if not Path(f"/proc/{pid}").exists())
    subprocess.run(["ip", "netns", "add", f"mm{dead}n0-left"], check=True)
    with Network(["a"], profile="unshaped"):
        assert f"mm{dead}n0-left" not in _namespaces()
