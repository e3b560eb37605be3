"""The relational-context head of ATRC (distillation network with a fixed genotype).

Layout (C_in = concatenated backbone channels, C = C_in // 4, d = C // 2), module names = the
original's state-dict keys under ``head.``:

* ``bottleneck.<t>``: ConvBNReLU 3×3 C_in → C per task;
* ``aux_conv.<t>`` (ConvBNReLU 1×1 C_in → C_in) and ``aux_logits.<t>`` (1×1 conv with bias) on the
  *detached* backbone features, only for tasks whose auxiliary prediction a label block reads
  (t if some context(t, ·) is t-label, s if some context(·, s) is s-label; every task in search);
* ``atrc_module``: :class:`ATRCModule` (``cp_blocks.<t>.<s>``, ``out_proj.<t>``, ``bottleneck.<t>``);
* ``final_logits.<t>``: 1×1 conv with bias to the task's output channels.

``forward(x, image=None, branches=None) -> {"final": {t: ...}, "aux": {t: ...}}`` at feature
resolution (the model upsamples to the input size); ``aux`` only when there are aux heads.
``image`` (the network input) marks pixels equal to 255 that the label context ignores.
``branches`` (optional): the backbone maps ``x`` was concatenated from; with them the aux heads'
first 1×1 convolution runs at the branches' own resolutions
(:func:`~atrc_exp.models.layers.pointwise_conv_of_concat`, same numbers up to float rounding).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..ops import label_attention as _label_attention
from .context_blocks import (
    CONTEXT_CODES,
    CPOp,
    ignore_mask,
    label_contexts,
    make_cp_block,
    project_cp_ops,
    run_cp_ops,
    spatial_softmax,
)
from .heads import MultiTaskFCNHead
from .layers import (
    ConvBNReLU,
    batch_norm_group,
    conv_bn_act_blockwise,
    conv_bn_relu_group,
    frozen_bn_stats,
    is_pointwise,
    per_task_layers,
    pointwise_runs,
)
from .search_block import SearchCPBlock

__all__ = ["ATRCModule", "RelationalContextHead", "aux_tasks_of", "set_fused", "uniform_genotype"]


def set_fused(
    module: nn.Module, fused: bool = True, recompute: bool | None = None, fold: bool | None = None
) -> None:
    """Switch every ATRC head / module inside ``module`` between the batched evaluation
    (``fused=True``, the default) and the block-by-block one of the original implementation;
    ``recompute`` sets :attr:`ATRCModule.recompute` (the memory-lean search) and ``fold``
    :attr:`ATRCModule.fold` (``out_proj`` folded into the label attention) as well."""
    for m in module.modules():
        if isinstance(m, (ATRCModule, RelationalContextHead, MultiTaskFCNHead)):
            m.fused = bool(fused)
        if recompute is not None and isinstance(m, ATRCModule):
            m.recompute = bool(recompute)
        if fold is not None and isinstance(m, ATRCModule):
            m.fold = bool(fold)


Genotype = Mapping[str, Mapping[str, int]]


def uniform_genotype(tasks: Sequence[str], context: str | int) -> dict[str, dict[str, int]]:
    """Every (target, source) pair, including t = s, uses ``context``."""
    code = CONTEXT_CODES[context] if isinstance(context, str) else int(context)
    return {t: {s: code for s in tasks} for t in tasks}


def aux_tasks_of(genotype: Genotype, tasks: Sequence[str]) -> list[str]:
    """Tasks that need an auxiliary head: t if some context(t, ·) is t-label (3), s if some
    context(·, s) is s-label (4); in ``tasks`` order."""
    need = set()
    for t in tasks:
        for s in tasks:
            code = int(genotype[t][s])
            if code == 3:
                need.add(t)
            elif code == 4:
                need.add(s)
    return [t for t in tasks if t in need]


class ATRCModule(nn.Module):
    """CP blocks per (target, source) with context ≠ none → concat → ``out_proj`` (ConvBN 1×1, BN
    weight and bias zero at init) → concat [features_t, projection] → ``bottleneck`` ConvBNReLU 1×1
    (2C → C) → Dropout2d (``bottleneck.<t>`` = ``Sequential(ConvBNReLU, Dropout2d)``, the original's
    layout). A target without sources: ConvBNReLU 1×1 (C → C) → Dropout2d. In search, the
    bottleneck is a plain ConvBNReLU without dropout, as in the original.

    ``fused`` (default True): the CP blocks are evaluated together by
    :func:`~atrc_exp.models.context_blocks.run_cp_ops` (projections that read the same tensor
    batched into one convolution, label contexts computed once); False calls block by block as the
    original. Same numbers either way (float rounding aside), same parameters and buffers.

    ``fold`` (default True, fused distillation network only): the ``out_proj`` convolution of a
    target is applied to each CP block's output before the concatenation — ``W·cat(y_s) =
    Σ_s W_s·y_s`` — and for a label block folded into its values, ``W_s·(V_s·P_s) = (W_s·V_s)·P_s``
    (P_s the B×K×N attention probabilities): the label-attention kernel then writes the C-channel
    projection directly, summed over the target's label blocks in place
    (:func:`~atrc_exp.ops.label_attention.label_attention_add`), and neither the blocks' outputs
    nor their concatenation are materialised. Fewer multiply-adds when K < d·C/(C−d) (always for the
    2-class edge maps; about 16% fewer at K = 40), same numbers up to float rounding. Only where the
    label-attention kernel runs (float32/float64 CPU tensors); elsewhere the blocks' outputs are
    concatenated as before.

    ``recompute`` (default True, search only): while training, the CP ops of each target are run
    under activation checkpointing — their intermediate activations are not kept but recomputed
    in the backward (batch-norm running statistics still updated once), so the search holds
    one target's ops at a time instead of all 16 pairs × 4 ops. Fused search only.
    """

    def __init__(
        self,
        tasks: Sequence[str],
        genotype: Genotype,
        channels: int,
        inter_channels: int | None = None,
        dropout: float = 0.05,
        kernel_size: int = 9,
        zero_init: bool = True,
    ):
        super().__init__()
        self.tasks = list(tasks)
        self.search = genotype is None
        self.fused = True
        self.fold = True
        self.recompute = True
        inter = channels // 2 if inter_channels is None else inter_channels
        self.cp_blocks = nn.ModuleDict()
        for t in self.tasks:
            row = nn.ModuleDict()
            for s in self.tasks:
                if genotype is None:  # search: every pair mixes all candidate ops
                    row[s] = SearchCPBlock(s == t, channels, inter, kernel_size=kernel_size)
                    continue
                code = int(genotype[t][s])
                if code != 0:
                    row[s] = make_cp_block(code, channels, inter, kernel_size=kernel_size)
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

    def _bottleneck_layer(self, t: str) -> ConvBNReLU:
        """The ConvBNReLU of target ``t``'s bottleneck (without its dropout)."""
        b = self.bottleneck[t]
        return b[0] if isinstance(b, nn.Sequential) else b

    def _dropout(self, t: str, x: torch.Tensor) -> torch.Tensor:
        """Target ``t``'s bottleneck dropout applied to ``x`` (none in search)."""
        b = self.bottleneck[t]
        return b[1](x) if isinstance(b, nn.Sequential) else x

    def _finish(self, t: str, feats_t: torch.Tensor, ctx: list[torch.Tensor] | None) -> torch.Tensor:
        if not ctx:
            return self.bottleneck[t](feats_t)
        distilled = self.out_proj[t](torch.cat(ctx, dim=1))
        return self.bottleneck[t](torch.cat([feats_t, distilled], dim=1))

    def forward(
        self, feats: Mapping[str, torch.Tensor], probs: Mapping[str, torch.Tensor] | None = None
    ) -> dict[str, torch.Tensor]:
        probs = probs or {}
        if not self.fused:
            return self._forward_plain(feats, probs)
        if self.search:
            return self._forward_search(feats, probs)
        ops = [CPOp(t, s, blk) for t in self.tasks for s, blk in self.cp_blocks[t].items()]
        query, key, value = project_cp_ops(ops, feats, probs)
        if self.fold and self._fold_applies(ops, query, key, value):
            return self._finish_all(feats, pres=self._folded_projections(ops, query, key, value))
        ys = iter(op.block.attend(q, k, v) for op, q, k, v in zip(ops, query, key, value))
        return self._finish_all(feats, ctxs={t: [next(ys) for _ in self.cp_blocks[t]] for t in self.tasks})

    def _fold_applies(self, ops, query, key, value) -> bool:
        """Some label block, the label-attention kernel runs for it, and every ``out_proj`` is a
        plain 1×1 convolution (no bias, no groups) followed by a batch norm."""
        label = [i for i, op in enumerate(ops) if op.block.kind == "label"]
        if not label or not _label_attention.kernel_applies(query[label[0]], key[label[0]], value[label[0]]):
            return False
        return all(
            not p.relu and is_pointwise(p.conv) and p.conv.bias is None for p in self.out_proj.values()
        )

    def _folded_projections(self, ops, query, key, value) -> dict[str, torch.Tensor]:
        """Per target with CP blocks, ``out_proj``'s convolution of the blocks' concatenated outputs
        (B×C×H×W, before its batch norm), computed block by block (see :attr:`fold`): label
        blocks as the attention of their values times the weight's block columns, added in place;
        the other blocks' outputs through their block of the weight."""
        pres: dict[str, torch.Tensor] = {}
        i = 0
        for t in self.tasks:
            n = len(self.cp_blocks[t])
            if n == 0:
                continue
            conv = self.out_proj[t].conv
            w = conv.weight.view(conv.out_channels, -1)  # C × (n·d)
            pre = None
            label = []
            lo = 0
            for j in range(i, i + n):
                d = ops[j].block.out_channels
                wj = w[:, lo : lo + d]
                lo += d
                if ops[j].block.kind == "label":
                    label.append((j, wj))
                    continue
                y = F.conv2d(ops[j].block.attend(query[j], key[j], value[j]), wj[:, :, None, None])
                pre = y if pre is None else pre + y
            for j, wj in label:
                v = value[j]
                vw = torch.matmul(wj, v.reshape(v.shape[0], v.shape[1], -1)).unsqueeze(-1)  # B×C×K×1
                if pre is None:
                    pre = _label_attention.label_attention(query[j], key[j], vw)
                else:
                    pre = _label_attention.label_attention_add(pre, query[j], key[j], vw)
            pres[t] = pre
            i += n
        return pres

    def _distilled(
        self,
        ts: list[str],
        ctxs: Mapping[str, list[torch.Tensor]] | None,
        pres: Mapping[str, torch.Tensor] | None,
    ) -> list[torch.Tensor]:
        """``[self.out_proj[t](torch.cat(ctxs[t], 1)) for t in ts]`` for targets whose ``out_proj``
        layers have equal shapes: one batched product and one batch norm — or, from ``pres`` (the
        convolution already applied, :meth:`_folded_projections`), the batch norms alone."""
        bns = [self.out_proj[t].bn for t in ts]
        if pres is not None:
            pre = pres[ts[0]] if len(ts) == 1 else torch.cat([pres[t] for t in ts], dim=1)
            return list(batch_norm_group(pre, bns).split([bn.num_features for bn in bns], dim=1))
        if len(ts) == 1:
            return [self.out_proj[ts[0]](torch.cat(ctxs[ts[0]], dim=1))]
        ctx_all = torch.cat([c for t in ts for c in ctxs[t]], dim=1)
        return conv_bn_act_blockwise(ctx_all, [self.out_proj[t] for t in ts])

    def _finish_all(
        self,
        feats: Mapping[str, torch.Tensor],
        ctxs: Mapping[str, list[torch.Tensor]] | None = None,
        pres: Mapping[str, torch.Tensor] | None = None,
    ) -> dict[str, torch.Tensor]:
        """``{t: self._finish(t, feats[t], ctxs[t])}`` (or from the folded projections ``pres``),
        with the ``out_proj`` and the bottleneck layers of targets whose layers have equal shapes
        evaluated together: each kind as one batched matrix product and one batch norm
        (:func:`conv_bn_act_blockwise`; small 1×1 convolutions run 1.2-1.7× faster so on the
        CPU). The dropouts run per target in task order, as in :meth:`_finish`, so the random
        draws are the same."""
        has = (lambda t: t in pres) if pres is not None else (lambda t: bool(ctxs[t]))
        groups: dict[tuple[int, int], list[str]] = {}
        for t in self.tasks:
            if has(t):
                key = (self.out_proj[t].conv.in_channels, self._bottleneck_layer(t).conv.in_channels)
                groups.setdefault(key, []).append(t)
        before_dropout: dict[str, torch.Tensor] = {}
        for ts in groups.values():
            distilled = self._distilled(ts, ctxs, pres)
            if len(ts) < 2:
                before_dropout[ts[0]] = self._bottleneck_layer(ts[0])(
                    torch.cat([feats[ts[0]], distilled[0]], dim=1)
                )
                continue
            x = torch.cat([z for t, d in zip(ts, distilled) for z in (feats[t], d)], dim=1)
            before_dropout.update(zip(ts, conv_bn_act_blockwise(x, [self._bottleneck_layer(t) for t in ts])))
        return {
            t: self._dropout(t, before_dropout[t]) if t in before_dropout else self.bottleneck[t](feats[t])
            for t in self.tasks
        }

    def _forward_plain(self, feats, probs) -> dict[str, torch.Tensor]:
        out = {}
        for t in self.tasks:
            ctx = [
                blk(feats[t], feats[s], target_prob=probs.get(t), source_prob=probs.get(s))
                for s, blk in self.cp_blocks[t].items()
            ]
            out[t] = self._finish(t, feats[t], ctx)
        return out

    def _forward_search(self, feats, probs) -> dict[str, torch.Tensor]:
        """Row by row (target by target), in the plain path's order of random draws: the Gumbel
        weights of a row's pairs, then the row's dropout."""
        out = {}
        contexts: dict = {}
        for t in self.tasks:
            blocks = list(self.cp_blocks[t].items())
            plan = []  # per pair: (block, weights, active op indices)
            ops = []
            for s, blk in blocks:
                w = blk.op_weights()
                active = blk.active_ops()
                plan.append((blk, w, active))
                ops += [CPOp(t, s, blk.op_list[i]) for i in active]
            # label contexts outside of any checkpoint: shared by rows, small
            ctx_in = label_contexts(ops, feats, probs, contexts)

            def row(*_, ops=ops, plan=plan, ctx_in=ctx_in, t=t):
                ys = iter(run_cp_ops(ops, feats, probs, ctx_in))
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

                mixed = checkpoint(row_once, feats[t], use_reentrant=False, preserve_rng_state=False)
            else:
                mixed = row()
            out[t] = self._finish(t, feats[t], list(mixed))
        return out


class RelationalContextHead(nn.Module):
    """ATRC's relational-context head for a fixed ``genotype`` ({target: {source: 0..4}}).

    Args:
        in_channels: C_in, channels of the concatenated backbone features.
        tasks: task names (order of the outputs and of the sources within each target).
        genotype: context code of every (target, source) pair (0 none, 1 global, 2 local,
            3 t-label, 4 s-label).
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
        #: the task bottlenecks (all reading x) as one convolution, the aux heads (all reading the same
        #: detached features) as one convolution and their equal-width logits as one batched
        #: product; see ATRCModule.fused
        self.fused = True
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
        self,
        x: torch.Tensor,
        image: torch.Tensor | None = None,
        branches: Sequence[torch.Tensor] | None = None,
    ) -> dict[str, dict[str, torch.Tensor]]:
        feats = per_task_layers(self.bottleneck, self.tasks, x, self.fused)
        aux: dict[str, torch.Tensor] = {}
        probs: dict[str, torch.Tensor] = {}
        if self.aux_tasks:
            xd = x.detach()
            if self.fused:
                # the aux convolutions (1×1) at the backbone branches' own resolutions, where given
                bd = None if branches is None else [b.detach() for b in branches]
                hidden = conv_bn_relu_group(xd, [self.aux_conv[t] for t in self.aux_tasks], bd)
                logits = pointwise_runs(hidden, [self.aux_logits[t] for t in self.aux_tasks])
            else:
                logits = [self.aux_logits[t](self.aux_conv[t](xd)) for t in self.aux_tasks]
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
