"""ATRC's context types: the context-propagation (CP) blocks and :data:`CONTEXTS`, their one table.

Every block maps ``(features_t, features_s)`` (B×C×h×w, C = the head's bottleneck width) to
B×d×h×w (d = ``out_channels``, C // 2 in ATRC) in the method's three steps:
``source = key_input(features_s, prob)`` (the source features, or for a label context the class
summaries ``P·F_sᵀ``, B×C×K×1, under the spatially normalised auxiliary prediction ``prob``,
B×K×hw), then ``query_project(features_t)``, ``key_project(source)``, ``value_project(source)``,
then ``attend(query, key, value)``. A new context type is any module with that ``forward``.

Module names and parameter order are the original's, so the state-dict keys are too
(``query_project.0.conv.weight``, ``value_project.bn.running_mean``, ...). ``last_affine=False``
makes the value projection's BatchNorm non-affine (the search head). Conv weights are
Xavier-uniform initialised.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from .layers import ConvBNReLU

IGNORE_VALUE = 255


def aux_of_pair(reads_aux: str | None, target, source):
    """Of a pair's ``target`` and ``source`` (task names, or their aux predictions), the one whose
    auxiliary prediction a context with ``reads_aux`` (``None``, ``"target"``, ``"source"``) reads."""
    return {"target": target, "source": source}.get(reads_aux)


class _CPBlock(nn.Module):
    """A CP block: ``query_project`` and ``key_project`` (each a :meth:`projection`),
    ``value_project`` (ConvBNReLU 1×1), then :meth:`attend`, which subclasses define (and
    :meth:`key_input` when the keys read something other than the source features). ``reads_aux``:
    whose auxiliary prediction the block reads (``None``, ``"target"`` or ``"source"``), from its
    row of :data:`CONTEXTS`."""

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
        self.kernel_size = kernel_size
        self.query_project = self.projection()
        self.key_project = self.projection()
        self.value_project = ConvBNReLU(in_channels, out_channels, 1, affine=last_affine)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.xavier_uniform_(m.weight)

    def projection(self) -> nn.Module:
        """A query / key projection: [ConvBNReLU 1×1, ConvBNReLU 1×1] (C → d → d)."""
        d = self.out_channels
        return nn.Sequential(ConvBNReLU(self.in_channels, d, 1), ConvBNReLU(d, d, 1))

    def key_input(self, source_feats: torch.Tensor, prob: torch.Tensor | None = None) -> torch.Tensor:
        """What the key and value projections read: the source features (B×C×h×w)."""
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

    def projection(self) -> nn.Module:
        d = self.out_channels
        return nn.Sequential(
            ConvBNReLU(self.in_channels, d, 1), ConvBNReLU(d, d, 1, relu=False), nn.Softplus()
        )

    def attend(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        """Projected query (B×d×H×W), key and value (B×d×h×w) → B×d×H×W."""
        B, d, H, W = query.shape
        key, value, query = (t.reshape(B, d, -1) for t in (key, value, query))  # B×d×N
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

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.reads_aux not in ("target", "source"):
            raise ValueError(
                f"a label context reads the 'target' or 'source' aux map, got {self.reads_aux!r}"
            )

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


def ignore_mask(image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """B×1×(h·w) bool: the pixels of ``image`` (B×3×H×W, nearest-resized to ``size`` = (h, w))
    equal to 255 (``IGNORE_VALUE``) in any channel (always a mask, never a data-dependent shortcut: no
    host read, one compiled graph)."""
    h, w = size
    img = image if tuple(image.shape[-2:]) == (h, w) else F.interpolate(image, size=(h, w), mode="nearest")
    return (img == IGNORE_VALUE).any(dim=1).reshape(img.shape[0], 1, h * w)


def spatial_softmax(
    logits: torch.Tensor, image: torch.Tensor | None = None, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Per-class softmax over spatial positions of aux ``logits`` (B×K×h×w) → B×K×(h·w).

    Pixels where the input ``image`` (B×3×H×W, nearest-resized to h×w) equals 255 in any
    channel do not take part; an image whose pixels are all excluded gives zeros (not NaN, and
    finite gradients). ``mask`` (:func:`ignore_mask` of the image, computed once for several
    logits) replaces ``image``; with neither, no pixel is excluded.
    """
    B, K, h, w = logits.shape
    x = logits.reshape(B, K, h * w)
    if mask is None and image is not None:
        mask = ignore_mask(image, (h, w))
    if mask is None:
        return F.softmax(x, dim=2)
    empty = mask.all(dim=2, keepdim=True)  # B×1×1
    x = x.masked_fill(mask, float("-inf")).masked_fill(empty, 0.0)
    return F.softmax(x, dim=2).masked_fill(empty, 0.0)
