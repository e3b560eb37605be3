"""The HRNet backbones of ``conf/backbone/`` and their pretrained weights (download, loading).

A backbone is any ``nn.Module`` with ``out_channels: list[int]`` whose ``forward(x)`` returns a list
of feature maps, highest resolution first, built from its config group's ``_target_``.
"""

from __future__ import annotations

import http.client
import logging
import os
import re
import socket
import urllib.error
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .hrnet import HRNet
from .state_dict import WeightsError, format_keys, load_strict, read_checkpoint, strip_prefixes

log = logging.getLogger(__name__)

#: Default ImageNet pretrain files (OpenMMLab "third_party" HRNetV2 releases) of the built-in HRNets.
PRETRAINED_URLS: dict[str, str] = {
    "hrnet18": "https://download.openmmlab.com/pretrain/third_party/hrnetv2_w18_small-b5a04e21.pth",
    "hrnet48": "https://download.openmmlab.com/pretrain/third_party/hrnetv2_w48-d2186c55.pth",
}

#: Environment variable redirecting the pretrained downloads to a mirror: ``$ATRC_WEIGHTS_URL_BASE/<file>``.
URL_BASE_ENV = "ATRC_WEIGHTS_URL_BASE"

#: ``<name>-<hex>.<ext>``: the hex digits are a prefix of the file's SHA-256 (``torch.hub``'s convention).
_HASH_IN_NAME = re.compile(r"-([0-9a-f]{6,64})\.[^.-]+$")

#: Key prefixes dropped when loading a checkpoint into a backbone: timm/HRNet-ImageNet classification parts
#: and the heads of a full segmentor (MMSeg ``decode_head``/``auxiliary_head``, our ``head``).
DROP_PREFIXES: tuple[str, ...] = (
    "incre_modules.",
    "downsamp_modules.",
    "final_layer.",
    "classifier.",
    "head.",
    "decode_head.",
    "auxiliary_head.",
)

#: Wrapper prefixes stripped from checkpoint keys (DDP, torch.compile, MMSeg segmentor).
_STRIP_PREFIXES = ("module.", "_orig_mod.", "backbone.")
#: Keys under which checkpoints commonly nest the state dict, tried in this order.
_NESTED_KEYS = ("state_dict", "model", "model_state_dict", "model_state")


def default_weights_path(name: str, directory: str | os.PathLike) -> Path:
    """Where ``pretrained=True`` expects the default weights of backbone ``name`` in the weights
    folder ``directory`` (the config's ``paths.weights_dir``)."""
    return Path(directory).expanduser() / PRETRAINED_URLS[name].rsplit("/", 1)[-1]


class PretrainedDownloadError(WeightsError):
    """The default pretrained weights could not be downloaded or failed their hash check (one line)."""


def download_pretrained(
    name: str, directory: str | os.PathLike, progress: bool = True, timeout: float | None = None
) -> Path:
    """The default weights file of backbone ``name``, downloaded into the weights folder ``directory``
    unless already there. ``timeout``: seconds the server may stay silent (connecting, or between
    two reads) before the download fails; ``None`` waits forever.

    ``$ATRC_WEIGHTS_URL_BASE`` redirects the download to a mirror (``<base>/<file name>``). It goes to a
    temporary file (``torch.hub.download_url_to_file``) whose SHA-256 must start with the hash prefix
    in the file name (torch.hub's convention) before it is moved to its final path, so an
    interrupted, truncated or corrupted download leaves nothing that looks valid.

    Raises:
        PretrainedDownloadError: no network / server error (naming the URL and where to put the file by
            hand), a hash mismatch, or a cache folder that cannot be written.
    """
    path = default_weights_path(name, directory)
    if path.is_file():
        return path
    base = os.environ.get(URL_BASE_ENV, "").strip()
    url = f"{base.rstrip('/')}/{path.name}" if base else PRETRAINED_URLS[name]
    by_hand = (
        f"download it by hand and put it at {path} (e.g. `mkdir -p {path.parent} && wget -O {path} {url}`; "
        f"the folder is paths.weights_dir / $ATRC_WEIGHTS_DIR, a mirror ${URL_BASE_ENV}), "
        f"or pass backbone.pretrained=/path/to/file"
    )
    m = _HASH_IN_NAME.search(path.name)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise PretrainedDownloadError(
            f"cannot create the weights folder {path.parent} ({e.strerror or e}): set paths.weights_dir or "
            f"$ATRC_WEIGHTS_DIR to a writable folder, or pass backbone.pretrained=/path/to/file"
        ) from None
    log.info("downloading the pretrained weights of backbone %r: %s -> %s", name, url, path)
    default_timeout = socket.getdefaulttimeout()  # torch.hub's urlopen takes the sockets' default
    socket.setdefaulttimeout(timeout)
    try:
        torch.hub.download_url_to_file(
            url, str(path), hash_prefix=m.group(1) if m else None, progress=progress
        )
    except RuntimeError as e:
        if "invalid hash value" not in str(e):
            raise
        raise PretrainedDownloadError(
            f"the download of {url} is corrupt or not the expected file ({e}); nothing was kept at "
            f"{path}: try again, or {by_hand}"
        ) from None
    except (OSError, http.client.HTTPException, ValueError) as e:  # URLError, HTTPError, timeouts, resets
        reason = e if isinstance(e, urllib.error.HTTPError) else getattr(e, "reason", None) or e
        if isinstance(reason, TimeoutError):
            reason = f"no answer within {timeout:g} s, backbone.download_timeout"
        raise PretrainedDownloadError(
            f"cannot download the pretrained weights of backbone {name!r} from {url} "
            f"({' '.join(str(reason).split())}): {by_hand}"
        ) from None
    finally:
        socket.setdefaulttimeout(default_timeout)
    return path


# ---------------------------------------------------------------------------------------- checkpoint loading


def _unwrap(ckpt: Any, source: str) -> dict[str, torch.Tensor]:
    obj = ckpt
    for _ in range(3):  # e.g. {"model": {"state_dict": ...}}
        if not isinstance(obj, Mapping):
            break
        nested = next((k for k in _NESTED_KEYS if isinstance(obj.get(k), Mapping)), None)
        if nested is None or any(isinstance(v, torch.Tensor) for v in obj.values()):
            break
        obj = obj[nested]
    if not isinstance(obj, Mapping) or not obj:
        raise WeightsError(f"{source}: not a state dict (got {type(obj).__name__})")
    bad = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise WeightsError(f"{source}: state dict has non-tensor entries: {format_keys(bad)}")
    return dict(obj)


def load_backbone_checkpoint(
    model: nn.Module, path_or_state_dict: str | os.PathLike | Mapping[str, Any]
) -> dict[str, Any]:
    """Load backbone weights strictly, accepting the usual checkpoint layouts.

    Accepted: an MMSegmentation checkpoint (``{"state_dict": ...}``, keys bare or prefixed ``backbone.``), an
    OpenMMLab/HRNet ImageNet pretrain file (bare keys), a timm state dict (maybe ``module.``-prefixed), a
    ``{"model": ...}`` wrapper, or ``.safetensors``. Prefixes ``module.``/``_orig_mod.``/``backbone.`` are
    stripped and keys under :data:`DROP_PREFIXES` dropped; then every remaining key must match the model's
    state dict exactly (same set, same shapes), else ``ValueError`` naming the offending keys and the file.
    The only tolerated gap is missing BatchNorm ``num_batches_tracked`` buffers (absent from pre-0.4.1
    PyTorch checkpoints such as the HRNet ImageNet releases); those keep the model's values.

    Returns:
        ``{"source", "loaded", "dropped", "missing_num_batches_tracked"}`` (counts of keys).
    """
    if isinstance(path_or_state_dict, Mapping):
        source = "<state dict>"
        ckpt: Any = path_or_state_dict
    else:
        path = Path(path_or_state_dict).expanduser()
        source = str(path)
        if not path.is_file():
            raise FileNotFoundError(f"checkpoint not found: {path}")
        ckpt = read_checkpoint(
            path,
            "backbone weights: a file saved with torch.save (.pth/.pt/.bin) or .safetensors",
            trust_hint="; if you trust it, load it yourself and save only its state dict (torch.save or "
            ".safetensors)",
        )
    raw = _unwrap(ckpt, source)

    state: dict[str, torch.Tensor] = {}
    dropped = 0
    for k, v in raw.items():
        k2 = strip_prefixes(k, _STRIP_PREFIXES)
        if k2.startswith(DROP_PREFIXES):
            dropped += 1
            continue
        if k2 in state:
            raise WeightsError(
                f"{source}: key {k2!r} appears more than once after stripping prefixes (from {k!r})"
            )
        state[k2] = v

    n_nbt = load_strict(model, state, source)
    return dict(source=source, loaded=len(state) - n_nbt, dropped=dropped, missing_num_batches_tracked=n_nbt)


# ------------------------------------------------------------------------------------------------ backbones


def _hrnet(
    name: str, pretrained: bool | str, weights_dir: str | os.PathLike | None, download_timeout: float | None
) -> HRNet:
    path = None  # resolved (downloaded) before building, so that a bad path fails at once
    if pretrained is True:
        if weights_dir is None:
            raise ValueError(f"backbone {name!r} with pretrained=True needs the weights folder (weights_dir)")
        path = download_pretrained(name, weights_dir, timeout=download_timeout)
    elif pretrained not in (None, False, ""):
        path = Path(pretrained).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"pretrained weights file for backbone {name!r} not found: {path}")
    model = HRNet(name)
    if path is not None:
        model.load_report = load_backbone_checkpoint(model, path)
    return model


def hrnet18(
    pretrained: bool | str = False,
    weights_dir: str | os.PathLike | None = None,
    download_timeout: float | None = None,
) -> HRNet:
    """HRNetV2-W18-small (3,860,720 parameters). ``pretrained``: False (random init), True (the
    default ImageNet file in ``weights_dir``, downloaded if missing, failing after
    ``download_timeout`` s of silence: :func:`download_pretrained`) or the path of a weights file
    (:func:`load_backbone_checkpoint`)."""
    return _hrnet("hrnet18", pretrained, weights_dir, download_timeout)


def hrnet48(
    pretrained: bool | str = False,
    weights_dir: str | os.PathLike | None = None,
    download_timeout: float | None = None,
) -> HRNet:
    """HRNetV2-W48 (65,325,120 parameters); arguments as for :func:`hrnet18`."""
    return _hrnet("hrnet48", pretrained, weights_dir, download_timeout)
