"""Model registry: build any architecture by name, identically on every party."""

from models.registry import MODELS, build_model, model_names

__all__ = ["MODELS", "build_model", "model_names"]
