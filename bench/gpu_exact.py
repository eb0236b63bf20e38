"""The Triton kernels against the float64 reference on a real GPU (the CI checks them under
Triton's interpreter at tiny sizes; this is the compiled kernel at the layer's sizes). For the
linear and the 2-layer MLP memory (momentum, decay, per-token gates): the Triton backend in
float32, and with bf16 q / k / v, against `naive_memory_update` in float64 on the same draw.
One JSON line per case: the largest relative error (max |a - b| / max |b|) of the outputs, the
final state and the gradients of every input.

    python bench/gpu_exact.py --out docs/bench/gpu-exact.jsonl      # on CUDA, ~1 minute
    python bench/gpu_exact.py --dry                                 # CPU, TRITON_INTERPRET=1
"""

from __future__ import annotations

import argparse
import json
import os
import time


def draw(depth: int, b: int, h: int, n: int, d: int, e: int, device: str):
    """q, k (unit rows), v, gates lr / eta / alpha, initial weights: float64 leaves."""
    import torch
    import torch.nn.functional as F

    g = torch.Generator(device=device).manual_seed(0)
    rnd = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64, device=device)  # noqa: E731
    uni = lambda *s: torch.rand(*s, generator=g, dtype=torch.float64, device=device)  # noqa: E731
    widths = [d] + [e] * (depth - 1) + [d]
    inputs = (F.normalize(rnd(b, h, n, d), dim=-1), F.normalize(rnd(b, h, n, d), dim=-1), rnd(b, h, n, d))
    gates = (0.2 * uni(b, h, n), 0.6 * uni(b, h, n), 0.1 * uni(b, h, n))
    weights = tuple(rnd(h, a, c) * a**-0.5 for a, c in zip(widths[:-1], widths[1:]))
    return inputs, gates, weights


def outputs_state_grads(fn, tensors, chunk: int, io_dtype, **kw):
    """Run fn on leaves cast from the float64 draw; a loss on the outputs and the final state."""
    import torch

    from components.ops.memory import MemoryModel, init_memory_state

    (q, k, v), gates, weights = tensors
    state_dtype = torch.float64 if io_dtype == torch.float64 else torch.float32
    leaves = [t.detach().to(io_dtype).requires_grad_() for t in (q, k, v)]
    leaves += [t.detach().to(state_dtype).requires_grad_() for t in (*gates, *weights)]
    q, k, v, lr, eta, alpha, *ws = leaves
    state = init_memory_state(tuple(ws), q.shape[0], True)
    y, after = fn(q, k, v, lr, eta, alpha, state, chunk_size=chunk, model=MemoryModel("gelu"), **kw)
    cot = torch.randn(y.shape, generator=torch.Generator(device=y.device).manual_seed(1), device=y.device)
    loss = (y.double() * cot.double()).sum() + sum((w.double() ** 2).sum() for w in after.weights + after.momentum)
    grads = torch.autograd.grad(loss, leaves)
    return y, after.weights + after.momentum, grads


def rel(a, b) -> float:
    a, b = a.detach().double(), b.detach()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry", action="store_true", help="CPU, tiny sizes, Triton interpreted")
    p.add_argument("--out", help="also append the JSON lines to this file")
    args = p.parse_args()
    if args.dry:
        os.environ.setdefault("TRITON_INTERPRET", "1")
    import torch

    from components.ops.memory import memory_update, naive_memory_update

    device = "cpu" if args.dry else "cuda"
    b, h, n, d, chunk = (1, 2, 32, 16, 16) if args.dry else (2, 4, 256, 64, 64)
    for depth in (1, 2):
        tensors = draw(depth, b, h, n, d, 4 * d, device)
        t = time.perf_counter()
        ref = outputs_state_grads(naive_memory_update, tensors, chunk, torch.float64)
        ref_s = time.perf_counter() - t
        for io in (torch.float32, torch.bfloat16):
            line = {"memory": "linear" if depth == 1 else "mlp", "b": b, "heads": h, "seq": n, "head_dim": d}
            line.update(chunk=chunk, backend="triton", io_dtype=str(io).removeprefix("torch."), naive_s=ref_s)
            try:
                y, state, grads = outputs_state_grads(memory_update, tensors, chunk, io, backend="triton")
                line["outputs"] = rel(y, ref[0])
                line["state"] = max(rel(a, r) for a, r in zip(state, ref[1]))
                names = ["q", "k", "v", "lr", "eta", "alpha"] + [f"W{i + 1}" for i in range(depth)]
                line["grads"] = {nm: rel(a, r) for nm, a, r in zip(names, grads, ref[2])}
            except Exception as e:  # noqa: BLE001 - one failing case must not hide the others
                line["error"] = f"{type(e).__name__}: {e}"[:300]
            line["device"] = torch.cuda.get_device_name() if device == "cuda" else "cpu (interpreter)"
            print(json.dumps(line), flush=True)
            if args.out:
                with open(args.out, "a") as f:
                    f.write(json.dumps(line) + "\n")


if __name__ == "__main__":
    main()
