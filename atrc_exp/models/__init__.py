"""Backbones, heads and the full multi-task network."""

from .model import MultiTaskModel, build_model

__all__ = ["MultiTaskModel", "build_model"]
