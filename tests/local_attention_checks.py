"""Test-only helpers of the local-attention op: an independent unfold oracle and the nvcc
compile check of the CUDA sources (no GPU needed)."""

from __future__ import annotations

import hashlib
import math
import os
import subprocess
from pathlib import Path

import torch
import torch.nn.functional as F

from atrc_exp.ops import build


def local_attention_naive(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, kernel_size: int = 9
) -> torch.Tensor:
    """The op written with ``F.unfold`` and autograd only: an independent oracle for tests
    (memory O(B·C·k²·H·W); use it on small inputs)."""
    B, C, H, W = query.shape
    r = kernel_size // 2
    kk = F.unfold(key, kernel_size, padding=r).view(B, C, kernel_size * kernel_size, H, W)
    vv = F.unfold(value, kernel_size, padding=r).view(B, C, kernel_size * kernel_size, H, W)
    s = (query.unsqueeze(2) * kk).sum(1) / math.sqrt(C)
    a = torch.softmax(s, dim=1)
    return (a.unsqueeze(1) * vv).sum(2)


def compile_check_cuda(out_dir: str | None = None, quick: bool = True) -> subprocess.CompletedProcess:
    """Compile the CUDA sources to object files with the real nvcc (no GPU needed), the per-dtype
    units in parallel, and syntax-check the binding unit (``local_attention_cuda.cpp``) with the
    host compiler: the tests' check that the CUDA sources compile on CPU-only machines. ``quick``:
    only the float32 and bfloat16 units with k in {9, generic} (``LA_QUICK_COMPILE_CHECK``) and
    ptxas -O0 (the full build takes minutes). Returns the first failure (or the last success)."""
    import inspect
    import sysconfig
    import tempfile

    from torch.utils import cpp_extension

    home = build.find_cuda_home()
    if home is None:
        raise build.ExtensionBuildError("nvcc not found")
    nvcc = str(Path(home) / "bin" / "nvcc")
    cpp_extension.CUDA_HOME = home
    out_dir = out_dir or tempfile.mkdtemp(prefix="atrc_nvcc_")
    units = ["f32", "bf16"] if quick else list(build._CUDA_DTYPES)
    files = build._source_paths("cuda") + [build.KERNELS_DIR / f for f in build._HEADERS["cuda"]]
    h = hashlib.sha256(b"".join(p.read_bytes() for p in files))
    h.update(f"{quick}|{torch.__version__}|{home}|{build._CUDA_FLAGS}".encode())
    stamp = build.build_root() / f"local_attention_cuda_check-{h.hexdigest()[:16]}.ok"
    if stamp.exists():  # these exact sources already compiled with this toolkit and torch
        return subprocess.CompletedProcess(["cached", str(stamp)], 0, "", "")
    if "device_type" in inspect.signature(cpp_extension.include_paths).parameters:
        incs = cpp_extension.include_paths(device_type="cuda")
    else:
        incs = cpp_extension.include_paths(cuda=True)
    incs = [f"-I{p}" for p in [*incs, sysconfig.get_paths()["include"], str(Path(home) / "include")]]
    abi = "-D_GLIBCXX_USE_CXX11_ABI=" + str(int(torch._C._GLIBCXX_USE_CXX11_ABI))
    defs = [abi, "-DTORCH_EXTENSION_NAME=atrc_la_check", "-DTORCH_API_INCLUDE_EXTENSION_H"]
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    cmds = []
    for unit in units:
        src = build.KERNELS_DIR / f"local_attention_cuda_{unit}.cu"
        cmd = [nvcc, "-c", str(src), "-o", str(Path(out_dir) / f"la_{unit}.o")]
        cmd += ["-arch=sm_90", "-std=c++20", "-O3", "--use_fast_math", "-Xcompiler", "-fPIC", *defs]
        cmd += build._CUDA_FLAGS[2:] + incs
        if quick:
            cmd += ["-DLA_QUICK_COMPILE_CHECK", "-Xptxas", "-O0"]
        cmds.append(cmd)
    binding = str(build.KERNELS_DIR / "local_attention_cuda.cpp")
    cmds.append([os.environ.get("CXX", "c++"), "-fsyntax-only", "-std=c++20", *defs, binding, *incs])
    procs = [subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for c in cmds]
    for c, proc in zip(cmds, procs):
        out, err = proc.communicate()
        res = subprocess.CompletedProcess(c, proc.returncode, out, err)
        if proc.returncode != 0:
            for other in procs:
                other.kill()
                other.wait()
            return res
    stamp.parent.mkdir(parents=True, exist_ok=True)
    stamp.write_text("\n".join(" ".join(c) for c in cmds))
    return res
