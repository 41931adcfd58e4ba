"""Distributed comparison functions: two keys that secret-share ``beta * [x < alpha]`` at any ``x``.

Boyle, Chandran, Gilboa, Gupta, Ishai, Kumar and Rathee, "Function secret sharing for
mixed-mode and fixed-point secure computation" (Eurocrypt 2021), Fig. 1. The dealer knows
``alpha`` (an ``n``-bit integer) and ``beta`` (``m`` elements of Z/2^64) and makes keys
``k0, k1``; for every public ``x`` in [0, 2^n), ``eval(0, k0, x) + eval(1, k1, x) =
beta * [x < alpha]`` (mod 2^64), and each key alone is pseudorandom: it reveals nothing of
``alpha`` or ``beta`` to a party that does not also hold the other key.

A key is a 128-bit root seed and, per level of the binary tree over ``x``'s bits (most
significant first), a seed correction word, two control-bit corrections and ``m`` value
corrections, plus a last value correction: ``16 + n (16 + 8m) + 2n/8 + 8m`` bytes.
Evaluating one key walks one path of the tree: ``n`` expansions of one seed.

The PRG is fixed-key AES-128 in Matyas-Meyer-Oseas form, ``G(s)_j = AES_K(s ^ j) ^ s ^ j``
with a public key ``K`` and output block index ``j``, as in the FSS implementations this
follows (LLAMA, Orca): a pseudorandom generator if AES with a fixed key is a random
permutation. Because every output block has its own index, a party evaluates only the
blocks of the child it walks to. Every element is independent: one call makes or
evaluates keys for a whole tensor of comparisons, vectorised over NumPy arrays of uint64.
Evaluation runs the AES inside its compiled loop where the CPU has AES instructions
(mpc.aesni), else through OpenSSL a level at a time; both give the same shares.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numba
import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from medmpc.mpc import aesni, prg

_AES_KEY = b"medmpc DCF PRG\x00\x01"  # public: the PRG's security rests on the seeds alone
_ROUND_KEYS = aesni.round_keys(_AES_KEY)
SEED_WORDS = 2  # a 128-bit seed as two uint64
_CHUNK = 1 << 15  # elements walked together: their seeds, sums and blocks stay in the CPU's caches
_FUSED_CHUNK = 1 << 12  # elements walked together, level by level: their seeds and sums stay in the L2 cache
_FUSED_OUTPUTS = 3  # values a key's output may have for the fused walk (the gates' most)


@dataclass
class Key:
    """One party's key for ``N`` comparisons over ``n``-bit inputs with ``m``-element outputs.

    ``seeds`` (N, 2), ``seed_cw`` (n, N, 2), ``bit_cw`` (n, N, 2) of 0/1 (left, right), ``value_cw``
    (n, N, m), ``last_cw`` (N, m): all uint64 but ``bit_cw`` (uint8). Used once: :func:`evaluate`
    takes its elements in order, in one call or in consecutive parts, and refuses an element it
    has evaluated before, since two evaluations of one key reveal the difference of two
    comparisons with one secret threshold."""

    party: int
    seeds: np.ndarray
    seed_cw: np.ndarray
    bit_cw: np.ndarray
    value_cw: np.ndarray
    last_cw: np.ndarray
    evaluated: int = 0  # elements evaluated so far: the next part starts here

    @property
    def bits(self) -> int:
        return int(self.seed_cw.shape[0])

    @property
    def size(self) -> int:
        return int(self.seeds.shape[0])

    @property
    def outputs(self) -> int:
        return int(self.last_cw.shape[1])

    @property
    def nbytes(self) -> int:
        """Bytes on the wire: control bits packed eight to a byte."""
        packed_bits = math.ceil(self.bit_cw.size / 8)
        return self.seeds.nbytes + self.seed_cw.nbytes + packed_bits + self.value_cw.nbytes + self.last_cw.nbytes


def _value_blocks(m: int) -> int:
    return math.ceil(m / 2)


def _encrypt(blocks: np.ndarray) -> np.ndarray:
    """``AES_K(b)`` for every 128-bit block of ``blocks`` (C-contiguous uint64, last axis 2)."""
    room = np.empty(blocks.size + 2, np.uint64)  # cryptography wants a block of room past the output
    encryptor = Cipher(algorithms.AES(_AES_KEY), modes.ECB()).encryptor()
    encryptor.update_into(blocks.data.cast("B"), room.data.cast("B"))
    return room[: blocks.size].reshape(blocks.shape)


def _aes(blocks: np.ndarray) -> np.ndarray:
    """``AES_K(b) ^ b`` (the PRG's output) for every block."""
    data = np.ascontiguousarray(blocks)
    out = _encrypt(data)
    out ^= data
    return out


def _expand(seeds: np.ndarray, indices: np.ndarray) -> np.ndarray:
    """``G(seed)_j`` for every seed (N, 2) and every block index j in ``indices`` (N, k):
    (N, k, 2) uint64."""
    blocks = np.repeat(seeds[:, None, :], indices.shape[1], axis=1)
    blocks[:, :, 0] ^= indices.astype(np.uint64)
    return _aes(blocks)


def _leaf(seeds: np.ndarray, m: int) -> np.ndarray:
    """``m`` value words from each leaf seed (N, m)."""
    vb = _value_blocks(m)
    indices = np.broadcast_to(2 + 2 * vb + np.arange(vb), (seeds.shape[0], vb))  # after the levels' indices
    return _expand(seeds, indices).reshape(seeds.shape[0], 2 * vb)[:, :m]


def _signed(values: np.ndarray, negative: np.ndarray) -> np.ndarray:
    """``values`` (N, m) negated (mod 2^64) where ``negative`` (N,) is 1."""
    flip = negative.astype(bool)[:, None]
    return np.where(flip, np.uint64(0) - values, values)


def _times(bit: np.ndarray, values: np.ndarray) -> np.ndarray:
    """``bit * values``: rows of ``values`` kept where ``bit`` (N,) is 1, else zero."""
    return values * bit.astype(np.uint64).reshape(-1, *([1] * (values.ndim - 1)))


def _random_seeds(n: int) -> np.ndarray:
    seeds = prg.random_ring(SEED_WORDS * n).numpy().view(np.uint64).reshape(n, SEED_WORDS)
    seeds[:, 0] &= ~np.uint64(1)
    return seeds


def _check_inputs(values: np.ndarray, bits: int, what: str) -> np.ndarray:
    if not 1 <= bits <= 64:
        raise ValueError(f"DCF input bits must be in 1..64, got {bits}")
    values = np.asarray(values)
    if values.dtype != np.uint64 or values.ndim != 1:
        raise ValueError(f"{what} must be a 1-d uint64 array, got {values.dtype} with shape {values.shape}")
    if bits < 64 and values.size and int(values.max()) >> bits:
        raise ValueError(f"{what} has values of more than {bits} bits")
    return values


def generate(alpha: np.ndarray, beta: np.ndarray, bits: int) -> tuple[Key, Key]:
    """Keys for ``beta[i] * [x < alpha[i]]`` over ``bits``-bit inputs: ``alpha`` (N,) uint64 below
    2^bits, ``beta`` (N, m) uint64; seeds from the CSPRNG (mpc.prg)."""
    alpha = _check_inputs(alpha, bits, "alpha")
    beta = np.ascontiguousarray(beta, dtype=np.uint64)
    if beta.ndim != 2 or beta.shape[0] != alpha.size:
        raise ValueError(f"beta must be (N, m) with N = {alpha.size}, got shape {beta.shape}")
    n_elems, m = beta.shape
    vb = _value_blocks(m)
    roots = np.stack([_random_seeds(n_elems), _random_seeds(n_elems)])
    seeds = roots.copy()
    control = np.zeros((2, n_elems), np.uint8)
    control[1] = 1
    v_alpha = np.zeros((n_elems, m), np.uint64)
    seed_cw = np.empty((bits, n_elems, SEED_WORDS), np.uint64)
    bit_cw = np.empty((bits, n_elems, 2), np.uint8)
    value_cw = np.empty((bits, n_elems, m), np.uint64)
    blocks = np.empty((2, n_elems, 2 + 2 * vb, 2), np.uint64)  # both parties, both children
    for level in range(bits):
        shift = bits - 1 - level
        _both_children(seeds, blocks)
        _deal_step(
            blocks,
            _encrypt(blocks),
            alpha,
            shift,
            beta,
            v_alpha,
            control,
            seeds,
            seed_cw[level],
            bit_cw[level],
            value_cw[level],
        )
    last_cw = _leaf(seeds[1], m) - _leaf(seeds[0], m) - v_alpha
    last_cw = _signed(last_cw, control[1])
    return tuple(  # type: ignore[return-value]
        Key(b, roots[b], seed_cw, bit_cw, value_cw, last_cw) for b in (0, 1)
    )


@numba.njit(cache=True, nogil=True)
def _both_children(seeds: np.ndarray, blocks: np.ndarray) -> None:
    """Every PRG input block of both parties' seeds: block ``q`` is the seed with index ``q``."""
    for p in range(2):
        for i in range(seeds.shape[1]):
            for q in range(blocks.shape[2]):
                blocks[p, i, q, 0] = seeds[p, i, 0] ^ q
                blocks[p, i, q, 1] = seeds[p, i, 1]


@numba.njit(cache=True, nogil=True)
def _deal_step(
    blocks: np.ndarray,
    out: np.ndarray,
    alpha: np.ndarray,
    shift: int,
    beta: np.ndarray,
    v_alpha: np.ndarray,
    control: np.ndarray,
    seeds: np.ndarray,
    seed_cw: np.ndarray,
    bit_cw: np.ndarray,
    value_cw: np.ndarray,
) -> None:
    """One level of Gen (Boyle et al., Fig. 1) for every element, from AES's ``out`` on ``blocks``:
    the correction words that keep both parties' walks apart below ``alpha`` and equal elsewhere."""
    m = beta.shape[1]
    vb = (m + 1) // 2
    for i in range(alpha.size):
        a = (alpha[i] >> shift) & 1  # 1: alpha goes right, so the left child is lost
        lose, keep = 1 - a, a
        t1 = control[1, i]
        s_lose0 = (out[0, i, lose, 0] ^ blocks[0, i, lose, 0]) & ~np.uint64(1)
        s_lose1 = (out[1, i, lose, 0] ^ blocks[1, i, lose, 0]) & ~np.uint64(1)
        cw0 = s_lose0 ^ s_lose1
        cw1 = (out[0, i, lose, 1] ^ blocks[0, i, lose, 1]) ^ (out[1, i, lose, 1] ^ blocks[1, i, lose, 1])
        seed_cw[i, 0] = cw0
        seed_cw[i, 1] = cw1
        for j in range(m):
            ql, qk = 2 + lose * vb + j // 2, 2 + keep * vb + j // 2
            w = j % 2
            v_lose = (out[1, i, ql, w] ^ blocks[1, i, ql, w]) - (out[0, i, ql, w] ^ blocks[0, i, ql, w])
            v_keep = (out[1, i, qk, w] ^ blocks[1, i, qk, w]) - (out[0, i, qk, w] ^ blocks[0, i, qk, w])
            cw = v_lose - v_alpha[i, j]
            if a == 1:
                cw += beta[i, j]
            if t1:
                cw = np.uint64(0) - cw
            value_cw[i, j] = cw
            v_alpha[i, j] = v_alpha[i, j] - v_keep + (np.uint64(0) - cw if t1 else cw)
        bits_l = ((out[0, i, 0, 0] ^ blocks[0, i, 0, 0]) ^ (out[1, i, 0, 0] ^ blocks[1, i, 0, 0])) & 1
        bits_r = ((out[0, i, 1, 0] ^ blocks[0, i, 1, 0]) ^ (out[1, i, 1, 0] ^ blocks[1, i, 1, 0])) & 1
        bit_cw[i, 0] = bits_l ^ a ^ 1
        bit_cw[i, 1] = bits_r ^ a
        keep_cw = bit_cw[i, keep]
        for p in range(2):
            tp = control[p, i]
            s0 = out[p, i, keep, 0] ^ blocks[p, i, keep, 0]
            s1 = out[p, i, keep, 1] ^ blocks[p, i, keep, 1]
            bit = s0 & 1
            s0 ^= bit
            if tp:
                s0 ^= cw0
                s1 ^= cw1
                bit ^= keep_cw
            seeds[p, i, 0] = s0
            seeds[p, i, 1] = s1
            control[p, i] = bit


def evaluate(key: Key, x: np.ndarray, *, start: int = 0) -> np.ndarray:
    """This party's share (len(x), m) uint64 of ``beta * [x < alpha]`` at the public inputs ``x``,
    for the key's elements ``start`` to ``start + len(x)``: all of them at once, or consecutive
    parts as their inputs arrive (each part starts where the one before ended)."""
    x = _check_inputs(x, key.bits, "x")
    if start < key.evaluated:
        raise ValueError(
            f"DCF key of party {key.party} evaluated twice (from element {start}, already to {key.evaluated}): "
            "a key is used for one input only"
        )
    if start != key.evaluated or start + x.size > key.size:
        raise ValueError(
            f"DCF key of party {key.party} holds {key.size} comparisons, evaluated to {key.evaluated}; "
            f"got inputs for elements {start} to {start + x.size}"
        )
    key.evaluated += x.size
    total = np.empty((x.size, key.outputs), np.uint64)
    if aesni.AVAILABLE and key.outputs <= _FUSED_OUTPUTS:
        _walk_fused(
            key.seeds, x, start, key.party, key.seed_cw, key.bit_cw, key.value_cw, key.last_cw, _ROUND_KEYS, total
        )
    else:
        for lo in range(0, x.size, _CHUNK):
            part = x[lo : lo + _CHUNK]
            total[lo : lo + part.size] = _walk(key, part, slice(start + lo, start + lo + part.size))
    return np.uint64(0) - total if key.party else total


@numba.njit(cache=True, nogil=True)
def _walk_fused(
    roots: np.ndarray,
    x: np.ndarray,
    start: int,
    party: int,
    seed_cw: np.ndarray,
    bit_cw: np.ndarray,
    value_cw: np.ndarray,
    last_cw: np.ndarray,
    round_keys: np.ndarray,
    total: np.ndarray,
) -> None:
    """:func:`_walk` for the elements ``start + k`` of the key at the inputs ``x[k]`` (their sums in
    ``total[k]``), with the PRG in the loop (mpc.aesni): one call of
    ``mmo4`` makes a level's seed block and (up to three) value blocks. Elements go
    :data:`_FUSED_CHUNK` at a time, level by level, so that one element's AES runs while the
    next one's waits; the corrections are applied by masks, not branches, as the control
    bits are random and a mispredicted branch would stall that overlap."""
    m = total.shape[1]
    vb = np.uint64((m + 1) // 2)
    one = np.uint64(1)
    offset = np.uint64(start)
    seeds = np.empty((_FUSED_CHUNK, 2), np.uint64)
    t = np.empty(_FUSED_CHUNK, np.uint64)
    for lo in range(0, x.shape[0], _FUSED_CHUNK):
        hi = min(lo + _FUSED_CHUNK, x.shape[0])
        for k in range(lo, hi):
            seeds[k - lo, 0], seeds[k - lo, 1], t[k - lo] = roots[start + k, 0], roots[start + k, 1], party
            total[k, :] = 0
        for signed_level in range(seed_cw.shape[0]):
            level, shift = np.uint64(signed_level), np.uint64(seed_cw.shape[0] - 1 - signed_level)
            for signed in range(lo, hi):
                # unsigned: no checks for negative indices; j into the inputs, i into the key
                j, r = np.uint64(signed), np.uint64(signed - lo)
                i = j + offset
                side = (x[j] >> shift) & one
                s0, s1, ti = seeds[r, 0], seeds[r, 1], t[r]
                q = np.uint64(2) + side * vb  # the child's first value block
                words = aesni.mmo4(
                    s0 ^ side, s1, s0 ^ q, s1, s0 ^ (q + one), s1, s0 ^ (q + np.uint64(2)), s1, round_keys
                )
                correct = np.uint64(0) - ti  # all ones where the control bit is set
                total[j, 0] += words[2] + (value_cw[level, i, 0] & correct)  # unrolled: a loop would
                if m > 1:  # index the words by a variable, which spills them to memory
                    total[j, 1] += words[3] + (value_cw[level, i, 1] & correct)
                if m > 2:
                    total[j, 2] += words[4] + (value_cw[level, i, 2] & correct)
                bit = words[0] & one
                seeds[r, 0] = (words[0] ^ bit) ^ (seed_cw[level, i, 0] & correct)
                seeds[r, 1] = words[1] ^ (seed_cw[level, i, 1] & correct)
                t[r] = bit ^ (np.uint64(bit_cw[level, i, side]) & ti)
        leaf = np.uint64(2) + np.uint64(2) * vb  # after the levels' block indices, as in _leaf
        for k in range(lo, hi):
            s0, s1 = seeds[k - lo, 0], seeds[k - lo, 1]
            words = aesni.mmo4(s0 ^ leaf, s1, s0 ^ (leaf + one), s1, s0 ^ (leaf + np.uint64(2)), s1, s0, s1, round_keys)
            correct = np.uint64(0) - t[k - lo]
            total[k, 0] += words[0] + (last_cw[start + k, 0] & correct)
            if m > 1:
                total[k, 1] += words[1] + (last_cw[start + k, 1] & correct)
            if m > 2:
                total[k, 2] += words[2] + (last_cw[start + k, 2] & correct)


def _walk(key: Key, x: np.ndarray, part: slice) -> np.ndarray:
    """The unsigned sum of values along the walks of ``x``, for the elements ``part`` of ``key``."""
    n_elems, m = x.size, key.outputs
    vb = _value_blocks(m)
    seeds = key.seeds[part].copy()
    t = np.full(n_elems, key.party, np.uint8)
    total = np.zeros((n_elems, m), np.uint64)
    blocks = np.empty((n_elems, 1 + vb, 2), np.uint64)
    room = np.empty(blocks.size + 2, np.uint64)  # cryptography wants a block of room past the output
    encryptor = Cipher(algorithms.AES(_AES_KEY), modes.ECB()).encryptor()  # ECB: no state between calls
    _walk_inputs(seeds, x, key.bits - 1, vb, blocks)
    for level in range(key.bits):
        encryptor.update_into(blocks.data.cast("B"), room.data.cast("B"))
        corrections = key.seed_cw[level, part], key.bit_cw[level, part], key.value_cw[level, part]
        out = room[: blocks.size].reshape(blocks.shape)
        _walk_step(blocks, out, x, key.bits - 1 - level, *corrections, t, seeds, total)
    total += _leaf(seeds, m) + _times(t, key.last_cw[part])
    return total


@numba.njit(cache=True, nogil=True, inline="always")
def _child_blocks(blocks: np.ndarray, i: int, s0: np.uint64, s1: np.uint64, side: np.uint64, vb: int) -> None:
    """Element ``i``'s PRG input blocks for the child on ``side``: its seed block, then its value blocks."""
    blocks[i, 0, 0] = s0 ^ side
    blocks[i, 0, 1] = s1
    for k in range(vb):
        blocks[i, 1 + k, 0] = s0 ^ (2 + side * vb + k)
        blocks[i, 1 + k, 1] = s1


@numba.njit(cache=True, nogil=True)
def _walk_inputs(seeds: np.ndarray, x: np.ndarray, shift: int, vb: int, blocks: np.ndarray) -> None:
    """The first level's PRG input blocks."""
    for i in range(seeds.shape[0]):
        _child_blocks(blocks, i, seeds[i, 0], seeds[i, 1], (x[i] >> shift) & 1, vb)


@numba.njit(cache=True, nogil=True)
def _walk_step(
    blocks: np.ndarray,
    out: np.ndarray,
    x: np.ndarray,
    shift: int,
    seed_cw: np.ndarray,
    bit_cw: np.ndarray,
    value_cw: np.ndarray,
    t: np.ndarray,
    seeds: np.ndarray,
    total: np.ndarray,
) -> None:
    """One level of every walk, from AES's output ``out`` on ``blocks`` (XOR-ed here: MMO): add
    the child's values (corrected where the control bit is set), move to its seed, and write the
    next level's blocks in place."""
    m = total.shape[1]
    vb = blocks.shape[1] - 1
    for i in range(seeds.shape[0]):
        side = (x[i] >> shift) & 1
        ti = t[i]
        for j in range(m):
            word = out[i, 1 + j // 2, j % 2] ^ blocks[i, 1 + j // 2, j % 2]
            total[i, j] += word + ti * value_cw[i, j]
        s0 = out[i, 0, 0] ^ blocks[i, 0, 0]
        s1 = out[i, 0, 1] ^ blocks[i, 0, 1]
        bit = s0 & 1
        s0 ^= bit
        if ti:
            s0 ^= seed_cw[i, 0]
            s1 ^= seed_cw[i, 1]
            bit ^= bit_cw[i, side]
        seeds[i, 0] = s0
        seeds[i, 1] = s1
        t[i] = bit
        if shift > 0:
            _child_blocks(blocks, i, s0, s1, (x[i] >> (shift - 1)) & 1, vb)


# ---- a key as uint64 words, as the dealer sends it -----------------------------------------


def _bit_words(size: int, bits: int) -> int:
    return math.ceil(bits * size * 2 / 64)


def _sections(size: int, bits: int, outputs: int) -> list[tuple[int, ...]]:
    return [(size, SEED_WORDS), (bits, size, SEED_WORDS), (bits, size, outputs), (size, outputs)]


def word_count(size: int, bits: int, outputs: int) -> int:
    """How many uint64 words :func:`to_words` makes of a key."""
    return sum(math.prod(shape) for shape in _sections(size, bits, outputs)) + _bit_words(size, bits)


def to_words(key: Key) -> np.ndarray:
    """The key as one uint64 array (control-bit corrections packed 64 to a word)."""
    packed = np.zeros(_bit_words(key.size, key.bits) * 8, np.uint8)
    bits = np.packbits(key.bit_cw.reshape(-1))
    packed[: bits.size] = bits
    parts = [key.seeds, key.seed_cw, key.value_cw, key.last_cw]
    return np.concatenate([p.reshape(-1) for p in parts] + [packed.view(np.uint64)])


def from_words(words: np.ndarray, *, party: int, size: int, bits: int, outputs: int) -> Key:
    """The key :func:`to_words` made; ValueError if ``words`` is not that of such a key."""
    if words.dtype != np.uint64 or words.shape != (word_count(size, bits, outputs),):
        raise ValueError(
            f"a DCF key for {size} comparisons of {bits} bits is {word_count(size, bits, outputs)} uint64 words, "
            f"got {words.shape} of {words.dtype}"
        )
    parts, start = [], 0
    for shape in _sections(size, bits, outputs):
        parts.append(words[start : start + math.prod(shape)].reshape(shape))
        start += math.prod(shape)
    bit_cw = np.unpackbits(words[start:].view(np.uint8))[: bits * size * 2].reshape(bits, size, 2)
    return Key(party, parts[0], parts[1], bit_cw, parts[2], parts[3])
