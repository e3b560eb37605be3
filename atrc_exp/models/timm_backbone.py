"""Any timm model as a multi-scale backbone (``features_only=True``)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

__all__ = ["TimmBackbone"]


class TimmBackbone(nn.Module):
    """Wrap ``timm.create_model(model_name, features_only=True, ...)``.

    Args:
        model_name: any timm model name supporting ``features_only``.
        pretrained: ``False`` (random init) or the path of a local weights file (``.pth``/``.bin`` or
            ``.safetensors``) holding the state dict of the full (classification) timm model. Nothing is ever
            downloaded: ``True`` raises a ``ValueError`` asking for a local file.
        out_indices: feature levels to return (timm's ``out_indices``); ``None`` keeps timm's default.
        **kwargs: forwarded to ``timm.create_model``.

    Attributes:
        out_channels: channels of each returned map.
        strides: reduction (stride) of each returned map.
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

        if pretrained is True:
            raise ValueError(
                f"backbone=timm with pretrained=True is not supported (weights are never downloaded). "
                f"Download the weights of {model_name!r} yourself and pass the local file: "
                f"backbone.pretrained=/path/to/weights.pth|.safetensors"
            )
        create_kwargs = dict(kwargs)
        if out_indices is not None:
            create_kwargs["out_indices"] = tuple(int(i) for i in out_indices)
        if pretrained:
            path = Path(pretrained).expanduser()
            if not path.is_file():
                raise FileNotFoundError(
                    f"timm backbone {model_name!r}: pretrained weights file not found: {path}"
                )
            # timm loads a local file given as pretrained_cfg_overlay['file'] without any network access; it
            # loads into the full model first (so classifier keys are handled by timm) and then builds the
            # feature extractor.
            create_kwargs["pretrained_cfg_overlay"] = {"file": str(path)}
            try:
                self.model = timm.create_model(
                    model_name, features_only=True, pretrained=True, **create_kwargs
                )
            except RuntimeError as e:  # key / shape mismatches from load_state_dict(strict=True)
                raise ValueError(f"cannot load {path} into timm model {model_name!r}: {e}") from e
        else:
            self.model = timm.create_model(model_name, features_only=True, pretrained=False, **create_kwargs)
        self.model_name = model_name
        self.out_channels: list[int] = list(self.model.feature_info.channels())
        self.strides: list[int] = list(self.model.feature_info.reduction())

    def forward(self, x: Tensor) -> list[Tensor]:
        out = self.model(x)
        if isinstance(out, torch.Tensor):
            return [out]
        if isinstance(out, dict):
            return list(out.values())
        return list(out)
