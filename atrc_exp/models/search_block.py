"""The ATRC search block: a convex combination of CP blocks for one (target, source) pair.

``op_list``: the CP block of every context type of :data:`~.context_blocks.CONTEXTS` in
genotype-code order (on a task's own pair only those ``on_diagonal``: no s-label), the value
projection's BN not affine; α (``arch_param``) has ``none`` at index 0, so argmax(α) *is* the
genotype code. The op weights are one-hot when frozen or evaluating, else Gumbel-softmax(α, τ,
soft); in training a pair freezes, irreversibly, to argmax(α) once the top-two gap of
softmax(α) reaches ``freeze_gap``.

The freeze rule decides on the device (no host read in a training step): a flag and the one-hot
weights are device buffers, mixed as ``where(frozen, one_hot, gumbel_softmax(α))``. The host
learns of a freeze only where it may read the device (:meth:`SearchCPBlock.sync`, at log steps;
the state dict; evaluation) and from then on computes only the chosen op, drawing no Gumbel
noise. A frozen pair is saved as the original saves it: ``fixed_weights``, the one-hot vector over
[none, ops…], in the state dict exactly for the frozen pairs (original checkpoints load both ways).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .context_blocks import CONTEXTS, make_cp_block
from .state_dict import FREEZE_BUFFER


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
        self.codes = [c.code for c in CONTEXTS if c.block is not None and (c.on_diagonal or not same_task)]
        self.out_channels = out_channels
        self.freeze_gap = float(freeze_gap)
        # τ of the Gumbel-softmax, a device scalar: a compiled step reads it as data (a Python float
        # changing every step would recompile the graph)
        self.register_buffer("tau_tensor", torch.ones(()), persistent=False)
        self.arch_param = nn.Parameter(torch.zeros(len(self.codes) + 1))
        self.op_list = nn.ModuleList(
            [
                make_cp_block(c, in_channels, out_channels, last_affine=False, kernel_size=kernel_size)
                for c in self.codes
            ]
        )
        # the freeze state on the device (saved as FREEZE_BUFFER, see _save_to_state_dict)
        self.register_buffer("frozen_flag", torch.zeros((), dtype=torch.bool), persistent=False)
        self.register_buffer("frozen_weights", torch.zeros(len(self.codes) + 1), persistent=False)
        self._frozen = -1  # the host's copy of the frozen choice, -1 while not known to be frozen

    @property
    def tau(self) -> float:
        """τ of the Gumbel-softmax (reads the device)."""
        return float(self.tau_tensor)

    @tau.setter
    def tau(self, value: float) -> None:
        with torch.no_grad():
            self.tau_tensor.fill_(float(value))  # no host read, no recompilation

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.sync() >= 0:
            w = self.frozen_weights
            destination[prefix + FREEZE_BUFFER] = w if keep_vars else w.detach()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # the checkpoint decides: a pair frozen there (``fixed_weights`` present) is frozen here,
        # any other is not
        w = state_dict.pop(prefix + FREEZE_BUFFER, None)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        with torch.no_grad():
            if w is None:
                self.frozen_flag.fill_(False)
                self.frozen_weights.zero_()
                self._frozen = -1
            else:
                self.frozen_weights.copy_(w)
                self.frozen_flag.fill_(True)
                self._frozen = int(w.argmax())

    def sync(self) -> int:
        """Read the device's freeze state into the host's copy (one host read, none once the host
        knows the pair is frozen); returns the frozen code or -1."""
        if self._frozen < 0 and bool(self.frozen_flag):
            self._frozen = int(self.frozen_weights.argmax())
        return self._frozen

    @property
    def is_frozen(self) -> bool:
        """Whether the choice is frozen (reads the device unless the host knows)."""
        return self.sync() >= 0

    @property
    def one_hot(self) -> bool:
        """The op weights are one-hot and known on the host (frozen, evaluation): only the chosen op runs."""
        return self._frozen >= 0 or not self.training

    def freeze(self, code: int) -> None:
        """Freeze the choice to genotype code ``code`` (irreversible in training)."""
        with torch.no_grad():
            self.frozen_weights.zero_()
            self.frozen_weights[int(code)] = 1.0
            self.frozen_flag.fill_(True)
        self._frozen = int(code)

    def choice(self) -> int:
        """The current genotype code: the frozen one, else argmax(α) (reads the device)."""
        code = self.sync()
        return code if code >= 0 else int(self.arch_param.argmax())

    @torch.no_grad()
    def apply_freeze_rule(self) -> None:
        """Freeze on the device where the top-two gap of softmax(α) reaches ``freeze_gap`` (no
        host read): the flag and the one-hot weights of the argmax are set, irreversibly."""
        top2 = F.softmax(self.arch_param.float(), dim=0).topk(2).values
        newly = (top2[0] - top2[1] >= self.freeze_gap) & ~self.frozen_flag
        idx = torch.arange(self.arch_param.numel(), device=self.arch_param.device)
        one_hot = (idx == self.arch_param.argmax()).to(self.frozen_weights.dtype)  # (F.one_hot reads)
        self.frozen_weights.copy_(torch.where(newly, one_hot, self.frozen_weights))
        self.frozen_flag.logical_or_(newly)

    def op_weights(self) -> torch.Tensor:
        """Weights over [none, ops...] for this forward pass; in training after the freeze rule."""
        if self.one_hot:
            w = self.arch_param.detach().new_zeros(self.arch_param.numel())
            w[self.choice()] = 1.0  # no host-to-device copy
            return w
        self.apply_freeze_rule()
        gumbel = F.gumbel_softmax(self.arch_param, tau=self.tau_tensor, hard=False)
        return torch.where(self.frozen_flag, self.frozen_weights.to(gumbel.dtype), gumbel)

    def active_ops(self) -> list[int]:
        """Indices into ``op_list`` of the ops this forward pass computes: all of them while
        searching (a pair frozen on the device only: weighted by its one-hot vector), else only
        the chosen one (none for ``none``)."""
        if not self.one_hot:
            return list(range(len(self.op_list)))
        c = self.choice()
        return [c - 1] if c > 0 else []

    def forward(
        self,
        target_feats: torch.Tensor,
        source_feats: torch.Tensor,
        target_prob: torch.Tensor | None = None,
        source_prob: torch.Tensor | None = None,
        weights: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Σ over the candidate ops of their weight × their CP block's output. ``weights``: this
        pass's :meth:`op_weights` when drawn beforehand (the head draws a row's weights before the
        row runs, so that its recomputation in the backward draws nothing)."""
        w = self.op_weights() if weights is None else weights
        active = self.active_ops()
        outputs = [self.op_list[i](target_feats, source_feats, target_prob, source_prob) for i in active]
        if len(active) == 1 and self.one_hot:  # a single op of a one-hot weight: y·1 = y
            return outputs[0]
        if not active:  # `none` chosen: contributes nothing
            b, _, h, wd = target_feats.shape
            return target_feats.new_zeros(b, self.out_channels, h, wd)
        out = w[active[0] + 1] * outputs[0]
        for i, y in zip(active[1:], outputs[1:]):
            out = out + w[i + 1] * y
        return out
