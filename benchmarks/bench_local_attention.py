"""Benchmark atrc_exp.ops.local_attention: every available backend, same run, with ratios.

    python benchmarks/bench_local_attention.py --out bench.json
    python benchmarks/bench_local_attention.py --sizes 2x33x48x64 8x33x107x140 --threads 2

For each size (B x C x H x W, k = 9 by default) and backend it reports the forward time
(no autograd) and the forward+backward time (median of --repeat runs after a warm-up), the
speed-up against the PyTorch reference measured in the same run, and the arithmetic floor:
4·B·C·H·W·k² FLOPs forward and ~2× that backward, divided by the matmul throughput measured in
the same process (CPU) — plus the bytes that must move. CUDA rows (fp32, bf16) appear when a GPU
and the CUDA extension are available; their peak memory is reported too.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

from atrc_exp.ops import available_backends
from atrc_exp.ops.local_attention import local_attention


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _time(fn, device: str, repeat: int, warmup: int = 1, inner: int = 1) -> float:
    """Median over ``repeat`` samples of the time per call; each sample runs ``inner`` calls
    back to back between two synchronisations (on CUDA, so that launch and sync latency do not
    dominate calls of ~100 µs)."""
    for _ in range(warmup):
        fn()
    _sync(device)
    ts = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        _sync(device)
        ts.append((time.perf_counter() - t0) / inner)
    return statistics.median(ts)


def matmul_gflops(device: str, dtype: torch.dtype) -> float:
    n = 1024 if device == "cpu" else 8192
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    t = _time(lambda: a @ b, device, repeat=3)
    return 2 * n**3 / t / 1e9


def bench_one(backend, device, dtype, shape, ks, repeat):
    B, C, H, W = shape
    g = torch.Generator(device="cpu").manual_seed(0)
    q, k, v, go = (torch.randn(shape, generator=g).to(device=device, dtype=dtype) for _ in range(4))
    inner = 20 if device == "cuda" else 1
    with torch.no_grad():
        t_fwd = _time(lambda: local_attention(q, k, v, ks, backend=backend), device, repeat, inner=inner)
    qq, kk, vv = (t.clone().requires_grad_(True) for t in (q, k, v))

    def fwd_bwd():
        out = local_attention(qq, kk, vv, ks, backend=backend)
        torch.autograd.grad(out, (qq, kk, vv), go)

    peak = None
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t_fb = _time(fwd_bwd, device, repeat, inner=inner)
    if device == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**20
    return t_fwd, t_fb, peak


def kernel_profile(device: str, dtype: torch.dtype, shape, ks: int, n: int = 5) -> dict[str, float]:
    """Mean µs per fwd+bwd call of each CUDA kernel the ``cuda`` backend launches (torch.profiler)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    g = torch.Generator(device="cpu").manual_seed(0)
    q, k, v, go = (torch.randn(shape, generator=g).to(device=device, dtype=dtype) for _ in range(4))
    qq, kk, vv = (t.requires_grad_(True) for t in (q, k, v))
    for _ in range(2):
        torch.autograd.grad(local_attention(qq, kk, vv, ks, backend="cuda"), (qq, kk, vv), go)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(n):
            torch.autograd.grad(local_attention(qq, kk, vv, ks, backend="cuda"), (qq, kk, vv), go)
        torch.cuda.synchronize()
    per: dict[str, float] = {}
    for e in prof.events():
        if e.device_type == DeviceType.CUDA:
            # "void (anonymous namespace)::la_forward_kernel<float, 9>(float const*, ...)"
            name = e.name.removeprefix("void ").replace("(anonymous namespace)::", "")
            name = name.split("<")[0].split("(")[0][:60]
            per[name] = per.get(name, 0.0) + e.time_range.elapsed_us() / n
    return dict(sorted(per.items(), key=lambda kv: -kv[1]))


def _display_command(argv: list[str]) -> str:
    """This script's command line for a report, without ``--markdown``/``--machine`` and their values."""
    shown = [a for i, a in enumerate(argv) if a not in ("--markdown", "--machine")
             and (i == 0 or argv[i - 1] not in ("--markdown", "--machine"))]  # fmt: skip
    return shlex.join(["python", "benchmarks/bench_local_attention.py", *shown])


def _cpu_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def ops_markdown(
    rows: list[dict],
    profiles: dict[str, dict[str, float]],
    machine: str,
    command: str,
    ks: int,
    gpu_gflops: dict[str, float] | None = None,
) -> list[str]:
    """``rows`` (and the ``--profile`` kernel times) in ``benchmarks/RESULTS.md``'s format: a
    heading naming what, the machine and the date, the command, then one table row per size,
    backend and dtype."""
    devices = sorted({r["device"] for r in rows})
    lines = [
        f"### Local-attention op ({', '.join(devices) or 'no rows'}): {machine}, {datetime.date.today().isoformat()}",
        "",
        f"Command: `{command}`",
        "",
        f"torch {torch.__version__}, k = {ks}. Times are per call (median; on CUDA each sample is 20 calls "
        "back to back between two synchronisations); the reference is the pure-PyTorch backend on the same "
        "device; the floor is 3 × 4·B·C·H·W·k² FLOPs at the float32 matmul rate measured in the same run"
        + (f" ({gpu_gflops['torch.float32'] / 1e3:.1f} TFLOP/s on the GPU)" if gpu_gflops else "")
        + "; peak MiB: `torch.cuda.max_memory_allocated` of the fwd+bwd calls (CUDA only).",
        "",
        "| B×C×H×W | backend | device | dtype | fwd ms | fwd+bwd ms | speed-up vs reference (fwd / f+b) "
        "| × floor | peak MiB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]

    def f(x, fmt: str) -> str:
        return "-" if x is None else fmt % x

    for r in rows:
        backend = "torch reference" if r["backend"] == "torch" else r["backend"]
        sp = (
            f"{r['speedup_fwd_vs_torch']:.1f}× / {r['speedup_fwd_bwd_vs_torch']:.1f}×"
            if r["speedup_fwd_vs_torch"] is not None
            else "-"
        )
        lines.append(
            f"| {r['size'].replace('x', '×')} | {backend} | {r['device']} | {r['dtype']} | {r['fwd_s'] * 1e3:.2f} "
            f"| {r['fwd_bwd_s'] * 1e3:.2f} | {sp} | {f(r['x_floor'], '%.1f')} | {f(r['peak_mem_mib'], '%.0f')} |"
        )
    if profiles:
        lines += ["", "CUDA kernels per fwd+bwd call (`--profile`, torch.profiler, mean of 5 calls):", ""]
        for key, per in profiles.items():
            parts = ", ".join(f"{name} {us:.0f} µs" for name, us in per.items())
            lines.append(f"* {key}: total {sum(per.values()):.0f} µs ({parts})")
    return lines


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", nargs="+", default=["2x33x48x64", "8x33x107x140"], help="BxCxHxW")
    p.add_argument("--kernel-size", type=int, default=9)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--ref-repeat", type=int, default=1, help="repeats for the slow PyTorch reference")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    p.add_argument("--no-reference", action="store_true", help="skip the PyTorch reference rows")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    p.add_argument("--skip-cpu", action="store_true", help="only the CUDA rows (GPU machines)")
    p.add_argument("--profile", action="store_true", help="CUDA: µs per call of each kernel (torch.profiler)")
    p.add_argument("--markdown", default=None, help="also write the rows as a RESULTS.md table here")
    p.add_argument("--machine", default=None, help="machine name for --markdown (default: the GPU's / CPU's)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    ks = args.kernel_size
    if args.skip_cpu:  # do not build the C++ extension either
        backends = ["torch"] + (["cuda"] if "cuda" in available_backends(("cuda",)) else [])
    else:
        backends = available_backends()
    rows = []
    cpu_gflops = matmul_gflops("cpu", torch.float32)
    gpu_gflops = {}
    if "cuda" in backends:
        for dt in (torch.float32, torch.bfloat16):
            gpu_gflops[str(dt)] = matmul_gflops("cuda", dt)  # float32: TF32 off (PyTorch's default)
    configs = [("torch", "cpu", torch.float32)] if not (args.no_reference or args.skip_cpu) else []
    if "cpp" in backends and not args.skip_cpu:
        configs.append(("cpp", "cpu", torch.float32))
    if "cuda" in backends:
        if not args.no_reference:
            configs.append(("torch", "cuda", torch.float32))
        configs += [("cuda", "cuda", torch.float32), ("cuda", "cuda", torch.bfloat16)]
    for size in args.sizes:
        shape = tuple(int(x) for x in size.lower().split("x"))
        B, C, H, W = shape
        flops_fwd = 4 * B * C * H * W * ks * ks
        flops_fb = 3 * flops_fwd
        ref = {}
        for backend, device, dtype in configs:
            rep = args.ref_repeat if backend == "torch" else args.repeat
            t_fwd, t_fb, peak = bench_one(backend, device, dtype, shape, ks, rep)
            esize = torch.finfo(dtype).bits // 8
            bytes_fb = (4 + 7) * B * C * H * W * esize  # fwd: q,k,v,out; bwd: g,q,k,v,dq,dk,dv
            # the kernels compute in float32 on CUDA cores whatever the storage dtype: the
            # float32 matmul rate (no TF32) is their arithmetic ceiling for bf16 too
            peak_gflops = cpu_gflops if device == "cpu" else gpu_gflops.get(str(torch.float32))
            floor = flops_fb / (peak_gflops * 1e9) if peak_gflops else None
            if backend == "torch":
                ref[device] = (t_fwd, t_fb)
            base = ref.get(device)
            rows.append(
                dict(
                    size=size,
                    backend=backend,
                    device=device,
                    dtype=str(dtype).replace("torch.", ""),
                    k=ks,
                    fwd_s=t_fwd,
                    fwd_bwd_s=t_fb,
                    speedup_fwd_vs_torch=(base[0] / t_fwd) if base else None,
                    speedup_fwd_bwd_vs_torch=(base[1] / t_fb) if base else None,
                    gflops_fwd_bwd=flops_fb / t_fb / 1e9,
                    floor_fwd_bwd_s=floor,
                    x_floor=(t_fb / floor) if floor else None,
                    bytes_fwd_bwd=bytes_fb,
                    peak_mem_mib=peak,
                )
            )
    hdr = f"{'size':>14} {'backend':>7} {'dev':>4} {'dtype':>8} {'fwd ms':>9} {'fwd+bwd ms':>11} {'x ref fwd':>9} {'x ref f+b':>9} {'GFLOP/s':>8} {'x floor':>7} {'MB moved':>8} {'peak MiB':>8}"
    print(
        f"threads={torch.get_num_threads()}  cpu matmul {cpu_gflops:.1f} GFLOP/s (floor = FLOPs / this)  k={ks}"
    )
    print(hdr)
    for r in rows:
        f = lambda x, fmt: (fmt % x) if x is not None else "-"  # noqa: E731
        print(
            f"{r['size']:>14} {r['backend']:>7} {r['device']:>4} {r['dtype']:>8} {r['fwd_s'] * 1e3:9.2f} {r['fwd_bwd_s'] * 1e3:11.2f} "
            f"{f(r['speedup_fwd_vs_torch'], '%.1fx'):>9} {f(r['speedup_fwd_bwd_vs_torch'], '%.1fx'):>9} {r['gflops_fwd_bwd']:8.1f} "
            f"{f(r['x_floor'], '%.1f'):>7} {r['bytes_fwd_bwd'] / 1e6:8.1f} {f(r['peak_mem_mib'], '%.0f'):>8}"
        )
    profiles = {}
    if args.profile and "cuda" in backends:
        for size in args.sizes:
            shape = tuple(int(x) for x in size.lower().split("x"))
            for dtype in (torch.float32, torch.bfloat16):
                key = f"{size} {str(dtype).replace('torch.', '')}"
                profiles[key] = kernel_profile("cuda", dtype, shape, ks)
                print(f"kernels per fwd+bwd call, {key}: total {sum(profiles[key].values()):.0f} µs")
                for name, us in profiles[key].items():
                    print(f"  {us:9.1f} µs  {name}")
    if args.markdown:
        machine = args.machine or (torch.cuda.get_device_name() if "cuda" in backends else _cpu_name())
        command = _display_command(sys.argv[1:] if argv is None else argv)
        text = ops_markdown(rows, profiles, machine=machine, command=command, ks=ks, gpu_gflops=gpu_gflops)
        Path(args.markdown).write_text("\n".join(text) + "\n")
        print(f"wrote {args.markdown}")
    if args.out:
        meta = dict(
            torch=torch.__version__,
            machine=platform.machine(),
            processor=platform.processor(),
            threads=torch.get_num_threads(),
            cpu_matmul_gflops=cpu_gflops,
            gpu_matmul_gflops=gpu_gflops,
            cuda_device=torch.cuda.get_device_name() if torch.cuda.is_available() else None,
            backends=backends,
        )
        with open(args.out, "w") as fh:
            json.dump({"meta": meta, "rows": rows, "kernel_profiles_us": profiles}, fh, indent=2)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
