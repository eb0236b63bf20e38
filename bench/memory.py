"""Benchmark of the neural memory layer: tokens/s forward and forward+backward, peak RSS,
executed GFLOP/s, side by side with the naive reference and titans-pytorch 0.5.5 (bench extra).

    python bench/memory.py --out docs/bench/memory.jsonl     # the suite in docs/benchmarks.md
    python bench/memory.py --quick                           # seq 1K only
    python bench/memory.py --group '[{"impl": "exact"}, {"impl": "titans-pytorch"}]'
    python bench/memory.py --group '[{"impl": "exact", "depth": 1}, {"impl": "exact", "depth": 1, "memory_op": "off"}]'

`"memory_op": "off"` times our layer with its memory op swapped for a pass-through
(`models.remove_memory_op`): the layer's rest (projections, conv, SiLU, l2 norms, gates, output
norm and gate), so that a comparison can say what the op itself costs.
"""

from __future__ import annotations

from harness import main

DEFAULTS = {
    "impl": "exact",
    "mode": "fwdbwd",
    "seq": 1024,
    "chunk": 64,
    "depth": 2,
    "dim": 256,
    "heads": 4,
    "batch": 2,
    "threads": 2,
    "memory_op": "on",
}

IMPLS = {
    "exact": "ours, paper semantics: per-token gates, read after each token's update",
    "exact+compile": "the same, chunk step through torch.compile (CPU inductor)",
    "coarse": "ours, chunk-level gates and one step per chunk, read at the chunk start",
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
        if cfg["memory_op"] != "on":
            raise ValueError("memory_op: off removes our memory op; titans-pytorch's layer has no such switch")
        from titans_pytorch import MemoryMLP, NeuralMemory

        model = MemoryMLP(cfg["dim"] // cfg["heads"], depth=cfg["depth"], expansion_factor=4.0)
        layer = NeuralMemory(
            dim=cfg["dim"],
            heads=cfg["heads"],
            dim_head=cfg["dim"] // cfg["heads"],
            chunk_size=cfg["chunk"],
            model=model,
            batch_size=cfg["chunk"] if impl.endswith("ttt") else None,
        )
        return lambda x: layer(x)[0], layer
    import components.neural_memory as nm
    from components.ops.memory import naive_memory_update

    spec = {"chunk_size": cfg["chunk"], "heads": cfg["heads"]}
    spec["model"] = {"kind": "mlp", "depth": cfg["depth"]} if cfg["depth"] > 1 else {"kind": "linear"}
    if impl.startswith("coarse"):
        spec.update(granularity="chunk", read="chunk_start")
    if "backend" in cfg:
        spec["backend"] = cfg["backend"]
    layer = nm.NeuralMemorySpec.model_validate(spec).build(cfg["dim"], cfg["heads"])
    if impl.endswith("+compile"):
        nm.compile_memory(layer)
    if impl == "naive":
        layer.update = naive_memory_update
    if cfg["memory_op"] == "off":
        from models import remove_memory_op

        remove_memory_op(layer)
    return lambda x: layer(x)[0], layer


def make_step(cfg: dict):
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

    return step, layer


def suite(quick: bool) -> list[list[dict]]:
    """Groups of configurations compared side by side (one setting, several implementations)."""
    groups = []
    main_impls = ["exact", "exact+compile", "coarse", "coarse+compile", "titans-pytorch", "titans-pytorch-ttt"]
    for seq in [1024] if quick else [1024, 4096, 16384]:
        for mode in ["fwd", "fwdbwd"]:
            impls = main_impls if seq < 16384 else ["exact", "coarse", "titans-pytorch"]
            groups.append(
                [{"impl": i, "seq": seq, "mode": mode, **({"rounds": 3} if seq > 4096 else {})} for i in impls]
            )
    if not quick:
        for seq in [1024, 4096]:
            for setting in [{"chunk": 16}, {"depth": 1}]:
                groups.append(
                    [
                        {"impl": i, "seq": seq, "mode": "fwdbwd", **setting}
                        for i in ["exact", "coarse", "titans-pytorch"]
                    ]
                )
    for depth in (1, 2):  # what our layer costs besides its memory op, beside titans-pytorch's whole layer
        groups.append(
            [
                {"impl": "exact", "depth": depth, "mode": "fwdbwd"},
                {"impl": "exact", "depth": depth, "mode": "fwdbwd", "memory_op": "off"},
                {"impl": "titans-pytorch", "depth": depth, "mode": "fwdbwd"},
            ]
        )
    for mode in ["fwd", "fwdbwd"]:
        groups.append(
            [
                {"impl": i, "seq": 256, "mode": mode, "rounds": 2, "count_flops": i != "naive"}
                for i in ["naive", "exact"]
            ]
        )
    return groups


if __name__ == "__main__":
    main(__doc__, DEFAULTS, suite, make_step)
