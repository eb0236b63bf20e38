"""Benchmark of the neural memory layer: tokens/s forward and forward+backward, peak RSS,
executed GFLOP/s, side by side with the naive reference and titans-pytorch 0.5.5.

The implementations of one setting are timed in one process, interleaved round-robin for
`--rounds` rounds, so that all see the same machine conditions (this machine is shared and noisy:
compare the ratios within a group). Peak RSS is then measured for each configuration alone in a
fresh process. One JSON line per configuration.

    python bench/memory.py --out docs/bench/memory.jsonl     # the suite in docs/benchmarks.md
    python bench/memory.py --quick                           # seq 1K only
    python bench/memory.py --group '[{"impl": "exact"}, {"impl": "titans-pytorch"}]'
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

DEFAULTS = {"impl": "exact", "mode": "fwdbwd", "seq": 1024, "chunk": 64, "depth": 2, "dim": 256, "heads": 4,
            "batch": 2, "threads": 2}

IMPLS = {
    "exact": "ours, paper semantics: per-token gates, read after each token's update",
    "exact+compile": "the same, chunk step through torch.compile (CPU inductor)",
    "coarse": "ours, titans-pytorch-like: chunk-level gates and one step per chunk, read at the chunk start",
    "coarse+compile": "the same, chunk step through torch.compile",
    "naive": "ours, reference token loop (autograd inner gradients)",
    "titans-pytorch": "titans_pytorch.NeuralMemory 0.5.5 (gradients of all chunks at the call's initial weights)",
    "titans-pytorch-ttt": "titans_pytorch.NeuralMemory 0.5.5 with batch_size=chunk (weights refreshed every chunk)",
}


def build(cfg: dict):
    import torch

    torch.manual_seed(0)
    impl = cfg["impl"]
    if impl.startswith("titans-pytorch"):
        from titans_pytorch import MemoryMLP, NeuralMemory

        model = MemoryMLP(cfg["dim"] // cfg["heads"], depth=cfg["depth"], expansion_factor=4.0)
        layer = NeuralMemory(dim=cfg["dim"], heads=cfg["heads"], dim_head=cfg["dim"] // cfg["heads"],
                             chunk_size=cfg["chunk"], model=model,
                             batch_size=cfg["chunk"] if impl.endswith("ttt") else None)
        return lambda x: layer(x)[0], layer
    from components.neural_memory import NeuralMemorySpec, compile_memory

    spec = {"chunk_size": cfg["chunk"], "heads": cfg["heads"]}
    spec["model"] = {"kind": "mlp", "depth": cfg["depth"]} if cfg["depth"] > 1 else {"kind": "linear"}
    if impl.startswith("coarse"):
        spec.update(granularity="chunk", read="chunk_start")
    layer = NeuralMemorySpec.model_validate(spec).build(cfg["dim"], cfg["heads"])
    if impl.endswith("+compile"):
        compile_memory(layer)
    if impl == "naive":
        import components.neural_memory as nm
        from components.ops.memory import naive_memory_update

        nm.memory_update = naive_memory_update
    return lambda x: layer(x)[0], layer


def _step_fn(cfg: dict):
    import torch

    fn, layer = build(cfg)
    x = torch.randn(cfg["batch"], cfg["seq"], cfg["dim"], generator=torch.Generator().manual_seed(1))

    def step():
        if cfg["mode"] == "fwd":
            with torch.no_grad():
                fn(x)
        else:
            layer.zero_grad(set_to_none=True)
            fn(x).float().pow(2).mean().backward()

    return step


def time_group(group: list[dict], rounds: int) -> list[dict]:
    """Time the configurations of one group in this process, interleaved round-robin, so that
    every implementation sees the same machine conditions; keep each one's best and median."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    torch.set_num_threads(group[0]["threads"])
    steps, first, times, flops = {}, {}, {}, {}
    for i, cfg in enumerate(group):
        steps[i] = _step_fn(cfg)
        t0 = time.perf_counter()
        steps[i]()  # warm-up (and compilation, for the compiled variants)
        first[i] = time.perf_counter() - t0
        times[i] = []
        flops[i] = None
        if cfg["impl"] != "naive":
            try:
                with FlopCounterMode(display=False) as counter:
                    steps[i]()
                flops[i] = counter.get_total_flops()
            except Exception:  # noqa: BLE001 - a counter failure must not lose the timing
                pass
    for _ in range(rounds):
        for i, cfg in enumerate(group):
            t = time.perf_counter()
            steps[i]()
            times[i].append(time.perf_counter() - t)
    out = []
    for i, cfg in enumerate(group):
        tokens = cfg["batch"] * cfg["seq"]
        best, median = min(times[i]), sorted(times[i])[len(times[i]) // 2]
        out.append({**cfg, "tokens_per_s": tokens / best, "tokens_per_s_median": tokens / median,
                    "rounds": rounds, "first_call_s": first[i],
                    "gflop_per_s": flops[i] / best / 1e9 if flops[i] else None, "torch": torch.__version__})
    return out


def peak_rss(cfg: dict) -> dict:
    """Peak RSS of one warm-up step plus one step, alone in this process (MiB), and the RSS
    after imports and building (the baseline)."""
    import torch

    torch.set_num_threads(cfg["threads"])
    step = _step_fn(cfg)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    step()
    step()
    return {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "base_rss_mb": base}


def suite(quick: bool) -> list[list[dict]]:
    """Groups of configurations compared side by side (same setting, several implementations)."""
    groups = []
    main = ["exact", "exact+compile", "coarse", "coarse+compile", "titans-pytorch", "titans-pytorch-ttt"]
    for seq in [1024] if quick else [1024, 4096, 16384]:
        for mode in ["fwd", "fwdbwd"]:
            impls = main if seq < 16384 else ["exact", "coarse", "titans-pytorch"]
            groups.append([{"impl": i, "seq": seq, "mode": mode} for i in impls])
    if not quick:
        for seq in [1024, 4096]:
            groups.append([{"impl": i, "seq": seq, "mode": "fwdbwd", "chunk": 16} for i in ["exact", "coarse", "titans-pytorch"]])
            groups.append([{"impl": i, "seq": seq, "mode": "fwdbwd", "depth": 1} for i in ["exact", "coarse", "titans-pytorch"]])
    for m in ["fwd", "fwdbwd"]:
        groups.append([{"impl": i, "seq": 256, "mode": m, "rounds": 2} for i in ["naive", "exact"]])
    return groups


def _run(flag: str, payload) -> dict | list:
    env = {**os.environ, "OMP_NUM_THREADS": str(DEFAULTS["threads"])}
    proc = subprocess.run([sys.executable, __file__, flag, json.dumps(payload)], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or ["failed"])[-1]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--group", help="time a JSON list of configurations in this process (interleaved)")
    p.add_argument("--rss", help="peak RSS of one JSON configuration in this process")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--out", help="also append the JSON lines to this file")
    args = p.parse_args()
    if args.group:
        group = [{**DEFAULTS, **c} for c in json.loads(args.group)]
        print(json.dumps(time_group(group, max(c.get("rounds", args.rounds) for c in group))))
        return
    if args.rss:
        print(json.dumps(peak_rss({**DEFAULTS, **json.loads(args.rss)})))
        return
    for group in suite(args.quick):
        timed = _run("--group", group)
        results = timed if isinstance(timed, list) else [{**DEFAULTS, **c, **timed} for c in group]
        for res in results:
            if "error" not in res:
                res.update(_run("--rss", {k: res[k] for k in DEFAULTS}))
            line = json.dumps(res)
            print(line, flush=True)
            if args.out:
                with open(args.out, "a") as f:
                    f.write(line + "\n")


if __name__ == "__main__":
    main()
