"""Fixed-key AES-128 inside compiled loops: the CPU's AES instructions as a Numba intrinsic.

mpc.dcf's PRG is ``G(s)_j = AES_K(s ^ j) ^ s ^ j`` (Matyas-Meyer-Oseas) with a public key
``K``, and evaluating a key walks a tree: at every level each element needs a few blocks of
its current seed. Encrypting those blocks with a library call per level writes every block
to memory and reads it back, which cost three times the AES itself. :func:`mmo4` instead
runs inside the walk's compiled loop, on values in registers: four blocks at once, one
512-bit VAES instruction per round where the CPU has VAES and AVX-512, four AES-NI
instructions otherwise. :data:`AVAILABLE` says whether this CPU has AES instructions at
all; mpc.dcf uses OpenSSL where it has not.

Blocks are two uint64 words, low word first, as NumPy holds a little-endian 128-bit block.
"""

from __future__ import annotations

from typing import Any

import llvmlite.binding
import numpy as np
from llvmlite import ir
from numba.core import cgutils, types
from numba.extending import intrinsic

_FEATURES = llvmlite.binding.get_host_cpu_features()
# x86 AES-NI; Numba compiles for this host's CPU, so the instructions are there to use
AVAILABLE = bool(_FEATURES.get("aes", False))
WIDE = AVAILABLE and bool(_FEATURES.get("vaes", False)) and bool(_FEATURES.get("avx512f", False))
BLOCKS = 4  # per call of mmo4
ROUNDS = 10

_I32, _I64 = ir.IntType(32), ir.IntType(64)


def _sbox() -> list[int]:
    """AES's S-box: the multiplicative inverse in GF(2^8), then the affine map (FIPS-197, 5.1.1)."""
    box, p, q = [0x63] * 256, 1, 1
    while True:
        p ^= ((p << 1) & 0xFF) ^ (0x1B if p & 0x80 else 0)  # p times 3
        q ^= q << 1  # q divided by 3: together q = 1/p
        q ^= q << 2
        q ^= q << 4
        q &= 0xFF
        if q & 0x80:
            q ^= 0x09
        rotations = [((q << k) | (q >> (8 - k))) & 0xFF for k in range(1, 5)]
        box[p] = q ^ rotations[0] ^ rotations[1] ^ rotations[2] ^ rotations[3] ^ 0x63
        if p == 1:
            return box


def round_keys(key: bytes) -> np.ndarray:
    """AES-128's key schedule (FIPS-197, 5.2): the 11 round keys as (11, 2) uint64."""
    if len(key) != 16:
        raise ValueError(f"an AES-128 key is 16 bytes, got {len(key)}")
    box, rcon = _sbox(), 1
    words = [list(key[4 * i : 4 * i + 4]) for i in range(4)]
    for i in range(4, 4 * (ROUNDS + 1)):
        t = list(words[i - 1])
        if i % 4 == 0:
            t = [box[b] for b in t[1:] + t[:1]]
            t[0] ^= rcon
            rcon = ((rcon << 1) ^ (0x1B if rcon & 0x80 else 0)) & 0xFF
        words.append([a ^ b for a, b in zip(words[i - 4], t, strict=True)])
    return np.frombuffer(bytes(sum(words, [])), np.uint64).reshape(ROUNDS + 1, 2).copy()


def _vector(builder: ir.IRBuilder, words: list[Any]) -> Any:
    vector = ir.Constant(ir.VectorType(_I64, len(words)), ir.Undefined)
    for i, word in enumerate(words):
        vector = builder.insert_element(vector, word, ir.Constant(_I32, i))
    return vector


def _encrypt(builder: ir.IRBuilder, state: Any, keys: list[Any], lanes: int) -> Any:
    """``AES_K`` on ``state``, ``lanes`` 128-bit blocks in one vector (4: VAES; 1: AES-NI)."""
    vector = ir.VectorType(_I64, 2 * lanes)
    suffix = ".512" if lanes == 4 else ""
    fn = ir.FunctionType(vector, [vector, vector])
    enc = cgutils.get_or_insert_function(builder.module, fn, f"llvm.x86.aesni.aesenc{suffix}")
    last = cgutils.get_or_insert_function(builder.module, fn, f"llvm.x86.aesni.aesenclast{suffix}")
    round_key = [_vector(builder, [k[0], k[1]] * lanes) for k in keys]
    state = builder.xor(state, round_key[0])
    for r in range(1, ROUNDS):
        state = builder.call(enc, [state, round_key[r]])
    return builder.call(last, [state, round_key[ROUNDS]])


def _mmo(builder: ir.IRBuilder, words: list[Any], keys: list[Any], lanes: int) -> list[Any]:
    """``AES_K(b) ^ b`` for every block ``b`` of ``words`` (two words a block)."""
    out = []
    for start in range(0, len(words), 2 * lanes):
        block = _vector(builder, words[start : start + 2 * lanes])
        mixed = builder.xor(_encrypt(builder, block, keys, lanes), block)
        out += [builder.extract_element(mixed, ir.Constant(_I32, i)) for i in range(2 * lanes)]
    return out


def _mmo4(lanes: int) -> Any:
    @intrinsic
    def mmo4(
        typingctx: Any, a0: Any, a1: Any, b0: Any, b1: Any, c0: Any, c1: Any, d0: Any, d1: Any, schedule: Any
    ) -> Any:
        """``AES_K(w) ^ w`` for four blocks ``w`` (eight uint64 words, low word first) under the
        (11, 2) uint64 C-contiguous array of round keys: eight uint64 words."""
        words = (a0, a1, b0, b1, c0, c1, d0, d1)
        if any(w != types.uint64 for w in words):
            return None
        if not (isinstance(schedule, types.Array) and schedule.dtype == types.uint64 and schedule.layout == "C"):
            return None  # the round keys are read as 22 consecutive words
        signature = types.UniTuple(types.uint64, 2 * BLOCKS)(*words, schedule)

        def codegen(context: Any, builder: ir.IRBuilder, sig: Any, values: list[Any]) -> Any:
            array = context.make_array(sig.args[-1])(context, builder, values[-1])
            at = [builder.load(builder.gep(array.data, [ir.Constant(_I64, i)])) for i in range(2 * (ROUNDS + 1))]
            invariant = builder.module.add_metadata([])
            for load in at:  # the round keys never change: LLVM may load them once, outside the loop
                load.set_metadata("invariant.load", invariant)
            keys = [(at[2 * r], at[2 * r + 1]) for r in range(ROUNDS + 1)]
            out = _mmo(builder, list(values[:-1]), keys, lanes)
            return context.make_tuple(builder, sig.return_type, out)

        return signature, codegen

    return mmo4


mmo4_narrow = _mmo4(1)  # four AES-NI instructions a round
mmo4_wide = _mmo4(4)  # one VAES instruction a round, on a 512-bit vector
mmo4 = mmo4_wide if WIDE else mmo4_narrow
