"""GPU benchmark, one prepared run for a lent GPU (fits in ~8 minutes on one H100/H200): the
memory layer and whole models at 1K-16K tokens, torch vs triton backend, float32 vs bf16
autocast, the compiled chunk step; windows go through FlexAttention on CUDA. One JSON line per
configuration: forward+backward tokens/s, peak CUDA memory, FLOPs and MFU.

FLOPs are counted as docs/benchmarks.md counts them: torch's FlopCounterMode (with the CPU
attention formulas of `titans_nas.flops.flop_counter`) over one step of the torch backend (the
Triton kernel computes the same matmuls, which the counter cannot see, so its MFU uses the torch
variant's count). MFU = FLOPs / time / peak, peak from --peak-tflops
(default by device name: H100/H200 989 bf16 dense, 495 tf32/fp32 tensor-core).

    bash bench/gpu.sh                              # the whole run -> docs/bench/gpu.jsonl
    python bench/gpu.py --dry                      # CPU smoke run: tiny sizes, TRITON_INTERPRET=1
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

from harness import emit
from models import KINDS, MEMORY_KINDS, spec_for  # the block union (bench/models.py)

PEAKS = {"H100": (989.0, 495.0), "H200": (989.0, 495.0), "A100": (312.0, 156.0)}  # (bf16, tf32) TFLOP/s

LAYER = {"dim": 512, "heads": 8, "chunk": 64, "batch": 4}
MODEL = {"dim": 512, "depth": 4, "heads": 8, "chunk": 64, "window": 512, "segment": 512, "batch": 2}
DRY_LAYER = {"dim": 32, "heads": 2, "chunk": 16, "batch": 1}
DRY_MODEL = {"dim": 32, "depth": 1, "heads": 2, "chunk": 16, "window": 16, "segment": 16, "batch": 1}


def configs(dry: bool) -> list[dict]:
    seqs = [64] if dry else [1024, 4096, 16384]
    out = []
    for seq in seqs:
        for memory in ["mlp", "linear"]:
            for backend, dtype, compiled in [  # the pairs side by side first, in case time runs out
                ("torch", "float32", False),
                ("triton", "float32", False),
                ("torch", "bf16", False),
                ("triton", "bf16", False),
                ("torch", "bf16", True),
            ]:
                if dry and compiled:
                    continue
                cfg = {"what": "layer", "memory": memory, "seq": seq, "backend": backend, "dtype": dtype}
                out.append({**cfg, "compiled": compiled})
    for seq in [64] if dry else [1024, 4096, 16384]:
        for kind in KINDS:
            for backend in ["torch", "triton"] if kind in MEMORY_KINDS else ["torch"]:
                out.append({"what": "model", "kind": kind, "seq": seq, "backend": backend, "dtype": "bf16"})
    return out


def build(cfg: dict, dry: bool):
    import torch

    from components.neural_memory import NeuralMemorySpec, compile_memory

    device = "cpu" if dry else "cuda"
    torch.manual_seed(0)
    if cfg["what"] == "layer":
        size = DRY_LAYER if dry else LAYER
        spec = {"chunk_size": size["chunk"], "heads": size["heads"], "backend": cfg["backend"]}
        spec["model"] = {"kind": cfg["memory"]}
        module = NeuralMemorySpec.model_validate(spec).build(size["dim"], size["heads"]).to(device)
        if cfg["compiled"]:
            compile_memory(module)
        x = torch.randn(size["batch"], cfg["seq"], size["dim"], device=device)
        loss_of = lambda: module(x)[0].float().pow(2).mean()  # noqa: E731
        return module, loss_of, size["batch"] * cfg["seq"]
    from titans_nas.builder import build_model

    size = DRY_MODEL if dry else MODEL
    memory_backend = {"backend": cfg["backend"]} if cfg["kind"] in MEMORY_KINDS else {}
    model = build_model(spec_for({"impl": cfg["kind"], **size, **memory_backend})).to(device)
    tokens = torch.randint(0, 256, (size["batch"], cfg["seq"] + 1), device=device)

    def loss_of():
        logits, _ = model(tokens[:, :-1])
        return torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), tokens[:, 1:].flatten())

    return model, loss_of, size["batch"] * cfg["seq"]


def run(cfg: dict, dry: bool, rounds: int) -> dict:
    import torch

    from titans_nas.flops import flop_counter

    module, loss_of, tokens = build(cfg, dry)
    device = "cpu" if dry else "cuda"
    amp = torch.autocast(device, dtype=torch.bfloat16, enabled=cfg["dtype"] == "bf16")
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def step():
        module.zero_grad(set_to_none=True)
        with amp:
            loss = loss_of()
        loss.backward()

    t0 = time.perf_counter()
    step()
    sync()
    first = time.perf_counter() - t0
    flops = None
    if cfg["backend"] == "torch" and not cfg.get("compiled"):
        with flop_counter() as counter:
            step()
        flops = counter.get_total_flops()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(rounds):
        sync()
        t = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t)
    best = min(times)
    out = {**cfg, "tokens_per_s": tokens / best, "step_s": best, "first_call_s": first, "flops": flops}
    out["peak_mem_mb"] = torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else None
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry", action="store_true", help="CPU smoke run at tiny sizes (Triton interpreted)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--peak-tflops", type=float, help="the device's peak for the run's dtype (default by name)")
    p.add_argument("--out", help="also append the JSON lines to this file")
    p.add_argument("--budget-s", type=float, default=450.0, help="stop starting new configurations after this")
    args = p.parse_args()
    if args.dry:
        os.environ.setdefault("TRITON_INTERPRET", "1")
    import torch

    name = torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu"
    if not args.dry and not torch.cuda.is_available():
        raise SystemExit("bench/gpu.py: no CUDA device (use --dry for a CPU smoke run)")
    peaks = next((v for k, v in PEAKS.items() if k in name), None)
    info = {"device": name, "torch": torch.__version__, "date": time.strftime("%Y-%m-%d")}
    flops_of: dict[tuple, float] = {}
    start = time.perf_counter()
    for cfg in configs(args.dry):
        if time.perf_counter() - start > args.budget_s:
            print(json.dumps({**cfg, "skipped": "time budget"}), flush=True)
            continue
        try:
            res = run(cfg, args.dry, 1 if args.dry else args.rounds)
        except Exception as e:  # noqa: BLE001 - one failing configuration must not end the run
            res = {**cfg, "error": f"{type(e).__name__}: {e}"[:300]}
        key = tuple(v for k, v in sorted(cfg.items()) if k not in ("backend", "compiled"))
        if res.get("flops"):
            flops_of[key] = res["flops"]
        flops = flops_of.get(key)
        peak = args.peak_tflops or (peaks and (peaks[0] if cfg["dtype"] == "bf16" else peaks[1]))
        if flops and "step_s" in res and peak:
            res["mfu"] = flops / res["step_s"] / (peak * 1e12)
        emit({**res, **info}, args.out)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
