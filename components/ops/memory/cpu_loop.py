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
from torch.autograd.function import once_differentiable

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


class CpuLoop(torch.autograd.Function):
    """Whole chunks q, k, v (B, K, c, d) with their gates (lr, log eta, log keep: (B, K, 1, c);
    the last two None when off) from states M, S (B, d, d) -> reads (B, K c, d) and the end
    state. The kernel computes each chunk's coefficients from the gates itself (by their
    recurrences, `Coefs` in the source) and gives back the gates' gradients."""

    takes_gates = True  # token.py passes the split gates, not `coefficients.Coefficients`

    @staticmethod
    def run(setting, q, k, v, gates, M, S):
        B, K, C, d = q.shape
        P = setting.prior[0] if setting.prior else None
        out = CpuLoop.apply(setting, q, k, v, *gates, M[0], S[0] if S is not None else None, P)
        return out[0].reshape(B, K * C, d), (out[1],), (out[2],) if S is not None else None

    @staticmethod
    def forward(ctx, setting, q, k, v, lr, log_eta, log_keep, M, S, P):
        B, K, C, d = q.shape
        dt = M.dtype
        cast = lambda t: None if t is None else t.detach().to(dt).reshape(B, K, C).contiguous()  # noqa: E731
        state = lambda t: None if t is None else t.detach().to(dt).contiguous()  # noqa: E731
        q, k, v = (t.detach().to(dt).contiguous() for t in (q, k, v))
        gates = [cast(t) for t in (lr, log_eta, log_keep)]
        M0, S0, P0 = state(M), state(S), state(P)
        y = torch.empty(B, K, C, d, dtype=dt)
        M_out, S_out = torch.empty_like(M0), torch.empty_like(M0) if S is not None else None
        M_st = torch.empty(B, K, d, d, dtype=dt)
        S_st = torch.empty_like(M_st) if S is not None else None
        flags = _flags(setting.model, K, C, d, S is not None, P is not None)
        _launch("linear_forward", B, flags, [q, k, v, *gates, M0, S0, P0, y, M_out, S_out, M_st, S_st])
        ctx.setting, ctx.flags, ctx.dtypes = setting, flags, (q.dtype, M.dtype)
        none = q.new_empty(0)  # saved in place of what is off
        kept = [*(g if g is not None else none for g in gates), P0 if P0 is not None else none]
        ctx.save_for_backward(q, k, v, *kept, M_st, S_st if S_st is not None else none)
        ctx.present = [t is not None for t in (log_eta, log_keep, P, S)]
        return y, M_out, S_out

    @staticmethod
    @once_differentiable
    def backward(ctx, dy, dM, dS):
        q, k, v, lr, log_eta, log_keep, P0, M_st, S_st = ctx.saved_tensors
        has_eta, has_keep, has_P, has_S = ctx.present
        log_eta, log_keep = (log_eta if has_eta else None), (log_keep if has_keep else None)
        P0, S_st = (P0 if has_P else None), (S_st if has_S else None)
        B, K, C, d = q.shape
        dt = q.dtype
        cast = lambda t: None if t is None else t.to(dt).contiguous()  # noqa: E731
        zeros = lambda: torch.zeros(B, d, d, dtype=dt)  # noqa: E731  (an end state nothing used)
        dM = cast(dM) if dM is not None else zeros()
        dS = (cast(dS) if dS is not None else zeros()) if has_S else None
        dq, dk, dv = (torch.empty(B, K, C, d, dtype=dt) for _ in range(3))
        dlr = torch.empty(B, K, C, dtype=dt)
        dle = torch.empty_like(dlr) if has_eta else None
        dlk = torch.empty_like(dlr) if has_keep else None
        dM0 = torch.empty(B, d, d, dtype=dt)
        dS0 = torch.empty_like(dM0) if has_S else None
        dP = torch.empty_like(dM0) if has_P else None
        tensors = [q, k, v, lr, log_eta, log_keep, P0, M_st, S_st, cast(dy), dM, dS, dq, dk, dv, dlr, dle, dlk]
        _launch("linear_backward", B, ctx.flags, [*tensors, dM0, dS0, dP])
        in_dtype, wt = ctx.dtypes
        gate = lambda g: None if g is None else g.reshape(B, K, 1, C)  # noqa: E731
        return (
            None, dq.to(in_dtype), dk.to(in_dtype), dv.to(in_dtype), gate(dlr), gate(dle), gate(dlk),
            dM0.to(wt), dS0.to(wt) if has_S else None, dP.to(wt) if has_P else None,
        )  # fmt: skip


def _flags(model, K: int, C: int, d: int, has_S: bool, has_P: bool) -> tuple:
    return (K, C, d, int(has_S), int(has_P), int(model.step_cap is not None), int(model.residual),
            float(model.step_cap or 0.0))  # fmt: skip


def _launch(name: str, B: int, flags: tuple, tensors: list) -> None:
    """Runs one of the kernel's entry points on `tensors` (None: a null pointer, for what is off)
    over torch's intra-op thread count. The kernel trusts their sizes, so they are checked here."""
    K, C, d = flags[:3]
    sizes = {B * K * C * d, B * K * C, B * d * d, B * K * d * d}
    given = [t for t in tensors if t is not None]
    if any(not t.is_contiguous() or t.numel() not in sizes or t.dtype != given[0].dtype for t in given):
        raise ValueError(f"the C++ kernel got a tensor of another size, layout or dtype ({name})")
    ptrs = (ctypes.c_void_p * len(tensors))(*[None if t is None else t.data_ptr() for t in tensors])
    is_double = int(given[0].dtype == torch.float64)
    getattr(library(), name)(B, *flags[:7], flags[7], is_double, torch.get_num_threads(), ptrs)
