"""The ATRC search block: a convex combination of CP blocks for one (target, source) pair.

Ops (``op_list``) in genotype-code order: [global, local, t-label, s-label (only when target ≠
source)], with ``none`` as index 0 of ``arch_param`` (α = zeros(len(ops) + 1)), so the argmax of α
*is* the genotype code. The value projection's BN of every op is not affine.

Weights of the ops:
* frozen: one-hot, kept in the buffer ``fixed_weights`` as the original does — registered as
  ``None`` (so absent from the state dict) and set to the one-hot float vector over [none, ops…]
  when the pair freezes (irreversible, saved with the model: an original search checkpoint has
  ``cp_blocks.<t>.<s>.fixed_weights`` exactly for its frozen pairs, and loads both ways);
* evaluation: one-hot argmax(α);
* training: if the top-two gap of softmax(α) is ≥ ``freeze_gap`` the choice freezes to its argmax;
  otherwise Gumbel-softmax(α, τ = ``self.tau``, soft).
Ops whose weight is exactly zero are not computed (no activations kept for them).

Reading a device tensor on the host synchronises a GPU, so the block keeps a host copy of its
frozen choice (refreshed when a state dict is loaded), and :func:`check_freeze` decides the freeze
rule for many blocks with one read: the search head calls it once per training forward, after
which the blocks' :meth:`~SearchCPBlock.op_weights` and :meth:`~SearchCPBlock.active_ops` read
nothing from the device (a block used on its own checks itself, one read per call).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .context_blocks import make_cp_block

__all__ = ["SearchCPBlock", "check_freeze"]


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
        self.register_buffer("fixed_weights", None)
        self._frozen = -1  # host copy of argmax(fixed_weights), -1 while not frozen (set it through freeze())
        self._checked_version = -1  # arch_param._version when check_freeze() applied the rule

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # the checkpoint decides: a pair frozen there (``fixed_weights`` present) is frozen here,
        # any other is not
        key = prefix + "fixed_weights"
        if key in state_dict:
            if self.fixed_weights is None:
                self.fixed_weights = torch.zeros_like(self.arch_param.detach())
        else:
            self.fixed_weights = None
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._frozen = -1 if self.fixed_weights is None else int(self.fixed_weights.argmax())

    @property
    def is_frozen(self) -> bool:
        return self._frozen >= 0

    @property
    def one_hot(self) -> bool:
        """The op weights are one-hot (frozen, or evaluation): only the chosen op runs."""
        return self.is_frozen or not self.training

    def freeze(self, code: int) -> None:
        """Freeze the choice to genotype code ``code`` (irreversible in training)."""
        w = torch.zeros_like(self.arch_param.detach())
        w[int(code)] = 1.0  # no host-to-device copy
        self.fixed_weights = w
        self._frozen = int(code)

    def choice(self) -> int:
        """The current discrete choice (genotype code): the frozen one, else argmax(α)."""
        return self._frozen if self.is_frozen else int(self.arch_param.argmax())

    def _gap_and_argmax(self) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            top2 = F.softmax(self.arch_param.float(), dim=0).topk(2).values
            return top2[0] - top2[1], self.arch_param.argmax()

    def op_weights(self) -> torch.Tensor:
        """Weights over [none, ops...] for this forward pass (see the module docstring)."""
        n = self.arch_param.numel()
        if not self.is_frozen and self.training:
            if self._checked_version != self.arch_param._version:  # else check_freeze() did, same α
                gap, top = self._gap_and_argmax()
                if float(gap) >= self.freeze_gap:
                    self.freeze(int(top))
        if self.one_hot:
            w = self.arch_param.detach().new_zeros(n)
            w[self.choice()] = 1.0  # no host-to-device copy
            return w
        return F.gumbel_softmax(self.arch_param, tau=self.tau, hard=False)

    def active_ops(self) -> list[int]:
        """Indices into ``op_list`` of the ops this forward pass computes (call after
        :meth:`op_weights`, which may freeze the choice): all of them while searching, else only
        the chosen one (none for ``none``)."""
        if not self.one_hot:
            return list(range(len(self.op_list)))
        c = self.choice()
        return [c - 1] if c > 0 else []

    def mix(
        self, w: torch.Tensor, active: list[int], outputs: list[torch.Tensor], like: torch.Tensor
    ) -> torch.Tensor:
        """Σ w[i+1]·outputs for the ``active`` ops (zeros shaped like ``like`` when there is none);
        a single op of a one-hot weight (frozen, evaluation) is its output itself."""
        if len(active) == 1 and self.one_hot:  # y·1 = y
            return outputs[0]
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


def check_freeze(blocks: list[SearchCPBlock]) -> None:
    """Apply the freeze rule (top-two gap of softmax(α) ≥ ``freeze_gap``: freeze to argmax α) to
    every unfrozen block in training mode with one device-to-host read for all, and mark them
    checked: until α changes (its ``_version``), :meth:`~SearchCPBlock.op_weights` does not read
    it again. The same decisions as each block checking itself (the same float32 arithmetic)."""
    todo = [b for b in blocks if b.training and not b.is_frozen]
    if not todo:
        return
    gaps, tops = zip(*(b._gap_and_argmax() for b in todo))
    values = torch.cat([torch.stack(gaps), torch.stack(tops).to(gaps[0].dtype)]).tolist()
    for i, b in enumerate(todo):
        if values[i] >= b.freeze_gap:
            b.freeze(int(values[len(todo) + i]))
        b._checked_version = b.arch_param._version
