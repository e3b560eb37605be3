"""ATRC's context-propagation (CP) blocks: global, local, t-label and s-label context.

Every block maps ``(features_t, features_s)`` (both B×C×h×w, C = the head's bottleneck width) to
B×d×h×w with d = C // 2 (``out_channels``). All four share one call signature,

    block(target_feats, source_feats, target_prob=None, source_prob=None) -> B×d×h×w

where ``target_prob`` / ``source_prob`` are the spatially normalised auxiliary predictions of the
target / source task (B×K×hw, see :func:`spatial_softmax`); only the label blocks read them. This
lets a search block hold all ops in ``op_list.<i>`` and call them alike.

Module names and parameter order follow the original implementation (``query_project``,
``key_project``, ``value_project``; each layer a :class:`ConvBNReLU` with attributes ``conv`` and
``bn``), so the state-dict keys are the original's: ``query_project.0.conv.weight`` (first conv of
the query), ``value_project.bn.running_mean``, ...

``last_affine=False`` makes the value projection's BatchNorm non-affine (used by the search head).
Conv weights are Xavier-uniform initialised (biases, if any, zero).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ..ops.batch_norm import softplus
from .layers import ConvBNReLU, conv_bn_act_blockwise, conv_bn_relu_group

__all__ = [
    "CONTEXT_CODES",
    "CONTEXT_NAMES",
    "CPOp",
    "GlobalContextBlock",
    "LabelContextBlock",
    "LocalContextBlock",
    "SLabelContextBlock",
    "TLabelContextBlock",
    "label_contexts",
    "make_cp_block",
    "project_cp_ops",
    "run_cp_ops",
    "ignore_mask",
    "spatial_softmax",
]

#: Genotype encoding: index → context name (0 = no connection).
CONTEXT_NAMES: tuple[str, ...] = ("none", "global", "local", "tlabel", "slabel")
#: Context name → genotype code.
CONTEXT_CODES: dict[str, int] = {n: i for i, n in enumerate(CONTEXT_NAMES)}

IGNORE_VALUE = 255


def _init_cp_block(block: nn.Module) -> None:
    for m in block.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


class _CPBlock(nn.Module):
    """Shared plumbing; subclasses build ``query_project``, ``key_project``, ``value_project``."""

    #: which auxiliary prediction the block needs: None, "target" or "source"
    needs_prob: str | None = None
    #: "global", "local" or "label": how :func:`run_cp_ops` evaluates the block
    kind: str = ""

    def __init__(self, in_channels: int, out_channels: int, last_affine: bool = True):
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.last_affine = last_affine

    def _value(self, c_in: int) -> ConvBNReLU:
        return ConvBNReLU(c_in, self.out_channels, 1, relu=True, affine=self.last_affine)

    def extra_repr(self) -> str:
        return f"in_channels={self.in_channels}, out_channels={self.out_channels}, last_affine={self.last_affine}"


class GlobalContextBlock(_CPBlock):
    """Global context: linear (kernelised) attention over all pixels of the source.

    query = [ConvBNReLU 1×1, ConvBN 1×1, Softplus](target); key = the same on the source;
    value = ConvBNReLU 1×1 (source). With K, V, Q flattened to B×d×N:
    S = V·Kᵀ (B×d×d), Z = Σ_N K (B×d), out = S·Q / max(Zᵀ·Q, 1e-12).
    """

    def __init__(self, in_channels: int, out_channels: int, last_affine: bool = True):
        super().__init__(in_channels, out_channels, last_affine)
        d = out_channels
        self.query_project = nn.Sequential(
            ConvBNReLU(in_channels, d, 1), ConvBNReLU(d, d, 1, relu=False), nn.Softplus()
        )
        self.key_project = nn.Sequential(
            ConvBNReLU(in_channels, d, 1), ConvBNReLU(d, d, 1, relu=False), nn.Softplus()
        )
        self.value_project = self._value(in_channels)
        _init_cp_block(self)

    kind = "global"

    def forward(self, target_feats, source_feats, target_prob=None, source_prob=None):
        key = self.key_project(source_feats)
        value = self.value_project(source_feats)
        query = self.query_project(target_feats)
        return self.attend(query, key, value)

    def attend(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        """Projected query (B×d×H×W), key and value (B×d×h×w) → B×d×H×W."""
        B, d, H, W = query.shape
        key = key.reshape(B, d, -1)  # B×d×N
        value = value.reshape(B, d, -1)  # B×d×N
        query = query.reshape(B, d, -1)  # B×d×N
        s = torch.matmul(value, key.transpose(1, 2))  # B×d×d
        z = key.sum(dim=2, keepdim=True).transpose(1, 2)  # B×1×d
        denom = torch.matmul(z, query).clamp_min(1e-12)  # B×1×N
        out = torch.matmul(s, query) / denom  # B×d×N
        return out.view(B, d, H, W)


class LocalContextBlock(_CPBlock):
    """Local context: softmax attention over the ``kernel_size``² window around each pixel.

    query = [ConvBNReLU, ConvBNReLU] 1×1 (target); key = the same (source); value = ConvBNReLU 1×1
    (source). Scores are ⟨q, k⟩/√d; window positions outside the image are zero keys and values
    that score 0 and stay in the softmax (the original's border semantics; see
    :func:`atrc_exp.ops.local_attention`).
    """

    def __init__(self, in_channels: int, out_channels: int, last_affine: bool = True, kernel_size: int = 9):
        super().__init__(in_channels, out_channels, last_affine)
        d = out_channels
        self.kernel_size = int(kernel_size)
        self.query_project = nn.Sequential(ConvBNReLU(in_channels, d, 1), ConvBNReLU(d, d, 1))
        self.key_project = nn.Sequential(ConvBNReLU(in_channels, d, 1), ConvBNReLU(d, d, 1))
        self.value_project = self._value(in_channels)
        _init_cp_block(self)

    kind = "local"

    def forward(self, target_feats, source_feats, target_prob=None, source_prob=None):
        query = self.query_project(target_feats)
        key = self.key_project(source_feats)
        value = self.value_project(source_feats)
        return self.attend(query, key, value)

    def attend(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        """Projected query, key and value (B×d×H×W) → B×d×H×W."""
        from ..ops import local_attention

        if query.device.type == "cpu" and query.dtype in (torch.bfloat16, torch.float16):
            # the CPU kernels are float32/float64 only (CPU autocast hands us bf16)
            query, key, value = query.float(), key.float(), value.float()
        return local_attention(query.contiguous(), key.contiguous(), value.contiguous(), self.kernel_size)


class LabelContextBlock(_CPBlock):
    """Label context (OCR-style): attention over K class-conditional summaries of the source.

    P (B×K×N): spatial softmax of the auxiliary logits of the target (``context_type="tlabel"``)
    or the source (``"slabel"``). Context = P·F_sᵀ laid out as B×C×K×1; key = [ConvBNReLU,
    ConvBNReLU] 1×1 and value = ConvBNReLU 1×1 on the context; query = [ConvBNReLU, ConvBNReLU]
    1×1 on the target; out = softmax_K(QᵀK/√d)·V.
    """

    def __init__(
        self, in_channels: int, out_channels: int, last_affine: bool = True, context_type: str = "tlabel"
    ):
        super().__init__(in_channels, out_channels, last_affine)
        if context_type not in ("tlabel", "slabel"):
            raise ValueError(f"context_type must be 'tlabel' or 'slabel', got {context_type!r}")
        self.context_type = context_type
        self.needs_prob = "target" if context_type == "tlabel" else "source"
        d = out_channels
        self.query_project = nn.Sequential(ConvBNReLU(in_channels, d, 1), ConvBNReLU(d, d, 1))
        self.key_project = nn.Sequential(ConvBNReLU(in_channels, d, 1), ConvBNReLU(d, d, 1))
        self.value_project = self._value(in_channels)
        _init_cp_block(self)

    kind = "label"

    @staticmethod
    def gather_context(feats: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
        """``probs`` B×K×N (spatially normalised), ``feats`` B×C×h×w → context B×C×K×1."""
        B, C = feats.shape[:2]
        if probs.dim() == 4:
            probs = probs.flatten(2)
        f = feats.reshape(B, C, -1).transpose(1, 2)  # B×N×C
        return torch.matmul(probs, f).transpose(1, 2).unsqueeze(3)  # B×C×K×1

    def select_prob(self, target_prob, source_prob) -> torch.Tensor:
        probs = target_prob if self.context_type == "tlabel" else source_prob
        if probs is None:
            who = "target" if self.context_type == "tlabel" else "source"
            raise ValueError(f"{self.context_type} context needs the {who} task's auxiliary prediction")
        return probs

    def forward(self, target_feats, source_feats, target_prob=None, source_prob=None):
        probs = self.select_prob(target_prob, source_prob)
        context = self.gather_context(source_feats, probs)
        key = self.key_project(context)
        value = self.value_project(context)
        query = self.query_project(target_feats)
        return self.attend(query, key, value)

    def attend(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        """Projected query (B×d×H×W), key and value of the context (B×d×K×1) → B×d×H×W:
        softmax_K(QᵀK/√d)·V per pixel (:func:`atrc_exp.ops.label_attention.label_attention`: a
        C++ kernel on float32/float64 CPU tensors, else PyTorch's batched products)."""
        from ..ops.label_attention import label_attention

        return label_attention(query, key, value)


class TLabelContextBlock(LabelContextBlock):
    """Label context from the target task's auxiliary prediction."""

    def __init__(self, in_channels: int, out_channels: int, last_affine: bool = True):
        super().__init__(in_channels, out_channels, last_affine, context_type="tlabel")


class SLabelContextBlock(LabelContextBlock):
    """Label context from the source task's auxiliary prediction."""

    def __init__(self, in_channels: int, out_channels: int, last_affine: bool = True):
        super().__init__(in_channels, out_channels, last_affine, context_type="slabel")


_BLOCKS: dict[int, type[_CPBlock]] = {
    1: GlobalContextBlock,
    2: LocalContextBlock,
    3: TLabelContextBlock,
    4: SLabelContextBlock,
}


def make_cp_block(
    context: int | str, in_channels: int, out_channels: int, last_affine: bool = True, kernel_size: int = 9
) -> nn.Module:
    """Build the CP block of genotype code (1–4) or context name (``global``, ``local``, ``tlabel``,
    ``slabel``)."""
    code = CONTEXT_CODES.get(context) if isinstance(context, str) else context
    if code not in _BLOCKS:
        raise ValueError(f"no CP block for context {context!r}; choose 1-4 or {CONTEXT_NAMES[1:]}")
    if code == 2:
        return LocalContextBlock(in_channels, out_channels, last_affine, kernel_size=kernel_size)
    return _BLOCKS[code](in_channels, out_channels, last_affine)


def ignore_mask(
    image: torch.Tensor, size: tuple[int, int], ignore_value: float = IGNORE_VALUE
) -> torch.Tensor | None:
    """B×1×(h·w) bool: the pixels of ``image`` (B×3×H×W, nearest-resized to ``size`` = (h, w))
    equal to ``ignore_value`` in any channel (always a mask, never a data-dependent shortcut: no
    host read, one compiled graph)."""
    h, w = size
    img = image if tuple(image.shape[-2:]) == (h, w) else F.interpolate(image, size=(h, w), mode="nearest")
    return (img == ignore_value).any(dim=1).reshape(img.shape[0], 1, h * w)


def spatial_softmax(
    logits: torch.Tensor,
    image: torch.Tensor | None = None,
    ignore_value: float = IGNORE_VALUE,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-class softmax over spatial positions of aux ``logits`` (B×K×h×w) → B×K×(h·w).

    Pixels where the input ``image`` (B×3×H×W, nearest-resized to h×w) equals ``ignore_value`` in any
    channel do not take part; an image whose pixels are all excluded gives zeros (not NaN, and
    finite gradients). ``mask`` (:func:`ignore_mask` of the image, computed once for several
    logits) replaces ``image``; with neither, no pixel is excluded.
    """
    B, K, h, w = logits.shape
    x = logits.reshape(B, K, h * w)
    if mask is None and image is not None:
        mask = ignore_mask(image, (h, w), ignore_value)
    if mask is None:
        return F.softmax(x, dim=2)
    empty = mask.all(dim=2, keepdim=True)  # B×1×1
    x = x.masked_fill(mask, float("-inf")).masked_fill(empty, 0.0)
    return F.softmax(x, dim=2).masked_fill(empty, 0.0)


# -- batched evaluation of many CP blocks ------------------------------------------------------------


class CPOp(NamedTuple):
    """One CP block to evaluate for ``target`` ← ``source`` (see :func:`run_cp_ops`)."""

    target: str
    source: str
    block: _CPBlock


def _project_rest(x: torch.Tensor, layers: Sequence[nn.Module]) -> torch.Tensor:
    """The layers of a projection after its first one (ConvBN[ReLU], Softplus), functionally."""
    for m in layers:
        if isinstance(m, ConvBNReLU):
            x = conv_bn_relu_group(x, [m])
        elif isinstance(m, nn.Softplus):
            x = softplus(x, m.beta, m.threshold)  # PyTorch's on the GPU, a vectorised kernel on the CPU
        else:
            x = m(x)
    return x


def _prob_task(op: CPOp) -> str:
    return op.target if op.block.context_type == "tlabel" else op.source


def label_contexts(
    ops: Sequence[CPOp], feats: Mapping[str, torch.Tensor], probs: Mapping[str, torch.Tensor], cache=None
) -> dict[tuple[str, str], torch.Tensor]:
    """The label contexts P_x·F_sᵀ (B×C×K×1) the label blocks of ``ops`` read, each computed once:
    a t-label block (t, s) reads (t, s), an s-label block reads (s, s)."""
    cache = {} if cache is None else cache
    for op in ops:
        if op.block.kind != "label":
            continue
        x = _prob_task(op)
        if (x, op.source) not in cache:
            p = probs.get(x)
            if p is None:
                op.block.select_prob(None, None)  # raises the block's error
            cache[(x, op.source)] = LabelContextBlock.gather_context(feats[op.source], p)
    return cache


def _group(ops: Sequence[CPOp], key) -> dict:
    """Indices of ``ops`` by ``key(op)`` (None: left out); within a group the global blocks last
    (their second query/key layer has no ReLU, the others' do: one in-place ReLU for the rest)."""
    groups: dict = {}
    for i, op in enumerate(ops):
        k = key(op)
        if k is not None:
            groups.setdefault(k, []).append(i)
    return {k: sorted(idx, key=lambda i: ops[i].block.kind == "global") for k, idx in groups.items()}


def run_cp_ops(
    ops: Sequence[CPOp],
    feats: Mapping[str, torch.Tensor],
    probs: Mapping[str, torch.Tensor] | None = None,
    contexts: Mapping[tuple[str, str], torch.Tensor] | None = None,
) -> list[torch.Tensor]:
    """Outputs of many CP blocks, ``[op.block(feats[op.target], feats[op.source], ...) for op in ops]``:
    :func:`project_cp_ops`, then every block's ``attend``."""
    query, key, value = project_cp_ops(ops, feats, probs, contexts)
    return [op.block.attend(query[i], key[i], value[i]) for i, op in enumerate(ops)]


def project_cp_ops(
    ops: Sequence[CPOp],
    feats: Mapping[str, torch.Tensor],
    probs: Mapping[str, torch.Tensor] | None = None,
    contexts: Mapping[tuple[str, str], torch.Tensor] | None = None,
) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
    """The projected ``(queries, keys, values)`` of many CP blocks (one list entry per op: what each
    block's ``attend`` takes), with the projections that read the same tensor batched into one 1×1
    convolution and one batch norm (:func:`~atrc_exp.models.layers.conv_bn_relu_group`):

    * the first query layer of every block with the same target;
    * the first key layer and the value projection of every global / local block with the same
      source;
    * the first key layer and the value projection of every label block that reads the same label
      context (contexts are computed once per (probability task, source), see
      :func:`label_contexts`; pass ``contexts`` to reuse them).

    The remaining layers run per block. Same numbers as the blocks' own projections (float
    rounding aside), running statistics updated once per layer.
    """
    n = len(ops)
    query: list = [None] * n
    key: list = [None] * n
    value: list = [None] * n
    d = [op.block.out_channels for op in ops]

    def first_and_second(x, idx, first, second):
        """One conv + BN (+ ReLU) for the layers ``first(op)`` of the ops ``idx`` (all reading
        ``x``), then their second layers ``second(op)`` block-wise as one batched product."""
        y = conv_bn_relu_group(x, [first(ops[i]) for i in idx])
        return conv_bn_act_blockwise(y, [second(ops[i]) for i in idx])

    # queries: per target, the first layers as one conv, the second ones as one batched product
    for t, idx in _group(ops, lambda op: op.target).items():
        parts = first_and_second(
            feats[t], idx, lambda op: op.block.query_project[0], lambda op: op.block.query_project[1]
        )
        for i, part in zip(idx, parts):
            query[i] = _project_rest(part, ops[i].block.query_project[2:])

    def keys_and_values(x, idx, together):
        """First key layers and values of the ops ``idx``, then the second key layers.
        ``together``: first key layers and values as one conv (small inputs: the label contexts);
        else two, so that the keys are contiguous for the batched second layers (no copy kept)."""
        dk = sum(d[i] for i in idx)
        keys1 = [ops[i].block.key_project[0] for i in idx]
        vals = [ops[i].block.value_project for i in idx]
        if together:
            y = conv_bn_relu_group(x, keys1 + vals)
            k, v = y[:, :dk], y[:, dk:]
        else:
            k, v = conv_bn_relu_group(x, keys1), conv_bn_relu_group(x, vals)
        keys = conv_bn_act_blockwise(k, [ops[i].block.key_project[1] for i in idx])
        for i, kp, vp in zip(idx, keys, v.split([d[i] for i in idx], dim=1)):
            key[i] = _project_rest(kp, ops[i].block.key_project[2:])
            value[i] = vp

    # on the source features (global, local): per source
    for s, idx in _group(ops, lambda op: op.source if op.block.kind in ("global", "local") else None).items():
        keys_and_values(feats[s], idx, together=False)
    # on the label contexts: per context
    if any(op.block.kind == "label" for op in ops):
        contexts = label_contexts(ops, feats, probs or {}, dict(contexts or {}))
        by_context = _group(ops, lambda op: (_prob_task(op), op.source) if op.block.kind == "label" else None)
        for ck, idx in by_context.items():
            keys_and_values(contexts[ck], idx, together=True)
    return query, key, value
