"""ATRC's context types: the context-propagation (CP) blocks and :data:`CONTEXTS`, their one table.

A context type is one row of :data:`CONTEXTS` (:class:`ContextSpec`: genotype code, config name,
CP block class, which auxiliary prediction it reads, how genotype plots draw it), its block class
below and its ``conf/context/<name>.yaml``. Everything else — genotype codes and validation, the
search's candidate ops, which tasks get an auxiliary head, the names in logs and heatmaps, the
config's list of contexts — is read from the table.

Every block maps ``(features_t, features_s)`` (both B×C×h×w, C = the head's bottleneck width) to
B×d×h×w with d = ``out_channels`` (C // 2 in ATRC), in three steps that are the method:

* ``source = block.key_input(features_s, prob)``: what the key and value projections read — the
  source features, or for a label context the class summaries ``P·F_sᵀ`` (B×C×K×1) of the source
  under the spatially normalised auxiliary prediction ``prob`` (B×K×hw, :func:`spatial_softmax`);
* ``query_project(features_t)``, ``key_project(source)``, ``value_project(source)``;
* ``block.attend(query, key, value)``.

``block(target_feats, source_feats, target_prob=None, source_prob=None)`` runs the three for one
pair. The ATRC head evaluates many blocks at once with :func:`evaluate_cp_blocks`, which runs the
same three steps but batches the projections that read the same tensor (one convolution and one
batch norm each: the same numbers up to float rounding, running statistics updated once).

Module names and parameter order follow the original implementation (``query_project``,
``key_project``, ``value_project``; each layer a :class:`ConvBNReLU` with attributes ``conv`` and
``bn``), so the state-dict keys are the original's: ``query_project.0.conv.weight``,
``value_project.bn.running_mean``, ... ``last_affine=False`` makes the value projection's
BatchNorm non-affine (the search head). Conv weights are Xavier-uniform initialised.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from .layers import ConvBNReLU, conv_bn_act_blockwise, conv_bn_relu_group

__all__ = [
    "CONTEXTS",
    "CPOp",
    "aux_of_pair",
    "ContextSpec",
    "GlobalContextBlock",
    "LabelContextBlock",
    "LocalContextBlock",
    "context_spec",
    "evaluate_cp_blocks",
    "ignore_mask",
    "key_inputs",
    "make_cp_block",
    "spatial_softmax",
]

IGNORE_VALUE = 255


def aux_of_pair(reads_aux: str | None, target, source):
    """Of a pair's ``target`` and ``source`` (task names, or their aux predictions), the one whose
    auxiliary prediction a context with ``reads_aux`` (``None``, ``"target"``, ``"source"``) reads."""
    return {"target": target, "source": source}.get(reads_aux)


class _CPBlock(nn.Module):
    """A CP block: subclasses build ``query_project``, ``key_project``, ``value_project`` and
    define :meth:`attend` (and :meth:`key_input` when the keys read something other than the
    source features). ``reads_aux``: whose auxiliary prediction the block reads (``None``,
    ``"target"`` or ``"source"``), from its row of :data:`CONTEXTS`."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        last_affine: bool = True,
        *,
        reads_aux: str | None = None,
        kernel_size: int = 9,
    ):
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.last_affine = last_affine
        self.reads_aux = reads_aux

    def _two_layers(self, relu_second: bool = True) -> nn.Sequential:
        d = self.out_channels
        return nn.Sequential(ConvBNReLU(self.in_channels, d, 1), ConvBNReLU(d, d, 1, relu=relu_second))

    def _value(self) -> ConvBNReLU:
        return ConvBNReLU(self.in_channels, self.out_channels, 1, affine=self.last_affine)

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def key_input(self, source_feats: torch.Tensor, prob: torch.Tensor | None = None) -> torch.Tensor:
        """What the key and value projections read: the source features (B×C×h×w). A function of
        its inputs only (no parameters): the head computes it once per (source, aux task) and
        shares it between the blocks that read it."""
        return source_feats

    def attend(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(
        self,
        target_feats: torch.Tensor,
        source_feats: torch.Tensor,
        target_prob: torch.Tensor | None = None,
        source_prob: torch.Tensor | None = None,
    ) -> torch.Tensor:
        prob = aux_of_pair(self.reads_aux, target_prob, source_prob)
        if self.reads_aux is not None and prob is None:
            raise ValueError(f"{type(self).__name__} needs the {self.reads_aux} task's auxiliary prediction")
        source = self.key_input(source_feats, prob)
        return self.attend(
            self.query_project(target_feats), self.key_project(source), self.value_project(source)
        )

    def extra_repr(self) -> str:
        return f"in_channels={self.in_channels}, out_channels={self.out_channels}, last_affine={self.last_affine}"


class GlobalContextBlock(_CPBlock):
    """Global context: linear (kernelised) attention over all pixels of the source.

    query = [ConvBNReLU 1×1, ConvBN 1×1, Softplus](target); key = the same on the source;
    value = ConvBNReLU 1×1 (source). With K, V, Q flattened to B×d×N:
    S = V·Kᵀ (B×d×d), Z = Σ_N K (B×d), out = S·Q / max(Zᵀ·Q, 1e-12).
    """

    def __init__(self, in_channels: int, out_channels: int, last_affine: bool = True, **kwargs):
        super().__init__(in_channels, out_channels, last_affine, **kwargs)
        self.query_project = nn.Sequential(*self._two_layers(relu_second=False), nn.Softplus())
        self.key_project = nn.Sequential(*self._two_layers(relu_second=False), nn.Softplus())
        self.value_project = self._value()
        self._init_weights()

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
    :func:`atrc_exp.ops.local_attention`, ATRC's custom op).
    """

    def __init__(self, in_channels: int, out_channels: int, last_affine: bool = True, **kwargs):
        super().__init__(in_channels, out_channels, last_affine, **kwargs)
        self.kernel_size = int(kwargs.get("kernel_size", 9))
        self.query_project = self._two_layers()
        self.key_project = self._two_layers()
        self.value_project = self._value()
        self._init_weights()

    def attend(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        """Projected query, key and value (B×d×H×W) → B×d×H×W."""
        from ..ops import local_attention

        if query.device.type == "cpu" and query.dtype in (torch.bfloat16, torch.float16):
            # the CPU kernel is float32/float64 only (CPU autocast hands us bf16)
            query, key, value = query.float(), key.float(), value.float()
        return local_attention(query.contiguous(), key.contiguous(), value.contiguous(), self.kernel_size)


class LabelContextBlock(_CPBlock):
    """Label context (OCR-style): attention over K class-conditional summaries of the source.

    P (B×K×N): spatial softmax of the auxiliary logits of the target (t-label) or the source
    (s-label), ``reads_aux``. Context = P·F_sᵀ laid out as B×C×K×1; key = [ConvBNReLU,
    ConvBNReLU] 1×1 and value = ConvBNReLU 1×1 on the context; query = [ConvBNReLU, ConvBNReLU]
    1×1 on the target; out = softmax_K(QᵀK/√d)·V.
    """

    def __init__(self, in_channels: int, out_channels: int, last_affine: bool = True, **kwargs):
        super().__init__(in_channels, out_channels, last_affine, **kwargs)
        if self.reads_aux not in ("target", "source"):
            raise ValueError(
                f"a label context reads the 'target' or 'source' aux map, got {self.reads_aux!r}"
            )
        self.query_project = self._two_layers()
        self.key_project = self._two_layers()
        self.value_project = self._value()
        self._init_weights()

    def key_input(self, source_feats: torch.Tensor, prob: torch.Tensor | None = None) -> torch.Tensor:
        """``prob`` B×K×N (spatially normalised), ``source_feats`` B×C×h×w → context B×C×K×1."""
        B, C = source_feats.shape[:2]
        f = source_feats.reshape(B, C, -1).transpose(1, 2)  # B×N×C
        return torch.matmul(prob.flatten(2), f).transpose(1, 2).unsqueeze(3)  # B×C×K×1

    def attend(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        """Projected query (B×d×H×W), key and value of the context (B×d×K×1) → B×d×H×W:
        softmax over the K classes of ⟨q, k⟩/√d, per pixel, then the weighted sum of the values."""
        B, d, H, W = query.shape
        q = query.reshape(B, d, H * W).transpose(1, 2)  # B×N×d
        scores = torch.matmul(q, key.reshape(B, d, -1)) * d**-0.5  # B×N×K
        weights = F.softmax(scores, dim=-1)
        out = torch.matmul(value.reshape(B, d, -1), weights.transpose(1, 2))  # B×d×N
        return out.view(B, d, H, W)


@dataclass(frozen=True)
class ContextSpec:
    """One context type (a row of :data:`CONTEXTS`).

    ``code``: its genotype code (the index in :data:`CONTEXTS`; 0 is "no connection");
    ``name``: the config / log name (``context=<name>`` trains a head with it on every pair);
    ``block``: the CP block class (``None`` for ``none``); ``reads_aux``: whose auxiliary
    prediction it reads (``None``, ``"target"``, ``"source"``; those tasks get an auxiliary head);
    ``on_diagonal``: offered by the search for a task's own pair (t = s) — s-label is not, there
    it equals t-label; ``display``, ``colour``: its label and RGB cell colour in genotype plots.
    """

    code: int
    name: str
    block: type[_CPBlock] | None
    reads_aux: str | None = None
    on_diagonal: bool = True
    display: str = ""
    colour: tuple[int, int, int] = (0, 0, 0)


#: The context types, in genotype-code order (the original's codes). Add a context type here
#: (appended: its code is its index). Read at call time everywhere, never copied.
CONTEXTS: list[ContextSpec] = [
    ContextSpec(0, "none", None, display="none", colour=(200, 200, 200)),
    ContextSpec(1, "global", GlobalContextBlock, display="global", colour=(66, 133, 244)),
    ContextSpec(2, "local", LocalContextBlock, display="local", colour=(52, 168, 83)),
    ContextSpec(3, "tlabel", LabelContextBlock, "target", display="t-label", colour=(251, 140, 0)),
    ContextSpec(4, "slabel", LabelContextBlock, "source", False, display="s-label", colour=(156, 39, 176)),
]


def context_spec(context: int | str) -> ContextSpec:
    """The row of :data:`CONTEXTS` for a genotype code or a context name; a
    :class:`~atrc_exp.config.ConfigError` listing the known ones otherwise."""
    for code, spec in enumerate(CONTEXTS):
        if spec.code != code:
            raise RuntimeError(f"CONTEXTS[{code}] has code {spec.code}: rows must be in code order")
        if context == spec.code or context == spec.name:
            return spec
    known = ", ".join(f"{s.code} {s.name}" for s in CONTEXTS)
    raise ConfigError(f"unknown context {context!r}; the context types are: {known}")


def make_cp_block(
    context: int | str, in_channels: int, out_channels: int, last_affine: bool = True, kernel_size: int = 9
) -> _CPBlock:
    """The CP block of a context type (genotype code or name, see :data:`CONTEXTS`)."""
    spec = context_spec(context)
    if spec.block is None:
        raise ValueError(f"context {spec.name!r} has no CP block (it is no connection)")
    return spec.block(
        in_channels, out_channels, last_affine, reads_aux=spec.reads_aux, kernel_size=kernel_size
    )


def ignore_mask(
    image: torch.Tensor, size: tuple[int, int], ignore_value: float = IGNORE_VALUE
) -> torch.Tensor:
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


# -- many CP blocks at once --------------------------------------------------------------------------


class CPOp(NamedTuple):
    """One CP block to evaluate for ``target`` ← ``source`` (see :func:`evaluate_cp_blocks`)."""

    target: str
    source: str
    block: _CPBlock


def _input_id(op: CPOp) -> tuple[str, str | None]:
    """Which tensor the keys and values of ``op`` read: (source, task whose aux map it reads)."""
    return op.source, aux_of_pair(op.block.reads_aux, op.target, op.source)


def key_inputs(
    ops: Sequence[CPOp],
    feats: Mapping[str, torch.Tensor],
    probs: Mapping[str, torch.Tensor],
    cache: dict | None = None,
) -> dict[tuple[str, str | None], torch.Tensor]:
    """What the keys and values of ``ops`` read, each computed once (into ``cache``): the source
    features, or a label context P_x·F_sᵀ per (source s, aux task x)."""
    cache = {} if cache is None else cache
    for op in ops:
        key = _input_id(op)
        if key not in cache:
            s, x = key
            if x is not None and x not in probs:
                raise ValueError(f"{op.target}<-{op.source}: the context needs the {x} task's aux prediction")
            cache[key] = op.block.key_input(feats[s], None if x is None else probs[x])
    return cache


def _grouped(ops: Sequence[CPOp], key) -> dict:
    """Indices of ``ops`` by ``key(op)``; within a group the blocks whose second projection layers
    have a ReLU first (the global blocks' have none): one ReLU for the run of them."""
    groups: dict = {}
    for i, op in enumerate(ops):
        groups.setdefault(key(op), []).append(i)
    return {k: sorted(idx, key=lambda i: not ops[i].block.key_project[1].relu) for k, idx in groups.items()}


def _two_stage(x: torch.Tensor, projections: Sequence[nn.Sequential]) -> list[torch.Tensor]:
    """``[p(x) for p in projections]`` for projections [ConvBN(ReLU), ConvBN(ReLU), rest...] that
    all read ``x``: the first layers as one convolution and batch norm, the second layers as one
    batched product on their own channel blocks, the rest (a Softplus) per projection."""
    first = conv_bn_relu_group(x, [p[0] for p in projections])
    second = conv_bn_act_blockwise(first, [p[1] for p in projections])
    out = []
    for p, y in zip(projections, second):
        for layer in p[2:]:
            y = layer(y)
        out.append(y)
    return out


def evaluate_cp_blocks(
    ops: Sequence[CPOp],
    feats: Mapping[str, torch.Tensor],
    probs: Mapping[str, torch.Tensor] | None = None,
    inputs: dict | None = None,
) -> list[torch.Tensor]:
    """``[op.block(feats[op.target], feats[op.source], probs...) for op in ops]`` with the
    projections that read the same tensor batched:

    * the query projections of all blocks of one target (:func:`_two_stage`);
    * the key and value projections of all blocks that read the same key input (the source's
      features, or one label context): first key layers and values as one convolution and batch
      norm, then the second key layers (:func:`_two_stage`'s second step);

    then every block's ``attend``. ``inputs``: a cache of :func:`key_inputs` (the search computes
    the label contexts once for all its rows). Same numbers as block by block up to float
    rounding, running statistics updated once per layer.
    """
    inputs = key_inputs(ops, feats, probs or {}, {} if inputs is None else inputs)
    n = len(ops)
    query: list = [None] * n
    key: list = [None] * n
    value: list = [None] * n
    for t, idx in _grouped(ops, lambda op: op.target).items():
        for i, q in zip(idx, _two_stage(feats[t], [ops[i].block.query_project for i in idx])):
            query[i] = q
    for input_id, idx in _grouped(ops, _input_id).items():
        blocks = [ops[i].block for i in idx]
        d = [b.out_channels for b in blocks]
        kv = conv_bn_relu_group(
            inputs[input_id], [b.key_project[0] for b in blocks] + [b.value_project for b in blocks]
        )
        k1, v = kv.split([sum(d), sum(d)], dim=1)
        keys = conv_bn_act_blockwise(k1, [b.key_project[1] for b in blocks])
        for i, b, k, vi in zip(idx, blocks, keys, v.split(d, dim=1)):
            for layer in b.key_project[2:]:
                k = layer(k)
            key[i], value[i] = k, vi
    return [op.block.attend(q, k, v) for op, q, k, v in zip(ops, query, key, value)]
