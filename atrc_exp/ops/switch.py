"""The process-wide backend choice of a custom op and its one-time warnings."""

from __future__ import annotations

import threading
import warnings


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

    def warn_once(self, key: str, msg: str, stacklevel: int = 4) -> None:
        """A ``RuntimeWarning`` with ``msg``, the first time ``key`` is seen in this process."""
        with self._lock:
            if key in self._warned:
                return
            self._warned.add(key)
        warnings.warn(msg, RuntimeWarning, stacklevel=stacklevel)

    def extension(self, kind: str, fallback: str):
        """The built extension ``kind`` (see :mod:`atrc_exp.ops.build`), or None when it cannot be
        built under ``auto`` (warned once: ``fallback`` names what runs instead); under ``cpp``
        the :class:`~atrc_exp.ops.build.ExtensionBuildError` propagates."""
        from . import build

        try:
            return build.get_extension(kind)
        except build.ExtensionBuildError as e:
            if self.name == "cpp":
                raise
            self.warn_once(
                "build",
                f"{self.op}: the C++ kernel is unavailable ({e}); {fallback} (slower on the CPU; set "
                f"ops.{self.op}.backend=torch to silence this)",
                stacklevel=5,
            )
            return None

    def reset_warnings(self) -> None:
        """Forget which warnings were issued (tests)."""
        with self._lock:
            self._warned.clear()
