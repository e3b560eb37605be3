"""ATRC search (``mode=search context=search``): schedules, the entropy term, the α optimizer.

Per training iteration ``step`` (0-based, of ``max_steps``):
* τ of the Gumbel-softmax goes linearly from ``mode.tau[0]`` (1.0) towards ``mode.tau[1]`` (0.05),
  the original's ``end + (1 − step/max_steps)·(start − end)`` (:func:`linear_schedule`);
* the entropy weight w follows the same formula from ``mode.entropy_weight`` (−0.02 to 0.06), and
  ``w · mean_over_pairs(−Σ softmax(α)·log softmax(α))`` is added to the loss;
* the weights are stepped by SGD and the architecture parameters α by Adam (``mode.arch_lr``,
  5e-4, no weight decay), both on the same batch.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import nn

from ..models.search_block import SearchCPBlock


def linear_schedule(start: float, end: float, step: int, max_steps: int) -> float:
    """The original's schedule at 0-based ``step``: ``end + (1 − step/max_steps)·(start − end)``:
    ``start`` at step 0, slightly before ``end`` at the last step ``max_steps − 1`` (``end`` itself
    only at ``step = max_steps``); the fraction is clamped to [0, 1] outside the run."""
    frac = min(max(step / max(1, max_steps), 0.0), 1.0)
    return float(end + (1.0 - frac) * (start - end))


def search_blocks(model: nn.Module) -> dict[tuple[str, str], SearchCPBlock]:
    """Every search block of ``model`` keyed by (target, source)."""
    head = model.head
    cp = head.atrc_module.cp_blocks
    return {(t, s): cp[t][s] for t in head.tasks for s in head.tasks if isinstance(cp[t][s], SearchCPBlock)}


def entropy_term(blocks: Sequence[SearchCPBlock]) -> torch.Tensor:
    """Mean over pairs of the entropy −Σ p·log p of p = softmax(α)."""
    logps = [F.log_softmax(b.arch_param, dim=0) for b in blocks]  # in α's dtype (float64 in verification)
    return torch.stack([-(logp.exp() * logp).sum() for logp in logps]).mean()


def split_parameters(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(network weights, architecture parameters α)."""
    arch, weights = [], []
    for name, p in model.named_parameters():
        (arch if name.endswith("arch_param") else weights).append(p)
    return weights, arch


class SearchController:
    """Applies the τ / entropy-weight schedules to the search blocks of a model."""

    def __init__(self, model: nn.Module, mode_cfg: DictConfig, max_steps: int):
        self.blocks = search_blocks(model)
        if not self.blocks:
            raise ValueError("mode=search needs a model with search blocks (context=search)")
        self.tau = tuple(map(float, mode_cfg.tau))
        self.entropy_weight = tuple(map(float, mode_cfg.entropy_weight))
        self.max_steps = int(max_steps)
        for b in self.blocks.values():
            b.freeze_gap = float(mode_cfg.freeze_gap)

    def tau_at(self, step: int) -> float:
        return linear_schedule(*self.tau, step, self.max_steps)

    def entropy_weight_at(self, step: int) -> float:
        return linear_schedule(*self.entropy_weight, step, self.max_steps)

    def begin_step(self, step: int) -> float:
        """Set τ on every block for iteration ``step``; returns the entropy weight to use."""
        for b in self.blocks.values():
            b.tau = self.tau_at(step)
        return self.entropy_weight_at(step)

    def loss_term(self, weight: float) -> torch.Tensor:
        return weight * entropy_term(list(self.blocks.values()))

    def num_frozen(self) -> int:
        return sum(int(b.is_frozen) for b in self.blocks.values())

    def alpha_log(self) -> dict[str, float]:
        """softmax(α) of every pair as ``alpha/<target>/<source>/<op>`` (one chart per target)."""
        from ..models.context_blocks import context_spec

        out = {}
        for (t, s), b in self.blocks.items():
            p = F.softmax(b.arch_param.detach().float(), dim=0)
            for i, v in enumerate(p.tolist()):
                out[f"alpha/{t}/{s}/{context_spec(([0] + b.codes)[i]).display}"] = v
        return out
