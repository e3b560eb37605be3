"""atrc_exp: Hydra-configured experiments for ATRC (ICCV 2021) multi-task dense prediction.

Public API:
    build_model(cfg) -> nn.Module   the network of a composed config
"""

from __future__ import annotations

__version__ = "0.1.0"


def build_model(cfg):
    """Build the network of a composed Hydra config (see :func:`atrc_exp.models.build_model`)."""
    from .models import build_model as _build

    return _build(cfg)


__all__ = ["build_model", "__version__"]
