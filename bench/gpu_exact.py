"""The Triton kernels against the float64 reference on a real GPU. The CI checks them under
Triton's interpreter at head dim 16 (tests/components/test_memory_triton.py); this runs the
compiled kernels on the same test cases (the test suite's draws and loss) at head dim 64,
hidden 256, in float32 and with bf16 q / k / v, against `naive_memory_update` in float64.
One JSON line per case: the largest relative error (max |a - b| / max |b|) of the outputs,
the final state and each gradient. Needs pytest importable (the helpers live in the tests).

    python bench/gpu_exact.py --out docs/bench/gpu-exact.jsonl      # on CUDA
    python bench/gpu_exact.py --dry                                 # CPU, TRITON_INTERPRET=1, d 16
"""

from __future__ import annotations

import argparse
import os
import time


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry", action="store_true", help="CPU, head dim 16, Triton interpreted")
    p.add_argument("--out", help="also append the JSON lines to this file")
    args = p.parse_args()
    os.environ.setdefault("TRITON_INTERPRET", "1" if args.dry else "0")
    import torch
    from harness import emit

    from components.ops.memory import memory_update, naive_memory_update
    from tests.components.test_memory_op import as_dtype, make, outputs_state_grads, rel_error
    from tests.components.test_memory_triton import CASES

    device, d = ("cpu", 16) if args.dry else ("cuda", 64)
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu (interpreter)"
    for case_name, case in CASES.items():
        draw = make(case, d=d, e=4 * d)
        t = time.perf_counter()
        ref = outputs_state_grads(naive_memory_update, case, *as_dtype(torch.float64, *draw[:3], device=device))
        ref_s = time.perf_counter() - t
        for io in ("float32", "bfloat16"):
            line = {"case": case_name, "head_dim": d, "n": case.n, "chunk": case.chunk, "io_dtype": io}
            inputs, weights, model, leaves = as_dtype(torch.float32, *draw[:3], device=device)
            if io == "bfloat16":  # q, k, v in bf16, the gates and the state float32
                qkv = [t.detach().bfloat16().requires_grad_() for t in inputs[:3]]
                inputs, leaves = (*qkv, *inputs[3:]), [*qkv, *leaves[3:]]
            t = time.perf_counter()
            try:
                y, state, grads = outputs_state_grads(
                    memory_update, case, inputs, weights, model, leaves, backend="triton"
                )
                ours, refs = state.weights + (state.momentum or ()), ref[1].weights + (ref[1].momentum or ())
                line["outputs"] = rel_error(y.double(), ref[0])
                line["state"] = max(rel_error(a.double(), b) for a, b in zip(ours, refs))
                line["grads"] = [None if a is None else rel_error(a.double(), b) for a, b in zip(grads, ref[2])]
            except Exception as e:  # noqa: BLE001 - one failing case must not hide the others
                line["error"] = f"{type(e).__name__}: {e}"[:300]
            line.update(triton_s=time.perf_counter() - t, naive_s=ref_s, device=name)
            emit(line, args.out)


if __name__ == "__main__":
    main()
