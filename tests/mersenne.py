"""MT19937 state recovery: what an attacker does with 624 consecutive outputs of a peer's generator.

``torch.Generator`` on the CPU is MT19937; ``torch.randint`` over a range of 2^32 or more
draws ``(out_k << 32) | out_k+1`` per element (two 32-bit outputs, first one high), over a
smaller range one output per element. Untempering 624 consecutive outputs gives the state
words, from which NumPy's MT19937 (the same recurrence) replays every later output.
"""

from __future__ import annotations

import numpy as np

STATE_WORDS = 624
_SIGN = np.uint64(1 << 63)


def _undo_right(y: int, shift: int) -> int:
    x = y
    for _ in range(32 // shift + 1):
        x = y ^ (x >> shift)
    return x & 0xFFFFFFFF


def _undo_left(y: int, shift: int, mask: int) -> int:
    x = y
    for _ in range(32 // shift + 1):
        x = y ^ ((x << shift) & mask)
    return x & 0xFFFFFFFF


def untemper(out: int) -> int:
    y = _undo_right(out, 18)
    y = _undo_left(y, 15, 0xEFC60000)
    y = _undo_left(y, 7, 0x9D2C5680)
    return _undo_right(y, 11)


def outputs_of_ring_words(words: np.ndarray) -> np.ndarray:
    """The 32-bit MT outputs behind int64 words drawn by ``torch.randint(-2^63, 2^63 - 1)``
    (value = r64 - 2^63, r64 = high output << 32 | low output), in draw order."""
    r64 = words.astype(np.int64).view(np.uint64) ^ _SIGN
    return np.stack([r64 >> np.uint64(32), r64 & np.uint64(0xFFFFFFFF)], axis=1).reshape(-1)


def ring_words_at(outputs: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """The int64 ring word a ``torch.randint`` draw starting at each 32-bit ``offsets`` would give."""
    r64 = (outputs[offsets] << np.uint64(32)) | outputs[offsets + 1]
    return (r64 ^ _SIGN).view(np.int64)


def replay(observed: np.ndarray, count: int) -> np.ndarray:
    """The ``count`` 32-bit outputs that follow 624 ``observed`` consecutive ones (uint64 array)."""
    if observed.size < STATE_WORDS:
        raise ValueError(f"need {STATE_WORDS} consecutive outputs, got {observed.size}")
    key = np.array([untemper(int(v)) for v in observed[:STATE_WORDS]], dtype=np.uint32)
    bits = np.random.MT19937()
    bits.state = {"bit_generator": "MT19937", "state": {"key": key, "pos": STATE_WORDS}}
    return bits.random_raw(count)
