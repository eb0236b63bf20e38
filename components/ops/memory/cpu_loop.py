"""The C++ kernel of the memory on CPU (`cpu_kernel.cpp`: the linear memory and the MLP memory
of any depth, and the short convolution, SiLU and l2 norm before it; the same library runs the
blocks' RMSNorm, rotary positions and SwiGLU product), its autograd.Functions and its build.

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
from torch.utils._python_dispatch import _get_current_dispatch_mode

SOURCE = Path(__file__).with_name("cpu_kernel.cpp")
# -mprefer-vector-width=512: 512-bit vectors in the loops the compiler vectorizes too (GCC picks
# 256 bits on AVX-512 cores unless told; nothing changes without AVX-512): train steps ran
# 1.01-1.03x faster, alternated (docs/benchmarks.md). The flags are part of the cache key.
FLAGS = ("-O3", "-march=native", "-mprefer-vector-width=512", "-fopenmp", "-shared", "-fPIC")


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


def compiler() -> str | None:
    """The C++ compiler the kernel is built with: $CXX, else g++ or c++ on PATH."""
    return os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")


def link_flags(torch_lib: Path) -> list[str]:
    """Linking against the MKL GEMM that torch's CPU library exports (`sgemm_`, `dgemm_`)."""
    return [f"-L{torch_lib}", "-ltorch_cpu", f"-Wl,-rpath,{torch_lib}"]


@cache
def library() -> ctypes.CDLL | str:
    """The built kernel library, or the reason there is none (a string)."""
    cxx = compiler()
    if cxx is None:
        return "no C++ compiler (g++ / c++ / $CXX) on PATH"
    torch_lib = Path(torch.__file__).parent / "lib"
    if not (torch_lib / "libtorch_cpu.so").exists():
        return f"no libtorch_cpu.so in {torch_lib}"
    src = SOURCE.read_bytes()
    key = hashlib.sha256(src + " ".join([cxx, *FLAGS, str(torch_lib)]).encode() + _cpu_flags()).hexdigest()[:16]
    out = _cache_dir() / key / "cpu_kernel.so"
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=out.parent) as tmp:  # built aside, then renamed: parallel workers
            built = Path(tmp) / out.name
            cmd = [cxx, *FLAGS, str(SOURCE), "-o", str(built), *link_flags(torch_lib)]
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
    for name in ("mlp_forward", "mlp_backward"):
        fn = getattr(lib, name)
        fn.restype = None
        fn.argtypes = [ctypes.c_int] * 4 + [ctypes.c_void_p] + [ctypes.c_int] * 6 + [ctypes.c_double]
        fn.argtypes += [ctypes.c_int] * 2 + [ctypes.c_void_p]
    lib.mlp_work_floats.restype = ctypes.c_long
    lib.mlp_work_floats.argtypes = [ctypes.c_int] * 3 + [ctypes.c_void_p] + [ctypes.c_int] * 2
    lib.activations.restype = None
    lib.activations.argtypes = [ctypes.c_int] * 2 + [ctypes.c_void_p] * 4
    for name in ("conv_forward", "conv_backward"):
        fn = getattr(lib, name)
        fn.restype = None
        fn.argtypes = [ctypes.c_int] * 8 + [ctypes.c_void_p]
    for name in ("silu_l2_forward", "silu_l2_backward", "rms_norm_backward", "swiglu_forward", "swiglu_backward"):
        fn = getattr(lib, name)
        fn.restype = None
        fn.argtypes = [ctypes.c_long] + [ctypes.c_int] * 3 + [ctypes.c_void_p]
    lib.rope_rotate.restype = None
    lib.rope_rotate.argtypes = [ctypes.c_long] + [ctypes.c_int] * 3 + [ctypes.c_long] + [ctypes.c_int] * 2
    lib.rope_rotate.argtypes += [ctypes.c_void_p]
    lib.rms_norm_forward.restype = None
    lib.rms_norm_forward.argtypes = (
        [ctypes.c_long, ctypes.c_int, ctypes.c_double] + [ctypes.c_int] * 2 + [ctypes.c_void_p]
    )
    return lib


def unavailable(*tensors: torch.Tensor) -> str | None:
    """Why the kernel cannot take these tensors (None: it can): CPU float32 / float64 tensors of
    one dtype, outside any dispatch mode, with the library built."""
    t = tensors[0]
    if any(x.device.type != "cpu" for x in tensors):
        return "the C++ kernel runs on CPU tensors"
    if _get_current_dispatch_mode() is not None:  # torch would not see the kernel's work
        return "a dispatch mode is active (FLOP counting, tracing): the C++ kernel is invisible to it"
    if t.dtype not in (torch.float32, torch.float64) or any(x.dtype != t.dtype for x in tensors):
        return f"the C++ kernel computes in float32 or float64, not {t.dtype}"
    lib = library()
    return lib if isinstance(lib, str) else None


def reach(setting, M: tuple[torch.Tensor, ...], q: torch.Tensor) -> str | None:
    """Why the C++ kernel cannot run these chunks (None: it can): `common.kernel_reach`, on
    CPU states (q is cast to their dtype) the kernel can take."""
    from components.ops.memory.common import setting_reach

    if q.device.type != "cpu":
        return "the C++ kernel runs on CPU tensors"
    return unavailable(M[0]) or setting_reach("cpp", setting, M, q)


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


class CpuMlpLoop(torch.autograd.Function):
    """`CpuLoop` for the MLP memory of any depth L >= 2 (states M_l, S_l, P_l per layer; lr
    (B, K, L', c) with a slot per layer or one for all)."""

    takes_gates = True

    @staticmethod
    def run(setting, q, k, v, gates, M, S):
        B, K, C, d = q.shape
        L = len(M)
        P = setting.prior or (None,) * L
        out = CpuMlpLoop.apply(setting, L, q, k, v, *gates, *M, *(S or (None,) * L), *P)
        return out[0].reshape(B, K * C, d), tuple(out[1 : 1 + L]), tuple(out[1 + L :]) if S is not None else None

    @staticmethod
    def forward(ctx, setting, L, q, k, v, lr, log_eta, log_keep, *rest):
        M, S, P = rest[:L], rest[L : 2 * L], rest[2 * L :]
        has_S, has_P = S[0] is not None, P[0] is not None
        B, K, C, d = q.shape
        dt, in_dtype = M[0].dtype, q.dtype
        slots = lr.shape[2]
        det = lambda t: None if t is None else t.detach().to(dt).contiguous()  # noqa: E731
        q, k, v = (det(t) for t in (q, k, v))
        lr = det(lr)
        log_eta, log_keep = (None if t is None else det(t).reshape(B, K, C) for t in (log_eta, log_keep))
        Mc, Sc, Pc = [det(w) for w in M], [det(w) for w in S], [det(w) for w in P]
        y = torch.empty(B, K, C, d, dtype=dt)
        M_out = [torch.empty_like(w) for w in Mc]
        S_out = [torch.empty_like(w) for w in Mc] if has_S else [None] * L
        M_st = [torch.empty(B, K, *w.shape[1:], dtype=dt) for w in Mc]
        S_st = [torch.empty_like(w) for w in M_st] if has_S else [None] * L
        widths = [Mc[0].shape[1], *(w.shape[2] for w in Mc)]
        flags = _mlp_flags(setting.model, K, C, widths, slots, has_S, has_P)
        # kept for the backward, one tensor per row: a whole layer's at 16K tokens would pass the
        # allocator's mmap threshold (allocator.py) and page-fault on every step
        work = [torch.empty(K * _work_floats(K, C, tuple(widths), has_S, has_P), dtype=dt) for _ in range(B)]
        tensors = [q, k, v, lr, log_eta, log_keep, *Mc, *Sc, *Pc, y, *M_out, *S_out, *M_st, *S_st]
        _mlp_launch("mlp_forward", B, flags, widths, tensors, work)
        none = q.new_empty(0)
        ctx.flags, ctx.widths, ctx.L = flags, widths, L
        ctx.present = (log_eta is not None, log_keep is not None, has_S, has_P)
        ctx.dtypes = (in_dtype, dt)
        ctx.save_for_backward(
            q, k, v, lr, *(t if t is not None else none for t in (log_eta, log_keep)),
            *(t if t is not None else none for t in Pc), *M_st, *(t if t is not None else none for t in S_st), *work,
        )  # fmt: skip
        return (y, *M_out, *(S_out if has_S else [None] * L))

    @staticmethod
    @once_differentiable
    def backward(ctx, dy, *dstate):
        L, (has_eta, has_keep, has_S, has_P) = ctx.L, ctx.present
        q, k, v, lr, log_eta, log_keep, *rest = ctx.saved_tensors
        Pc, M_st, S_st, work = rest[:L], rest[L : 2 * L], rest[2 * L : 3 * L], list(rest[3 * L :])
        log_eta, log_keep = (log_eta if has_eta else None), (log_keep if has_keep else None)
        Pc = list(Pc) if has_P else [None] * L
        S_st = list(S_st) if has_S else [None] * L
        B, K, C, d = q.shape
        dt = q.dtype
        cast = lambda t, like: torch.zeros_like(like) if t is None else t.to(dt).contiguous()  # noqa: E731
        states = [torch.empty(B, *w.shape[2:], dtype=dt) for w in M_st]
        dM = [cast(t, w) for t, w in zip(dstate[:L], states)]
        dS = [cast(t, w) for t, w in zip(dstate[L:], states)] if has_S else [None] * L
        dq, dk, dv = (torch.empty(B, K, C, d, dtype=dt) for _ in range(3))
        dlr = torch.empty_like(lr)
        dle = torch.empty(B, K, C, dtype=dt) if has_eta else None
        dlk = torch.empty(B, K, C, dtype=dt) if has_keep else None
        dM0 = [torch.empty_like(w) for w in states]
        dS0 = [torch.empty_like(w) for w in states] if has_S else [None] * L
        dP = [torch.empty_like(w) for w in states] if has_P else [None] * L
        tensors = [q, k, v, lr, log_eta, log_keep, *Pc, *M_st, *S_st, dy.to(dt).contiguous(), *dM, *dS,
                   dq, dk, dv, dlr, dle, dlk, *dM0, *dS0, *dP]  # fmt: skip
        _mlp_launch("mlp_backward", B, ctx.flags, ctx.widths, tensors, work)
        in_dtype, wt = ctx.dtypes
        gate = lambda g: None if g is None else g.reshape(B, K, 1, C)  # noqa: E731
        return (
            None, None, dq.to(in_dtype), dk.to(in_dtype), dv.to(in_dtype), dlr, gate(dle), gate(dlk),
            *(t.to(wt) for t in dM0), *(t.to(wt) if has_S else None for t in dS0),
            *(t.to(wt) if has_P else None for t in dP),
        )  # fmt: skip


def _mlp_flags(model, K: int, C: int, widths: list[int], slots: int, has_S: bool, has_P: bool) -> tuple:
    return (K, C, len(widths) - 1, slots, int(has_S), int(has_P), int(model.step_cap is not None),
            int(model.residual), int(model.activation == "silu"), float(model.step_cap or 0.0))  # fmt: skip


@cache
def _work_floats(K: int, C: int, widths: tuple[int, ...], has_S: bool, has_P: bool) -> int:
    """Floats per row and chunk of what the MLP forward keeps for its backward: the keys'
    activations and deltas and the reads' products (`MlpChunk::bind`)."""
    w = (ctypes.c_int * len(widths))(*widths)
    return library().mlp_work_floats(K, C, len(widths) - 1, w, int(has_S), int(has_P))


def _mlp_launch(name: str, B: int, flags: tuple, widths: list[int], tensors: list, work: list) -> None:
    """Runs an MLP entry point `name` on `tensors` and the rows' workspaces `work` over torch's
    intra-op threads."""
    K, C, L = flags[:3]
    layer = [B * widths[i] * widths[i + 1] for i in range(L)]
    sizes = {B * K * C * widths[0], B * K * C, B * K * C * flags[3], *layer, *(K * n for n in layer)}
    if len(work) != B:
        raise ValueError(f"the C++ kernel got {len(work)} workspaces for {B} rows ({name})")
    slot = _work_floats(K, C, tuple(widths), bool(flags[4]), bool(flags[5]))
    w = (ctypes.c_int * len(widths))(*widths)
    _call(name, (B, K, C, L, w, *flags[3:9], flags[9]), tensors, sizes, rows=(work, K * slot))


def _flags(model, K: int, C: int, d: int, has_S: bool, has_P: bool) -> tuple:
    return (K, C, d, int(has_S), int(has_P), int(model.step_cap is not None), int(model.residual),
            float(model.step_cap or 0.0))  # fmt: skip


def _launch(name: str, B: int, flags: tuple, tensors: list) -> None:
    """Runs the linear memory's entry point `name` on `tensors` over torch's intra-op threads."""
    K, C, d = flags[:3]
    _call(name, (B, *flags), tensors, {B * K * C * d, B * K * C, B * d * d, B * K * d * d})


def _call(name: str, args: tuple, tensors: list, sizes: set[int], rows: tuple[list, int] | None = None) -> None:
    """Calls the entry point `name` with `args`, then float64 or not, torch's intra-op thread
    count and the array of the tensors' data pointers (None: a null pointer, for what is off);
    `rows` (tensors, size): one tensor per row, passed as one more pointer, to an array of
    theirs. The kernel trusts sizes, so each tensor is checked against the sizes its roles may
    have, with its layout and dtype. The tensors, copies made for the call among them, live in
    this frame until the kernel returns."""
    given = [t for t in tensors if t is not None]
    if rows is not None:
        given += rows[0]
        sizes = sizes | {rows[1]}
    if any(not t.is_contiguous() or t.numel() not in sizes or t.dtype != given[0].dtype for t in given):
        raise ValueError(f"the C++ kernel got a tensor of another size, layout or dtype ({name})")
    ptrs = [None if t is None else t.data_ptr() for t in tensors]
    if rows is not None:
        row_ptrs = (ctypes.c_void_p * len(rows[0]))(*[t.data_ptr() for t in rows[0]])
        ptrs.append(ctypes.addressof(row_ptrs))
    is_double = int(given[0].dtype == torch.float64)
    getattr(library(), name)(*args, is_double, torch.get_num_threads(), (ctypes.c_void_p * len(ptrs))(*ptrs))


def conv_forward(src: torch.Tensor, w: torch.Tensor, bias: torch.Tensor, lead: int) -> torch.Tensor:
    """conv.py's _ShiftedTaps forward in the kernel: src (B, m, d), w (d, k), bias (d) -> y (B, n, d),
    n = m + lead - (k - 1)."""
    B, m, d = src.shape
    k = w.shape[1]
    n = m + lead - (k - 1)
    y = torch.empty(B, n, d, dtype=src.dtype)
    tensors = [src.contiguous(), w.t().contiguous(), bias.contiguous(), y]
    _call("conv_forward", (B, m, n, d, k, lead), tensors, {B * m * d, k * d, d, B * n * d})
    return y


def conv_backward(src: torch.Tensor, w: torch.Tensor, dy: torch.Tensor, lead: int):
    """The gradients of `conv_forward` for dy (B, n, d): of src (B, m, d), w (d, k) and bias (d)."""
    B, m, d = src.shape
    k, n = w.shape[1], dy.shape[1]
    dsrc = torch.empty(B, m, d, dtype=src.dtype)
    dw, db = torch.empty(k, d, dtype=src.dtype), torch.empty(d, dtype=src.dtype)
    tensors = [src.contiguous(), w.t().contiguous(), dy.contiguous(), dsrc, dw, db]
    _call("conv_backward", (B, m, n, d, k, lead), tensors, {B * m * d, k * d, B * n * d, d})
    return dsrc, dw.t(), db


class KernelRows(torch.autograd.Function):
    """y = the kernel function `name`(x) of this module (`silu_l2`, `swiglu`), its gradient by
    `name`_backward at the x it keeps: the contiguous copy the kernel read, nothing else."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, name: str) -> torch.Tensor:
        x = x.contiguous()
        ctx.save_for_backward(x)
        ctx.name = name
        return globals()[name](x)  # looked up at the call: tests record the calls by name

    @staticmethod
    def backward(ctx, dy: torch.Tensor) -> tuple[torch.Tensor, None]:
        (x,) = ctx.saved_tensors
        return globals()[f"{ctx.name}_backward"](x, dy), None


def silu_l2(x: torch.Tensor) -> torch.Tensor:
    """F.normalize(F.silu(x), dim=-1) in the kernel."""
    x = x.contiguous()
    y = torch.empty_like(x)
    _call("silu_l2_forward", (x.numel() // x.shape[-1], x.shape[-1]), [x, y], {x.numel()})
    return y


def silu_l2_backward(x: torch.Tensor, dy: torch.Tensor) -> torch.Tensor:
    """The gradient of `silu_l2` at x for dy."""
    x = x.contiguous()
    dx = torch.empty_like(x)
    _call("silu_l2_backward", (x.numel() // x.shape[-1], x.shape[-1]), [x, dy.contiguous(), dx], {x.numel()})
    return dx


def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """x / sqrt(mean(x^2, -1) + eps) * w in the kernel, one pass a row: y like x, and the
    reciprocal root of each row (x's rows) for the backward."""
    x, d = x.contiguous(), x.shape[-1]
    rows = x.numel() // d
    y, r = torch.empty_like(x), x.new_empty(rows)
    _call("rms_norm_forward", (rows, d, eps), [x, w.contiguous(), y, r], {x.numel(), d, rows})
    return y, r


def rms_norm_backward(x: torch.Tensor, w: torch.Tensor, r: torch.Tensor, dy: torch.Tensor):
    """The gradients of `rms_norm` for dy: of x (its shape) and of w (d)."""
    d = x.shape[-1]
    rows = x.numel() // d
    dx, dw = torch.empty_like(x), w.new_empty(d)
    tensors = [x, w.contiguous(), r, dy.contiguous(), dx, dw]
    _call("rms_norm_backward", (rows, d), tensors, {x.numel(), d, rows})
    return dx, dw


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """attention.Rotary's turn in the kernel: x (B, n, g, d), each token's g rows turned by its
    row of cos and sin (n, d/2) -> y (B, n, g, d). x is read where it lies when its rows are
    contiguous and its tokens evenly spaced (q and k, the leading rows of a qkv projection);
    otherwise from a contiguous copy."""
    B, n, g, d = x.shape
    if B * n == 0:
        return x.new_empty(B, n, g, d)
    if x.stride(3) != 1 or x.stride(2) != d or x.stride(0) != n * x.stride(1):
        x = x.contiguous()
    ts = x.stride(1)
    span = (B * n - 1) * ts + g * d  # the elements the kernel reads, from x's first
    y = x.new_empty(B, n, g, d)
    tensors = [x.as_strided((span,), (1,)), cos.contiguous(), sin.contiguous(), y]
    _call("rope_rotate", (B * n, n, g, d, ts), tensors, {span, n * (d // 2), y.numel()})
    return y


def swiglu(z: torch.Tensor) -> torch.Tensor:
    """mlp.SwiGLU's product in the kernel: z (..., 2 h) = [gate | up] -> silu(gate) up (..., h)."""
    z, h = z.contiguous(), z.shape[-1] // 2
    y = z.new_empty(*z.shape[:-1], h)
    _call("swiglu_forward", (z.numel() // (2 * h), h), [z, y], {z.numel(), y.numel()})
    return y


def swiglu_backward(z: torch.Tensor, dy: torch.Tensor) -> torch.Tensor:
    """The gradient of `swiglu` at z for dy: of z, [d gate | d up]."""
    h = z.shape[-1] // 2
    dz = torch.empty_like(z)
    _call("swiglu_backward", (z.numel() // (2 * h), h), [z, dy.contiguous(), dz], {z.numel(), dy.numel()})
    return dz
