"""atrc_exp: Hydra-configured experiments for ATRC (ICCV 2021) multi-task dense prediction.

Public API: :func:`compose`, :func:`build_model`, :func:`load_original_state_dict`. Importing the
package registers the ``atrc_*`` OmegaConf resolvers that ``conf/`` uses, so Hydra's own compose
API works on :data:`atrc_exp.config.CONF_DIR` too (torch is imported only on use).
"""

from __future__ import annotations

from omegaconf import OmegaConf

from .config import compose

__version__ = "0.1.0"


def _folder_task_specs(root) -> dict:
    """The task specs of the folder dataset at ``root`` (:func:`atrc_exp.data.folder.load_task_specs`)."""
    from .data.folder import load_task_specs

    return load_task_specs(root)


def register_resolvers() -> None:
    """Register the ``atrc_*`` OmegaConf resolvers of ``conf/`` (idempotent; done on import)."""
    from .config import cache_dir, rank_suffix, run_stamp

    for name, fn in {
        "atrc_stamp": run_stamp,
        "atrc_rank_suffix": rank_suffix,
        "atrc_cache_dir": lambda: str(cache_dir()),
        "atrc_folder_tasks": lambda root: list(_folder_task_specs(root)),
        "atrc_folder_task_specs": _folder_task_specs,
    }.items():
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, fn, use_cache=True)


register_resolvers()


def build_model(cfg):
    """Build the network of a composed Hydra config (see :func:`atrc_exp.models.build_model`)."""
    from .models import build_model as _build

    return _build(cfg)


def load_original_state_dict(model, state_dict, weights_only=None):
    """Import weights of the original ATRC implementation into ``model`` (a Lightning ``.ckpt`` dict,
    a bare state dict or the path of either): :func:`atrc_exp.models.original.load_original_state_dict`."""
    from .models.original import load_original_state_dict as _load

    return _load(model, state_dict, weights_only=weights_only)


__all__ = ["build_model", "compose", "load_original_state_dict", "register_resolvers", "__version__"]
