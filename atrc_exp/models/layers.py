"""Small building blocks shared by heads and context blocks."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


class ConvBNReLU(nn.Module):
    """Conv (no bias) → BatchNorm → ReLU; ``relu=False`` gives ConvBN. The original
    implementation's layer: attributes ``conv`` and ``bn`` (state-dict keys ``conv.weight``,
    ``bn.weight``, ``bn.running_mean``, ...). The batch norm honours :func:`frozen_bn_stats` (the
    search's recomputation), see :func:`bn_act`."""

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
    running statistics updated in each module's buffers (once, or not at all under
    :func:`frozen_bn_stats`)."""
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
        if tracked:
            mean = torch.cat([b.running_mean for b in bns])
            var = torch.cat([b.running_var for b in bns])
        else:
            mean = var = None
    y = F.batch_norm(x, mean, var, weight, bias, use_batch_stats, factor, b0.eps)
    if relu:
        y = F.relu(y, inplace=True)
    if update and len(bns) > 1:  # back into every module's buffers: one multi-tensor copy each
        with torch.no_grad():
            torch._foreach_copy_([b.running_mean for b in bns], list(mean.split(sizes)))
            torch._foreach_copy_([b.running_var for b in bns], list(var.split(sizes)))
    return y


def bn_act(bn: nn.Module, x: torch.Tensor, relu: bool = False) -> torch.Tensor:
    """``relu(bn(x))`` (``bn(x)`` without ``relu``) as :func:`batch_norm_group` of one module."""
    return batch_norm_group(x, [bn], relu)


_CONSTANTS: dict[tuple, torch.Tensor] = {}


def constant_vector(value: float, n: int, like: torch.Tensor) -> torch.Tensor:
    """A length-``n`` vector of ``value`` with ``like``'s dtype and device, made once and shared
    (read it, never write it): the weight or bias of a non-affine batch norm grouped with affine
    ones, without an allocation per call; a fresh one while ``torch.compile`` traces."""
    if torch.compiler.is_compiling():
        return like.new_full((n,), value)
    key = (value, n, like.dtype, like.device)
    t = _CONSTANTS.get(key)
    if t is None:
        with torch.inference_mode(False):  # usable with autograd even if first made in inference
            t = _CONSTANTS[key] = like.new_full((n,), value)
    return t


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


def conv_bn_relu_group(x: torch.Tensor, layers: Sequence[ConvBNReLU]) -> torch.Tensor:
    """``torch.cat([layer(x) for layer in layers], 1)`` for :class:`ConvBNReLU` layers reading the
    same ``x``, as one convolution and one batch norm (see :func:`batch_norm_group`). The layers
    must agree on having a ReLU or not."""
    relu = [m.relu for m in layers]
    if any(r != relu[0] for r in relu):
        raise ValueError("conv_bn_relu_group: layers mix ConvBNReLU and ConvBN")
    y = conv_group(x, [m.conv for m in layers])
    return batch_norm_group(y, [m.bn for m in layers], relu[0])


def per_task_layers(layers: nn.ModuleDict, tasks: Sequence[str], x: torch.Tensor) -> dict[str, torch.Tensor]:
    """``{t: layers[t](x)}`` for :class:`ConvBNReLU` layers that all read ``x`` (the task
    bottlenecks of a head), as one convolution and one batch norm (:func:`conv_bn_relu_group`):
    running statistics updated in each layer's own buffers."""
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
