"""JIT builder for the C++/CUDA kernels of the local-attention op in ``kernels/`` (read from
:data:`KERNELS_DIR`): ``cpp`` (C++/OpenMP) and ``cuda``, compiled with
:func:`torch.utils.cpp_extension.load` on first use.

* The build directory is ``<root>/atrc_exp/<name>-<hash16>`` (``<root>``: ``$TORCH_EXTENSIONS_DIR``
  or torch's default ``~/.cache/torch_extensions``), keyed by the sources, the compile flags, the
  torch, Python and CUDA versions and the machine (CPU model and flags: the CPU kernel is built
  with ``-march=native``). Nothing is written into the source tree; a later process only imports.
* A :mod:`filelock` lock next to it makes concurrent processes (DDP ranks, multirun jobs) build once.
* CUDA is built only when ``torch.cuda.is_available()`` and an ``nvcc`` exist. When ``CUDA_HOME``
  is unset we locate the real toolkit behind ``nvcc`` on PATH (which may be a wrapper script that
  ``exec``s the real binary) instead of torch's guess.

A failed build raises :class:`ExtensionBuildError` (cached, so we do not retry on every call).
"""

from __future__ import annotations

import hashlib
import os
import platform
import re
import shutil
import sys
import threading
from pathlib import Path

import torch

from ..config import resource_dir

#: The kernel sources: ``$ATRC_KERNELS_DIR`` when set, else ``resource_dir("kernels")`` (the copy in
#: the installed package, or ``kernels/`` at the top of the checkout).
KERNELS_DIR = Path(os.environ.get("ATRC_KERNELS_DIR") or resource_dir("kernels"))

_OP = "local_attention"  # module and build-directory names, messages
# one CUDA translation unit per dtype (ninja compiles them in parallel; ptxas of one is ~30 s)
_CUDA_DTYPES = ("f32", "bf16", "f16", "f64")
_SOURCES = {
    "cpp": ["local_attention_cpu.cpp"],
    "cuda": ["local_attention_cuda.cpp"] + [f"local_attention_cuda_{d}.cu" for d in _CUDA_DTYPES],
}
# included files: part of the build key too
_HEADERS = {
    "cpp": ["local_attention_dispatch.h", "cpu_vector.h"],
    "cuda": ["local_attention_dispatch.h", "local_attention_cuda.h", "local_attention_cuda.cuh"],
}
_CFLAGS = ["-O3", "-fopenmp", "-march=native", "-ffp-contract=fast"]
_LDFLAGS = ["-fopenmp"]
_CUDA_FLAGS = [
    "-O3",
    "--use_fast_math",
    "-U__CUDA_NO_HALF_OPERATORS__",
    "-U__CUDA_NO_HALF_CONVERSIONS__",
    "-U__CUDA_NO_BFLOAT16_CONVERSIONS__",
]


class ExtensionBuildError(RuntimeError):
    """The extension could not be compiled or imported."""


_lock = threading.Lock()
_cache: dict[str, object] = {}  # kind -> module or ExtensionBuildError


def build_root() -> Path:
    root = os.environ.get("TORCH_EXTENSIONS_DIR") or torch.utils.cpp_extension.get_default_build_root()
    return Path(root) / "atrc_exp"


def _cpu_identity() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor()
    found = [re.search(rf"^{field}\s*:\s*(.*)$", text, re.M) for field in ("model name", "flags")]
    return "|".join(m.group(1) if m else "" for m in found)


def find_cuda_home() -> str | None:
    """The CUDA toolkit root: ``$CUDA_HOME``/``$CUDA_PATH``, else the real toolkit behind
    ``nvcc`` on PATH (following symlinks and ``exec`` wrapper scripts)."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            return os.environ[var]
    nvcc = shutil.which("nvcc")
    seen = set()
    while nvcc and nvcc not in seen:
        seen.add(nvcc)
        nvcc = os.path.realpath(nvcc)
        try:
            with open(nvcc, "rb") as f:
                head = f.read(4096)
        except OSError:
            return None
        if head.startswith(b"\x7fELF"):
            return str(Path(nvcc).parent.parent)
        # a shell wrapper: follow the first absolute path to an nvcc it execs
        m = re.search(rb"(/\S*/nvcc)\b", head)
        nvcc = m.group(1).decode() if m else None
    default = Path("/usr/local/cuda/bin/nvcc")
    return str(default.parent.parent) if default.exists() else None


def cuda_build_possible() -> bool:
    if not torch.cuda.is_available() or torch.version.cuda is None:
        return False
    home = find_cuda_home()
    return bool(home) and (Path(home) / "bin" / "nvcc").exists()


def _source_paths(kind: str) -> list[Path]:
    return [KERNELS_DIR / s for s in _SOURCES[kind]]


def _build_key(kind: str) -> str:
    h = hashlib.sha256()
    for p in _source_paths(kind) + [KERNELS_DIR / f for f in _HEADERS[kind]]:
        h.update(p.name.encode())
        h.update(p.read_bytes())
    h.update(repr((_CFLAGS, _LDFLAGS, _CUDA_FLAGS)).encode())
    h.update(torch.__version__.encode())
    h.update(f"{sys.version_info[:2]}|{platform.machine()}|{platform.system()}".encode())
    h.update(_cpu_identity().encode())
    if kind == "cuda":
        h.update(str(torch.version.cuda).encode())
        h.update(str(find_cuda_home()).encode())
        h.update(os.environ.get("TORCH_CUDA_ARCH_LIST", "").encode())
        if torch.cuda.is_available():
            for i in range(torch.cuda.device_count()):
                h.update(str(torch.cuda.get_device_capability(i)).encode())
    return h.hexdigest()[:16]


def _build(kind: str, verbose: bool = False):
    """Compile (or just import, when already built) the extension of ``kind`` (see :data:`_SOURCES`)."""
    import filelock
    from torch.utils import cpp_extension

    cuda = kind == "cuda"
    sources = _source_paths(kind)
    missing = [str(p) for p in sources if not p.exists()]
    if missing:
        raise ExtensionBuildError(f"{_OP} {kind} sources not found: {missing}")
    if cuda:
        if not cuda_build_possible():
            raise ExtensionBuildError("CUDA extension needs torch.cuda.is_available() and nvcc")
        home = find_cuda_home()
        os.environ.setdefault("CUDA_HOME", home)
        cpp_extension.CUDA_HOME = home  # torch guessed it at import time (wrongly for wrappers)
    elif shutil.which(os.environ.get("CXX", "c++")) is None:
        raise ExtensionBuildError("no C++ compiler found (set $CXX or install g++)")
    key = _build_key(kind)
    build_dir = build_root() / f"{_OP}_{kind}-{key}"
    build_dir.mkdir(parents=True, exist_ok=True)
    try:
        with filelock.FileLock(str(build_dir) + ".lock"):
            return cpp_extension.load(  # (it appends to the flag lists: pass copies)
                name=f"atrc_{_OP}_{kind}_{key}",
                sources=[str(p) for p in sources],
                build_directory=str(build_dir),
                extra_cflags=["-O3"] if cuda else list(_CFLAGS),
                extra_ldflags=[] if cuda else list(_LDFLAGS),
                extra_cuda_cflags=list(_CUDA_FLAGS) if cuda else None,
                verbose=verbose,
            )
    except Exception as e:  # compiler missing, compile error, import error
        raise ExtensionBuildError(f"building the {_OP} {kind} extension failed: {e}") from e


def get_extension(kind: str, verbose: bool = False):
    """The built module for ``kind`` (``"cpp"`` or ``"cuda"``); raises
    :class:`ExtensionBuildError` (and remembers the failure) when it cannot be built."""
    with _lock:
        got = _cache.get(kind)
        if got is None:
            try:
                got = _build(kind, verbose=verbose)
            except Exception as e:  # noqa: BLE001 - any failure means "not available"
                ok = isinstance(e, ExtensionBuildError)
                got = e if ok else ExtensionBuildError(f"building the {_OP} {kind} extension failed: {e}")
            _cache[kind] = got
    if isinstance(got, ExtensionBuildError):
        raise got
    return got
