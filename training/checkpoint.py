"""Checkpoints: weights plus everything needed to use them."""

from __future__ import annotations

import os
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from medmpc.imaging.transforms import Preprocessing
from medmpc.models import architecture

FORMAT = "medmpc-checkpoint/1"


@dataclass
class Checkpoint:
    model_name: str
    classes: tuple[str, ...]
    preprocessing: Preprocessing
    state_dict: dict[str, torch.Tensor]
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def synthetic(self) -> bool:
        """Whether it was trained on the built-in synthetic images (its predictions mean nothing clinically)."""
        return bool(self.info.get("dataset", {}).get("synthetic", False))

    def build(self) -> nn.Module:
        model = architecture(self.model_name, len(self.classes))
        model.load_state_dict(self.state_dict)
        return model.eval()

    def save(self, path: str | Path) -> None:
        """Write atomically: a crash never leaves a half-written checkpoint behind."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        payload = {
            "format": FORMAT,
            "model_name": self.model_name,
            "classes": list(self.classes),
            "preprocessing": self.preprocessing.to_dict(),
            "state_dict": {k: v.detach().cpu() for k, v in self.state_dict.items()},
            "info": self.info,
        }
        tmp = path.with_name(path.name + ".tmp")
        torch.save(payload, tmp)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | Path) -> Checkpoint:
        """The checkpoint at ``path``: a model.pt, or a run's folder holding one."""
        path = Path(path)
        if path.is_dir():
            if not (path / "model.pt").is_file():
                raise FileNotFoundError(
                    f"{path} is a folder without a model.pt: pass a checkpoint file or a run's folder"
                )
            path = path / "model.pt"
        if not path.is_file():
            raise FileNotFoundError(f"checkpoint not found: {path}")
        try:
            payload = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as err:
            # torch's own advice is to load it unsafely; a medmpc checkpoint never needs that
            raise ValueError(
                f"{path} is not a medmpc checkpoint: it holds Python objects, not only tensors and plain values, "
                "and is not loaded (unpickling them could run code)"
            ) from err
        except Exception as err:  # torch raises several unrelated types for a bad file
            raise ValueError(
                f"{path} is not a medmpc checkpoint: PyTorch cannot read it ({type(err).__name__}: {err})"
            ) from err
        if not isinstance(payload, dict) or payload.get("format") != FORMAT:
            raise ValueError(f"{path} is not a medmpc checkpoint (expected format {FORMAT})")
        return cls(
            model_name=payload["model_name"],
            classes=tuple(payload["classes"]),
            preprocessing=Preprocessing(**payload["preprocessing"]),
            state_dict=payload["state_dict"],
            info=payload.get("info", {}),
        )
