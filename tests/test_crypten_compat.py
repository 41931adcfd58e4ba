import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from medmpc.mpc import crypten_compat, selfcheck
from medmpc.mpc.launch import PartyError, run_crypten_job

HOOKS = Path(__file__).parent / "party_hooks"


def test_crypten_imports_with_patches():
    crypten = crypten_compat.patched()
    assert crypten_compat.install() is crypten  # once per process
    assert hasattr(crypten, "cryptensor")
    assert crypten.mpc.ttp_required is not None


def test_unpatched_crypten_is_never_handed_out():
    """A process that did not install the patches gets an error, not MT19937 shares over gloo."""
    code = "from medmpc.mpc import crypten_compat; crypten_compat.patched()"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "before medmpc.mpc.crypten_compat.install()" in proc.stderr
    control = subprocess.run([sys.executable, "-c", code.replace("patched()", "install()")], timeout=120)
    assert control.returncode == 0


def test_another_crypten_version_is_refused(monkeypatch):
    """The patches reach into CrypTen 0.4.1's internals; another version is refused by name."""
    monkeypatch.setattr(crypten_compat, "_patched", None)
    monkeypatch.setattr(crypten_compat.importlib.metadata, "version", lambda name: "0.5.0")
    with pytest.raises(RuntimeError, match="CrypTen 0.4.1, but CrypTen 0.5.0 is installed"):
        crypten_compat.install()


def test_tfp_provider_is_refused_unless_explicitly_allowed():
    with pytest.raises(ValueError, match="in the clear"):
        crypten_compat.configure_provider("TFP")
    with pytest.raises(ValueError, match="unknown"):
        crypten_compat.configure_provider("HE")


def test_encrypt_refuses_inputs_crypten_would_truncate():
    with pytest.raises(TypeError, match="torch float tensor"):
        crypten_compat.encrypt(np.array([1.5]))
    with pytest.raises(TypeError, match="floating-point"):
        crypten_compat.encrypt(torch.tensor([1, 2]))


@pytest.mark.slow
def test_two_party_processes_match_plaintext():
    results = run_crypten_job(
        "medmpc.mpc.selfcheck:arithmetic", world_size=2, args={"size": 36, "seed": 3}, timeout_s=60
    )
    want = selfcheck.expected(2, 36, 3)
    for rank, got in enumerate(results):
        # each party only ever held its own input in the clear
        assert torch.equal(got["input"], selfcheck.private_input(rank, 36, 3))
        for key in ("sum", "product", "relu", "relu_wide", "maxpool", "conv", *selfcheck.AT_INFERENCE_PRECISION):
            assert got[key].shape == want[key].shape and torch.allclose(got[key], want[key], atol=1e-3), key
        for key in [f"relu_edges_{bits}" for bits in selfcheck.EDGE_BITS] + ["clamp"]:  # exact, ring elements
            assert torch.equal(got[key], want[key]), (key, got[key], want[key])
        assert not torch.equal(got["relu_beyond_40"], selfcheck.BEYOND_40)  # control: past the edge, signs break
    assert (want["relu"] == 0).any() and (want["relu"] > 0).any()  # ReLU was really exercised
    assert want["relu"].max() * selfcheck.WIDE > 2**20  # and relu_wide the comparison ring's high bits


@pytest.mark.slow
def test_collectives_in_parts_deliver_and_count_as_their_whole_counterparts(monkeypatch):
    """The gates' opening and the convolutions' reduce travel in parts, each used as it arrives:
    the same values as the whole collective, in order, counted as one round of the same bytes."""
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(HOOKS), os.environ.get("PYTHONPATH", "")]))
    parties = run_crypten_job("parts:parts_against_whole", world_size=2, timeout_s=60)
    bounds = [0, 1, 400, 999, 1000]
    for rank, got in enumerate(parties):
        whole, rounds, nbytes = got["all_gather"]
        parts, parts_rounds, parts_bytes = got["all_gather_parts"]
        assert len(parts) == len(bounds) - 1 and (parts_rounds, parts_bytes) == (rounds, nbytes) == (1, 2 * 8000)
        for p in range(2):
            assert torch.equal(torch.cat([part[p] for part in parts]), whole[p])
        total, rounds, nbytes = got["reduce"]
        arrived, parts_rounds, parts_bytes = got["reduce_parts"]
        assert (parts_rounds, parts_bytes) == (rounds, nbytes) == (1, 8000)
        if rank == 0:  # the destination: every part's sum, in order
            assert [k for k, _ in arrived] == list(range(len(bounds) - 1))
            assert torch.equal(torch.cat([t.reshape(-1) for _, t in arrived]), total)
            assert torch.equal(total, torch.arange(1000) * 3)
        else:
            assert arrived == [] and total is None  # it sent its parts and received nothing


@pytest.mark.slow
def test_a_crashing_party_fails_the_run_with_its_name():
    with pytest.raises(PartyError, match="party1"):
        run_crypten_job("medmpc.mpc.selfcheck:crash_on_rank1", world_size=2, timeout_s=20)


@pytest.mark.parametrize(("c_in", "kernel"), [(1, 7), (64, 3), (512, 3)])
def test_ring_conv_is_exact_modulo_2_64(c_in, kernel):
    # CrypTen's CUDA conv loses bits once c_in * k * k exceeds 512 (the ~1e8 logit error on H100);
    # the int64 CPU convolution is the reference, exact with wrap-around.
    g = torch.Generator().manual_seed(c_in)
    x = torch.randint(-(2**63), 2**63 - 1, (2, c_in, 9, 9), generator=g)
    w = torch.randint(-(2**63), 2**63 - 1, (4, c_in, kernel, kernel), generator=g)
    want = torch.conv2d(x, w, stride=2, padding=kernel // 2)
    got = crypten_compat.ring_conv("conv2d", x, w, stride=2, padding=kernel // 2)
    assert torch.equal(got, want)


def test_ring_conv_with_crypten_block_choice_is_inexact():
    # the control: 3 blocks of 22 bits (CrypTen's choice for any 3x3 kernel) over 512 channels
    g = torch.Generator().manual_seed(0)
    x = torch.randint(-(2**63), 2**63 - 1, (1, 512, 5, 5), generator=g)
    w = torch.randint(-(2**63), 2**63 - 1, (4, 512, 3, 3), generator=g)
    want = torch.conv2d(x, w, padding=1)
    assert not torch.equal(crypten_compat._blocked_conv("conv2d", x, w, 3, padding=1), want)
    assert torch.equal(crypten_compat._blocked_conv("conv2d", x, w, 4, padding=1), want)
