"""Runs across separate hosts (``netlab`` namespaces) with the production commands: a party
that loses its network is named within the timeout and nothing is revealed; an unreachable
listener is named with its address; encrypted inference and the prediction service with each
party on its own host."""

import dataclasses
import json
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from medmpc.mpc.launch import PartyError
from medmpc.netlab.hosts import Network, unavailable
from medmpc.protocols.plan import Plan
from medmpc.protocols.simulate import simulate
from tests.medmpc_cli import MEDMPC, medmpc

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(unavailable() is not None, reason=f"no separate hosts here: {unavailable()}"),
]

TIMEOUT_S = 20.0


def _plan(rounds: int) -> Plan:
    return Plan(hospitals=3, aggregators=2, rounds=rounds, data="synthetic:240", image_size=32, timeout_s=TIMEOUT_S)


@pytest.mark.parametrize("party", ["hospital1", "aggregator1"])
def test_a_party_that_loses_its_network_mid_round_is_named_and_nothing_is_revealed(tmp_path, party):
    out = tmp_path / "run"
    failure: list[BaseException] = []

    def run() -> None:
        try:
            simulate(_plan(rounds=4), out, hosts=net)
        except BaseException as err:  # handed to the test thread
            failure.append(err)

    with Network(_plan(1).party_names, profile="unshaped") as net:
        runner = threading.Thread(target=run)
        runner.start()
        deadline = time.monotonic() + 300
        while not (out / "model.pt").exists():  # round 1 is done: the next one is under way
            assert runner.is_alive() and time.monotonic() < deadline, failure
            time.sleep(0.05)
        net.set_link(party, up=False)
        pulled = time.monotonic()
        runner.join(timeout=TIMEOUT_S + 60)
        ended = time.monotonic() - pulled
        assert not runner.is_alive()
        [err] = failure
        assert isinstance(err, PartyError)
        # which party gives up first is a race: the cut-off party (its peers went silent to it), a
        # peer naming it, or a third party whose own peer stalled while waiting on it; the error
        # names it as the first failure, as failed with the first, or as the silent peer
        named = re.search(
            rf"^{party} exited|{party}: (no message within 20 s|connection lost|send failed)", str(err), re.M
        )
        assert err.party == party or named, err
        assert ended < TIMEOUT_S + 15, f"took {ended:.0f} s after the link went down"
        # nothing of the interrupted round was revealed: the last model and report are round 1's
        report = json.loads((out / "report.json").read_text())
        assert [r["round"] for r in report["rounds"]] == [1]

        net.set_link(party, up=True)
        again = simulate(_plan(rounds=1), tmp_path / "again", hosts=net)
        assert [r["round"] for r in again["rounds"]] == [1]


def test_a_hospital_that_loses_its_network_is_left_out_and_the_run_goes_on(tmp_path):
    """Four hospitals, quorum three: the cut-off hospital is left out after one timeout (its round
    runs again among the others) and not invited again; the run finishes."""
    plan = dataclasses.replace(_plan(rounds=3), hospitals=4, min_hospitals=3, timeout_s=8.0)
    out = tmp_path / "run"
    result: list[dict] = []
    failure: list[BaseException] = []

    def run() -> None:
        try:
            result.append(simulate(plan, out, hosts=net, deadline_s=240))
        except BaseException as err:  # handed to the test thread
            failure.append(err)

    with Network(plan.party_names, profile="unshaped") as net:
        runner = threading.Thread(target=run)
        runner.start()
        deadline = time.monotonic() + 300
        while not (out / "model.pt").exists():
            assert runner.is_alive() and time.monotonic() < deadline, failure
            time.sleep(0.05)
        net.set_link("hospital1", up=False)
        runner.join(timeout=240)
        assert not runner.is_alive() and not failure, failure
    rounds = result[0]["rounds"]
    assert [r["round"] for r in rounds] == [1, 2, 3]
    assert rounds[-1]["contributors"] == ["hospital0", "hospital2", "hospital3"]
    left_out = [r for r in rounds if "hospital1" in r.get("excluded", {})]
    # silent to whoever waited on it first, or a send that could not leave
    cut_off = re.compile(r"no message within 8 s|send failed|connection lost")
    assert left_out and any(cut_off.search(r["excluded"]["hospital1"]) for r in left_out), left_out


def test_an_unreachable_coordinator_is_named_with_its_address(tmp_path):
    with Network(["coordinator", "hospital0"], profile="unshaped") as net:
        plan = Plan(
            hospitals=2, secure=False, coordinator_host=net.address("coordinator"), coordinator_port=7000,
            timeout_s=3, data="synthetic:60", image_size=32, plaintext_transport=True,
        )  # fmt: skip
        (tmp_path / "plan.json").write_text(plan.to_json())
        proc = net.run(
            "hospital0",
            [*MEDMPC, "role", "hospital", "--index", "0", "--plan", str(tmp_path / "plan.json")],
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert proc.returncode == 3, proc.stderr[-2000:]
    assert f"hospital0: coordinator: cannot connect to {net.address('coordinator')}:7000 within 3 s" in proc.stderr


def test_encrypted_inference_with_each_party_on_its_own_host():
    proc = medmpc("bench", "inference", "--model", "cnn", "--image-size", "32", "--network", "unshaped", "--json")
    result = json.loads(proc.stdout)
    assert result["network"] == "unshaped" and result["argmax_agree"] and result["max_abs_err"] < 0.01, result
    assert "party0 at 198.18.1.2, party1 at 198.18.2.2, dealer at 198.18.3.2" in proc.stderr


def test_the_benchmark_times_secure_aggregation_against_fedavg_across_hosts():
    proc = medmpc(
        "bench", "secure-aggregation", "--params", "10000", "--hospitals", "3", "--repeat", "1",
        "--network", "unshaped", "--json",
    )  # fmt: skip
    result = json.loads(proc.stdout)
    assert result["network"] == "unshaped" and "plaintext_s" not in result  # no all-reduce across hosts
    assert result["ratio_fedavg"] == pytest.approx(result["secure_s"] / result["fedavg_s"])
    assert result["max_abs_err"] <= 3 * 2**-16
    # FedAvg: each hospital sends its 10,000 float32 values to the coordinator, and a bit more
    assert all(40_000 <= result["fedavg_bytes_per_party"][f"hospital{i}"] < 60_000 for i in range(3)), result


def test_the_prediction_service_with_each_party_and_its_client_on_a_host_of_its_own():
    argv = ["--random-model", "cnn", "--image-size", "32", "--concurrency", "1", "--requests", "2"]
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.load_service", *argv, "--network", "unshaped", "--paced", "--no-record"],
        capture_output=True, text=True, timeout=300, cwd=Path(__file__).parents[1],
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "party0 at 198.18.1.2, party1 at 198.18.2.2, dealer at 198.18.3.2, client at 198.18.4.2" in proc.stdout
    row = json.loads(proc.stdout.splitlines()[-1])  # HTTPS to the parties' addresses: plain HTTP would be refused
    assert row["service"].endswith("unshaped paced") and row["requests"] == 2 and row["errors"] == 0, row
    assert row["online_s"] > 0 and row["prepare_s"] > 0, row  # the parties' logs: one prepared batch per request
