"""One training step, whole: :func:`train_step` — the unit the loop repeats and ``make bench`` times.

It only queues device work (no host read), so the host runs ahead of a GPU and the step can be
captured as CUDA graphs; non-finite values are recorded on the device and read where the loop
reads anyway. Only ``trainer.on_nonfinite=skip`` reads one flag per step.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Protocol

import torch
from accelerate import Accelerator
from torch import nn

from .fast_paths import prepare_input
from .search import SearchController

ForwardLoss = Callable[[torch.Tensor, Mapping[str, torch.Tensor]], tuple[torch.Tensor, dict]]


def make_forward_loss(model: nn.Module, criterion: nn.Module, channels_last: bool = False) -> ForwardLoss:
    """``(image, batch) -> (loss, terms)``: model and multi-task loss as one function, so that
    ``torch.compile`` makes one graph of it. ``channels_last``: the image in NHWC."""

    def forward_loss(image: torch.Tensor, batch: Mapping[str, torch.Tensor]):
        return criterion(model(prepare_input(image, channels_last)), batch)

    return forward_loss


@dataclass
class StepParts:
    """What a training step uses (built once, by :func:`~atrc_exp.engine.trainer.build_step`)."""

    model: nn.Module
    forward_loss: ForwardLoss
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    acc: Accelerator
    #: search only: the α optimizer and the τ / entropy-weight schedules
    arch_opt: torch.optim.Optimizer | None = None
    controller: SearchController | None = None
    grad_clip: float | None = None
    #: the gradient norm (for the non-finite record) when not clipping; off under fp16's GradScaler
    check_grads: bool = True


@dataclass
class StepResult:
    """A step's device tensors (nothing read on the host)."""

    loss: torch.Tensor
    terms: dict[str, torch.Tensor]
    grad_norm: torch.Tensor | None
    entropy_weight: float | None = None  # search: the weight used, a host number

    def finite(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Device bools (no host read): the loss is finite; the loss and the gradient norm are."""
        loss_ok = torch.isfinite(self.loss)
        return loss_ok, loss_ok if self.grad_norm is None else loss_ok & torch.isfinite(self.grad_norm)


class NonFinitePolicy(Protocol):
    """``trainer.on_nonfinite``: ``allow`` says whether the optimizers may apply 1-based ``step``."""

    def allow(self, step: int, result: StepResult) -> bool: ...


def train_step(parts: StepParts, batch: dict, step: int, nonfinite: NonFinitePolicy) -> StepResult:
    """Train on ``batch`` at 0-based step ``step``, without a host read (but for a
    ``trainer.on_nonfinite=skip`` ``nonfinite``, which reads one flag)."""
    model, acc, search = parts.model, parts.acc, parts.controller
    optimizers = [opt for opt in (parts.optimizer, parts.arch_opt) if opt is not None]
    entropy_w = search.begin_step(step) if search else None  # τ of this step on every search block
    loss, terms = parts.forward_loss(batch["image"], batch)
    if search:  # the search's entropy term: w · mean entropy of softmax(α)
        entropy = search.loss_term(entropy_w)
        terms["loss/entropy_term"] = entropy.detach()
        loss = loss + entropy
    for opt in optimizers:
        opt.zero_grad(set_to_none=True)
    acc.backward(loss)
    grad_norm = None
    if parts.grad_clip:
        grad_norm = acc.clip_grad_norm_(model.parameters(), parts.grad_clip)
    elif parts.check_grads:
        grad_norm = torch.nn.utils.get_total_norm([p.grad for p in model.parameters() if p.grad is not None])
    result = StepResult(loss.detach(), terms, grad_norm, entropy_w)
    if nonfinite.allow(step + 1, result):
        for opt in optimizers:
            opt.step()
    with warnings.catch_warnings():  # a skipped first step warns "scheduler before optimizer"
        warnings.simplefilter("ignore", UserWarning)
        parts.scheduler.step()
    return result
