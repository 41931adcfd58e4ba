"""The dealer's function-secret-shared keys (mpc.dcf, mpc.relu_gate, mpc.clamp_gate), both parties
in one process: exact at the edges of their rings, used once, and pseudorandom key by key."""

from __future__ import annotations

import math
import subprocess
import sys

import numba
import numpy as np
import pytest
import torch
from uniformity import looks_uniform

from medmpc.mpc import aesni, clamp_gate, dcf, opening, prg, relu_gate

RNG = np.random.default_rng(7)


def _below(bits: int, n: int) -> np.ndarray:
    return RNG.integers(0, 2**bits, n, dtype=np.uint64) if bits < 64 else RNG.integers(0, 2**64, n, dtype=np.uint64)


WALKS = ["openssl"] + (["aes-ni"] if aesni.AVAILABLE else [])  # where the CPU has no AES-NI, OpenSSL walks


@pytest.mark.parametrize("walk", WALKS)
@pytest.mark.parametrize("bits", [1, 2, 17, 64])
@pytest.mark.parametrize("outputs", [1, 2, 3, 5])
def test_dcf_shares_beta_below_alpha_at_every_edge(bits, outputs, walk, monkeypatch):
    """Both ways to walk a key (the AES in the compiled loop, or OpenSSL's AES level by level; more
    than three outputs always walk with OpenSSL) give the same shares, whether a key is evaluated
    at once or in two parts."""
    if walk == "openssl":
        monkeypatch.setattr(aesni, "AVAILABLE", False)
    top = np.uint64((1 << bits) - 1)
    alpha = np.concatenate([np.array([0, 1, top, top], np.uint64), _below(bits, 400)])
    beta = RNG.integers(0, 2**64, (alpha.size, outputs), dtype=np.uint64)
    # every input at alpha - 1, alpha, alpha + 1 (wrapping inside the domain), 0 and the top
    x = np.concatenate([alpha - np.uint64(1), alpha, alpha + np.uint64(1)]) & top
    x[:4] = [0, 0, top, 0]
    k0, k1 = dcf.generate(np.tile(alpha, 3), np.tile(beta, (3, 1)), bits)
    cut = 517  # not a multiple of any chunk
    second = np.concatenate([dcf.evaluate(k1, x[:cut]), dcf.evaluate(k1, x[cut:], start=cut)])
    got = dcf.evaluate(k0, x) + second
    want = np.tile(beta, (3, 1)) * (x < np.tile(alpha, 3))[:, None].astype(np.uint64)
    assert np.array_equal(got, want)
    assert (x < np.tile(alpha, 3)).any() and (x >= np.tile(alpha, 3)).any()


def test_the_aes_key_schedule_is_fips_197s():
    """FIPS-197, Appendix A.1: the last round key of 2b7e1516 28aed2a6 abf71588 09cf4f3c."""
    keys = aesni.round_keys(bytes.fromhex("2b7e151628aed2a6abf7158809cf4f3c"))
    assert keys[0].tobytes().hex() == "2b7e151628aed2a6abf7158809cf4f3c"
    assert keys[10].tobytes().hex() == "d014f9a8c9ee2589e13f0cc8b6630ca6"


@pytest.mark.skipif(not aesni.AVAILABLE, reason="this CPU has no AES instructions")
@pytest.mark.parametrize("wide", [False, True])
def test_aes_in_a_compiled_loop_is_openssls(wide):
    """mmo4, with four AES-NI instructions a round or one 512-bit VAES instruction, is the PRG
    block for block; a control with another key differs everywhere."""
    if wide and not aesni.WIDE:
        pytest.skip("this CPU has no 512-bit VAES")
    mmo4 = aesni.mmo4_wide if wide else aesni.mmo4_narrow

    @numba.njit
    def prg_blocks(blocks: np.ndarray, keys: np.ndarray) -> np.ndarray:
        out = np.empty_like(blocks)
        for i in range(0, blocks.shape[0], 4):
            b = blocks[i : i + 4]
            w = mmo4(b[0, 0], b[0, 1], b[1, 0], b[1, 1], b[2, 0], b[2, 1], b[3, 0], b[3, 1], keys)
            for j in range(8):
                out[i + j // 2, j % 2] = w[j]
        return out

    blocks = RNG.integers(0, 2**64, (64, 2), dtype=np.uint64)
    assert np.array_equal(prg_blocks(blocks, dcf._ROUND_KEYS), dcf._aes(blocks))
    other = aesni.round_keys(bytes(16))
    assert not np.equal(prg_blocks(blocks, other), dcf._aes(blocks)).any()


def test_a_key_is_evaluated_once():
    k0, _ = dcf.generate(_below(8, 5), RNG.integers(0, 9, (5, 1), dtype=np.uint64), 8)
    dcf.evaluate(k0, _below(8, 5))
    with pytest.raises(ValueError, match="evaluated twice"):
        dcf.evaluate(k0, _below(8, 5))
    g0, _ = relu_gate.deal(5, 8)
    relu_gate.evaluate(g0, _below(8, 5))
    with pytest.raises(ValueError, match="evaluated twice"):  # the gate's key is a DCF key
        relu_gate.evaluate(g0, _below(8, 5))


def test_a_key_evaluates_in_consecutive_parts_each_once():
    """Parts as their inputs arrive: the same shares as one evaluation, for both gates; a part that
    goes back over evaluated elements is refused (a second input to them), as is one that skips."""
    x = RNG.integers(-(2**19), 2**19, 200, dtype=np.int64)
    whole = _relu_in_process(x, 21)
    bounds = (0, 64, 65, 200)
    keys = relu_gate.deal(x.size, 21)
    opened = opening.combine(
        [opening.pack(relu_gate.masked_share(k, s), 21) for k, s in zip(keys, _shares(x))], 21, x.size
    )
    parts = [sum(relu_gate.evaluate(k, opened[lo:hi], start=lo) for k in keys) for lo, hi in zip(bounds, bounds[1:])]
    assert np.array_equal(np.concatenate(parts).view(np.int64), np.maximum(x, 0))
    assert np.array_equal(whole, np.maximum(x, 0))
    clamp_keys = clamp_gate.deal(x.size, -7, 9)
    c_opened = opening.combine(
        [opening.pack(clamp_gate.masked_share(k, s), 64) for k, s in zip(clamp_keys, _shares(x))], 64, x.size
    )
    c_parts = [
        sum(clamp_gate.evaluate(k, c_opened[lo:hi], start=lo) for k in clamp_keys) for lo, hi in zip(bounds, bounds[1:])
    ]
    assert np.array_equal(np.concatenate(c_parts).view(np.int64), np.clip(x, -7, 9))
    k0, _ = dcf.generate(_below(8, 10), RNG.integers(0, 9, (10, 1), dtype=np.uint64), 8)
    dcf.evaluate(k0, _below(8, 4))
    with pytest.raises(ValueError, match="evaluated twice"):
        dcf.evaluate(k0, _below(8, 2), start=3)
    with pytest.raises(ValueError, match="evaluated to 4; got inputs for elements 5 to 7"):
        dcf.evaluate(k0, _below(8, 2), start=5)
    dcf.evaluate(k0, _below(8, 6), start=4)
    with pytest.raises(ValueError, match="evaluated twice"):
        dcf.evaluate(k0, _below(8, 1), start=9)


def _shares(x: np.ndarray) -> list[np.ndarray]:
    first = RNG.integers(-(2**63), 2**63, x.size, dtype=np.int64).view(np.uint64)
    return [first, x.view(np.uint64) - first]


def test_a_gate_mask_hides_one_opening_only():
    """Opening two inputs under one mask would show their difference: the second is refused, for
    both gates; and an opening of more bits than its ring is refused before it is sent."""
    relu_key, _ = relu_gate.deal(3, 20)
    clamp_key, _ = clamp_gate.deal(3, -5, 5)
    for gate, key in ((relu_gate, relu_key), (clamp_gate, clamp_key)):
        gate.masked_share(key, _below(20, 3))
        with pytest.raises(ValueError, match="opened twice"):
            gate.masked_share(key, _below(20, 3))
    with pytest.raises(ValueError, match="of more bits"):
        opening.pack(np.array([1 << 20], np.uint64), 20)


@pytest.mark.parametrize("bits", [1, 7, 23, 33, 63, 64])
def test_an_opening_packs_each_value_in_its_bits(bits):
    for size in (0, 1, 63, 64, 65, 1000):
        values = _below(bits, size)
        values[: min(size, 2)] = [0, (1 << bits) - 1][: min(size, 2)]  # both ends of the ring
        words = opening.pack(values, bits)
        assert words.dtype == np.int64 and words.size == math.ceil(size * bits / 64)
        assert np.array_equal(opening.unpack(words, bits, size), values)
    with pytest.raises(ValueError, match="4 words for 100 values of 7 bits, expected 11"):
        opening.unpack(np.zeros(4, np.int64), 7, 100)


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="more than 4 bits"):
        dcf.generate(np.array([16], np.uint64), np.zeros((1, 1), np.uint64), 4)
    k0, _ = dcf.generate(np.array([3], np.uint64), np.zeros((1, 1), np.uint64), 4)
    with pytest.raises(ValueError, match="holds 1 comparisons, evaluated to 0; got inputs for elements 0 to 2"):
        dcf.evaluate(k0, np.array([1, 2], np.uint64))
    with pytest.raises(ValueError, match="2..64"):
        relu_gate.deal(3, 1)
    g0, _ = relu_gate.deal(3, 8)
    with pytest.raises(ValueError, match="words, got"):
        relu_gate.from_words(np.zeros(7, np.uint64), 0, 3, 8)


def _relu_in_process(x: np.ndarray, bits: int) -> np.ndarray:
    """Both parties' evaluation of the gate on random shares of ``x`` (int64), through the wire format."""
    shares = _shares(x)
    words = [relu_gate.to_words(k) for k in relu_gate.deal(x.size, bits)]
    keys = [relu_gate.from_words(w, b, x.size, bits) for b, w in enumerate(words)]
    parts = [opening.pack(relu_gate.masked_share(k, s), bits) for k, s in zip(keys, shares)]
    assert parts[0].nbytes == 8 * math.ceil(x.size * bits / 64)  # bits bits a value on the wire
    opened = opening.combine(parts, bits, x.size)
    return (relu_gate.evaluate(keys[0], opened) + relu_gate.evaluate(keys[1], opened)).view(np.int64)


@pytest.mark.parametrize("bits", [2, 8, 24, 33, 64])
def test_relu_is_exact_across_its_whole_ring(bits):
    low, high = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    edges = [low, low + 1, -1, 0, 1, high - 1, high]
    x = np.concatenate([edges, RNG.integers(low, high, 500, dtype=np.int64, endpoint=True)]).astype(np.int64)
    assert np.array_equal(_relu_in_process(x, bits), np.maximum(x, 0))


def test_relu_outside_its_ring_is_wrong():
    """The control for the bound: values past 2^(bits-1) wrap, as the ring size says they will."""
    x = np.array([2**23, 2**23 + 5, -(2**23) - 5], np.int64)
    assert not np.array_equal(_relu_in_process(x, 24), np.maximum(x, 0))
    assert np.array_equal(_relu_in_process(x, 26), np.maximum(x, 0))


def test_a_party_key_looks_uniform_and_needs_the_csprng(monkeypatch):
    """One party's key: its correction words and shares look uniformly random; the control draws the
    dealer's seeds and masks from zeros, and the same words are structured (they follow the mask)."""

    def words(key: relu_gate.GateKey) -> torch.Tensor:
        k = key.comparison  # (the low seed word's lowest bit is the control bit's place: always 0)
        parts = [k.seed_cw[..., 1], k.value_cw, k.last_cw, key.mask, key.constants]
        return torch.from_numpy(np.concatenate([p.reshape(-1) for p in parts]).view(np.int64))

    assert looks_uniform(words(relu_gate.deal(4000, 20)[1]))
    monkeypatch.setattr(prg, "random_ring", lambda n: torch.zeros(n, dtype=torch.int64))
    assert not looks_uniform(words(relu_gate.deal(4000, 20)[1]))


@pytest.mark.parametrize("low, high", [(-2 * 2**16, 3 * 2**16), (0, 0), (-(2**62), 2**61)])
def test_clamp_is_exact_for_every_ring_element(low, high):
    ends = [-(2**63), -(2**63) + 1, 2**63 - 1, 2**63 - 2, -1, 0, 1]
    edges = [low - 1, low, low + 1, high - 1, high, high + 1]
    x = np.concatenate(
        [np.array(ends + edges, np.int64), RNG.integers(-(2**63), 2**63 - 1, 300, dtype=np.int64)]
        + [RNG.integers(low - 1000, high + 1000, 300, dtype=np.int64)]
    )
    first = RNG.integers(0, 2**64, x.size, dtype=np.uint64)
    shares = [first, x.view(np.uint64) - first]
    words = [clamp_gate.to_words(k) for k in clamp_gate.deal(x.size, low, high)]
    keys = [clamp_gate.from_words(w, b, x.size, low, high) for b, w in enumerate(words)]
    opened = opening.combine(
        [opening.pack(clamp_gate.masked_share(k, s), clamp_gate.BITS) for k, s in zip(keys, shares)],
        clamp_gate.BITS,
        x.size,
    )
    got = (clamp_gate.evaluate(keys[0], opened) + clamp_gate.evaluate(keys[1], opened)).view(np.int64)
    assert np.array_equal(got, np.clip(x, low, high))
    with pytest.raises(ValueError, match="evaluated twice"):
        clamp_gate.evaluate(keys[0], opened)


def test_a_clamp_range_without_zero_is_refused():
    with pytest.raises(ValueError, match="low <= 0 <= high"):
        clamp_gate.deal(3, 5, 9)


def test_the_warm_up_loads_every_kernel_the_online_gates_call():
    """In a fresh process no gate kernel is loaded; after comparison.warm_up (the offline pass's
    last step) the packer, unpacker and the DCF walk are, so no image pays Numba's first call."""
    walk = "_walk_fused" if aesni.AVAILABLE else "_walk_step"
    script = (
        "from medmpc.mpc import comparison, dcf, opening\n"
        f"kernels = [opening._pack, opening._unpack, dcf.{walk}]\n"
        "print([len(k.signatures) for k in kernels])\n"
        "comparison.warm_up()\n"
        "print([len(k.signatures) for k in kernels])\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    before, after = out.splitlines()
    assert before == "[0, 0, 0]" and "0" not in after.strip("[]").split(", "), out
