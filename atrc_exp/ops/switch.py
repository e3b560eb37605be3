"""The process-wide backend choice of a custom op and its one-time warnings."""

from __future__ import annotations

import threading
import warnings
from collections.abc import Callable


class BackendSwitch:
    """Which implementation ``op`` uses (one of ``choices``; ``auto`` by default), set from the
    Hydra config or in code, plus warnings that are issued once per key."""

    def __init__(self, op: str, choices: tuple[str, ...], default: str = "auto"):
        self.op = op
        self.choices = choices
        self.name = default
        self._warned: set[str] = set()
        self._lock = threading.Lock()

    def set(self, name: str) -> None:
        if name not in self.choices:
            raise ValueError(f"{self.op} backend must be one of {self.choices}, got {name!r}")
        self.name = name

    def accessors(self, function: str) -> tuple[Callable[[str], None], Callable[[], str]]:
        """The op module's public ``(set_backend, get_backend)``, documented for ``function``
        (the op's entry point, named in their docstrings)."""
        choices = " | ".join(self.choices)

        def set_backend(name: str) -> None:
            self.set(name)

        def get_backend() -> str:
            return self.name

        set_backend.__doc__ = f"Select the implementation used by :func:`{function}`: {choices}."
        get_backend.__doc__ = f"The implementation :func:`{function}` uses now: {choices}."
        return set_backend, get_backend

    def warn_once(self, key: str, msg: str, stacklevel: int = 4) -> None:
        """A ``RuntimeWarning`` with ``msg``, the first time ``key`` is seen in this process."""
        with self._lock:
            if key in self._warned:
                return
            self._warned.add(key)
        warnings.warn(msg, RuntimeWarning, stacklevel=stacklevel)

    def reset_warnings(self) -> None:
        """Forget which warnings were issued (tests)."""
        with self._lock:
            self._warned.clear()
