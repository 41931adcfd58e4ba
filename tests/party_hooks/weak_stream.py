"""The control generator: CrypTen's own MT19937 sampling behind mpc.streams' interface."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from medmpc.mpc import streams


class MersenneStream:
    """Draws exactly as stock CrypTen does: ``torch.randint`` on an MT19937 ``torch.Generator``."""

    def __init__(self, key: bytes, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        self._generator = torch.Generator().manual_seed(int.from_bytes(key[:8], "little"))

    def ring(self, size: Sequence[int]) -> torch.Tensor:
        return torch.randint(-(2**63), 2**63 - 1, tuple(size), generator=self._generator).to(self.device)

    def bits(self, size: Sequence[int], bitlength: int) -> torch.Tensor:
        if bitlength == 64:
            return self.ring(size)
        return torch.randint(0, 2**bitlength, tuple(size), generator=self._generator).to(self.device)


def install() -> None:
    streams.keyed = MersenneStream
