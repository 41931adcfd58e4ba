"""What travels between a client and the compute parties, and how it is checked.

A request carries one additive share of a fixed-point encoded, preprocessed image
batch (int64, little-endian, base64); the response carries that party's share of
the logits. Neither says anything about the image or the result on its own.
The model card is public: architecture, classes and preprocessing, so that the
client prepares its input exactly as the model was trained.
"""

from __future__ import annotations

import base64
import binascii
import math
import re
from dataclasses import asdict, dataclass

import torch
from pydantic import BaseModel, Field

REQUEST_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
DTYPE = "int64"


class WireError(ValueError):
    """A request or response that does not match the model card; the message says what is wrong."""


@dataclass(frozen=True)
class ModelCard:
    """Public facts about the served model (never its weights)."""

    model_name: str
    classes: tuple[str, ...]
    channels: int
    image_size: int
    mean: float
    std: float
    fractional_bits: int
    max_batch: int
    synthetic: bool = False  # trained on the built-in synthetic images: its predictions mean nothing clinically

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ModelCard:
        return cls(**{**d, "classes": tuple(d["classes"])})

    def check_input_shape(self, shape: list[int]) -> None:
        want = [self.channels, self.image_size, self.image_size]
        if len(shape) != 4 or list(shape[1:]) != want:
            raise WireError(
                f"share shape {list(shape)} does not fit the model: expected [n, {', '.join(map(str, want))}]"
            )
        if not 1 <= shape[0] <= self.max_batch:
            raise WireError(f"a request holds 1 to {self.max_batch} images, got {shape[0]}")


class PredictRequest(BaseModel):
    request_id: str = Field(description="the same id goes to every compute party; letters, digits, '_' and '-'")
    shape: list[int] = Field(description="[n, channels, size, size] of the share")
    dtype: str = Field(DTYPE, description="always int64 (fixed point in the ring Z_2^64)")
    share: str = Field(description="base64 of the little-endian int64 share")


class PredictResponse(BaseModel):
    request_id: str
    party: int
    shape: list[int]
    dtype: str = DTYPE
    logits_share: str = Field(description="base64 of this party's little-endian int64 share of the logits")
    batch_images: int = Field(description="images in the encrypted forward pass that served this request")


def encode_tensor(x: torch.Tensor) -> str:
    if x.dtype != torch.int64:
        raise WireError(f"shares are int64, got {x.dtype}")
    return base64.b64encode(x.contiguous().numpy().astype("<i8").tobytes()).decode("ascii")


def decode_tensor(data: str, shape: list[int], dtype: str, *, what: str) -> torch.Tensor:
    """The int64 tensor a base64 field holds, after checking dtype, shape and length."""
    if dtype != DTYPE:
        raise WireError(f"{what}: dtype must be {DTYPE!r}, got {dtype!r}")
    if any(d < 0 for d in shape):
        raise WireError(f"{what}: negative dimension in shape {shape}")
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as err:
        raise WireError(f"{what}: not valid base64 ({err})") from None
    want = 8 * math.prod(shape)
    if len(raw) != want:
        raise WireError(f"{what}: {len(raw)} bytes, but shape {shape} of int64 needs {want}")
    return torch.frombuffer(bytearray(raw), dtype=torch.int64).reshape(shape)


def check_request_id(request_id: str) -> None:
    if not REQUEST_ID.match(request_id):
        raise WireError(f"request_id must be 1-64 letters, digits, '_' or '-', got {request_id[:80]!r}")
