"""The C++ kernel's launcher for `kernel_loop.KernelLoop` on CPU (`cpu_linear.cpp`: the linear
memory), and its build.

The source is compiled once per machine with the system's C++ compiler into a cache directory
keyed by the source's hash (a few seconds, no torch headers: it links against the MKL GEMM
that torch's CPU library exports), and loaded with ctypes. Where no compiler or no exported
GEMM is found, `library()` says why and `backend: auto` keeps the torch path.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
from functools import cache
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("cpu_linear.cpp")


def _cache_dir() -> Path:
    root = os.environ.get("TITANS_NAS_KERNEL_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "titans_nas", "kernels"
    )
    return Path(root)


def _cpu_flags() -> bytes:
    """This CPU's instruction sets (-march=native builds for them: a shared cache directory on
    machines of another kind gets its own build)."""
    try:
        return next((line for line in open("/proc/cpuinfo", "rb") if line.startswith(b"flags")), b"")
    except OSError:
        import platform

        return platform.processor().encode()


@cache
def library() -> ctypes.CDLL | str:
    """The built kernel library, or the reason there is none (a string)."""
    compiler = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if compiler is None:
        return "no C++ compiler (g++ / c++ / $CXX) on PATH"
    torch_lib = Path(torch.__file__).parent / "lib"
    if not (torch_lib / "libtorch_cpu.so").exists():
        return f"no libtorch_cpu.so in {torch_lib}"
    src = SOURCE.read_bytes()
    key = hashlib.sha256(src + compiler.encode() + str(torch_lib).encode() + _cpu_flags()).hexdigest()[:16]
    out = _cache_dir() / key / "cpu_linear.so"
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=out.parent) as tmp:  # built aside, then renamed: parallel workers
            built = Path(tmp) / out.name
            cmd = [compiler, "-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", str(SOURCE), "-o", str(built)]
            cmd += [f"-L{torch_lib}", "-ltorch_cpu", f"-Wl,-rpath,{torch_lib}"]
            try:
                done = subprocess.run(cmd, capture_output=True, text=True)
            except OSError as e:
                return f"the C++ kernel did not build ({' '.join(cmd)}): {e}"
            if done.returncode != 0:
                return f"the C++ kernel did not build ({' '.join(cmd)}): {done.stderr.strip()[-2000:]}"
            os.replace(built, out)
    lib = ctypes.CDLL(str(out))
    for name in ("linear_forward", "linear_backward"):
        fn = getattr(lib, name)
        fn.restype = None
        fn.argtypes = [ctypes.c_int] * 8 + [ctypes.c_double] + [ctypes.c_int] * 2 + [ctypes.c_void_p]
    return lib


def reach(setting, M: tuple[torch.Tensor, ...], q: torch.Tensor) -> str | None:
    """Why the C++ kernel cannot run these chunks (None: it can): `common.kernel_reach`, on
    float32 / float64 CPU tensors, with the library built."""
    from components.ops.memory.kernel_loop import reach as kernel_reach

    if q.device.type != "cpu":
        return "the C++ kernel runs on CPU tensors"
    if M[0].dtype not in (torch.float32, torch.float64):
        return f"the C++ kernel computes in float32 or float64, not {M[0].dtype}"
    reason = kernel_reach("cpp", setting, M, q)
    if reason is not None:
        return reason
    lib = library()
    return lib if isinstance(lib, str) else None


class CpuLoop:
    @staticmethod
    def run(setting, q, k, v, co, M, S):
        from components.ops.memory.kernel_loop import KernelLoop

        return KernelLoop.run(Cpu(), setting, q, k, v, co, M, S)


class Cpu:
    """Runs the C++ kernel on the rows (batch x heads) over torch's intra-op thread count."""

    def dtype(self, state_dtype: torch.dtype) -> torch.dtype:
        return state_dtype

    def inputs(self, t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return t.to(dtype).contiguous()

    def _call(self, name, L, B, tensors, K, cap, flags):
        C, D = flags["C"], flags["D"]  # the kernel trusts these sizes: every tensor is checked against them
        sizes = {B * K * C * D, B * K * C, B * K * C * C, B * K, B * D * D, B * K * D * D, 1}
        if any(not t.is_contiguous() or t.numel() not in sizes or t.dtype != tensors[0].dtype for t in tensors):
            raise ValueError(f"the C++ kernel got a tensor of another size, layout or dtype ({name})")
        ptrs = (ctypes.c_void_p * len(tensors))(*[t.data_ptr() for t in tensors])
        f = flags
        getattr(library(), name)(
            B, K, f["C"], f["D"], int(f["HAS_S"]), int(f["HAS_P"]), int(f["CAP"]), int(f["RESIDUAL"]), cap,
            int(tensors[0].dtype == torch.float64), torch.get_num_threads(), ptrs,
        )  # fmt: skip

    def forward(self, L, B, tensors, K, cap, flags):
        self._call("linear_forward", L, B, tensors, K, cap, flags)

    def backward(self, L, B, tensors, K, cap, flags):
        self._call("linear_backward", L, B, tensors, K, cap, flags)
