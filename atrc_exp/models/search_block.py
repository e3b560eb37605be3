"""The ATRC search block: a convex combination of CP blocks for one (target, source) pair.

Ops (``op_list``) in genotype-code order: [global, local, t-label, s-label (only when target ≠
source)], with ``none`` as index 0 of ``arch_param`` (α = zeros(len(ops) + 1)), so the argmax of α
*is* the genotype code. The value projection's BN of every op is not affine.

Weights of the ops:
* frozen (``frozen_choice`` ≥ 0, a persistent buffer: irreversible, saved with the model): one-hot;
* evaluation: one-hot argmax(α);
* training: if the top-two gap of softmax(α) is ≥ ``freeze_gap`` the choice freezes to its argmax;
  otherwise Gumbel-softmax(α, τ = ``self.tau``, soft).
Ops whose weight is exactly zero are not computed (no activations kept for them).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .context_blocks import make_cp_block


class SearchCPBlock(nn.Module):
    """``forward(target, source, target_prob, source_prob) -> B×d×H×W`` mixing the candidate ops."""

    def __init__(
        self,
        same_task: bool,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 9,
        freeze_gap: float = 0.3,
    ):
        super().__init__()
        self.codes = [1, 2, 3] if same_task else [1, 2, 3, 4]
        self.out_channels = out_channels
        self.freeze_gap = float(freeze_gap)
        self.tau = 1.0
        self.arch_param = nn.Parameter(torch.zeros(len(self.codes) + 1))
        self.op_list = nn.ModuleList(
            [
                make_cp_block(c, in_channels, out_channels, last_affine=False, kernel_size=kernel_size)
                for c in self.codes
            ]
        )
        self.register_buffer("frozen_choice", torch.tensor(-1, dtype=torch.long))

    @property
    def is_frozen(self) -> bool:
        return int(self.frozen_choice) >= 0

    def choice(self) -> int:
        """The current discrete choice (genotype code): the frozen one, else argmax(α)."""
        return int(self.frozen_choice) if self.is_frozen else int(self.arch_param.argmax())

    def op_weights(self) -> torch.Tensor:
        """Weights over [none, ops...] for this forward pass (see the module docstring)."""
        n = self.arch_param.numel()
        if not self.is_frozen and self.training:
            with torch.no_grad():
                top2 = F.softmax(self.arch_param.float(), dim=0).topk(2).values
            if float(top2[0] - top2[1]) >= self.freeze_gap:
                self.frozen_choice.fill_(int(self.arch_param.argmax()))
        if self.is_frozen or not self.training:
            return F.one_hot(torch.tensor(self.choice()), n).to(self.arch_param)
        return F.gumbel_softmax(self.arch_param, tau=self.tau, hard=False)

    def active_ops(self) -> list[int]:
        """Indices into ``op_list`` of the ops this forward pass computes (call after
        :meth:`op_weights`, which may freeze the choice): all of them while searching, else only
        the chosen one (none for ``none``)."""
        if self.training and not self.is_frozen:
            return list(range(len(self.op_list)))
        c = self.choice()
        return [c - 1] if c > 0 else []

    def mix(
        self, w: torch.Tensor, active: list[int], outputs: list[torch.Tensor], like: torch.Tensor
    ) -> torch.Tensor:
        """Σ w[i+1]·outputs for the ``active`` ops (zeros shaped like ``like`` when there is none)."""
        out = None
        for i, y in zip(active, outputs):
            y = w[i + 1] * y
            out = y if out is None else out + y
        if out is None:  # `none` chosen: contributes nothing
            b, _, h, wd = like.shape
            out = like.new_zeros(b, self.out_channels, h, wd)
        return out

    def forward(self, target_feats, source_feats, target_prob=None, source_prob=None):
        w = self.op_weights()
        active = self.active_ops()
        outputs = [
            self.op_list[i](target_feats, source_feats, target_prob=target_prob, source_prob=source_prob)
            for i in active
        ]
        return self.mix(w, active, outputs, target_feats)
