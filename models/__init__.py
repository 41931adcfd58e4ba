"""Model registry: build any architecture by name, identically on every party."""

from medmpc.models.registry import MODELS, architecture, build_model, model_names

__all__ = ["MODELS", "architecture", "build_model", "model_names"]
