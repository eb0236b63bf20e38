"""Compile the memory's Triton kernels for an H100 (sm_90) on this machine, no GPU needed:
Triton's own compiler down to the cubin (its bundled ptxas), at the sizes `backend: auto` hands
them on CUDA. One JSON line per kernel: registers a thread, bytes spilled to local memory,
shared memory a block asks for (an H100 block may have 227 KB: more fails at launch), seconds.

    python bench/triton_sm90.py                          # auto's limits: chunk 64, head dim 64, hidden 256
    python bench/triton_sm90.py --chunk 16 --out docs/bench/triton-sm90.jsonl

The untiled kernels this replaced spilled 67-163 KB a thread at head dim 64, asked for up to
330 KB of shared memory, and the MLP kernel at hidden 256 did not finish compiling in 15 minutes
(on a lent H200 the first benchmark call ran out of time inside it). tests/components/
test_memory_triton.py runs this script. It must not run under TRITON_INTERPRET=1 (the kernels
would be the interpreter's, which do not compile).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import re
import time

os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"  # registers and spills, as ptxas reports them
os.environ.setdefault("TRITON_ALWAYS_COMPILE", "1")  # ptxas reports only when it runs (0: the cache may answer)
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

SMEM_LIMIT = 227 * 1024  # the most shared memory an sm_90 block may opt into


def compile_sm90(kernel, constants: dict) -> dict:
    """kernel (a triton.jit function) compiled for sm_90 with `triton_parts.LAUNCH`; constants:
    values of (a superset of) its constexpr parameters. Scalars named K are int32, cap float32;
    every other argument is a float32 pointer."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from components.ops.memory.triton_parts import LAUNCH

    names = {p.name for p in kernel.params if p.is_constexpr}
    consts = {n: v for n, v in constants.items() if n in names}
    sig = {
        a: "constexpr" if a in names else "i32" if a == "K" else "fp32" if a == "cap" else "*fp32"
        for a in kernel.arg_names
    }
    log, start = io.StringIO(), time.perf_counter()
    with contextlib.redirect_stdout(log):
        compiled = triton.compile(
            ASTSource(kernel, signature=sig, constexprs=consts), target=GPUTarget("cuda", 90, 32), options=LAUNCH
        )
    text = log.getvalue()
    regs = re.findall(r"Used (\d+) registers", text)
    spill = re.findall(r"(\d+) bytes spill stores", text)
    return {
        "shared_limit": SMEM_LIMIT,
        "registers": int(regs[-1]) if regs else None,
        "spill_bytes": int(spill[-1]) if spill else None,
        "shared_bytes": compiled.metadata.shared,
        "seconds": round(time.perf_counter() - start, 2),
    }


def kernels(chunk: int, head_dim: int, hidden: int):
    """(name, kernel, constants) of every launch of both kernel sets, every mechanism on (the
    largest variant of each)."""
    from components.ops.memory import triton_linear, triton_mlp

    on = dict(HAS_S=True, HAS_P=True, CAP=True, RESIDUAL=True, SILU=False)
    lin = dict(C=chunk, D=head_dim, BV=min(head_dim, triton_linear.TILE), BK=min(head_dim, triton_linear.TILE))
    mlp = dict(C=chunk, D=head_dim, E=hidden, BE=min(hidden, triton_mlp.TILE))
    for name in ("_state_fwd", "_read_fwd", "_bwd_reads", "_state_bwd", "_grads_cols", "_grads_rows"):
        yield f"linear{name}", getattr(triton_linear, name), lin | on
    for name in ("_state_fwd", "_read_fwd", "_state_bwd"):
        yield f"mlp{name}", getattr(triton_mlp, name), mlp | on
    for mode in (False, True):
        yield f"mlp_chunk_bwd[{'all' if mode else 'reads'}]", triton_mlp._chunk_bwd, mlp | on | {"ALL": mode}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--chunk", type=int, default=64)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--out", help="also append the JSON lines to this file")
    args = p.parse_args()
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("TRITON_INTERPRET=1: the kernels are the interpreter's and do not compile; unset it")
    from harness import emit

    for name, kernel, constants in kernels(args.chunk, args.head_dim, args.hidden):
        line = {
            "kernel": name,
            "chunk": args.chunk,
            "head_dim": args.head_dim,
            "hidden": args.hidden,
            "target": "sm_90",
        }
        try:
            line |= compile_sm90(kernel, constants)
        except Exception as e:  # noqa: BLE001 - one kernel failing must not hide the others
            line["error"] = f"{type(e).__name__}: {e}"[:300]
        emit(line, args.out)


if __name__ == "__main__":
    main()
