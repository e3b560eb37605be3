"""One training step — the unit that compiles — and the device-side record of non-finite steps.

:func:`train_step` only queues work: forward and loss (one function, compiled as a whole with
``trainer.compile``), backward, gradient clipping or norm, the non-finite bookkeeping, both
optimizers (weights by SGD; α by Adam in search) and the learning-rate schedule. It reads nothing
from the device, so the host runs ahead of a GPU and the step can be captured as CUDA graphs.
Non-finite values are recorded on the device by :class:`NonFiniteMonitor` and read where the loop
reads anyway — at log, validation and checkpoint steps (:meth:`NonFiniteMonitor.check`).
``trainer.on_nonfinite=skip`` needs to know before the optimizer step: it reads one flag per
step (:func:`step_is_finite`), the documented cost of that mode.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch
from accelerate import Accelerator
from torch import nn

from .fast_paths import prepare_input
from .faults import FaultInjector, any_nonfinite, nonfinite_grad_params
from .search import SearchController

__all__ = [
    "NonFiniteMonitor",
    "StepParts",
    "StepResult",
    "describe_nonfinite",
    "forward_backward",
    "make_forward_loss",
    "optimizer_step",
    "step_is_finite",
    "train_step",
]

ForwardLoss = Callable[[torch.Tensor, Mapping[str, torch.Tensor]], tuple[torch.Tensor, dict]]


def make_forward_loss(model: nn.Module, criterion: nn.Module, channels_last: bool = False) -> ForwardLoss:
    """``(image, batch) -> (loss, terms)``: the model's outputs and the multi-task loss — one
    function, so that ``torch.compile`` makes one graph of it
    (:func:`~atrc_exp.engine.fast_paths.compile_step`)."""

    def forward_loss(image: torch.Tensor, batch: Mapping[str, torch.Tensor]):
        outputs = model(prepare_input(image, channels_last))
        return criterion(outputs, batch)

    return forward_loss


@dataclass
class StepParts:
    """What a training step uses (built once by the trainer)."""

    model: nn.Module
    forward_loss: ForwardLoss
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    acc: Accelerator
    #: search only: the α optimizer and the τ / entropy-weight schedules
    arch_opt: torch.optim.Optimizer | None = None
    controller: SearchController | None = None
    grad_clip: float | None = None
    #: compute the gradient norm (for the non-finite check) when not clipping; off under fp16's
    #: GradScaler, which skips non-finite steps itself
    check_grads: bool = True
    faults: FaultInjector = field(default_factory=FaultInjector)


@dataclass
class StepResult:
    """A step's device tensors (nothing read on the host)."""

    loss: torch.Tensor
    terms: dict[str, torch.Tensor]
    grad_norm: torch.Tensor | None
    #: the entropy weight used (search), a host number
    entropy_weight: float | None = None


def forward_backward(parts: StepParts, batch: dict, step: int) -> StepResult:
    """Forward, loss (+ the search's entropy term), backward and the gradient norm of 0-based step
    ``step``; the gradients are left in ``.grad`` for :func:`optimizer_step`."""
    entropy_w = None
    if parts.controller is not None:
        entropy_w = parts.controller.begin_step(step)
    parts.faults.poison_batch(step + 1, batch)
    loss, terms = parts.forward_loss(batch["image"], batch)
    if parts.controller is not None:
        ent = parts.controller.loss_term(entropy_w)
        terms["loss/entropy_term"] = ent.detach()
        loss = loss + ent
    parts.faults.after_forward(step + 1)
    _zero_grad(parts)
    parts.acc.backward(loss)
    parts.faults.poison_grads(step + 1, parts.model)
    grad_norm = None
    if parts.grad_clip:
        grad_norm = parts.acc.clip_grad_norm_(parts.model.parameters(), float(parts.grad_clip))
    elif parts.check_grads:
        grad_norm = torch.nn.utils.get_total_norm(
            [p.grad for p in parts.model.parameters() if p.grad is not None]
        )
    return StepResult(loss, terms, grad_norm, entropy_w)


def _zero_grad(parts: StepParts) -> None:
    parts.optimizer.zero_grad(set_to_none=True)
    if parts.arch_opt is not None:
        parts.arch_opt.zero_grad(set_to_none=True)


def optimizer_step(parts: StepParts, apply: bool = True) -> None:
    """Both optimizers' steps (``apply=False``: the gradients are dropped instead — a skipped
    step), then the learning-rate schedule's."""
    if apply:
        parts.optimizer.step()
        if parts.arch_opt is not None:
            parts.arch_opt.step()
    else:
        _zero_grad(parts)
    with warnings.catch_warnings():  # a skipped first step warns "scheduler before optimizer"
        warnings.simplefilter("ignore", UserWarning)
        parts.scheduler.step()


def train_step(parts: StepParts, batch: dict, step: int, monitor: NonFiniteMonitor) -> StepResult:
    """One whole training step of 0-based step ``step``, without a host read: forward, loss,
    backward, clipping, the non-finite record (``monitor``), both optimizers, the schedule."""
    result = forward_backward(parts, batch, step)
    monitor.record(step + 1, result)
    optimizer_step(parts)
    return result


def step_is_finite(acc: Accelerator, result: StepResult) -> bool:
    """Whether loss and gradient norm are finite on every process (one host read and, with several
    processes, an all-reduce: the per-step cost of ``trainer.on_nonfinite=skip``)."""
    ok = torch.isfinite(result.loss.detach())
    if result.grad_norm is not None:
        ok = ok & torch.isfinite(result.grad_norm)
    return not any_nonfinite(acc, not bool(ok))


def _nonfinite_message(step: int, loss_bad: bool, bad_terms: list[str], model: nn.Module) -> str:
    """``non-finite loss at step N (terms: ...)`` or ``non-finite gradient at step N (parameters:
    ...)`` (the parameters whose gradients are not finite now)."""
    if loss_bad:
        return f"non-finite loss at step {step} (terms: {', '.join(bad_terms) or 'total'})"
    names = nonfinite_grad_params(model)
    return f"non-finite gradient at step {step} (parameters: {', '.join(names) or '?'})"


def describe_nonfinite(step: int, loss: torch.Tensor, terms: Mapping[str, torch.Tensor], model) -> str:
    """The non-finite step ``step`` described from its loss and terms (reads the device)."""
    bad = [k for k, v in terms.items() if not bool(torch.isfinite(v).all())]
    return _nonfinite_message(step, not bool(torch.isfinite(loss)), bad, model)


class NonFiniteMonitor:
    """The first step whose loss or gradient norm was not finite, recorded on the device.

    :meth:`record` (every step) only queues device ops; :meth:`check` (log, validation and
    checkpoint steps) reads the record — all-reduced over processes — and returns the description
    of the first bad step (its number and the non-finite terms, or the parameters with non-finite
    gradients), or ``None``.
    """

    def __init__(self, device: torch.device):
        self.first_step = torch.full((), -1, dtype=torch.long, device=device)
        self.loss_bad = torch.zeros((), dtype=torch.bool, device=device)
        self.terms_bad: torch.Tensor | None = None
        self.names: list[str] = []

    @torch.no_grad()
    def record(self, step: int, result: StepResult) -> None:
        """Note 1-based ``step`` if it is the first non-finite one (device ops only)."""
        loss_ok = torch.isfinite(result.loss.detach())
        ok = loss_ok if result.grad_norm is None else loss_ok & torch.isfinite(result.grad_norm)
        terms_ok = torch.stack([torch.isfinite(v).all() for v in result.terms.values()])
        if self.terms_bad is None or list(result.terms) != self.names:
            self.names = list(result.terms)
            self.terms_bad = torch.zeros_like(terms_ok)
        new = ~ok & (self.first_step < 0)
        self.first_step = torch.where(new, step, self.first_step)
        self.loss_bad = torch.where(new, ~loss_ok, self.loss_bad)
        self.terms_bad = torch.where(new, ~terms_ok, self.terms_bad)

    def check(self, acc: Accelerator, model: nn.Module) -> str | None:
        """The first non-finite step of any process, described; ``None`` if there was none (one
        host read, an all-gather with several processes)."""
        steps = self.first_step.reshape(1)
        if acc.num_processes > 1:
            steps = acc.gather(steps)
        bad = [s for s in steps.tolist() if s >= 0]
        if not bad:
            return None
        first = min(bad)
        if int(self.first_step) != first:
            return f"non-finite values on another process at step {first}"
        names = [n for n, b in zip(self.names, self.terms_bad.tolist()) if b]
        return _nonfinite_message(first, bool(self.loss_bad), names, model)
