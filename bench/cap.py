"""Cost of the per-token curvature cap (lr.curvature_cap) on the memory layer, forward+backward,
side by side in one run: python bench/cap.py -> one JSON line per setting."""

import json
import time

import torch

from components.neural_memory import NeuralMemorySpec


def run(cap, n=1024, dim=256, heads=4, chunk=16, reps=3):
    torch.manual_seed(0)
    mem = NeuralMemorySpec(chunk_size=chunk, lr={"curvature_cap": cap}).build(dim, heads)
    x = torch.randn(2, n, dim)
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        mem(x)[0].sum().backward()
        best = min(best, time.perf_counter() - t)
    return best


if __name__ == "__main__":
    for _ in range(2):
        off, on = run(None), run(2.0)
        print(json.dumps({"n": 1024, "dim": 256, "chunk": 16, "off_s": off, "cap_s": on, "ratio": on / off}))
