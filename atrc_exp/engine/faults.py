"""Preemption signals, non-finite losses/gradients and fault injection for the training loop.

``$ATRC_FAULT_INJECT`` (tests and drills only) makes a run fail on purpose; the loop's step is then
wrapped by :func:`with_faults` (never otherwise). Entries, separated by ``,``, steps 1-based:
``sigkill@K`` (SIGKILL itself during step K), ``sigterm@K`` / ``sigusr1@K`` (send itself that
signal), ``nan:<key>@K`` (NaN in batch tensor ``<key>``), ``nan_grad@K`` (a NaN gradient).
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Callable
from types import FrameType

import torch
from torch import nn

from .step import StepResult

log = logging.getLogger(__name__)

#: What SLURM and submitit send before a time limit or preemption.
PREEMPTION_SIGNALS = tuple(
    s for s in (getattr(signal, "SIGTERM", None), getattr(signal, "SIGUSR1", None)) if s
)


class Preempted(Exception):
    """The run stopped after a preemption signal; a checkpoint of ``step`` is in ``checkpoint``."""

    def __init__(self, signum: int, step: int, checkpoint: str):
        self.signum, self.step, self.checkpoint = signum, step, checkpoint
        self.exit_code = 128 + int(signum)
        super().__init__(
            f"{signal.Signals(signum).name} received: stopped at step {step} after saving {checkpoint}; "
            f"run again with trainer.resume=auto (same run dir) to continue"
        )


class NonFiniteError(FloatingPointError):
    """A non-finite loss or gradient; the message names the step and the offending terms."""


class PreemptionGuard:
    """Context manager: while active, SIGTERM/SIGUSR1 set :attr:`signum` instead of killing us; the
    loop then checkpoints and calls :meth:`hand_over` (the handler installed before, e.g. submitit's
    re-queue)."""

    signals = PREEMPTION_SIGNALS

    def __init__(self):
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is None:
            log.warning("%s received: checkpointing at the end of this step", signal.Signals(signum).name)
        self.signum = signum

    def __enter__(self) -> PreemptionGuard:
        if threading.current_thread() is threading.main_thread():
            for s in self.signals:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, prev in self._previous.items():
            signal.signal(s, prev)  # type: ignore[arg-type]
        self._previous.clear()

    def requested(self, accelerator=None) -> bool:
        """Whether any process got a signal (all processes agree, so they stop at the same step)."""
        if accelerator is None or accelerator.num_processes == 1:
            return self.signum is not None
        t = torch.tensor([self.signum or 0], device=accelerator.device)
        total = int(accelerator.reduce(t, reduction="sum").item())
        if self.signum is None and total:
            self.signum = total if total in self.signals else self.signals[0]
        return bool(total)

    def hand_over(self) -> None:
        """Call the handler that was installed before ours, if any."""
        prev = self._previous.get(self.signum) if self.signum is not None else None
        if callable(prev) and prev is not signal.default_int_handler:
            log.info("passing %s on to the previous handler (%r)", signal.Signals(self.signum).name, prev)
            prev(self.signum, None)


def _nonfinite_message(step: int, loss_bad: bool, bad_terms: list[str], model: nn.Module) -> str:
    """What went wrong at ``step``: the loss terms, or up to three parameters whose gradients are
    not finite now (reads the device)."""
    if loss_bad:
        return f"non-finite loss at step {step} (terms: {', '.join(bad_terms) or 'total'})"
    grads = ((n, p.grad) for n, p in model.named_parameters() if p.grad is not None)
    names = [n for n, g in grads if not bool(torch.isfinite(g).all())][:3]
    return f"non-finite gradient at step {step} (parameters: {', '.join(names) or '?'})"


class NonFiniteMonitor:
    """``trainer.on_nonfinite=stop``: the first step whose loss or gradient norm was not finite,
    recorded on the device by :meth:`allow` (every step; lets it through) and read by :meth:`check`
    (at log, validation and checkpoint steps)."""

    skipped = 0

    def __init__(self, device: torch.device):
        self.first_step = torch.full((), -1, dtype=torch.long, device=device)
        self.loss_bad = torch.zeros((), dtype=torch.bool, device=device)
        self.terms_bad: torch.Tensor | None = None
        self.names: list[str] = []

    @torch.no_grad()
    def allow(self, step: int, result: StepResult) -> bool:
        loss_ok, ok = result.finite()
        terms_ok = torch.stack([torch.isfinite(v).all() for v in result.terms.values()])
        if self.terms_bad is None or list(result.terms) != self.names:
            self.names = list(result.terms)
            self.terms_bad = torch.zeros_like(terms_ok)
        new = ~ok & (self.first_step < 0)
        self.first_step = torch.where(new, step, self.first_step)
        self.loss_bad = torch.where(new, ~loss_ok, self.loss_bad)
        self.terms_bad = torch.where(new, ~terms_ok, self.terms_bad)
        return True

    def check(self, acc, model: nn.Module) -> str | None:
        """The first non-finite step of any process, described, or ``None`` (one host read, an
        all-gather with several processes)."""
        steps = self.first_step.reshape(1)
        if acc.num_processes > 1:
            steps = acc.gather(steps)
        bad = [s for s in steps.tolist() if s >= 0]
        if not bad:
            return None
        if int(self.first_step) != min(bad):
            return f"non-finite values on another process at step {min(bad)}"
        names = [n for n, b in zip(self.names, self.terms_bad.tolist()) if b]
        return _nonfinite_message(min(bad), bool(self.loss_bad), names, model)


class SkipNonFinite:
    """``trainer.on_nonfinite=skip``: a step whose loss or gradients are not finite on any process
    is not applied (no optimizer step; the model's buffers — BatchNorm statistics — restored) and
    counted in :attr:`skipped`; past ``max_skipped`` the run stops. Reads one flag per step."""

    def __init__(self, acc, model: nn.Module, max_skipped: int, skipped: int = 0):
        self.acc, self.model, self.max_skipped, self.skipped = acc, model, max_skipped, skipped
        self.buffers = list(acc.unwrap_model(model).buffers())
        self.saved = [b.detach().clone() for b in self.buffers]  # as they were before the step

    @torch.no_grad()
    def allow(self, step: int, result: StepResult) -> bool:
        loss_ok, ok = result.finite()
        bad = (~ok).int().reshape(1)
        if self.acc.num_processes > 1:
            bad = self.acc.reduce(bad, reduction="sum")  # every process skips the same steps
        if not bool(bad):
            self.saved = [b.detach().clone() for b in self.buffers]
            return True
        self.skipped += 1
        bad_terms = [k for k, v in result.terms.items() if not bool(torch.isfinite(v).all())]
        what = _nonfinite_message(step, not bool(loss_ok), bad_terms, self.model)
        log.warning("%s: step skipped (%d so far)", what, self.skipped)
        for b, s in zip(self.buffers, self.saved, strict=True):
            b.copy_(s)
        if self.skipped > self.max_skipped:
            raise NonFiniteError(
                f"{what}; {self.skipped} steps skipped, more than trainer.max_skipped_steps={self.max_skipped}"
            )
        return False

    def check(self, acc, model: nn.Module) -> None:
        """Nothing to report: a non-finite step was dropped when it happened."""


SIGNAL_FAULTS = {"sigkill": "SIGKILL", "sigterm": "SIGTERM", "sigusr1": "SIGUSR1"}


class FaultInjector:
    """The faults of an ``$ATRC_FAULT_INJECT`` spec as ``(what, 1-based step)``; :meth:`wrap` makes
    a step function that injects them."""

    def __init__(self, spec: str):
        self.faults: list[tuple[str, int]] = []
        for item in filter(None, (s.strip() for s in spec.split(","))):
            what, _, at = item.rpartition("@")
            if not what or not at.isdigit():
                raise ValueError(f"ATRC_FAULT_INJECT entry {item!r}: expected <fault>@<step>")
            if what not in (*SIGNAL_FAULTS, "nan_grad") and not what.startswith("nan:"):
                raise ValueError(
                    f"ATRC_FAULT_INJECT entry {item!r}: the faults are {', '.join(SIGNAL_FAULTS)}, "
                    "nan:<batch key>, nan_grad"
                )
            self.faults.append((what, int(at)))

    def wrap(self, step_fn: Callable[..., StepResult]) -> Callable[..., StepResult]:
        """``step_fn(parts, batch, step, ...)`` with the faults of step ``step + 1``: NaN batch
        tensors and signals before it runs, a NaN gradient of the model's first parameter through a
        gradient hook during its backward."""

        def step_with_faults(parts, batch: dict, step: int, *args):
            hooks = []
            for what in [what for what, at in self.faults if at == step + 1]:
                if what in SIGNAL_FAULTS:
                    os.kill(os.getpid(), getattr(signal, SIGNAL_FAULTS[what]))
                elif what.startswith("nan:"):
                    t = batch[what[4:]]
                    batch[what[4:]] = torch.full_like(t.float(), float("nan")).to(t.dtype)
                else:  # nan_grad
                    first = next(p for p in parts.model.parameters() if p.requires_grad)
                    hooks.append(first.register_hook(lambda g: torch.full_like(g, float("nan"))))
            try:
                return step_fn(parts, batch, step, *args)
            finally:
                for h in hooks:
                    h.remove()

        return step_with_faults


def with_faults(step_fn: Callable[..., StepResult]) -> Callable[..., StepResult]:
    """``step_fn`` itself, or — when ``$ATRC_FAULT_INJECT`` is set — wrapped to inject its faults."""
    spec = os.environ.get("ATRC_FAULT_INJECT", "").strip()
    return FaultInjector(spec).wrap(step_fn) if spec else step_fn
