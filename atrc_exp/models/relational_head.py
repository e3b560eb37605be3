"""The relational-context head of ATRC (the distillation network of a genotype, or the search head).

Layout (C_in = concatenated backbone channels, C = C_in // 4, d = C // 2), module names = the
original's state-dict keys under ``head.``:

* ``bottleneck.<t>``: ConvBNReLU 3×3 C_in → C per task;
* ``aux_conv.<t>`` (ConvBNReLU 1×1 C_in → C_in) and ``aux_logits.<t>`` (1×1 conv with bias) on the
  *detached* backbone features, only for tasks whose auxiliary prediction a context reads
  (:func:`aux_tasks_of`: t for a t-label pair (t, ·), s for an s-label pair (·, s); every task
  in search);
* ``atrc_module``: :class:`ATRCModule` (``cp_blocks.<t>.<s>``, ``out_proj.<t>``, ``bottleneck.<t>``);
* ``final_logits.<t>``: 1×1 conv with bias to the task's output channels.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .context_blocks import aux_of_pair, context_spec, ignore_mask, make_cp_block, spatial_softmax
from .layers import ConvBNReLU, running_stats_kept
from .search_block import SearchCPBlock

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
        inter: int,
        dropout: float = 0.05,
        kernel_size: int = 9,
    ):
        super().__init__()
        self.tasks = list(tasks)
        self.search = genotype is None
        self.recompute = True
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
                self.out_proj[t] = ConvBNReLU(inter * n, channels, 1, relu=False)
                nn.init.zeros_(self.out_proj[t].bn.weight)
                nn.init.zeros_(self.out_proj[t].bn.bias)
                layer = ConvBNReLU(2 * channels, channels, 1)
            else:
                layer = ConvBNReLU(channels, channels, 1)
            # the original's: Sequential(ConvBNReLU, Dropout2d); the search's, a plain ConvBNReLU
            self.bottleneck[t] = layer if self.search else nn.Sequential(layer, nn.Dropout2d(dropout))

    def forward(
        self, feats: Mapping[str, torch.Tensor], probs: Mapping[str, torch.Tensor] | None = None
    ) -> dict[str, torch.Tensor]:
        """``feats``: {task: B×C×H×W}; ``probs``: {task: B×K×HW} spatially normalised aux
        predictions (the tasks whose maps the label contexts read) → {task: B×C×H×W}: per target
        t, ``bottleneck(cat[F_t, out_proj(cat[CP_ts(F_t, F_s) for every source s])])``."""
        probs = probs or {}
        out = {}
        for t in self.tasks:
            contexts = self.contexts(t, feats, probs)
            x = torch.cat([feats[t], self.out_proj[t](torch.cat(contexts, 1))], 1) if contexts else feats[t]
            out[t] = self.bottleneck[t](x)
        return out

    def contexts(
        self, t: str, feats: Mapping[str, torch.Tensor], probs: Mapping[str, torch.Tensor]
    ) -> list[torch.Tensor]:
        """Target ``t``'s row: the CP block output (B×d×H×W) of every source with a context. In
        search each pair's op weights are drawn before the row runs, and while training with
        ``recompute`` the row runs under activation checkpointing."""
        row = self.cp_blocks[t]
        if not self.search:
            return [blk(feats[t], feats[s], probs.get(t), probs.get(s)) for s, blk in row.items()]
        weights = [blk.op_weights() for blk in row.values()]

        def mixtures(*_):
            return [
                blk(feats[t], feats[s], probs.get(t), probs.get(s), weights=w)
                for (s, blk), w in zip(row.items(), weights)
            ]

        if self.recompute and self.training and torch.is_grad_enabled():
            calls = []

            def recomputable(*_):  # the first call is the forward, a second the backward's recomputation
                calls.append(1)
                with running_stats_kept(row) if len(calls) > 1 else contextlib.nullcontext():
                    return mixtures()

            return checkpoint(recomputable, feats[t], use_reentrant=False, preserve_rng_state=False)
        return mixtures()


class RelationalContextHead(nn.Module):
    """ATRC's relational-context head for a fixed ``genotype`` ({target: {source: 0..4}}).

    Args:
        in_channels: C_in, channels of the concatenated backbone features.
        tasks: task names (order of the outputs and of the sources within each target).
        genotype: context code of every (target, source) pair (0 none, 1 global, 2 local,
            3 t-label, 4 s-label: the codes of :data:`~atrc_exp.models.context_blocks.CONTEXTS`);
            ``None``: the search head.
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
        self.tasks = tasks = list(tasks)
        self.search = genotype is None
        self._genotype = None if self.search else {t: {s: int(genotype[t][s]) for s in tasks} for t in tasks}
        self.aux_tasks = list(tasks) if self.search else aux_tasks_of(self._genotype, tasks)  # search: all
        c = in_channels // 4
        self.in_channels = in_channels
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
                nn.init.zeros_(m.bias)

    def forward(
        self, x: torch.Tensor, image: torch.Tensor | None = None
    ) -> dict[str, dict[str, torch.Tensor]]:
        """``x``: B×C_in×h×w concatenated backbone features; ``image``: the network input (its pixels
        equal to 255 are left out of the label contexts) → ``{"final": {t: B×C_t×h×w}, "aux":
        {t: B×K_t×h×w}}`` (``aux`` with aux heads)."""
        feats = {t: self.bottleneck[t](x) for t in self.tasks}
        aux: dict[str, torch.Tensor] = {}
        probs: dict[str, torch.Tensor] = {}
        # the pixels the label contexts ignore, once for every aux map (all of x's size)
        mask = ignore_mask(image, tuple(x.shape[-2:])) if image is not None and self.aux_tasks else None
        for t in self.aux_tasks:  # the aux heads read detached features
            aux[t] = self.aux_logits[t](self.aux_conv[t](x.detach()))
            probs[t] = spatial_softmax(aux[t], mask=mask)
        out = self.atrc_module(feats, probs)
        result = {"final": {t: self.final_logits[t](out[t]) for t in self.tasks}}
        if aux:
            result["aux"] = aux
        return result
