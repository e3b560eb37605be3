"""Any timm model as a multi-scale backbone (``features_only=True``)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from .backbones import PretrainedDownloadError


def _timm_cache(model_name: str) -> str:
    """Where timm looks for ``model_name``'s pretrained weights: the Hugging Face hub cache for
    weights on the hub, torch.hub's checkpoint folder for weights at a URL."""
    from huggingface_hub.constants import HF_HUB_CACHE
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(model_name)
    if cfg is not None and not cfg.hf_hub_id and cfg.url:
        return str(Path(torch.hub.get_dir()) / "checkpoints")
    return HF_HUB_CACHE


class TimmBackbone(nn.Module):
    """Wrap ``timm.create_model(model_name, features_only=True, ...)``.

    Args:
        model_name: any timm model name supporting ``features_only``.
        pretrained: ``False`` (random init); ``True``: timm's own pretrained weights, from its cache
            (the Hugging Face hub cache, ``$HF_HUB_CACHE``, or torch.hub's for URL weights),
            downloaded there once when missing (offline: a one-line
            :class:`~atrc_exp.models.backbones.PretrainedDownloadError` naming the model and that
            folder); or the path of a local weights file (``.pth``/``.bin`` or ``.safetensors``)
            holding the state dict of the full (classification) timm model.
        out_indices: feature levels to return (timm's ``out_indices``); ``None`` keeps timm's default.
        **kwargs: forwarded to ``timm.create_model``.
    """

    def __init__(
        self,
        model_name: str,
        pretrained: bool | str | Path = False,
        out_indices: Sequence[int] | None = None,
        **kwargs,
    ):
        super().__init__()
        import timm

        if out_indices is not None:
            kwargs["out_indices"] = tuple(out_indices)
        source = f"timm's pretrained weights of {model_name!r}"
        if pretrained and pretrained is not True:
            path = Path(pretrained).expanduser()
            if not path.is_file():
                raise FileNotFoundError(
                    f"timm backbone {model_name!r}: pretrained weights file not found: {path}"
                )
            # timm's local-file option: no network; loads into the full model (timm handles the
            # classifier keys), then builds the feature extractor
            kwargs["pretrained_cfg_overlay"] = {"file": str(path)}
            source = str(path)
        try:
            self.model = timm.create_model(
                model_name, features_only=True, pretrained=bool(pretrained), **kwargs
            )
        except OSError as e:  # not in timm's cache and no download (offline, no such file on the hub)
            if pretrained is not True:
                raise
            raise PretrainedDownloadError(
                f"backbone=timm: {source} are not in timm's cache ({_timm_cache(model_name)}) and "
                f"could not be downloaded ({type(e).__name__}); run once online, or pass a local "
                f"file: backbone.pretrained=/path/to/weights.pth|.safetensors"
            ) from None
        except RuntimeError as e:  # key / shape mismatches from load_state_dict(strict=True)
            raise ValueError(f"cannot load {source} into timm model {model_name!r}: {e}") from e
        self.out_channels: list[int] = list(self.model.feature_info.channels())

    def forward(self, x: Tensor) -> list[Tensor]:
        out = self.model(x)  # a list, or a dict with feature_cls="dict"
        return list(out.values()) if isinstance(out, dict) else list(out)
