"""Small building blocks shared by heads and context blocks."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..ops import upsample_add as _upsample_add
from ..ops.batch_norm import batch_norm_act, batch_norm_act_batch_stats, constant_vector


class ConvBNAct(nn.Sequential):
    """``Sequential(conv, bn[, ReLU])`` (keys ``0``, ``1``, ``2``) whose batch norm and ReLU run as
    one op (:func:`bn_act`: the fused CPU kernel in training, else the modules' own computation).
    Any other content runs as a plain ``nn.Sequential``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = len(self)
        if 2 <= n <= 3 and isinstance(self[1], nn.modules.batchnorm._BatchNorm):
            if n == 2 or (
                isinstance(self[2], nn.ReLU) and not (self[2]._forward_hooks or self[2]._forward_pre_hooks)
            ):
                return bn_act(self[1], self[0](x), relu=n == 3)
        return super().forward(x)


class ConvBNReLU(nn.Module):
    """Conv (no bias) → BatchNorm → ReLU; ``relu=False`` gives ConvBN. The original
    implementation's layer: attributes ``conv`` and ``bn`` (state-dict keys ``conv.weight``,
    ``bn.weight``, ``bn.running_mean``, ...); batch norm and ReLU run as one op (:func:`bn_act`)."""

    def __init__(
        self,
        c_in: int,
        c_out: int,
        kernel_size: int = 1,
        relu: bool = True,
        affine: bool = True,
        stride: int = 1,
    ):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, kernel_size, stride=stride, padding=kernel_size // 2, bias=False)
        self.bn = nn.BatchNorm2d(c_out, affine=affine)
        self.relu = bool(relu)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return bn_act(self.bn, self.conv(x), relu=self.relu)

    def extra_repr(self) -> str:
        return f"relu={self.relu}"


def resize_to(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize (``align_corners=False``) to ``size``; identity when already that size."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


def resize_prediction(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """:func:`resize_to` for a network output. A map with more than 4 channels (class logits) is
    resized in channels-last layout and returned in it: on the CPU that is 4-6× faster forward
    and backward than NCHW for these large upsamplings, and the cross-entropy reads it as
    (pixels × classes) rows without a copy (:func:`atrc_exp.losses.cross_entropy_loss`). Same
    values (float rounding aside); ``.contiguous()`` gives NCHW back where a caller needs it."""
    if x.dim() == 4 and x.shape[1] > 4 and tuple(x.shape[-2:]) != tuple(size):
        x = x.contiguous(memory_format=torch.channels_last)
    return resize_to(x, size)


def concat_features(features: list[torch.Tensor]) -> torch.Tensor:
    """Upsample every map to the first one's size and concatenate along channels."""
    size = tuple(features[0].shape[-2:])
    return torch.cat([resize_to(f, size) for f in features], dim=1)


# -- grouped evaluation of layers that read the same input -----------------------------------------
#
# Several 1×1 ConvBNReLU layers applied to the *same* tensor (the query projections of all CP blocks
# of one target, the aux heads, ...) are evaluated as one convolution with the weights concatenated
# at call time (``torch.cat`` of the parameters: gradients flow back into each layer's own weight)
# and one batch norm over the concatenated channels. Batch norm normalises every channel on its
# own, so this is the same computation as layer by layer (float rounding aside); the running
# statistics are updated in each layer's own buffers, exactly once, as ``nn.BatchNorm2d`` does.

_stats_frozen = 0


@contextlib.contextmanager
def frozen_bn_stats():
    """Within this context the grouped batch norms below use batch statistics in training mode
    as usual but leave running statistics and ``num_batches_tracked`` alone (used when a forward
    is recomputed for the backward, so a step updates them once)."""
    global _stats_frozen
    _stats_frozen += 1
    try:
        yield
    finally:
        _stats_frozen -= 1


def bn_stats_frozen() -> bool:
    return _stats_frozen > 0


def _plain_bn(bn: nn.Module) -> bool:
    """A plain ``nn.BatchNorm2d`` without forward hooks (a module with hooks runs its own forward,
    so the hooks fire)."""
    return type(bn) is nn.BatchNorm2d and not bn._forward_hooks and not bn._forward_pre_hooks


def _bn_module(x: torch.Tensor, bn: nn.Module) -> torch.Tensor:
    """``bn(x)`` through the module (e.g. SyncBatchNorm), honouring :func:`frozen_bn_stats`."""
    if not (bn_stats_frozen() and bn.training and bn.track_running_stats):
        return bn(x)
    momentum = bn.momentum
    bn.momentum = 0.0  # running = 1·running + 0·batch: unchanged
    try:
        y = bn(x)
    finally:
        bn.momentum = momentum
        bn.num_batches_tracked.sub_(1)
    return y


def _bn_compatible(bns: Sequence[nn.Module]) -> bool:
    b0 = bns[0]
    return all(
        _plain_bn(b)
        and b.training == b0.training
        and b.track_running_stats == b0.track_running_stats
        and b.eps == b0.eps
        and b.momentum == b0.momentum
        for b in bns
    ) and (len(bns) == 1 or b0.momentum is not None or not (b0.training and b0.track_running_stats))


def batch_norm_group(x: torch.Tensor, bns: Sequence[nn.Module], relu: bool = False) -> torch.Tensor:
    """Batch norm of ``x`` whose channels are those of ``bns`` concatenated (in order), then a ReLU
    if ``relu``: the same as ``torch.cat([bn(part) for bn, part in zip(bns, x.split(...))], 1)``,
    running statistics updated in each module's buffers. Plain ``nn.BatchNorm2d`` modules run
    through :func:`~atrc_exp.ops.batch_norm_act` (BN + ReLU as one op, a fused kernel on the CPU)."""
    if len(bns) == 1 and not _plain_bn(bns[0]):
        y = _bn_module(x, bns[0])
        return F.relu(y, inplace=True) if relu else y
    if not _bn_compatible(bns):
        parts = x.split([b.num_features for b in bns], dim=1)
        y = torch.cat([_bn_module(p, b) for p, b in zip(parts, bns)], dim=1)
        return F.relu(y, inplace=True) if relu else y
    b0 = bns[0]
    tracked = b0.track_running_stats
    frozen = bn_stats_frozen()
    update = b0.training and tracked and not frozen
    use_batch_stats = b0.training or not tracked
    factor = 0.0
    if update:
        torch._foreach_add_([b.num_batches_tracked for b in bns], 1)
        factor = b0.momentum if b0.momentum is not None else 1.0 / float(b0.num_batches_tracked)
    if len(bns) == 1:
        weight, bias = b0.weight, b0.bias
        mean, var = (b0.running_mean, b0.running_var) if tracked else (None, None)
        if frozen and b0.training and tracked:
            # update a throw-away copy: the same op as in the forward, so that a checkpoint's
            # recomputation saves the same tensors for the backward
            mean, var = mean.clone(), var.clone()
    else:
        sizes = [b.num_features for b in bns]
        if any(b.affine for b in bns):
            weight = torch.cat(
                [b.weight if b.affine else constant_vector(1.0, b.num_features, x) for b in bns]
            )
            bias = torch.cat([b.bias if b.affine else constant_vector(0.0, b.num_features, x) for b in bns])
        else:
            weight = bias = None
        if update:  # the kernel's batch statistics into every module's buffers, a few ops in all
            got = batch_norm_act_batch_stats(x, weight, bias, b0.eps, relu)
            if got is not None:
                y, bmean, bvar = got
                with torch.no_grad():
                    for stat, buffers in (
                        (bmean, [b.running_mean for b in bns]),
                        (bvar, [b.running_var for b in bns]),
                    ):
                        torch._foreach_mul_(buffers, 1.0 - factor)
                        torch._foreach_add_(
                            buffers, [s.to(buffers[0].dtype) for s in stat.split(sizes)], alpha=factor
                        )
                return y
        if tracked:
            mean = torch.cat([b.running_mean for b in bns])
            var = torch.cat([b.running_var for b in bns])
        else:
            mean = var = None
    y = batch_norm_act(x, mean, var, weight, bias, use_batch_stats, factor, b0.eps, relu)
    if update and len(bns) > 1:  # back into every module's buffers: one multi-tensor copy each
        with torch.no_grad():
            torch._foreach_copy_([b.running_mean for b in bns], list(mean.split(sizes)))
            torch._foreach_copy_([b.running_var for b in bns], list(var.split(sizes)))
    return y


def bn_act(bn: nn.Module, x: torch.Tensor, relu: bool = False) -> torch.Tensor:
    """``relu(bn(x))`` (``bn(x)`` without ``relu``) as :func:`batch_norm_group` of one module."""
    return batch_norm_group(x, [bn], relu)


def _geometry(conv: nn.Conv2d) -> tuple:
    return (conv.in_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation, conv.padding_mode)


def conv_group(x: torch.Tensor, convs: Sequence[nn.Conv2d]) -> torch.Tensor:
    """The convolutions ``convs`` of the same input (same kernel, stride, padding; no groups) as
    one convolution: outputs concatenated along channels, in order."""
    if len(convs) == 1:
        return convs[0](x)
    g = _geometry(convs[0])
    if any(c.groups != 1 or _geometry(c) != g for c in convs) or g[-1] != "zeros":
        return torch.cat([c(x) for c in convs], dim=1)
    weight = torch.cat([c.weight for c in convs])
    if any(c.bias is not None for c in convs):
        bias = torch.cat([c.bias if c.bias is not None else x.new_zeros(c.out_channels) for c in convs])
    else:
        bias = None
    c0 = convs[0]
    return F.conv2d(x, weight, bias, c0.stride, c0.padding, c0.dilation)


def is_pointwise(conv: nn.Conv2d) -> bool:
    """A plain 1×1 convolution: kernel 1×1, stride 1, no padding or dilation, one group."""
    return (
        conv.kernel_size == (1, 1)
        and conv.stride == (1, 1)
        and conv.padding == (0, 0)
        and conv.dilation == (1, 1)
        and conv.groups == 1
    )


def _shape(conv: nn.Conv2d) -> tuple[int, int, bool]:
    return conv.in_channels, conv.out_channels, conv.bias is not None


def pointwise_blockwise(x: torch.Tensor, convs: Sequence[nn.Conv2d]) -> torch.Tensor:
    """``torch.cat([conv(part) for conv, part in zip(convs, x.split(c_in, 1))], 1)`` for 1×1
    convolutions of equal shape (c_in → c_out, all with or all without bias), each reading its
    own block of ``c_in`` channels of ``x`` (B×(n·c_in)×H×W): one batched matrix product."""
    c0 = convs[0]
    n, cin, cout = len(convs), c0.in_channels, c0.out_channels
    B, C, H, W = x.shape
    same = all(is_pointwise(c) and _shape(c) == _shape(c0) for c in convs)
    if not same or C != n * cin:
        return torch.cat([c(p) for c, p in zip(convs, x.split(cin, dim=1))], dim=1)
    weight = torch.stack([c.weight.view(cout, cin) for c in convs])  # n×c_out×c_in
    y = torch.matmul(weight, x.reshape(B, n, cin, H * W))  # B×n×c_out×HW
    if c0.bias is not None:
        y = y + torch.stack([c.bias for c in convs]).unsqueeze(-1)
    return y.view(B, n * cout, H, W)


def pointwise_runs(x: torch.Tensor, convs: Sequence[nn.Conv2d]) -> list[torch.Tensor]:
    """``[conv(part) for conv, part in zip(convs, x.split([c_in...], 1))]``, each convolution on
    its own consecutive channel block of ``x``: runs of consecutive convolutions of equal shape
    as one :func:`pointwise_blockwise` product each (a channel slice of ``x`` reshaped into blocks
    is a view: no copy, where separate convolutions copy their slice); a run of one is its own
    convolution."""
    runs: list[tuple[int, int]] = []  # [i, j): consecutive convolutions of equal shape
    i = 0
    while i < len(convs):
        j = i + 1
        while j < len(convs) and _shape(convs[j]) == _shape(convs[i]):
            j += 1
        runs.append((i, j))
        i = j
    # one split (its backward concatenates the parts' gradients once; channel slices would each
    # zero-fill a gradient of x's full size and add them up)
    sizes = [(j - i) * convs[i].in_channels for i, j in runs]
    rest = x.shape[1] - sum(sizes)
    parts = x.split(sizes + [rest] if rest > 0 else sizes, dim=1)
    out: list[torch.Tensor] = []
    for (i, j), part in zip(runs, parts):
        if j - i == 1:
            out.append(convs[i](part))
        else:
            out += list(pointwise_blockwise(part, convs[i:j]).split(convs[i].out_channels, dim=1))
    return out


def pointwise_conv_of_concat(branches: Sequence[torch.Tensor], weight: torch.Tensor) -> torch.Tensor:
    """``F.conv2d(concat_features(branches), weight)`` for a 1×1 ``weight`` (C_out × ΣCᵢ × 1 × 1,
    no bias), computed at the branches' own resolutions: ``conv(b₀, W₀) + Σᵢ resize(conv(bᵢ, Wᵢ))``
    with Wᵢ the columns of ``weight`` that read branch i. Bilinear resizing mixes pixels and a 1×1
    convolution mixes channels, so they commute: same numbers up to float rounding, with HRNet18's
    branches (18, 36, 72, 144 channels at 1, 1/2, 1/4, 1/8 resolution) 8× fewer multiply-adds.
    The first branch's product and the resize-and-add are
    :func:`~atrc_exp.ops.upsample_add.conv1x1_upsample_add` (one C++ kernel on the CPU)."""
    ws = weight.split([b.shape[1] for b in branches], dim=1)
    rest = [F.conv2d(b, w) for b, w in zip(branches[1:], ws[1:])]
    return _upsample_add.conv1x1_upsample_add(branches[0], ws[0], rest)


def multiscale_applies(
    x: torch.Tensor, branches: Sequence[torch.Tensor] | None, convs: Sequence[nn.Conv2d]
) -> bool:
    """Whether ``conv_group(x, convs)`` may run as :func:`pointwise_conv_of_concat` of ``branches``:
    ``x`` is ``concat_features(branches)`` by shape (channels add up, the first branch has ``x``'s
    size), the convolutions are 1×1 without bias, and the resize-and-add kernel applies and is
    built (a float32/float64 CPU tensor; with PyTorch's resize the convolution of ``x`` is faster)."""
    if branches is None or len(branches) < 2 or x.dim() != 4:
        return False
    if any(b.dim() != 4 or b.shape[0] != x.shape[0] for b in branches):
        return False
    if sum(b.shape[1] for b in branches) != x.shape[1] or branches[0].shape[-2:] != x.shape[-2:]:
        return False
    if not all(is_pointwise(c) and c.bias is None and c.padding_mode == "zeros" for c in convs):
        return False
    return _upsample_add.kernel_available(x, [])


def conv_bn_relu_group(
    x: torch.Tensor, layers: Sequence[ConvBNReLU], branches: Sequence[torch.Tensor] | None = None
) -> torch.Tensor:
    """``torch.cat([layer(x) for layer in layers], 1)`` for :class:`ConvBNReLU` layers reading the
    same ``x``, as one convolution and one batch norm (see :func:`batch_norm_group`). The layers
    must agree on having a ReLU or not. ``branches``: the multi-scale maps ``x`` was concatenated
    from (:func:`concat_features`); where :func:`multiscale_applies`, the convolution runs on them
    (:func:`pointwise_conv_of_concat`)."""
    relu = [m.relu for m in layers]
    if any(r != relu[0] for r in relu):
        raise ValueError("conv_bn_relu_group: layers mix ConvBNReLU and ConvBN")
    convs = [m.conv for m in layers]
    if multiscale_applies(x, branches, convs):
        weight = convs[0].weight if len(convs) == 1 else torch.cat([c.weight for c in convs])
        y = pointwise_conv_of_concat(branches, weight)
    else:
        y = conv_group(x, convs)
    return batch_norm_group(y, [m.bn for m in layers], relu[0])


def per_task_layers(
    layers: nn.ModuleDict, tasks: Sequence[str], x: torch.Tensor, fused: bool = True
) -> dict[str, torch.Tensor]:
    """``{t: layers[t](x)}`` for :class:`ConvBNReLU` layers that all read ``x`` (the task
    bottlenecks of a head, the aux heads); with ``fused``, one convolution and one batch norm
    (:func:`conv_bn_relu_group`): same numbers, float rounding aside, running statistics updated in
    each layer's own buffers."""
    if not fused or len(tasks) < 2:
        return {t: layers[t](x) for t in tasks}
    group = [layers[t] for t in tasks]
    y = conv_bn_relu_group(x, group)
    return dict(zip(tasks, y.split([m.bn.num_features for m in group], dim=1)))


def conv_bn_act_blockwise(x: torch.Tensor, layers: Sequence[ConvBNReLU]) -> list[torch.Tensor]:
    """``[layer(part) for layer, part in zip(layers, x.split(c_in, 1))]`` for 1×1 ConvBN[ReLU]
    layers of equal shape, each reading its own channel block of ``x``: one batched matrix
    product (:func:`pointwise_blockwise`), one batch norm, the ReLUs where the layers have them."""
    relu = [m.relu for m in layers]
    sizes = [m.bn.num_features for m in layers]
    n_relu = sum(relu)
    y = batch_norm_group(
        pointwise_blockwise(x, [m.conv for m in layers]), [m.bn for m in layers], n_relu == len(relu)
    )
    if n_relu == len(relu) or n_relu == 0:
        return list(y.split(sizes, dim=1))
    if relu[:n_relu] == [True] * n_relu:  # ReLU layers first: one in-place ReLU
        y[:, : sum(sizes[:n_relu])].relu_()
        return list(y.split(sizes, dim=1))
    parts = y.split(sizes, dim=1)
    return [F.relu(p) if r else p for p, r in zip(parts, relu)]
