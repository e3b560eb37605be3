"""atrc_exp: Hydra-configured experiments for ATRC (ICCV 2021) multi-task dense prediction.

Public API:
    build_model(cfg) -> nn.Module                 the network of a composed config
    load_original_state_dict(model, state_dict)   import weights trained with the original code
"""

from __future__ import annotations

__version__ = "0.1.0"


def build_model(cfg):
    """Build the network of a composed Hydra config (see :func:`atrc_exp.models.build_model`)."""
    from .models import build_model as _build

    return _build(cfg)


def load_original_state_dict(model, state_dict, weights_only=None):
    """Import weights of the original ATRC implementation into ``model`` (a Lightning ``.ckpt`` dict,
    a bare state dict or the path of either); see :func:`atrc_exp.models.original.load_original_state_dict`."""
    from .models.original import load_original_state_dict as _load

    return _load(model, state_dict, weights_only=weights_only)


__all__ = ["build_model", "load_original_state_dict", "__version__"]
