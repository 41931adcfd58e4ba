import numpy as np
import pytest
import torch

from mpc import crypten_compat, selfcheck
from mpc.launch import PartyError, run_crypten_job


def test_crypten_imports_with_patches():
    crypten = crypten_compat.import_crypten()
    assert hasattr(crypten, "cryptensor")
    assert crypten.mpc.ttp_required is not None


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
        "mpc.selfcheck:arithmetic", world_size=2, args={"size": 32, "seed": 3}, timeout_s=60
    )
    want = selfcheck.expected(2, 32, 3)
    for rank, got in enumerate(results):
        # each party only ever held its own input in the clear
        assert torch.equal(got["input"], selfcheck.private_input(rank, 32, 3))
        for key in ("sum", "product", "relu"):
            assert torch.allclose(got[key], want[key], atol=1e-3), key
    assert (want["relu"] == 0).any() and (want["relu"] > 0).any()  # ReLU was really exercised


@pytest.mark.slow
def test_a_crashing_party_fails_the_run_with_its_name():
    with pytest.raises(PartyError, match="party1"):
        run_crypten_job("mpc.selfcheck:crash_on_rank1", world_size=2, timeout_s=20)
