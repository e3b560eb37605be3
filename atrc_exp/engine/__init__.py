"""Training engine: the Accelerate loop, checkpoints and loggers."""

from .trainer import fit, reset_accelerate_state

__all__ = ["fit", "reset_accelerate_state"]
