"""The relational-context head of ATRC (distillation network with a fixed genotype).

Layout (C_in = concatenated backbone channels, C = C_in // 4, d = C // 2), module names = the
original's state-dict keys under ``head.``:

* ``bottleneck.<t>``: ConvBNReLU 3×3 C_in → C per task;
* ``aux_conv.<t>`` (ConvBNReLU 1×1 C_in → C_in) and ``aux_logits.<t>`` (1×1 conv with bias) on the
  *detached* backbone features, only for tasks whose auxiliary prediction a context reads
  (:func:`aux_tasks_of`: t for a t-label pair (t, ·), s for an s-label pair (·, s); every task
  in search);
* ``atrc_module``: :class:`ATRCModule` (``cp_blocks.<t>.<s>``, ``out_proj.<t>``, ``bottleneck.<t>``);
* ``final_logits.<t>``: 1×1 conv with bias to the task's output channels.

``forward(x, image=None) -> {"final": {t: ...}, "aux": {t: ...}}`` at feature resolution (the
model upsamples to the input size); ``aux`` only when there are aux heads. ``image`` (the network
input) marks pixels equal to 255 that the label context ignores.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .context_blocks import (
    CPOp,
    aux_of_pair,
    context_spec,
    evaluate_cp_blocks,
    ignore_mask,
    key_inputs,
    make_cp_block,
    spatial_softmax,
)
from .layers import (
    ConvBNReLU,
    conv_bn_act_blockwise,
    conv_bn_relu_group,
    frozen_bn_stats,
    per_task_layers,
    pointwise_runs,
)
from .search_block import SearchCPBlock

__all__ = ["ATRCModule", "RelationalContextHead", "aux_tasks_of", "uniform_genotype"]


Genotype = Mapping[str, Mapping[str, int]]


def uniform_genotype(tasks: Sequence[str], context: str | int) -> dict[str, dict[str, int]]:
    """Every (target, source) pair, including t = s, uses ``context``."""
    code = context_spec(context).code
    return {t: {s: code for s in tasks} for t in tasks}


def aux_tasks_of(genotype: Genotype, tasks: Sequence[str]) -> list[str]:
    """Tasks that need an auxiliary head: the task whose auxiliary prediction the context of some
    pair reads (t for a t-label pair (t, s), s for an s-label one; ``reads_aux`` of
    :data:`~atrc_exp.models.context_blocks.CONTEXTS`); in ``tasks`` order."""
    need = set()
    for t in tasks:
        for s in tasks:
            task = aux_of_pair(context_spec(int(genotype[t][s])).reads_aux, t, s)
            if task is not None:
                need.add(task)
    return [t for t in tasks if t in need]


class ATRCModule(nn.Module):
    """The CP blocks of every (target, source) pair, then per target the distillation of their
    outputs: concat → ``out_proj`` (ConvBN 1×1, BN weight and bias zero at init) → concat
    [features_t, projection] → ``bottleneck`` ConvBNReLU 1×1 (2C → C) → Dropout2d
    (``bottleneck.<t>`` = ``Sequential(ConvBNReLU, Dropout2d)``, the original's layout). A target
    without sources: ConvBNReLU 1×1 (C → C) → Dropout2d. In search every pair is a
    :class:`SearchCPBlock` (a mixture of all candidate contexts) and the bottleneck is a plain
    ConvBNReLU without dropout, as in the original.

    The CP blocks are evaluated together (:func:`evaluate_cp_blocks`: projections that read the
    same tensor batched), and the ``out_proj`` and bottleneck layers of targets with equal shapes
    as one batched product each; the same numbers as block by block, up to float rounding.

    ``recompute`` (default True, search only, ``mode.recompute``): while training, the CP blocks of
    each target run under activation checkpointing — their activations are recomputed in the
    backward instead of kept (batch-norm running statistics still updated once), so the search
    holds one target's candidate ops at a time instead of all pairs × 4 ops.
    """

    def __init__(
        self,
        tasks: Sequence[str],
        genotype: Genotype | None,
        channels: int,
        inter_channels: int | None = None,
        dropout: float = 0.05,
        kernel_size: int = 9,
        zero_init: bool = True,
    ):
        super().__init__()
        self.tasks = list(tasks)
        self.search = genotype is None
        self.recompute = True
        inter = channels // 2 if inter_channels is None else inter_channels
        self.cp_blocks = nn.ModuleDict()
        for t in self.tasks:
            row = nn.ModuleDict()
            for s in self.tasks:
                if genotype is None:  # search: every pair mixes all candidate ops
                    row[s] = SearchCPBlock(s == t, channels, inter, kernel_size=kernel_size)
                elif int(genotype[t][s]) != 0:
                    row[s] = make_cp_block(int(genotype[t][s]), channels, inter, kernel_size=kernel_size)
            self.cp_blocks[t] = row
        self.out_proj = nn.ModuleDict()
        self.bottleneck = nn.ModuleDict()
        for t in self.tasks:
            n = len(self.cp_blocks[t])
            if n > 0:
                proj = ConvBNReLU(inter * n, channels, 1, relu=False)
                if zero_init:
                    nn.init.zeros_(proj.bn.weight)
                    nn.init.zeros_(proj.bn.bias)
                self.out_proj[t] = proj
                layer = ConvBNReLU(2 * channels, channels, 1)
            else:
                layer = ConvBNReLU(channels, channels, 1)
            # the original's: Sequential(ConvBNReLU, Dropout2d); the search's, a plain ConvBNReLU
            self.bottleneck[t] = layer if self.search else nn.Sequential(layer, nn.Dropout2d(dropout))

    def forward(
        self, feats: Mapping[str, torch.Tensor], probs: Mapping[str, torch.Tensor] | None = None
    ) -> dict[str, torch.Tensor]:
        """``feats``: {task: B×C×H×W}; ``probs``: {task: B×K×HW} spatially normalised aux
        predictions (the tasks whose maps the label contexts read) → {task: B×C×H×W}."""
        probs = probs or {}
        contexts = self._search_contexts(feats, probs) if self.search else self._contexts(feats, probs)
        return self._distil(feats, contexts)

    def _contexts(self, feats, probs) -> dict[str, list[torch.Tensor]]:
        """{t: [CP block output (B×d×H×W) of every source of t with a context]}."""
        ops = [CPOp(t, s, blk) for t in self.tasks for s, blk in self.cp_blocks[t].items()]
        ys = iter(evaluate_cp_blocks(ops, feats, probs))
        return {t: [next(ys) for _ in self.cp_blocks[t]] for t in self.tasks}

    def _search_contexts(self, feats, probs) -> dict[str, list[torch.Tensor]]:
        """{t: [mixture of every source of t]}: row by row (target by target), each pair's op
        weights drawn before its row runs; a row under activation checkpointing (``recompute``)."""
        out = {}
        inputs: dict = {}  # the label contexts, shared by the rows (outside any checkpoint: small)
        for t in self.tasks:
            plan = []  # per pair: (block, weights, active op indices)
            ops = []
            for s, blk in self.cp_blocks[t].items():
                plan.append((blk, blk.op_weights(), blk.active_ops()))
                ops += [CPOp(t, s, blk.op_list[i]) for i in plan[-1][2]]
            key_inputs(ops, feats, probs, inputs)

            def row(*_, ops=ops, plan=plan, t=t):
                ys = iter(evaluate_cp_blocks(ops, feats, probs, inputs))
                return tuple(
                    blk.mix(w, active, [next(ys) for _ in active], feats[t]) for blk, w, active in plan
                )

            if ops and self.recompute and self.training and torch.is_grad_enabled():
                calls = [0]

                def row_once(*args, row=row, calls=calls):
                    calls[0] += 1
                    if calls[0] == 1:
                        return row(*args)
                    with frozen_bn_stats():  # the recomputation in the backward
                        return row(*args)

                out[t] = list(checkpoint(row_once, feats[t], use_reentrant=False, preserve_rng_state=False))
            else:
                out[t] = list(row())
        return out

    def _distil(self, feats, contexts: Mapping[str, list[torch.Tensor]]) -> dict[str, torch.Tensor]:
        """Per target: ``bottleneck(cat[feats_t, out_proj(cat(contexts_t))])`` (``bottleneck(feats_t)``
        without contexts). Targets whose layers have equal shapes share one batched product per
        layer (:func:`conv_bn_act_blockwise`); the dropouts run per target in task order."""
        groups: dict[tuple[int, int], list[str]] = {}
        for t in self.tasks:
            if contexts[t]:
                layers = (self.out_proj[t], self._bottleneck_layer(t))
                groups.setdefault(tuple(m.conv.in_channels for m in layers), []).append(t)
        distilled: dict[str, torch.Tensor] = {}
        for ts in groups.values():
            projected = conv_bn_act_blockwise(
                torch.cat([c for t in ts for c in contexts[t]], dim=1), [self.out_proj[t] for t in ts]
            )
            x = torch.cat([z for t, p in zip(ts, projected) for z in (feats[t], p)], dim=1)
            distilled.update(zip(ts, conv_bn_act_blockwise(x, [self._bottleneck_layer(t) for t in ts])))
        return {
            t: self._dropout(t, distilled[t]) if t in distilled else self.bottleneck[t](feats[t])
            for t in self.tasks
        }

    def _bottleneck_layer(self, t: str) -> ConvBNReLU:
        """The ConvBNReLU of target ``t``'s bottleneck (without its dropout)."""
        b = self.bottleneck[t]
        return b[0] if isinstance(b, nn.Sequential) else b

    def _dropout(self, t: str, x: torch.Tensor) -> torch.Tensor:
        """Target ``t``'s bottleneck dropout applied to ``x`` (none in search)."""
        b = self.bottleneck[t]
        return b[1](x) if isinstance(b, nn.Sequential) else x


class RelationalContextHead(nn.Module):
    """ATRC's relational-context head for a fixed ``genotype`` ({target: {source: 0..4}}).

    Args:
        in_channels: C_in, channels of the concatenated backbone features.
        tasks: task names (order of the outputs and of the sources within each target).
        genotype: context code of every (target, source) pair (0 none, 1 global, 2 local,
            3 t-label, 4 s-label: the codes of :data:`~atrc_exp.models.context_blocks.CONTEXTS`).
        out_channels: final output channels per task.
        aux_channels: aux output channels per task (needed for tasks with an aux head).
        dropout: Dropout2d rate after the ATRC bottleneck.
        kernel_size: window of the local context.
    """

    def __init__(
        self,
        in_channels: int,
        tasks: Sequence[str],
        genotype: Genotype,
        out_channels: Mapping[str, int],
        aux_channels: Mapping[str, int],
        dropout: float = 0.05,
        kernel_size: int = 9,
    ):
        super().__init__()
        self.tasks = list(tasks)
        self.search = genotype is None
        if self.search:  # every task has an aux head in search
            self._genotype = None
            self.aux_tasks = list(self.tasks)
        else:
            self._genotype = {t: {s: int(genotype[t][s]) for s in self.tasks} for t in self.tasks}
            self.aux_tasks = aux_tasks_of(self._genotype, self.tasks)
        c = in_channels // 4
        self.in_channels = in_channels
        self.channels = c
        self.bottleneck = nn.ModuleDict({t: ConvBNReLU(in_channels, c, 3) for t in self.tasks})
        if self.aux_tasks:
            self.aux_conv = nn.ModuleDict(
                {t: ConvBNReLU(in_channels, in_channels, 1) for t in self.aux_tasks}
            )
            self.aux_logits = nn.ModuleDict(
                {t: nn.Conv2d(in_channels, aux_channels[t], 1, bias=True) for t in self.aux_tasks}
            )
        self.atrc_module = ATRCModule(self.tasks, self._genotype, c, c // 2, dropout, kernel_size)
        self.final_logits = nn.ModuleDict(
            {t: nn.Conv2d(c, out_channels[t], 1, bias=True) for t in self.tasks}
        )
        self.init_weights()

    @property
    def genotype(self) -> dict[str, dict[str, int]]:
        """The fixed genotype, or in search the current discrete choice of every pair."""
        if not self.search:
            return self._genotype
        blocks = self.atrc_module.cp_blocks
        return {t: {s: blocks[t][s].choice() for s in self.tasks} for t in self.tasks}

    def init_weights(self) -> None:
        """Every conv whose name contains ``logits``: normal(0, 0.01), bias 0 (CP blocks initialise
        themselves Xavier-uniform; ``out_proj`` BN starts at zero)."""
        for name, m in self.named_modules():
            if "logits" in name and isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, mean=0.0, std=0.01)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(
        self, x: torch.Tensor, image: torch.Tensor | None = None
    ) -> dict[str, dict[str, torch.Tensor]]:
        """``x``: B×C_in×h×w concatenated backbone features; ``image``: the network input (its pixels
        equal to 255 are left out of the label contexts) → ``{"final": {t: B×C_t×h×w}, "aux": {t: B×K_t×h×w}}`` (``aux`` with aux heads)."""
        feats = per_task_layers(self.bottleneck, self.tasks, x)
        aux: dict[str, torch.Tensor] = {}
        probs: dict[str, torch.Tensor] = {}
        if self.aux_tasks:
            # the aux heads read detached features: one convolution for all, their logits batched
            hidden = conv_bn_relu_group(x.detach(), [self.aux_conv[t] for t in self.aux_tasks])
            logits = pointwise_runs(hidden, [self.aux_logits[t] for t in self.aux_tasks])
            # the pixels the label contexts ignore: once for every aux map (all of one size)
            mask = None if image is None else ignore_mask(image, tuple(logits[0].shape[-2:]))
            for t, a in zip(self.aux_tasks, logits):
                aux[t] = a
                probs[t] = spatial_softmax(a, mask=mask)
        out = self.atrc_module(feats, probs)
        result = {"final": {t: self.final_logits[t](out[t]) for t in self.tasks}}
        if aux:
            result["aux"] = aux
        return result
