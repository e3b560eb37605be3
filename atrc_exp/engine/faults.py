"""Preemption signals, non-finite losses/gradients and fault injection for the training loop.

* :class:`PreemptionGuard` turns SIGTERM / SIGUSR1 (what SLURM and submitit send before a time
  limit or preemption) into a request that the loop honours at the next step boundary: it saves a
  checkpoint and raises :class:`Preempted`. If another handler was installed before (submitit's,
  which re-queues the job), it is called after the checkpoint is written.
* :class:`NonFiniteError` is raised for a non-finite loss or gradient (``trainer.on_nonfinite=stop``).
* ``$ATRC_FAULT_INJECT`` (tests and drills only) makes a run fail on purpose:
  ``sigkill@K`` (SIGKILL itself during step K, after the forward pass), ``sigterm@K`` / ``sigusr1@K``
  (send itself that signal during step K), ``nan:<key>@K`` (NaN in batch tensor ``<key>`` at step K),
  ``nan_grad@K`` (a NaN gradient at step K). Steps are 1-based; several entries separated by ``,``.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from types import FrameType

import torch

log = logging.getLogger(__name__)

PREEMPTION_SIGNALS = tuple(
    s for s in (getattr(signal, "SIGTERM", None), getattr(signal, "SIGUSR1", None)) if s
)


class Preempted(Exception):
    """The run stopped after a preemption signal; a checkpoint of ``step`` is in ``checkpoint``."""

    def __init__(self, signum: int, step: int, checkpoint: str):
        self.signum, self.step, self.checkpoint = signum, step, checkpoint
        name = signal.Signals(signum).name
        super().__init__(
            f"{name} received: stopped at step {step} after saving {checkpoint}; "
            f"run again with trainer.resume=auto (same run dir) to continue"
        )

    @property
    def exit_code(self) -> int:
        return 128 + int(self.signum)


class NonFiniteError(FloatingPointError):
    """A non-finite loss or gradient; the message names the step and the offending terms."""


class PreemptionGuard:
    """Context manager: while active, SIGTERM/SIGUSR1 set :attr:`signum` instead of killing us."""

    def __init__(self, signals: tuple[int, ...] = PREEMPTION_SIGNALS):
        self.signals = signals
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
        flag = self.signum is not None
        if accelerator is not None and accelerator.num_processes > 1:
            t = torch.tensor([self.signum or 0], device=accelerator.device)
            t = accelerator.reduce(t, reduction="sum")
            if not flag and int(t.item()):
                self.signum = int(t.item()) if int(t.item()) in self.signals else self.signals[0]
            flag = bool(int(t.item()))
        return flag

    def hand_over(self) -> None:
        """Call the handler that was installed before ours (e.g. submitit's re-queue), if any."""
        prev = self._previous.get(self.signum) if self.signum is not None else None
        if callable(prev) and prev not in (signal.default_int_handler,):
            log.info("passing %s on to the previous handler (%r)", signal.Signals(self.signum).name, prev)
            prev(self.signum, None)


def any_nonfinite(accelerator, bad: bool) -> bool:
    """True on every process when ``bad`` is true on any."""
    if accelerator.num_processes == 1:
        return bad
    t = accelerator.reduce(torch.tensor([int(bad)], device=accelerator.device), reduction="sum")
    return bool(int(t.item()))


def nonfinite_grad_params(model: torch.nn.Module, limit: int = 3) -> list[str]:
    """Names of (up to ``limit``) parameters whose gradient has a NaN or Inf."""
    out = []
    for name, p in model.named_parameters():
        if p.grad is not None and not bool(torch.isfinite(p.grad).all()):
            out.append(name)
            if len(out) >= limit:
                break
    return out


class FaultInjector:
    """Parses ``$ATRC_FAULT_INJECT`` (see the module docstring); a no-op when it is unset."""

    def __init__(self, spec: str | None = None):
        spec = os.environ.get("ATRC_FAULT_INJECT", "") if spec is None else spec
        self.faults: list[tuple[str, int]] = []
        for item in filter(None, (s.strip() for s in spec.split(","))):
            what, _, at = item.rpartition("@")
            if not what or not at.isdigit():
                raise ValueError(f"ATRC_FAULT_INJECT entry {item!r}: expected <fault>@<step>")
            self.faults.append((what, int(at)))

    def _at(self, step: int) -> list[str]:
        return [w for w, s in self.faults if s == step]

    def after_forward(self, step: int) -> None:
        for what in self._at(step):
            if what == "sigkill":
                os.kill(os.getpid(), signal.SIGKILL)
            elif what in ("sigterm", "sigusr1"):
                os.kill(os.getpid(), getattr(signal, what.upper()))

    def poison_batch(self, step: int, batch: dict) -> None:
        for what in self._at(step):
            if what.startswith("nan:"):
                key = what[4:]
                batch[key] = torch.full_like(batch[key].float(), float("nan")).to(batch[key].dtype)

    def poison_grads(self, step: int, model: torch.nn.Module) -> None:
        if "nan_grad" in self._at(step):
            p = next(p for p in model.parameters() if p.grad is not None)
            p.grad.view(-1)[0] = float("nan")
